"""``lightning-interp intervene``: check an attribution graph by scaling its features.

::

    lightning-interp intervene SOURCE --prompt "The capital of France is" --scale 0

``SOURCE`` is a transcoder folder as ``lightning-interp attribute`` takes it (per-layer
transcoders or a CLT). The graph of the prompt is computed, the ``--top`` features with the
largest predicted effect on the top logit (or ``--features L:P:F,...``) are scaled by
``--scale`` in each regime of :mod:`.interventions`, and predicted and measured logit
changes are printed. The exit code is 1 when the ``linear`` regime (which the graph
describes exactly) disagrees beyond ``--tolerance``: a wrong graph, not a nonlinearity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_interp._commands import run_command
from lightning_interp.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-interp intervene",
        description="Scale transcoder features and compare logit changes with the graph.",
    )
    parser.add_argument("source", help="per-layer transcoder folder or CLT folder")
    parser.add_argument("--prompt", required=True, help="the prompt")
    parser.add_argument("--backbone", help="model (default: the transcoders' provenance)")
    parser.add_argument("--scale", type=float, default=0.0, help="0 ablates (default), 2 doubles")
    parser.add_argument("--features", help="features as LAYER:POSITION:INDEX, comma-separated")
    parser.add_argument("--top", type=int, default=5, help="features chosen when not given")
    parser.add_argument(
        "--regimes", default="direct,linear,frozen,free", help="comma-separated regimes"
    )
    parser.add_argument("--tolerance", type=float, default=1e-3, help="linear-regime error")
    parser.add_argument("--max-feature-nodes", type=int, help="most feature nodes in the graph")
    parser.add_argument("--batch-size", type=int, default=32, help="targets per backward pass")
    parser.add_argument("--json", help="also write the report to this JSON file")
    return parser


def intervene(argv: list[str]) -> int:
    """Entry point of ``lightning-interp intervene`` (see the module docstring)."""
    return run_command("intervene", _parser(), _run, argv)


def _feature_nodes(graph, spec: str) -> list[int]:
    where = {
        (n.layer, n.position, n.index): i for i, n in enumerate(graph.nodes) if n.kind == "feature"
    }
    nodes = []
    for item in spec.split(","):
        try:
            key = tuple(int(part) for part in item.split(":"))
        except ValueError:
            key = ()
        if len(key) != 3:
            raise ConfigError(f"--features item {item!r} is not LAYER:POSITION:INDEX")
        if key not in where:
            raise ConfigError(f"feature {item} is not active in the graph of this prompt")
        nodes.append(where[key])
    return nodes


def _run(args: argparse.Namespace) -> int:
    from lightning_interp.backbones import load_backbone
    from lightning_interp.circuits.attribution import attribute
    from lightning_interp.circuits.commands import load_transcoders
    from lightning_interp.circuits.interventions import check_interventions
    from lightning_interp.circuits.replacement import ReplacementModel

    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    transcoders, recorded = load_transcoders(args.source)
    name = args.backbone or recorded
    if not name:
        raise ConfigError(f"{args.source} records no backbone; pass --backbone")
    model = ReplacementModel(load_backbone(name), transcoders, transcoder_source=str(args.source))
    graph = attribute(
        model, args.prompt, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size
    )
    features = _feature_nodes(graph, args.features) if args.features else None
    report = check_interventions(
        model, graph, features=features, scale=args.scale, regimes=regimes, top=args.top
    )
    print(report.to_text())
    if args.json:
        rows = [
            {
                "layer": r.layer,
                "position": r.position,
                "feature": r.feature,
                "regime": r.regime,
                "predicted": r.predicted.tolist(),
                "measured": r.measured.tolist(),
                "relative_error": r.relative_error,
            }
            for r in report.results
        ]
        payload = {"logit_tokens": report.logit_tokens, "scale": args.scale, "results": rows}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    worst = report.worst("linear")
    if "linear" in regimes and worst > args.tolerance:
        print(f"linear regime disagrees with the graph: relative error {worst:.3g}")
        return 1
    return 0
