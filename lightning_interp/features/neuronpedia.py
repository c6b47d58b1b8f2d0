"""Export a feature store in the batch layout SAEDashboard's Neuronpedia runner writes.

Reference read: jbloomAus/SAEDashboard at commit ``db4839a41116d729fc9f43c1878e7b8b157748ea``
(2026-05-11): ``sae_dashboard/neuronpedia/neuronpedia_dashboard.py`` (the ``to_dict`` of
``NeuronpediaDashboardBatch``/``Feature``/``Activation``), ``neuronpedia_converter.py`` (how
the fields are filled), ``neuronpedia_runner.py`` (``batch-<n>.json`` per
``n_features_at_a_time`` = 128 live features, ``skipped_indexes.json`` for the others) and
``neuronpedia_export.py`` (the converter from those batches to Neuronpedia's bulk-import
JSONL, which reads every feature key below with ``[...]``, so none may be missing).

Layout of ``batch-<n>.json``::

    {"model_id": str, "layer": int, "sae_set": str, "sae_id_suffix": str | null,
     "features": [{"feature_index": int,
                   "neuron_alignment_indices"/"_values"/"_l1": [],
                   "correlated_neurons_indices"/"_l1"/"_pearson": [],
                   "correlated_features_indices": [int], "correlated_features_l1": [],
                   "correlated_features_pearson": [float],
                   "neg_str": [str], "neg_values": [float], "pos_str": [str],
                   "pos_values": [float], "frac_nonzero": float,
                   "freq_hist_data_bar_values": [float], "freq_hist_data_bar_heights": [float],
                   "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
                   "n_prompts_total": int, "n_tokens_in_prompt": int, "dataset": str,
                   "decoder_weights_dist": [], "vector": [],
                   "activations": [{"bin_min": float, "bin_max": float,
                                    "bin_contains": float, "tokens": [str],
                                    "values": [float], "qualifying_token_index": int}]}]}

Mapping: top contexts -> activations with ``bin_min = bin_contains = -1`` and ``bin_max`` the
latent's max (as SAEDashboard's "TOP ACTIVATIONS" group); quantile-sampled contexts ->
activations of interval ``(b/Q, (b+1)/Q]`` of the max, ``bin_contains`` the fraction of
firings in it estimated from the log-histogram; padding (-1) tokens are dropped; logit lens
-> ``pos_*``/``neg_*``; density -> ``frac_nonzero``; histogram -> ``freq_hist`` bars (bar
value: the activation at the centre of the log10 bin; height: the count). Values are
rounded to 5 decimals as SAEDashboard does. Left empty because the store does not hold
them: neuron alignment, correlated neurons, cosine similarity of correlated features, the
logit histogram, decoder weight distribution per head, DFA values and the decoder vector.
Latents that never fire are listed in ``skipped_indexes.json``, as the runner lists those
below its sparsity threshold. The camelCase keys (``modelId``, ``maxValue``,
``maxValueTokenIndex``...) belong to the bulk-import JSONL that ``neuronpedia_export.py``
derives from these batches (``maxValue = max(values)``); that step is Neuronpedia's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_interp._commands import run_command
from lightning_interp._io import atomic_write, folder_replaced_atomically
from lightning_interp.errors import ConfigError, InvalidFeatureStoreError, OutputExistsError
from lightning_interp.features.layout import read_store

FEATURES_PER_BATCH = 128  # SAEDashboard's NeuronpediaRunnerConfig.n_features_at_a_time
_DIGITS = 5  # SAEDashboard's FeatureProcessor.round_list
_EMPTY_KEYS = (
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_l1",
    "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "decoder_weights_dist",
    "vector",
)


def _round(values: list[float]) -> list[float]:
    return [round(float(v), _DIGITS) for v in values]


def _strings(vocab: dict[str, str], ids: list[int]) -> list[str]:
    try:
        return [vocab[str(i)] for i in ids]
    except KeyError as err:
        raise InvalidFeatureStoreError(
            f"token id {err.args[0]} is missing from vocab.json; rebuild the store"
        ) from None


def _activation(
    vocab: dict[str, str], tokens: Tensor, acts: Tensor, centre: int, bounds: tuple[float, ...]
) -> dict[str, Any]:
    keep = tokens >= 0  # -1 pads windows cut by the start or end of a text
    return {
        "bin_min": bounds[0],
        "bin_max": bounds[1],
        "bin_contains": bounds[2],
        "tokens": _strings(vocab, tokens[keep].tolist()),
        "values": _round(acts[keep].float().tolist()),
        "qualifying_token_index": int(keep[:centre].sum()),
    }


def _bin_share(histogram: list[int], edges: list[float], low: float, high: float) -> float:
    """Fraction of firings whose log-bin centre lies in ``(low, high]`` (an estimate)."""
    total = sum(histogram)
    inside = sum(n for n, c in zip(histogram, edges, strict=True) if low < c <= high)
    return round(inside / total, _DIGITS) if total else 0.0


def _feature(store: dict[str, Any], latent: int, centres: list[float]) -> dict[str, Any]:
    meta, stats, ctx, vocab = store["meta"], store["stats"], store["contexts"], store["vocab"]
    top = float(stats["max_activation"][latent])
    histogram = stats["histogram"][latent].tolist()
    activations = [
        _activation(
            vocab,
            ctx["top_tokens"][latent, k],
            ctx["top_activations"][latent, k],
            int(ctx["top_center"][latent, k]),
            (-1, round(top, _DIGITS), -1),
        )
        for k in range(ctx["top_source"].shape[1])
        if int(ctx["top_source"][latent, k]) >= 0
    ]
    bins, per = meta["quantile_bins"], meta["per_quantile"]
    for k in range(ctx["quantile_source"].shape[1]):
        if int(ctx["quantile_source"][latent, k]) < 0:
            continue
        low, high = top * (k // per) / bins, top * (k // per + 1) / bins
        share = _bin_share(histogram, centres, low, high)
        activations.append(
            _activation(
                vocab,
                ctx["quantile_tokens"][latent, k],
                ctx["quantile_activations"][latent, k],
                int(ctx["quantile_center"][latent, k]),
                (round(low, _DIGITS), round(high, _DIGITS), share),
            )
        )
    lens = meta.get("logit_lens", 0)
    ids = [int(i) for i in stats["correlated_ids"][latent].tolist() if i >= 0]
    pearson = stats["correlated_values"][latent, : len(ids)].tolist()
    corpus = meta["corpus"]
    feature: dict[str, Any] = {key: [] for key in _EMPTY_KEYS}
    feature |= {
        "feature_index": latent,
        "correlated_features_indices": ids,
        "correlated_features_pearson": _round(pearson)
        if meta.get("correlation") == "pearson"
        else [],
        "pos_str": _strings(vocab, stats["logit_top_ids"][latent].tolist()) if lens else [],
        "pos_values": _round(stats["logit_top_values"][latent].tolist()) if lens else [],
        "neg_str": _strings(vocab, stats["logit_bottom_ids"][latent].tolist()) if lens else [],
        "neg_values": _round(stats["logit_bottom_values"][latent].tolist()) if lens else [],
        "frac_nonzero": float(stats["density"][latent]),
        "freq_hist_data_bar_values": _round(centres),
        "freq_hist_data_bar_heights": [float(n) for n in histogram],
        "n_prompts_total": math.ceil(corpus["tokens"] / corpus["context_size"]),
        "n_tokens_in_prompt": corpus["context_size"],
        "dataset": corpus["dataset"],
        "activations": activations,
    }
    return feature


def _layer_of(site: str) -> int:
    found = re.search(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)(?:\.|$)", site)
    if not found:
        raise ConfigError(f"cannot read a layer number from site {site!r}; pass --layer N")
    return int(found.group(1))


def _write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def export_neuronpedia(
    store_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model_id: str | None = None,
    layer: int | None = None,
    sae_set: str = "lightning-interp",
    sae_id_suffix: str | None = None,
    features_per_batch: int = FEATURES_PER_BATCH,
) -> Path:
    """Write a feature store as SAEDashboard's Neuronpedia ``batch-<n>.json`` files.

    The folder is built beside ``out`` and renamed into place, so it exists whole or not
    at all.

    Args:
        store_dir: The feature store (layout v1, text modality).
        out: The folder to create.
        model_id: Neuronpedia model id (default: last part of the store's backbone name).
        layer: Layer number (default: read from the store's site, e.g. ``layers.6...``).
        sae_set: Neuronpedia SAE set name (the source id is ``<layer>-<sae_set>``).
        sae_id_suffix: Optional ``__<suffix>`` after the set name.
        features_per_batch: Live latents per ``batch-<n>.json``.

    Returns:
        The export folder.

    Raises:
        FeatureStoreNotFoundError: ``store_dir`` is not a feature store.
        InvalidFeatureStoreError: the store is of another format or inconsistent.
        OutputExistsError: ``out`` exists already.
        ConfigError: an image store, no model id or layer to be found, or a batch size < 1.
    """
    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"{out} exists; remove it or choose another --out")
    if features_per_batch < 1:
        raise ConfigError(f"--features-per-batch must be positive, got {features_per_batch}")
    store = read_store(store_dir)
    meta = store["meta"]
    if meta.get("modality", "text") != "text":
        raise ConfigError("Neuronpedia export takes text stores; this store holds image patches")
    dictionary = meta["dictionary"]
    model_id = model_id or (dictionary.get("backbone") or "").rstrip("/").split("/")[-1]
    if not model_id:
        raise ConfigError("the store names no backbone; pass --model-id")
    layer = _layer_of(dictionary["site"]) if layer is None else layer
    hist = meta["histogram"]
    step = (hist["log10_max"] - hist["log10_min"]) / hist["bins"]
    centres = [10 ** (hist["log10_min"] + step * (b + 0.5)) for b in range(hist["bins"])]
    count = store["stats"]["count"]
    live = [i for i in range(count.numel()) if int(count[i]) > 0]
    header = {"model_id": model_id, "layer": layer, "sae_set": sae_set}

    with folder_replaced_atomically(out) as tmp:
        for n, start in enumerate(range(0, len(live), features_per_batch)):
            chunk = live[start : start + features_per_batch]
            batch = header | {
                "sae_id_suffix": sae_id_suffix,
                "features": [_feature(store, latent, centres) for latent in chunk],
            }
            _write_json(tmp / f"batch-{n}.json", batch)
        dead = sorted(set(range(count.numel())) - set(live))
        skipped = header | {"layer": str(layer), "log_sparsity": None, "skipped_indexes": dead}
        _write_json(tmp / "skipped_indexes.json", skipped)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-interp neuronpedia",
        description="Write a feature store as the batch-<n>.json files SAEDashboard's "
        "Neuronpedia runner produces (for Neuronpedia's upload and bulk import).",
    )
    parser.add_argument("store", help="feature store folder (lightning-interp features)")
    parser.add_argument("--out", required=True, help="export folder to create")
    parser.add_argument("--model-id", help="Neuronpedia model id (default: the backbone's name)")
    parser.add_argument("--layer", type=int, help="layer number (default: from the site)")
    parser.add_argument("--sae-set", default="lightning-interp", help="Neuronpedia SAE set")
    parser.add_argument("--sae-id-suffix", help="suffix of the source id (__<suffix>)")
    parser.add_argument(
        "--features-per-batch", type=int, default=FEATURES_PER_BATCH, help="latents per file"
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    out = export_neuronpedia(
        args.store,
        args.out,
        model_id=args.model_id,
        layer=args.layer,
        sae_set=args.sae_set,
        sae_id_suffix=args.sae_id_suffix,
        features_per_batch=args.features_per_batch,
    )
    print(out)
    return 0


def command(argv: list[str]) -> int:
    """Run ``lightning-interp neuronpedia``; returns the exit code."""
    return run_command("neuronpedia", _parser(), _run, argv)
