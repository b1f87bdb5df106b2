"""One taxonomy of the operations the passes and graph helpers recognise in a traced graph.

Each table is defined once here and named for what its operations *are*; a pass that needs a wider class
(e.g. every op acting on each channel alone) builds it from these tables, so two passes never keep drifting
copies of one list. ``*_FUNCTIONS`` hold ``call_function`` targets, ``*_METHODS`` ``call_method`` names,
``*_MODULES`` classes for ``isinstance`` checks of ``call_module`` targets, ``*_ATTRS`` attribute names read
through ``getattr``.

>>> import operator, torch.nn.functional as F
>>> operator.iadd in INPLACE_OPERATORS, F.conv2d in FUNCTIONAL_LAYERS["conv2d"]
(True, True)
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FRESH_FUNCTIONS",
    "FRESH_METHODS",
    "FRESH_MODULES",
    "FUNCTIONAL_LAYERS",
    "INPLACE_ARITHMETIC_OPERATORS",
    "INPLACE_OPERATORS",
    "METADATA_ATTRS",
    "METADATA_METHODS",
]

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
