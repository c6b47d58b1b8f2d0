"""ConceptBottleneckModule: trains any concept head over frozen backbone embeddings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lightning_interp.concepts import (
    ConceptBank,
    ConceptHead,
    create_head,
    filter_concepts,
    load_phrases,
)
from lightning_interp.concepts.base import build_head
from lightning_interp.concepts.registry import builds_from_bank, head_class
from lightning_interp.data.source import activation_source
from lightning_interp.errors import ConfigError, ShapeMismatchError
from lightning_interp.metrics.concepts import ConceptAccuracy, ConceptAUROC

HEAD_SPEC_KEY = "concept_head_spec"  # checkpoint key of the head's ConceptHead.head_spec()


class ConceptBatch(NamedTuple):
    """Embeddings, class labels, optional concept labels and token mask of a batch."""

    x: Tensor
    y: Tensor
    concepts: Tensor | None = None
    mask: Tensor | None = None


def split_concept_batch(batch: Any) -> ConceptBatch:
    """Read a batch into a :class:`ConceptBatch`.

    Accepted: ``(x, y)``, ``(x, y, concepts)``, ``(x, y, concepts, mask)``, or a dict with
    ``embeddings`` (or ``x``), ``labels`` (or ``y``) and optional ``concepts`` and ``mask``.
    """
    if isinstance(batch, Mapping):
        x = batch.get("embeddings", batch.get("x"))
        y = batch.get("labels", batch.get("y"))
        if x is None or y is None:
            raise ConfigError(
                f"a dict batch needs 'embeddings' (or 'x') and 'labels' (or 'y'), got "
                f"{sorted(batch)}"
            )
        return ConceptBatch(x, y.long(), batch.get("concepts"), batch.get("mask"))
    if isinstance(batch, Sequence) and 2 <= len(batch) <= 4:
        return ConceptBatch(batch[0], batch[1].long(), *batch[2:])
    raise ConfigError(
        f"cannot read a concept batch of type {type(batch).__name__}; yield (x, y), "
        f"(x, y, concepts) or dicts with 'embeddings' and 'labels'"
    )


class ConceptBottleneckModule(L.LightningModule):
    """Trains one :class:`~lightning_interp.concepts.ConceptHead` with Lightning.

    Give a built ``head``, or (for recipes) a ``head_name`` with ``head_kwargs`` and
    ``concepts``: then the head is built in :meth:`configure_model` from the data
    module, which must offer ``text_encoder()``, ``class_names`` and ``train_embeddings()``
    (as :class:`~lightning_interp.data.EmbeddingDataModule` does). Heads that
    learn their concepts (``"concept_transformer"``, ``"concept_slots"``, ``"supervised_cbm"``)
    take only the names from ``concepts`` (default ``concept_i`` per labelled concept) and
    the width of the training embeddings, so they also train on token data
    (``pooling="tokens"``).

    Heads with a closed-form part (``full_data_fit``) get it fitted on every training row:
    PCBM's elastic-net layer when training starts (the optimizer then trains only what is
    left, PCBM-h's residual; plain PCBM has nothing left and its steps are skipped), the
    label-free CBM's cut-off and sparse layer when it ends (the cut-off on the validation
    rows). ``fit_report`` holds what the fit reports.

    Args:
        head: A concept head.
        head_name: Registered head type (``"label_free_cbm"``, ``"pcbm"``, ...; see
            :func:`~lightning_interp.concepts.list_heads`), built by
            :func:`~lightning_interp.concepts.create_head`.
        head_kwargs: Options of that head (fields of its config dataclass).
        concepts: Concept phrases (names only, for heads that learn their concepts), or a
            path to a ``.txt`` file of them (one a line).
        filters: Keyword arguments of :func:`~lightning_interp.concepts.filter_concepts`
            (``None``: no filtering).
        optimizer: Optimizer factory (default Adam, lr 1e-3).
        save_dir: If set, the trained head is written there (``save_pretrained``) at the
            end of training.

    Checkpoints carry the head's spec (:meth:`ConceptHead.head_spec
    <lightning_interp.concepts.ConceptHead.head_spec>`), so a head built by name is rebuilt
    by ``load_from_checkpoint`` (also with ``weights_only=True``) without the data module.
    """

    def __init__(
        self,
        head: ConceptHead | None = None,
        head_name: str | None = None,
        head_kwargs: dict[str, Any] | None = None,
        concepts: list[str] | str | None = None,
        filters: dict[str, Any] | None = None,
        optimizer: OptimizerCallable | None = None,
        save_dir: str | None = None,
    ) -> None:
        super().__init__()
        if (head is None) == (head_name is None):
            raise ConfigError("give exactly one of head (a built head) or head_name")
        self.save_hyperparameters(ignore=["head", "optimizer"])
        self.head = head
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.filter_report = None
        self.fit_report: dict[str, float] = {}
        self._metrics_built = False
        if head is not None:
            self._build_metrics()

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        """Build the head from the data module's encoder and class names, if not given."""
        if self.head is not None:
            return
        if self._trainer is None:
            # load_from_checkpoint calls this without a trainer (so without a data module):
            # on_load_checkpoint rebuilds the head from the spec the checkpoint carries.
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        name = self.hparams.head_name
        # Heads without from_bank (supervised CBM, concept transformer / slots) learn concepts:
        # they need names and a width, not phrase directions (unless filters compare them).
        directions = builds_from_bank(head_class(name)) or self.hparams.filters is not None
        needed = ("class_names", "train_embeddings") + (("text_encoder",) if directions else ())
        if datamodule is None or not all(hasattr(datamodule, a) for a in needed):
            raise ConfigError(
                f"building a head by name needs a data module with {', '.join(needed)} "
                f"(e.g. EmbeddingDataModule)"
            )
        # Lightning has run datamodule.setup("fit") before configure_model.
        class_names = list(datamodule.class_names)
        if not directions:
            self.head = self._learned_concepts_head(datamodule, class_names)
        elif getattr(datamodule, "tokens", False):
            raise ConfigError(
                f"head {name!r} (or concept filters) compares concept phrases with pooled "
                f"embeddings; pooling='tokens' serves heads that learn their concepts "
                f"(concept_transformer, concept_slots, supervised_cbm) without filters"
            )
        else:
            encoder = datamodule.text_encoder()
            phrases = load_phrases(self.hparams.concepts or [])
            bank = ConceptBank.from_phrases(phrases, encoder)
            if self.hparams.filters is not None:
                x, _ = datamodule.train_embeddings()
                kwargs = {"class_names": class_names, "encoder": encoder, "embeddings": x}
                filters = {**kwargs, **self.hparams.filters}
                bank, self.filter_report = filter_concepts(bank, **filters)
            self.head = create_head(
                name, class_names=class_names, bank=bank, **(self.hparams.head_kwargs or {})
            )
        # The backbone the embeddings came from names the card's base_model when published.
        source = activation_source(datamodule)
        backbone = source.provenance.get("backbone") if source is not None else None
        if isinstance(backbone, str):
            self.head.provenance["backbone"] = backbone
        self._build_metrics()

    def _learned_concepts_head(self, datamodule: Any, class_names: list[str]) -> ConceptHead:
        """A head whose concepts are learned: names from ``concepts`` (or ``concept_i``)."""
        names = load_phrases(self.hparams.concepts or [])
        # Prototype heads name their prototypes per class when no names are given.
        default_names = getattr(head_class(self.hparams.head_name), "default_concept_names", None)
        if not names and default_names is not None:
            names = default_names(class_names, **(self.hparams.head_kwargs or {}))
        labelled = getattr(datamodule, "concept_count", None)
        if not names and labelled:
            names = [f"concept_{i}" for i in range(labelled)]
        if not names:
            raise ConfigError(
                f"head {self.hparams.head_name!r} learns one unit per concept: give concept "
                f"names (concepts=[...] or a .txt file), or data with concept labels"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"concept names must be unique, got {names}")
        if labelled is not None and labelled != len(names):
            raise ShapeMismatchError(
                f"the data label {labelled} concepts per input but {len(names)} concept names "
                f"were given; give one name per labelled concept, in order"
            )
        x, _ = datamodule.train_embeddings()
        return create_head(
            self.hparams.head_name,
            class_names=class_names,
            d_in=x.shape[-1],
            concept_names=names,
            **(self.hparams.head_kwargs or {}),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the built head's spec (type, width, names, config) beside its weights.

        A head built by name depends on the data module's encoder and the concept filters;
        the spec (plain JSON types, so ``weights_only=True`` loading works) lets
        :meth:`load_from_checkpoint` rebuild it without them.
        """
        if self.head is not None:
            checkpoint[HEAD_SPEC_KEY] = self.head.head_spec()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild a head built by name from the checkpoint's spec (weights load after).

        Tensors saved by earlier versions of the head are upgraded in place first
        (:meth:`ConceptHead.upgrade_state <lightning_interp.concepts.ConceptHead.upgrade_state>`).
        """
        if self.head is None:
            self._rebuild_head(checkpoint)
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = self.head.upgrade_state(
                dict(checkpoint["state_dict"]), prefix="head."
            )

    def _rebuild_head(self, checkpoint: dict[str, Any]) -> None:
        spec = checkpoint.get(HEAD_SPEC_KEY)
        if spec is None:
            raise ConfigError(
                "this checkpoint holds no concept head spec (it predates them), so the head "
                "built by name cannot be rebuilt; pass a built head: "
                "ConceptBottleneckModule.load_from_checkpoint(path, head=..., head_name=None)"
            )
        self.head = build_head(spec, "the checkpoint's concept head spec")
        self._build_metrics()

    def _build_metrics(self) -> None:
        if self._metrics_built:
            return
        head = self.head
        for stage in ("val", "test"):
            setattr(
                self, f"{stage}_accuracy", MulticlassAccuracy(head.num_classes, average="micro")
            )
            setattr(self, f"{stage}_concept_accuracy", ConceptAccuracy())
            setattr(self, f"{stage}_concept_auroc", ConceptAUROC())
        self._metrics_built = True

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.head.parameters() if p.requires_grad] if self.head else []

    @property
    def automatic_optimization(self) -> bool:
        """Off for heads with nothing to train (plain PCBM, classification by description).

        Their steps then do nothing, quietly (no optimizer, no skipped-step warning), and
        validation runs as usual.
        """
        return self.head is None or bool(self._trainable())

    def configure_optimizers(self) -> torch.optim.Optimizer | list:
        """The optimizer over the head's trainable parameters (none: ``[]``)."""
        params = self._trainable()
        return self.optimizer_factory(params) if params else []

    # ------------------------------------------------------------------ steps
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Any:
        """The head's :class:`~lightning_interp.concepts.HeadOutput`."""
        return self.head(x, mask=mask)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """One step of the head's own training loss (``None``: the head has nothing to train)."""
        b = split_concept_batch(batch)
        terms = self.head.training_loss(b.x, b.y, b.concepts, epoch=self.current_epoch, mask=b.mask)
        logged = {k: v.detach().float() for k, v in terms.items() if v is not None}
        self.log_dict({f"train/{k}": v for k, v in logged.items()})
        if terms["loss"] is not None:
            self.log("loss", logged["loss"], prog_bar=True, logger=False)
        return terms["loss"]

    def on_train_start(self) -> None:
        """Closed-form fits that the optimizer's training builds on (PCBM's sparse layer)."""
        if self.head.full_data_fit == "before":
            self._fit_full_data()

    def on_train_epoch_start(self) -> None:
        """Steps a staged head takes between epochs (ProtoPNet's push onto training patches)."""
        self._between_epochs(final=False)

    def _between_epochs(self, final: bool) -> None:
        step = getattr(self.head, "between_epochs", None)
        if step is not None:
            self.fit_report.update(step(self.current_epoch, self._ordered_rows, final=final))

    def _ordered_rows(self) -> Any:
        """The training rows once, in dataset order, as ``(x, y, mask)`` (on every rank)."""
        loader = self.trainer.train_dataloader
        loader = loader[0] if isinstance(loader, Sequence) else loader
        ordered = DataLoader(
            loader.dataset, batch_size=loader.batch_size or 256, collate_fn=loader.collate_fn
        )
        for batch in ordered:
            b = split_concept_batch(batch)
            yield b.x.to(self.device), b.y.to(self.device), b.mask

    def on_train_end(self) -> None:
        """Closed-form fits on all training rows (the label-free CBM's sparse layer)."""
        self._between_epochs(final=True)
        if self.head.full_data_fit == "after":
            self._fit_full_data()
        if self.hparams.save_dir and self.trainer.is_global_zero:
            self.head.save_pretrained(Path(self.hparams.save_dir))

    def _fit_full_data(self) -> None:
        x, y = self._all_rows("train")
        val = self._all_rows("val") if self.head.full_data_fit_reads_val else None
        self.fit_report = self.head.fit_full_data(x, y, val)

    def _all_rows(self, split: str) -> tuple[Tensor, Tensor] | None:
        """Every row of ``split`` once, on every rank (the same closed-form fit everywhere).

        A data module that holds its training rows (``train_embeddings()``) gives them
        directly; otherwise the split's loader is read again and, under DDP, gathered from
        all ranks. ``None`` when there is no such loader (no validation data).
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if split == "train" and datamodule is not None and hasattr(datamodule, "train_embeddings"):
            x, y = datamodule.train_embeddings()
            return x.to(self.device).float(), y.to(self.device).long()
        loader = self._loader(split)
        if loader is None:
            return None
        xs, ys = [], []
        for batch in loader:
            b = split_concept_batch(batch)
            xs.append(b.x.to(self.device))
            ys.append(b.y.to(self.device))
        if not xs:
            return None
        x, y = torch.cat(xs), torch.cat(ys)
        if self.trainer.world_size > 1:  # every rank fits on all rows: same layer everywhere
            x = self.all_gather(x).flatten(0, 1)
            y = self.all_gather(y).flatten(0, 1)
        return x.float(), y

    def _loader(self, split: str) -> Any:
        """The trainer's loader of ``split`` (the first, if several), or ``None``."""
        if split == "train":
            return self.trainer.train_dataloader
        loaders = self.trainer.val_dataloaders
        if loaders is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or self.trainer.limit_val_batches == 0:
                return None
            try:
                loaders = datamodule.val_dataloader()
            except (MisconfigurationException, ConfigError):  # no validation split
                return None
        if isinstance(loaders, Sequence):
            return loaders[0] if loaders else None
        if isinstance(loaders, Mapping):
            return next(iter(loaders.values()), None)
        return loaders

    def _evaluate(self, batch: Any, stage: str) -> None:
        b = split_concept_batch(batch)
        out = self.head(b.x, mask=b.mask)
        accuracy = getattr(self, f"{stage}_accuracy")
        accuracy(out.logits.float(), b.y)
        self.log(f"{stage}/accuracy", accuracy, prog_bar=stage == "val")
        if b.concepts is not None and out.concept_logits is not None:
            probs = torch.sigmoid(out.concept_logits.float())
            for name in ("concept_accuracy", "concept_auroc"):
                metric = getattr(self, f"{stage}_{name}")
                metric(probs, b.concepts)
                self.log(f"{stage}/{name}", metric)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Task accuracy (and concept accuracy / AUROC when concepts are labelled)."""
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """As :meth:`validation_step`, logged under ``test/``."""
        self._evaluate(batch, "test")
