"""Publish dictionaries to the Hugging Face Hub: one folder per site, a card, one commit.

Repo folders come from sites (a dictionary's ``provenance.site``, a ``push_to_hub(site=...)``
argument, the keys of a ``{site: dictionary}`` map) or from a run's folder layout. Both are
untrusted text (a pulled config can say ``"site": "../../x"``), so a site must be a plain
folder name (:func:`~lightning_interp._io.check_folder_name`, per ``/``-separated level) and
every staged path is joined with :func:`~lightning_interp._io.safe_join`. An
``evaluation.json`` (a ``lightning-interp evaluate`` JSON) in a dictionary folder or beside
it in the run folder, or one passed as ``evaluation=``, is uploaded beside the weights and
summarised in the card. After the commit,
the repo is listed at the new commit: a publication that lacks any staged file raises
:class:`~lightning_interp.errors.HubError` instead of reporting success.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from lightning_interp._io import (
    atomic_write,
    check_folder_name,
    read_json,
    remove_stale_temporaries,
    safe_join,
)
from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.dictionaries.serialization import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_folder,
    read_config,
)
from lightning_interp.errors import ConfigError, DictionaryNotFoundError, HubError, UnsafePathError
from lightning_interp.zoo.card import CardEntry, build_card
from lightning_interp.zoo.card_evals import (
    EVALUATION_NAME,
    optional_evaluation,
    read_evaluation,
    with_evaluation,
)

METRICS_NAME = "metrics.json"
RUN_CONFIG_NAME = "config.yaml"  # LightningCLI's saved config, beside a run's outputs
TRAINING_CONFIG_NAME = "training_config.yaml"  # its name in a published repo


@dataclass(frozen=True)
class PublishItem:
    """One dictionary to publish.

    Attributes:
        path: Folder inside the repo (``""`` for the root).
        dictionary: The dictionary (saved in its inference form).
        metrics: Evaluation results (``fvu``, ``l0``, ...), written as ``metrics.json``.
        evaluation: A ``lightning-interp evaluate`` JSON, written as ``evaluation.json``.
    """

    path: str
    dictionary: Dictionary
    metrics: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None


@dataclass(frozen=True)
class PublishResult:
    """Where a publication landed: the repo, the commit sha and its URL."""

    repo_id: str
    commit: str
    url: str


def read_metrics(path: Path) -> dict[str, Any] | None:
    """The evaluation results in the ``metrics.json`` at ``path``, or ``None`` if absent.

    Raises:
        CorruptFileError: the file is not a UTF-8 JSON object.
    """
    return read_json(path) if path.is_file() else None


def write_metrics(folder: Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics`` as ``folder/metrics.json`` (UTF-8, atomically) and return its path."""
    path = folder / METRICS_NAME
    text = json.dumps(metrics, indent=2) + "\n"
    remove_stale_temporaries(folder, [METRICS_NAME])
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path


def site_folder(site: str, origin: str) -> str:
    """``site`` checked for use as a repo folder: plain names joined by ``/``.

    Args:
        site: The site (``"layers.8.resid_post"``), from ``origin``.
        origin: Where it came from, for the message (``"provenance.site of runs/x"``).

    Raises:
        UnsafePathError: a level is empty, ``.``/``..``, absolute, or has characters
            outside ``[A-Za-z0-9_.-]``.
    """
    try:
        for level in site.split("/"):
            check_folder_name(level, "site")
    except UnsafePathError as err:
        raise UnsafePathError(
            f"site {site!r} (from {origin}) cannot be a repo folder: {err}; set a plain site "
            f"name, or pass {{folder: dictionary}} to publish_run"
        ) from err
    return site


