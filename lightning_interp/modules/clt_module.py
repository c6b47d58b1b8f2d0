"""The LightningModule that trains a cross-layer transcoder from one backbone pass per batch.

Every data module here yields batches keyed by site; a CLT over ``n_layers`` reads
``layers.{l}.mlp_in`` and reconstructs ``layers.{l}.mlp_out`` for every layer from the same
batch, so the backbone runs once per step for all layers. The schedule, the non-finite
policy, the skipped-step mechanics and checkpoint checks are those of
:class:`~lightning_interp.modules.training_module.DictionaryTrainingModule`, reused as
functions (a CLT is not one :class:`~lightning_interp.dictionaries.Dictionary` per learner,
so the class itself does not fit); Lightning's ``precision`` applies as to any module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_interp.circuits.clt import CrossLayerTranscoder
from lightning_interp.circuits.clt_config import CLTConfig
from lightning_interp.data.source import activation_source
from lightning_interp.errors import CheckpointError, ConfigError, ShapeMismatchError
from lightning_interp.metrics import FractionOfVarianceUnexplained
from lightning_interp.modules.checkpoints import install_checkpoint_checks, spec_differences
from lightning_interp.modules.guards import BatchGuard, NonFinitePolicy
from lightning_interp.modules.training_module import DictionaryTrainingModule

_Base = DictionaryTrainingModule

# Config fields a run fills from its data rather than choosing: the backbone (provenance) at
# setup, the scales when training starts, so after Lightning has loaded the checkpoint.
_FILLED_BY_DATA = frozenset({"architecture", "backbone", "input_scales", "output_scales"})


def _resume_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """A CLT config as :func:`spec_differences` compares dictionary specs.

    Sites and widths are compared resolved, so ``d_latent: 8`` matches ``[8, 8, 8]`` and
    unset sites match the default ones written out.
    """
    resolved = CLTConfig.from_dict(dict(config))
    inputs, outputs = resolved.sites()
    values = {k: v for k, v in config.items() if k not in _FILLED_BY_DATA}
    values.update(d_latent=resolved.widths, input_sites=inputs, output_sites=outputs)
    return {"class_path": CrossLayerTranscoder.__name__, "init_args": {"config": values}}


class CrossLayerTranscoderModule(L.LightningModule):
    """Trains a :class:`~lightning_interp.circuits.CrossLayerTranscoder` with Lightning.

    Args:
        clt: The CLT's config; ``d_in``/``d_out`` may be left out (taken from the data
            module's site widths at setup, as the dictionary modules do).
        optimizer: Optimizer callable (default: Adam, lr 2e-4).
        lr_scheduler: Scheduler callable (replaces the built-in warm-up/decay).
        warmup_steps: Linear learning-rate warm-up steps.
        decay_fraction: Share of the run over which the learning rate decays to zero.
        sparsity_warmup_steps: Steps over which the JumpReLU penalty ramps up.
        dead_tokens_threshold: Tokens without firing after which a feature is dead (AuxK,
            pre-activation loss, ``train/dead_fraction``).
        on_nonfinite: ``"raise"`` or ``"skip"`` for NaN/Inf batches or losses (see
            :class:`~lightning_interp.modules.DictionaryModule`).
        export_dir: Folder under ``trainer.default_root_dir`` the trained CLT is saved to
            when fitting ends (``None``: not saved).

    Example:
        >>> import lightning as L, torch
        >>> config = CLTConfig(n_layers=2, d_in=8, d_latent=16, activation="topk", k=2)
        >>> module = CrossLayerTranscoderModule(config, export_dir=None)
        >>> sites = [f"layers.{i}.mlp_{k}" for i in range(2) for k in ("in", "out")]
        >>> rows = [{site: torch.randn(8) for site in sites} for _ in range(96)]
        >>> loader = torch.utils.data.DataLoader(rows, batch_size=32)  # {site: [32, 8]}
        >>> L.Trainer(max_steps=3, logger=False, enable_checkpointing=False,
        ...           enable_progress_bar=False, enable_model_summary=False).fit(module, loader)
        >>> module.clt.n_layers
        2
    """

    def __init__(
        self,
        clt: CLTConfig,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
        decay_fraction: float = 0.0,
        sparsity_warmup_steps: int = 0,
        dead_tokens_threshold: int = 10_000_000,
        on_nonfinite: NonFinitePolicy = "raise",
        export_dir: str | None = "clt",
    ) -> None:
        super().__init__()
        if isinstance(clt, dict):
            clt = CLTConfig.from_dict(clt)
        if not 0.0 <= decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
        if warmup_steps < 0 or sparsity_warmup_steps < 0 or dead_tokens_threshold <= 0:
            raise ConfigError(
                "warmup_steps and sparsity_warmup_steps must be >= 0, dead_tokens_threshold > 0"
            )
        self.config = clt
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=2e-4)
        self.lr_scheduler_factory = lr_scheduler
        self.warmup_steps, self.decay_fraction = warmup_steps, decay_fraction
        self.sparsity_warmup_steps = sparsity_warmup_steps
        self.dead_tokens_threshold = dead_tokens_threshold
        self.export_dir = export_dir
        self.guard = BatchGuard(on_nonfinite, any_rank=self._any_rank, announce=self.print)
        self._discard_gradients = False
        self.clt: CrossLayerTranscoder | None = None
        # Plain values only: checkpoints load with weights_only=True.
        self.save_hyperparameters(ignore=["clt", "optimizer", "lr_scheduler"])
        if clt.d_in is not None:
            self._build(clt)
        self.hparams["clt"] = clt.to_dict()

    def _build(self, config: CLTConfig) -> None:
        self.config = config
        self.clt = CrossLayerTranscoder(config)
        n, width = config.n_layers, max(config.widths)
        self.register_buffer("tokens_since_fired", torch.zeros(n, width, dtype=torch.long))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        d_out = config.output_width
        self.val_fvu = nn.ModuleList(
            [FractionOfVarianceUnexplained(num_features=d_out) for _ in range(n)]
        )

    # Shared with the dictionary modules: rank agreement, the skipped step, the
    # sparsity warm-up, cross-rank reduction and the optimizer/schedule construction.
    _any_rank = _Base._any_rank
    skipped_step = _Base.skipped_step
    sparsity_scale = _Base.sparsity_scale
    reduce = _Base.reduce
    configure_optimizers = _Base.configure_optimizers

    def _build_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.clt.parameters())

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        """Fill ``d_in``/``d_out`` and provenance from the data module, then build the CLT."""
        source = activation_source(self.trainer.datamodule) if self._trainer else None
        config = self.config
        if source is not None:
            widths = source.site_widths
            inputs, outputs = config.sites()
            missing = [s for s in inputs + outputs if s not in widths]
            if missing:
                raise ConfigError(
                    f"the CLT reads sites {missing[:4]} that the data module does not serve "
                    f"({sorted(widths)[:6]}...); list every layers.N.mlp_in and layers.N.mlp_out "
                    f"in data.sites, or set clt.input_sites/output_sites"
                )
            d_in, d_out = {widths[s] for s in inputs}, {widths[s] for s in outputs}
            if len(d_in) != 1 or len(d_out) != 1:
                raise ShapeMismatchError(
                    f"a CLT needs one input width and one output width, the sites give "
                    f"{sorted(d_in)} and {sorted(d_out)}"
                )
            found = {"d_in": d_in.pop(), "d_out": d_out.pop()}
            for name, value in found.items():
                given = getattr(config, name)
                if given is not None and given != value:
                    raise ShapeMismatchError(
                        f"clt.{name}={given} but the data's sites have width {value}; drop "
                        f"clt.{name} from the config (it comes from the data)"
                    )
            backbone = config.backbone or source.provenance.get("backbone")
            config = config.replace(**found, backbone=backbone)
        if self.clt is None:
            if config.d_in is None:
                raise ConfigError(
                    "clt.d_in is open and no data module implementing ActivationSource "
                    "gives it; set clt.d_in"
                )
            self._build(config)
        else:
            self.clt.config = self.config = config
        self.hparams["clt"] = config.to_dict()

    def setup(self, stage: str) -> None:
        """Report damaged checkpoint files as :class:`CheckpointError`, as the other modules."""
        install_checkpoint_checks(self.trainer)

    def on_train_start(self) -> None:
        """Record the data's per-site scales in the config (the CLT then takes raw inputs)."""
        source = activation_source(self.trainer.datamodule)
        scales = dict(source.scales) if source is not None else {}
        if not scales:
            return
        inputs, outputs = self.config.sites()
        config = self.config.replace(
            input_scales=[float(scales.get(s, 1.0)) for s in inputs],
            output_scales=[float(scales.get(s, 1.0)) for s in outputs],
        )
        self.clt.config = self.config = config
        self.hparams["clt"] = config.to_dict()

    # ------------------------------------------------------------------ steps
    def _read(self, batch: Any) -> tuple[list[Tensor], list[Tensor]]:
        inputs, outputs = self.config.sites()
        if not isinstance(batch, Mapping):
            raise ConfigError(
                f"a CLT trains on batches keyed by site ({{site: rows}}, as the data modules "
                f"yield them), got a {type(batch).__name__}"
            )
        missing = [s for s in inputs + outputs if s not in batch]
        if missing:
            raise ConfigError(
                f"the batch lacks sites {missing[:4]} the CLT reads (it holds "
                f"{sorted(batch)[:6]}); list them in the data module's sites"
            )
        return [batch[s] for s in inputs], [batch[s] for s in outputs]

    def dead_masks(self) -> list[Tensor]:
        """Per layer, features silent for ``dead_tokens_threshold`` training tokens."""
        dead = self.tokens_since_fired >= self.dead_tokens_threshold
        return [dead[layer, :width] for layer, width in enumerate(self.config.widths)]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One step on every layer; skipped (no weight moves) under ``on_nonfinite="skip"``."""
        inputs, targets = self._read(batch)
        parts = {
            f"{kind} of layer {i}": t
            for kind, ts in (("inputs", inputs), ("targets", targets))
            for i, t in enumerate(ts)
        }
        where = dict(where=type(self).__name__, step=self.global_step, batch_idx=batch_idx)
        if not self.guard.usable(parts, **where):
            return self.skipped_step()
        out = self.clt.forward_train(inputs)
        terms = self.clt.loss(
            inputs, targets, out, sparsity_scale=self.sparsity_scale(), dead_masks=self.dead_masks()
        )
        if not self.guard.usable_loss({"clt": terms["loss"]}, weights=[("clt", self.clt)], **where):
            return self.skipped_step()
        self._track_firing(out)
        fvus = torch.stack([v for k, v in terms.items() if k.startswith("fvu/")])
        logged = {f"train/{k}": v.detach() for k, v in terms.items() if not k.startswith("fvu/")}
        logged["train/fvu"] = fvus.mean()
        logged["train/l0"] = torch.stack([out.l0(i) for i in range(self.clt.n_layers)]).mean()
        logged["train/dead_fraction"] = torch.cat(self.dead_masks()).float().mean()
        self.log_dict(logged)
        self.log("loss", terms["loss"].detach(), prog_bar=True, logger=False)
        return terms["loss"]

    @torch.no_grad()
    def _track_firing(self, out: Any) -> None:
        rows = out.reconstruction.shape[0]
        for layer, width in enumerate(self.config.widths):
            fired = self.reduce(out.fired(layer, width).float(), "sum") > 0
            self.tokens_since_fired[layer, :width] += rows
            self.tokens_since_fired[layer, :width][fired] = 0
        self.tokens_seen += rows

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After a skipped batch, drop every gradient (see :meth:`skipped_step`)."""
        if self._discard_gradients:
            self._discard_gradients = False
            optimizer.zero_grad(set_to_none=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Per-layer FVU of the inference form (BatchTopK encodes at its thresholds)."""
        inputs, targets = self._read(batch)
        out = self.clt.forward_train(inputs)
        for layer, metric in enumerate(self.val_fvu):
            target = targets[layer].reshape(-1, targets[layer].shape[-1]).float()
            metric(out.reconstruction[:, layer].float(), target)
            self.log(f"val/fvu/{layer}", metric, on_step=False, on_epoch=True)
        l0 = torch.stack([out.l0(i) for i in range(self.clt.n_layers)]).mean()
        self.log("val/l0", l0, on_step=False, on_epoch=True)

    def on_train_end(self) -> None:
        """Save the trained CLT to ``<default_root_dir>/<export_dir>``."""
        if self.export_dir is not None and self.trainer.is_global_zero:
            self.clt.save(Path(self.trainer.default_root_dir) / self.export_dir)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the skipped-batch count and the (possibly data-filled) config with the run."""
        checkpoint["lightning_interp"] = {"skipped_batches": self.guard.skipped["train"]}
        checkpoint["hyper_parameters"]["clt"] = dataclasses.asdict(self.config) | {
            "architecture": "clt"
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another CLT or module; restore the skipped-batch count.

        Runs before Lightning loads the weights, so a different ``k`` or activation (same
        tensor shapes) is refused as clearly as a different width. Compared as
        :class:`~lightning_interp.modules.DictionaryModule` compares its dictionaries
        (:func:`~lightning_interp.modules.checkpoints.spec_differences`), leaving out what
        the data fills in (backbone, scales).

        Raises:
            CheckpointError: the checkpoint holds no CLT config, or another one.
        """
        source = self._trainer.ckpt_path if self._trainer is not None else None
        where = f"checkpoint {source}" if source else "the checkpoint"
        saved = (checkpoint.get("hyper_parameters") or {}).get("clt")
        if not isinstance(saved, Mapping):
            held = sorted(checkpoint.get("hyper_parameters") or {})[:6]
            raise CheckpointError(
                f"{where} was not written by a CrossLayerTranscoderModule (its "
                f"hyper-parameters hold {held}, no 'clt'); resume from a CLT run's checkpoint, "
                f"or start a new run without ckpt_path"
            )
        differences = spec_differences(_resume_spec(saved), _resume_spec(self.config.to_dict()))
        if differences:
            raise CheckpointError(
                f"{where} was written by a different CLT than this run's ("
                + "; ".join(differences)
                + "); resume with the checkpoint's settings, or start a new run without "
                "ckpt_path (CrossLayerTranscoderModule.load_from_checkpoint reads its weights)"
            )
        state = checkpoint.get("lightning_interp") or {}
        self.guard.skipped["train"] = int(state.get("skipped_batches", 0))
