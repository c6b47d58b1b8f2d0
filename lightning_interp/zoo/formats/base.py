"""What a dictionary file format declares: its files, how specific they are, a reader, a writer.

An adapter is recognised from file names alone (so the Hub loader can decide what to
download before downloading anything): each entry of :attr:`FormatAdapter.required_files`
must be present, an exact name or an ``fnmatch`` pattern, or a tuple of alternatives.
A file that some format names exactly (required, optional or companion) belongs to that
format, so another format's *pattern* never takes it: OpenAI's ``*.pt`` does not see
dictionary_learning's ``ae.pt`` or SAELens's ``trainer_state.pt``, without either adapter
listing the other's files. Which format wins when several match is decided by
:attr:`FormatAdapter.specificity` (:func:`~lightning_interp.zoo.formats.registry.matching_formats`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from pathlib import Path

import torch

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.errors import UnsupportedFormatError

#: Where :meth:`FormatAdapter.read` puts the dictionary (``None``: the CPU).
DeviceLike = str | torch.device | None
#: The dtype :meth:`FormatAdapter.read` gives the dictionary (``None``: the file's own).
DtypeLike = str | torch.dtype | None

#: Specificity of a format recognised by file names of its own (the default).
NAMED = 1
#: Specificity of a format recognised only by a bare pattern such as ``*.pt``.
PATTERN = 0


def is_pattern(name: str) -> bool:
    """Whether ``name`` is an ``fnmatch`` pattern rather than one exact file name."""
    return any(c in name for c in "*?[")


def _alternatives(entry: str | tuple[str, ...]) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry)


class FormatAdapter:
    """One on-disk dictionary format: how to recognise, read and (maybe) write it.

    A new format is one module holding a subclass and ``register_format(MyFormat())``
    (:mod:`lightning_interp.zoo.formats.registry`), plus, for a built-in one, its module
    name in :data:`~lightning_interp.zoo.formats.BUILTIN_FORMATS`.

    Attributes:
        name: The format's name, as given to ``read_folder(format=...)``.
        required_files: Entries that must all be present in a folder of this format: a file
            name, an ``fnmatch`` pattern, or a tuple of alternatives (any one will do).
        optional_files: Files the reader uses when present (downloaded with the required).
        companion_files: Files such folders may hold that the reader never needs (not
            downloaded); naming them keeps other formats' patterns off them.
        specificity: How strongly a match identifies the format: :data:`NAMED` (1) for
            file names of its own, :data:`PATTERN` (0) for a bare pattern. When several
            formats match a folder, only the most specific ones count; a tie is ambiguous.
        can_write: Whether :meth:`write` is implemented.
    """

    name: str = ""
    required_files: tuple[str | tuple[str, ...], ...] = ()
    optional_files: tuple[str, ...] = ()
    companion_files: tuple[str, ...] = ()
    specificity: int = NAMED
    can_write: bool = False

    @property
    def allow_patterns(self) -> list[str]:
        """File names (or patterns) a dictionary folder of this format needs or uses.

        A Hub loader downloads only these: the required files, then the optional ones.
        """
        names = [n for entry in self.required_files for n in _alternatives(entry)]
        return names + list(self.optional_files)

    def named_files(self) -> set[str]:
        """Every exact file name this format declares (required, optional or companion)."""
        declared = [*self.allow_patterns, *self.companion_files]
        return {n for n in declared if not is_pattern(n)}

    def matches(self, filenames: Iterable[str], foreign: Iterable[str] = ()) -> bool:
        """Whether a folder holding ``filenames`` (base names) has every required entry.

        Args:
            filenames: Base names of the folder's files.
            foreign: Names other formats declare; this format's patterns skip them.
        """
        names, skipped = set(filenames), set(foreign)
        if not self.required_files:
            raise NotImplementedError(f"format {self.name!r} declares no required_files")
        return all(
            any(self._present(option, names, skipped) for option in _alternatives(entry))
            for entry in self.required_files
        )

    @staticmethod
    def _present(option: str, names: set[str], skipped: set[str]) -> bool:
        if not is_pattern(option):
            return option in names
        return any(fnmatch.fnmatchcase(n, option) for n in names - skipped)

    def detect(self, filenames: Iterable[str]) -> bool:
        """Whether a folder holding ``filenames`` (base names) is in this format.

        Files other registered formats name exactly are not taken by this format's
        patterns; specificity against other formats is weighed by the registry, not here.
        """
        from lightning_interp.zoo.formats.registry import names_owned_elsewhere

        return self.matches(filenames, names_owned_elsewhere(self))

    def own_files(self, pattern: str, filenames: Iterable[str]) -> list[str]:
        """The names among ``filenames`` matching ``pattern`` that no other format names."""
        from lightning_interp.zoo.formats.registry import names_owned_elsewhere

        skipped = names_owned_elsewhere(self)
        return sorted(n for n in filenames if n not in skipped and fnmatch.fnmatchcase(n, pattern))

    def read(
        self, folder: Path, *, device: DeviceLike = None, dtype: DtypeLike = None
    ) -> Dictionary:
        """Read the dictionary in ``folder`` into a native :class:`Dictionary`."""
        raise NotImplementedError

    def write(self, dictionary: Dictionary, folder: Path) -> Path:
        """Write ``dictionary`` to ``folder`` in this format and return the folder."""
        raise UnsupportedFormatError(
            f"the {self.name!r} format is read-only here; write with format='native' or "
            f"format='saelens'"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
