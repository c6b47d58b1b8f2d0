"""``lightning-interp features SOURCE --out DIR``: build a feature store from the command line.

Backbone, site, text and context size default to the dictionary's provenance (the loadable
names kept in ``provenance.extra``: ``backbone_source``, ``dataset_source``), so a
dictionary trained by a recipe needs no other flag. A vision dictionary (a ``vision.*`` site,
or ``--images``) reads whole images instead of text
(:mod:`~lightning_interp.features.build_images`); a dictionary trained through
:class:`~lightning_interp.data.ImageTextDataModule` at a language-model site (its provenance
records ``caption`` and ``token_types``) reads (image, caption) sequences
(:mod:`~lightning_interp.features.build_multimodal`). Library errors are one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lightning_interp._commands import run_command
from lightning_interp.errors import ConfigError, OutputExistsError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-interp features",
        description="One pass of a dictionary over a corpus: per-latent statistics, top and "
        "quantile-sampled contexts, logit lens and co-firing latents, as a feature store.",
    )
    parser.add_argument("source", help="dictionary: folder, org/name or zoo:<release>/<id>")
    parser.add_argument("--out", required=True, help="store folder to create")
    parser.add_argument("--tokens", type=int, help="kept tokens to read (default: all text)")
    parser.add_argument("--text", help="text source (default: the dictionary's dataset)")
    parser.add_argument("--backbone", help="model (default: the dictionary's backbone)")
    parser.add_argument("--site", help="site (default: the dictionary's site)")
    parser.add_argument("--top-k", type=int, default=20, help="top contexts per latent")
    parser.add_argument("--window", type=int, default=32, help="tokens per context window")
    parser.add_argument(
        "--context-size", type=int, help="tokens per context (default: the dictionary's, else 128)"
    )
    parser.add_argument(
        "--contexts-per-capture", type=int, default=8, help="contexts per backbone forward"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="capture batches between checkpoints to DIR.partial (0: none)",
    )
    parser.add_argument(
        "--images",
        help="images for a vision dictionary: offline:digits, a folder or hf:<dataset>[:<split>] "
        "(default: the dictionary's; a site 'vision.*' reads images without this flag)",
    )
    parser.add_argument("--max-images", type=int, help="images to read (default: all)")
    parser.add_argument(
        "--images-per-capture", type=int, default=32, help="images per backbone forward"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def resolve(dictionary: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Backbone, site, text and context size: the flags, else the dictionary's provenance.

    Raises:
        ConfigError: one of them is neither given nor recorded.
    """
    provenance = dictionary.config.provenance
    extra = provenance.extra or {}
    chosen = {
        "backbone": args.backbone or extra.get("backbone_source") or provenance.backbone,
        "site": args.site or provenance.site,
        # A vision dictionary's dataset is its images (--images).
        "text": args.text or args.images or extra.get("dataset_source") or provenance.dataset,
        "context_size": args.context_size or provenance.context_size or 128,
    }
    missing = [name for name in ("backbone", "site", "text") if not chosen[name]]
    if missing:
        flags = " ".join(f"--{name} ..." for name in missing)
        raise ConfigError(
            f"the dictionary's provenance records no {', '.join(missing)}; pass {flags}"
        )
    return chosen


def features(argv: list[str]) -> int:
    """Run ``lightning-interp features``; returns the exit code."""
    return run_command("features", _parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    from lightning_interp.backbones import load_backbone
    from lightning_interp.data.lm_datamodule import load_texts
    from lightning_interp.features.build import Corpus, build_feature_store
    from lightning_interp.features.store import FeatureSettings
    from lightning_interp.zoo.load import load_dictionary

    names = ("tokens", "top_k", "window", "context_size", "contexts_per_capture", "max_images")
    for name in (*names, "images_per_capture"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if Path(args.out).exists():  # fail before loading anything
        raise OutputExistsError(f"{args.out} exists; remove it or choose another --out")
    dictionary = load_dictionary(args.source)
    chosen = resolve(dictionary, args)
    extra = dictionary.config.provenance.extra or {}
    lm_site = not (chosen["site"].startswith("vision.") or chosen["site"] == "projector")
    multimodal = "caption" in extra and "token_types" in extra and lm_site  # ImageTextDataModule
    if multimodal or args.images or chosen["site"].startswith("vision."):
        if args.text or args.tokens:
            raise ConfigError("--text and --tokens are for text; use --images and --max-images")
        run = _run_multimodal if multimodal else _run_images
        print(run(dictionary, chosen, args))
        return 0
    backbone = load_backbone(chosen["backbone"])
    corpus = Corpus(
        texts=load_texts(chosen["text"]),
        name=chosen["text"],
        context_size=chosen["context_size"],
        contexts_per_capture=args.contexts_per_capture,
        max_tokens=args.tokens,
    )
    out = build_feature_store(
        dictionary,
        backbone,
        corpus,
        args.out,
        site=chosen["site"],
        settings=FeatureSettings(top_k=args.top_k, window=args.window),
        source=str(args.source),
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
    )
    print(out)
    return 0


def _run_images(dictionary: Any, chosen: dict[str, Any], args: argparse.Namespace) -> Path:
    """The image pass (a CLIP vision dictionary): whole images are the contexts."""
    from lightning_interp.backbones import load_backbone
    from lightning_interp.features.build_images import ImageSet, build_image_feature_store
    from lightning_interp.features.store import FeatureSettings

    images = ImageSet.from_provenance(
        dictionary.config.provenance,
        source=args.images,
        model=chosen["backbone"],
        max_images=args.max_images,
        images_per_capture=args.images_per_capture,
    )
    return build_image_feature_store(
        dictionary,
        load_backbone(chosen["backbone"], load_tokenizer=False),  # no processor: torch resizes
        images,
        args.out,
        site=chosen["site"],
        settings=FeatureSettings(top_k=args.top_k),
        source=str(args.source),
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
    )


def _run_multimodal(dictionary: Any, chosen: dict[str, Any], args: argparse.Namespace) -> Path:
    """The (image, caption) pass: the sequences the data module trained on are the contexts."""
    from lightning_interp.data import ImageTextDataModule
    from lightning_interp.features.build_multimodal import (
        build_multimodal_feature_store,
        training_sequences,
    )
    from lightning_interp.features.store import FeatureSettings

    extra = dictionary.config.provenance.extra
    data = ImageTextDataModule(
        chosen["backbone"],
        chosen["site"],
        images=chosen["text"],
        caption=extra["caption"],
        token_types=extra["token_types"],
        image_size=extra.get("image_size"),
        images_per_capture=args.images_per_capture,
    )
    data.setup()
    return build_multimodal_feature_store(
        dictionary,
        training_sequences(data),
        args.out,
        name=chosen["text"],
        max_images=args.max_images,
        settings=FeatureSettings(top_k=args.top_k),
        source=str(args.source),
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
    )
