"""Callbacks: evaluation and export of trained dictionaries, and plug-ins for any project.

:class:`DictionaryProbe` trains dictionaries on a user's model while it trains;
:class:`SpliceDictionary` splices one into the user's validation; :class:`LogProgress`
prints plain progress lines for log files; :class:`FeatureDashboard` ends a fit with a
feature store and a browsable dashboard of each dictionary.
"""

from lightning_interp.callbacks.downstream import DownstreamMetrics, ExportDictionary
from lightning_interp.callbacks.features import FeatureDashboard
from lightning_interp.callbacks.probe import DictionaryProbe
from lightning_interp.callbacks.progress import LogProgress
from lightning_interp.callbacks.splice import SpliceDictionary

__all__ = [
    "DictionaryProbe",
    "DownstreamMetrics",
    "ExportDictionary",
    "FeatureDashboard",
    "LogProgress",
    "SpliceDictionary",
]
