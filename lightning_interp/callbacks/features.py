"""Read what a fit learned: a feature store and a browsable dashboard at the end of ``fit``.

:class:`FeatureDashboard` runs :func:`~lightning_interp.features.build.build_feature_store`
over the run's own backbone and text (or
:func:`~lightning_interp.features.build_images.build_image_feature_store` over its images,
for a vision tower), then
:func:`~lightning_interp.features.dashboard.build_dashboard`, so a training run ends with
``index.html`` to open, as SAEDashboard does after SAELens training. Everything it reads
comes from the data module's :class:`~lightning_interp.data.source.ActivationSource`
contract (backbone, provenance) and the dictionary's own provenance (its site), never from
a data module's private settings.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import lightning as L

from lightning_interp.callbacks.export import learner_folders
from lightning_interp.data.lm_datamodule import load_texts
from lightning_interp.data.source import activation_source
from lightning_interp.errors import ConfigError
from lightning_interp.features.build import Corpus, build_feature_store
from lightning_interp.features.build_images import ImageSet, build_image_feature_store
from lightning_interp.features.build_multimodal import (
    build_multimodal_feature_store,
    training_sequences,
)
from lightning_interp.features.dashboard import build_dashboard
from lightning_interp.features.store import FeatureSettings

STORE_FOLDER = "features"
DASHBOARD_FOLDER = "dashboard"


class FeatureDashboard(L.Callback):
    """At the end of fit, build each dictionary's feature store and its HTML dashboard.

    On global rank 0, after the fit (and after :class:`ExportDictionary` when listed
    before it), each trained dictionary in its inference form (BatchTopK as JumpReLU, an
    activation scale the training data applied folded into the weights, as the export
    saves it) makes one pass over the first ``tokens`` kept tokens of the run's text,
    through the data module's frozen backbone, with special tokens left out as in
    training. It writes ``<dirpath>/features/`` (the store; see
    :mod:`lightning_interp.features`) and ``<dirpath>/dashboard/`` (static HTML), and
    prints ``dashboard: <absolute path>/index.html``. A multi-dictionary run writes the
    same under ``<dirpath>/<name>/`` for each dictionary.

    The pass runs after training and on copies of the dictionaries, so the weights, the
    metrics and the export are those of the same fit without this callback. A store or
    dashboard left in the folder by an earlier fit is replaced (the folder is guarded by
    :class:`~lightning_interp.callbacks.ExportDictionary`, which refuses another run's).

    Args:
        tokens: Kept tokens the feature pass reads (~270 tokens/s for SmolLM2-135M on
            2 CPU cores).
        top_k: Top-activating contexts kept per latent.
        window: Tokens per context window.
        dirpath: Output folder. Default: the trainer's ``default_root_dir``.
        latents: Render only latents ``0 .. latents-1`` in the dashboard (default: all;
            the store always holds every latent).
        contexts_per_capture: Contexts per backbone forward.
        images: With a data module serving a vision tower (a ``vision.*`` site, e.g.
            :class:`~lightning_interp.data.VisionModelDataModule`) or a multimodal LLM's
            (image, caption) sequences (:class:`~lightning_interp.data.ImageTextDataModule`):
            the images the pass reads, first ones first (instead of ``tokens``; an example
            is a whole image or sequence, see :mod:`~lightning_interp.features.build_images`
            and :mod:`~lightning_interp.features.build_multimodal`).

    Raises:
        ConfigError: a value is not positive; or, at fit start, the data module holds no
            backbone (an activation cache), or one without a tokenizer that does not serve a
            vision site.
    """

    def __init__(
        self,
        tokens: int = 16_384,
        top_k: int = 20,
        window: int = 32,
        dirpath: str | None = None,
        latents: int | None = None,
        contexts_per_capture: int = 8,
        images: int = 256,
    ) -> None:
        for name, value in (
            ("tokens", tokens),
            ("images", images),
            ("top_k", top_k),
            ("window", window),
            ("latents", latents),
            ("contexts_per_capture", contexts_per_capture),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"FeatureDashboard's {name} must be positive, got {value}")
        self.tokens, self.top_k, self.window = tokens, top_k, window
        self.dirpath, self.latents = dirpath, latents
        self.contexts_per_capture, self.images = contexts_per_capture, images

    def output_dir(self, trainer: L.Trainer) -> Path:
        """The output folder of this run (``dirpath``, else ``trainer.default_root_dir``)."""
        return Path(self.dirpath if self.dirpath is not None else trainer.default_root_dir)

    def _source(self, trainer: L.Trainer) -> Any:
        source = activation_source(trainer.datamodule)
        backbone = None if source is None else source.backbone
        if backbone is None or (
            getattr(backbone, "tokenizer", None) is None and not _serves_images(source)
        ):
            raise ConfigError(
                "FeatureDashboard needs a data module that runs a language model over text "
                "(LanguageModelDataModule) or a vision tower over images; this run's has "
                "neither. Remove the callback, or build a store later with `lightning-interp "
                "features`"
            )
        if _serves_sequences(trainer.datamodule) and (
            source.sites[0].startswith("vision.") or source.sites[0] == "projector"
        ):
            raise ConfigError(
                f"FeatureDashboard reads (image, caption) sequences at language-model sites "
                f"only, not {source.sites[0]!r}; remove the callback, or train at a "
                f"layers.* site"
            )
        return source

    def _pass(self, source: Any, datamodule: Any) -> Any:
        """``build(dictionary, out, site, name)``: the feature pass over this run's data."""
        provenance = source.provenance
        if _serves_sequences(datamodule):  # a multimodal LLM: (image, caption) sequences

            def run_sequences(dictionary: Any, out: Path, site: str, name: str) -> Path:
                return build_multimodal_feature_store(
                    dictionary,
                    training_sequences(datamodule),
                    out,
                    max_images=self.images,
                    settings=FeatureSettings(top_k=self.top_k),
                    source=name,
                    checkpoint_every=0,
                )

            return run_sequences
        if _serves_images(source):
            data: Any = ImageSet.from_provenance(provenance, max_images=self.images)
            build, settings = build_image_feature_store, FeatureSettings(top_k=self.top_k)
        else:
            text = provenance["extra"]["dataset_source"]
            data = Corpus(
                texts=load_texts(text),
                name=text,
                context_size=provenance.get("context_size") or 128,
                contexts_per_capture=self.contexts_per_capture,
                max_tokens=self.tokens,
            )
            build = build_feature_store
            settings = FeatureSettings(top_k=self.top_k, window=self.window)

        def run(dictionary: Any, out: Path, site: str, name: str) -> Path:
            return build(
                dictionary,
                source.backbone,
                data,
                out,
                site=site,
                settings=settings,
                source=name,
                checkpoint_every=0,
            )

        return run

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse, before training, a run whose data cannot feed a feature pass."""
        self._source(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Build the stores and dashboards (global rank 0 only) and print their paths."""
        if not trainer.is_global_zero:
            return
        source = self._source(trainer)
        build = self._pass(source, trainer.datamodule)
        folders = learner_folders(self.output_dir(trainer), pl_module)
        for name, learner in pl_module.named_learners():
            # A copy in the form the export saves: training goes on untouched.
            dictionary = learner.dictionary.to_inference().with_scale_folded()
            site = dictionary.config.provenance.site or source.sites[0]
            folder = folders[name]
            store = _replace_store(
                folder / STORE_FOLDER,
                # str(f / "dictionary"): where ExportDictionary saves it
                lambda out, d=dictionary, s=site, f=folder: build(d, out, s, str(f / "dictionary")),
            )
            index = build_dashboard(store, folder / DASHBOARD_FOLDER, latents=self.latents)
            print(f"features: {store.resolve()}")
            print(f"dashboard: {index.resolve()}")


def _serves_sequences(datamodule: Any) -> bool:
    """Whether the data module reads (image, caption) sequences of a multimodal LLM."""
    return hasattr(getattr(datamodule, "train_set", None), "capture_with_positions")


def _serves_images(source: Any) -> bool:
    """Whether the source serves a vision tower's site (CLIP images, not text)."""
    return source.sites[0].startswith("vision.")


def _replace_store(out: Path, build: Any) -> Path:
    """Build a store beside ``out`` under a temporary name, then move it to ``out``.

    A failed pass leaves an earlier store as it was; a finished one replaces it.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    try:
        build(building)
        if out.exists():
            shutil.rmtree(out)
        os.replace(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(Path(f"{building}.partial"), ignore_errors=True)
    return out
