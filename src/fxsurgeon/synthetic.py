"""Calibration inputs without data: images whose activations have the statistics the BatchNorms remember.

A trained BatchNorm keeps the mean and variance of its input over the training set. Inputs optimised so that,
at every BatchNorm, the batch's per-channel mean and standard deviation match those running statistics
("distilled data", ZeroQ: Cai et al., CVPR 2020) exercise the network much like real images do, and can
stand in for them where only activations' statistics matter — the least-squares refit of
:func:`fxsurgeon.calibrate` and the data-aware rank allocation. No weight of the model changes; only the
inputs are optimised, from a seeded start, so the same model and options give the same images.

    x* = argmin_x Σ_BN ||μ_B(x) − μ_BN||₂ + ||σ_B(x) − σ_BN||₂      (Adam from seeded noise)

The start is smooth by default: N(0, 1) drawn at half the height and width, upsampled bilinearly and scaled
to unit standard deviation. Natural images are smooth at the pixel scale and white noise is not, so Adam
no longer spends its first steps removing high frequencies: on the ResNet-20, 128 images × 50 steps from the
smooth start calibrate about as well as 512 × 200 from white noise (issue 22, ``benchmarks/defaults_two_models.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SurgeryError
from .modes import eval_modes as _eval_modes
from .runtime import device_of

__all__ = ["DEFAULT_COUNT", "DEFAULT_INIT", "DEFAULT_LR", "DEFAULT_SCHEDULE", "DEFAULT_STEPS", "DEFAULT_TOL", "INITS", "SCHEDULES",
           "SyntheticData", "synthesize"]

#: images made by default, Adam steps per batch and the learning rate. From the smooth start, 128 images ×
#: 50 steps (a sixteenth of the earlier image-steps) calibrate the ResNet-20 about as well as the earlier
#: 512 × 200 from white noise: logit error 0.207 vs 0.204 at 0.60× MACs, 0.325 vs 0.326 at 0.45×, in 35-40 s
#: with the refit on 2 CPU cores instead of ~500 s (issue 22). 160 × 64 matched 0.204 / 0.324 but took
#: 52-72 s. ``benchmarks/defaults_two_models.py --synthetic`` measures other settings: logit error, agreement,
#: accuracy and seconds per (images, steps, lr, options), on either CIFAR ResNet
DEFAULT_COUNT = 128
DEFAULT_STEPS = 50
DEFAULT_LR = 0.1
#: how the learning rate moves over the steps, and the plateau that ends a batch early (0: never). At 50
#: steps the loss still falls, and a cosine decay from a larger lr reached a lower loss but a worse refit
DEFAULT_SCHEDULE = "constant"
DEFAULT_TOL = 0.0
SCHEDULES = ("constant", "cosine")
#: the start: ``"smooth"`` (half-resolution noise, upsampled; images of two or more spatial sizes) or ``"noise"``
DEFAULT_INIT = "smooth"
INITS = ("smooth", "noise")


@dataclass
class SyntheticData:
    """What :func:`synthesize` made: the images and how well they match (``loss`` per step, first and last)."""

    images: torch.Tensor
    batchnorms: int
    loss_start: float
    loss_end: float
    steps: int
    seconds: float
    history: list[float] = field(default_factory=list, repr=False)
    #: Adam steps each batch took (fewer than ``steps`` where early stopping ended it)
    steps_run: list[int] = field(default_factory=list)

    def batches(self, size: int = 64) -> list[torch.Tensor]:
        """The images in batches of ``size`` (the form :func:`fxsurgeon.convert`'s ``calibration=`` takes)."""
        return list(self.images.split(size))


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None]


def _start(n: int, shape: tuple[int, ...], init: str, gen: torch.Generator) -> torch.Tensor:
    """``n`` seeded starting inputs: white N(0, 1), or (``"smooth"``, for ``(C, H, W)`` with H, W ≥ 2) N(0, 1) at
    half the height and width, upsampled bilinearly and scaled to unit standard deviation."""
    if init == "smooth" and len(shape) == 3 and min(shape[1:]) >= 2:
        z = torch.randn((n, shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2), generator=gen)
        z = nn.functional.interpolate(z, size=shape[1:], mode="bilinear", align_corners=False)
        return z / z.std().clamp_min(1e-12)
    return torch.randn((n, *shape), generator=gen)


def _lr_at(step: int, steps: int, lr: float, schedule: str) -> float:
    """The learning rate of ``step`` (0-based): constant, or a half cosine from ``lr`` down to ``lr / 100``."""
    if schedule == "constant" or steps <= 1:
        return lr
    return lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * step / (steps - 1))))


