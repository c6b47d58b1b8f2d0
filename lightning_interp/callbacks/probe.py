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
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_interp.backbones.hooks import add_reader
from lightning_interp.backbones.sites import Site, UnknownSiteError
from lightning_interp.callbacks.module_sites import resolve_module_sites
from lightning_interp.callbacks.site_trainer import SiteTrainer
from lightning_interp.data import sharding
from lightning_interp.dictionaries import Dictionary, create_dictionary, get_dictionary_class
from lightning_interp.errors import ConfigError, ShapeMismatchError

STATE_VERSION = 1


def site_folder(name: str) -> str:
    """A folder name for a site (``model.h.1:input`` becomes ``model.h.1-input``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


# What differs between DDP ranks in a site's state: each rank buffers its own activations.
RANK_KEYS = ("buffer_rows", "buffer_state", "rows_buffered")


def gather_rank_buffers(sites: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Under DDP, replace each site's buffer by every rank's (under ``"ranks"``).

    Only rank 0 writes the checkpoint, but the dictionaries are identical on every rank
    and the buffers are not; every rank calls ``state_dict`` while a checkpoint is
    dumped, so this collective is matched.
    """
    rank, ranks = sharding.world()
    if ranks == 1:
        return sites
    local = {name: {key: state[key] for key in RANK_KEYS} for name, state in sites.items()}
    gathered: list[Any] = [None] * ranks
    torch.distributed.all_gather_object(gathered, local)
    return {
        name: {
            **{k: v for k, v in state.items() if k not in RANK_KEYS},
            "ranks": [g[name] for g in gathered],
        }
        for name, state in sites.items()
    }


def own_rank_buffer(state: dict[str, Any]) -> dict[str, Any]:
    """The calling rank's view of a site state saved by :func:`gather_rank_buffers`."""
    if "ranks" not in state:
        return state
    rank, ranks = sharding.world()
    if len(state["ranks"]) != ranks:
        raise ConfigError(
            f"the checkpoint holds probe buffers of {len(state['ranks'])} DDP ranks but this "
            f"run has {ranks}; resume with the same number of devices"
        )
    shared = {k: v for k, v in state.items() if k != "ranks"}
    return {**shared, **state["ranks"][rank]}


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
        expansion_factor: ``d_latent = expansion_factor * d_in`` (default 8 when neither
            is given).
        k: Active latents per row (TopK family).
        d_in: Expected activation width; checked against the first activations.
        dictionary_kwargs: Further fields of the architecture's config
            (``l1_coefficient``, ``aux_k``, ``b_dec_init``, ...).
        lr: Adam learning rate of the dictionaries.
        batch_size: Activation rows per dictionary step.
        buffer_size: Rows buffered (and shuffled) before a step; default ``4 * batch_size``.
        train_every_n_steps: Capture activations on every n-th training batch only.
        max_tokens: Stop capturing once a dictionary has trained on this many rows (all
            ranks together).
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
        >>> probe = DictionaryProbe("net.0", d_latent=64, k=4)
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
        lr: float = 1e-3,
        batch_size: int = 1024,
        buffer_size: int | None = None,
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
        for name, value in (
            ("batch_size", batch_size),
            ("train_every_n_steps", train_every_n_steps),
            ("dead_tokens_threshold", dead_tokens_threshold),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if buffer_size is not None and buffer_size < batch_size:
            raise ConfigError(f"buffer_size ({buffer_size}) must be >= batch_size ({batch_size})")
        if lr <= 0:
            raise ConfigError(f"lr must be > 0, got {lr}")
        self.sites = [sites] if isinstance(sites, str) else list(sites)
        self.architecture = architecture
        self.d_latent = d_latent
        self.expansion_factor = expansion_factor
        self.k = k
        self.d_in = d_in
        self.dictionary_kwargs = dict(dictionary_kwargs or {})
        self.lr = lr
        self.batch_size = batch_size
        self.buffer_size = buffer_size or 4 * batch_size
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
            folder = Path(dirpath) / site_folder(name)
            dictionary.save_pretrained(folder)
            folders.append(folder)
        return folders

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the sites and register the reading hooks.

        A module that builds its layers in ``configure_model`` (which Lightning calls after
        ``setup``) gets its hooks in ``on_fit_start`` instead.
        """
        if stage != "fit":
            return
        self._owner = type(pl_module).__name__
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
        for site_trainer in self.trainers.values():
            site_trainer.to(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Decide whether this batch's activations are captured."""
        self.batches_seen += 1
        done = (
            self.max_tokens is not None
            and bool(self.trainers)
            and all(int(t.learner.tokens_seen) >= self.max_tokens for t in self.trainers.values())
        )
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
        """Train each dictionary while its buffer is full, then log the last step."""
        self._capturing, self._mask = False, None
        world_size = trainer.world_size

        def reduce(tensor: Tensor, op: str) -> Tensor:
            return trainer.strategy.reduce(tensor, reduce_op=op)

        for name, site_trainer in self.trainers.items():
            logged = None
            while self._all_ready(site_trainer, reduce, world_size):
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
        """Save (rank 0) and publish the dictionaries if asked."""
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
            raise ConfigError(
                f"probe state version {state_dict.get('version')!r} is not {STATE_VERSION}; "
                f"it was saved by another lightning-interp release"
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
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

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
            site_trainer = self._create(site, rows.shape[-1], rows.device)
        if rows.shape[0]:
            site_trainer.add(rows)

    def _create(self, site: Site, width: int, device: torch.device) -> SiteTrainer:
        if self.d_in is not None and width != self.d_in:
            raise ShapeMismatchError(
                f"site {site.name!r} ({site.module_path}:{site.direction}) gives activations "
                f"of width {width}, but the probe was configured with d_in={self.d_in}; fix "
                f"d_in or choose the site whose width is {self.d_in}"
            )
        d_latent = self.d_latent or (self.expansion_factor or 8) * width
        kwargs: dict[str, Any] = {**self.dictionary_kwargs, "d_in": width, "d_latent": d_latent}
        if self.k is not None:
            kwargs["k"] = self.k
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
            lr=self.lr,
            batch_size=self.batch_size,
            buffer_size=self.buffer_size,
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
