"""Backbones: every one is a `Backbone` (ordered blocks, feature_dim, forward → features)."""

from transferlab.backbones.base import Backbone

__all__ = ["Backbone"]
