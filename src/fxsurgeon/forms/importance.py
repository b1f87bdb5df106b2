"""Data-free importance of a conv's output and input channels, read from the BatchNorms around it.

A weight approximation is judged by ``||W − Ŵ||_F``, which treats every output and input channel alike. The
network does not: a BatchNorm after the conv multiplies output channel o by ``γ_o / √(var_o + ε)``, so an
error there reaches the next layer scaled by that much; and a conv whose input is ``ReLU(BN(·))`` sees input
channel i with root-mean-square ``√E[ReLU(z)²]``, z ~ N(β_i, γ_i²) — what the BN was trained to produce. Both
are in the model (no data needed; the same BN statistics data-free quantisation uses, Nagel et al., ICCV
2019). Scaling the weight by them before decomposing, and the replacement's outer layers back after,
minimises the error weighted that way:

    W' = diag(s_out) · W · diag(s_in),  decompose W' → Ŵ',  Ŵ = diag(s_out)⁻¹ · Ŵ' · diag(s_in)⁻¹

which leaves an exact decomposition exact. Any form whose first layer acts per input channel (a depthwise
or a 1×1 conv) and whose last layer is a 1×1 conv can be unscaled this way (:func:`unscale_separable`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ChannelScales",
    "bn_channel_scales",
    "bn_output_scale",
    "correct_mean_shift",
    "input_channel_mean",
    "nonnegative_least_squares",
    "output_bn_input_mean",
    "relu_bn_mean",
    "relu_bn_rms",
    "scaled_conv",
    "tap_fractions",
    "unscale_separable",
]

#: a channel's weight never falls below this fraction of the layer's largest (dead channels still count a
#: little, and nothing is divided by zero when unscaling)
FLOOR = 1e-3

_RELUS = (nn.ReLU, nn.ReLU6)
_RELU_FNS = (F.relu, torch.relu, F.relu6)


@dataclass(frozen=True)
class ChannelScales:
    """Per-channel importance: ``out`` (C_out,) and ``inp`` (C_in,), each None when nothing is known."""

    out: torch.Tensor | None
    inp: torch.Tensor | None
    source: str

    def describe(self) -> str:
        return self.source


def _floor(s: torch.Tensor) -> torch.Tensor | None:
    s = s.detach().to(torch.float64).abs()
    top = float(s.max()) if s.numel() else 0.0
    if not math.isfinite(top) or top <= 0:
        return None
    return s.clamp_min(FLOOR * top)


def _usable_bn(mod: nn.Module, channels: int) -> bool:
    return (
        isinstance(mod, nn.modules.batchnorm._BatchNorm)
        and mod.running_var is not None
        and mod.num_features == channels
        and not mod.running_var.is_meta
    )


def bn_output_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """|γ| / √(running_var + ε): how much the BN amplifies each channel of the conv output before it.

    >>> bn = nn.BatchNorm2d(2).eval()
    >>> bn_output_scale(bn)
    tensor([1.0000, 1.0000], dtype=torch.float64)
    """
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(bn.num_features, dtype=torch.float64)
    return gamma.abs() / (bn.running_var.detach().double() + bn.eps).sqrt()


def _bn_gaussian(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, ...]:
    """β, |γ| and Φ(β/|γ|), φ(β/|γ|) of a BatchNorm's output taken as N(β, γ²), per channel, in float64."""
    n = bn.num_features
    mu = bn.bias.detach().double() if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
    sd = bn.weight.detach().double().abs() if bn.weight is not None else torch.ones(n, dtype=torch.float64)
    a = mu / sd.clamp_min(1e-30)
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    return mu, sd, cdf, pdf


def relu_bn_rms(bn: nn.modules.batchnorm._BatchNorm, relu: bool = True) -> torch.Tensor:
    """Root-mean-square of each channel of ``ReLU(BN(x))`` (or ``BN(x)``), taking the BN's output as N(β, γ²).

    >>> bn = nn.BatchNorm2d(1).eval()  # β = 0, γ = 1: E[ReLU(z)²] = 1/2
    >>> float(relu_bn_rms(bn)) == 0.5 ** 0.5
    True
    """
    mu, sd, cdf, pdf = _bn_gaussian(bn)
    if not relu:
        return (mu * mu + sd * sd).sqrt()
    second = (mu * mu + sd * sd) * cdf + mu * sd * pdf
    # σ → 0: ReLU(β) exactly
    second = torch.where(sd > 0, second, mu.clamp_min(0).pow(2))
    return second.clamp_min(0).sqrt()


