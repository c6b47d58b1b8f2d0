"""Canonical hook sites (``layers.{i}.resid_post``, ...) mapped onto each model family.

A *site* is a place in the forward pass where activations are read or written: the
input or output of one module. Canonical names are the same for every family:

``layers.{i}.resid_pre``   input of block ``i`` (the residual stream before it)
``layers.{i}.resid_post``  output of block ``i``
``layers.{i}.attn_out``    output of the attention sub-layer (after its output projection)
``layers.{i}.attn_z``      input of the attention output projection: every head's output,
                           concatenated (SAELens's ``hook_z``), for attention-output SAEs
``layers.{i}.mlp_in``      input of the MLP (after its pre-norm)
``layers.{i}.mlp_out``     output of the MLP
``embeddings``             the residual stream entering block 0 (alias of
                           ``layers.0.resid_pre``)

Vision-language models with two towers (CLIP) prefix names with ``text.`` or ``vision.``.
Multimodal LLMs (LLaVA, Qwen2-VL, Idefics3, PaliGemma, Gemma-3) name their language model's
blocks ``layers.{i}...``, their vision tower's ``vision.layers.{i}...``, and the projector
output ``projector`` (see :mod:`~lightning_interp.backbones.multimodal`).
A raw module path (``transformer.h.8.mlp``, optionally ``:input`` or ``:output``) and
globs (``layers.*.resid_post``, in natural layer order) work too.

Families are recognised by the structure of their blocks, not by ``model_type``, so
close relatives (Qwen2/3, Mistral, Gemma 1-3, Phi-3, RoBERTa, ...) work without a table
entry.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lightning_interp.backbones.multimodal import (
    LANGUAGE_PATHS,
    PROJECTOR,
    VISION_PATHS,
    projector_path,
)
from lightning_interp.errors import ConfigError

Direction = Literal["input", "output"]
SITE_KINDS = ("resid_pre", "attn_z", "attn_out", "mlp_in", "mlp_out", "resid_post")


class UnknownSiteError(ConfigError, KeyError):
    """A site name matches nothing in this model."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Site:
    """One resolved hook site.

    Attributes:
        name: Canonical name (or the raw path as given).
        module_path: Dotted path of the module in the model.
        direction: Whether the activation is the module's ``input`` or ``output``.
        tower: Tower prefix (``""``, ``"text"`` or ``"vision"``).
        layer: Block index, or ``None`` for a raw path outside the blocks.
    """

    name: str
    module_path: str
    direction: Direction
    tower: str = ""
    layer: int | None = None


@dataclass(frozen=True)
class BlockLayout:
    """Where one family keeps the parts of a block, as (relative path, direction)."""

    family: str
    attn_out: tuple[str, Direction]
    attn_z: tuple[str, Direction]
    mlp_in: tuple[str, Direction]
    mlp_out: tuple[str, Direction]


# Checked in order against each block's submodules; the first whose paths all exist wins.
LAYOUTS = (
    BlockLayout(
        "gpt2", ("attn", "output"), ("attn.c_proj", "input"), ("mlp", "input"), ("mlp", "output")
    ),
    BlockLayout(
        "gpt_neox",
        ("attention", "output"),
        ("attention.dense", "input"),
        ("mlp", "input"),
        ("mlp", "output"),
    ),
    BlockLayout(
        "llama",
        ("self_attn", "output"),
        ("self_attn.o_proj", "input"),
        ("mlp", "input"),
        ("mlp", "output"),
    ),
    BlockLayout(
        "clip",
        ("self_attn", "output"),
        ("self_attn.out_proj", "input"),
        ("mlp", "input"),
        ("mlp", "output"),
    ),
    # BERT's attention and MLP outputs are taken before its post-norm residual add.
    BlockLayout(
        "bert",
        ("attention.output.dense", "output"),
        ("attention.output.dense", "input"),
        ("intermediate", "input"),
        ("output.dense", "output"),
    ),
    # Qwen2-VL's vision blocks (norm1, attn.qkv / attn.proj, norm2, mlp).
    BlockLayout(
        "qwen2_vl_vision",
        ("attn", "output"),
        ("attn.proj", "input"),
        ("mlp", "input"),
        ("mlp", "output"),
    ),
)

# (tower prefix, path of the ModuleList of blocks), probed in order. A multimodal LLM's vision
# tower comes before its language model, since the first unprefixed stack ends the search.
TOWER_PATHS = (
    *(("vision", path) for path in VISION_PATHS),
    *(("", path) for path in LANGUAGE_PATHS),
    ("", "transformer.h"),
    ("", "h"),
    ("", "gpt_neox.layers"),
    ("", "model.layers"),
    ("", "bert.encoder.layer"),
    ("", "roberta.encoder.layer"),
    ("", "encoder.layer"),
    ("text", "text_model.encoder.layers"),
    ("vision", "vision_model.encoder.layers"),
    ("", "encoder.layers"),
    ("", "layers"),
)


@dataclass(frozen=True)
class Tower:
    """A stack of blocks: its prefix, where its blocks live, and their layout."""

    prefix: str
    blocks_path: str
    num_layers: int
    layout: BlockLayout
    root_path: str  # module whose forward runs this tower alone ("" for the whole model)


