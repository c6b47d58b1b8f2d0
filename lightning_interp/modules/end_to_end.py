"""Training a dictionary end to end: spliced into the frozen backbone, through its LM loss.

Codebook features (Tamkin et al. 2023) train their codebooks with the model's own loss, the
codebook's output replacing the hidden state in the forward pass, plus a reconstruction
term that keeps the codes close to the activations (the reference's default ``aeloss``:
``codebook_features/models.py``, ``BaseSnapFunction.backward``).
:class:`EndToEndDictionaryModule` trains any registered dictionary that way:

- the data are token batches (:class:`TokenDataModule`, the text handling of
  :class:`~lightning_interp.data.LanguageModelDataModule` with batches of token ids);
- each step runs the frozen backbone once with the dictionary spliced in at its site (a
  transcoder reads ``site`` and replaces ``site_out``), and minimises the next-token cross
  entropy plus ``reconstruction_coefficient`` times the dictionary's own loss on the
  activations it replaced (reconstruction and its sparsity or auxiliary terms);
- the backbone stays frozen (``requires_grad=False``, eval mode, not a submodule, not in
  checkpoints): gradients flow through it to the dictionary only.

Everything else (optimizer, schedules, unit-norm decoders, ``b_dec`` initialisation,
dead-latent counters, non-finite policy, export) is :class:`DictionaryModule`'s. Not done
here: the reference also finetunes the network around its codebooks (here it stays frozen),
and the KL-to-the-clean-model objective of end-to-end SAEs (Braun et al. 2024) is not
offered.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_interp.data import LanguageModelDataModule
from lightning_interp.data.sharding import world
from lightning_interp.data.tokens import iter_batches
from lightning_interp.dictionaries import Dictionary
from lightning_interp.errors import ConfigError
from lightning_interp.modules.dictionary_module import DictionaryModule
from lightning_interp.modules.dictionary_spec import DictionarySpec
from lightning_interp.modules.learner import DictionaryLearner

__all__ = ["EndToEndDictionaryModule", "TokenBatches", "TokenDataModule", "next_token_loss"]


def next_token_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean cross entropy of predicting each next token, over real (unpadded) pairs.

    Args:
        logits: ``[batch, seq, vocab]``.
        input_ids: ``[batch, seq]``.
        attention_mask: ``[batch, seq]`` (1 for real tokens), or ``None`` (all real).
    """
    predicted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    per_token = F.cross_entropy(predicted, input_ids[:, 1:].reshape(-1), reduction="none")
    if attention_mask is None:
        return per_token.mean()
    keep = (attention_mask[:, 1:] * attention_mask[:, :-1]).reshape(-1).to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp_min(1.0)


class TokenBatches(IterableDataset):
    """Batches ``{"input_ids", "attention_mask"}`` of a text, in order, resumable.

    Under DDP each rank takes every ``world_size``-th batch. The position (batches yielded)
    is kept by :meth:`state_dict`; a restored stream skips that many batches (tokenising
    them again, without running any model).

    Args:
        texts: Documents or conversations (re-iterable).
        tokenizer: The backbone's tokenizer.
        contexts: Contexts per batch.
        max_batches: Batches over all ranks (``None``: until the text runs out).
        **context_kwargs: ``context_size``, ``chat``, ``sequential_chat``, ``prepend_bos``,
            ``separator`` as :func:`~lightning_interp.data.tokens.iter_batches` takes them.
    """

    def __init__(
        self,
        texts: Any,
        tokenizer: Any,
        contexts: int,
        max_batches: int | None,
        **context_kwargs: Any,
    ) -> None:
        super().__init__()
        self.texts, self.tokenizer, self.contexts = texts, tokenizer, contexts
        self.max_batches, self.context_kwargs = max_batches, context_kwargs
        self.position = 0  # batches of the current pass this rank has yielded
        self._skip = 0  # batches a restored state says to skip in the next pass

    def _per_rank(self) -> int | None:
        return None if self.max_batches is None else self.max_batches // world()[1]

    def __len__(self) -> int:
        if self.max_batches is None:
            raise TypeError("TokenBatches has a length only when max_batches is set")
        return self._per_rank()

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        rank, ranks = world()
        # Only a restored position skips: a pass cut short (Lightning's sanity check, a
        # limit on batches) leaves the next pass starting from the beginning.
        skip, self._skip, self.position = self._skip, 0, 0
        batches = iter_batches(
            self.texts, self.tokenizer, size=self.contexts, **self.context_kwargs
        )
        mine = itertools.islice(itertools.islice(batches, rank, None, ranks), self._per_rank())
        for index, (_, input_ids, attention_mask) in enumerate(mine):
            # After the last batch of a pass, a checkpoint resumes at the next pass's start.
            last = self._per_rank() is not None and index + 1 == self._per_rank()
            self.position = 0 if last else index + 1
            if index >= skip:
                yield {"input_ids": input_ids, "attention_mask": attention_mask}
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        """Batches of the current pass consumed so far (0 at a pass's end)."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip ``state["position"]`` batches at the start of the next pass."""
        self._skip = int(state.get("position", 0))


