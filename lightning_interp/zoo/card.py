"""Model cards for published dictionaries, built with huggingface_hub's ``ModelCard``.

A card is a pure function of the entries it describes (repo folder, ``config.json`` and
``metrics.json`` contents) and the repo id, so ``lightning-interp card DIR`` prints exactly
the README that publishing the same folder writes. An entry's ``evaluation`` (a
``lightning-interp evaluate`` JSON) adds its headline numbers to the ``model-index`` and an
*Evaluation* section (a table, and the auto-interpretation summary when it has one;
:mod:`~lightning_interp.zoo.card_evals`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# metrics.json key -> (model-index metric type, display name); the order of the table.
METRICS = {
    "fvu": ("fvu", "FVU"),
    "l0": ("l0", "L0"),
    "dead_fraction": ("dead_fraction", "Dead fraction"),
    "ce_loss_recovered": ("ce_loss_recovered", "CE loss recovered"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class CardEntry:
    """One dictionary as a card describes it.

    Attributes:
        path: Folder inside the repo (``""`` for the root).
        config: The parsed ``config.json``.
        metrics: The parsed ``metrics.json`` beside the dictionary, if any.
        evaluation: The parsed ``evaluation.json`` (a ``lightning-interp evaluate`` JSON),
            if any.
    """

    path: str
    config: dict[str, Any]
    metrics: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None

    @property
    def site(self) -> str:
        """The site the dictionary reads (from its provenance, else its folder)."""
        return (self.config.get("provenance") or {}).get("site") or self.path or "."

    def provenance(self, key: str) -> Any:
        """A provenance field, or ``None``."""
        return (self.config.get("provenance") or {}).get(key)


def common_hub_ids(entries: list[CardEntry], key: str) -> str | list[str] | None:
    """The Hub ids in a provenance field: one string, a list, or ``None``."""
    values = {e.provenance(key) for e in entries} - {None}
    ids = sorted(v for v in values if isinstance(v, str) and _HUB_ID.match(v))
    return ids[0] if len(ids) == 1 else (ids or None)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def _eval_results(entries: list[CardEntry]) -> list:
    from huggingface_hub import EvalResult

    results = []
    for entry in entries:
        dataset = entry.provenance("dataset") or "activations"
        backbone = entry.provenance("backbone") or "the backbone"
        for key, (metric_type, name) in METRICS.items():
            value = (entry.metrics or {}).get(key)
            if value is None:
                continue
            results.append(
                EvalResult(
                    task_type="feature-extraction",
                    task_name=f"Sparse dictionary reconstruction at {entry.site}",
                    dataset_type=str(dataset),
                    dataset_name=f"{backbone} activations at {entry.site} ({dataset})",
                    metric_type=metric_type,
                    metric_name=name,
                    metric_value=float(value),
                )
            )
    return results


def _table(entries: list[CardEntry]) -> str:
    head = ["site", "folder", "architecture", "d_in", "width", "k", "tokens trained"]
    head += [name for _, name in METRICS.values()] + ["dead window (tokens)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cfg, metrics = e.config, e.metrics or {}
        cells = [e.site, f"`{e.path or '.'}`", cfg.get("architecture"), cfg.get("d_in")]
        cells += [cfg.get("d_latent"), cfg.get("k"), metrics.get("tokens_trained")]
        cells += [metrics.get(key) for key in METRICS] + [metrics.get("dead_window_tokens")]
        rows.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(rows)


def _usage(entries: list[CardEntry], repo_id: str) -> str:
    site_arg = f', site="{entries[0].path}"' if len(entries) > 1 or entries[0].path else ""
    return (
        "```python\n"
        "import torch\n"
        "from lightning_interp import load_dictionary\n\n"
        f'sae = load_dictionary("{repo_id}"{site_arg})\n'
        "x = torch.randn(4, sae.d_in)  # activations from the site the dictionary was trained on\n"
        "codes = sae.encode(x)\n"
        "reconstruction = sae.decode(codes)\n"
        "```\n"
    )


def _limitations(entries: list[CardEntry]) -> str:
    lines = [
        "- A dictionary reconstructs activations of the site and backbone it was trained on; "
        "inputs from another model, layer or normalisation give meaningless codes.",
        "- Latents are not guaranteed to be interpretable, monosemantic or complete; check "
        "features against held-out data before drawing conclusions from them.",
        "- Reconstruction metrics are measured on the training distribution; expect them to "
        "be worse on text unlike it.",
    ]
    if any(e.provenance("activation_scale") not in (None, 1.0) for e in entries):
        lines.append("- Some dictionaries expect inputs scaled by `provenance.activation_scale`.")
    if any(not e.metrics for e in entries):
        lines.append(
            "- Dictionaries without metrics in the table were published without evaluation."
        )
    return "\n".join(lines) + "\n"


def _evaluation_section(entries: list[CardEntry]) -> str:
    from lightning_interp.zoo.card_evals import evaluation_section

    evaluated = [e for e in entries if e.evaluation]
    if not evaluated:
        return ""
    label = len(entries) > 1
    parts = [evaluation_section(e.evaluation, e.path or "." if label else "") for e in evaluated]
    return "## Evaluation\n\n" + "".join(parts)


def _training_section(training_config: str | None) -> str:
    if not training_config:
        return ""
    return (
        "<details>\n<summary>training run config (LightningCLI, training_config.yaml)</summary>"
        f"\n\n```yaml\n{training_config.rstrip()}\n```\n\n</details>\n\n"
    )


def build_card(
    entries: list[CardEntry],
    *,
    repo_id: str,
    card_data: dict[str, Any] | None = None,
    training_config: str | None = None,
    eval_results: list | None = None,
):
    """Build the model card (a ``huggingface_hub.ModelCard``) for ``entries``.

    Args:
        entries: The dictionaries in the repo, one per folder.
        repo_id: The repo the card is for (used in the usage snippet and ``model-index``).
        card_data: Metadata overriding or extending the generated fields (e.g.
            ``{"license": "apache-2.0", "datasets": ["Skylion007/openwebtext"]}``).
        training_config: The run's training config (LightningCLI ``config.yaml``) to show.
        eval_results: More ``model-index`` results, appended to those of ``metrics.json``
            and of each entry's ``evaluation`` (``lightning_interp.evals.eval_results``
            makes them from an evaluate JSON).

    Returns:
        The card; ``str(card)`` is the README text.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from lightning_interp.zoo.card_evals import eval_results as evaluation_results

    entries = sorted(entries, key=lambda e: e.path)
    architectures = sorted({str(e.config.get("architecture")) for e in entries})
    tags = ["lightning-interp", "sparse-autoencoder", "interpretability", *architectures]
    if any(e.config.get("d_out") not in (None, e.config.get("d_in")) for e in entries):
        tags.append("transcoder")
    fields: dict[str, Any] = {
        "library_name": "lightning-interp",
        "tags": tags,
        "base_model": common_hub_ids(entries, "backbone"),
        "datasets": common_hub_ids(entries, "dataset"),
        "model_name": repo_id,
        "eval_results": (
            _eval_results(entries)
            + [r for e in entries if e.evaluation for r in evaluation_results(e.evaluation)]
            + list(eval_results or [])
        )
        or None,
    }
    fields.update(card_data or {})
    data = ModelCardData(**fields)
    backbones = ", ".join(sorted({str(e.provenance("backbone")) for e in entries})) or "unknown"
    configs = "\n\n".join(
        f"`{e.path or '.'}/config.json`:\n\n```json\n{json.dumps(e.config, indent=2)}\n```"
        for e in entries
    )
    site_flag = f" --site {entries[0].path}" if len(entries) > 1 else ""
    noun = "dictionary" if len(entries) == 1 else "dictionaries"
    body = (
        f"# {repo_id}\n\n"
        f"{len(entries)} sparse {noun} ({', '.join(architectures)}) trained on activations "
        f"of {backbones} with lightning-interp. Each folder holds `config.json` and "
        "`model.safetensors` (safetensors only: nothing here is unpickled).\n\n"
        f"## Dictionaries\n\n{_table(entries)}\n\n"
        "FVU: fraction of variance unexplained; L0: mean active latents per token; dead "
        "fraction: latents that did not fire in the last *dead window* training tokens (as "
        "Gao et al. 2024 count them); CE loss recovered: share of "
        "the language-model loss gap closed when the reconstruction is spliced in.\n\n"
        f"{_evaluation_section(entries)}"
        f"## Usage\n\n{_usage(entries, repo_id)}\n"
        f"From the command line: `lightning-interp pull {repo_id} DIR{site_flag}`.\n\n"
        "## Training configuration\n\n<details>\n"
        "<summary>config.json of each dictionary</summary>\n\n"
        f"{configs}\n\n</details>\n\n"
        f"{_training_section(training_config)}"
        f"## Limitations\n\n{_limitations(entries)}"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