def get_module(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted path, or ``None``."""
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _detect_layout(block: nn.Module) -> BlockLayout | None:
    for layout in LAYOUTS:
        paths = {layout.attn_out[0], layout.attn_z[0], layout.mlp_in[0], layout.mlp_out[0]}
        if all(get_module(block, p) is not None for p in paths):
            return layout
    return None


def find_towers(model: nn.Module) -> list[Tower]:
    """Locate the block stacks of a transformers model (one, or two for CLIP)."""
    towers: list[Tower] = []
    multimodal_llm = projector_path(model) is not None
    for prefix, path in TOWER_PATHS:
        blocks = get_module(model, path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            continue
        if any(t.prefix == prefix for t in towers):
            continue
        layout = _detect_layout(blocks[0])
        if layout is None:
            continue
        # A CLIP tower runs alone; a multimodal LLM's vision tower runs inside the whole
        # model's forward (before the LM, so an early exit there skips the LM).
        root = path.split(".encoder.")[0] if prefix and not multimodal_llm else ""
        towers.append(Tower(prefix, path, len(blocks), layout, root))
        if not prefix:
            break  # a single-stack model: no second tower to look for
    return towers


def natural_key(name: str) -> list:
    """Sort key treating digit runs as numbers (``layers.10`` after ``layers.9``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class SiteMap:
    """Resolves site names, raw module paths and globs for one model.

    Args:
        model: A transformers model (or any module with a recognised block stack).

    Raises:
        ConfigError: if no block stack of a known family is found.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.towers = find_towers(model)
        if not self.towers:
            raise ConfigError(
                f"found no transformer blocks in {type(model).__name__}; known block stacks "
                f"are at {[p for _, p in TOWER_PATHS]}. Use raw module paths "
                f"('path.to.module:output') for other architectures"
            )
        self.sites: dict[str, Site] = {}
        for tower in self.towers:
            self._add_tower(tower)
        projector = projector_path(model)
        if projector is not None:
            self.sites[PROJECTOR] = Site(PROJECTOR, projector, "output")

    def _add_tower(self, tower: Tower) -> None:
        layout = tower.layout
        for i in range(tower.num_layers):
            block = f"{tower.blocks_path}.{i}"
            parts = {
                "resid_pre": ("", "input"),
                "attn_z": layout.attn_z,
                "attn_out": layout.attn_out,
                "mlp_in": layout.mlp_in,
                "mlp_out": layout.mlp_out,
                "resid_post": ("", "output"),
            }
            for kind in SITE_KINDS:
                rel, direction = parts[kind]
                path = f"{block}.{rel}" if rel else block
                for name in self._names(tower, f"layers.{i}.{kind}"):
                    self.sites[name] = Site(name, path, direction, tower.prefix, i)
        for name in self._names(tower, "embeddings"):
            self.sites[name] = Site(name, f"{tower.blocks_path}.0", "input", tower.prefix, 0)

    def _names(self, tower: Tower, name: str) -> list[str]:
        if not tower.prefix:
            # A stand-alone CLIP tower (CLIPVisionModel) also answers to "vision.layers...".
            model_type = getattr(getattr(self.model, "config", None), "model_type", "") or ""
            alias = next((p for p in ("vision", "text") if model_type.endswith(f"{p}_model")), "")
            return [name, f"{alias}.{name}"] if alias else [name]
        # A lone CLIP tower also answers to unprefixed names.
        return [f"{tower.prefix}.{name}"] + ([name] if len(self.towers) == 1 else [])

    @property
    def family(self) -> str:
        """Family of the main tower's blocks: gpt2, gpt_neox, llama, bert or clip.

        The unprefixed tower's (a multimodal LLM's language model), else the first.
        """
        main = next((t for t in self.towers if not t.prefix), self.towers[0])
        return main.layout.family

    def canonical_names(self) -> list[str]:
        """Every canonical site name, in natural order."""
        return sorted(self.sites, key=natural_key)

    def resolve(self, sites: str | list[str] | tuple[str, ...]) -> list[Site]:
        """Resolve names, raw paths and globs to sites, in the order given.

        Raises:
            UnknownSiteError: naming the valid sites (for a near miss, the closest).
        """
        requested = [sites] if isinstance(sites, str) else list(sites)
        resolved: list[Site] = []
        for name in requested:
            for site in self._resolve_one(name):
                if site not in resolved:
                    resolved.append(site)
        return resolved

    def _resolve_one(self, name: str) -> list[Site]:
        if name in self.sites:
            return [self.sites[name]]
        if any(ch in name for ch in "*?["):
            matches = [self.sites[n] for n in self.canonical_names() if fnmatch.fnmatch(n, name)]
            if matches:
                return matches
        raw = self._resolve_raw(name)
        if raw is not None:
            return [raw]
        raise UnknownSiteError(self._unknown_message(name))

    def _resolve_raw(self, name: str) -> Site | None:
        path, _, direction = name.partition(":")
        direction = direction or "output"
        if direction not in ("input", "output"):
            return None
        if get_module(self.model, path) is None or path == "":
            return None
        return Site(name, path, direction)  # type: ignore[arg-type]

    def _unknown_message(self, name: str) -> str:
        import difflib

        valid = self.canonical_names()
        close = difflib.get_close_matches(name, valid, n=3)
        layers = {t.prefix or "layers": t.num_layers for t in self.towers}
        hint = f" Closest: {close}." if close else ""
        return (
            f"unknown site {name!r} for this {self.family} model ({layers} blocks).{hint} "
            f"Valid sites are '[text.|vision.]layers.{{i}}.{{{'|'.join(SITE_KINDS)}}}' and "
            f"'embeddings' (and 'projector' in multimodal LLMs), e.g. {valid[:3]}, a glob "
            f"like 'layers.*.resid_post', or a raw "
            f"module path such as '{self.towers[0].blocks_path}.0:output'"
        )
