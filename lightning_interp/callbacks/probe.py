"""DictionaryProbe: train a sparse dictionary on a user's model activations, as a callback.

The user's run is left exactly as it was: hooks only read detached activations, the
dictionaries train with their own optimizer after the user's step (in
``on_train_batch_end``), outside the user's autocast, and every random draw (dictionary
initialisation, buffer shuffling) uses private generators, so the global RNG stream the
user's run depends on is untouched.

Under DDP every rank buffers its own activations and all ranks step together, with the
dictionary gradients averaged across ranks (one all-reduce per step). That uses every
rank's activations (rather than one rank's share) and keeps one identical dictionary on
every rank, so any rank can splice it into validation. Ranks agree before each step that
all have a full buffer, so uneven row counts (attention-mask filtering) cannot deadlock.

Defaults follow EleutherAI's sparsify (see :mod:`~lightning_interp.callbacks.site_trainer`)
and adapt to the run: after the first batch the probe estimates the rows the run will show
it and plans batch size and row reuse for about ``min_steps`` steps; a run that still
allows fewer gets an :class:`UndertrainedProbeWarning` at the end.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_interp._io import safe_join
from lightning_interp.backbones.hooks import add_reader
from lightning_interp.backbones.sites import Site, UnknownSiteError
from lightning_interp.callbacks.module_sites import resolve_module_sites
from lightning_interp.callbacks.site_trainer import (
    DEFAULT_EXPANSION_FACTOR,
    DEFAULT_MIN_STEPS,
    SiteTrainer,
    default_k,
    default_lr,
    gather_rank_buffers,
    own_rank_buffer,
    plan_training,
    site_folder,
)
from lightning_interp.dictionaries import Dictionary, create_dictionary, get_dictionary_class
from lightning_interp.errors import CheckpointError, ConfigError, ShapeMismatchError

STATE_VERSION = 2  # 2: sites carry their training plan


class UndertrainedProbeWarning(UserWarning):
    """A probe's dictionary took fewer steps than it needs to be useful."""


def _has_field(architecture: str, name: str) -> bool:
    config_class = get_dictionary_class(architecture).config_class
    return any(f.name == name for f in dataclasses.fields(config_class))


