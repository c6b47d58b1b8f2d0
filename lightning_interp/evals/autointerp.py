"""Auto-interpretation eval: explain a seeded sample of latents, score real vs shuffled.

SAEBench's autointerp eval (adamkarvonen/SAEBench, ``sae_bench/evals/autointerp/main.py``)
collects activating contexts over a token window, picks latents at random among those that
fire, asks an LLM for an explanation and scores it by detection; EleutherAI delphi
(``delphi/__main__.py``) adds fuzzing and embedding scorers. This eval does the same with
the library's pieces, streaming and seeded:

1. a feature store of the dictionary over ``options["autointerp_tokens"]`` kept tokens of
   the eval text (:func:`~lightning_interp.features.build.build_feature_store`, in a
   temporary folder unless ``options["autointerp_store"]`` names one to keep);
2. ``options["autointerp_latents"]`` latents drawn with the eval seed among those that fired
   at least ``min_count`` times (SAEBench samples among latents with enough activating
   contexts);
3. :func:`~lightning_interp.autointerp.run.run_autointerp`: explanations from the top
   contexts, then detection, fuzzing and embedding scores on quantile-sampled contexts
   against non-activating ones, for the real and for shuffled explanations.

Deviations on purpose: SAEBench scores detection only, with gpt-4o-mini; here the explainer
defaults to the packaged SmolLM2-135M-Instruct (offline) or any OpenAI-compatible
endpoint, and every score has the shuffled-explanation baseline beside it, because a small
explainer's absolute numbers mean little without it. See docs/autointerp.md.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from lightning_interp.errors import ConfigError
from lightning_interp.evals.registry import EvalContext, register_eval

SCORERS = ("detection", "fuzz", "embedding")
#: Option names (``EvalContext.options``) and their defaults; ``evaluate`` flags set them.
DEFAULTS: dict[str, Any] = {
    "explainer": "offline:smollm2",
    "explainer_endpoint": None,
    "embedding_model": "offline:minilm",
    "autointerp_latents": 8,
    "autointerp_tokens": 8192,
    "autointerp_store": None,
}


def sample_latents(count: list[int], n: int, seed: int, min_count: int = 1) -> list[int]:
    """``n`` latents drawn with ``seed`` among those that fired ``min_count`` times, sorted.

    Raises:
        ConfigError: fewer than two latents qualify (the shuffled baseline needs two).
    """
    eligible = [i for i, c in enumerate(count) if c >= min_count]
    if len(eligible) < 2:
        raise ConfigError(
            f"only {len(eligible)} latents fired {min_count}+ times in the autointerp window; "
            "raise --autointerp-tokens"
        )
    return sorted(random.Random(seed).sample(eligible, min(n, len(eligible))))


def headline(summary: dict[str, dict]) -> dict[str, Any]:
    """Flat ``<scorer>_{auroc,accuracy}[_shuffled]`` numbers from a run's summary."""
    out: dict[str, Any] = {}
    for kind, suffix in (("real", ""), ("shuffled", "_shuffled")):
        for scorer, values in summary.get(kind, {}).items():
            if values.get("latents"):
                out[f"{scorer}_auroc{suffix}"] = values["auroc"]
                out[f"{scorer}_accuracy{suffix}"] = values["accuracy"]
    return out


def _build_store(context: EvalContext, folder: Path, tokens: int, progress: bool) -> None:
    from lightning_interp.data.lm_datamodule import load_texts
    from lightning_interp.features.build import Corpus, build_feature_store

    corpus = Corpus(
        texts=load_texts(context.text),
        name=context.text,
        context_size=context.context_size,
        max_tokens=tokens,
    )
    build_feature_store(
        context.dictionary,
        context.backbone,
        corpus,
        folder,
        site=context.site,
        checkpoint_every=0,
        progress=progress,
    )