def relu_bn_mean(bn: nn.modules.batchnorm._BatchNorm, relu: bool = True) -> torch.Tensor:
    """Mean of each channel of ``ReLU(BN(x))`` (or ``BN(x)``: β), taking the BN's output as N(β, γ²).

    ``E[ReLU(z)] = β·Φ(β/|γ|) + |γ|·φ(β/|γ|)``.

    >>> bn = nn.BatchNorm2d(1).eval()  # β = 0, γ = 1: E[ReLU(z)] = 1/√(2π)
    >>> abs(float(relu_bn_mean(bn)) - (2 * math.pi) ** -0.5) < 1e-12
    True
    """
    mu, sd, cdf, pdf = _bn_gaussian(bn)
    if not relu:
        return mu
    return torch.where(sd > 0, mu * cdf + sd * pdf, mu.clamp_min(0))


def _module(gm: fx.GraphModule, node: object) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        try:
            return gm.get_submodule(str(node.target))
        except AttributeError:
            return None
    return None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FNS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    mod = _module(gm, node)
    return isinstance(mod, _RELUS)


def _only_call(gm: fx.GraphModule, names: list[str]) -> fx.Node | None:
    """The graph's single call of the module registered as any of ``names``; None when called more or less often."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) in names]
    return nodes[0] if len(nodes) == 1 else None


def _input_bn(gm: fx.GraphModule, src: object, channels: int) -> tuple[nn.Module | None, bool]:
    """The BatchNorm whose output (``relu``: through a ReLU) is the tensor ``src``, or (None, False)."""
    if not isinstance(src, fx.Node):
        return None, False
    mod = _module(gm, src)
    if mod is not None and _usable_bn(mod, channels):
        act = getattr(mod, "act", None)  # timm BatchNormAct2d: BN then its own activation
        if act is None or isinstance(act, nn.Identity):
            return mod, False
        if isinstance(act, _RELUS):
            return mod, True
        return None, False
    if _is_relu(gm, src) and src.all_input_nodes:
        bn = _module(gm, src.all_input_nodes[0])
        act = getattr(bn, "act", None)
        if bn is not None and _usable_bn(bn, channels) and (act is None or isinstance(act, (nn.Identity, *_RELUS))):
            return bn, True
    return None, False


def _input_scale(gm: fx.GraphModule, src: object, channels: int) -> tuple[torch.Tensor | None, str]:
    bn, relu = _input_bn(gm, src, channels)
    if bn is None:
        return None, ""
    return relu_bn_rms(bn, relu=relu), "relu(bn)" if relu else "bn"


def tap_fractions(conv: nn.Conv2d, size: tuple[int, int]) -> torch.Tensor:
    """(kh, kw): the share of the conv's output positions at which each kernel tap reads inside an input of
    ``size`` (the rest read zero padding), for an input of spatial ``size`` (H, W).

    >>> conv = nn.Conv2d(1, 1, 3, padding=1)
    >>> tap_fractions(conv, (4, 4))[0].tolist()  # the top row of taps misses the first output row
    [0.5625, 0.75, 0.5625]
    """
    out = []
    for axis in range(2):
        k, s, d = conv.kernel_size[axis], conv.stride[axis], conv.dilation[axis]
        pad = conv.padding[axis] if not isinstance(conv.padding, str) else (
            0 if conv.padding == "valid" else (d * (k - 1)) // 2)
        n = size[axis]
        n_out = (n + 2 * pad - d * (k - 1) - 1) // s + 1
        frac = []
        for tap in range(k):
            idx = [p * s - pad + tap * d for p in range(max(n_out, 0))]
            frac.append(sum(0 <= i < n for i in idx) / max(len(idx), 1))
        out.append(torch.tensor(frac, dtype=torch.float64))
    return out[0].view(-1, 1) * out[1].view(1, -1)


#: an input mean is inferred from the BatchNorm after the conv only when its system is this well conditioned
MAX_CONDITION = 1e4


def output_bn_input_mean(gm: fx.GraphModule, names: list[str], conv: nn.Conv2d) -> torch.Tensor | None:
    """Each input channel's mean, inferred from the running mean of the BatchNorm that reads the conv's output.

    That BatchNorm remembers ``E[conv(x)]`` over the training data. For inputs whose channels have constant
    means ``m``, ``E[conv(x)] = A m + b`` with ``A[o, i] = Σ_taps W[o, i, tap] · share of positions where the
    tap reads inside the input`` (:func:`tap_fractions`), so ``m`` solves a least-squares system — when it is
    determined (``C_out ≥ C_in``) and well conditioned (:data:`MAX_CONDITION`); else None. Works whatever
    produces the input (a residual sum, a pooling), where :func:`input_channel_mean` needs ``BN(·)`` before.
    """
    node = _only_call(gm, names)
    if node is None or not node.args or len(node.users) != 1 or conv.padding_mode != "zeros":
        return None
    bn = _module(gm, next(iter(node.users)))
    c_out, c_in = conv.out_channels, conv.in_channels
    if bn is None or not _usable_bn(bn, c_out) or c_out < c_in:
        return None
    src = node.args[0]
    meta = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) != 4:
        return None
    w = conv.weight.detach().double()
    a = (w * tap_fractions(conv, (int(shape[2]), int(shape[3]))).to(w.device)).sum((2, 3))
    mu = bn.running_mean.detach().double().to(w.device)
    if conv.bias is not None:
        mu = mu - conv.bias.detach().double()
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(mu).all()):
        return None
    if _is_relu(gm, src):  # a ReLU's output: the means are ≥ 0, which pins down ill-conditioned systems
        return nonnegative_least_squares(a, mu)
    sv = torch.linalg.svdvals(a)
    if float(sv[-1]) <= 0 or float(sv[0] / sv[-1]) > MAX_CONDITION:
        return None
    return torch.linalg.lstsq(a, mu.unsqueeze(1)).solution.squeeze(1)


def nonnegative_least_squares(a: torch.Tensor, b: torch.Tensor, iterations: int = 3000) -> torch.Tensor:
    """``argmin_{m ≥ 0} ||a m − b||²`` by accelerated projected gradient (FISTA), deterministic, float64.

    >>> a = torch.eye(2, dtype=torch.float64)
    >>> nonnegative_least_squares(a, torch.tensor([1.0, -2.0], dtype=torch.float64)).tolist()
    [1.0, 0.0]
    """
    g = a.T @ a
    h = a.T @ b
    lip = float(torch.linalg.eigvalsh(g)[-1])
    if not lip > 0:
        return torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)
    m = torch.zeros_like(h)
    z, t = m.clone(), 1.0
    for _ in range(iterations):
        nxt = (z - (g @ z - h) / lip).clamp_min(0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = nxt + (t - 1) / t_next * (nxt - m)
        m, t = nxt, t_next
    return m


def input_channel_mean(gm: fx.GraphModule, names: list[str], conv: nn.Conv2d) -> tuple[torch.Tensor, str] | None:
    """Expected value of each input channel of the conv called as any of ``names``: read from the BatchNorm
    (and ReLU) that produce its input, else inferred from the BatchNorm after it (:func:`output_bn_input_mean`);
    None when neither is there or the conv is called twice."""
    node = _only_call(gm, names)
    if node is None or not node.args:
        return None
    bn, relu = _input_bn(gm, node.args[0], conv.in_channels)
    if bn is None:
        m = output_bn_input_mean(gm, names, conv)
        return None if m is None else (m, "inferred from the following BatchNorm's running mean")
    return relu_bn_mean(bn, relu=relu), "relu(bn)" if relu else "bn"


def correct_mean_shift(conv: nn.Conv2d, new: nn.Module, mean: torch.Tensor) -> torch.Tensor:
    """Give ``new`` (the conv's replacement, ending in a 1×1 ``pointwise`` conv) the conv's output mean, in place.

    For an input whose channels have expected values ``mean`` (constant over positions), the replacement's
    output differs from the conv's by ``δ = (W − Ŵ) ∗ mean`` at every position the padding does not reach —
    the bias shift of Nagel et al. (ICCV 2019), here for a low-rank rather than a quantised weight. Both are
    linear, so δ is read off one evaluation of each on a constant map; it is added to the pointwise bias
    (created, zero, when there is none). Returns δ.
    """
    pw = new.pointwise
    dtype, device = conv.weight.dtype, conv.weight.device
    reach = [(k - 1) * d + 1 for k, d in zip(conv.kernel_size, conv.dilation)]
    size = [4 * r + 1 for r in reach]
    m = mean.to(device=device, dtype=torch.float64).view(1, -1, 1, 1).expand(1, -1, *size)
    with torch.no_grad():
        ref = F.conv2d(m, conv.weight.double(), None, conv.stride, conv.padding, conv.dilation)
        # the replacement in float64 on a copy (its bias, if any, subtracted: only the linear part differs)
        twin = copy.deepcopy(new).double()
        out = twin(m) - (twin.pointwise.bias.view(1, -1, 1, 1) if twin.pointwise.bias is not None else 0)
        cy, cx = ref.shape[-2] // 2, ref.shape[-1] // 2
        delta = (ref - out)[0, :, cy, cx]
        if pw.bias is None:
            pw.bias = nn.Parameter(torch.zeros(pw.out_channels, dtype=dtype, device=device),
                                   requires_grad=pw.weight.requires_grad)
        pw.bias.add_(delta.to(pw.bias.dtype))
    return delta


def bn_channel_scales(gm: fx.GraphModule, names: list[str], conv: nn.Conv2d) -> ChannelScales | None:
    """Output and input channel importance of the conv called as any of ``names``, from adjacent BNs.

    The output side needs the conv's only use to be a BatchNorm (timm's ``BatchNormAct2d`` too); the input
    side needs the conv's input to be ``BN(·)`` or ``ReLU(BN(·))``. A conv called more than once, or from
    inside a leaf module, gets None (nothing is known for certain).
    """
    node = _only_call(gm, names)
    if node is None:
        return None
    c_out, c_in = conv.out_channels, conv.in_channels
    out = None
    parts = []
    users = list(node.users)
    if len(users) == 1:
        bn = _module(gm, users[0])
        if bn is not None and _usable_bn(bn, c_out):
            out = _floor(bn_output_scale(bn))
            parts.append("output: following BatchNorm")
    src = node.args[0] if node.args else None
    inp, how = _input_scale(gm, src, c_in)
    inp = _floor(inp) if inp is not None else None
    if inp is not None:
        parts.append(f"input: {how}")
    if out is None and inp is None:
        return None
    return ChannelScales(out, inp, "; ".join(parts))


def scaled_conv(conv: nn.Conv2d, scales: ChannelScales) -> nn.Conv2d:
    """A copy of ``conv`` whose weight is ``diag(s_out) · W · diag(s_in)`` (bias scaled by s_out)."""
    new = copy.deepcopy(conv)
    with torch.no_grad():
        w = new.weight.detach().double()
        if scales.out is not None:
            w = w * scales.out.to(w.device).view(-1, 1, 1, 1)
            if new.bias is not None:
                new.bias.mul_(scales.out.to(new.bias.device, new.bias.dtype))
        if scales.inp is not None:
            w = w * scales.inp.to(w.device).view(1, -1, 1, 1)
        new.weight.copy_(w.to(new.weight.dtype))
    return new


def unscale_separable(module: nn.Module, scales: ChannelScales, bias: torch.Tensor | None) -> None:
    """Undo :func:`scaled_conv` on a replacement built from the scaled copy, in place.

    The last 1×1 conv (``pointwise``) gets its rows divided by s_out and the original ``bias`` back; the
    first layer — ``reduce`` (a 1×1 conv) when there is one, else the ``depthwise`` conv, whose filter j
    reads input channel ``j // multiplier`` — gets its input channels divided by s_in.
    """
    pw = module.pointwise
    with torch.no_grad():
        if scales.out is not None:
            w = pw.weight.detach().double() / scales.out.to(pw.weight.device).view(-1, 1, 1, 1)
            pw.weight.copy_(w.to(pw.weight.dtype))
        if bias is not None and pw.bias is not None:
            pw.bias.copy_(bias)
        if scales.inp is not None:
            first = getattr(module, "reduce", None)
            if first is not None:
                w = first.weight.detach().double() / scales.inp.to(first.weight.device).view(1, -1, 1, 1)
                first.weight.copy_(w.to(first.weight.dtype))
            else:
                dw = module.depthwise
                per = dw.out_channels // dw.in_channels
                s = scales.inp.to(dw.weight.device).repeat_interleave(per).view(-1, 1, 1, 1)
                dw.weight.copy_((dw.weight.detach().double() / s).to(dw.weight.dtype))