class DictionaryProbe(L.Callback):
    """Train a sparse dictionary on activations of your own model while it trains.

    Args:
        sites: Module path(s) in your LightningModule (``"net.0"``, ``"model.transformer.h.1"``,
            ``"fc1:input"``), globs (``"net.*"``; ``*`` stays within one path component,
            ``**`` crosses them) or canonical sites of a transformers model inside it
            (``"layers.1.resid_post"``). One dictionary per resolved site.
        architecture: Registered dictionary architecture (``"topk"``, ``"batchtopk"``,
            ``"standard"``, ``"jumprelu"``, ``"gated"``).
        d_latent: Number of latents. Give this or ``expansion_factor``.
        expansion_factor: ``d_latent = expansion_factor * d_in`` (default 32 when neither
            is given, as in sparsify).
        k: Active latents per row (TopK family). Default: sparsify's 32, at most
            ``d_in // 4`` (so 16 on a 64-wide layer).
        d_in: Expected activation width; checked against the first activations.
        dictionary_kwargs: Further fields of the architecture's config
            (``l1_coefficient``, ``aux_k``, ``b_dec_init``, ``dtype``, ...).
        lr: Adam learning rate. Default: sparsify's ``2e-4 / sqrt(d_latent / 2**14)``.
        batch_size: Activation rows per dictionary step. Default: 1,024 when the run
            shows plenty of rows, smaller (down to 128) on a small run.
        buffer_size: Rows buffered (and shuffled) before a step. Default
            ``4 * batch_size``, more when rows are reused (a span of 8 user batches).
        replay: Times each captured row is trained on. Default: 1 when the run shows
            plenty of rows, up to 32 on a small run, to reach about ``min_steps`` steps.
        min_steps: Steps the automatic plan aims for; a dictionary that took fewer by the
            end of training is reported with an :class:`UndertrainedProbeWarning`.
        train_every_n_steps: Capture activations on every n-th training batch only.
        max_tokens: Stop once a dictionary has trained on this many rows (all ranks
            together, reused rows counted each time).
        mask_key: Key of a ``[batch, seq]`` mask in dict batches (``attention_mask``); rows
            where it is 0 (padding) are dropped when the activation is ``[batch, seq, d]``.
        dead_tokens_threshold: Rows without firing after which a latent counts as dead (for
            AuxK and the ``dead_fraction`` log).
        prefix: Log keys are ``<prefix>/<site>/<metric>``; also part of ``state_key``.
        dirpath: Save each dictionary here at the end of fit, in
            ``<dirpath>/<site>/`` (native format, provenance site recorded).
        push_to_hub: Hub repo id to publish the dictionaries to at the end of fit (needs
            ``lightning_interp.zoo.publish``); one sub-folder per site.
        save_buffer: Put the buffered rows in checkpoints, so a resumed run continues
            exactly as an uninterrupted one (costs ``buffer_size * d_in`` floats per site).
        seed: Seed of dictionary initialisation and shuffling (private generators).

    Example:
        >>> probe = DictionaryProbe("net.0")  # sparsify's defaults, sized to the run
        >>> probe.state_key
        "DictionaryProbe{'prefix': 'probe', 'sites': ['net.0']}"
    """

    def __init__(
        self,
        sites: str | list[str],
        architecture: str = "topk",
        d_latent: int | None = None,
        expansion_factor: int | None = None,
        k: int | None = None,
        d_in: int | None = None,
        dictionary_kwargs: dict[str, Any] | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        buffer_size: int | None = None,
        replay: int | None = None,
        min_steps: int = DEFAULT_MIN_STEPS,
        train_every_n_steps: int = 1,
        max_tokens: int | None = None,
        mask_key: str | None = "attention_mask",
        dead_tokens_threshold: int = 1_000_000,
        prefix: str = "probe",
        dirpath: str | None = None,
        push_to_hub: str | None = None,
        save_buffer: bool = True,
        seed: int = 0,
    ) -> None:
        get_dictionary_class(architecture)  # fail now on an unknown name, with suggestions
        if d_latent is not None and expansion_factor is not None:
            raise ConfigError("give d_latent or expansion_factor, not both")
        for name, value, optional in (
            ("batch_size", batch_size, True),
            ("buffer_size", buffer_size, True),
            ("replay", replay, True),
            ("d_latent", d_latent, True),
            ("expansion_factor", expansion_factor, True),
            ("k", k, True),
            ("min_steps", min_steps, False),
            ("train_every_n_steps", train_every_n_steps, False),
            ("dead_tokens_threshold", dead_tokens_threshold, False),
        ):
            if optional and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if buffer_size is not None and batch_size is not None and buffer_size < batch_size:
            raise ConfigError(f"buffer_size ({buffer_size}) must be >= batch_size ({batch_size})")
        if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(
                f"lr must be a finite number > 0 (or None for sparsify's), got {lr!r}"
            )
        self.sites = [sites] if isinstance(sites, str) else list(sites)
        self.architecture = architecture
        self.d_latent = d_latent
        self.expansion_factor = expansion_factor
        self.k = k
        self.d_in = d_in
        self.dictionary_kwargs = dict(dictionary_kwargs or {})
        self.lr = lr
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.replay = replay
        self.min_steps = min_steps
        self.train_every_n_steps = train_every_n_steps
        self.max_tokens = max_tokens
        self.mask_key = mask_key
        self.dead_tokens_threshold = dead_tokens_threshold
        self.prefix = prefix
        self.dirpath = dirpath
        self.push_to_hub = push_to_hub
        self.save_buffer = save_buffer
        self.seed = seed
        self.trainers: dict[str, SiteTrainer] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}  # last epoch's, per site
        self.batches_seen = 0
        self._resolved: list[Site] = []
        self._handles: list[RemovableHandle] = []
        self._capturing = False
        self._mask: Tensor | None = None
        self._owner = "model"
        self._device: torch.device | None = None  # the user model's, known at setup
        self._deferred = False  # hooks wait for configure_model (see setup)

    # ------------------------------------------------------------------ public API
    @property
    def state_key(self) -> str:
        """Unique per prefix and sites, so several probes checkpoint side by side."""
        return self._generate_state_key(prefix=self.prefix, sites=self.sites)

    @property
    def dictionaries(self) -> dict[str, Dictionary]:
        """Site name to its dictionary (filled at the first captured batch)."""
        return {name: trainer.dictionary for name, trainer in self.trainers.items()}

    def save(self, dirpath: str | Path) -> list[Path]:
        """Save every dictionary to ``<dirpath>/<site>/`` (native format); returns the folders."""
        folders = []
        for name, dictionary in self.dictionaries.items():
            folder = safe_join(dirpath, site_folder(name))
            dictionary.save_pretrained(folder)
            folders.append(folder)
        return folders

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the sites, register the reading hooks, note the model's device.

        Dictionaries live on ``trainer.strategy.root_device``, where Lightning places the
        model (each DDP rank on its own device). A module that builds its layers in
        ``configure_model`` (which Lightning calls after ``setup``) gets its hooks in
        ``on_fit_start`` instead.
        """
        if stage != "fit":
            return
        self._owner = type(pl_module).__name__
        self._device = trainer.strategy.root_device
        for site_trainer in self.trainers.values():
            site_trainer.to(self._device)
        try:
            self._register(pl_module)
        except UnknownSiteError:
            if not is_overridden("configure_model", pl_module, L.LightningModule):
                raise
            self._deferred = True

    def _register(self, pl_module: L.LightningModule) -> None:
        self._resolved = resolve_module_sites(pl_module, self.sites)
        self._remove_hooks()
        for site in self._resolved:
            module = pl_module.get_submodule(site.module_path)
            self._handles.append(add_reader(module, site, self._store))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Remove the hooks: the user's model is left as it was given."""
        if stage == "fit":
            self._remove_hooks()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Register deferred hooks; move restored dictionaries to the model's device."""
        if self._deferred:
            self._deferred = False
            self._register(pl_module)
        # Checkpointed probes are restored after setup, on the CPU.
        self._device = trainer.strategy.root_device
        for site_trainer in self.trainers.values():
            site_trainer.to(self._device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Decide whether this batch's activations are captured."""
        self.batches_seen += 1
        done = bool(self.trainers) and all(self._capped(t) for t in self.trainers.values())
        self._capturing = not done and (self.batches_seen - 1) % self.train_every_n_steps == 0
        mask = batch.get(self.mask_key) if isinstance(batch, Mapping) and self.mask_key else None
        self._mask = mask if isinstance(mask, Tensor) else None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Buffer the batch's rows, train while a buffer is full, then log the last step."""
        self._capturing, self._mask = False, None
        world_size = trainer.world_size

        def reduce(tensor: Tensor, op: str) -> Tensor:
            return trainer.strategy.reduce(tensor, reduce_op=op)

        self._plan_new_sites(trainer, reduce)
        for name, site_trainer in self.trainers.items():
            site_trainer.absorb()
            logged = None
            while not self._capped(site_trainer) and self._all_ready(
                site_trainer, reduce, world_size
            ):
                logged = site_trainer.step(reduce, world_size)
            if logged is not None:
                for key in ("loss", "fvu", "l0", "dead_fraction"):
                    pl_module.log(
                        f"{self.prefix}/{name}/{key}", logged[key], on_step=True, on_epoch=False
                    )
                pl_module.log(
                    f"{self.prefix}/{name}/steps", float(site_trainer.steps), on_step=True
                )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the epoch's FVU, L0 and dead fraction (torchmetrics, synced across ranks)."""
        for name, site_trainer in self.trainers.items():
            if site_trainer.metric_updates == 0:
                continue
            values = {key: float(m.compute()) for key, m in site_trainer.metrics().items()}
            for key, value in values.items():
                pl_module.log(f"{self.prefix}/{name}/epoch_{key}", value)
            values["tokens_trained"] = int(site_trainer.learner.tokens_seen)
            self.last_metrics[name] = values  # published beside the weights
            site_trainer.reset_metrics()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Warn about dictionaries that took too few steps; save (rank 0) and publish."""
        self._warn_undertrained()
        if not trainer.is_global_zero or not self.trainers:
            return
        if self.dirpath is not None:
            self.save(self.dirpath)
        if self.push_to_hub is not None:
            self._publish(self.push_to_hub)

    def state_dict(self) -> dict[str, Any]:
        """Dictionaries, optimizer states, step and dead-latent counters, buffered rows."""
        sites = {
            name: t.state_dict(include_buffer=self.save_buffer) for name, t in self.trainers.items()
        }
        return {
            "version": STATE_VERSION,
            "batches_seen": self.batches_seen,
            "sites": gather_rank_buffers(sites),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (dictionaries are rebuilt from their config)."""
        if state_dict.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"probe state version {state_dict.get('version')!r} is not {STATE_VERSION}: "
                f"another lightning-interp release saved it; resume with that release, or "
                f"give the probe another prefix= to start it afresh"
            )
        self.batches_seen = int(state_dict["batches_seen"])
        self.trainers = {}
        for name, site_state in state_dict["sites"].items():
            site_state = own_rank_buffer(site_state)
            config = dict(site_state["config"])
            site_trainer = self._new_trainer(create_kwargs=config)
            site_trainer.load_state_dict(site_state)
            self.trainers[name] = site_trainer

    # ------------------------------------------------------------------ internals
    def _warn_undertrained(self) -> None:
        if not self.trainers:
            rank_zero_warn(
                f"DictionaryProbe{self.sites} captured no activations: no training batch ran "
                f"(check max_steps, limit_train_batches and the data)",
                category=UndertrainedProbeWarning,
            )
        for name, site_trainer in self.trainers.items():
            if site_trainer.steps >= self.min_steps or self._capped(site_trainer):
                continue
            plan = site_trainer.plan
            reuse = f", each used {plan.replay} times" if plan and plan.replay > 1 else ""
            rank_zero_warn(
                f"DictionaryProbe site {name!r} took only {site_trainer.steps} steps (on "
                f"{site_trainer.rows_buffered} captured rows{reuse}); a dictionary needs about "
                f"{self.min_steps} to be useful. Train for more epochs, or pass a smaller "
                f"batch_size or a larger replay (or a lower min_steps to accept this)",
                category=UndertrainedProbeWarning,
            )

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _capped(self, site_trainer: SiteTrainer) -> bool:
        tokens = int(site_trainer.learner.tokens_seen)
        return self.max_tokens is not None and tokens >= self.max_tokens

    def _plan_new_sites(self, trainer: L.Trainer, reduce: Any) -> None:
        """Plan batch size and reuse of sites that have just seen their first rows.

        Every rank calls this at the same batch (sites are created at the first captured
        batch on all ranks), and the rows per batch are averaged across ranks, so every
        rank adopts the same plan.
        """
        new = [t for _, t in sorted(self.trainers.items()) if t.plan is None]
        if not new:
            return
        device = new[0].dictionary.device
        rows = torch.tensor([float(t.staged_rows) for t in new], device=device)
        if trainer.world_size > 1:
            rows = reduce(rows, "mean")
        batches = self._batches_left(trainer)
        for site_trainer, rows_per_batch in zip(new, rows.tolist(), strict=True):
            if rows_per_batch > 0:  # else wait for a batch with rows (all masked so far)
                site_trainer.configure(
                    plan_training(
                        rows_per_batch,
                        batches,
                        batch_size=self.batch_size,
                        replay=self.replay,
                        buffer_size=self.buffer_size,
                        min_steps=self.min_steps,
                    )
                )

    def _batches_left(self, trainer: L.Trainer) -> float:
        """Captured batches the run will still give, this one included (``inf``: unknown)."""
        accumulate = trainer.accumulate_grad_batches
        steps = float(trainer.estimated_stepping_batches)
        if steps < 0:  # an unsized iterable without max_steps: plan for plenty
            return math.inf
        # Batches before this one (a run resumed without probe state has done some).
        done = trainer.fit_loop.total_batch_idx
        left = max(steps * accumulate - done, 1.0)
        return math.ceil(left / self.train_every_n_steps) if math.isfinite(left) else left

    def _all_ready(self, site_trainer: SiteTrainer, reduce: Any, world_size: int) -> bool:
        ready = site_trainer.ready
        if world_size == 1:
            return ready
        # Every rank must take the step (its gradient all-reduce is a collective).
        flag = torch.tensor(float(ready), device=site_trainer.dictionary.device)
        return int(reduce(flag, "sum")) == world_size

    def _store(self, site: Site, activation: Tensor) -> None:
        if not self._capturing:  # validation, sanity checks, skipped batches
            return
        rows = activation.detach()
        mask = self._mask
        if mask is not None and rows.ndim == mask.ndim + 1 and rows.shape[:-1] == mask.shape:
            rows = rows[mask.to(rows.device).bool()]
        rows = rows.reshape(-1, rows.shape[-1])
        site_trainer = self.trainers.get(site.name)
        if site_trainer is None:
            site_trainer = self._create(site, rows.shape[-1], self._device or rows.device)
        if rows.shape[0]:
            site_trainer.stage(rows)

    def _create(self, site: Site, width: int, device: torch.device) -> SiteTrainer:
        if self.d_in is not None and width != self.d_in:
            raise ShapeMismatchError(
                f"site {site.name!r} ({site.module_path}:{site.direction}) gives activations "
                f"of width {width}, but the probe was configured with d_in={self.d_in}; fix "
                f"d_in or choose the site whose width is {self.d_in}"
            )
        d_latent = self.d_latent or (self.expansion_factor or DEFAULT_EXPANSION_FACTOR) * width
        kwargs: dict[str, Any] = {**self.dictionary_kwargs, "d_in": width, "d_latent": d_latent}
        if self.k is not None:
            kwargs["k"] = self.k
        elif "k" not in kwargs and _has_field(self.architecture, "k"):
            kwargs["k"] = min(default_k(width), d_latent)
        kwargs["architecture"] = self.architecture
        kwargs["provenance"] = {
            "backbone": self._owner,
            "site": site.name,
            "extra": {"module_path": site.module_path, "direction": site.direction},
        }
        site_trainer = self._new_trainer(create_kwargs=kwargs)
        site_trainer.to(device)
        self.trainers[site.name] = site_trainer
        return site_trainer

    def _new_trainer(self, create_kwargs: dict[str, Any]) -> SiteTrainer:
        kwargs = dict(create_kwargs)
        architecture = kwargs.pop("architecture")
        # Dictionary initialisation draws from the global RNG: fork it, so the user's run
        # sees the same random stream as without the probe, and seed it for reproducibility.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + len(self.trainers))
            dictionary = create_dictionary(architecture, **kwargs)
        return SiteTrainer(
            dictionary,
            lr=self.lr if self.lr is not None else default_lr(dictionary.d_latent),
            dead_tokens_threshold=self.dead_tokens_threshold,
            seed=self.seed + len(self.trainers),
        )

    def _publish(self, repo_id: str) -> None:
        try:  # optional part of the zoo, imported only when asked for
            from lightning_interp.zoo.publish import PublishItem, publish
        except ImportError as err:
            raise ConfigError(
                f"push_to_hub={repo_id!r} needs lightning_interp.zoo.publish, which this "
                f"installation lacks; save with dirpath= and upload the folders yourself"
            ) from err
        items = [
            PublishItem(site_folder(name), trainer.dictionary, self.last_metrics.get(name))
            for name, trainer in self.trainers.items()
        ]
        publish(items, repo_id)
