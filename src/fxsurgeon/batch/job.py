"""One batch job: what to convert (:class:`Job`) and :func:`convert_one`, which builds, converts, verifies and
counts one model in the calling process; with the perturbation that makes zero-initialised branches show.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..cli.common import load_model
from ..errors import SurgeryError

__all__ = ["RESULT_KEYS", "STATUSES", "Job", "convert_one", "empty_result", "perturb_constant_params", "rounding_sensitivity", "silencing_params"]


#: keys every result line carries (None where not known)
RESULT_KEYS = (
    "model", "status", "error", "cause", "phase", "params_before", "params_after", "macs_before", "macs_after",
    "macs_error", "perturbed", "max_abs_error", "rel_error", "tolerance", "exact_expected", "verified",
    "verified_dtype", "input_shape",
    "passes", "skip_reasons", "seconds", "seconds_by_step", "recipe", "config", "versions", "finished",
)


STATUSES = ("ok", "skipped", "error", "timeout")


@dataclass(frozen=True)
class Job:
    """One model to convert, with everything the isolated process needs (picklable, JSON-able).

    Attributes:
        model: timm name, ``package.module:factory`` or a saved model file.
        recipe: ``convert()`` keyword arguments (see :func:`fxsurgeon.recipes.load_recipe`).
        recipe_name: for the record (a file name).
        input_size: (C, H, W) for every model; None picks a small one per model (see ``image_size``).
        image_size: with ``input_size=None``: try H = W = this first (timm models that take ``img_size=``
            are built for it), and fall back to the model's own ``pretrained_cfg["input_size"]`` when the
            model does not run at that size.
        batch_size: example batch for verification and MAC counting.
        max_params: skip (status ``skipped``) models with more parameters, counted on the meta device.
        seed: for the random example input and the random weights.
        threads: torch intra-op threads in the model's process (None: torch's default).
        timeout: seconds before the model's process group is killed (None: no limit).
        max_memory: address-space limit in bytes for the model's process (``RLIMIT_AS``; None: none), so
            one huge model fails alone instead of waking the machine's out-of-memory killer. It counts
            virtual memory, which starts at about 4 GB once torch and timm are loaded.
        count_macs: count MACs before/after with fvcore.
        perturb_init: give constant-initialised parameters random values first (see
            :func:`perturb_constant_params`): random-init timm models silence whole residual branches with
            zero-initialised norms and 1e-6 layer scales, and a verification that cannot see a branch cannot
            catch a wrong rewrite in it.
    """

    model: str
    recipe: dict[str, Any] = field(default_factory=dict)
    recipe_name: str | None = None
    input_size: tuple[int, int, int] | None = None
    image_size: int = 64
    batch_size: int = 1
    max_params: int | None = None
    seed: int = 0
    threads: int | None = None
    timeout: float | None = None
    max_memory: int | None = None
    count_macs: bool = True
    perturb_init: bool = True

    def config(self) -> str:
        """A short hash of the settings that change a result: a rerun with the same one may skip the model."""
        keys = {"recipe": self.recipe, "input_size": self.input_size, "image_size": self.image_size,
                "batch_size": self.batch_size, "max_params": self.max_params, "seed": self.seed,
                "count_macs": self.count_macs, "perturb_init": _PERTURB_SCHEME if self.perturb_init else False}
        blob = json.dumps(keys, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def empty_result(model: str) -> dict[str, Any]:
    return dict.fromkeys(RESULT_KEYS) | {"model": model}


def convert_one(job: Job, phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build, convert, verify and count one model; the job function of every batch process.

    Runs in the calling process (the batch runs it in an isolated one through :func:`run_isolated`).
    Exceptions propagate; ``phase`` is told each step (``count``, ``build``, ``convert``, ``macs``) so a
    timeout or a crash can say where it happened.

    Returns:
        A result dict with :data:`RESULT_KEYS`: status ``ok`` (converted, and verified when the recipe
        verifies) or ``skipped`` (over ``max_params``).
    """
    import torch

    from ..convert import convert
    from ..record import get_record

    tell = phase or (lambda _: None)
    t0 = time.perf_counter()
    torch.manual_seed(job.seed)
    if job.threads:
        torch.set_num_threads(job.threads)
    out = empty_result(job.model)
    steps: dict[str, float] = {}
    if job.max_params is not None:
        tell("count")
        t = time.perf_counter()
        n = _meta_param_count(job.model)
        steps["count"] = time.perf_counter() - t
        if n is not None and n > job.max_params:
            out.update(status="skipped", params_before=n, error=f"{n:,} parameters > max_params {job.max_params:,}",
                       cause="over max_params", seconds_by_step=steps, seconds=time.perf_counter() - t0)
            return out
    tell("build")
    t = time.perf_counter()
    model, x, out["perturbed"] = _model_and_input(job)
    steps["build"] = time.perf_counter() - t
    out["input_shape"] = list(x.shape)
    tell("convert")
    recipe = dict(job.recipe)
    try:
        converted = convert(model, example_inputs=x, **recipe)
    except SurgeryError as exc:
        if "claim to be exact" not in str(exc) or not _chaotic(model, x, recipe.get("tolerance")):
            raise
        # float32 rounding alone fails the comparison on this random-init model: verify the same conversion
        # in float64, where rounding is ~1e-16 and the exactness check means something again
        model, x = model.double(), x.double()
        try:
            converted = convert(model, example_inputs=x, **recipe)
        except SurgeryError as exc64:
            _raise_if_chaotic(model, x, exc64, recipe.get("tolerance"))
            raise
        out["verified_dtype"] = "float64"
    rec = get_record(converted)
    steps.update({f"convert.{k}": v for k, v in rec.seconds.items()})
    out.update(status="ok", params_before=rec.params_before, params_after=rec.params_after,
               passes=rec.counts(), skip_reasons=_skip_reasons(rec))
    v = rec.verification
    out["verified"] = v is not None
    if v is not None:
        out.update(max_abs_error=v.max_abs_error, rel_error=v.rel_error, tolerance=v.tolerance,
                   exact_expected=v.exact_expected)
    if job.count_macs:
        tell("macs")
        t = time.perf_counter()
        try:
            out["macs_before"] = _count_macs(model, x)
            out["macs_after"] = _count_macs(converted, x)
        except Exception as exc:  # counting is a report, not the conversion: the model still converted
            out["macs_error"] = f"{type(exc).__name__}: {_first_line(str(exc))}"
        steps["macs"] = time.perf_counter() - t
    out["seconds_by_step"] = steps
    out["seconds"] = time.perf_counter() - t0
    return out


