"""An evaluate JSON in a model card: ``model-index`` entries, a table, the auto-interp summary.

``lightning-interp evaluate --out results.json`` writes one JSON per dictionary
(:mod:`lightning_interp.evals.commands`). :func:`eval_results` turns its headline numbers
into ``huggingface_hub.EvalResult`` s (each naming the eval, its dataset and its settings'
source, as SAEBench names them); :func:`evaluation_section` renders them as a readable
table, plus an *Auto-interpretation* paragraph when the JSON holds the autointerp eval.
This module lives in the zoo (not in ``evals``) because the card builder needs it and the
zoo may not import the evaluation suite (which loads dictionaries through the zoo).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_interp._io import read_json
from lightning_interp.errors import ConfigError

#: The file name an evaluation has beside a dictionary (picked up by ``card`` / ``publish``).
EVALUATION_NAME = "evaluation.json"
_SCORERS = (("detection", "Detection"), ("fuzz", "Fuzzing"), ("embedding", "Embedding"))

#: eval -> [(metric key in results["evals"][eval]["metrics"], display name)].
HEADLINES: dict[str, list[tuple[str, str]]] = {
    "core": [
        ("explained_variance", "Explained variance"),
        ("mse", "MSE"),
        ("cossim", "Cosine similarity"),
        ("l2_ratio", "L2 ratio"),
        ("relative_reconstruction_bias", "Relative reconstruction bias"),
        ("l0", "L0"),
        ("dead_fraction", "Dead fraction (eval window)"),
        ("dense_fraction_10pct", "Dense fraction (>10%)"),
        ("ce_loss_recovered", "CE loss recovered"),
        ("kl_div_score", "KL divergence score"),
    ],
    "sparse_probing": [
        ("llm_test_accuracy", "Dense probe accuracy"),
        *((f"sae_top_{k}_test_accuracy", f"Top-{k} latent probe accuracy") for k in (1, 2, 5, 20)),
    ],
    "absorption": [
        ("mean_absorption_fraction_score", "Mean absorption fraction"),
        ("mean_full_absorption_score", "Mean full absorption"),
    ],
    "autointerp": [
        (f"{key}_auroc{suffix}", f"{name} AUROC ({kind} explanations)")
        for key, name in _SCORERS
        for suffix, kind in (("", "real"), ("_shuffled", "shuffled"))
    ],
}


def read_evaluation(path: str | Path) -> dict[str, Any]:
    """An ``evaluate --out`` JSON, checked to be one.

    Raises:
        CorruptFileError: not a UTF-8 JSON object.
        ConfigError: a JSON object without an ``evals`` mapping.
    """
    results = read_json(Path(path))
    if not isinstance(results.get("evals"), dict):
        raise ConfigError(
            f"{path} is not a `lightning-interp evaluate --out` file (no 'evals' object); "
            "pass the JSON that evaluate wrote"
        )
    return results


def optional_evaluation(path: Path) -> dict[str, Any] | None:
    """The evaluate JSON at ``path``, or ``None`` when there is no such file."""
    return read_evaluation(path) if path.is_file() else None


def with_evaluation(items: list[Any], path: str | os.PathLike[str]) -> list[Any]:
    """Publish items with the evaluate JSON at ``path`` given to the dictionary it evaluated.

    The JSON goes to the item whose site is the JSON's ``site``, else to the only item.

    Raises:
        ConfigError: several dictionaries and none (or several) read the JSON's site.
    """
    from dataclasses import replace

    evaluation = read_evaluation(path)
    site = evaluation.get("site")
    matching = [i for i, it in enumerate(items) if it.dictionary.config.provenance.site == site]
    if len(items) > 1 and len(matching) != 1:
        raise ConfigError(
            f"{path} evaluates site {site!r}, which is not the site of exactly one of the "
            f"{len(items)} dictionaries; put an {EVALUATION_NAME} in each dictionary's folder"
        )
    index = matching[0] if matching else 0
    return [replace(it, evaluation=evaluation) if i == index else it for i, it in enumerate(items)]


def _dataset(name: str, block: dict[str, Any], results: dict[str, Any]) -> str:
    settings = block.get("settings", {})
    if name == "sparse_probing":
        return "; ".join(settings.get("tasks", {}).values()) or "labelled texts"
    if name == "absorption":
        return f"first-letter task on {results.get('backbone', 'the backbone')}'s vocabulary"
    window = f"{settings.get('text', 'text')} ({settings.get('token_window', '?')} tokens)"
    if name == "autointerp":
        return f"{window}, {block.get('metrics', {}).get('latents', '?')} sampled latents"
    return window


def _headlines(results: dict[str, Any]):
    """``(eval, block, key, display name, value)`` for each headline number present."""
    for name, block in results.get("evals", {}).items():
        for key, display in HEADLINES.get(name, []):
            value = block.get("metrics", {}).get(key)
            if value is not None:
                yield name, block, key, display, float(value)


def eval_results(results: dict[str, Any]) -> list:
    """``huggingface_hub.EvalResult`` s for the headline numbers of an evaluate JSON.

    Args:
        results: The parsed ``lightning-interp evaluate --out`` file.

    Returns:
        One result per headline metric present (missing or null values are skipped).
    """
    from huggingface_hub import EvalResult

    site = results.get("site", "the site")
    return [
        EvalResult(
            task_type="feature-extraction",
            task_name=f"{name} eval at {site}",
            dataset_type=name,
            dataset_name=_dataset(name, block, results),
            metric_type=f"{name}/{key}",
            metric_name=display,
            metric_value=value,
            source_name="lightning-interp evaluate (SAEBench protocol)",
            source_url="https://github.com/adamkarvonen/SAEBench",
        )
        for name, block, key, display, value in _headlines(results)
    ]


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3g}"


def _autointerp(block: dict[str, Any]) -> str:
    """The auto-interpretation paragraph and its real-vs-shuffled table."""
    metrics, settings = block.get("metrics", {}), block.get("settings", {})
    rows = ["| scorer | real AUROC | shuffled AUROC | real accuracy | shuffled accuracy |"]
    rows.append("|---|---|---|---|---|")
    for key, name in _SCORERS:
        if f"{key}_auroc" in metrics or f"{key}_accuracy" in metrics:
            cells = [f"{key}_auroc", f"{key}_auroc_shuffled"]
            cells += [f"{key}_accuracy", f"{key}_accuracy_shuffled"]
            rows.append(f"| {name} | " + " | ".join(_fmt(metrics.get(c)) for c in cells) + " |")
    embedder = settings.get("embedding_model")
    return (
        "### Auto-interpretation\n\n"
        f"{metrics.get('latents', '?')} latents ({settings.get('latent_sample', 'sampled')}) "
        f"were explained by `{settings.get('explainer', '?')}` from their top contexts in "
        f"{settings.get('token_window', '?')} tokens of `{settings.get('text', '?')}`, and "
        "each explanation was scored by detection and fuzzing (the same model answers "
        "yes/no)" + (f" and by embedding similarity (`{embedder}`)" if embedder else "")
        + ". Each latent was also scored with a shuffled explanation (another sampled "
        "latent's), the chance baseline: real explanations mean something only where they "
        "beat it.\n\n" + "\n".join(rows) + "\n\n"
    )  # fmt: skip


def evaluation_section(results: dict[str, Any], label: str = "") -> str:
    """Markdown: the headline numbers as a table, then the auto-interp paragraph if any.

    Args:
        results: A parsed evaluate JSON.
        label: Which dictionary it is (its repo folder), for a multi-dictionary card.
    """
    title = f"### `{label}`\n\n" if label else ""
    rows = ["| eval | metric | value | data |", "|---|---|---|---|"]
    for name, block, _, display, value in _headlines(results):
        if name != "autointerp":
            tasks = block.get("settings", {}).get("tasks")  # names; the sources are in the index
            data = ", ".join(tasks) if name == "sparse_probing" and tasks else None
            data = data or _dataset(name, block, results)
            rows.append(f"| {name} | {display} | {_fmt(value)} | {data} |")
    table = "\n".join(rows) + "\n\n" if len(rows) > 2 else ""
    seed = f" Seed {results['seed']}." if "seed" in results else ""
    intro = (
        f"Measured by `lightning-interp evaluate` ({', '.join(results.get('evals', {}))}) "
        f"at `{results.get('site', '?')}` of `{results.get('backbone', '?')}`.{seed}\n\n"
    )
    auto = results.get("evals", {}).get("autointerp")
    return title + intro + table + (_autointerp(auto) if auto else "")
