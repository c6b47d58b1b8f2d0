"""SpliceDictionary: your validation metrics with a dictionary spliced into your model.

Mechanism: after Lightning runs your ``validation_step`` (or ``test_step``) on a batch,
``on_validation_batch_end`` runs it once more through the same strategy call Lightning
uses (same precision context, same DDP wrapper, same ``inference_mode``), with a forward
hook replacing the site's activation. During that second call ``self.log`` prefixes every
name (``val_loss`` becomes ``spliced/val_loss``), and torchmetrics ``Metric`` attributes of
your module are swapped for private twins, so the clean metric objects never see spliced
predictions. Your own logging code thus yields both numbers side by side, aggregated the
way you asked for the clean ones. State your ``validation_step`` keeps outside logged
values and Metric attributes (e.g. a list of outputs) sees both calls.

Devices and dtypes: the dictionary is moved to the device of your model when validation
or testing starts (its dtype is kept), and every splice moves the site's activation to the
dictionary's device and dtype and the result back to the activation's, so a float64
dictionary splices into a float32 model and a dictionary left on the CPU into a CUDA one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer import call
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_interp.backbones.devices import follow_module
from lightning_interp.backbones.hooks import add_writer
from lightning_interp.backbones.sites import Site
from lightning_interp.callbacks.module_sites import resolve_module_sites
from lightning_interp.callbacks.probe import DictionaryProbe
from lightning_interp.dictionaries import Dictionary
from lightning_interp.errors import ConfigError
from lightning_interp.zoo import load_dictionary

Mode = Literal["reconstruct", "identity", "zero", "ablate", "steer"]
MODES = ("reconstruct", "identity", "zero", "ablate", "steer")


def splice_function(
    mode: str, dictionary: Dictionary | None, latents: list[int], scale: float
) -> Callable[[Tensor], Tensor]:
    """The map from a site's activation to what replaces it.

    ``reconstruct``: the dictionary's reconstruction. ``identity``: unchanged (a control).
    ``zero``: zeros. ``ablate``: remove the chosen latents' contribution,
    ``x - codes[:, ids] @ W_dec[ids]`` (the reconstruction error stays in). ``steer``: add
    ``scale * W_dec[i]`` for each chosen latent. The dictionary's arithmetic runs on its
    device and in its dtype; the result has the activation's
    (:func:`~lightning_interp.backbones.devices.follow_module`).

    Example:
        >>> from lightning_interp import create_dictionary
        >>> sae = create_dictionary("topk", d_in=4, d_latent=8, k=2, dtype="float64")
        >>> splice_function("reconstruct", sae, [], 1.0)(torch.ones(3, 4)).dtype
        torch.float32
    """
    if mode == "identity":
        return lambda x: x
    if mode == "zero":
        return torch.zeros_like
    assert dictionary is not None
    ids = torch.tensor(latents, dtype=torch.long, device=dictionary.device)
    if mode == "reconstruct":
        return follow_module(dictionary)
    if mode == "ablate":
        return follow_module(
            lambda x: x - dictionary.encode(x)[..., ids] @ dictionary.W_dec[ids], dictionary
        )
    return follow_module(lambda x: x + scale * dictionary.W_dec[ids].sum(0), dictionary)


def _metric_slots(module: nn.Module) -> Iterator[tuple[nn.Module, str, Metric, str]]:
    """``(parent, attribute, metric, path)`` of every top-level Metric in ``module``."""
    for parent_path, parent in module.named_modules():
        if isinstance(parent, Metric):
            continue
        for name, child in parent._modules.items():
            if isinstance(child, Metric):
                yield parent, name, child, f"{parent_path}.{name}" if parent_path else name


class SpliceDictionary(L.Callback):
    """Log your validation/test metrics again with a site's activation replaced.

    Args:
        dictionary: A :class:`Dictionary`; a folder (or other source) for
            :func:`lightning_interp.load_dictionary`; or a site name of a
            :class:`DictionaryProbe` in the same Trainer (its live dictionary is used).
            Not needed for ``identity`` and ``zero``.
        site: Where to splice (module path, glob matching one site, or canonical name).
            Default: the probe's site, or the dictionary's ``provenance.site``.
        mode: ``reconstruct`` (default), ``identity``, ``zero``, ``ablate`` or ``steer``.
        latents: Latent ids to ablate or steer along.
        scale: Steering strength (multiplies each chosen decoder row).
        prefix: Spliced metrics are logged as ``<prefix>/<your name>``.

    Raises:
        ConfigError: unknown mode, missing latents, or no way to tell the site.
    """

    def __init__(
        self,
        dictionary: Dictionary | str | None = None,
        site: str | None = None,
        mode: Mode = "reconstruct",
        latents: list[int] | None = None,
        scale: float = 1.0,
        prefix: str = "spliced",
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if mode in ("ablate", "steer") and not latents:
            raise ConfigError(f"mode {mode!r} needs latents=[ids of the latents to {mode}]")
        if mode in ("reconstruct", "ablate", "steer") and dictionary is None:
            raise ConfigError(f"mode {mode!r} needs a dictionary (object, folder or probe site)")
        self.source = dictionary
        self.site_name = site
        self.mode = mode
        self.latents = list(latents or [])
        self.scale = scale
        self.prefix = prefix
        self._site: Site | None = None
        self._dictionary: Dictionary | None = None
        self._probe: tuple[DictionaryProbe, str] | None = None
        self._twin_of: dict[int, Metric] = {}  # id of a module's metric -> its twin
        self._twin_names: dict[int, str] = {}  # id of a twin -> its log attribute name

    @property
    def dictionary(self) -> Dictionary | None:
        """The dictionary spliced in (a probe's current one when fed by a probe)."""
        if self._probe is not None:
            probe, name = self._probe
            return probe.dictionaries.get(name)
        return self._dictionary

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Find the dictionary and the site."""
        self._probe, self._dictionary = None, None
        source, site_name = self.source, self.site_name
        if isinstance(source, Dictionary):
            self._dictionary = source
        elif isinstance(source, (str, Path)):
            probe = self._find_probe(trainer, pl_module, str(source))
            if probe is not None:
                self._probe = (probe, str(source))
                site_name = site_name or str(source)
            else:
                self._dictionary = load_dictionary(source)
        if self._dictionary is not None:
            self._dictionary.eval()
            site_name = site_name or self._dictionary.config.provenance.site
        if site_name is None:
            raise ConfigError(
                "SpliceDictionary needs site=...: the dictionary records no provenance site"
            )
        sites = resolve_module_sites(pl_module, site_name)
        if len(sites) != 1:
            raise ConfigError(
                f"site {site_name!r} matches {len(sites)} sites ({[s.name for s in sites]}); "
                f"splice one at a time"
            )
        self._site = sites[0]

    @staticmethod
    def _find_probe(
        trainer: L.Trainer, pl_module: L.LightningModule, name: str
    ) -> DictionaryProbe | None:
        """The probe in this Trainer with a site called ``name`` (as given, or glob-expanded)."""
        probes = [c for c in trainer.callbacks if isinstance(c, DictionaryProbe)]  # type: ignore[attr-defined]
        for probe in probes:
            if name in probe.sites:
                return probe
        for probe in probes:
            try:
                names = [site.name for site in resolve_module_sites(pl_module, probe.sites)]
            except ConfigError:
                continue  # the probe reports its own bad sites
            if name in names:
                return probe
        return None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Place the dictionary where the model is (Lightning has placed the model by now)."""
        self._place(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Place the dictionary where the model is."""
        self._place(pl_module)

    def _place(self, pl_module: L.LightningModule) -> None:
        # A probe's dictionary is the probe's to place (it trains where the model is).
        if self._dictionary is not None and self._dictionary.device != pl_module.device:
            self._dictionary.to(pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Run ``validation_step`` again with the splice in place."""
        if not trainer.sanity_checking:
            self._rerun(trainer, pl_module, "validation_step", batch, batch_idx, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Run ``test_step`` again with the splice in place."""
        self._rerun(trainer, pl_module, "test_step", batch, batch_idx, dataloader_idx)

    def _rerun(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        hook: str,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        dictionary = self.dictionary
        if self.mode not in ("identity", "zero") and dictionary is None:
            return  # a probe that has not captured anything yet
        assert self._site is not None
        fn = splice_function(self.mode, dictionary, self.latents, self.scale)
        module = pl_module.get_submodule(self._site.module_path)
        loaders = trainer.num_val_batches if hook == "validation_step" else trainer.num_test_batches
        args = (batch, batch_idx) + ((dataloader_idx,) if len(loaders) > 1 else ())
        handle = add_writer(module, self._site, fn)
        try:
            with self._prefixed_logging(pl_module), self._metric_twins(pl_module):
                call._call_strategy_hook(trainer, hook, *args)
        finally:
            handle.remove()

    @contextmanager
    def _prefixed_logging(self, pl_module: L.LightningModule) -> Iterator[None]:
        log = type(pl_module).log
        names = self._twin_names

        def prefixed(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(value, Metric) and id(value) in names:
                kwargs.setdefault("metric_attribute", names[id(value)])
            log(pl_module, f"{self.prefix}/{name}", value, *args, **kwargs)

        # An instance attribute shadows the method; log_dict goes through self.log too.
        pl_module.log = prefixed  # type: ignore[method-assign]
        try:
            yield
        finally:
            del pl_module.log

    @contextmanager
    def _metric_twins(self, pl_module: L.LightningModule) -> Iterator[None]:
        swapped = []
        for parent, name, metric, path in list(_metric_slots(pl_module)):
            twin = self._twin_of.get(id(metric))
            if twin is None:
                twin = copy.deepcopy(metric)
                twin.reset()
                self._twin_of[id(metric)] = twin
                self._twin_names[id(twin)] = f"{path}@{self.prefix}"
            swapped.append((parent, name, metric))
            parent._modules[name] = twin
        try:
            yield
        finally:
            for parent, name, metric in swapped:
                parent._modules[name] = metric
