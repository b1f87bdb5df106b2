"""Random small conv nets and the properties every conversion of them must have (property-based fuzzing).

A net is described by a JSON *spec* (so :func:`fxsurgeon.save` can rebuild it by name:
``{"factory": "fxsurgeon.testing.fuzz:FuzzNet", "kwargs": {"spec": spec}}``): an input shape, a list of ops each
reading earlier values — convs with random kernel (square or not, 1×1 to 5×5), stride, dilation, padding
(int or ``"same"``), padding mode, groups and bias, optionally followed by BatchNorm/ReLU; residual adds;
channel concats; max/avg pools; calls of an earlier conv again (a shared module); convs whose weight is tied
to an earlier one — and an optional head (global avg / mean / max pool or flatten, then one or two Linears).

:func:`generate_spec` draws a spec from any source of choices: :func:`net_specs` wraps it as a Hypothesis
strategy (shrinking to a minimal failing net), :class:`RandomDraw` drives it from a seeded ``random.Random``
for long runs (``benchmarks/fuzz.py``). :func:`check_exact` and :func:`check_approximate` assert the
properties: exact recipes reproduce the outputs within float tolerance; approximate recipes give finite
outputs of the right shape and a record; nothing raises but :class:`~fxsurgeon.SurgeryError` (and no
SurgeryError that reports a bug); the caller's model is never changed; save → load gives the same outputs.

>>> import random
>>> spec = generate_spec(RandomDraw(random.Random(0)))
>>> net = FuzzNet(spec)
>>> report = check_exact(spec)
>>> report["rewrites"] >= 0
True
"""

from __future__ import annotations

import copy
import math
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SurgeryError

__all__ = [
    "FuzzNet",
    "RandomDraw",
    "approximate_options",
    "check_approximate",
    "check_exact",
    "exact_options",
    "generate_spec",
    "net_specs",
    "option_sets",
]


# ----------------------------------------------------------------------------------------------- drawing


class Draw(Protocol):
    def int(self, lo: int, hi: int) -> int: ...
    def choice(self, options: Sequence[Any]) -> Any: ...
    def bool(self, p: float = 0.5) -> bool: ...
    def float(self, lo: float, hi: float) -> float: ...


