"""Typed errors raised by lightning-interp.

Every error names what was wrong and how to fix it. They subclass the built-in exception a
caller would naturally catch (``ValueError``, ``FileNotFoundError``, ``KeyError``), so code
that does not know this library still handles them sensibly.
"""

from __future__ import annotations


class LightningInterpError(Exception):
    """Base class of every error raised on purpose by lightning-interp."""


class ConfigError(LightningInterpError, ValueError):
    """A configuration value is missing, out of range or inconsistent with another one."""


class UnknownArchitectureError(LightningInterpError, KeyError):
    """No dictionary architecture is registered under the requested name."""

    def __str__(self) -> str:
        # KeyError quotes its message; show it as written instead.
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(LightningInterpError, ValueError):
    """A tensor's shape does not match what the dictionary was built for (e.g. a wrong ``d_in``)."""


class DictionaryNotFoundError(LightningInterpError, FileNotFoundError):
    """A dictionary source (folder or file) does not exist or lacks a required file."""


class CorruptFileError(LightningInterpError, ValueError):
    """A file exists but cannot be parsed, or its contents contradict its config."""
