"""Deprecated: the embedding data module lives in :mod:`lightning_interp.data.embedding_datamodule`.

Its names resolve from here for one release, with a deprecation warning.
"""

from lightning_interp.data.renamed import moved_names

__getattr__ = moved_names(
    __name__,
    {
        name: f"lightning_interp.data.embedding_datamodule:{name}"
        for name in (
            "EmbeddingDataModule",
            "TokenDataset",
            "collate_tokens",
            "load_labelled",
            "texts",
            "IMAGE_SUFFIXES",
        )
    },
)