class RandomDraw:
    """Choices from a seeded :class:`random.Random` (long unshrunk runs)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.rng.randrange(len(options))]

    def bool(self, p: float = 0.5) -> bool:
        return self.rng.random() < p

    def float(self, lo: float, hi: float) -> float:
        return self.rng.uniform(lo, hi)


class _HypothesisDraw:
    """Choices from Hypothesis ``draw`` (shrinkable); probabilities become plain booleans, shrinking to False."""

    def __init__(self, draw: Any) -> None:
        from hypothesis import strategies as st

        self.draw, self.st = draw, st

    def int(self, lo: int, hi: int) -> int:
        return self.draw(self.st.integers(lo, hi))

    def choice(self, options: Sequence[Any]) -> Any:
        return self.draw(self.st.sampled_from(list(options)))

    def bool(self, p: float = 0.5) -> bool:
        # integers shrink towards lo: 0 means False, so failing nets shrink towards fewer features
        return self.draw(self.st.integers(0, 99)) >= round(100 * (1 - p))

    def float(self, lo: float, hi: float) -> float:
        return self.draw(self.st.floats(lo, hi, allow_nan=False, allow_infinity=False))


def net_specs(max_ops: int = 8) -> Any:
    """Hypothesis strategy of net specs (see :func:`generate_spec`)."""
    from hypothesis import strategies as st

    @st.composite
    def specs(draw: Any) -> dict[str, Any]:
        return generate_spec(_HypothesisDraw(draw), max_ops=max_ops)

    return specs()


def option_sets() -> Any:
    """Hypothesis strategy of approximate pass options (see :func:`approximate_options`)."""
    from hypothesis import strategies as st

    @st.composite
    def options(draw: Any) -> dict[str, Any]:
        return approximate_options(_HypothesisDraw(draw))

    return options()


# ----------------------------------------------------------------------------------------------- specs


def _conv_out(size: int, k: int, s: int, p: int | str, d: int) -> int:
    if p == "same":
        return size
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_shape(conv: dict[str, Any], shape: list[int]) -> list[int] | None:
    """Output (C, H, W) of a conv spec on an input shape, or None where the conv is invalid there."""
    c, h, w = shape
    if c != conv["in"]:
        return None
    kh, kw = conv["k"]
    p = conv["padding"]
    if conv["padding_mode"] != "zeros":
        # reflect needs padding < size; circular/replicate need padding <= size ("same" pads d·(k-1), split)
        pad_h, pad_w = (p, p) if p != "same" else (
            -(-conv["dilation"] * (kh - 1) // 2), -(-conv["dilation"] * (kw - 1) // 2))
        slack = 1 if conv["padding_mode"] == "reflect" else 0
        if pad_h > h - slack or pad_w > w - slack:
            return None
    oh = _conv_out(h, kh, conv["stride"], p, conv["dilation"])
    ow = _conv_out(w, kw, conv["stride"], p, conv["dilation"])
    if oh < 1 or ow < 1:
        return None
    return [conv["out"], oh, ow]


def _draw_conv(d: Draw, shape: list[int]) -> dict[str, Any]:
    c = shape[0]
    divisors = [g for g in range(1, c + 1) if c % g == 0]
    groups = d.choice(divisors) if d.bool(0.25) else 1
    out = groups * d.int(1, max(1, 16 // groups))
    kh = d.choice([1, 3, 2, 5])
    kw = d.choice([1, 2, 3, 5]) if d.bool(0.2) else kh
    stride = 2 if d.bool(0.25) else 1
    dilation = 2 if d.bool(0.2) else 1
    if stride == 1 and d.bool(0.15):
        padding: int | str = "same"
    else:
        padding = d.int(0, (dilation * (max(kh, kw) - 1) + 1) // 2)
    mode = d.choice(["reflect", "circular", "replicate"]) if d.bool(0.15) else "zeros"
    conv = {"op": "conv", "in": c, "out": out, "k": [kh, kw], "stride": stride, "dilation": dilation,
            "padding": padding, "padding_mode": mode, "groups": groups, "bias": d.bool(0.5),
            "post": d.choice(["none", "relu", "bn", "bn_relu"])}
    if _conv_shape(conv, shape) is None:  # too small for this kernel/padding: a plain 1×1 always fits
        conv.update(k=[1, 1], stride=1, dilation=1, padding=0, padding_mode="zeros")
    return conv


def generate_spec(d: Draw, max_ops: int = 8) -> dict[str, Any]:
    """Draw a random valid net spec; every op's output shape is tracked so the net always runs."""
    shape = [d.int(1, 8), d.int(4, 12), d.int(4, 12)]
    shapes = [shape]
    ops: list[dict[str, Any]] = []
    convs: list[int] = []  # op indices of convs (that own a module)
    for _ in range(d.int(1, max_ops)):
        src = len(shapes) - 1 if d.bool(0.7) else d.int(0, len(shapes) - 1)
        cur = shapes[src]
        kind = d.choice(["conv", "conv", "conv", "add", "cat", "pool", "call", "tie"])
        op: dict[str, Any] | None = None
        new: list[int] | None = None
        if kind == "add":
            same = [i for i, s in enumerate(shapes) if s == cur]
            other = d.choice(same)
            op, new = {"op": "add", "src": [src, other]}, list(cur)
        elif kind == "cat":
            fits = [i for i, s in enumerate(shapes) if s[1:] == cur[1:]]
            others = [d.choice(fits) for _ in range(d.int(1, 2))]
            op = {"op": "cat", "src": [src, *others]}
            new = [sum(shapes[i][0] for i in op["src"]), *cur[1:]]
        elif kind == "pool" and min(cur[1:]) >= 2:
            k = d.int(2, min(3, *cur[1:]))
            s = d.int(1, k)
            op = {"op": "pool", "src": src, "kind": d.choice(["max", "avg"]), "k": k, "stride": s}
            new = [cur[0], (cur[1] - k) // s + 1, (cur[2] - k) // s + 1]
        elif kind in ("call", "tie"):
            usable = [j for j in convs if _conv_shape(ops[j], cur) is not None]
            if usable:
                j = d.choice(usable)
                if kind == "call":
                    op = {"op": "call", "src": src, "conv": j}
                else:
                    op = dict(ops[j], src=src, tie=j, bias=d.bool(0.5), post="none")
                new = _conv_shape(ops[j], cur)
        if op is None:  # "conv", or a kind that did not fit here
            op = dict(_draw_conv(d, cur), src=src)
            new = _conv_shape(op, cur)
        assert new is not None
        if op["op"] == "conv":
            convs.append(len(ops))
        ops.append(op)
        shapes.append(new)
    head = None
    if d.bool(0.6):
        c, h, w = shapes[-1]
        pool = d.choice(["avg", "mean", "max", "flatten"])
        head = {"pool": pool, "hidden": d.choice([None, None, 8]), "classes": d.int(1, 10),
                "features": c * h * w if pool == "flatten" else c}
    return {"input": shape, "ops": ops, "head": head}


# ----------------------------------------------------------------------------------------------- the net


class FuzzNet(nn.Module):
    """The module a spec describes. Convs live in ``convs["<op index>"]``; tied convs share the weight Parameter."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = copy.deepcopy(spec)
        self.convs = nn.ModuleDict()
        self.posts = nn.ModuleDict()
        for i, op in enumerate(spec["ops"]):
            if op["op"] != "conv":
                continue
            conv = nn.Conv2d(op["in"], op["out"], tuple(op["k"]), stride=op["stride"], padding=op["padding"],
                             dilation=op["dilation"], groups=op["groups"], bias=op["bias"],
                             padding_mode=op["padding_mode"])
            if "tie" in op:
                conv.weight = self.convs[str(op["tie"])].weight
            self.convs[str(i)] = conv
            if op["post"] in ("bn", "bn_relu"):
                bn = nn.BatchNorm2d(op["out"])
                with torch.no_grad():  # non-trivial statistics, so BN folding mistakes would show
                    bn.running_mean.uniform_(-0.5, 0.5)
                    bn.running_var.uniform_(0.5, 2.0)
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.5, 0.5)
                self.posts[str(i)] = bn
        head = spec.get("head")
        if head:
            width = head["hidden"] or head["classes"]
            self.fc1 = nn.Linear(head["features"], width)
            self.fc2 = nn.Linear(width, head["classes"]) if head["hidden"] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals = [x]
        for i, op in enumerate(self.spec["ops"]):
            kind = op["op"]
            if kind == "conv":
                y = self.convs[str(i)](vals[op["src"]])
                if str(i) in self.posts:
                    y = self.posts[str(i)](y)
                if op["post"] in ("relu", "bn_relu"):
                    y = F.relu(y)
            elif kind == "call":
                y = self.convs[str(op["conv"])](vals[op["src"]])
            elif kind == "add":
                y = vals[op["src"][0]] + vals[op["src"][1]]
            elif kind == "cat":
                y = torch.cat([vals[j] for j in op["src"]], dim=1)
            else:  # pool
                pool = F.max_pool2d if op["kind"] == "max" else F.avg_pool2d
                y = pool(vals[op["src"]], op["k"], op["stride"])
            vals.append(y)
        out = vals[-1]
        head = self.spec.get("head")
        if head:
            if head["pool"] == "avg":
                out = F.adaptive_avg_pool2d(out, 1).flatten(1)
            elif head["pool"] == "mean":
                out = out.mean((2, 3))
            elif head["pool"] == "max":
                out = F.adaptive_max_pool2d(out, 1).flatten(1)
            else:
                out = out.flatten(1)
            out = self.fc1(out)
            if self.fc2 is not None:
                out = self.fc2(F.relu(out))
        return out


# ----------------------------------------------------------------------------------------------- properties


def _passes() -> list[str]:
    from ..passes import list_passes

    return list_passes()


def exact_options() -> dict[str, Any]:
    """Every registered pass in its exact setting (passes fxsurgeon does not know here keep their defaults)."""
    known = _passes()
    opts: dict[str, Any] = {
        "separable": dict(multiplier="full", kernel_sizes="all", include_stem=True, include_unprofitable=True),
        "conv_head": {},
        "concat_fusion": dict(mode="identity"),
    }
    return {k: v for k, v in opts.items() if k in known}


def approximate_options(d: Draw) -> dict[str, Any]:
    """Random pass options: each pass on or off, uniform / energy / per-layer ranks, every separable form,
    exclusions, channel reductions — and, now and then, an invalid value, which must be a SurgeryError."""
    from ..forms.registry import FORMS

    known = _passes()
    opts: dict[str, Any] = {}
    if "separable" in known:
        # pw-pw (1×1 convs only) takes no uniform setting: it is exercised by budgets and layers, not here
        sep: dict[str, Any] = {"kernel_sizes": d.choice([(3,), (3, 5), "all", (1, 3)]), "include_stem": d.bool(0.5),
                               "form": d.choice(sorted(f for f in FORMS if f != "pw-pw"))}
        if sep["form"] != "dw-pw" or d.bool(0.5):  # energy= is a dw-pw option
            sep["multiplier"] = d.choice([1, 2, 3, 4, "full"])
        else:
            sep["energy"] = round(d.float(0.3, 0.99), 3)
        if d.bool(0.2):
            sep["include_unprofitable"] = True
        if d.bool(0.1):
            sep["exclude"] = [d.choice(["convs.1*", "convs.?", "*"])]
        if d.bool(0.15):  # per-layer settings, some naming layers that do not exist
            sep["layers"] = {f"convs.{d.int(0, 9)}": {"rank": d.int(1, 4)} for _ in range(d.int(1, 3))}
        opts["separable"] = sep if d.bool(0.9) else False
    if "conv_head" in known:
        opts["conv_head"] = {"fully_convolutional": d.bool(0.3)} if d.bool(0.8) else False
    if "concat_fusion" in known and d.bool(0.5):
        cf: dict[str, Any] = {"mode": d.choice(["identity", "reduce"])}
        if cf["mode"] == "reduce":
            if d.bool(0.5):
                cf["ratio"] = round(d.float(0.2, 0.9), 2)
            else:
                cf["out_channels"] = d.int(1, 40)
            cf["force"] = d.bool(0.3)
        opts["concat_fusion"] = cf
    if d.bool(0.05):  # invalid on purpose: refused before any work, never a crash
        name, bad = d.choice([("separable", {"multiplier": 0}), ("separable", {"energy": 1.5}),
                              ("separable", {"form": "no-such-form"}), ("separable", {"kernel_sizes": "3"}),
                              ("separable", {"layers": {"convs.0": {"rank": 0}}}),
                              ("concat_fusion", {"mode": "sideways"}), ("conv_head", {"no_such_option": 1})])
        if name in known:
            base = opts.get(name) or {}
            opts[name] = {k: v for k, v in base.items() if k not in ("multiplier", "energy")} | bad
    return opts


class _Snapshot:
    """The caller-visible state of a model: weights/buffers (values and identity of ties), modes, grads."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.modes = {n: m.training for n, m in model.named_modules()}
        self.grads = {n: p.requires_grad for n, p in model.named_parameters()}
        self.params = {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}

    def check(self) -> None:
        now = self.model.state_dict()
        assert now.keys() == self.state.keys(), "the caller's model gained or lost tensors"
        for k, v in self.state.items():
            assert torch.equal(now[k], v), f"the caller's model was modified: {k} changed"
        assert self.modes == {n: m.training for n, m in self.model.named_modules()}, "train/eval modes changed"
        assert self.grads == {n: p.requires_grad for n, p in self.model.named_parameters()}, "requires_grad changed"
        assert self.params == {n: id(p) for n, p in self.model.named_parameters(remove_duplicate=False)}, \
            "the caller's Parameter objects were replaced"


def _setup(spec: dict[str, Any], seed: int, dtype: torch.dtype, train: bool, freeze: bool):
    torch.manual_seed(seed)
    model = FuzzNet(spec).to(dtype)
    model.train(train)
    if freeze:
        for i, p in enumerate(model.parameters()):
            if i % 2 == 0:
                p.requires_grad_(False)
    x = torch.randn(2, *spec["input"], dtype=dtype)
    return model, x


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    modes = {n: m.training for n, m in model.named_modules()}
    model.eval()
    with torch.no_grad():
        y = model(x)
    for n, m in model.named_modules():
        m.training = modes[n]
    return y


def _run_eval(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gm.eval()
    with torch.no_grad():
        return gm(x)


def _no_bug(exc: SurgeryError) -> None:
    """A SurgeryError is an allowed refusal, unless fxsurgeon says it is its own bug."""
    if "bug in fxsurgeon" in str(exc):
        raise AssertionError(f"fxsurgeon reported a bug: {exc}") from exc


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def _round_trip(gm: nn.Module, spec: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> None:
    from ..io import load, save

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.safetensors"
        save(gm, path, source={"factory": "fxsurgeon.testing.fuzz:FuzzNet", "kwargs": {"spec": spec}})
        again = load(path)
    y2 = _run_eval(again, x)
    assert torch.equal(y2, y), f"save → load changed the outputs (max abs diff {float((y2 - y).abs().max()):.3g})"


def check_exact(
    spec: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32, train: bool = False,
    freeze: bool = False, round_trip: bool = False,
) -> dict[str, Any]:
    """Exact recipe on the spec's net: outputs reproduced within tolerance, record present, caller untouched.

    Returns a summary (rewrites, skips per pass); raises AssertionError naming the violated property.
    """
    from ..convert import convert
    from ..record import get_record

    model, x = _setup(spec, seed, dtype, train, freeze)
    snap = _Snapshot(model)
    ref = _reference(model, x)
    gm = convert(model, example_inputs=x, **exact_options())  # any exception here is a finding
    snap.check()
    rec = get_record(gm)
    assert all(r.exact for r in rec.rewrites), [r.target for r in rec.rewrites if not r.exact]
    assert gm.training == train, "convert() did not keep the train/eval mode"
    y = _run_eval(gm, x)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert y.shape == ref.shape and y.dtype == ref.dtype, f"output {tuple(y.shape)}/{y.dtype} vs {tuple(ref.shape)}"
    err = _rel(y, ref)
    assert err <= tol, f"exact recipe changed the output: relative L2 error {err:.3g} > {tol:g}"
    if round_trip:
        _round_trip(gm, spec, x, y)
        snap.check()
    return {"rewrites": len(rec.rewrites), "skipped": len(rec.skipped), "rel_error": err,
            "passes": sorted({r.pass_name for r in rec.rewrites})}


def check_approximate(
    spec: dict[str, Any], options: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32,
    train: bool = False, freeze: bool = False, round_trip: bool = False,
) -> dict[str, Any]:
    """Approximate recipe: a SurgeryError, or finite outputs of the right shape and dtype with a record.

    Either way the caller's model is unchanged. Returns ``{"refused": message}`` or a summary.
    """
    from ..convert import convert
    from ..record import get_record

    model, x = _setup(spec, seed, dtype, train, freeze)
    snap = _Snapshot(model)
    ref = _reference(model, x)
    try:
        gm = convert(model, example_inputs=x, **options)
    except SurgeryError as exc:
        snap.check()
        _no_bug(exc)
        return {"refused": str(exc)}
    snap.check()
    rec = get_record(gm)
    assert rec.verification is not None, "convert() had example inputs but recorded no verification"
    if torch.isfinite(ref).all():
        assert math.isfinite(rec.verification.rel_error), f"verification error {rec.verification.rel_error}"
    y = _run_eval(gm, x)
    assert y.shape == ref.shape and y.dtype == ref.dtype, f"output {tuple(y.shape)}/{y.dtype} vs {tuple(ref.shape)}"
    if torch.isfinite(ref).all():
        assert torch.isfinite(y).all(), "approximate recipe produced non-finite outputs"
    if round_trip:
        _round_trip(gm, spec, x, y)
        snap.check()
    return {"rewrites": len(rec.rewrites), "skipped": len(rec.skipped), "rel_error": rec.verification.rel_error,
            "passes": sorted({r.pass_name for r in rec.rewrites})}
