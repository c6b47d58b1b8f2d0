"""Save, load and (later) publish dictionaries: the one entry point is :func:`load_dictionary`."""

from lightning_interp.zoo.load import load_dictionary

__all__ = ["load_dictionary"]