def items_from_folder(root: str | os.PathLike[str]) -> list[PublishItem]:
    """The dictionaries under a local folder, each with its repo folder, metrics, evaluation.

    ``root`` may be a dictionary folder, a training run (``<run>/dictionary/`` beside
    ``<run>/metrics.json``) or a multi-dictionary run (``<run>/<name>/dictionary/``); an
    ``evaluation.json`` is looked for where ``metrics.json`` is.
    Each dictionary goes to a repo folder named by its site (``provenance.site``); without
    sites, or when two share one, by its path in the run (``<name>``).
    """
    root = Path(root)
    found = sorted(p.parent for p in root.rglob(CONFIG_NAME) if (p.parent / WEIGHTS_NAME).is_file())
    if not found:
        raise DictionaryNotFoundError(
            f"{root} holds no dictionary folder ({CONFIG_NAME} + {WEIGHTS_NAME}); pass a folder "
            f"written by Dictionary.save_pretrained or a training run's output folder"
        )
    loaded, readers = [], ((read_metrics, METRICS_NAME), (optional_evaluation, EVALUATION_NAME))
    for folder in found:
        beside = folder != root or folder.name == "dictionary"  # <run>/metrics.json too
        metrics, evaluation = (
            reader(folder / name) or (reader(folder.parent / name) if beside else None)
            for reader, name in readers
        )
        rel = folder.relative_to(root).as_posix()
        rel = "" if rel in (".", "dictionary") else rel.removesuffix("/dictionary")
        loaded.append((rel, load_folder(folder), metrics, evaluation))
    sites = [d.config.provenance.site for _, d, _, _ in loaded]
    by_site = all(sites) and len(set(sites)) == len(sites)
    return [
        PublishItem(
            site_folder(site, f"provenance.site in {root / rel / CONFIG_NAME}") if by_site else rel,
            dictionary,
            metrics,
            evaluation,
        )
        for (rel, dictionary, metrics, evaluation), site in zip(loaded, sites, strict=True)
    ]


def _items(source: Any) -> list[PublishItem]:
    if isinstance(source, (str, os.PathLike)):
        return items_from_folder(source)
    if isinstance(source, Dictionary):
        source = [source]
    if isinstance(source, Mapping):
        return [
            PublishItem(site_folder(str(site), "a key of the map"), d) for site, d in source.items()
        ]
    if isinstance(source, Sequence):
        sites = [d.config.provenance.site for d in source]
        if not all(sites) or len(set(sites)) != len(sites):
            raise ConfigError(
                f"cannot name a repo folder for each dictionary: their sites are {sites}; pass "
                f"a dict {{site: dictionary}} instead"
            )
        return [
            PublishItem(site_folder(site, "provenance.site"), d)
            for site, d in zip(sites, source, strict=True)
        ]
    raise ConfigError(f"cannot publish a {type(source).__name__}; pass a folder or dictionaries")


def _training_config(source: Any) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source) / RUN_CONFIG_NAME
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


def render_card(
    source: Any,
    *,
    repo_id: str,
    card_data: dict[str, Any] | None = None,
    evaluation: str | os.PathLike[str] | None = None,
) -> str:
    """README text publishing ``source`` (with ``evaluation``) to a new repo would write."""
    items = _items(source)
    items = with_evaluation(items, evaluation) if evaluation else items
    with tempfile.TemporaryDirectory() as tmp:
        entries = _stage(items, Path(tmp))
    training_config = _training_config(source)
    return str(
        build_card(entries, repo_id=repo_id, card_data=card_data, training_config=training_config)
    )


