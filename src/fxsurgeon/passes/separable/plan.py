"""Deciding and building each rewrite: the (form, rank) of a layer, then the replacement modules, built on a
thread pool.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import SurgeryError
from ...forms.decompose import multiplier_for_energy
from ...forms.importance import (
    unscale_separable,
)
from ...forms.registry import get_form
from ...forms.registry import layer_form as form_of_layer  # the pass has an option named layer_form
from ...graph import describe
from .candidates import Candidate

__all__ = ["Planned", "build_all", "layer_setting"]


def layer_setting(
    cand: Candidate, form: str, multiplier: int | str | None, energy: float | None,
    layers: dict[str, dict[str, Any]],
    layer_form: str | None = None,
) -> tuple[str, int]:
    """(form, rank) for one candidate: a per-layer override (its form, else ``layer_form``, by default
    ``form``), else the uniform options."""
    for name in cand.aliases:
        if name in layers:
            spec = layers[name]
            if not isinstance(spec, dict) or "rank" not in spec:
                raise SurgeryError(f"separable: layers[{name!r}] must be a dict with 'rank' (and 'form'), got {spec!r}")
            rank = spec["rank"]
            if isinstance(rank, bool) or not hasattr(rank, "__index__") or operator.index(rank) < 1:
                raise SurgeryError(f"separable: layers[{name!r}]['rank'] must be an int >= 1, got {rank!r}")
            fname = form_of_layer(spec, layer_form or form, cand.conv)
            return fname, operator.index(rank)
    impl = get_form(form)
    if energy is not None:
        return form, multiplier_for_energy(cand.conv.weight, float(energy))
    if multiplier == "full":
        return form, impl.full_rank(cand.conv)
    return form, min(multiplier or 1, impl.full_rank(cand.conv))


@dataclass
class Planned:
    """A candidate with its setting decided, waiting for its replacement to be built."""

    cand: Any
    decomp: nn.Conv2d
    scales: Any
    allotted: Any
    form_name: str
    rank: int
    impl: Any
    before: int
    after: int
    forced: bool


def _build_one(plan: Planned, init: str) -> tuple[nn.Module, dict[str, Any]]:
    try:
        if plan.allotted is not None:
            new, built = plan.allotted.module, plan.allotted.details
        else:
            new, built = plan.impl.build(plan.decomp, plan.rank, init=init)
        if plan.scales is not None:
            unscale_separable(new, plan.scales, plan.cand.conv.bias)
    except SurgeryError as exc:  # e.g. an SVD of meta-device weights: say which layer needed them
        raise SurgeryError(f"separable: layer '{plan.cand.name}' ({describe(plan.cand.conv)}): {exc}") from exc
    return new, built


def _load_cuda_linalg(devices: Iterable[torch.device]) -> None:
    """Run one tiny ``eigh`` on each CUDA device here, before any worker thread does.

    torch loads its CUDA linear-algebra library lazily on the first call, and that first call is not
    thread-safe: two workers reaching it together fail with "lazy wrapper should be called at most once"
    (pytorch/pytorch#90613; met converting timm resnet50 on an H100 in a fresh process).
    """
    for dev in {d for d in devices if d.type == "cuda"}:
        torch.linalg.eigh(torch.eye(2, dtype=torch.float64, device=dev))


def build_all(planned: list[Planned], init: str) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Build every replacement; decompositions run on a thread pool as wide as torch's CPU threads.

    Each build is a pure function of its conv (the batched eigen-decompositions and CP fits release the GIL),
    so the result is the same as one after the other — for ResNet-50 on 2 cores about twice as fast.
    """
    workers = min(len(planned), torch.get_num_threads(), 8)
    if workers < 2 or init != "svd":
        return [_build_one(p, init) for p in planned]
    _load_cuda_linalg(p.decomp.weight.device for p in planned)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fxsurgeon-separable") as pool:
        return list(pool.map(lambda p: _build_one(p, init), planned))
