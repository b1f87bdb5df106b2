"""Rebuilding a saved conversion: the original model from its recorded source, then the recorded passes replayed.

:func:`fxsurgeon.io.load` and :mod:`fxsurgeon.checkpoints` start here. :func:`build_original` instantiates the
original architecture from a source (a timm name or a factory the allow-list or the caller trusts, never
pretrained); :func:`replay_conversion` runs the recorded passes on it again with every layer's recorded form
and rank; :func:`rebuild` does both on the meta device first and checks the result against the file's tensors,
:func:`structure` (one line per module, the hash of the generated code) and the recorded rewrites before any
real storage is allocated.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import SurgeryError
from .filecheck import (
    EXAMPLE_DTYPES,
    AllocationGuard,
    check_example_shape,
)
from .moved import current_structure
from .runtime import conversion_versions, shape_diff
from .sources import (
    TRUST_ALL,
    check_timm_name,
    check_trust_patterns,
    normalize_source,
    resolve_factory,
    resolve_symbol,
)

__all__ = [
    "REBUILD_SIZE_RATIO",
    "REBUILD_SLACK_BYTES",
    "build_original",
    "options_without_data",
    "rebuild",
    "replay_conversion",
    "rewrite_keys",
    "structure",
]


# ----------------------------------------------------------------------------------------------- sources


def build_original(source: dict[str, Any], *, trust_factories: Iterable[str] | None = None,
                   trusted: bool = False) -> nn.Module:
    """Instantiate the original (unconverted) architecture from a source, without pretrained weights.

    The source is treated like one read from a file: a factory is imported only when the allow-list of
    :mod:`fxsurgeon.sources` or ``trust_factories`` (``"package.module:function"`` / ``"package.module:*"``)
    covers it. ``trusted=True`` skips that check, for a source that is the caller's own (the record of a model
    converted in this process, or of one :func:`load` already checked).

    >>> type(build_original({"factory": "fxsurgeon.models:resnet20", "kwargs": {}})).__name__
    'CifarResNet'
    """
    if not isinstance(trusted, bool):
        raise SurgeryError(f"trusted must be a bool, got {type(trusted).__name__}")
    return _maker(normalize_source(source), TRUST_ALL if trusted else check_trust_patterns(trust_factories))()


def _maker(source: dict[str, Any], trust: Iterable[str] | str, model: nn.Module | None = None) -> Callable[[], nn.Module]:
    """A function building the original model; the factory is resolved (and checked) now, nothing is built yet.

    ``trust`` is :data:`~fxsurgeon.sources.TRUST_ALL` for a source the caller gave, else the caller's patterns.
    """
    if model is not None:
        return lambda: copy.deepcopy(model)
    kwargs = dict(source.get("kwargs") or {})
    if "timm" in source:
        name = source["timm"] if trust == TRUST_ALL else check_timm_name(source["timm"])
        try:
            import timm
        except ImportError as exc:
            raise SurgeryError(f"rebuilding timm model {name!r} needs timm installed") from exc
        kwargs.setdefault("pretrained", False)
        if kwargs["pretrained"] is not False:
            raise SurgeryError("source kwargs must not ask for pretrained=True: the weights come from the file")
        what = f"timm.create_model({name!r}, **{kwargs})"
        build: Callable[[], Any] = lambda: timm.create_model(name, **kwargs)  # noqa: E731
    else:
        factory = resolve_factory(source["factory"], trust)
        what = f"{source['factory']}(**{kwargs})"
        build = lambda: factory(**kwargs)  # noqa: E731

    def make() -> nn.Module:
        try:
            model = build()
        except SurgeryError:
            raise
        except Exception as exc:
            raise SurgeryError(f"rebuilding the original model with {what:.200} failed: {type(exc).__name__}: "
                               f"{str(exc)[:300]}") from exc
        if not isinstance(model, nn.Module):
            raise SurgeryError(f"{what:.200} returned {type(model).__name__}, not an nn.Module")
        return model

    return make


# ----------------------------------------------------------------------------------------------- structure


def structure(gm: nn.Module) -> list[str]:
    """One line per module (qualified name, type, hyper-parameters), then the hash of the generated code.

    Two models with the same lines compute the same function given the same state dict.
    """
    lines = []
    for name, mod in gm.named_modules(remove_duplicate=False):
        if isinstance(mod, fx.GraphModule) and not name:
            kind = "GraphModule"
        else:
            kind = f"{type(mod).__module__}.{type(mod).__qualname__}"
        lines.append(f"{name or '<root>'}: {kind}({mod.extra_repr()})")
    code = gm.code if isinstance(gm, fx.GraphModule) else ""
    lines.append("code sha256: " + hashlib.sha256(code.encode()).hexdigest())
    return lines


def _structure_diff(saved: list[str], rebuilt: list[str], limit: int = 6) -> str:
    import difflib

    diff = [d.replace("\n", "\\n") for d in difflib.unified_diff(saved, rebuilt, "saved", "rebuilt", n=0, lineterm="")
            if d[:1] in "+-" and not d.startswith(("+++", "---"))]
    shown = " | ".join(diff[:limit])  # one line: the CLI prints errors as one line
    more = f" | … {len(diff) - limit} more" if len(diff) > limit else ""
    return f" {shown}{more}."


# ----------------------------------------------------------------------------------------------- replay


def options_without_data(options: dict[str, Any]) -> dict[str, Any]:
    """Pass options as saved: calibration batches are data, not recipe; the weights they shaped are in the file."""
    out = dict(options)
    if out.get("calibration") is not None:
        data = out.pop("calibration")
        size = len(data) if isinstance(data, (list, tuple)) else 1
        out["calibration_omitted"] = f"{size} batch(es) not stored; their effect is in the saved weights"
    return out


def _example_inputs(specs: list[dict[str, Any]], model: nn.Module) -> tuple:
    """Zero tensors shaped like the recorded example inputs, on the model's device (meta during a meta replay)."""
    first = next(iter(model.parameters()), None)
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = first.device if first is not None else torch.device("cpu")
    out = []
    for i, spec in enumerate(specs):
        if "shape" in spec:
            shape = check_example_shape(spec["shape"], f"recorded example input {i}")
            dtype = EXAMPLE_DTYPES.get(spec.get("dtype"))
            if dtype is None:
                raise SurgeryError(f"recorded example input {i} has dtype {spec.get('dtype')!r:.40}, not one of "
                                   f"{sorted(EXAMPLE_DTYPES)}")
            out.append(torch.zeros(shape, dtype=float_dtype if dtype.is_floating_point else dtype, device=device))
        elif "value" in spec:
            out.append(spec["value"])
        else:
            raise SurgeryError(f"example input of type {spec.get('type')} cannot be recreated for the replay")
    return tuple(out)


