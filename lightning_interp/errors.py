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


class UnknownConceptError(LightningInterpError, KeyError):
    """A concept name is not in the concept bank (or head) it was looked up in."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class EmptyConceptBankError(ConfigError):
    """A concept bank has no concepts left (often: every concept was filtered out)."""


class SiteSelectionError(LightningInterpError, LookupError):
    """A source holds several dictionaries and no site, or an unknown site, was asked for."""


class HubError(LightningInterpError, OSError):
    """The Hugging Face Hub could not be reached, or answered with an error."""


class CatalogueError(LightningInterpError, ValueError):
    """A zoo catalogue entry is malformed, or a ``zoo:`` id names no entry."""


class UnknownFormatError(LightningInterpError, ValueError):
    """A folder matches no known dictionary file format, several at once, or an unknown name."""


class UnsupportedFormatError(LightningInterpError, ValueError):
    """A foreign dictionary uses a feature that cannot be represented faithfully here."""


class UnsafeFileError(CorruptFileError):
    """A file would need unpickling arbitrary objects to be read; it is refused."""


class UnsafePathError(LightningInterpError, ValueError):
    """A path built from a config, an argument or a download would leave its folder."""


class NonFiniteError(LightningInterpError, FloatingPointError):
    """A NaN or infinite value where only finite numbers may go (a batch, a loss, weights)."""


class FolderInUseError(LightningInterpError, OSError):
    """Another writer holds the folder (a lock file is present and its owner is alive)."""


class CheckpointError(LightningInterpError, ValueError):
    """A checkpoint is truncated, unreadable, or made by a different model than the one resumed."""


class EmptyCacheError(ConfigError):
    """An activation cache writer was closed without a single row added."""


class TokenIdError(LightningInterpError, ValueError, IndexError):
    """A token id is negative or not below the size of the model's token embedding."""


class OutputExistsError(LightningInterpError, FileExistsError):
    """An output folder already holds another run's results and overwriting was not asked for."""


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value has the wrong type (e.g. the string ``"false"`` for a bool)."""


class LightningInterpDeprecationWarning(DeprecationWarning):
    """A name or setting of lightning-interp that still works but will be removed next release.

    A subclass of ``DeprecationWarning``, so the ``lightning-interp`` command can show these
    to its users while it silences third-party deprecations.
    """


class FeatureStoreNotFoundError(LightningInterpError, FileNotFoundError):
    """A feature-store folder (``store.json`` and its tensors) does not exist where named."""


class InvalidFeatureStoreError(CorruptFileError):
    """A feature store's files are unreadable, of another format/version, or inconsistent."""


class InvalidGraphError(LightningInterpError, ValueError):
    """An attribution graph is inconsistent: adjacency shape, node order, or a cycle."""
