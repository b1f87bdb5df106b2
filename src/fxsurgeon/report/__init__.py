"""Savings reports: what a conversion saved (parameters, MACs per sample — fvcore counts one multiply-add as
one flop, a MAC) and how faithful it is, as Markdown, JSON, a terminal table, CSV or a plot.

Modules: ``savings`` (:func:`savings`, the report object), ``count`` (fvcore counts per module), ``scope``
(counting inside leaf modules), ``attrib`` (savings per rewrite), ``render`` (Markdown/table/CSV), ``plot``.
"""

from __future__ import annotations

# the package's public names are savings's, re-exported as one list so the two cannot drift apart
from .savings import *  # noqa: F403
from .savings import __all__  # noqa: F401
