"""Our own format: ``config.json`` + ``model.safetensors`` (see docs/format.md)."""

from __future__ import annotations

from pathlib import Path

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.dictionaries.serialization import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_folder,
    save_dictionary,
)
from lightning_interp.zoo.formats.base import DeviceLike, DtypeLike, FormatAdapter
from lightning_interp.zoo.formats.registry import register_format


class NativeFormat(FormatAdapter):
    """lightning-interp's folder layout, written by :meth:`Dictionary.save_pretrained`."""

    name = "native"
    required_files = (CONFIG_NAME, WEIGHTS_NAME)  # model.safetensors beside config.json
    can_write = True

    def read(
        self, folder: Path, *, device: DeviceLike = None, dtype: DtypeLike = None
    ) -> Dictionary:
        """Load with :func:`~lightning_interp.dictionaries.serialization.load_folder`."""
        return load_folder(folder, device=device, dtype=dtype)

    def write(self, dictionary: Dictionary, folder: Path) -> Path:
        """Save the inference form, as :meth:`Dictionary.save_pretrained` does."""
        return save_dictionary(dictionary.to_inference().with_scale_folded(), folder)


NATIVE = register_format(NativeFormat())
