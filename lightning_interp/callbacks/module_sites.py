"""Resolve sites in a user's own model: module paths, globs, or canonical transformer sites.

A plug-in callback sees the user's LightningModule, not a bare transformers model, so
sites are looked up in three ways, first match wins:

1. a dotted module path as ``named_modules()`` spells it (``net.0``, ``model.transformer.h.1``),
   optionally suffixed ``:input`` or ``:output`` (default: the module's output);
2. a glob over those paths, where ``*`` matches within one path component and ``**``
   across components (``net.*`` is every direct child of ``net``, not their children);
   matches come in natural order (``h.10`` after ``h.9``);
3. a canonical site name (``layers.1.resid_post``, ``layers.*.mlp_out``) of the first
   transformers model found inside the module, via
   :class:`~lightning_interp.backbones.sites.SiteMap`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

from lightning_interp.backbones.sites import (
    Site,
    SiteMap,
    UnknownSiteError,
    find_towers,
    natural_key,
)
from lightning_interp.errors import ConfigError

_GLOB_CHARS = "*?["


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a module-path glob: ``**`` crosses dots, ``*`` and ``?`` do not; ``[01]`` sets."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            body = re.escape(body[1:] if negate else body).replace(r"\-", "-")
            out.append(f"[{'^' if negate else ''}{body}]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _split_direction(name: str) -> tuple[str, str]:
    path, _, direction = name.partition(":")
    if direction not in ("", "input", "output"):
        raise ConfigError(
            f"site {name!r} ends in ':{direction}'; the suffix must be ':input' or ':output'"
        )
    return path, direction


def _transformer_root(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost submodule holding a recognised stack of transformer blocks."""
    for path, module in model.named_modules():
        if find_towers(module):
            return path, module
    return None


def resolve_module_sites(model: nn.Module, sites: str | Sequence[str]) -> list[Site]:
    """Resolve site names, module paths and globs to :class:`Site` objects in ``model``.

    Args:
        model: The module to look in (typically the user's LightningModule).
        sites: One name or a list of names (paths, globs or canonical site names).

    Returns:
        The sites, in the order requested (globs expanded in natural order), without
        duplicates (the first name of an activation wins). A site's ``name`` is the
        requested name, or for a glob match the matched path (with ``:input`` if asked).

    Raises:
        UnknownSiteError: a name matches nothing; the message lists the closest module
            paths.
        ConfigError: ``sites`` is empty or a suffix is not ``:input``/``:output``.
    """
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"sites must be a non-empty module path or list of them, got {sites!r}")
    paths = sorted((p for p, _ in model.named_modules() if p), key=natural_key)
    path_set = set(paths)
    resolved: list[Site] = []
    transformer: list[tuple[str, nn.Module] | None] = []  # found lazily, at most once

    def add(site: Site) -> None:
        # Two names for one activation (a canonical name and its module path) are one site.
        if all(
            (s.module_path, s.direction) != (site.module_path, site.direction) for s in resolved
        ):
            resolved.append(site)

    for name in names:
        path, direction = _split_direction(name)
        if path in path_set:
            add(Site(name, path, direction or "output"))  # type: ignore[arg-type]
            continue
        if any(ch in path for ch in _GLOB_CHARS):
            regex = _glob_regex(path)
            matches = [p for p in paths if regex.match(p)]
            if matches:
                suffix = f":{direction}" if direction else ""
                for match in matches:
                    add(Site(match + suffix, match, direction or "output"))  # type: ignore[arg-type]
                continue
        if not transformer:
            transformer.append(_transformer_root(model))
        found = transformer[0]
        if found is not None and not direction:
            prefix, root = found
            try:
                for site in SiteMap(root).resolve(name):
                    full = f"{prefix}.{site.module_path}" if prefix else site.module_path
                    add(Site(site.name, full, site.direction, site.tower, site.layer))
                continue
            except UnknownSiteError:
                pass
        raise UnknownSiteError(_unknown_message(model, name, paths, found))
    return resolved


def _unknown_message(
    model: nn.Module, name: str, paths: list[str], transformer: tuple[str, nn.Module] | None
) -> str:
    path, _ = _split_direction(name)
    close = difflib.get_close_matches(path, paths, n=3, cutoff=0.5)
    hint = f" Closest module paths: {close}." if close else ""
    children = [child for child, _ in model.named_children()]
    canonical = ""
    if transformer is not None:
        canonical = (
            f" Canonical sites of the transformer at {transformer[0] or 'the root'!r} also "
            f"work, e.g. 'layers.0.resid_post' or 'layers.*.mlp_out'."
        )
    return (
        f"no module {path!r} in {type(model).__name__}.{hint}{canonical} Give a path as "
        f"named_modules() lists it (optionally ending ':input' or ':output') or a glob "
        f"('net.*'); the model's top-level modules are {children}"
    )
