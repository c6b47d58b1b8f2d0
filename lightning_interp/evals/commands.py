"""``lightning-interp evaluate SOURCE --evals core,sparse_probing,absorption,autointerp``.

SOURCE is anything :func:`~lightning_interp.zoo.load.load_dictionary` takes; backbone,
site, text and context size default to the dictionary's provenance (the same resolution
as ``lightning-interp features``). The JSON names the dictionary, backbone, site, seed and
each eval's datasets and settings, and is written atomically. Library errors (an unknown
eval name, a missing provenance field) are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from lightning_interp._commands import run_command
from lightning_interp.errors import ConfigError

#: Flags passed to the evals as ``EvalContext.options`` (the autointerp eval reads them).
AUTOINTERP_OPTIONS = (
    "explainer",
    "explainer_endpoint",
    "embedding_model",
    "autointerp_latents",
    "autointerp_tokens",
    "autointerp_store",
)


def _parser() -> argparse.ArgumentParser:
    from lightning_interp.evals.registry import available_evals

    parser = argparse.ArgumentParser(
        prog="lightning-interp evaluate",
        description="Evaluate a dictionary with SAEBench-style evals (core, sparse probing, "
        "first-letter absorption, auto-interpretation); results as JSON.",
    )
    parser.add_argument("source", help="dictionary: folder, org/name or zoo:<release>/<id>")
    parser.add_argument(
        "--evals",
        default="core",
        help=f"comma-separated evals, from: {', '.join(available_evals())} (default: core)",
    )
    parser.add_argument("--out", help="JSON file to write (default: print to stdout)")
    parser.add_argument(
        "--tokens", type=int, default=4096, help="core eval token window (default: 4096)"
    )
    parser.add_argument("--text", help="text source (default: the dictionary's dataset)")
    parser.add_argument("--backbone", help="model (default: the dictionary's backbone)")
    parser.add_argument("--site", help="site (default: the dictionary's site)")
    parser.add_argument(
        "--context-size", type=int, help="tokens per context (default: the dictionary's, else 128)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of splits and subsamples")
    ai = parser.add_argument_group("autointerp eval")
    ai.add_argument(
        "--explainer",
        default="offline:smollm2",
        help="explaining and scoring LM: Hub id, folder, offline:smollm2 (default), or the "
        "model name sent to --explainer-endpoint",
    )
    ai.add_argument("--explainer-endpoint", help="base URL of an OpenAI-compatible chat server")
    ai.add_argument(
        "--embedding-model", default="offline:minilm", help="sentence encoder ('none': skip)"
    )
    ai.add_argument(
        "--autointerp-latents", type=int, default=8, help="latents sampled (default: 8)"
    )
    ai.add_argument(
        "--autointerp-tokens",
        type=int,
        default=8192,
        help="tokens of the feature store the latents are read from (default: 8192)",
    )
    ai.add_argument(
        "--autointerp-store",
        help="keep that feature store (with explanations) in this folder, for the dashboard",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(images=None)  # features.commands.resolve reads it
    return parser


def evaluate(argv: list[str]) -> int:
    """Run ``lightning-interp evaluate``; returns the exit code."""
    return run_command("evaluate", _parser(), _run, argv)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    from lightning_interp._io import atomic_write

    text = json.dumps(_finite(payload), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from lightning_interp.backbones import load_backbone
    from lightning_interp.evals.registry import EvalContext, get_eval, parse_eval_names
    from lightning_interp.features.commands import resolve
    from lightning_interp.zoo.load import load_dictionary

    names = parse_eval_names(args.evals)  # before loading anything
    for flag in ("tokens", "context_size", "autointerp_latents", "autointerp_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.out and not Path(args.out).parent.is_dir():
        raise ConfigError(f"the folder of --out {args.out} does not exist; create it first")
    dictionary = load_dictionary(args.source)
    chosen = resolve(dictionary, args)
    backbone = load_backbone(chosen["backbone"])
    torch.manual_seed(args.seed)
    context = EvalContext(
        dictionary=dictionary,
        backbone=backbone,
        site=chosen["site"],
        text=chosen["text"],
        context_size=chosen["context_size"],
        tokens=args.tokens,
        seed=args.seed,
        options={name: getattr(args, name) for name in (*AUTOINTERP_OPTIONS, "quiet")},
    )
    payload: dict[str, Any] = {
        "source": str(args.source),
        "architecture": dictionary.architecture,
        "d_in": dictionary.d_in,
        "d_latent": dictionary.d_latent,
        "backbone": chosen["backbone"],
        "site": chosen["site"],
        "seed": args.seed,
        "evals": {},
    }
    for name in names:
        start = time.monotonic()
        if not args.quiet:
            print(f"evaluate: running {name}", file=sys.stderr)
        result = get_eval(name)(context)
        result["seconds"] = round(time.monotonic() - start, 1)
        payload["evals"][name] = result
    if args.out:
        _write_json(Path(args.out), payload)
        print(args.out)
    else:
        print(json.dumps(_finite(payload), indent=2, allow_nan=False))
    return 0