#: names the perturbation rule in each result's settings hash: a rerun after it changes converts again
_PERTURB_SCHEME = "zero-gates-U(0.05,0.15)"


# zero-initialised parameters that add rather than multiply: they silence nothing, and shifting every bias
# of a deep random network makes its activations grow without bound
_NOT_GATES = ("bias", "token", "embed", "pos")


def rounding_sensitivity(model, x, delta: float = 1e-6) -> float:
    """Relative output change of ``model`` when its input is scaled by ``1 + delta``: ~delta when tame.

    A network whose output moves by much more than ``delta`` amplifies float rounding: comparing outputs
    cannot tell an exact rewrite (whose only change is rounding) from a wrong one.
    """
    import torch

    from ..verify import compare_outputs

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, rel = compare_outputs(model(x), model(x * (1 + delta)))
    finally:
        model.train(was)
    return rel


def _chaotic(model, x, tolerance: float | None) -> bool:
    """Whether ``model`` amplifies a rounding-sized input change past the exactness tolerance."""
    return rounding_sensitivity(model, x) > (tolerance if tolerance is not None else 1e-4)


def _raise_if_chaotic(model, x, exc: Exception, tolerance: float | None) -> None:
    """After an exactness failure: when the original itself amplifies rounding past the tolerance, say so."""
    tol = tolerance if tolerance is not None else 1e-4
    sens = rounding_sensitivity(model, x)
    if sens > tol:
        raise SurgeryError(
            f"unverifiable: this randomly initialised model is numerically chaotic — scaling its input by "
            f"1 + 1e-6 changes its output by {sens:.3g} (relative L2), more than the tolerance {tol:g}, so float "
            f"rounding alone fails an exact comparison ({exc})"
        ) from exc