def _remote_state(
    repo_id: str, revision: str | None, token: Any, skip: set[str]
) -> tuple[list[str], list[CardEntry], str | None]:
    """The repo's files, and what the card keeps: other native dictionaries, the run config."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    from lightning_interp.zoo.hub import checked_listing

    try:
        info = HfApi(token=token).model_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return [], [], None
    # Listed paths become cache paths and card entries: refuse any that would leave a folder.
    files = list(checked_listing(repo_id, info.sha, [s.rfilename for s in info.siblings or []]))

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token))

    entries = []
    for name in files:
        folder = name.rpartition("/")[0]
        prefix = f"{folder}/" if folder else ""
        if name != f"{prefix}{CONFIG_NAME}" or folder in skip:
            continue
        if f"{prefix}{WEIGHTS_NAME}" not in files:
            continue
        metrics, evaluation = (
            reader(fetch(f"{prefix}{kind}")) if f"{prefix}{kind}" in files else None
            for reader, kind in ((read_metrics, METRICS_NAME), (read_evaluation, EVALUATION_NAME))
        )
        config = json.loads(fetch(name).read_text("utf-8"))
        entries.append(CardEntry(folder, config, metrics, evaluation))
    training_config = (
        fetch(TRAINING_CONFIG_NAME).read_text(encoding="utf-8")
        if TRAINING_CONFIG_NAME in files
        else None
    )
    return files, entries, training_config


def _stale_files(remote_files: list[str], targets: set[str], uploading: set[str]) -> list[str]:
    """Dictionary files left in a target folder by an earlier upload (maybe another format).

    Left in place they would sit beside the new files and make the folder's format
    ambiguous, so the commit deletes them.
    """
    from lightning_interp.zoo.formats import FORMATS

    patterns = {p for adapter in FORMATS.values() for p in adapter.allow_patterns}
    stale = []
    for name in remote_files:
        folder, _, base = name.rpartition("/")
        if folder in targets and name not in uploading and any(fnmatch(base, p) for p in patterns):
            stale.append(name)
    return stale


def _stage(items: list[PublishItem], folder: Path) -> list[CardEntry]:
    """Write each item (native, inference form) under ``folder``; return their card entries.

    Each entry is built from the ``config.json`` just written, so the card describes
    exactly the files uploaded.
    """
    from lightning_interp.zoo.formats import write_folder

    entries = []
    for item in items:
        target = safe_join(folder, item.path) if item.path else folder
        write_folder(item.dictionary, target, format="native")
        if item.metrics is not None:
            write_metrics(target, item.metrics)
        if item.evaluation is not None:
            text = json.dumps(item.evaluation, indent=2) + "\n"
            (target / EVALUATION_NAME).write_text(text, encoding="utf-8")
        entries.append(CardEntry(item.path, read_config(target), item.metrics, item.evaluation))
    return entries


def publish(
    items: list[PublishItem],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    card_data: dict[str, Any] | None = None,
    commit_message: str | None = None,
    training_config: str | None = None,
) -> PublishResult:
    """Upload ``items`` and a regenerated README.md as ONE commit (creating repo/branch).

    The card lists the new dictionaries and any native dictionaries already in the repo.
    ``training_config`` (a run's LightningCLI ``config.yaml``) is uploaded as
    ``training_config.yaml`` and shown in the card.
    """
    from huggingface_hub import HfApi

    from lightning_interp.zoo.hub import hub_errors

    paths = [i.path for i in items]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"two dictionaries would share a repo folder: {paths}")
    api = HfApi(token=token)
    with hub_errors(repo_id, revision), tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        for path in paths:  # before the Hub is touched: a bad folder creates no repo
            if path:
                safe_join(staged, path)
        prepare_repo(api, repo_id, private=private, revision=revision)
        remote_files, kept, remote_config = _remote_state(repo_id, revision, token, set(paths))
        entries = _stage(items, staged)
        if training_config is not None:
            (staged / TRAINING_CONFIG_NAME).write_text(training_config, encoding="utf-8")
        card = build_card(
            kept + entries,
            repo_id=repo_id,
            card_data=card_data,
            training_config=training_config or remote_config,
        )
        (staged / "README.md").write_text(str(card), encoding="utf-8")
        stale = _stale_files(remote_files, set(paths), set(staged_files(staged)))
        where = ", ".join(p or "." for p in paths)
        return commit_staged(
            api,
            repo_id,
            staged,
            revision=revision,
            commit_message=commit_message
            or f"Publish {len(items)} dictionaries ({where}) with lightning-interp",
            deletions=stale,
            expected=_expected_files(items, with_training_config=training_config is not None),
        )


def _expected_files(items: list[PublishItem], *, with_training_config: bool) -> list[str]:
    """Every repo path a publication of ``items`` must commit, derived from the items alone."""
    expected = ["README.md"] + ([TRAINING_CONFIG_NAME] if with_training_config else [])
    for item in items:
        names = [CONFIG_NAME, WEIGHTS_NAME] + ([METRICS_NAME] if item.metrics is not None else [])
        names += [EVALUATION_NAME] if item.evaluation is not None else []
        expected += [f"{item.path}/{name}" if item.path else name for name in names]
    return expected


def prepare_repo(api: Any, repo_id: str, *, private: bool, revision: str | None) -> None:
    """Create ``repo_id`` (and branch ``revision``) if missing, so a commit can land there."""
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)


def staged_files(staged: Path) -> dict[str, Path]:
    """``{repo path: local file}`` for every file under the staging folder ``staged``."""
    return {p.relative_to(staged).as_posix(): p for p in sorted(staged.rglob("*")) if p.is_file()}


def commit_staged(
    api: Any,
    repo_id: str,
    staged: Path,
    *,
    revision: str | None,
    commit_message: str,
    deletions: Sequence[str] = (),
    expected: Sequence[str] = (),
) -> PublishResult:
    """Upload every file under ``staged`` and delete ``deletions`` as ONE commit.

    One commit means readers never see a half-published repo: either the old files or
    all of the new ones. ``expected`` (repo paths) must all be staged before the commit
    and present in the repo at the new commit after it.

    Raises:
        HubError: an expected file was not staged (nothing is committed), or is missing
            from the commit the Hub reports (the publication is incomplete).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    files = staged_files(staged)
    unstaged = sorted(set(expected) - set(files))
    if unstaged:
        raise HubError(
            f"refusing to publish to {repo_id}: {unstaged} were not staged (written "
            f"elsewhere?); nothing was committed"
        )
    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        for name, path in files.items()
    ]
    operations += [CommitOperationDelete(path_in_repo=name) for name in deletions]
    info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    committed = set(api.list_repo_files(repo_id, revision=info.oid))
    lost = sorted(set(expected) - committed)
    if lost:
        raise HubError(
            f"the Hub accepted commit {info.oid} to {repo_id} but it lacks {lost}; the "
            f"publication is incomplete: publish again (and check the repo's storage quota)"
        )
    return PublishResult(repo_id, info.oid, info.commit_url)


