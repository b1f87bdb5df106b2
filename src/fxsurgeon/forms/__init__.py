"""Separable forms: how a k×k conv is factorised (dw-pw, pw-dw-pw, tucker2, spatial-svd), their maths and costs.

Pure builders and maths, no fx: ``registry`` (the forms table, :func:`get_form`, :func:`register_form`),
``base`` (the :class:`Form` protocol and costs), ``decompose`` (per-input-channel SVD), ``cp`` (CP decomposition),
``dense`` (Tucker-2 and spatial SVD), ``importance`` (BatchNorm-aware weighting), ``fusion_math`` (the concat
fusion's subspaces).
"""

from __future__ import annotations

from .registry import (
    FORMS,
    Form,
    LayerChoice,
    auto_forms,
    conv_cost,
    get_form,
    register_form,
)

__all__ = [
    "FORMS",
    "Form",
    "LayerChoice",
    "auto_forms",
    "conv_cost",
    "get_form",
    "register_form",
]
