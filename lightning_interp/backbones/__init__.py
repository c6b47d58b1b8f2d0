"""Frozen backbones: hook sites per model family, early-exit capture and splicing."""

from lightning_interp.backbones.backbone import Backbone, load_backbone
from lightning_interp.backbones.sites import SITE_KINDS, Site, SiteMap, UnknownSiteError

__all__ = ["SITE_KINDS", "Backbone", "Site", "SiteMap", "UnknownSiteError", "load_backbone"]
