"""``lightning-interp dashboard``: static HTML pages over a feature store.

:func:`build_dashboard` turns a feature store (layout v1: ``store.json``, ``stats.safetensors``,
``contexts.safetensors``, ``vocab.json``, optional ``explanations.json``) into a folder that a
browser opens from disk, offline::

    HTML_DIR/index.html          every latent as one summary row (sortable, searchable)
    HTML_DIR/latents/<i>.html    one page per latent
    HTML_DIR/assets/             the stylesheet and the index's script
    HTML_DIR/images/<i>.png      thumbnails of the images the pages show (image, multimodal)
    HTML_DIR/dashboard.json      what was rendered, from which store

The design follows SAEDashboard's feature-centric pages (top and quantile-sampled contexts
with tokens shaded by activation, the activation histogram, the logit-lens tables, correlated
latents) but writes no JavaScript data files and loads nothing from a network: browsers
refuse ``fetch()`` from ``file://`` pages, so each latent is a page of its own and the index
holds only summary rows, embedded as JSON. Pages are rendered by jinja2 with autoescaping on;
corpus text is untrusted and every token reaches the page as escaped text. The output
folder is built beside its target and renamed into place, so it is never half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lightning_interp._commands import run_command
from lightning_interp._io import folder_replaced_atomically
from lightning_interp.errors import OutputExistsError
from lightning_interp.features.dashboard_examples import (
    ImageExample,
    context,
    multimodal,
    patches,
)
from lightning_interp.features.dashboard_store import DashboardStore, read_store

DASHBOARD_FORMAT = "lightning-interp-dashboard"
_TEMPLATES = Path(__file__).parent / "templates"
_ASSETS = ("dashboard.css", "index.js")
_CHUNK = 256  # latents read from contexts.safetensors at a time: bounds memory on wide stores
_INDEX_TOKENS = 5  # distinct top-activating tokens per index row (what the search matches)
_HISTOGRAM_SIZE = (420, 140)  # SVG plot area in px


def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,  # every corpus string is untrusted
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["sig"] = _significant
    return env


def _significant(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits (``"0"`` for zero, ``"-"`` for None)."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


# ---------------------------------------------------------------------------- page data
def _examples(
    store: DashboardStore,
    chunk: dict[str, torch.Tensor],
    prefix: str,
    row: int,
    scale: float,
) -> list[dict[str, Any] | None]:
    """The examples of one latent with ``prefix`` (``top_``/``quantile_``); ``None`` = padding."""
    tokens = chunk[f"{prefix}tokens"][row].tolist()
    acts = chunk[f"{prefix}activations"][row].float().tolist()
    values = chunk[f"{prefix}values"][row].tolist()
    centres = chunk[f"{prefix}center"][row].tolist()
    sources = chunk[f"{prefix}source"][row].tolist()
    images = chunk[f"{prefix}image"][row].tolist() if f"{prefix}image" in chunk else None
    examples: list[dict[str, Any] | None] = []
    for k, (window, window_acts) in enumerate(zip(tokens, acts, strict=True)):
        if sources[k] < 0 or all(token < 0 for token in window):
            examples.append(None)
        elif store.modality in ("image", "multimodal"):
            image = images[k] if images is not None else None
            draw = patches if store.modality == "image" else multimodal
            example = ImageExample(window, window_acts, centres[k], values[k], image)
            examples.append(draw(store, example, scale))
        else:
            examples.append(
                context(store.tokens, window, window_acts, centres[k], values[k], scale)
            )
    return examples


def _quantile_groups(store: DashboardStore, examples: list[Any]) -> list[dict[str, Any]]:
    """Quantile examples grouped by bin, highest bin first; empty bins are left out."""
    bins, per_bin = store.meta["quantile_bins"], store.meta["per_quantile"]
    groups = []
    for b in reversed(range(bins)):
        shown = [e for e in examples[b * per_bin : (b + 1) * per_bin] if e is not None]
        if shown:
            groups.append({"low": b / bins, "high": (b + 1) / bins, "examples": shown})
    return groups


def _histogram(store: DashboardStore, latent: int) -> dict[str, Any]:
    """Bars and axis ticks of the latent's log10-activation histogram, in SVG coordinates."""
    counts = store.stats["histogram"][latent].tolist()
    spec = store.meta["histogram"]
    low, high = float(spec["log10_min"]), float(spec["log10_max"])
    width, height = _HISTOGRAM_SIZE
    step = width / max(len(counts), 1)
    tallest = max(counts) if counts and max(counts) > 0 else 1
    span = (high - low) / max(len(counts), 1)
    bars = [
        {
            "x": round(i * step, 2),
            "w": round(max(step - 1, 0.5), 2),
            "h": round(height * c / tallest, 2),
            "count": c,
            "low": low + i * span,
            "high": low + (i + 1) * span,
        }
        for i, c in enumerate(counts)
    ]
    ticks = [
        {"x": round((t - low) / (high - low) * width, 2), "label": f"1e{t}"}
        for t in range(math.ceil(low), math.floor(high) + 1)
        if high > low
    ]
    return {"bars": bars, "ticks": ticks, "width": width, "height": height, "total": sum(counts)}