@register_eval("autointerp")
def run(
    context: EvalContext,
    *,
    model: Any = None,
    embedder: Any = None,
    n_explain: int = 10,
    n_test: int = 5,
    max_new_tokens: int = 32,
    style: str = "words",
    min_count: int = 10,
    batch_size: int = 8,
) -> dict:
    """Explain and score a seeded sample of live latents; mean scores, real and shuffled.

    Args:
        context: The eval context; ``context.options`` may set the keys of ``DEFAULTS``.
        model: A chat model to use instead of loading ``options["explainer"]`` (a
            :class:`~lightning_interp.autointerp.explainer.ChatModel`).
        embedder: An embedding scorer instead of loading ``options["embedding_model"]``.
        n_explain: Top contexts shown to the explainer.
        n_test: Activating (and as many non-activating) contexts per scorer and latent.
        max_new_tokens: Length of an explanation.
        style: Explainer prompt, ``"words"`` (default: better for a 135M model) or
            ``"contexts"``.
        min_count: Firings a latent needs in the window to be sampled.
        batch_size: Prompts per forward of a local model.

    Returns:
        ``{"metrics", "settings", "latents"}``: per scorer the mean AUROC and accuracy of
        the real (``detection_auroc``) and shuffled (``detection_auroc_shuffled``)
        explanations and the full ``summary``; the settings name the text, window,
        explainer and sample; ``latents`` holds each latent's explanation and scores.
    """
    from lightning_interp.autointerp.explainer import load_chat_model
    from lightning_interp.autointerp.run import ExplainSettings, run_autointerp
    from lightning_interp.autointerp.scorers import EmbeddingScorer
    from lightning_interp.features.layout import read_store

    unknown = set(context.options) - set(DEFAULTS) - {"quiet"}
    if unknown:
        raise ConfigError(f"unknown autointerp options {sorted(unknown)}; use {sorted(DEFAULTS)}")
    options = {**DEFAULTS, **context.options}
    for name in ("autointerp_latents", "autointerp_tokens"):
        if options[name] < 2:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 2, got {options[name]}")
    progress = not options.get("quiet", False)
    if model is None:
        model = load_chat_model(options["explainer"], options["explainer_endpoint"], batch_size)
    if embedder is None and options["embedding_model"] != "none":
        embedder = EmbeddingScorer.load(options["embedding_model"])
    kept = options["autointerp_store"]
    with tempfile.TemporaryDirectory(prefix="autointerp-") as tmp:
        folder = Path(kept) if kept else Path(tmp) / "store"
        if not (folder / "store.json").is_file():  # a kept store is reused: the run resumes
            _build_store(context, folder, options["autointerp_tokens"], progress)
        store = read_store(folder)
        count = store["stats"]["count"].tolist()
        latents = sample_latents(count, options["autointerp_latents"], context.seed, min_count)
        settings = ExplainSettings(
            n_explain=n_explain,
            n_test=n_test,
            max_new_tokens=max_new_tokens,
            seed=context.seed,
            model=model.name,
            style=style,
        )
        results = run_autointerp(
            folder, store, model, embedder, latents, settings, batch_size, progress
        )
        tokens = int(store["meta"]["corpus"]["tokens"])
    per_latent = {
        str(i): {"explanation": results["explanations"][str(i)], **results["scores"][str(i)]}
        for i in latents
    }
    return {
        "metrics": {
            **headline(results["summary"]),
            "latents": len(latents),
            "summary": results["summary"],
        },
        "settings": {
            "text": context.text,
            "token_window": tokens,
            "context_size": context.context_size,
            "explainer": model.name,
            "embedding_model": None if embedder is None else options["embedding_model"],
            "latent_sample": f"drawn with seed {context.seed} among the latents with "
            f"{min_count}+ firings in the window",
            "latent_ids": latents,
            "n_explain": n_explain,
            "n_test": n_test,
            "style": style,
            "max_new_tokens": max_new_tokens,
            "scorers": [s for s in SCORERS if s != "embedding" or embedder is not None],
            "baseline": "shuffled: each latent scored with another sampled latent's explanation",
            "store": str(kept) if kept else None,
        },
        "latents": per_latent,
    }
