"""Callbacks: evaluation and export of trained dictionaries, and plug-ins for any project.

:class:`DictionaryProbe` trains dictionaries on a user's model while it trains;
:class:`SpliceDictionary` splices one into the user's validation.
"""

from lightning_interp.callbacks.downstream import DownstreamMetrics, ExportDictionary
from lightning_interp.callbacks.probe import DictionaryProbe
from lightning_interp.callbacks.splice import SpliceDictionary

__all__ = ["DictionaryProbe", "DownstreamMetrics", "ExportDictionary", "SpliceDictionary"]
