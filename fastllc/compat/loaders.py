"""Moved to ``fastllc.loaders`` (``api`` needs it, and nothing below ``compat`` may import from ``compat``).

Kept only while ``fastllc.calibration`` still imports these names from here; no user-facing document names
this module."""

from ..loaders import as_pair, is_loader, materialise

__all__ = ["as_pair", "is_loader", "materialise"]