def _logit_rows(store: DashboardStore, latent: int, side: str) -> list[dict[str, Any]]:
    ids = store.stats[f"logit_{side}_ids"][latent].tolist()
    values = store.stats[f"logit_{side}_values"][latent].tolist()
    return [
        {"text": store.tokens[i], "value": v} for i, v in zip(ids, values, strict=True) if i >= 0
    ]


def _summary(store: DashboardStore, latent: int) -> dict[str, Any]:
    """The latent's statistics, shared by its page and its index row."""
    stats = store.stats
    explanation = store.explanations.get(str(latent), {})
    return {
        "id": latent,
        "count": int(stats["count"][latent]),
        "density": float(stats["density"][latent]),
        "mean": float(stats["mean_activation"][latent]),
        "max": float(stats["max_activation"][latent]),
        "explanation": explanation.get("text"),
        "score": explanation.get("score"),
        # Per scorer: AUROC and accuracy of the real and of a shuffled explanation.
        "scores": explanation.get("scores") or {},
    }


def _page(
    store: DashboardStore,
    latent: int,
    chunk: dict[str, torch.Tensor],
    row: int,
    shown: int,
) -> dict[str, Any]:
    """Everything the latent page's template shows."""
    summary = _summary(store, latent)
    scale = summary["max"]
    quantile_examples = _examples(store, chunk, "quantile_", row, scale)
    correlated = [
        {"id": j, "value": v, "linked": 0 <= j < shown}
        for j, v in zip(
            store.stats["correlated_ids"][latent].tolist(),
            store.stats["correlated_values"][latent].tolist(),
            strict=True,
        )
        if j >= 0
    ]
    has_lens = bool(store.meta.get("logit_lens"))
    return summary | {
        "log_density": math.log10(summary["density"]) if summary["density"] > 0 else None,
        "quantiles": store.stats["quantiles"][latent].tolist(),
        "histogram": _histogram(store, latent),
        "logit_top": _logit_rows(store, latent, "top") if has_lens else None,
        "logit_bottom": _logit_rows(store, latent, "bottom") if has_lens else None,
        "correlated": correlated,
        "top": [e for e in _examples(store, chunk, "top_", row, scale) if e is not None],
        "quantile_groups": _quantile_groups(store, quantile_examples),
        "previous": latent - 1 if latent > 0 else None,
        "next": latent + 1 if latent + 1 < shown else None,
    }


def _index_tokens(store: DashboardStore, chunk: dict[str, torch.Tensor], row: int) -> list[str]:
    """The distinct tokens at the centre of the latent's top contexts, strongest first.

    For an image store: its top images (``image <index>``, what the search then matches).
    """
    if store.modality in ("image", "multimodal"):
        images = chunk["top_image"][row].tolist() if "top_image" in chunk else []
        return [f"image {i}" for i in images if i >= 0][:_INDEX_TOKENS]
    tokens, seen = chunk["top_tokens"][row], []
    for k, centre in enumerate(chunk["top_center"][row].tolist()):
        token = int(tokens[k, centre]) if 0 <= centre < tokens.shape[1] else -1
        text = store.tokens[token] if token >= 0 else None
        if text is not None and text not in seen:
            seen.append(text)
        if len(seen) == _INDEX_TOKENS:
            break
    return seen


def _index_row(summary: dict[str, Any], tokens: list[str]) -> list[Any]:
    """One compact index row (see ``COLUMNS`` in index.js); floats to 4 significant digits."""
    score = summary["score"]
    return [
        summary["id"],
        summary["count"],
        float(f"{summary['density']:.4g}"),
        float(f"{summary['max']:.4g}"),
        float(f"{summary['mean']:.4g}"),
        None if score is None else float(f"{score:.4g}"),
        tokens,
        summary["explanation"],
    ]