#: bytes a rebuild may allocate beyond what the file's size explains (index tables, masks, temporaries)
REBUILD_SLACK_BYTES = 64 * 2**20
#: how many times the file's size the original (unconverted) model may take: conversions rarely shrink more
REBUILD_SIZE_RATIO = 16


def _budget(file_bytes: int) -> int:
    return REBUILD_SIZE_RATIO * int(file_bytes) + REBUILD_SLACK_BYTES


def _nbytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def rebuild(
    meta: dict[str, Any],
    source: dict[str, Any] | None = None,
    *,
    trust: Iterable[str] | str = (),
    model: nn.Module | None = None,
    shapes: dict[str, list[int]],
    check_structure: bool = True,
    materialize: bool = True,
    file_bytes: int = 0,
) -> fx.GraphModule:
    """Build the original and replay the recorded conversion (random init, no verification), checked against
    ``shapes`` (the file's tensors) before any real storage is allocated.

    The original is built on the meta device and the conversion replayed there, so shape propagation and the
    passes cost no memory and no arithmetic; the state-dict keys and shapes, rewrites and structure are then
    compared with the file. Only a model that matches gets (uninitialised) CPU storage, for the caller to fill
    with a strict state-dict load; non-persistent buffers (index tables, masks, which no file holds) come from
    a real build of the original. When a model cannot be built or replayed on meta (a module that needs real
    values), the replay is redone on CPU, under an :class:`~fxsurgeon.filecheck.AllocationGuard` whose budget
    follows from the file's size. ``source`` and ``model`` are the caller's (trusted); otherwise the recorded
    source is checked against the allow-list and ``trust``.
    """
    if source is not None or model is not None:
        trust = TRUST_ALL
    source = normalize_source(source if source is not None else meta["source"])
    record = meta["record"]
    tracing = record.get("tracing", {})
    if "concrete_args_repr" in tracing:
        raise SurgeryError(f"the conversion used concrete_args {tracing['concrete_args_repr']!r:.200} that are not "
                           "plain JSON: it cannot be replayed")
    from .passes import list_passes

    known = list_passes()
    missing = [p for p in record["options"] if p not in known]
    if missing:
        raise SurgeryError(f"the model was converted with pass(es) {missing!r:.200} that this fxsurgeon "
                           f"({meta.get('versions', {}).get('fxsurgeon', '?')!r:.40} saved it) does not have; "
                           f"known: {known}")
    make = _maker(source, trust, model)  # the factory is checked here, before anything is built
    budget = _budget(file_bytes)
    what = f"rebuilding {_source_text(source)}"
    max_tensors = 64 * len(shapes) + 100_000

    def guard(limit: int = budget) -> Any:
        # the caller's own source or model is built as the caller would build it; a file's is held to a budget
        return contextlib.nullcontext() if trust == TRUST_ALL else AllocationGuard(limit, max_tensors, what)

    original: nn.Module | None = None
    try:
        with guard(), torch.device("meta"):
            original = make()
    except SurgeryError as exc:
        if "rebuilding the original model with" not in str(exc):
            raise  # a refusal (budget, trust), not a factory that cannot run on meta
    except Exception:
        pass
    if original is not None:
        size = _nbytes(original)
        if size > budget and trust != TRUST_ALL:
            raise SurgeryError(
                f"{what} would take {size / 2**20:,.0f} MiB, more than the {budget / 2**20:,.0f} MiB a file of "
                f"{file_bytes / 2**20:,.1f} MiB allows; the recorded source or its keyword arguments do not fit "
                "the file. Rebuild from a source you name: load(path, source=...) or model=...")
        budget = max(budget, 2 * size + REBUILD_SLACK_BYTES)
        gm: fx.GraphModule | None = None
        try:
            original.to("meta")
            with guard(budget):
                gm = replay_conversion(record, source, original, trust)
            if rewrite_keys(gm.meta["fxsurgeon"].to_dict()) != rewrite_keys(record):
                gm = None  # a pass decided differently on meta tensors (one that needs weight values)
        except SurgeryError as exc:
            if trust != TRUST_ALL and "in the file" in str(exc):
                raise  # a refused name from the file, not a meta limitation
            gm = None
        except Exception:  # fall back to the CPU replay below, whose errors are the ones to report
            gm = None
        if gm is not None:
            _check_rebuilt(gm, meta, shapes, check_structure=check_structure)
            if not materialize:
                return gm
            try:
                with guard(budget):
                    gm.to_empty(device="cpu")
                    if any(m._non_persistent_buffers_set for m in gm.modules()):
                        _restore_buffers(gm, _non_persistent_buffers(make()))
                return gm
            except SurgeryError:
                raise
            except Exception:
                pass
    try:
        with guard(budget):
            gm = replay_conversion(record, source, make(), trust)
    except SurgeryError:
        raise
    except Exception as exc:  # e.g. a recorded example input that does not fit the model
        raise SurgeryError(f"replaying the recorded conversion on {_source_text(source)} failed: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
    _check_rebuilt(gm, meta, shapes, check_structure=check_structure)
    return gm


def rewrite_keys(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(pass, target, replacement) of each rewrite in a record dict: what a replay must reproduce."""
    return [(r["pass_name"], r["target"], r["after"]) for r in record["rewrites"]]


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for b in mod._non_persistent_buffers_set:
            if mod._buffers.get(b) is not None:
                out[f"{name}.{b}" if name else b] = mod._buffers[b]
    return out


def _restore_buffers(gm: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    for name, mod in gm.named_modules(remove_duplicate=False):
        for b in mod._non_persistent_buffers_set:
            if mod._buffers.get(b) is not None:
                key = f"{name}.{b}" if name else b
                if key not in kept:
                    raise KeyError(key)  # made by a pass: only a real replay can fill it
                mod._buffers[b] = kept[key]


def replay_conversion(record: dict[str, Any], source: dict[str, Any], model: nn.Module,
                      trust: Iterable[str] | str, *, init_from_weights: bool = False) -> fx.GraphModule:
    """Run the conversion ``record`` describes on ``model`` again, in place (same passes, forms and ranks).

    The decompositions start from random weights (the saved ones are loaded afterwards) unless
    ``init_from_weights``, where they start from ``model``'s weights with the recorded ``init`` (mapping an
    original checkpoint onto a converted model). Names of leaf modules and autowrapped functions in the record
    are resolved only as ``trust`` allows (see :mod:`fxsurgeon.sources`).
    """
    from .convert import convert
    from .passes import get_pass, list_passes

    tracing = record.get("tracing", {})
    passes: dict[str, Any] = {name: False for name in list_passes()}
    needs_shapes = False
    for name, opts in record["options"].items():
        done = [r for r in record["rewrites"] if r.get("pass_name") == name]
        replay = get_pass(name).replay
        # data-driven options are not replayed: their effect is in the saved weights
        opts = {k: v for k, v in opts.items() if k not in ("calibration_omitted", "calibration")}
        passes[name] = replay(opts, done, model) if replay else dict(opts)
        if replay and init_from_weights:
            passes[name]["init"] = opts.get("init", "svd")
        needs_shapes |= get_pass(name).needs_shapes
    inputs = _example_inputs(tracing.get("example_inputs", []), model) if needs_shapes else ()
    return convert(
        model, example_inputs=inputs or None, verify=False, inplace=True, source=source,
        leaf_modules=[resolve_symbol(s, trust, "leaf module type", nn.Module, model)
                      for s in tracing.get("leaf_modules", [])] or None,
        autowrap_functions=[resolve_symbol(s, trust, "autowrapped function", None, model)
                            for s in tracing.get("autowrap_functions", [])] or None,
        concrete_args=tracing.get("concrete_args"),
        mode=tracing.get("mode"),  # the train/eval branches the saved graph kept
        **passes,
    )


def _source_text(source: dict[str, Any]) -> str:
    kind = "timm" if "timm" in source else "factory"
    return f"{kind} {source[kind]!r}" + (f" with {source['kwargs']}" if source.get("kwargs") else "")


def _versions_text(meta: dict[str, Any]) -> str:
    v = meta.get("versions", meta)
    return ", ".join(f"{k} {v[k]}" for k in ("fxsurgeon", "torch", "timm") if k in v)


def _check_rebuilt(gm: fx.GraphModule, meta: dict[str, Any], shapes: dict[str, list[int]], *, check_structure: bool) -> None:
    """Refuse a rebuilt model whose state-dict keys/shapes, replayed rewrites or module structure differ."""
    have = {k: list(v.shape) for k, v in gm.state_dict().items()}
    missing, unexpected, wrong = shape_diff(shapes, have)
    hint = (f"Saved with {_versions_text(meta)}; now {_versions_text(conversion_versions())}. If the model's source is wrong, "
            "pass source= (a timm name with kwargs, or 'package.module:function').")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} saved tensor(s) the rebuilt model lacks (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} rebuilt tensor(s) not in the file (e.g. {unexpected[:3]})")
        if wrong:
            parts.append("shape mismatches: " + ", ".join(f"{k} saved {shapes[k]} vs rebuilt {have[k]}" for k in wrong[:3]))
        raise SurgeryError(
            f"the model rebuilt from {_source_text(meta['source'])} does not match the saved weights: "
            + "; ".join(parts) + ". " + hint
        )
    if not check_structure:
        return
    rebuilt = structure(gm)
    saved = current_structure(meta["structure"])  # module classes that moved since the file was written
    if rebuilt != saved:
        raise SurgeryError(
            f"the model rebuilt from {_source_text(meta['source'])} differs from the saved architecture:"
            + _structure_diff(saved, rebuilt) + " " + hint
            + " load(..., check_structure=False) accepts a rebuild whose weights still match."
        )
    replayed = rewrite_keys(gm.meta["fxsurgeon"].to_dict())
    recorded = rewrite_keys(meta["record"])
    if replayed != recorded:
        diff = [f"recorded {a}, replayed {b}" for a, b in zip(recorded, replayed) if a != b]
        diff += [f"recorded {a}, replayed nothing" for a in recorded[len(replayed):]]
        diff += [f"replayed {b}, not recorded" for b in replayed[len(recorded):]]
        raise SurgeryError(
            f"replaying the conversion of {meta['record']['model']} from {_source_text(meta['source'])} gave "
            "different rewrites: " + "; ".join(diff[:4]) + (f"; … {len(diff) - 4} more" if len(diff) > 4 else "")
            + ". " + hint
        )
