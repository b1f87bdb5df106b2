"""Pass registry: passes register themselves by name with :func:`register_pass`.

A pass is a plain function ``fn(gm, **options) -> PassResult`` that edits ``gm`` in place, with its options
declared and validated by a frozen :class:`PassOptions` dataclass; ``convert()``
owns the copy, the shape propagation (for passes registered with ``needs_shapes=True``), verification and
the record. Passes run in ascending ``order``.
"""

from __future__ import annotations

from .base import PassResult, Rewrite, Skip
from .options import OptionError, PassOptions
from .registry import PassInfo, get_pass, list_passes, register_pass

__all__ = [
    "OptionError", "PassInfo", "PassOptions", "PassResult", "Rewrite", "Skip", "get_pass", "list_passes", "register_pass",
]

# Importing the pass modules registers them.
from . import concat_fusion, conv_head, separable  # noqa: F401
