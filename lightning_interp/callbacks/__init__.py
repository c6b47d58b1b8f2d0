"""Callbacks: downstream evaluation and export of trained dictionaries."""

from lightning_interp.callbacks.downstream import DownstreamMetrics, ExportDictionary

__all__ = ["DownstreamMetrics", "ExportDictionary"]
