"""The catalogue of well-known public dictionary releases, and ``zoo:`` ids.

Each release is one YAML file in the top-level ``zoo/`` folder of the source tree, shipped
inside the package as ``lightning_interp/catalogue/`` (a symlink in the source tree, a real
folder in the wheel). ``zoo:<release>/<id>`` names one dictionary of a release; the id is
the release's own name for it, or the canonical site it reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lightning_interp._io import check_folder_name
from lightning_interp.errors import CatalogueError, UnsafePathError

CATALOGUE_DIR = Path(__file__).resolve().parent.parent / "catalogue"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class CatalogueSite:
    """One dictionary of a release.

    Attributes:
        id: The release's name for it (SAELens's ``sae_id`` where SAELens lists it).
        path: Its folder inside the repo.
        site: The canonical site it reads (``layers.8.resid_pre``), if known.
        l0: Published mean L0, if known.
        variance_explained: Published fraction of variance explained, if known.
    """

    id: str
    path: str
    site: str | None = None
    l0: float | None = None
    variance_explained: float | None = None

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
        format: Format adapter name (``saelens``, ``sparsify``, ``gemma_scope``, ...).
        backbone: Hub id of the model the dictionaries were trained on.
        sites: Its dictionaries.
        license: The release's license, if stated.
        links: Named URLs (publication, dashboards, code).
    """

    release: str
    title: str
    repo: str
    revision: str
    format: str
    backbone: str
    sites: tuple[CatalogueSite, ...]
    license: str | None = None
    links: dict[str, str] = dataclasses.field(default_factory=dict)

    def find(self, name: str) -> CatalogueSite:
        """The site whose id, canonical site or path is ``name``.

        Raises:
            CatalogueError: no such site; the message suggests close ids.
        """
        for key in ("id", "site", "path"):
            for site in self.sites:
                if getattr(site, key) == name:
                    return site
        ids = [s.id for s in self.sites]
        close = difflib.get_close_matches(name, ids + [s.site for s in self.sites if s.site], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise CatalogueError(
            f"release {self.release!r} has no dictionary {name!r}.{hint} Its ids: "
            f"{', '.join(ids)} (see `lightning-interp zoo show {self.release}`)"
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


def _optional_number(value: Any, where: str, name: str, upper: float | None = None) -> None:
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    _check(
        ok and (upper is None or value <= upper),
        where,
        f"{name} must be a number in [0, {upper if upper is not None else 'inf'}], got {value!r}",
    )


def parse_entry(values: Any, where: str) -> CatalogueEntry:
    """Validate one parsed YAML file against the schema and build its entry.

    Raises:
        CatalogueError: naming the file and the field at fault.
    """
    from lightning_interp.zoo.formats import FORMATS

    _check(isinstance(values, dict), where, "must be a mapping")
    fields = {f.name for f in dataclasses.fields(CatalogueEntry)}
    required = fields - {"license", "links"}
    _check(not required - set(values), where, f"missing keys {sorted(required - set(values))}")
    _check(not set(values) - fields, where, f"unknown keys {sorted(set(values) - fields)}")
    for key in ("release", "title", "repo", "revision", "format", "backbone"):
        _check(isinstance(values[key], str) and values[key], where, f"{key} must be a string")
    _check(bool(_REPO_ID.match(values["repo"])), where, f"repo {values['repo']!r} is not org/name")
    _check(values["format"] in FORMATS, where, f"format must be one of {sorted(FORMATS)}")
    # The release names the folder `lightning-interp pull zoo:<release>/...` writes to.
    _check_names(values["release"], where, "release")
    _check(isinstance(values.get("links", {}), dict), where, "links must be a mapping")
    raw_sites = values["sites"]
    _check(isinstance(raw_sites, list) and raw_sites, where, "sites must be a non-empty list")
    site_fields = {f.name for f in dataclasses.fields(CatalogueSite)}
    sites = []
    for index, raw in enumerate(raw_sites):
        at = f"{where} sites[{index}]"
        _check(isinstance(raw, dict), at, "must be a mapping")
        _check({"id", "path"} <= set(raw), at, "needs id and path")
        _check(not set(raw) - site_fields, at, f"unknown keys {sorted(set(raw) - site_fields)}")
        for key in ("id", "path"):
            _check(isinstance(raw[key], str) and raw[key].strip("/"), at, f"{key} must be a string")
        _check_names(raw["path"], at, "path")
        _optional_number(raw.get("l0"), at, "l0")
        _optional_number(raw.get("variance_explained"), at, "variance_explained", upper=1.0)
        sites.append(CatalogueSite(**raw))
    ids = [s.id for s in sites]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    _check(not duplicates, where, f"duplicate site ids {duplicates}")
    return CatalogueEntry(**{**values, "sites": tuple(sites)})


@lru_cache(maxsize=1)
def _load_all(folder: Path = CATALOGUE_DIR) -> dict[str, CatalogueEntry]:
    import yaml

    entries: dict[str, CatalogueEntry] = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise CatalogueError(f"{path} is not valid YAML: {err}") from err
        entry = parse_entry(values, str(path))
        _check(
            entry.release == path.stem,
            str(path),
            f"release must equal the file name {path.stem!r}, got {entry.release!r}",
        )
        entries[entry.release] = entry
    return entries


def list_releases() -> list[CatalogueEntry]:
    """Every release in the catalogue, sorted by id.

    Example:
        >>> from lightning_interp.zoo.catalogue import list_releases
        >>> "gpt2-small-res-jb" in [entry.release for entry in list_releases()]
        True
    """
    return [entry for _, entry in sorted(_load_all().items())]


def get_release(release: str) -> CatalogueEntry:
    """The catalogue entry ``release``.

    Raises:
        CatalogueError: unknown release; the message lists close names.
    """
    entries = _load_all()
    if release not in entries:
        close = difflib.get_close_matches(release, list(entries), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise CatalogueError(
            f"no catalogue release {release!r}.{hint} Known releases: {', '.join(sorted(entries))}"
        )
    return entries[release]


def resolve_catalogue_id(text: str, *, site: str | None = None) -> CatalogueTarget:
    """Resolve ``zoo:<release>/<id>`` (or ``zoo:<release>`` plus ``site``) to a Hub folder.

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
    return CatalogueTarget(entry.repo, chosen.path, entry.revision, entry.format)
