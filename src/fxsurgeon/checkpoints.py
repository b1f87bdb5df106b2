"""Checkpoints as people save them, and original weights onto converted models.

:func:`read_state_dict` accepts what training scripts write: a bare state dict, one wrapped as
``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"model_state_dict": ...}`` / ``{"ema": ...}`` (Lightning,
torchvision references, timm train), and keys prefixed ``module.`` by ``nn.DataParallel`` /
``DistributedDataParallel`` (or ``_orig_mod.`` by ``torch.compile``). It reads tensors only
(``torch.load(weights_only=True)`` or safetensors): no code from the file runs.

:func:`load_original_state_dict` puts a checkpoint of the *original* architecture into a *converted* model:

- a tensor whose key and shape are unchanged is copied;
- the conv head's 1×1 conv takes the Linear's ``(out, in)`` weight reshaped to ``(out, in, 1, 1)``;
- a layer the conversion decomposed (separable, CP, low rank) has no tensor an original checkpoint could
  fill: its factors are recomputed by replaying the recorded conversion (the same forms and ranks, the same
  initialisation from the weights) on the original architecture rebuilt from the record's ``source`` with
  the checkpoint loaded. Refits from calibration data are not redone (the data is not in the record); say so
  in the returned account. Without a recorded source the call refuses and names the layers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError

__all__ = ["load_original_state_dict", "read_state_dict", "strip_prefixes", "unwrap_state_dict"]

#: keys under which training scripts nest the model's state dict, tried in order
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "ema", "net")

#: key prefixes added by wrappers: DataParallel / DDP, torch.compile
PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor mapping inside ``obj``: itself, or the first of :data:`WRAPPER_KEYS` holding one.

    >>> sd = {"state_dict": {"module.fc.weight": torch.zeros(2, 3)}, "epoch": 5}
    >>> list(strip_prefixes(unwrap_state_dict(sd)))
    ['fc.weight']
    """
    seen = obj
    for _ in range(3):  # {"model": {"state_dict": ...}} nests twice at most in practice
        if isinstance(seen, Mapping) and seen and all(isinstance(v, torch.Tensor) for v in seen.values()):
            return dict(seen)
        if not isinstance(seen, Mapping):
            break
        inner = next((seen[k] for k in WRAPPER_KEYS if isinstance(seen.get(k), Mapping)), None)
        if inner is None:
            break
        seen = inner
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise SurgeryError(f"{where} holds no state dict: a mapping with keys {keys}, none of them a mapping of "
                           f"tensors ({', '.join(WRAPPER_KEYS)} looked into); pass the state dict itself")
    raise SurgeryError(f"{where} holds a {type(obj).__name__}, not a state dict")


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile) prefix shared by every key."""
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` / ``.pt`` / ``.pth`` file, unwrapped and without wrapper prefixes.

    Raises:
        SurgeryError: no such file, not readable as tensors (a pickled model needs ``torch.load`` by you:
            unpickling runs code), or no state dict inside.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise SurgeryError(f"weights file {p!r} does not exist")
    if p.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(p)
        except Exception as exc:
            raise SurgeryError(f"cannot read weights {p!r}: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SurgeryError(f"cannot read weights {p!r} as tensors (torch.load weights_only=True): {msg}. "
                               "A pickled whole model is a MODEL argument, not --weights") from exc
    return strip_prefixes(unwrap_state_dict(obj, where=repr(p)))


def load_original_state_dict(
    converted: nn.Module, state_dict: Mapping[str, torch.Tensor] | str | os.PathLike, *, strict: bool = True
) -> dict[str, list[str]]:
    """Load a checkpoint of the original (unconverted) model into ``converted``, in place.

    Args:
        converted: a model returned by :func:`fxsurgeon.convert` or :func:`fxsurgeon.load`.
        state_dict: the original model's state dict, or a file holding one (wrappers and ``module.`` prefixes
            are handled, see :func:`read_state_dict`).
        strict: refuse when a tensor of ``converted`` gets no value, or a checkpoint tensor is not used.

    Returns:
        What happened to each tensor of ``converted``: ``{"copied": [...], "reshaped": [...],
        "recomputed": [...], "not_recomputed": [...]}`` (the last lists pass options that depended on data,
        such as calibration, which the replay could not redo).

    Raises:
        SurgeryError: ``converted`` has no record, a decomposed layer needs recomputing but the record has no
            source to rebuild the original from, or keys / shapes do not fit.

    >>> import torch, fxsurgeon
    >>> from fxsurgeon.models import resnet20
    >>> trained = resnet20()  # stands for a trained checkpoint
    >>> x = torch.randn(1, 3, 32, 32)
    >>> small = fxsurgeon.convert(resnet20().eval(), example_inputs=x, conv_head=True, source=resnet20)
    >>> done = fxsurgeon.load_original_state_dict(small, trained.state_dict())
    >>> done["reshaped"], len(done["recomputed"]) > 0  # the head's Linear weight, and the separable factors
    (['linear.weight'], True)
    """
    from .record import get_record

    record = get_record(converted)
    if isinstance(state_dict, (str, os.PathLike)):
        sd = read_state_dict(state_dict)
    elif isinstance(state_dict, Mapping):
        sd = strip_prefixes(unwrap_state_dict(state_dict, where="state_dict"))
    else:
        raise SurgeryError(f"state_dict must be a mapping of tensors or a file path, got {type(state_dict).__name__}")
    target = converted.state_dict()
    new: dict[str, torch.Tensor] = {}
    account: dict[str, list[str]] = {"copied": [], "reshaped": [], "recomputed": [], "not_recomputed": []}
    missing = []
    for key, t in target.items():
        v = sd.get(key)
        if v is not None and tuple(v.shape) == tuple(t.shape):
            new[key] = v
            account["copied"].append(key)
        elif v is not None and t.dim() == v.dim() + 2 and tuple(t.shape[2:]) == (1, 1) \
                and tuple(t.shape[:2]) == tuple(v.shape):
            new[key] = v.reshape(t.shape)  # Linear (out, in) → 1×1 conv (out, in, 1, 1): the conv head
            account["reshaped"].append(key)
        else:
            missing.append(key)
    if missing:
        replayed = _replay_from_weights(converted, record, sd, missing)
        for key in missing:
            new[key] = replayed[key]
        account["recomputed"] = missing
        account["not_recomputed"] = [f"{name}: calibration refit (the data is not in the record)"
                                     for name, opts in record.options.items()
                                     if isinstance(opts, dict) and (opts.get("calibration") is not None
                                                                    or "calibration_omitted" in opts)]
    used = set(account["copied"] + account["reshaped"])
    unused = sorted(set(sd) - used - set(_original_keys(record, missing)))
    if strict and unused and not missing:
        raise SurgeryError(f"{len(unused)} checkpoint tensor(s) fit nothing in the converted model (e.g. "
                           f"{unused[:3]}): is it a checkpoint of {record.model}? strict=False ignores them")
    for key, t in new.items():
        if t.dtype != target[key].dtype:
            new[key] = t.to(target[key].dtype)
    converted.load_state_dict(new, strict=True)
    return account


def _original_keys(record, missing: list[str]) -> list[str]:
    """Checkpoint keys consumed by recomputed layers (the rewritten modules' own tensors)."""
    targets = {r.target for r in record.rewrites}
    return [k for t in targets for k in (f"{t}.weight", f"{t}.bias")]


def _replay_from_weights(converted: nn.Module, record, sd: dict[str, torch.Tensor],
                         missing: list[str]) -> dict[str, torch.Tensor]:
    """The converted state dict recomputed from the checkpoint: rebuild, load, replay the recorded conversion."""
    from .rebuild import build_original, rewrite_keys

    if record.source is None:
        raise SurgeryError(
            f"{len(missing)} tensor(s) of the converted {record.model} come from decomposed or inserted layers "
            f"(e.g. {missing[:3]}) that an original checkpoint cannot fill directly, and the record has no source "
            "to rebuild the original from: convert with source='package.module:function' (or a timm model), "
            "or convert the original with these weights loaded")
    original = build_original(record.source, trusted=True)  # the converted model's own record
    try:
        original.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise SurgeryError(f"the checkpoint does not fit the original {record.model} rebuilt from its source: "
                           f"{first} ...") from exc
    original.eval()
    data = record.to_dict()
    data["options"] = {k: dict(v) if isinstance(v, dict) else v for k, v in record.options.items()}
    gm = _replay_with_weights(data, record.source, original)
    if rewrite_keys(gm.meta["fxsurgeon"].to_dict()) != rewrite_keys(data):
        raise SurgeryError(f"replaying the conversion of {record.model} on the checkpoint's weights gave different "
                           "rewrites than recorded: the conversion depended on something the record does not hold")
    out = gm.state_dict()
    have = converted.state_dict()
    bad = [k for k in missing if k not in out or tuple(out[k].shape) != tuple(have[k].shape)]
    if bad:
        raise SurgeryError(f"the replayed conversion of {record.model} lacks or reshapes {bad[:3]}: cannot map "
                           "the checkpoint onto this converted model")
    return out


def _replay_with_weights(data: dict[str, Any], source: dict[str, Any], model: nn.Module) -> nn.Module:
    """io's replay, but the decompositions start from the loaded weights (the recorded ``init``), not random.

    The record is the converted model's own, in memory: the caller's conversion, or one :func:`fxsurgeon.load`
    already checked against its trust list.
    """
    from .rebuild import replay_conversion
    from .sources import TRUST_ALL

    return replay_conversion(data, source, model, TRUST_ALL, init_from_weights=True)
