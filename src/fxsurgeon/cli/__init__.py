"""The ``fxsurgeon`` command: ``app`` assembles the subcommands (convert, batch, recipes) with ``report``
and ``bench`` from their own modules; ``common`` holds the options and model loading they share."""

from __future__ import annotations

from .app import build_parser, load_model, main, parse_bytes, parse_count

__all__ = ["build_parser", "load_model", "main", "parse_bytes", "parse_count"]
