"""SETA as a package (config, layer, routing, method, report); importing it registers ``--method seta``."""

from .config import SETAConfig
from .method import SETA

__all__ = ["SETA", "SETAConfig"]
