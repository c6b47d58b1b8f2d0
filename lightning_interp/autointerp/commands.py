"""``lightning-interp explain STORE``: explain a feature store's latents and score them.

Writes ``autointerp.json`` (explanations, per-latent detection/fuzz/embedding AUROC and
accuracy for the real and the shuffled explanations, and a summary) and
``explanations.json`` (what the dashboard shows) into the store; a rerun resumes. Library
errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json

from lightning_interp._commands import run_command
from lightning_interp.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-interp explain",
        description="Explain latents of a feature store with a language model and score the "
        "explanations (detection, fuzzing, embedding; real vs shuffled), as delphi does.",
    )
    parser.add_argument("store", help="feature store folder (lightning-interp features)")
    parser.add_argument(
        "--model",
        default="offline:smollm2",
        help="explainer and scorer: a transformers causal LM (Hub id, folder, offline:smollm2)"
        ", or the model name sent to --base-url",
    )
    parser.add_argument("--base-url", help="an OpenAI-compatible chat server instead")
    parser.add_argument(
        "--embedding-model", default="offline:minilm", help="sentence encoder ('none': skip)"
    )
    parser.add_argument("--latents", type=int, help="explain the first N live latents")
    parser.add_argument("--latent-ids", help="comma-separated latent ids")
    parser.add_argument(
        "--style",
        choices=("contexts", "words"),
        default="contexts",
        help="explainer prompt: highlighted contexts (delphi's default) or the marked words "
        "only (delphi's single-token explainer; better for small models)",
    )
    parser.add_argument("--n-explain", type=int, default=10, help="top contexts shown")
    parser.add_argument("--n-test", type=int, default=10, help="contexts per class scored")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="explanation length")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def explain(argv: list[str]) -> int:
    """Run ``lightning-interp explain``; returns the exit code."""
    return run_command("explain", _parser(), _run, argv)


def select_latents(count: list[int], ids: str | None, first: int | None) -> list[int]:
    """Live latents: the ids given, else the first ``first`` (all when None).

    Raises:
        ConfigError: an id is not a number, out of range, or a dead latent.
    """
    if ids:
        try:
            chosen = [int(i) for i in ids.split(",") if i.strip()]
        except ValueError as err:
            raise ConfigError(f"--latent-ids must be comma-separated integers ({err})") from err
        bad = [i for i in chosen if not 0 <= i < len(count) or count[i] == 0]
        if bad:
            raise ConfigError(f"latents {bad} are out of range or never fired; pick live ones")
        return chosen
    live = [i for i, c in enumerate(count) if c > 0]
    return live[:first] if first is not None else live


def _run(args: argparse.Namespace) -> int:
    from lightning_interp.autointerp.explainer import load_chat_model
    from lightning_interp.autointerp.run import ExplainSettings, run_autointerp
    from lightning_interp.autointerp.scorers import EmbeddingScorer
    from lightning_interp.features.layout import read_store

    for name in ("latents", "n_explain", "n_test", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    store = read_store(args.store)
    if store["meta"].get("modality", "text") != "text":
        raise ConfigError("explain reads text stores; this one holds images")
    latents = select_latents(store["stats"]["count"].tolist(), args.latent_ids, args.latents)
    model = load_chat_model(args.model, args.base_url, args.batch_size)
    embedder = (
        None if args.embedding_model == "none" else EmbeddingScorer.load(args.embedding_model)
    )
    names = ("n_explain", "n_test", "max_new_tokens", "seed", "style")
    settings = ExplainSettings(model=model.name, **{name: getattr(args, name) for name in names})
    results = run_autointerp(
        args.store, store, model, embedder, latents, settings, args.batch_size, not args.quiet
    )
    print(json.dumps(results["summary"], indent=1))
    return 0
