"""Frozen backbones: hook sites per model family, early-exit capture and splicing, steering."""

from lightning_interp.backbones.backbone import Backbone, load_backbone
from lightning_interp.backbones.sites import SITE_KINDS, Site, SiteMap, UnknownSiteError
from lightning_interp.backbones.steering import SteeringEdit, steer

__all__ = [
    "SITE_KINDS",
    "Backbone",
    "Site",
    "SiteMap",
    "SteeringEdit",
    "UnknownSiteError",
    "load_backbone",
    "steer",
]
