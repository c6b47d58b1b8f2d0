"""Concept-bottleneck heads in the zoo: load from a folder or the Hub, publish with a card.

Heads are stored as dictionaries are (``config.json`` + ``model.safetensors``, see
:meth:`ConceptHead.save_pretrained <lightning_interp.concepts.ConceptHead.save_pretrained>`)
and travel through the same Hub machinery (:mod:`lightning_interp.zoo.hub` for listing,
downloading and error mapping; :mod:`lightning_interp.zoo.publish` for the single commit).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_interp._io import safe_join
from lightning_interp.concepts.base import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    ConceptHead,
    load_head_folder,
)
from lightning_interp.errors import DictionaryNotFoundError
from lightning_interp.zoo.head_card import build_head_card
from lightning_interp.zoo.load import HF_PREFIX, check_source, hub_repo_id
from lightning_interp.zoo.publish import METRICS_NAME, PublishResult, read_metrics, write_metrics

HEAD_FILES = (HEAD_CONFIG, HEAD_WEIGHTS)


def load_head(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    device: str | torch.device | None = None,
    token: str | bool | None = None,
) -> ConceptHead:
    """Load a concept head from a local folder or a Hub repo.

    Args:
        source: A folder written by ``head.save_pretrained``, or a Hub repo id
            (``"org/name"`` or ``"hf://org/name"``) a head was pushed to.
        revision: Hub branch, tag or commit sha (default: the default branch).
        subfolder: Folder inside the source holding the head (default: its root).
        device: Device for the weights (default CPU).
        token: Hub token (default: the logged-in one, as huggingface_hub does).

    Returns:
        The head in eval mode. Loaded from the Hub, ``head.provenance`` records
        ``hub_repo_id``, ``hub_subfolder`` and ``revision`` (the commit sha it came from).

    Raises:
        DictionaryNotFoundError: the folder, repo, revision or head files do not exist (or
            are not cached while ``HF_HUB_OFFLINE=1``).
        HubError: the Hub failed or the connection dropped.
        CorruptFileError: a file is unreadable, or the folder holds no head.

    Example:
        >>> import tempfile
        >>> from lightning_interp.concepts import SupervisedCBM
        >>> folder = tempfile.mkdtemp()
        >>> _ = SupervisedCBM(8, ["round", "red"], ["apple", "pear"]).save_pretrained(folder)
        >>> load_head(folder).concept_names
        ['round', 'red']
    """
    text = check_source(source)
    sub = (subfolder or "").strip("/")
    if Path(text).is_dir():
        head = load_head_folder(safe_join(text, sub) if sub else Path(text))
    else:
        repo_id = hub_repo_id(source)
        if repo_id is None:
            raise DictionaryNotFoundError(
                f"{text!r} is neither a local folder nor a Hub repo id ('org/name'); pass the "
                f"folder written by head.save_pretrained or the repo a head was pushed to"
            )
        try:
            head = _load_from_hub(repo_id, revision=revision, subfolder=sub, token=token)
        except DictionaryNotFoundError as err:
            from huggingface_hub.errors import RepositoryNotFoundError

            if text.startswith(HF_PREFIX) or not isinstance(err.__cause__, RepositoryNotFoundError):
                raise
            # "runs/head" is a valid repo id too: say that reading it locally failed as well.
            raise DictionaryNotFoundError(f"{err}; no local folder {text!r} exists either") from err
    return head.to(device) if device is not None else head


def _load_from_hub(
    repo_id: str, *, revision: str | None, subfolder: str, token: str | bool | None
) -> ConceptHead:
    """Download only the head's two files of ``repo_id@revision`` and load them."""
    from lightning_interp.zoo.hub import download_files, list_revision, snapshot_sha

    listing = list_revision(repo_id, revision, token)
    prefix = f"{subfolder}/" if subfolder else ""
    files = [prefix + name for name in HEAD_FILES]
    missing = [f for f in files if f not in listing.files]
    if missing:
        where = f"Hub repo {repo_id}@{listing.revision}"
        hint = (
            "; with HF_HUB_OFFLINE=1 only cached files are known: load it once online"
            if listing.offline
            else f"; its files: {', '.join(listing.files) or 'none'}"
        )
        raise DictionaryNotFoundError(
            f"{where} holds no concept head in {subfolder or 'its root'} (missing "
            f"{', '.join(missing)}); pass subfolder=... naming the head's folder{hint}"
        )
    snapshot = download_files(listing, files, token)
    head = load_head_folder(safe_join(snapshot, subfolder) if subfolder else snapshot)
    head.provenance.update(
        hub_repo_id=repo_id, hub_subfolder=subfolder, revision=snapshot_sha(snapshot)
    )
    return head


def stage_head(head: ConceptHead, folder: Path, metrics: dict[str, Any] | None) -> None:
    """Write the head (and its ``metrics.json``, if any) into the staging ``folder``."""
    head.save_pretrained(folder)
    if metrics is not None:
        write_metrics(folder, metrics)


def push_head(
    head: ConceptHead,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    card_data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    commit_message: str | None = None,
) -> PublishResult:
    """Publish ``head`` to the root of ``repo_id`` with a card, as ONE commit.

    See :meth:`ConceptHead.push_to_hub <lightning_interp.concepts.ConceptHead.push_to_hub>`.
    A ``metrics.json`` left by an earlier publication is deleted when ``metrics`` is
    ``None``, so the repo never shows another head's results.
    """
    from huggingface_hub import HfApi

    from lightning_interp.zoo.hub import hub_errors
    from lightning_interp.zoo.publish import commit_staged, prepare_repo

    api = HfApi(token=token)
    with hub_errors(repo_id, revision), tempfile.TemporaryDirectory() as tmp:
        prepare_repo(api, repo_id, private=private, revision=revision)
        staged = Path(tmp)
        stage_head(head, staged, metrics)
        card = build_head_card(head, repo_id=repo_id, card_data=card_data, metrics=metrics)
        (staged / "README.md").write_text(str(card), encoding="utf-8")
        remote = api.list_repo_files(repo_id, revision=revision)
        stale = [METRICS_NAME] if metrics is None and METRICS_NAME in remote else []
        return commit_staged(
            api,
            repo_id,
            staged,
            revision=revision,
            commit_message=commit_message
            or f"Publish a {head.head_type} concept head with lightning-interp",
            deletions=stale,
            expected=[*HEAD_FILES, "README.md", *([METRICS_NAME] if metrics is not None else [])],
        )


def render_head_card(
    folder: str | os.PathLike[str], *, repo_id: str, card_data: dict[str, Any] | None = None
) -> str:
    """README text publishing the head folder ``folder`` to ``repo_id`` would write."""
    folder = Path(folder)
    head = load_head_folder(folder)
    metrics = read_metrics(folder / METRICS_NAME)
    return str(build_head_card(head, repo_id=repo_id, card_data=card_data, metrics=metrics))


def publish_head_folder(
    folder: str | os.PathLike[str], repo_id: str, **kwargs: Any
) -> PublishResult:
    """Publish the head saved in ``folder`` (with its ``metrics.json``, if present).

    Args:
        folder: A folder written by ``head.save_pretrained``.
        repo_id: Target repo (created if missing).
        **kwargs: ``private``, ``revision``, ``token``, ``card_data``, ``commit_message``.
    """
    folder = Path(folder)
    return push_head(
        load_head_folder(folder), repo_id, metrics=read_metrics(folder / METRICS_NAME), **kwargs
    )
