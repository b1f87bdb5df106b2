"""Save and load converted models as safetensors weights plus a JSON recipe: no pickled code.

A converted model is a ``torch.fx.GraphModule`` whose Python code fx generated; pickling it (``torch.save``)
stores that code and needs ``torch.load(weights_only=False)``, which runs whatever the file says. Instead,
:func:`save` writes only tensors (safetensors) and, in the file's header metadata under the key
``"fxsurgeon"``, a JSON document with everything needed to rebuild the same architecture:

- ``source``: where the original model comes from, a timm name with its keyword arguments
  (``{"timm": "resnet18", "kwargs": {"num_classes": 10}}``) or an importable factory
  (``{"factory": "package.module:function", "kwargs": {...}}``);
- ``record``: the full :class:`~fxsurgeon.record.Conversion` (pass options, every rewrite with its form and
  rank, skips, verification, versions) and the tracing controls ``convert()`` was given;
- ``structure``: one line per module (type and hyper-parameters) and a hash of the generated code, so a
  rebuild that differs in any layer is refused rather than silently loaded;
- weight bookkeeping: tied tensors (stored once), frozen parameters, channels_last tensors, train/eval modes.

:func:`load` builds the original architecture from ``source`` (``pretrained=False``: no download, no SVD),
replays the recorded conversion (the separable pass gets every layer's recorded form and rank through its
``layers=`` option, with ``init="random"``), checks the rebuilt structure and state-dict keys and shapes
against the file, and loads the weights strictly.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import SurgeryError
from .filecheck import (
    EXAMPLE_DTYPES,
    MAX_METADATA_CHARS,
    AllocationGuard,
    check_example_shape,
    json_depth,
    validate_metadata,
)
from .moved import current_structure
from .runtime import shape_diff
from .sources import (
    TRUST_ALL,
    check_timm_name,
    check_trust_patterns,
    describe_tracing,
    infer_source,
    json_path_error,
    normalize_source,
    resolve_factory,
    resolve_symbol,
)

__all__ = [
    "FORMAT_VERSION",
    "atomic_write",
    "build_original",
    "describe_tracing",
    "infer_source",
    "load",
    "normalize_source",
    "read_metadata",
    "replay_conversion",
    "rewrite_keys",
    "save",
]

#: version of the metadata layout written by :func:`save`; :func:`load` refuses newer ones
FORMAT_VERSION = 1
_META_KEY = "fxsurgeon"


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


def _without_data(options: dict[str, Any]) -> dict[str, Any]:
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


def _rebuild(
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


def _now() -> dict[str, str]:
    from .runtime import conversion_versions

    return conversion_versions()


def _check_rebuilt(gm: fx.GraphModule, meta: dict[str, Any], shapes: dict[str, list[int]], *, check_structure: bool) -> None:
    """Refuse a rebuilt model whose state-dict keys/shapes, replayed rewrites or module structure differ."""
    have = {k: list(v.shape) for k, v in gm.state_dict().items()}
    missing, unexpected, wrong = shape_diff(shapes, have)
    hint = (f"Saved with {_versions_text(meta)}; now {_versions_text(_now())}. If the model's source is wrong, "
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


# ----------------------------------------------------------------------------------------------- save / load


def _weights(gm: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(tensors to write, {alias key: stored key} for tied tensors, keys of channels_last tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    channels_last: list[str] = []
    first: dict[int, str] = {}
    storages: dict[tuple[int, str], str] = {}
    for key, t in gm.state_dict(keep_vars=True).items():
        if t.is_meta:
            raise SurgeryError(f"tensor '{key}' is on the meta device: there are no weights to save. "
                               "Load or initialise real weights first (e.g. model.to_empty(device='cpu')).")
        if id(t) in first:
            tied[key] = first[id(t)]
            continue
        first[id(t)] = key
        data = t.detach()
        if data.dim() == 4 and not data.is_contiguous() and data.is_contiguous(memory_format=torch.channels_last):
            channels_last.append(key)
        data = data.cpu().contiguous()
        if data.numel():
            where = (data.untyped_storage().data_ptr(), str(data.device))
            if where in storages:  # a view sharing memory with another tensor: safetensors needs it separate
                data = data.clone()
            storages[where] = key
        tensors[key] = data
    return tensors, tied, channels_last


def _retie(gm: nn.Module, tied: dict[str, str]) -> None:
    """Make every alias key name the same Parameter/buffer object as the key it was tied to when saved."""
    for alias, key in tied.items():
        owner, _, leaf = key.rpartition(".")
        a_owner, _, a_leaf = alias.rpartition(".")
        src = gm.get_submodule(owner)
        dst = gm.get_submodule(a_owner)
        for table in ("_parameters", "_buffers"):
            if leaf in getattr(src, table) and a_leaf in getattr(dst, table):
                getattr(dst, table)[a_leaf] = getattr(src, table)[leaf]


def _modes(gm: nn.Module) -> dict[str, Any]:
    root = gm.training
    return {"root": root, "others": [n for n, m in gm.named_modules() if n and m.training != root]}


def save(converted: nn.Module, path: str | os.PathLike, *, source: Any = None, check: bool = True) -> None:
    """Write a converted model to ``path`` as safetensors weights plus the recipe to rebuild it (no pickle).

    Args:
        converted: a model returned by :func:`fxsurgeon.convert` (it carries the record), possibly trained or
            calibrated since: its current weights, ``requires_grad`` flags and train/eval modes are saved.
        path: the file to write (conventionally ``*.safetensors``). Written to a temporary file first and
            renamed, so an existing file is never left half-written.
        source: where the original model comes from, when ``convert()`` did not know it: a timm name,
            ``"package.module:function"``, a module-level factory function, or
            ``{"factory": "package.module:function", "kwargs": {...}}``. Overrides the recorded one.
        check: rebuild the model from the file's recipe before writing and refuse to write a file that
            :func:`load` could not turn back into the same architecture (default; costs one rebuild).

    Raises:
        SurgeryError: no record, no known source, a recipe that is not plain JSON, meta-device weights, or a
            rebuild that differs from ``converted``; nothing is written then.

    >>> import tempfile, os, torch, fxsurgeon
    >>> from fxsurgeon.models import resnet20
    >>> small = fxsurgeon.convert(resnet20(), source=resnet20)
    >>> path = os.path.join(tempfile.mkdtemp(), "small.safetensors")
    >>> fxsurgeon.save(small, path)
    >>> again = fxsurgeon.load(path)
    >>> torch.equal(again.state_dict()["layer1.0.conv1.depthwise.weight"],
    ...             small.state_dict()["layer1.0.conv1.depthwise.weight"])
    True
    """
    from safetensors.torch import save_file

    from .record import get_record

    record = get_record(converted)
    src = normalize_source(source) if source is not None else record.source
    if src is None:
        raise SurgeryError(
            f"fxsurgeon.save needs to know how to rebuild the original {record.model}: it was not created by "
            "timm.create_model, and convert() was given no source. Pass source='package.module:function' "
            "(a module-level function returning the unconverted model; kwargs via "
            "source={'factory': ..., 'kwargs': {...}}) to save() or convert()."
        )
    data = record.to_dict()
    data["source"] = src
    # the raw options, not to_dict()'s JSON-ready descriptions: a set or object must be refused, not replayed
    data["options"] = {name: _without_data(opts) for name, opts in record.options.items()}
    for where in ("options", "tracing"):
        bad = json_path_error(data[where], f"record {where}")
        if bad:
            raise SurgeryError(f"{bad}: the recipe must be plain JSON to be saved without pickling")
    if "concrete_args_repr" in record.tracing:
        raise SurgeryError(f"the conversion used concrete_args {record.tracing['concrete_args_repr']} that are not "
                           "plain JSON: it cannot be saved as a recipe. Use torch.save instead.")
    tensors, tied, channels_last = _weights(converted)
    meta = {
        "format": "fxsurgeon", "format_version": FORMAT_VERSION,
        "source": src, "record": data, "versions": _now(),
        "structure": structure(converted),
        "tied": tied,
        "frozen": [n for n, p in converted.named_parameters(remove_duplicate=False) if not p.requires_grad],
        "channels_last": channels_last,
        "modes": _modes(converted),
    }
    try:
        text = json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as exc:  # e.g. a pass put a non-JSON value in a rewrite's details
        raise SurgeryError(f"the record of {record.model} is not JSON-serialisable: {exc}") from exc
    path = Path(path)
    if not path.parent.is_dir():
        raise SurgeryError(f"cannot save to {path}: directory {path.parent} does not exist")
    try:  # never write a file that load() would refuse (e.g. an example input beyond the cap)
        validate_metadata(json.loads(text), "the file to save", FORMAT_VERSION)
    except SurgeryError as exc:
        raise SurgeryError(f"fxsurgeon.save refuses to write {path}: {exc}") from exc
    if check:
        shapes = {k: list(t.shape) for k, t in tensors.items()} | {k: list(tensors[v].shape) for k, v in tied.items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        _rebuild(json.loads(text), trust=TRUST_ALL, shapes=shapes, check_structure=True, materialize=False,
                 file_bytes=nbytes)
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", _META_KEY: text}))
    except Exception as exc:
        raise SurgeryError(f"could not write {path}: {type(exc).__name__}: {exc}") from exc


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set-and-return)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], *, suffix: str = ".tmp") -> None:
    """Write a file whole or not at all: ``write(tmp)`` fills a temporary file next to ``path``, renamed over it.

    The result has the permissions ``open(path, "w")`` would give it: those of the file it replaces, else
    ``0o666`` less the umask (a bare ``tempfile.mkstemp`` would leave ``0o600``). On any failure the temporary
    file is removed and the exception re-raised; an existing ``path`` is then left untouched. ``suffix`` ends the
    temporary file's name (writers such as ``torch.onnx.export`` pick the format from it).

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "out.txt")
    >>> atomic_write(path, lambda tmp: open(tmp, "w").write("hello"))
    >>> open(path).read()
    'hello'
    """
    import stat

    target = Path(path)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.resolve().parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The fxsurgeon metadata of a file written by :func:`save` (source, record, structure, ...), no tensors read.

    Every field :func:`load` uses is checked for its type first (see :mod:`fxsurgeon.filecheck`); a corrupt or
    foreign file is refused with a one-line SurgeryError naming the field.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:
        raise SurgeryError(f"{path} is not a readable safetensors file: {type(exc).__name__}: {exc}") from exc
    if _META_KEY not in header:
        raise SurgeryError(f"{path} was not written by fxsurgeon.save: its header has no '{_META_KEY}' metadata")
    text = header[_META_KEY]
    if len(text) > MAX_METADATA_CHARS:
        raise SurgeryError(f"{path}: the fxsurgeon metadata has {len(text):,} characters, beyond the cap of "
                           f"{MAX_METADATA_CHARS:,}")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SurgeryError(f"{path}: the fxsurgeon metadata is not valid JSON (or nested too deeply): "
                           f"{type(exc).__name__}: {str(exc)[:200]}") from None
    from .filecheck import MAX_JSON_DEPTH

    if json_depth(meta) > MAX_JSON_DEPTH:
        raise SurgeryError(f"{path}: the fxsurgeon metadata is nested more than {MAX_JSON_DEPTH} levels deep")
    validate_metadata(meta, path, FORMAT_VERSION)
    return meta


def _header_shapes(path: Path) -> dict[str, list[int]]:
    """Shapes of the tensors in a safetensors file, read from its header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise SurgeryError(f"{path} is not a readable safetensors file: {type(exc).__name__}: {exc}") from exc


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    source: Any = None,
    model: nn.Module | None = None,
    trust_factories: Iterable[str] | None = None,
    check_structure: bool = True,
) -> fx.GraphModule:
    """Rebuild a model written by :func:`save` and load its weights strictly; no code is unpickled.

    The original architecture comes from the recorded source: ``timm.create_model(name, pretrained=False,
    **kwargs)`` for a name in timm's registry, or a factory the file names, which is imported only when it is
    allowed: ``fxsurgeon.models:*``, ``fxsurgeon.testing.fuzz:FuzzNet``, torchvision model builders, or a pattern in
    ``trust_factories``. Every metadata field is type-checked, the model is built and the conversion replayed on
    the meta device and compared with the tensor shapes in the file's header before any weight is allocated
    or read; then the saved weights, dtypes, ``requires_grad`` flags, channels_last layouts and train/eval modes
    are restored, with the saved record at ``meta["fxsurgeon"]``.

    Args:
        path: a file written by :func:`save`.
        device: where to put the model (default: CPU).
        source: rebuild from this source instead of the recorded one (a timm name, ``"package.module:function"``,
            a function, or a dict with kwargs); the caller's choice, so it is not checked against the allow-list.
        model: rebuild from a copy of this unconverted model instead (its architecture, not its weights, is
            used; it is not modified).
        trust_factories: factories the file may name beyond the allow-list: ``"package.module:function"``
            or ``"package.module:*"`` patterns.
        check_structure: refuse a rebuild whose module hyper-parameters or generated code differ from the
            saved ones (default). Keys and shapes of the state dict are always checked.

    Raises:
        SurgeryError: not an fxsurgeon file, a corrupt field, a factory that is not allowed, an unknown pass, or
            a rebuild that does not match the saved weights or structure (the message shows the difference).

    >>> import os, tempfile, torch, fxsurgeon
    >>> from fxsurgeon.models import resnet20
    >>> path = os.path.join(tempfile.mkdtemp(), "small.safetensors")
    >>> fxsurgeon.save(fxsurgeon.convert(resnet20(), source=resnet20), path)
    >>> isinstance(fxsurgeon.load(path), torch.fx.GraphModule)
    True
    """
    from safetensors.torch import load_file

    from .record import RECORD_ATTR, Conversion

    trust = check_trust_patterns(trust_factories)
    if not isinstance(check_structure, bool):
        raise SurgeryError(f"check_structure must be True or False, got {check_structure!r:.40}")
    if model is not None and not isinstance(model, nn.Module):
        raise SurgeryError(f"model= must be an nn.Module (the unconverted architecture), got {type(model).__name__}")
    if model is not None and source is not None:
        raise SurgeryError("give load() source= or model=, not both")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise SurgeryError(f"device={device!r:.40} is not a torch device: {exc}") from exc
    path = Path(path)
    meta = read_metadata(path)
    shapes = _header_shapes(path)
    tied = meta.get("tied", {})
    missing = sorted(v for v in tied.values() if v not in shapes)
    clash = sorted(k for k in tied if k in shapes)
    if missing or clash:
        raise SurgeryError(f"{path}: metadata field 'tied' names keys missing from the file ({missing[:3]}) or "
                           f"aliases that are stored tensors themselves ({clash[:3]})")
    shapes = shapes | {alias: shapes[key] for alias, key in tied.items()}
    if source is not None:
        meta = dict(meta, source=normalize_source(source))
    gm = _rebuild(meta, meta["source"] if source is not None else None, trust=trust, model=model, shapes=shapes,
                  check_structure=check_structure, file_bytes=path.stat().st_size)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise SurgeryError(f"{path}: cannot read the tensors: {type(exc).__name__}: {exc}") from exc
    state = dict(tensors) | {alias: tensors[key] for alias, key in tied.items()}
    _retie(gm, tied)

    # the rebuild is in the factory's dtype (usually float32): give every tensor the saved dtype and layout
    # in place (keeping Parameter objects, hence ties), then copy values in with a strict load
    channels_last = set(meta.get("channels_last", []))
    seen: set[int] = set()
    try:
        for key, t in gm.state_dict(keep_vars=True).items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            saved = state[key]
            channels = key in channels_last and saved.dim() == 4
            fmt = torch.channels_last if channels else torch.contiguous_format
            if t.dtype != saved.dtype or channels:
                t.data = t.data.to(dtype=saved.dtype, memory_format=fmt)
        gm.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise SurgeryError(f"{path}: the saved tensors do not load into the rebuilt model: "
                           f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    frozen = set(meta.get("frozen", []))
    for name, p in gm.named_parameters(remove_duplicate=False):
        p.requires_grad_(name not in frozen and (p.is_floating_point() or p.is_complex()))
    modes = meta.get("modes", {"root": False, "others": []})
    flip = set(modes.get("others", []))
    for name, m in gm.named_modules():
        m.training = (not modes["root"]) if name in flip else bool(modes["root"])
    if device is not None:
        gm.to(device)
    try:
        record = Conversion.from_dict(meta["record"])
    except (KeyError, TypeError, ValueError) as exc:  # validate_metadata checked the fields; belt and braces
        raise SurgeryError(f"{path}: metadata field 'record' is corrupt: {type(exc).__name__}: {exc}") from exc
    record.source = normalize_source(meta["source"])
    record.extras = dict(record.extras, loaded_from=str(path))
    gm.meta["fxsurgeon"] = record
    setattr(gm, RECORD_ATTR, record)
    return gm
