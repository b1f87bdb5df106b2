"""Distil a converted model back towards the original: fine-tune it on the original's logits (CPU-friendly).

Run (from the repository root; the distillation step stops after 9 minutes by default, ``--time-limit``):

    .venv/bin/python recipes/distill.py --target-macs 0.45 --out resnet20_macs045.safetensors

That converts the trained CIFAR-10 ResNet-20 of ``shared/data`` (every 3×3 conv but the stem) to 45 % of its
MACs with budget allocation and calibration on ``x[0::2]``, fine-tunes it against the original's logits on
the same images (random crops and flips), reports accuracy on ``x[1::2]`` before and after, and saves it
with :func:`fxsurgeon.save` (``fxsurgeon.load`` rebuilds it). ``--converted FILE`` starts from a model
saved by fxsurgeon instead of converting.

The loss is Hinton et al.'s (2015) distillation loss, ``T² · KL(softmax(t/T) ‖ softmax(s/T))``: no labels
are needed, so any unlabelled images from the training distribution will do. BatchNorm layers stay in eval
mode (their statistics are the original's; a few thousand images are too few to re-learn them), and the
learning rate follows a cosine schedule from ``--lr`` to zero (over ``--epochs``, or over ``--time-limit`` if
that comes first). :func:`distill` is the reusable part.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cifar_augment", "distill", "evaluate", "main"]


def cifar_augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops after zero padding by ``pad`` and random horizontal flips (the usual CIFAR augmentation)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _freeze_norm_stats(model: nn.Module) -> None:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.eval()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    *,
    epochs: float = 3.0,
    batch_size: int = 128,
    lr: float = 1e-4,
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    temperature: float = 4.0,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = cifar_augment,
    train_batchnorm: bool = False,
    seed: int = 0,
    time_limit: float | None = None,
    channels_last: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Fine-tune ``student`` in place to reproduce ``teacher``'s logits on ``images``.

    Args:
        student: the converted model (its parameters are trained; ``requires_grad`` flags are respected).
        teacher: the original model (run in eval mode, never changed).
        images: unlabelled inputs (N, C, H, W) from the training distribution.
        epochs: passes over ``images`` (fractions allowed); the schedule is cosine over all of them.
        batch_size / lr / weight_decay: AdamW settings. The student starts close to the teacher (converted and
            calibrated), so the learning rate is a fine-tuning one: a larger one, or no warm-up, throws
            away in the first steps what conversion kept (ResNet-20, CP form at 0.60× MACs: 80.9 % → 44 % after
            61 steps at 1e-3 without warm-up).
        warmup: fraction of the schedule over which the learning rate rises linearly from 0 to ``lr``.
        temperature: softening of both distributions in the KL loss.
        augment: ``fn(batch, generator) -> batch`` applied to each batch (None: no augmentation).
        train_batchnorm: also update BatchNorm statistics (default: keep the original's).
        seed: seeds shuffling, augmentation and anything random in the model.
        time_limit: stop after this many seconds even if epochs remain; the cosine schedule then follows
            whichever of steps or time runs out first, so the run still ends annealed (and the result
            depends on the machine's speed).
        channels_last: train in channels-last memory format (about twice as fast for depthwise convs on
            CPU); the student is returned in the default format.
        progress: show a tqdm progress bar.

    Returns:
        ``{"steps", "seconds", "loss_first", "loss_last"}`` (mean loss over the first / last 10 % of steps).
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student.to(memory_format=fmt)
    modes = {name: m.training for name, m in student.named_modules()}
    teacher_modes = {name: m.training for name, m in teacher.named_modules()}
    teacher.eval()
    if train_batchnorm:
        student.train()
    else:
        _freeze_norm_stats(student)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, disable=not progress, desc="distill", unit="step")
    step = 0
    stop = False
    try:
        while not stop:
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                if step >= total or (time_limit is not None and time.perf_counter() - t0 > time_limit):
                    stop = True
                    break
                done = step / total
                if time_limit is not None:
                    done = max(done, (time.perf_counter() - t0) / time_limit)
                rise = min(1.0, done / warmup) if warmup > 0 else 1.0
                for group in opt.param_groups:  # linear warm-up, then cosine to 0 over the steps (or time) allowed
                    group["lr"] = lr * rise * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
                x = images[order[i:i + batch_size]]
                if augment is not None:
                    x = augment(x, gen)
                with torch.no_grad():
                    target = F.log_softmax(teacher(x) / temperature, dim=1)
                out = F.log_softmax(student(x.contiguous(memory_format=fmt)) / temperature, dim=1)
                loss = F.kl_div(out, target, log_target=True, reduction="batchmean") * temperature**2
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            stop = stop or step >= total
    finally:
        bar.close()
        student.to(memory_format=torch.contiguous_format)
        for name, m in student.named_modules():
            m.training = modes.get(name, m.training)
        for name, m in teacher.named_modules():
            m.training = teacher_modes.get(name, m.training)
    k = max(1, len(losses) // 10)
    return {"steps": float(len(losses)), "seconds": time.perf_counter() - t0,
            "loss_first": sum(losses[:k]) / k if losses else float("nan"),
            "loss_last": sum(losses[-k:]) / k if losses else float("nan")}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent (eval mode, no grad; the model's modes are restored)."""
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    for name, m in model.named_modules():
        m.training = modes.get(name, m.training)
    return 100.0 * correct / len(x)


