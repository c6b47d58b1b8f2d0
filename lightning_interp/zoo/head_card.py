"""Model cards for published concept-bottleneck heads, built with huggingface_hub's ``ModelCard``.

A head's card is a pure function of the head (its ``config.json`` and weights), its
``metrics.json`` and the repo id, so ``lightning-interp card DIR`` on a head folder prints
exactly the README that publishing it writes. The card lists the concepts and, for heads
with a linear concept-to-class layer, each class's strongest concepts with their weights.
What differs between heads comes from the head itself (:meth:`ConceptHead.card_class_table
<lightning_interp.concepts.ConceptHead.card_class_table>`, ``reads_tokens``,
``learns_concepts``): nothing here asks which class a head is.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lightning_interp.concepts.card import markdown_cell
from lightning_interp.zoo.card import CardEntry, common_hub_ids

if TYPE_CHECKING:
    from lightning_interp.concepts.base import ConceptHead

# metrics.json key -> (model-index metric type, display name), in the order shown.
HEAD_METRICS = {
    "accuracy": ("accuracy", "Task accuracy"),
    "concept_accuracy": ("accuracy", "Concept accuracy"),
    "concept_auroc": ("roc_auc", "Concept AUC"),
    "final_layer_sparsity": ("sparsity", "Final-layer sparsity"),
}
TOP_CONCEPTS = 5  # concepts per class in the class x concept table
_LIST_INLINE = 30  # longer concept lists are folded into a <details> block


def normalise_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Metric names without a stage prefix: Lightning's ``test/accuracy`` -> ``accuracy``."""
    return {key.rsplit("/", 1)[-1]: value for key, value in (metrics or {}).items()}


def _eval_results(head: ConceptHead, metrics: dict[str, Any], task_type: str) -> list:
    from huggingface_hub import EvalResult

    dataset = head.provenance.get("dataset") or "held-out embeddings"
    results = []
    for key, (metric_type, name) in HEAD_METRICS.items():
        value = metrics.get(key)
        if value is None:
            continue
        results.append(
            EvalResult(
                task_type=task_type,
                task_name=f"Classification through {head.num_concepts} named concepts",
                dataset_type=str(dataset),
                dataset_name=str(dataset),
                metric_type=metric_type,
                metric_name=name,
                metric_value=float(value),
            )
        )
    return results


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = [(name, metrics[key]) for key, (_, name) in HEAD_METRICS.items() if key in metrics]
    if not rows:
        return "No evaluation results were published with this head.\n"
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {float(value):.4g} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def _concept_list(head: ConceptHead) -> str:
    items = "\n".join(f"{i}. {markdown_cell(name)}" for i, name in enumerate(head.concept_names, 1))
    intro = f"{head.num_concepts} concepts, in bottleneck order:\n\n"
    if head.num_concepts <= _LIST_INLINE:
        return intro + items + "\n"
    return f"{intro}<details>\n<summary>all concepts</summary>\n\n{items}\n\n</details>\n"


def class_concept_table(head: ConceptHead, k: int = TOP_CONCEPTS) -> str:
    """Markdown: one row per class, its ``k`` concepts with the largest final-layer weights.

    The head writes it (:meth:`~lightning_interp.concepts.ConceptHead.card_class_table`):
    heads without a linear concept-to-class layer give the descriptors per class
    (classification by description) or a sentence saying why there is no table.
    """
    return head.card_class_table(k)


def _usage(head: ConceptHead, repo_id: str) -> str:
    if head.reads_tokens:
        inputs = (
            "x = torch.randn(4, 10, head.d_in)  # token embeddings from the head's backbone\n"
            "mask = torch.ones(4, 10, dtype=torch.bool)  # False marks padding\n"
            "out = head(x, mask=mask)\n"
        )
    else:
        inputs = (
            "x = torch.randn(4, head.d_in)  # embeddings from the backbone the head was built on\n"
            "out = head(x)\n"
        )
    return (
        "```python\n"
        "import torch\n"
        "from lightning_interp.zoo import load_head\n\n"
        f'head = load_head("{repo_id}")\n'
        f"{inputs}"
        "predicted = [head.class_names[i] for i in out.logits.argmax(-1).tolist()]\n"
        "concepts = out.concepts  # [4, num_concepts]: the bottleneck the classes are read from\n"
        "```\n"
    )


