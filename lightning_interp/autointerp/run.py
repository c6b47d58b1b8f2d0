"""Explain and score the latents of a feature store, resumably, with shuffled baselines.

Per latent (as EleutherAI delphi's pipeline, ``delphi/__main__.py``): the explainer reads the
first ``n_explain`` top contexts; the scorers test on up to ``n_test`` contexts sampled from
the activation quantiles (delphi's test set), against as many *non-activating* contexts
drawn (seeded) from other latents' examples in the store. The store does not hold a latent's
activations on other latents' contexts, so a drawn context holding one of the latent's own
activating tokens is skipped (delphi draws from cached activations where the latent is 0).

Every latent is also scored with a **shuffled** explanation: another selected latent's
text (a seeded derangement), on the same contexts. Results go to ``autointerp.json`` in the
store after each batch of explanations and each scored latent (written atomically), so a
rerun skips what is done; ``explanations.json`` (``{"<latent>": {"text", "score",
"scores"}}``, score = mean AUROC of the real explanation over the scorers, scores = each
scorer's AUROC and accuracy, real and shuffled) is what the dashboard shows.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning_interp._io import atomic_write
from lightning_interp.autointerp.explainer import ChatModel, explain
from lightning_interp.autointerp.prompts import Context
from lightning_interp.autointerp.scorers import EmbeddingScorer, detection, fuzz
from lightning_interp.errors import ConfigError

RESULTS = "autointerp.json"
EXPLANATIONS = "explanations.json"
SCORERS = ("detection", "fuzz", "embedding")


@dataclass
class ExplainSettings:
    """What a run reads and asks (recorded in ``autointerp.json``; a resume must match).

    Attributes:
        n_explain: Top contexts shown to the explainer.
        n_test: Activating contexts per scorer (and as many non-activating ones).
        max_new_tokens: Length of an explanation.
        seed: Seed of the non-activating draw, the fuzz highlights and the shuffle.
        model: The explainer/scorer model's name.
        style: Explainer prompt, ``"contexts"`` or ``"words"`` (see ``explain_messages``).
    """

    n_explain: int = 10
    n_test: int = 10
    max_new_tokens: int = 48
    seed: int = 0
    model: str = ""
    style: str = "contexts"


def _write(path: Path, values: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(values, indent=1), encoding="utf-8"))


def _contexts(store: dict, prefix: str, latent: int) -> list[Context]:
    """The latent's non-empty ``top_``/``quantile_`` contexts as strings and activations."""
    c, vocab = store["contexts"], store["vocab"]
    out = []
    for tokens, acts, value in zip(
        c[f"{prefix}tokens"][latent].tolist(),
        c[f"{prefix}activations"][latent].float().tolist(),
        c[f"{prefix}values"][latent].tolist(),
        strict=True,
    ):
        kept = [(vocab.get(str(t), "?"), a) for t, a in zip(tokens, acts, strict=True) if t >= 0]
        if value > 0 and kept:
            out.append(Context([k for k, _ in kept], [a for _, a in kept]))
    return out


def latent_examples(store: dict, latent: int, settings: ExplainSettings):
    """``(shown to the explainer, activating test contexts)``."""
    top = _contexts(store, "top_", latent)
    shown = top[: settings.n_explain]
    test = _contexts(store, "quantile_", latent) or top[settings.n_explain :] or top
    return shown, test[: settings.n_test]


def non_activating(
    store: dict, latent: int, own: list[Context], n: int, seed: int
) -> list[Context]:
    """``n`` contexts of other latents' top examples, with activations zeroed (seeded)."""
    words = {t for c in own for t, m in zip(c.tokens, c.marks(), strict=True) if m}
    live = [int(i) for i in (store["stats"]["count"] > 0).nonzero().flatten() if int(i) != latent]
    rng = random.Random(f"{seed}-{latent}")
    rng.shuffle(live)
    out: list[Context] = []
    for other in live:
        for c in _contexts(store, "top_", other)[:2]:
            if not words.intersection(c.tokens) and len(out) < n:
                out.append(Context(c.tokens, [0.0] * len(c.tokens)))
        if len(out) >= n:
            break
    return out


def _derangement(latents: list[int], seed: int) -> dict[int, int]:
    """Map each latent to another latent whose explanation it gets as a baseline."""
    order = sorted(latents)
    random.Random(seed).shuffle(order)
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}


