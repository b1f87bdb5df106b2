"""Separable forms: how a k×k conv is factorised (dw-pw, pw-dw-pw, tucker2, spatial-svd), their maths and costs.

Pure builders and maths, no fx: ``registry`` (the forms table, :func:`get_form`, :func:`register_form`),
``base`` (the :class:`Form` protocol and costs), ``decompose`` (per-input-channel SVD), ``cp`` (the CP form:
effort, caches, menus, build), ``cp_fit`` (one CP decomposition), ``als`` (CP-ALS), ``cp_store`` (CP menu
errors on disk), ``dense`` (Tucker-2 and spatial SVD), ``importance`` (BatchNorm-aware weighting),
``fusion_math`` (the concat fusion's subspaces).
"""

from __future__ import annotations

# the package's public names are registry's, re-exported as one list so the two cannot drift apart
from .registry import *  # noqa: F403
from .registry import __all__  # noqa: F401