def _limitations(head: ConceptHead, metrics: dict[str, Any]) -> str:
    if head.learns_concepts:
        concepts = (
            "- Concept predictors were learned from concept labels; a soft bottleneck can carry "
            "information beyond the concepts (leakage), so the concept probabilities are not a "
            "complete account of a decision."
        )
    else:
        concepts = (
            "- Concept names are labels of directions: a concept's activation measures "
            "similarity to that direction, which need not mean the phrase is true of the "
            "input. Check concepts against held-out examples before reading explanations."
        )
    lines = [
        "- The head reads embeddings of one backbone with one pooling (and, for CLIP, one "
        "tower); inputs from any other model or layer give meaningless concepts and classes.",
        concepts,
        "- Weights compare concepts only on the scale the bottleneck puts them on; a large "
        "weight on a rarely active concept can matter less than a small one on a common one.",
    ]
    if head.config.get("hybrid"):
        lines.append(
            "- This is a hybrid head: a residual layer on the raw embedding adds to the "
            "concept-based logits, so part of each decision is not explained by concepts."
        )
    if not metrics:
        lines.append("- No evaluation results were published with this head.")
    else:
        lines.append(
            "- Metrics hold for the data they were measured on; expect them to be worse on "
            "data unlike it."
        )
    return "\n".join(lines) + "\n"


def build_head_card(
    head: ConceptHead,
    *,
    repo_id: str,
    card_data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
):
    """Build the model card (a ``huggingface_hub.ModelCard``) of a concept head.

    Args:
        head: The head.
        repo_id: The repo the card is for (used in the usage snippet and ``model-index``).
        card_data: Metadata overriding or extending the generated fields (``license``,
            ``base_model``, ``datasets``, ``pipeline_tag`` (also the model-index task), ...).
        metrics: Evaluation results: ``accuracy``, ``concept_accuracy``, ``concept_auroc``,
            ``final_layer_sparsity`` (a ``test/`` or ``val/`` prefix is ignored).

    Returns:
        The card; ``str(card)`` is the README text.
    """
    from huggingface_hub import ModelCard, ModelCardData

    metrics = normalise_metrics(metrics)
    spec = head.head_spec()
    entry = CardEntry("", spec, metrics)
    card_data = dict(card_data or {})
    task_type = str(card_data.get("pipeline_tag") or "classification")
    dataset = common_hub_ids([entry], "dataset")
    fields: dict[str, Any] = {
        "library_name": "lightning-interp",
        "tags": ["lightning-interp", "concept-bottleneck", "interpretability", head.head_type],
        "base_model": common_hub_ids([entry], "backbone"),
        "datasets": [dataset] if isinstance(dataset, str) else dataset,  # the Hub wants a list
        "model_name": repo_id,
        "eval_results": _eval_results(head, metrics, task_type) or None,
    }
    fields.update(card_data)
    data = ModelCardData(**fields)
    backbone = fields.get("base_model") or head.provenance.get("backbone") or "a frozen backbone"
    body = (
        f"# {repo_id}\n\n"
        f"A concept-bottleneck head ({type(head).__name__}, `{head.head_type}`) trained with "
        f"lightning-interp on embeddings of {backbone} (width {head.d_in}). It classifies "
        f"into {head.num_classes} classes ({', '.join(head.class_names)}) through "
        f"{head.num_concepts} named concepts. The repo holds `config.json` and "
        "`model.safetensors` (safetensors only: nothing here is unpickled).\n\n"
        f"## Evaluation\n\n{_metrics_table(metrics)}\n"
        f"## Concepts\n\n{_concept_list(head)}\n"
        f"## Classes and their concepts\n\n{class_concept_table(head)}\n"
        f"## Usage\n\n{_usage(head, repo_id)}\n"
        "## Configuration\n\n<details>\n<summary>config.json</summary>\n\n"
        f"```json\n{json.dumps(spec, indent=2)}\n```\n\n</details>\n\n"
        f"## Limitations\n\n{_limitations(head, metrics)}"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
