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
    MAX_METADATA_CHARS,
    json_depth,
    validate_metadata,
)
from .rebuild import build_original, options_without_data, rebuild, replay_conversion, rewrite_keys, structure
from .runtime import conversion_versions
from .sources import (
    TRUST_ALL,
    check_trust_patterns,
    describe_tracing,
    infer_source,
    json_path_error,
    normalize_source,
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
    data["options"] = {name: options_without_data(opts) for name, opts in record.options.items()}
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
        "source": src, "record": data, "versions": conversion_versions(),
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
        rebuild(json.loads(text), trust=TRUST_ALL, shapes=shapes, check_structure=True, materialize=False,
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
    gm = rebuild(meta, meta["source"] if source is not None else None, trust=trust, model=model, shapes=shapes,
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