def perturb_constant_params(model, seed: int = 0) -> int:
    """Give parameters that initialisation left at zero small random values; returns how many changed.

    A freshly built timm model sets the last norm of each residual block to zero (``zero_init_last``),
    layer scales to 1e-6, NFNet skip gains to 0: the branch behind them contributes nothing (or 1e-6) to the
    output, so comparing outputs cannot see an error in it. Every multiplying parameter (not a bias, token
    or embedding, which add) whose elements are all the same value of magnitude ≤ 1e-5 gets values drawn
    from U(0.05, 0.15): the branch then counts for about a tenth, enough for a wrong rewrite to show, and
    the network stays about as tame as at initialisation. (Larger values, or perturbing biases and the
    norms' unit weights too, make deep random networks chaotic: EfficientNetV2-S then amplifies a 1e-6
    input change to a 0.4 relative output change, and float32 rounding fails any exactness check.)
    Trained weights are never constant, so trained models are left alone.

    >>> import torch.nn as nn
    >>> bn = nn.BatchNorm2d(4); _ = nn.init.zeros_(bn.weight)
    >>> perturb_constant_params(bn), bool((bn.weight > 0).all()), bool((bn.bias == 0).all())
    (1, True, True)
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    changed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0 or p.device.type == "meta":
                continue
            if any(word in name.rsplit(".", 1)[-1].lower() for word in _NOT_GATES):
                continue
            flat = p.detach().reshape(-1)
            if abs(float(flat[0])) > 1e-5 or not bool((flat == flat[0]).all()):
                continue
            p.copy_((0.05 + 0.1 * torch.rand(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype))
            changed += 1
    return changed


def silencing_params(model) -> list[str]:
    """Parameters that are all (near) zero multipliers in a fresh model: norm weights, gains, layer scales.

    Names of floating-point parameters called ``weight``, ``gamma``, ``gain``, ``scale`` (or ending so) whose
    every element has magnitude ≤ 1e-5: whatever branch they scale is invisible in the output.

    >>> import torch.nn as nn
    >>> bn = nn.BatchNorm2d(4); _ = nn.init.zeros_(bn.weight)
    >>> silencing_params(nn.Sequential(bn))
    ['0.weight']
    """
    out = []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1].lower()
        if not p.is_floating_point() or p.numel() == 0 or p.device.type == "meta":
            continue
        if leaf.endswith(("weight", "gamma", "gain", "scale")) and float(p.detach().abs().max()) <= 1e-5:
            out.append(name)
    return out


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


def _skip_reasons(rec) -> dict[str, int]:
    from ..record import reason_key

    # "groups=32 > 1" and "groups=64 > 1" are one reason here
    counts = Counter(re.sub(r"(?<==)\d+", "N", f"{s.pass_name}: {reason_key(s.reason)}") for s in rec.skipped)
    return dict(counts.most_common(8))


def _load(spec: str, **kwargs: Any):
    return load_model(spec, **kwargs)


def _meta_param_count(spec: str) -> int | None:
    """Parameter count without allocating weights (meta device); None when the model cannot be built so."""
    import torch

    try:
        with torch.device("meta"):
            model = _load(spec)
    except Exception:  # some constructors compute with real tensors: count after the real build instead
        return None
    return sum(p.numel() for p in model.parameters())


def _in_chans(model) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") or (3,)
    return int(getattr(model, "in_chans", None) or size[0])


def _default_size(model) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(int(s) for s in cfg.get("input_size") or (3, 224, 224))  # type: ignore[return-value]


def _model_and_input(job: Job):
    """(model in eval mode, seeded random input, parameters perturbed or None): ``input_size``, else small."""
    import torch

    gen = torch.Generator().manual_seed(job.seed)
    perturbed = None

    def build(**kwargs):
        nonlocal perturbed
        model = _load(job.model, **kwargs)
        if job.perturb_init:  # before any forward: some models (levit) cache tensors made from parameters
            perturbed = perturb_constant_params(model, job.seed)
        return model

    if job.input_size is not None:
        return build(), torch.randn(job.batch_size, *job.input_size, generator=gen), perturbed
    small = job.image_size
    sized = False
    model = None
    if _is_timm_name(job.model):
        import timm

        cfg = timm.get_pretrained_cfg(job.model)  # None for names without a pretrained config
        size = getattr(cfg, "input_size", None) if cfg is not None else None
        small = min(small, *size[1:]) if size else small
        try:  # ViTs, Swins, ... fix their position tables at build time: ask for the small size up front
            model = build(img_size=small)
            sized = True
        except Exception:
            model = None
    if model is None:
        model = build()
        small = min(small, *_default_size(model)[1:])
    shape = (_in_chans(model), small, small)
    try:
        with torch.no_grad():
            model(torch.randn(1, *shape, generator=torch.Generator().manual_seed(job.seed)))
    except Exception:  # does not run that small: use the size the model was made for
        if sized:
            model = build()
        shape = _default_size(model)
    return model, torch.randn(job.batch_size, *shape, generator=gen), perturbed


def _is_timm_name(spec: str) -> bool:
    return ":" not in spec and not os.path.exists(spec)


def _count_macs(model, x) -> int:
    """fvcore's total (one multiply-add = 1 MAC), without its per-op warnings."""
    import warnings

    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(model.eval(), (x,))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return int(fca.total())