# ---------------------------------------------------------------------------- building
def _render_all(store: DashboardStore, folder: Path, shown: int) -> None:
    """Write every page of ``shown`` latents and the index into ``folder``."""
    env = _environment()
    latent_page = env.get_template("latent.html.j2")
    pages = folder / "latents"
    pages.mkdir()
    rows, thumbnails = [], set()
    for start, chunk in _chunks(store, shown):
        for row in range(next(iter(chunk.values())).shape[0]):
            latent = start + row
            page = _page(store, latent, chunk, row, shown)
            text = latent_page.render(latent=page, store=store.meta, root="../")
            (pages / f"{latent}.html").write_text(text, encoding="utf-8")
            rows.append(_index_row(page, _index_tokens(store, chunk, row)))
            shown_examples = page["top"] + [
                e for g in page["quantile_groups"] for e in g["examples"]
            ]
            thumbnails.update(e["image"] for e in shown_examples if e.get("thumb"))
    if thumbnails:  # the pages link ../images/<index>.png: the thumbnails they show
        (folder / "images").mkdir()
        for image in sorted(thumbnails):
            shutil.copyfile(
                store.folder / "images" / f"{image}.png", folder / "images" / f"{image}.png"
            )
    index = env.get_template("index.html.j2").render(
        root="",
        store=store.meta,
        shown=shown,
        has_scores=bool(store.explanations),
        data={"rows": rows},
    )
    (folder / "index.html").write_text(index, encoding="utf-8")
    assets = folder / "assets"
    assets.mkdir()
    for name in _ASSETS:
        shutil.copyfile(_TEMPLATES / name, assets / name)
    marker = {
        "format": DASHBOARD_FORMAT,
        "version": 1,
        "store": str(store.folder),
        "latents": shown,
    }
    (folder / "dashboard.json").write_text(json.dumps(marker, indent=2), encoding="utf-8")


def _chunks(store: DashboardStore, shown: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    for start in range(0, shown, _CHUNK):
        yield start, store.read_contexts(start, min(start + _CHUNK, shown))


def _check_output(out: Path) -> None:
    """Refuse to replace anything but an earlier dashboard or an empty folder."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another --out")
    if (out / "dashboard.json").is_file() or not any(out.iterdir()):
        return
    raise OutputExistsError(
        f"{out} already holds files that are not a dashboard; choose another --out or empty it"
    )


def build_dashboard(
    store: str | os.PathLike[str], out: str | os.PathLike[str], *, latents: int | None = None
) -> Path:
    """Render the feature store at ``store`` as static HTML pages in ``out``.

    The folder is built beside ``out`` under a temporary name and renamed into place; an
    earlier dashboard in ``out`` is replaced, any other non-empty folder is refused.

    Args:
        store: A feature-store folder (``lightning-interp features ... --out DIR``).
        out: The output folder (created).
        latents: Render only latents ``0 .. latents-1`` (default: all), for a quick look at
            a wide dictionary.

    Returns:
        The path of ``out/index.html``.

    Raises:
        FeatureStoreNotFoundError: ``store`` is not a folder, or lacks a file of the layout.
        InvalidFeatureStoreError: a file is unreadable, of another format or inconsistent.
        OutputExistsError: ``out`` holds something other than a dashboard.
        ConfigError: ``latents`` is not positive.
    """
    data = read_store(Path(store))
    shown = data.d_latent if latents is None else data.check_latents(latents)
    out = Path(out)
    _check_output(out)
    with folder_replaced_atomically(out, replace=True) as building:
        _render_all(data, building, shown)
    return out / "index.html"


# ---------------------------------------------------------------------------- command
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-interp dashboard",
        description="Render a feature store as static HTML pages (offline, opens from disk).",
    )
    parser.add_argument("dir", help="feature-store folder (written by `lightning-interp features`)")
    parser.add_argument("--out", required=True, help="output folder for index.html and pages")
    parser.add_argument(
        "--latents", type=int, help="render only latents 0..N-1 (default: every latent)"
    )
    return parser


def command(argv: list[str]) -> int:
    """``lightning-interp dashboard DIR --out HTML_DIR [--latents N]``; returns an exit code.

    A library error is printed as one line on stderr with exit code 2.
    """

    def run(args: argparse.Namespace) -> int:
        print(build_dashboard(args.dir, args.out, latents=args.latents).resolve())
        return 0

    return run_command("dashboard", _parser(), run, argv)
