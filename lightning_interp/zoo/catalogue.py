"""The catalogue of well-known public dictionary releases, and ``zoo:`` ids.

Each release is one YAML file in the top-level ``zoo/`` folder of the source tree, shipped
inside the package as ``lightning_interp/catalogue/`` (a symlink in the source tree, a real
folder in the wheel). ``zoo:<release>/<id>`` names one dictionary of a release; the id is
the release's own name for it, or the canonical site it reads.

A release's ``format`` is a registered format adapter (:mod:`lightning_interp.zoo.formats`)
or one of :data:`FOREIGN_FORMATS`: releases in a format we cannot read yet are listed (with
their published numbers) but refuse to resolve, with an error naming the format. Every file
names its ``sources`` (file and commit, or URL): numbers in the catalogue are copied from
them, never estimated.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from lightning_interp._io import check_folder_name
from lightning_interp.errors import CatalogueError, UnsafePathError, UnsupportedFormatError

CATALOGUE_DIR = Path(__file__).resolve().parent.parent / "catalogue"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NEURONPEDIA_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # <model>/<source id>
_ARCHITECTURE = re.compile(r"^[a-z][a-z0-9_]*$")
KINDS = ("sae", "transcoder", "skip_transcoder")

# Formats of public releases that no adapter reads yet: name -> what the files are.
FOREIGN_FORMATS: dict[str, str] = {
    "llama_scope": "folders of hyperparams.json + checkpoints/final.safetensors",
    "llama_scope_r1": "folders of config.json + sae_weights.safetensors",
    "circuit_tracer": "layer_<i>.safetensors + wandb-config.yaml at the repo root",
    "circuit_tracer_clt": "W_enc_<i>.safetensors + W_dec_<i>.safetensors at the repo root",
    "goodfire": "one pickled state dict (.pt/.pth) of encoder_linear/decoder_linear",
    "temporal_sae": "folders of conf.yaml + latest_ckpt.safetensors",
    "qresearch": "one pickled state dict (.pt)",
    "transcoder_circuits": "pickled sae_training objects (.pt), which we never unpickle",
}


@dataclass(frozen=True)
class CatalogueSite:
    """One dictionary of a release.

    Attributes:
        id: The release's name for it (SAELens's ``sae_id`` where SAELens lists it).
        path: Its folder (or, for some foreign formats, file) inside the repo.
        site: The site it reads (``layers.8.resid_pre``, or a raw module path such as
            ``model.layers.3.post_feedforward_layernorm:output``), if known.
        site_out: For a transcoder, the site it predicts.
        width: Number of latents, if published.
        l0: Published mean L0, if known.
        variance_explained: Published fraction of variance explained, if known.
        neuronpedia: Its Neuronpedia id (``<model>/<source>``), if it has one.
        canonical: The release's recommended dictionary for its site: a bare site name
            resolves to it when several dictionaries read that site.
    """

    id: str
    path: str
    site: str | None = None
    site_out: str | None = None
    width: int | None = None
    l0: float | None = None
    variance_explained: float | None = None
    neuronpedia: str | None = None
    canonical: bool = False

    @property
    def fvu(self) -> float | None:
        """Fraction of variance unexplained, ``1 - variance_explained``."""
        return None if self.variance_explained is None else 1.0 - self.variance_explained


@dataclass(frozen=True)
class CatalogueEntry:
    """One public release: a Hub repo of dictionaries in one format on one backbone.

    Attributes:
        release: Its id, as used in ``zoo:<release>/<id>``.
        title: A one-line description.
        repo: Hub repo id.
        revision: Branch, tag or commit sha to load.
        format: Format adapter name (``saelens``, ``sparsify``, ``gemma_scope``, ...) or a
            :data:`FOREIGN_FORMATS` name.
        backbone: Hub id of the model the dictionaries were trained on.
        sites: Its dictionaries.
        architecture: Encoder family in our registry's names (``standard``, ``topk``,
            ``jumprelu``, ...), if known.
        kind: ``sae``, ``transcoder`` or ``skip_transcoder``.
        license: The release's license, if stated.
        links: Named URLs (publication, dashboards, code).
        sources: Where the facts come from (``owner/repo@commit:path`` or URLs).
    """

    release: str
    title: str
    repo: str
    revision: str
    format: str
    backbone: str
    sites: tuple[CatalogueSite, ...]
    architecture: str | None = None
    kind: str = "sae"
    license: str | None = None
    links: dict[str, str] = dataclasses.field(default_factory=dict)
    sources: tuple[str, ...] = ()

    @property
    def loadable(self) -> bool:
        """Whether a registered format adapter reads this release."""
        from lightning_interp.zoo.formats import FORMATS

        return self.format in FORMATS

    def find(self, name: str) -> CatalogueSite:
        """The site whose id, canonical site or path is ``name``.

        A site read by several dictionaries resolves to the one marked ``canonical``.

        Raises:
            CatalogueError: no such site, or a site read by several dictionaries none of
                which is canonical; the message lists the candidates.
        """
        for site in self.sites:
            if site.id == name:
                return site
        at_site = [s for s in self.sites if s.site == name]
        chosen = [s for s in at_site if s.canonical] if len(at_site) > 1 else at_site
        if len(chosen) == 1:
            return chosen[0]
        if at_site:
            ids = ", ".join(s.id for s in at_site[:6]) + (", ..." if len(at_site) > 6 else "")
            raise CatalogueError(
                f"release {self.release!r} has {len(at_site)} dictionaries at {name!r} "
                f"({ids}); name one by its id: zoo:{self.release}/<id>"
            )
        for site in self.sites:
            if site.path == name:
                return site
        ids = [s.id for s in self.sites]
        close = difflib.get_close_matches(name, ids + [s.site for s in self.sites if s.site], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        shown = ", ".join(ids[:20]) + (f", ... ({len(ids)} in all)" if len(ids) > 20 else "")
        raise CatalogueError(
            f"release {self.release!r} has no dictionary {name!r}.{hint} Its ids: "
            f"{shown} (see `lightning-interp zoo show {self.release}`)"
        )


@dataclass(frozen=True)
class CatalogueTarget:
    """What a ``zoo:`` id resolves to: a folder of a pinned Hub repo in a known format."""

    repo: str
    path: str
    revision: str
    format: str


def _check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise CatalogueError(f"{where}: {message}")


def _check_names(value: str, where: str, what: str) -> None:
    """``value`` must be folder names joined by ``/``: it becomes a download or output path."""
    try:
        for part in value.rstrip("/").split("/"):
            check_folder_name(part, what)
    except UnsafePathError as err:
        raise CatalogueError(f"{where}: {err}") from err


def _optional_number(
    value: Any, where: str, name: str, upper: float | None = None, integer: bool = False
) -> None:
    if value is None:
        return
    kinds = int if integer else int | float
    ok = isinstance(value, kinds) and not isinstance(value, bool) and value >= 0
    what = "an integer" if integer else "a number"
    _check(
        ok and (upper is None or value <= upper),
        where,
        f"{name} must be {what} in [0, {upper if upper is not None else 'inf'}], got {value!r}",
    )


_SITE_FIELDS = {f.name for f in dataclasses.fields(CatalogueSite)}


def _parse_site(raw: Any, at: str, width: int | None) -> CatalogueSite:
    _check(isinstance(raw, dict), at, "must be a mapping")
    _check("id" in raw, at, "needs an id (and a path, unless the path is the id)")
    _check(not set(raw) - _SITE_FIELDS, at, f"unknown keys {sorted(set(raw) - _SITE_FIELDS)}")
    raw = {"path": raw["id"], "width": width, **raw}
    for key in ("id", "path"):
        ok = isinstance(raw[key], str) and raw[key].strip("/")
        _check(bool(ok), at, f"{key} must be a string")
    _check_names(raw["path"], at, "path")
    for key in ("site", "site_out", "neuronpedia"):
        value = raw.get(key)
        _check(value is None or (isinstance(value, str) and value), at, f"{key} must be a string")
    neuronpedia = raw.get("neuronpedia")
    _check(
        neuronpedia is None or bool(_NEURONPEDIA_ID.match(neuronpedia)),
        at,
        f"neuronpedia must be '<model>/<source id>', got {neuronpedia!r}",
    )
    _optional_number(raw["width"], at, "width", integer=True)
    _optional_number(raw.get("l0"), at, "l0")
    _optional_number(raw.get("variance_explained"), at, "variance_explained", upper=1.0)
    canonical = raw.get("canonical", False)
    _check(isinstance(canonical, bool), at, f"canonical must be true or false, got {canonical!r}")
    _check(not canonical or bool(raw.get("site")), at, "a canonical dictionary needs a site")
    return CatalogueSite(**raw)


def parse_entry(values: Any, where: str) -> CatalogueEntry:
    """Validate one parsed YAML file against the schema and build its entry.

    Optional keys: ``architecture``, ``kind`` (default ``sae``), ``license``, ``links``,
    ``sources`` (a list of strings) and ``width`` (the default of every site's width); a
    site's ``path`` defaults to its ``id``.

    Raises:
        CatalogueError: naming the file and the field at fault.
    """
    from lightning_interp.zoo.formats import FORMATS

    _check(isinstance(values, dict), where, "must be a mapping")
    fields = {f.name for f in dataclasses.fields(CatalogueEntry)} | {"width"}
    optional = {"architecture", "kind", "license", "links", "sources", "width"}
    required = fields - optional
    _check(not required - set(values), where, f"missing keys {sorted(required - set(values))}")
    _check(not set(values) - fields, where, f"unknown keys {sorted(set(values) - fields)}")
    for key in ("release", "title", "repo", "revision", "format", "backbone"):
        _check(isinstance(values[key], str) and values[key], where, f"{key} must be a string")
    _check(bool(_REPO_ID.match(values["repo"])), where, f"repo {values['repo']!r} is not org/name")
    known = sorted(FORMATS) + sorted(FOREIGN_FORMATS)
    _check(values["format"] in known, where, f"format must be one of {known}")
    # The release names the folder `lightning-interp pull zoo:<release>/...` writes to.
    _check_names(values["release"], where, "release")
    _check(isinstance(values.get("links", {}), dict), where, "links must be a mapping")
    architecture = values.get("architecture")
    _check(
        architecture is None or bool(_ARCHITECTURE.match(str(architecture))),
        where,
        f"architecture must be a lower-case name such as 'topk', got {architecture!r}",
    )
    kind = values.get("kind", "sae")
    _check(kind in KINDS, where, f"kind must be one of {list(KINDS)}, got {kind!r}")
    sources = values.get("sources", [])
    _check(
        isinstance(sources, list) and all(isinstance(s, str) and s for s in sources),
        where,
        "sources must be a list of strings (owner/repo@commit:path or a URL)",
    )
    _optional_number(values.get("width"), where, "width", integer=True)
    raw_sites = values["sites"]
    _check(isinstance(raw_sites, list) and raw_sites, where, "sites must be a non-empty list")
    sites = [
        _parse_site(raw, f"{where} sites[{index}]", values.get("width"))
        for index, raw in enumerate(raw_sites)
    ]
    ids = [s.id for s in sites]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    _check(not duplicates, where, f"duplicate site ids {duplicates}")
    canonical = [s.site for s in sites if s.canonical]
    twice = sorted({s for s in canonical if canonical.count(s) > 1})
    _check(not twice, where, f"several canonical dictionaries at {twice}; mark one per site")
    rest = {k: v for k, v in values.items() if k not in ("sites", "width", "sources")}
    return CatalogueEntry(**rest, sites=tuple(sites), sources=tuple(sources))


@cache
def _load_file(path: Path) -> CatalogueEntry:
    import yaml

    # libyaml's safe loader parses the catalogue (thousands of dictionaries) ~4x faster.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # a safe loader
    except yaml.YAMLError as err:
        raise CatalogueError(f"{path} is not valid YAML: {err}") from err
    entry = parse_entry(values, str(path))
    message = f"release must equal the file name {path.stem!r}, got {entry.release!r}"
    _check(entry.release == path.stem, str(path), message)
    return entry


@lru_cache(maxsize=1)
def _load_all(folder: Path = CATALOGUE_DIR) -> dict[str, CatalogueEntry]:
    entries = [_load_file(path) for path in sorted(folder.glob("*.yaml"))]
    return {entry.release: entry for entry in entries}


def list_releases() -> list[CatalogueEntry]:
    """Every release in the catalogue, sorted by id.

    Example:
        >>> from lightning_interp.zoo.catalogue import list_releases
        >>> "gpt2-small-res-jb" in [entry.release for entry in list_releases()]
        True
    """
    return [entry for _, entry in sorted(_load_all().items())]


def get_release(release: str) -> CatalogueEntry:
    """The catalogue entry ``release`` (read alone: resolving a ``zoo:`` id stays fast).

    Raises:
        CatalogueError: unknown release; the message lists close names.
    """
    # Compared against the listing, so a case-insensitive file system cannot match.
    if release in {path.stem for path in CATALOGUE_DIR.glob("*.yaml")}:
        return _load_file(CATALOGUE_DIR / f"{release}.yaml")
    entries = _load_all()
    close = difflib.get_close_matches(release, list(entries), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise CatalogueError(
        f"no catalogue release {release!r}.{hint} List them with `lightning-interp zoo "
        f"list` ({len(entries)} releases; filter with --backbone, --site, --architecture)"
    )


def _glob_or_equal(value: str | None, pattern: str) -> bool:
    if value is None:
        return False
    return fnmatch.fnmatchcase(value.lower(), pattern.lower())


def backbone_matches(entry: CatalogueEntry, pattern: str) -> bool:
    """Whether ``pattern`` (a Hub id, its name part, or a glob of either) names the backbone.

    Example:
        >>> from lightning_interp.zoo.catalogue import backbone_matches, get_release
        >>> backbone_matches(get_release("gemma-scope-2b-pt-res"), "gemma-2-2b")
        True
    """
    name = entry.backbone.rsplit("/", 1)[-1]
    return _glob_or_equal(entry.backbone, pattern) or _glob_or_equal(name, pattern)


def site_matches(site: CatalogueSite, pattern: str) -> bool:
    """Whether ``pattern`` names the site a dictionary reads (or, for a transcoder, writes).

    ``pattern`` is a site (``layers.8.resid_post``), a site kind (``resid_post``,
    ``mlp_out``: any layer) or a glob (``layers.1?.*``, ``*post_feedforward_layernorm*``).

    Example:
        >>> from lightning_interp.zoo.catalogue import CatalogueSite, site_matches
        >>> site_matches(CatalogueSite("a", "a", site="layers.8.resid_post"), "resid_post")
        True
    """
    for value in (site.site, site.site_out):
        if value is not None and (
            _glob_or_equal(value, pattern) or value.lower().endswith("." + pattern.lower())
        ):
            return True
    return False


@dataclass(frozen=True)
class CatalogueMatch:
    """A release and those of its dictionaries that passed a filter."""

    entry: CatalogueEntry
    sites: tuple[CatalogueSite, ...]


def filter_catalogue(
    *,
    backbone: str | None = None,
    site: str | None = None,
    architecture: str | None = None,
    kind: str | None = None,
    format: str | None = None,
) -> list[CatalogueMatch]:
    """Releases (and their dictionaries) matching every filter given, sorted by release.

    Args:
        backbone: See :func:`backbone_matches`.
        site: See :func:`site_matches`; releases with no matching dictionary are dropped.
        architecture: ``topk``, ``jumprelu``, ... (case-insensitive).
        kind: ``sae``, ``transcoder`` or ``skip_transcoder``.
        format: A format name; ``loadable`` keeps the releases a registered adapter reads.

    Example:
        >>> from lightning_interp.zoo.catalogue import filter_catalogue
        >>> [m.entry.release for m in filter_catalogue(backbone="gpt2", site="layers.8.resid_pre")]
        ['gpt2-small-res-jb', 'gpt2-small-res-jb-feature-splitting']
    """
    matches = []
    for entry in list_releases():
        if backbone is not None and not backbone_matches(entry, backbone):
            continue
        if architecture is not None and (entry.architecture or "") != architecture.lower():
            continue
        if kind is not None and entry.kind != kind:
            continue
        if format is not None and not (
            entry.loadable if format == "loadable" else entry.format == format
        ):
            continue
        sites = tuple(s for s in entry.sites if site is None or site_matches(s, site))
        if sites:
            matches.append(CatalogueMatch(entry, sites))
    return matches


def resolve_catalogue_id(text: str, *, site: str | None = None) -> CatalogueTarget:
    """Resolve ``zoo:<release>/<id>`` (or ``zoo:<release>`` plus ``site``) to a Hub folder.

    Raises:
        CatalogueError: unknown release or dictionary.
        UnsupportedFormatError: the release is in a format no adapter reads yet.

    Example:
        >>> from lightning_interp.zoo.catalogue import resolve_catalogue_id
        >>> resolve_catalogue_id("zoo:gpt2-small-res-jb/layers.8.resid_pre").path
        'blocks.8.hook_resid_pre'
    """
    body = text.removeprefix("zoo:")
    release, _, name = body.partition("/")
    entry = get_release(release)
    name = name or site
    if not name:
        if len(entry.sites) != 1:
            raise CatalogueError(
                f"{text!r} names a release of {len(entry.sites)} dictionaries; add one of its "
                f"ids: zoo:{release}/<id> (see `lightning-interp zoo show {release}`)"
            )
        name = entry.sites[0].id
    chosen = entry.find(name)
    if not entry.loadable:
        raise UnsupportedFormatError(
            f"release {release!r} is in the {entry.format!r} format "
            f"({FOREIGN_FORMATS[entry.format]}), which lightning-interp cannot read yet; its "
            f"files are at hf://{entry.repo}/{chosen.path} (pick a loadable release with "
            f"`lightning-interp zoo list --format loadable`)"
        )
    return CatalogueTarget(entry.repo, chosen.path, entry.revision, entry.format)
