"""The CIFAR ResNet of He et al. 2016 (section 4.2), as in akamaster/pytorch_resnet_cifar10.

Written from the description in ``shared/data/README.md`` so that the trained ResNet-20 weights there load
with ``strict=True``: option-A (parameter-free) shortcuts, and a head written functionally,
``F.avg_pool2d(out, out.size(3))`` → ``out.view(out.size(0), -1)`` → ``Linear`` — the form the conv-head pass
must recognise.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CifarResNet",
    "default_data_dir",
    "load_cifar10_test",
    "load_resnet20",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
]

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


class LambdaLayer(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels by ``pad`` on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs: widths 16/32/64, ``num_blocks`` per stage."""

    def __init__(self, num_blocks: tuple[int, int, int] = (3, 3, 3), num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1)
        self.layer2 = self._make_layer(32, num_blocks[1], 2)
        self.layer3 = self._make_layer(64, num_blocks[2], 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size(3))
        out = out.view(out.size(0), -1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet((3, 3, 3), num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet((5, 5, 5), num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet((7, 7, 7), num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet((9, 9, 9), num_classes)


def default_data_dir() -> Path:
    """``$FXSURGEON_DATA``, else ``shared/data`` beside the checkout (``../shared/data`` from the repo root)."""
    env = os.environ.get("FXSURGEON_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "data"
        if (cand / "resnet20-12fca82f.th").exists():
            return cand
        cand = parent / "shared" / "data"
        if (cand / "resnet20-12fca82f.th").exists():
            return cand
    return Path("../shared/data")


def load_resnet20(path: str | os.PathLike | None = None) -> CifarResNet:
    """The trained CIFAR-10 ResNet-20 (akamaster, BSD-2-Clause), strictly loaded, in eval mode."""
    path = Path(path) if path is not None else default_data_dir() / "resnet20-12fca82f.th"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    model = resnet20()
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_cifar10_test(
    path: str | os.PathLike | None = None, split: str = "eval"
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 test images, normalised (N, 3, 32, 32) float32, and labels.

    ``split="calib"`` gives ``x[0::2]`` (for calibration / fine-tuning), ``"eval"`` gives ``x[1::2]`` (every
    reported accuracy), ``"all"`` everything. See ``shared/data/README.md``.
    """
    import numpy as np

    path = Path(path) if path is not None else default_data_dir() / "cifar10_test_jpeg.npz"
    with np.load(path) as data:
        x, y = data["x"], data["y"]
    sl = {"calib": slice(0, None, 2), "eval": slice(1, None, 2), "all": slice(None)}[split]
    xt = torch.from_numpy(np.ascontiguousarray(x[sl])).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (xt - mean) / std, torch.from_numpy(np.ascontiguousarray(y[sl]))