def push_to_hub(
    dictionary: Dictionary,
    repo_id: str,
    *,
    site: str | None = None,
    metrics: dict[str, Any] | None = None,
    **kwargs: Any,
) -> PublishResult:
    """Publish one dictionary (to the repo root, or to folder ``site``); see :func:`publish`.

    Raises:
        UnsafePathError: ``site`` is not a plain folder name (e.g. ``"../x"``).
    """
    site = (site or "").rstrip("/")  # "a/" means "a"; "/a" is refused, not reinterpreted
    folder = site_folder(site, "push_to_hub(site=...)") if site else ""
    return publish([PublishItem(folder, dictionary, metrics)], repo_id, **kwargs)


def publish_run(
    source: str | os.PathLike[str] | Mapping[str, Dictionary] | Sequence[Dictionary],
    repo_id: str,
    *,
    evaluation: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> PublishResult:
    """Publish a training run (or several dictionaries) as one repo, one folder per site.

    Args:
        source: A run folder (``<run>/dictionary/`` + ``metrics.json``, or one subfolder
            per dictionary), a dictionary folder, ``{site: dictionary}``, or dictionaries
            whose ``provenance.site`` differ.
        repo_id: Target repo (created if missing).
        evaluation: A ``lightning-interp evaluate`` JSON to publish beside the dictionary
            it evaluated (see :func:`with_evaluation`); an ``evaluation.json`` already in
            a dictionary's folder (or its run folder) is published without this.
        **kwargs: ``private``, ``revision``, ``token``, ``card_data``, ``commit_message``.

    Returns:
        The repo id, commit sha and commit URL.
    """
    items = _items(source)
    items = with_evaluation(items, evaluation) if evaluation else items
    return publish(items, repo_id, training_config=_training_config(source), **kwargs)