def main(argv: Sequence[str] | None = None) -> int:
    import fxsurgeon
    from fxsurgeon.models import default_data_dir, load_cifar10_test, load_resnet20, resnet20

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder with the shared data (default: $FXSURGEON_DATA or ../shared/data)")
    p.add_argument("--converted", default=None, help="start from this fxsurgeon-saved model instead of converting")
    p.add_argument("--target-macs", type=float, default=0.45, help="MAC budget as a fraction of the original (0.45)")
    p.add_argument("--form", default="dw-pw", help="separable form, or 'auto' to choose per layer (dw-pw)")
    p.add_argument("--calibration-images", type=int, default=2500, help="images of x[0::2] to calibrate on (2500)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=540.0,
                   help="stop distilling after this many seconds (540; 0: no limit, run all epochs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="distilled.safetensors", help="where to save the result")
    p.add_argument("--quiet", action="store_true", help="no progress bar (also off when stderr is not a terminal)")
    args = p.parse_args(argv)
    data = Path(args.data) if args.data else default_data_dir()
    wanted = [data / "resnet20-12fca82f.th", data / "cifar10_test_jpeg.npz"]
    if not all(f.is_file() for f in wanted):
        flag = "--data" if args.data else "--data (or $FXSURGEON_DATA)"
        print(f"distill.py: error: {flag}: {str(data)!r} lacks {', '.join(f.name for f in wanted if not f.is_file())}; "
              "give --data FOLDER holding the trained ResNet-20 and the CIFAR-10 test set", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    teacher = load_resnet20(data / "resnet20-12fca82f.th" if data else None)
    x_cal, _ = load_cifar10_test(data / "cifar10_test_jpeg.npz" if data else None, split="calib")
    x_ev, y_ev = load_cifar10_test(data / "cifar10_test_jpeg.npz" if data else None, split="eval")
    print(f"original: {evaluate(teacher, x_ev, y_ev):.2f} % on x[1::2]")

    t = time.perf_counter()
    if args.converted:
        student = fxsurgeon.load(args.converted)
    else:
        gen = torch.Generator().manual_seed(args.seed)
        pick = torch.randperm(len(x_cal), generator=gen)[: args.calibration_images]
        calib = [x_cal[pick[i:i + 250]] for i in range(0, len(pick), 250)]
        student = fxsurgeon.convert(teacher, example_inputs=x_cal[:1], calibration=calib, source=resnet20,
                                    separable=dict(target_macs=args.target_macs, form=args.form))
        frac = fxsurgeon.get_record(student).extras["allocation"]["macs_fraction"]
        print(f"converted to {frac:.3f} of the MACs and calibrated in {time.perf_counter() - t:.0f} s")
    print(f"before distillation: {evaluate(student, x_ev, y_ev):.2f} % on x[1::2]")
    stats = distill(student, teacher, x_cal, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    temperature=args.temperature, seed=args.seed, time_limit=args.time_limit or None,
                    progress=not args.quiet and sys.stderr.isatty())
    print(f"distilled {int(stats['steps'])} steps in {stats['seconds']:.0f} s "
          f"(loss {stats['loss_first']:.4f} → {stats['loss_last']:.4f})")
    print(f"after distillation: {evaluate(student, x_ev, y_ev):.2f} % on x[1::2]")
    fxsurgeon.save(student, args.out)
    print(f"saved to {args.out} (fxsurgeon.load rebuilds it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