class TokenDataModule(LanguageModelDataModule):
    """A language model's text as batches of token ids, for end-to-end training.

    Takes :class:`~lightning_interp.data.LanguageModelDataModule`'s arguments and keeps its
    backbone, text sources, held-out split, chat modes and
    :class:`~lightning_interp.data.source.ActivationSource` members (so the training module
    reads the site widths and provenance from it); only the batches differ. ``batch_size``
    counts tokens per step, as it counts activation rows there: each batch holds
    ``batch_size // context_size`` contexts, and ``train_tokens`` / ``val_tokens`` give
    ``tokens // batch_size`` batches. ``buffer_tokens`` and ``contexts_per_capture`` are not
    used (a batch is one forward).

    Raises:
        ConfigError: ``normalize`` is not ``"none"`` (the spliced dictionary must see the
            activations the backbone computes), or ``batch_size < context_size``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        h = self.hparams
        if h.normalize != "none":
            raise ConfigError(
                f"TokenDataModule splices the dictionary into the backbone, which needs raw "
                f"activations; got normalize={h.normalize!r}, set normalize: none"
            )
        if h.batch_size < h.context_size:
            raise ConfigError(
                f"TokenDataModule's batch_size counts tokens per step and must hold one "
                f"context: got batch_size={h.batch_size} < context_size={h.context_size}"
            )
        self._train_batches: TokenBatches | None = None
        self._resume: dict[str, int] | None = None

    def _batches(self, stream: Any, tokens: int | None) -> TokenBatches:
        h = self.hparams
        return TokenBatches(
            stream.texts,
            stream.tokenizer,
            contexts=h.batch_size // h.context_size,
            max_batches=None if tokens is None else tokens // h.batch_size,
            context_size=h.context_size,
            chat=stream.chat,
            sequential_chat=stream.sequential_chat,
            prepend_bos=stream.prepend_bos,
            separator=stream.separator,
        )

    def train_dataloader(self) -> DataLoader:
        """Token batches of the training text."""
        self.setup()
        self._train_batches = self._batches(self.train_stream, self.hparams.train_tokens)
        if self._resume is not None:
            self._train_batches.load_state_dict(self._resume)
            self._resume = None
        return DataLoader(self._train_batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """Token batches of the held-out text."""
        self.setup()
        return DataLoader(self._batches(self.val_stream, self.hparams.val_tokens), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        """The held-out batches again."""
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """The training batches' position (checkpoints resume the text where it stood)."""
        batches = self._train_batches
        return {"token_batches": batches.state_dict()} if batches is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when the training loader is next built."""
        self._resume = state.get("token_batches")


class _Splice:
    """Replaces a site's activation by the dictionary's output, keeping what it computed.

    Called with the activation (an autoencoder) or with the activation it replaces and
    the input site's (a transcoder). Only real (unpadded) positions go through the
    dictionary; padding keeps the backbone's activation.
    """

    def __init__(
        self, learner: DictionaryLearner, mask: Tensor | None, train: dict[str, Any] | None
    ) -> None:
        # train: forward_loss's keyword arguments for a training step; None to evaluate.
        self.learner, self.train = learner, train
        self.keep = None if mask is None or bool(mask.all()) else mask.bool()
        self.result: tuple[Tensor, dict[str, Tensor], Any] | None = None
        self.rows = 0

    def _rows(self, tensor: Tensor) -> Tensor:
        keep = None if self.keep is None else self.keep.to(tensor.device)
        return tensor.reshape(-1, tensor.shape[-1]) if keep is None else tensor[keep]

    def __call__(self, activation: Tensor, source: Tensor | None = None) -> Tensor:
        inputs = self._rows(activation if source is None else source)
        targets = None if source is None else self._rows(activation)
        self.rows = inputs.shape[0]
        if self.train is not None:
            self.result = self.learner.forward_loss(inputs, targets, **self.train)
            reconstruction = self.result[2].reconstruction
        else:
            self.learner.update_metrics(inputs, targets)
            reconstruction = self.learner.dictionary(inputs)
        reconstruction = reconstruction.to(activation.dtype)
        if self.keep is None:
            return reconstruction.view_as(activation)
        replaced = activation.clone()
        replaced[self.keep.to(activation.device)] = reconstruction
        return replaced


class EndToEndDictionaryModule(DictionaryModule):
    """Trains a dictionary spliced into the frozen backbone, on next-token cross entropy.

    Use it with a :class:`TokenDataModule`, which supplies the backbone, the site(s) and
    batches of token ids. The dictionary's ``d_in`` (and a transcoder's ``d_out``) and
    provenance come from the data module, as with :class:`DictionaryModule`, whose
    arguments it takes too. Logged per step: ``train/ce_loss`` (the spliced model's),
    ``train/total_loss`` and the dictionary's own terms (``train/fvu``, ``train/l0``...);
    per validation: ``val/ce_clean``, ``val/ce_spliced`` and the reconstruction metrics.

    Args:
        dictionary: As for :class:`DictionaryModule`.
        reconstruction_coefficient: Weight of the dictionary's own loss (reconstruction
            plus its sparsity or auxiliary terms) beside the cross entropy; 1 adds it as the
            codebook-features reference's ``aeloss`` does, 0 trains on the LM loss alone.
        **kwargs: The remaining :class:`DictionaryModule` arguments.

    Raises:
        ConfigError: ``reconstruction_coefficient`` is negative, the data module has no
            backbone, or the dictionary is fitted in closed form (semi-NMF).
    """

    def __init__(
        self,
        dictionary: Dictionary | DictionarySpec,
        reconstruction_coefficient: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if not reconstruction_coefficient >= 0:  # also refuses NaN
            raise ConfigError(
                f"reconstruction_coefficient must be >= 0, got {reconstruction_coefficient!r}; "
                f"use 0 to train on the LM loss alone"
            )
        super().__init__(dictionary, **kwargs)
        self.reconstruction_coefficient = float(reconstruction_coefficient)

    def on_train_start(self) -> None:
        """Refuse a dictionary fitted in closed form; then as :class:`DictionaryModule`."""
        if self.dictionary.fits_in_closed_form:
            raise ConfigError(
                f"{self.dictionary.architecture!r} is fitted by closed-form updates on "
                f"activations, which no LM-loss gradient can drive; train it with "
                f"DictionaryModule, or choose a gradient-trained architecture"
            )
        super().on_train_start()

    def _backbone(self) -> Any:
        # The data module's Backbone (modules/ does not import backbones/, see DESIGN.md).
        backbone = getattr(self.trainer.datamodule, "backbone", None)
        if backbone is None:
            raise ConfigError(
                "EndToEndDictionaryModule runs the backbone itself: train it with a data "
                "module that holds one (lightning_interp.modules.end_to_end.TokenDataModule)"
            )
        return backbone

    def _spliced_logits(
        self, backbone: Any, inputs: dict[str, Tensor], splice: _Splice | None
    ) -> Tensor:
        """Logits of one forward, with ``splice`` at the dictionary's site(s) if given."""
        provenance = self.dictionary.config.provenance
        site, site_out = provenance.site, provenance.site_out
        context: Any = contextlib.nullcontext()
        if splice is not None and site_out not in (None, site):
            context = backbone.transcode(site, site_out, lambda source, out: splice(out, source))
        elif splice is not None:
            context = backbone.splice(site, splice)
        with context:
            # Not Backbone.__call__, which runs under no_grad: the gradient must flow back
            # through the frozen layers after the site to the dictionary.
            return backbone.model(**inputs).logits

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One step: spliced forward, next-token CE plus the dictionary's weighted loss."""
        backbone = self._backbone()
        inputs = backbone.encode(batch)
        mask = inputs.get("attention_mask")
        train = dict(sparsity_scale=self.sparsity_scale(), reduce=self.reduce)
        splice = _Splice(self.learner, mask, train=train)
        ce = next_token_loss(
            self._spliced_logits(backbone, inputs, splice), inputs["input_ids"], mask
        )
        if splice.result is None:
            raise ConfigError(
                f"the forward never reached site {self.dictionary.config.provenance.site!r}; "
                f"check the data module's sites"
            )
        dictionary_loss, logged, out = splice.result
        loss = ce + self.reconstruction_coefficient * dictionary_loss
        if not self._usable_loss({"dictionary": loss}, batch_idx):
            return self.skipped_step()
        self.learner.commit(out, self.reduce)
        logged.update(ce_loss=ce.detach(), total_loss=loss.detach())
        logged["sparsity_scale"] = torch.tensor(self.sparsity_scale())
        self._log_training("train", logged, self.learner)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        self._log_throughput(splice.rows)
        return loss

    def _evaluate(self, batch: Any, prefix: str, batch_idx: int) -> None:
        backbone = self._backbone()
        inputs = backbone.encode(batch)
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        splice = _Splice(self.learner, mask, train=None)
        clean = next_token_loss(self._spliced_logits(backbone, inputs, None), ids, mask)
        spliced = next_token_loss(self._spliced_logits(backbone, inputs, splice), ids, mask)
        tokens = ids.shape[0] * (ids.shape[1] - 1) if mask is None else int(mask.sum())
        for name, value in (("ce_clean", clean), ("ce_spliced", spliced)):
            self.log(f"{prefix}/{name}", value, on_step=False, on_epoch=True, batch_size=tokens)
        self._log_evaluation(prefix, self.learner.metrics())
