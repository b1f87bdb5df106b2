"""Checks of a saved file before :func:`fxsurgeon.load` builds anything from it.

A file's metadata is data someone else wrote: every field :func:`fxsurgeon.load` reads is checked here for its
type and range first, so a corrupt or hostile file is refused with one line naming the field, never with a
``KeyError`` from deep inside the rebuild. The caps below bound what a small file can make ``load`` do:

- the fxsurgeon metadata is at most :data:`MAX_METADATA_CHARS` characters and :data:`MAX_JSON_DEPTH` levels deep;
- an integer keyword argument of the model's source is at most :data:`MAX_KWARG_INT` in magnitude;
- a recorded example input has at most :data:`MAX_EXAMPLE_DIMS` dimensions and :data:`MAX_EXAMPLE_NUMEL` elements;
- building and replaying the model runs under :class:`AllocationGuard`, which refuses tensors beyond a byte budget
  derived from the file's size before their memory is touched.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import SurgeryError

__all__ = [
    "EXAMPLE_DTYPES",
    "MAX_EXAMPLE_DIMS",
    "MAX_EXAMPLE_NUMEL",
    "MAX_JSON_DEPTH",
    "MAX_KWARG_INT",
    "MAX_METADATA_CHARS",
    "AllocationGuard",
    "json_depth",
    "validate_metadata",
]

MAX_METADATA_CHARS = 32 * 2**20
MAX_JSON_DEPTH = 48
MAX_KWARG_INT = 2**31 - 1
MAX_EXAMPLE_DIMS = 8
MAX_EXAMPLE_NUMEL = 2**25  # 32 Mi elements: 128 MiB as float32
#: dtype names a recorded example input may have (looked up in this table, never with getattr(torch, name))
EXAMPLE_DTYPES: dict[str, torch.dtype] = {
    str(d).replace("torch.", ""): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
}
#: keyword arguments a file may not pass to a model builder: they read files, download, or select weights
_FILE_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "weights",
                "weights_backbone", "model_dir", "progress")
_REWRITE_FIELDS = {"target": str, "before": str, "after": str, "exact": bool, "pass_name": str, "details": dict}
_SKIP_FIELDS = {"target": str, "reason": str, "pass_name": str, "details": dict}
_VERIFICATION_FIELDS = {"max_abs_error": (int, float), "rel_error": (int, float), "tolerance": (int, float),
                        "exact_expected": bool, "input_shapes": list, "device": str, "dtype": str,
                        # what was run as the original, and the traced copy's own error (optional: newer records)
                        "reference": str, "traced_rel_error": (int, float, type(None))}
_VERIFICATION_REQUIRED = ("max_abs_error", "rel_error", "tolerance", "exact_expected", "input_shapes", "device",
                          "dtype")
_RECORD_TYPES: dict[str, Any] = {"model": str, "options": dict, "rewrites": list, "skipped": list,
                                 "params_before": int, "params_after": int, "seconds": dict, "versions": dict,
                                 "extras": dict, "tracing": dict, "schema_version": int}


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value (0 for a scalar), computed without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            depth = max(depth, d)
            if d <= MAX_JSON_DEPTH + 1:
                stack.extend((x, d + 1) for x in v)
    return depth


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    def __init__(self, path: Any) -> None:
        self.path = path

    def fail(self, field: str, what: str, value: Any = None, *, show: bool = True) -> None:
        got = f", got {type(value).__name__} {_short(value)}" if show else ""
        raise SurgeryError(f"{self.path}: metadata field {field} {what}{got}; the file is corrupt or was not "
                           "written by fxsurgeon.save")

    def typed(self, value: Any, types: Any, field: str) -> Any:
        types = types if isinstance(types, tuple) else (types,)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            names = " or ".join("a JSON object" if t is dict else "a list" if t is list else
                                "a string" if t is str else "an integer" if t is int else
                                "a number" if t is float else "true/false" if t is bool else t.__name__
                                for t in types)
            self.fail(field, f"must be {names}", value)
        return value

    def str_list(self, value: Any, field: str) -> list[str]:
        self.typed(value, list, field)
        for i, v in enumerate(value):
            self.typed(v, str, f"{field}[{i}]")
        return value

    def str_dict(self, value: Any, field: str) -> dict[str, Any]:
        self.typed(value, dict, field)
        return value

    def fields(self, value: Any, spec: dict[str, Any], field: str, required: tuple[str, ...]) -> None:
        self.typed(value, dict, field)
        for key in value:
            if key not in spec:
                self.fail(f"{field}[{key!r}]", "is not a known field", show=False)
        for key in required:
            if key not in value:
                self.fail(f"{field}[{key!r}]", "is missing", show=False)
        for key, types in spec.items():
            if key in value:
                self.typed(value[key], types, f"{field}[{key!r}]")


def _check_kwargs(c: _Checker, kwargs: Any, field: str) -> None:
    c.typed(kwargs, dict, field)
    for key, value in kwargs.items():
        if not key.isidentifier():
            c.fail(f"{field}[{key!r}]", "is not a keyword argument name", show=False)
        if (key in _FILE_KWARGS and value is not None) or (key == "pretrained" and value is not False):
            c.fail(f"{field}[{key!r}]", "is refused: a saved file may not ask the model builder to read, "
                   "download or select weights (they come from the file)", value)
        stack = [(value, f"{field}[{key!r}]")]
        while stack:
            v, where = stack.pop()
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_KWARG_INT:
                c.fail(where, f"is beyond the cap of {MAX_KWARG_INT} for an integer argument", v)
            if isinstance(v, str) and len(v) > 4096:
                c.fail(where, "is a string longer than 4096 characters", show=False)
            if isinstance(v, dict):
                stack.extend((x, f"{where}[{k!r}]") for k, x in v.items())
            elif isinstance(v, list):
                stack.extend((x, f"{where}[{i}]") for i, x in enumerate(v))


def _check_source(c: _Checker, source: Any, field: str) -> None:
    c.typed(source, dict, field)
    kinds = [k for k in ("timm", "factory") if k in source]
    if len(kinds) != 1:
        c.fail(field, "needs exactly one of 'timm' or 'factory'", source)
    for key in source:
        if key not in ("timm", "factory", "kwargs"):
            c.fail(f"{field}[{key!r}]", "is not a known field", show=False)
    c.typed(source[kinds[0]], str, f"{field}[{kinds[0]!r}]")
    if source.get("kwargs") is not None:
        _check_kwargs(c, source["kwargs"], f"{field}['kwargs']")


def check_example_shape(shape: Any, where: str) -> list[int]:
    """A recorded example-input shape: non-negative ints, at most the dimension and element caps."""
    if not isinstance(shape, list) or len(shape) > MAX_EXAMPLE_DIMS or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_KWARG_INT for s in shape):
        raise SurgeryError(f"{where} must be a list of at most {MAX_EXAMPLE_DIMS} non-negative integers, "
                           f"got {_short(shape)}")
    numel = math.prod(shape)
    if numel > MAX_EXAMPLE_NUMEL:
        raise SurgeryError(f"{where} {shape} has {numel:,} elements, beyond fxsurgeon's cap of "
                           f"{MAX_EXAMPLE_NUMEL:,} for a recorded example input (convert with a smaller example)")
    return shape


def _check_tracing(c: _Checker, tracing: dict[str, Any], field: str) -> None:
    known = {"leaf_modules": list, "autowrap_functions": list, "concrete_args": dict, "concrete_args_repr": str,
             "example_inputs": list, "mode": str}
    c.fields(tracing, known, field, ())
    if "mode" in tracing and tracing["mode"] not in ("eval", "train"):
        c.fail(f"{field}['mode']", "must be 'eval' or 'train'", tracing["mode"])
    for key in ("leaf_modules", "autowrap_functions"):
        if key in tracing:
            c.str_list(tracing[key], f"{field}[{key!r}]")
    for i, spec in enumerate(tracing.get("example_inputs", [])):
        where = f"{field}['example_inputs'][{i}]"
        c.typed(spec, dict, where)
        if "shape" in spec:
            if set(spec) != {"shape", "dtype"}:
                c.fail(where, "must have exactly 'shape' and 'dtype'", sorted(spec))
            try:
                check_example_shape(spec["shape"], f"{c.path}: metadata field {where}['shape']")
            except SurgeryError as exc:
                raise SurgeryError(f"{exc}; the file is corrupt or was not written by fxsurgeon.save") from None
            if spec["dtype"] not in EXAMPLE_DTYPES:
                c.fail(f"{where}['dtype']", f"must be one of {sorted(EXAMPLE_DTYPES)}", spec["dtype"])
        elif set(spec) not in ({"value"}, {"type"}):
            c.fail(where, "must have 'shape' and 'dtype', 'value' or 'type'", sorted(spec))


def validate_metadata(meta: Any, path: Any, format_version: int) -> None:
    """Check the type of every field :func:`fxsurgeon.load` reads; SurgeryError naming the first bad one."""
    c = _Checker(path)
    c.typed(meta, dict, "<top level>")
    version = meta.get("format_version")
    if type(version) is not int or version < 1:
        c.fail("'format_version'", "must be a positive integer", version)
    if version > format_version:
        raise SurgeryError(f"{path} uses fxsurgeon file format {version}, newer than this fxsurgeon's "
                           f"{format_version}: upgrade fxsurgeon")
    if meta.get("format", "fxsurgeon") != "fxsurgeon":
        c.fail("'format'", "must be 'fxsurgeon'", meta.get("format"))
    for key in ("source", "record", "structure"):
        if key not in meta:
            c.fail(f"'{key}'", "is missing", show=False)
    _check_source(c, meta["source"], "'source'")
    c.str_list(meta["structure"], "'structure'")
    tied = c.str_dict(meta.get("tied", {}), "'tied'")
    for k, v in tied.items():
        c.typed(v, str, f"'tied'[{k!r}]")
    for key in ("frozen", "channels_last"):
        c.str_list(meta.get(key, []), f"'{key}'")
    modes = meta.get("modes", {"root": False, "others": []})
    c.fields(modes, {"root": bool, "others": list}, "'modes'", ("root",))
    c.str_list(modes.get("others", []), "'modes'['others']")
    c.typed(meta.get("versions", {}), dict, "'versions'")

    record = meta["record"]
    c.fields(record, {**_RECORD_TYPES, "verification": (dict, type(None)), "source": (dict, type(None))},
             "'record'", ("model", "options", "rewrites"))
    for name, opts in record["options"].items():
        c.typed(opts, dict, f"'record'['options'][{name!r}]")
    for i, r in enumerate(record.get("rewrites", [])):
        c.fields(r, _REWRITE_FIELDS, f"'record'['rewrites'][{i}]", ("target", "before", "after", "exact", "pass_name"))
    for i, s in enumerate(record.get("skipped", [])):
        c.fields(s, _SKIP_FIELDS, f"'record'['skipped'][{i}]", ("target", "reason"))
    v = record.get("verification")
    if v is not None:
        c.fields(v, _VERIFICATION_FIELDS, "'record'['verification']", _VERIFICATION_REQUIRED)
        for i, shape in enumerate(v["input_shapes"]):
            c.typed(shape, list, f"'record'['verification']['input_shapes'][{i}]")
            for j, s in enumerate(shape):
                c.typed(s, int, f"'record'['verification']['input_shapes'][{i}][{j}]")
    if record.get("source") is not None:
        _check_source(c, record["source"], "'record'['source']")
    _check_tracing(c, record.get("tracing", {}), "'record'['tracing']")


class AllocationGuard(TorchDispatchMode):
    """Refuse, with a SurgeryError, tensor allocations beyond a byte budget while a model is built or replayed.

    Factory operations (those without tensor inputs: ``empty``, ``zeros``, ``arange``, ...) are sized on the meta
    device first and refused before any memory is allocated when they would exceed what is left of ``budget``;
    any single output beyond the budget is refused too, and so is a build that creates more than ``max_tensors``
    tensors (a model with millions of tiny layers). Meta-device tensors cost nothing and only count.
    """

    def __init__(self, budget: int, max_tensors: int, what: str) -> None:
        super().__init__()
        self.budget, self.max_tensors, self.what = int(budget), int(max_tensors), what
        self.used = 0
        self.count = 0

    def _refuse(self, nbytes: int) -> None:
        raise SurgeryError(
            f"{self.what} would allocate {nbytes / 2**20:,.0f} MiB beyond the budget of "
            f"{self.budget / 2**20:,.0f} MiB that the file's size allows; the recorded source or its keyword "
            "arguments do not fit the file. Rebuild from a source you name: load(path, source=...) or model=...")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        factory = not any(isinstance(a, torch.Tensor) for a in tree_leaves((args, kwargs)))
        if factory:
            self.count += 1
            if self.count > self.max_tensors:
                raise SurgeryError(f"{self.what} creates more than {self.max_tensors:,} tensors, far more than the "
                                   "file holds; refused")
            device = kwargs.get("device")
            if device is None or torch.device(device).type != "meta":
                try:
                    probe = func(*args, **{**kwargs, "device": torch.device("meta")})
                except Exception:  # not a sizeable factory: measured after the call instead
                    probe = None
                size = sum(t.numel() * t.element_size() for t in tree_leaves(probe) if isinstance(t, torch.Tensor))
                if self.used + size > self.budget:
                    self._refuse(self.used + size)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                size = t.numel() * t.element_size()
                if factory:
                    self.used += size
                if size > self.budget or self.used > self.budget:
                    self._refuse(max(size, self.used))
        return out
