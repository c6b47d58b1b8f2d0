"""An eval results JSON as a model card's ``model-index`` entries.

``build_card(entries, repo_id=..., eval_results=[...])``
(:func:`~lightning_interp.zoo.card.build_card`) appends the list this returns to the
training metrics' results: each headline
number becomes one ``huggingface_hub.EvalResult`` naming the eval, its dataset and its
settings' source, as SAEBench names them.
"""

from __future__ import annotations

from typing import Any

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
}


def _dataset(name: str, block: dict[str, Any], results: dict[str, Any]) -> str:
    settings = block.get("settings", {})
    if name == "sparse_probing":
        return "; ".join(settings.get("tasks", {}).values()) or "labelled texts"
    if name == "absorption":
        return f"first-letter task on {results.get('backbone', 'the backbone')}'s vocabulary"
    return f"{settings.get('text', 'text')} ({settings.get('token_window', '?')} tokens)"


def eval_results(results: dict[str, Any]) -> list:
    """``huggingface_hub.EvalResult`` s for the headline numbers of an evaluate JSON.

    Args:
        results: The parsed ``lightning-interp evaluate --out`` file.

    Returns:
        One result per headline metric present (missing or null values are skipped).
    """
    from huggingface_hub import EvalResult

    out = []
    site = results.get("site", "the site")
    for name, block in results.get("evals", {}).items():
        for key, display in HEADLINES.get(name, []):
            value = block.get("metrics", {}).get(key)
            if value is None:
                continue
            out.append(
                EvalResult(
                    task_type="feature-extraction",
                    task_name=f"{name} eval at {site}",
                    dataset_type=name,
                    dataset_name=_dataset(name, block, results),
                    metric_type=f"{name}/{key}",
                    metric_name=display,
                    metric_value=float(value),
                    source_name="lightning-interp evaluate (SAEBench protocol)",
                    source_url="https://github.com/adamkarvonen/SAEBench",
                )
            )
    return out