def _match(model: nn.Module, x: torch.Tensor, losses: list[torch.Tensor], steps: int, lr: float,
           schedule: str = "constant", tol: float = 0.0,
           window: int = 10) -> tuple[torch.Tensor, list[float], float]:
    """Adam on the pixels of ``x`` against the BatchNorm-matching loss the hooks append to ``losses``.

    Stops early when, over the last ``window`` steps, the loss fell by less than ``tol`` of itself (``tol=0``:
    never). Returns the images, the loss at every step taken, and the loss of the final images.
    """
    x = x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    seen: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, schedule)
        losses.clear()
        model(x)
        loss = torch.stack(losses).sum()
        (grad,) = torch.autograd.grad(loss, [x])
        x.grad = grad
        opt.step()
        seen.append(float(loss.detach()))
        if not math.isfinite(seen[-1]):
            raise SurgeryError(f"synthesize: the BatchNorm-matching loss became {seen[-1]} at step {step}; "
                               "try a smaller lr")
        # a plateau: more steps would cost time and not move the statistics the refit reads
        if tol > 0 and len(seen) > window and seen[-1 - window] - seen[-1] < tol * seen[-1]:
            break
    with torch.no_grad():
        losses.clear()
        model(x)
        return x.detach(), seen, float(torch.stack(losses).sum())


def synthesize(
    model: nn.Module,
    shape: Sequence[int],
    *,
    count: int = DEFAULT_COUNT,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = 128,
    seed: int = 0,
    schedule: str = DEFAULT_SCHEDULE,
    tol: float = DEFAULT_TOL,
    init: str = DEFAULT_INIT,
) -> SyntheticData:
    """Optimise ``count`` inputs of ``shape`` (one image, e.g. ``(3, 32, 32)``) to match ``model``'s BatchNorms.

    The model runs in eval mode (its BatchNorms normalise with their running statistics, as in deployment);
    forward hooks read each BatchNorm's *input* statistics over the batch. Gradients flow to the inputs
    only: no parameter, buffer or mode of ``model`` changes.

    Args:
        model: a model with BatchNorm layers (with running statistics). Any device; the images are made there.
        shape: one input's shape, without the batch dimension.
        count: how many images; made ``batch_size`` at a time (each batch matched on its own, as in ZeroQ).
        steps: Adam steps per batch.
        lr: Adam's learning rate on the input pixels.
        seed: the start is ``N(0, 1)`` from this seed: the same call gives the same images.
        schedule: ``"cosine"`` (the learning rate falls from ``lr`` to ``lr / 100`` over ``steps``) or
            ``"constant"``.
        tol: stop a batch early once its loss fell by less than this share over the last 10 steps
            (``0``: always run ``steps``). ``SyntheticData.steps_run`` says how many ran.
        init: the start, ``"smooth"`` (seeded noise at half resolution, upsampled: for ``(C, H, W)`` shapes;
            others start from white noise) or ``"noise"`` (white N(0, 1), the start before issue 22).

    Raises:
        SurgeryError: no BatchNorm with running statistics to match, or bad arguments.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> data = synthesize(net, (3, 8, 8), count=4, steps=5)
    >>> data.images.shape, data.loss_end < data.loss_start
    (torch.Size([4, 3, 8, 8]), True)
    """
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise SurgeryError(f"synthesize: shape must be one input's positive sizes (no batch dimension), got {shape}")
    for name, v in (("count", count), ("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SurgeryError(f"synthesize: {name} must be an int >= 1, got {v!r}")
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise SurgeryError(f"synthesize: lr must be a positive number, got {lr!r}")
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise SurgeryError(f"synthesize: schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
    if not isinstance(init, str) or init not in INITS:
        raise SurgeryError(f"synthesize: init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and 0 <= tol < 1):
        raise SurgeryError(f"synthesize: tol must be a number in [0, 1) (0 turns early stopping off), got {tol!r}")
    bns = _batchnorms(model)
    if not bns:
        raise SurgeryError(f"synthesize: {type(model).__name__} has no BatchNorm with running statistics to match; "
                           "pass real calibration data instead")
    dev = device_of(model) or torch.device("cpu")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    targets = [(bn.running_mean.detach().float(), (bn.running_var.detach().float() + bn.eps).sqrt()) for _, bn in bns]
    losses: list[torch.Tensor] = []

    def hook_for(i: int):
        mean_t, std_t = targets[i]

        def hook(mod, args, out):
            x = args[0]
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x, dims, unbiased=False)
            std = (var + mod.eps).sqrt()
            losses.append((mean - mean_t).norm() + (std - std_t).norm())
        return hook

    handles = [bn.register_forward_hook(hook_for(i)) for i, (_, bn) in enumerate(bns)]
    images, history, steps_run = [], [], []
    start = end = 0.0
    try:
        with _eval_modes(model):
            for first in range(0, count, batch_size):
                n = min(batch_size, count - first)
                x = _start(n, shape, init, gen).to(dev, dtype)
                x, losses_seen, final = _match(model, x, losses, steps, lr, schedule, float(tol))
                steps_run.append(len(losses_seen))
                if first == 0:
                    history = losses_seen
                start += losses_seen[0] * n / count
                end += final * n / count
                images.append(x)
    finally:
        for h in handles:
            h.remove()
    return SyntheticData(torch.cat(images), len(bns), start, end, steps, time.perf_counter() - t0, history,
                         steps_run)