def _progress(stage: str, done: int, total: int, start: float, stream: Any) -> None:
    per = (time.monotonic() - start) / max(done, 1)
    print(f"explain: {stage} {done}/{total} latents, {per:.1f} s/latent", file=stream, flush=True)


def summary(scores: dict[str, dict]) -> dict:
    """Mean AUROC and accuracy per scorer, for real and shuffled explanations."""
    out: dict[str, dict] = {}
    for kind in ("real", "shuffled"):
        for scorer in SCORERS:
            rows = [s[kind][scorer] for s in scores.values() if scorer in s[kind]]
            aurocs = [r["auroc"] for r in rows if r["auroc"] is not None]
            out.setdefault(kind, {})[scorer] = {
                "auroc": sum(aurocs) / len(aurocs) if aurocs else None,
                "accuracy": sum(r["accuracy"] for r in rows) / len(rows) if rows else None,
                "latents": len(rows),
            }
    return out


def run_autointerp(
    folder: str | Path,
    store: dict,
    model: ChatModel,
    embedder: EmbeddingScorer | None,
    latents: list[int],
    settings: ExplainSettings,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Explain and score ``latents`` of the store read from ``folder``; returns the results.

    Raises:
        ConfigError: fewer than two latents (no shuffled baseline), or an earlier run's
            ``autointerp.json`` was made with other settings.
    """
    folder, stream = Path(folder), sys.stderr if progress else None
    if len(latents) < 2:
        raise ConfigError("explain needs at least 2 live latents (the baseline shuffles them)")
    path = folder / RESULTS
    results = {"settings": asdict(settings), "explanations": {}, "scores": {}}
    if path.is_file():
        results = json.loads(path.read_text(encoding="utf-8"))
        if results.get("settings") != asdict(settings):
            raise ConfigError(
                f"{path} was made with other settings {results.get('settings')}; "
                "pass the same ones or remove it"
            )
    todo = [i for i in latents if str(i) not in results["explanations"]]
    start = time.monotonic()
    for first in range(0, len(todo), batch_size):
        batch = todo[first : first + batch_size]
        shown = [latent_examples(store, i, settings)[0] for i in batch]
        texts = explain(model, shown, settings.max_new_tokens, settings.style)
        results["explanations"].update({str(i): t for i, t in zip(batch, texts, strict=True)})
        _write(path, results)
        if stream:
            _progress("explained", first + len(batch), len(todo), start, stream)
    shuffled = _derangement(latents, settings.seed)
    todo = [i for i in latents if str(i) not in results["scores"]]
    start = time.monotonic()
    for done, latent in enumerate(todo, 1):
        _, test = latent_examples(store, latent, settings)
        others = non_activating(store, latent, test, len(test), settings.seed)
        texts = {"real": results["explanations"][str(latent)]}
        texts["shuffled"] = results["explanations"][str(shuffled[latent])]
        entry: dict[str, Any] = {"shuffled_from": shuffled[latent]}
        for kind, text in texts.items():
            entry[kind] = {
                "detection": detection(model, text, test, others),
                "fuzz": fuzz(model, text, test, others, seed=settings.seed + latent),
            }
            if embedder is not None:
                entry[kind]["embedding"] = embedder.score(text, test, others)
        results["scores"][str(latent)] = entry
        _write(path, results)
        if stream:
            _progress("scored", done, len(todo), start, stream)
    results["summary"] = summary({k: results["scores"][str(k)] for k in latents})
    _write(path, results)
    _write_explanations(folder, results)
    return results


def _write_explanations(folder: Path, results: dict) -> None:
    """``explanations.json`` for the dashboard: text, mean AUROC, each scorer's numbers."""
    notes = {}
    for latent, text in results["explanations"].items():
        entry = results["scores"].get(latent, {})
        real, shuffled = entry.get("real", {}), entry.get("shuffled", {})
        aurocs = [s["auroc"] for s in real.values() if s.get("auroc") is not None]
        scores = {
            scorer: {
                "auroc": real[scorer]["auroc"],
                "accuracy": real[scorer]["accuracy"],
                "shuffled_auroc": shuffled.get(scorer, {}).get("auroc"),
                "shuffled_accuracy": shuffled.get(scorer, {}).get("accuracy"),
            }
            for scorer in SCORERS
            if scorer in real
        }
        notes[latent] = {
            "text": text,
            "score": sum(aurocs) / len(aurocs) if aurocs else None,
            "scores": scores,
        }
    _write(folder / EXPLANATIONS, notes)
