"""One taxonomy of the operations the passes and graph helpers recognise in a traced graph.

Each table is defined once here and named for what its operations *are*; a pass that needs a wider class
(e.g. every op acting on each channel alone) builds it from these tables, so two passes never keep drifting
copies of one list. ``*_FUNCTIONS`` hold ``call_function`` targets, ``*_METHODS`` ``call_method`` names,
``*_MODULES`` classes for ``isinstance`` checks of ``call_module`` targets, ``*_ATTRS`` attribute names read
through ``getattr``.

>>> import operator, torch.nn.functional as F
>>> operator.iadd in INPLACE_OPERATORS, F.conv2d in FUNCTIONAL_LAYERS["conv2d"], "add" in ACTIVATION_METHODS
(True, True, False)
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_METHODS",
    "ACTIVATION_MODULES",
    "ADAPTIVE_AVG_POOL_FUNCTIONS",
    "ARITHMETIC_FUNCTIONS",
    "ARITHMETIC_METHODS",
    "AVG_POOL_FUNCTIONS",
    "AVG_POOL_MODULES",
    "BATCH_NORM_FUNCTIONS",
    "CONCAT_FUNCTIONS",
    "DROPOUT_FUNCTIONS",
    "DROPOUT_MODULES",
    "DROPOUT_VARIANT_FUNCTIONS",
    "FRESH_FUNCTIONS",
    "FRESH_METHODS",
    "FRESH_MODULES",
    "FUNCTIONAL_LAYERS",
    "IDENTITY_METHODS",
    "IDENTITY_MODULES",
    "INPLACE_ACTIVATION_FUNCTIONS",
    "INPLACE_ARITHMETIC_METHODS",
    "INPLACE_ARITHMETIC_OPERATORS",
    "INPLACE_OPERATORS",
    "LP_POOL_FUNCTIONS",
    "LP_POOL_MODULES",
    "MAX_POOL_FUNCTIONS",
    "MAX_POOL_MODULES",
    "MAX_POOL_WITH_INDICES_FUNCTIONS",
    "MAX_REDUCTION_FUNCTIONS",
    "MAX_REDUCTION_METHODS",
    "METADATA_ATTRS",
    "METADATA_METHODS",
    "PAD_FUNCTIONS",
    "PAD_MODULES",
    "PARAMETRIC_ACTIVATION_MODULES",
    "REDUCTION_FUNCTIONS",
    "REDUCTION_METHODS",
    "RESHAPE_FUNCTIONS",
    "RESHAPE_METHODS",
    "SIZE_ARITHMETIC_OPERATORS",
    "SIZE_ATTRS",
    "SIZE_METHODS",
    "SPLIT_FUNCTIONS",
    "SPLIT_METHODS",
    "UNARY_MATH_FUNCTIONS",
    "UNARY_MATH_METHODS",
    "UPSAMPLE_FUNCTIONS",
    "UPSAMPLE_MODULES",
]

# ---------------------------------------------------------------------------------------------- activations

#: elementwise activation layers without weights
ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
    nn.Threshold,
)
#: activations with a weight per channel (or one shared): per channel only when it has 1 or C of them
PARAMETRIC_ACTIVATION_MODULES = (nn.PReLU,)
ACTIVATION_FUNCTIONS = frozenset({
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.sigmoid, F.tanh, F.softplus, F.hardtanh, F.softsign, F.logsigmoid, torch.relu, torch.sigmoid, torch.tanh,
})
#: the in-place spellings of activation functions (they return the tensor they wrote)
INPLACE_ACTIVATION_FUNCTIONS = frozenset({F.relu_, F.leaky_relu_, F.elu_, F.hardtanh_, torch.relu_, torch.sigmoid_,
                                          torch.tanh_})
ACTIVATION_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"})

# ------------------------------------------------------------------------------ identity, dropout, unary maths

IDENTITY_MODULES = (nn.Identity,)
#: methods returning the same values (``x.contiguous()``, ``x.clone()``)
IDENTITY_METHODS = frozenset({"contiguous", "clone"})
#: element dropout, the form a pooled (N, C) vector's dropout takes
DROPOUT_FUNCTIONS = frozenset({F.dropout, torch.dropout})
#: channel and alpha dropout
DROPOUT_VARIANT_FUNCTIONS = frozenset({F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout})
DROPOUT_MODULES = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
#: elementwise maths that is not an activation
UNARY_MATH_FUNCTIONS = frozenset({torch.clamp, torch.clip, torch.abs, torch.exp})
UNARY_MATH_METHODS = frozenset({"clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "clip",
                                "clip_", "abs", "exp"})
#: batch norm as a function (its statistics are per channel)
BATCH_NORM_FUNCTIONS = frozenset({F.batch_norm})

# ------------------------------------------------------------------------------------------- arithmetic

#: binary elementwise arithmetic (``x + y``, ``torch.maximum(x, y)``); the augmented ``x += y`` is in
#: :data:`INPLACE_ARITHMETIC_OPERATORS`
ARITHMETIC_FUNCTIONS = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                                  torch.mul, torch.div, torch.maximum, torch.minimum})
ARITHMETIC_METHODS = frozenset({"add", "sub", "mul", "div"})
INPLACE_ARITHMETIC_METHODS = frozenset({"add_", "sub_", "mul_", "div_"})

# --------------------------------------------------------------------------------- pooling, resampling, padding

#: ``F.avg_pool2d`` (the same object as ``torch._C._nn.avg_pool2d``)
AVG_POOL_FUNCTIONS = frozenset({F.avg_pool2d, torch._C._nn.avg_pool2d})
ADAPTIVE_AVG_POOL_FUNCTIONS = frozenset({F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d})
MAX_POOL_FUNCTIONS = frozenset({F.max_pool2d, F.adaptive_max_pool2d, torch.max_pool2d})
#: max pools returning (values, indices)
MAX_POOL_WITH_INDICES_FUNCTIONS = frozenset({F.max_pool2d_with_indices, F.adaptive_max_pool2d_with_indices})
LP_POOL_FUNCTIONS = frozenset({F.lp_pool2d})
#: a max over dims: a global max pool when it takes the spatial ones
MAX_REDUCTION_FUNCTIONS = frozenset({torch.amax, torch.max})
MAX_REDUCTION_METHODS = frozenset({"amax", "max"})
AVG_POOL_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
MAX_POOL_MODULES = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)
LP_POOL_MODULES = (nn.LPPool2d,)
UPSAMPLE_FUNCTIONS = frozenset({F.interpolate})
UPSAMPLE_MODULES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
PAD_FUNCTIONS = frozenset({F.pad})
PAD_MODULES = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d)

# ------------------------------------------------------------------------------------- reshapes, reductions

#: reshapes that keep the batch dimension first (``x.flatten(1)``, ``x.view(n, -1)``, ``x.squeeze()``)
RESHAPE_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.squeeze})
RESHAPE_METHODS = frozenset({"flatten", "view", "reshape", "squeeze"})
#: reductions over given dims
REDUCTION_FUNCTIONS = frozenset({torch.mean, torch.sum, torch.amax})
REDUCTION_METHODS = frozenset({"mean", "sum", "amax"})

# ---------------------------------------------------------------------------------- concatenation, splits

#: call_function targets that concatenate a sequence of tensors: ``(tensors, dim=0)``
CONCAT_FUNCTIONS: frozenset[Any] = frozenset({torch.cat, torch.concat, torch.concatenate})
with contextlib.suppress(AttributeError, RuntimeError):  # builds without aten ops
    CONCAT_FUNCTIONS |= {torch.ops.aten.cat, torch.ops.aten.cat.default}
#: ops taking part of a tensor (``x[:, :c]``, ``x.chunk(2, 1)``)
SPLIT_FUNCTIONS = frozenset({torch.split, torch.chunk, torch.narrow, torch.unbind, torch.select, torch.tensor_split,
                             operator.getitem})
SPLIT_METHODS = frozenset({"split", "chunk", "narrow", "unbind", "select", "tensor_split", "__getitem__"})

# ------------------------------------------------------------------------------------------ layers as functions

#: functional forms of the layers the passes swap: ``F.conv2d`` and ``torch.conv2d`` for ``"conv2d"``, ...
FUNCTIONAL_LAYERS: dict[str, frozenset] = {
    kind: frozenset({fn, getattr(torch, kind, None)} - {None})
    for kind, fn in (("conv1d", F.conv1d), ("conv2d", F.conv2d), ("conv3d", F.conv3d), ("linear", F.linear))
}

# -------------------------------------------------------------------------------------------- in-place writes

#: augmented assignments on tensors that write into their left operand (``x += y``)
INPLACE_ARITHMETIC_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv})
#: every operator that writes into its first argument: augmented assignments and ``x[i] = v``
INPLACE_OPERATORS = INPLACE_ARITHMETIC_OPERATORS | {
    operator.setitem, operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
    operator.ior, operator.ixor, operator.ilshift, operator.irshift}

# ---------------------------------------------------------------------------- outputs in memory of their own

# outputs that never share memory with an input (anything not listed is assumed to possibly be a view): a
# conservative list for the alias analysis, deliberately not derived from the wider tables
FRESH_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.matmul,
    operator.neg, operator.mod, torch.add, torch.sub, torch.mul, torch.div, torch.cat, torch.stack, torch.sum,
    torch.mean, torch.matmul, torch.bmm, F.linear, F.conv1d, F.conv2d, F.conv3d, F.adaptive_avg_pool2d,
    F.avg_pool2d, F.max_pool2d, F.softmax, F.layer_norm, F.batch_norm, F.group_norm, torch.sigmoid, torch.tanh,
    torch.relu, F.relu, F.gelu, F.silu, F.hardswish, F.sigmoid, F.tanh, F.relu6, F.leaky_relu, F.elu, F.mish,
    F.hardsigmoid})
FRESH_METHODS = frozenset({"add", "sub", "mul", "div", "matmul", "sum", "mean", "amax", "softmax", "sigmoid", "tanh",
                           "relu", "exp", "log", "pow", "clone", "neg", "abs", "sqrt", "norm"})
FRESH_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)

# ------------------------------------------------------------------------------------------- metadata reads

#: tensor methods that read only metadata, never the values
METADATA_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement", "stride", "is_contiguous",
                              "get_device"})
#: tensor attributes that are metadata (``x.shape``, read as ``getattr(x, "shape")`` in a graph)
METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})
#: the metadata reads that give the sizes of a tensor's dims (Python ints in the graph)
SIZE_METHODS = frozenset({"size", "dim"})
SIZE_ATTRS = frozenset({"shape", "ndim"})
#: operators that compute further ints from those sizes (``x.shape[2:]``, ``h * w``)
SIZE_ARITHMETIC_OPERATORS = frozenset({operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub})
