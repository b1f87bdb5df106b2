"""The record of a conversion, kept on the converted model at ``converted.meta["fxsurgeon"]``."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError
from .passes.base import Rewrite, Skip

__all__ = ["Conversion", "Verification", "get_record", "reason_key", "summary"]

SCHEMA_VERSION = 1

#: plain attribute holding a second reference to the record: unlike ``GraphModule.meta`` it survives pickling
RECORD_ATTR = "_fxsurgeon_record"


@dataclass
class Verification:
    """Numerical difference between the original and the converted model on the example inputs.

    ``max_abs_error`` is over every output element; ``rel_error`` is ||y' - y||₂ / ||y||₂ over all outputs
    flattened together. ``exact_expected`` says whether every rewrite claimed to be exact (for finite
    activations), in which case ``rel_error`` had to stay within ``tolerance``. ``reference`` says what was run
    as the original; ``traced_rel_error`` is the traced copy's error before any rewrite (what torch.fx changed).
    """

    max_abs_error: float
    rel_error: float
    tolerance: float
    exact_expected: bool
    input_shapes: list[list[int]]
    device: str
    dtype: str
    reference: str = "the original model"
    traced_rel_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Conversion:
    """What ``convert()`` did: options, every rewrite and skip, verification, timings.

    Attributes:
        model: the original model's name (timm architecture, or class name).
        options: the pass options as applied, ``{pass_name: {option: value}}``.
        rewrites: every :class:`Rewrite`, in pass order.
        skipped: every :class:`Skip`, in pass order.
        verification: present when ``convert()`` had example inputs.
        params_before / params_after: parameter counts (plain ``numel`` sums, shared parameters once).
        seconds: wall time per step (``trace``, each pass, ``verify``).
        versions: fxsurgeon / torch / timm versions that made it.
        source: where the original model came from, when known: ``{"timm": name, "kwargs": {...}}`` or
            ``{"factory": "package.module:function", "kwargs": {...}}``; :func:`fxsurgeon.save` needs it.
        tracing: the tracing controls and example-input specs ``convert()`` was given, JSON-ready, so that
            :func:`fxsurgeon.load` can replay the conversion.
    """

    model: str
    options: dict[str, dict[str, Any]]
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    verification: Verification | None = None
    params_before: int = 0
    params_after: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] | None = None
    tracing: dict[str, Any] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return all(r.exact for r in self.rewrites)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{pass_name: {"rewrites": n, "exact": n, "skipped": n}}`` for every pass that ran."""
        out = {name: {"rewrites": 0, "exact": 0, "skipped": 0} for name in self.options}
        for r in self.rewrites:
            c = out.setdefault(r.pass_name, {"rewrites": 0, "exact": 0, "skipped": 0})
            c["rewrites"] += 1
            c["exact"] += int(r.exact)
        for s in self.skipped:
            out.setdefault(s.pass_name, {"rewrites": 0, "exact": 0, "skipped": 0})["skipped"] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "options": _jsonable(self.options),
            "rewrites": [r.to_dict() for r in self.rewrites],
            "skipped": [s.to_dict() for s in self.skipped],
            "verification": self.verification.to_dict() if self.verification else None,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "seconds": self.seconds,
            "versions": self.versions,
            "extras": self.extras,
            "source": self.source,
            "tracing": self.tracing,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversion:
        """Inverse of :meth:`to_dict` (what :func:`fxsurgeon.load` restores from a saved file's metadata)."""
        v = data.get("verification")
        return cls(
            model=data["model"],
            options=data.get("options", {}),
            rewrites=[Rewrite(**r) for r in data.get("rewrites", [])],
            skipped=[Skip(**s) for s in data.get("skipped", [])],
            verification=Verification(**v) if v else None,
            params_before=data.get("params_before", 0),
            params_after=data.get("params_after", 0),
            seconds=data.get("seconds", {}),
            versions=data.get("versions", {}),
            extras=data.get("extras", {}),
            source=data.get("source"),
            tracing=data.get("tracing", {}),
        )

    def summary(self, max_lines: int = 40) -> str:
        """Human-readable account: totals per pass, the rewrites, the skips grouped by reason, verification."""
        lines = [f"fxsurgeon conversion of {self.model}"]
        delta = self.params_after - self.params_before
        rel = f" ({delta / self.params_before:+.1%})" if self.params_before else ""
        lines.append(f"  parameters: {self.params_before:,} → {self.params_after:,}{rel}")
        for name, c in self.counts().items():
            lines.append(f"  {name}: {c['rewrites']} rewritten ({c['exact']} exact), {c['skipped']} skipped")
        if not self.rewrites:
            lines.append("  0 rewrites: the model is unchanged")
        shown = self.rewrites[:max_lines]
        if shown:
            width = max(len(r.target) for r in shown)
            lines.append("  rewrites:")
            for r in shown:
                extra = ""
                if "multiplier" in r.details:
                    extra = f"  m={r.details['multiplier']}"
                if "relative_error" in r.details:
                    extra += f" weight err={r.details['relative_error']:.3g}"
                tag = "exact" if r.exact else "approx"
                lines.append(f"    {r.target:<{width}}  {r.before} → {r.after}  [{tag}]{extra}")
            if len(self.rewrites) > len(shown):
                lines.append(f"    … {len(self.rewrites) - len(shown)} more")
        if self.skipped:
            lines.append("  skipped:")
            by_reason = Counter((s.pass_name, reason_key(s.reason)) for s in self.skipped)
            for (pname, reason), n in by_reason.most_common():
                example = next(s for s in self.skipped if s.pass_name == pname and reason_key(s.reason) == reason)
                lines.append(f"    {pname}: {n}× {example.reason} (e.g. {example.target})")
        v = self.verification
        if v is not None:
            # "verified" only when the error is within tolerance; a larger one was measured, not verified
            word = "verified" if v.rel_error <= v.tolerance else "measured"
            lines.append(
                f"  {word} on inputs {v.input_shapes} ({v.device}, {v.dtype}): max abs error {v.max_abs_error:.3g}, "
                f"relative L2 error {v.rel_error:.3g}" + (f" (exact rewrites, tolerance {v.tolerance:g})" if v.exact_expected
                   else f" (above the tolerance {v.tolerance:g}: approximate)" if word == "measured" else "")
            )
        else:
            lines.append("  not verified (pass example_inputs= to compare outputs)")
        return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    """Options as JSON-ready data: calibration tensors, timers and other objects become short descriptions."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return f"<tensor {list(obj.shape)} {str(obj.dtype).replace('torch.', '')}>"
    if callable(obj):
        return f"<callable {getattr(obj, '__qualname__', type(obj).__name__)}>"
    return f"<{type(obj).__name__}>"


def reason_key(reason: str) -> str:
    """Group skips whose reasons differ only in figures: keep the text before the first colon or digit run."""
    head = reason.split(":", 1)[0]
    return head if len(head) < len(reason) else reason


def find_record(model: nn.Module) -> Conversion | None:
    """The :class:`Conversion` record ``model`` carries, or None (:func:`get_record` without the error)."""
    meta = getattr(model, "meta", None)
    rec = meta.get("fxsurgeon") if isinstance(meta, dict) else None
    if rec is None and isinstance(getattr(model, RECORD_ATTR, None), Conversion):
        # torch.load of a pickled GraphModule rebuilds it with an empty ``meta``; the copy kept as a plain
        # attribute survives, so put it back where everything else reads it
        rec = getattr(model, RECORD_ATTR)
        if isinstance(meta, dict):
            meta["fxsurgeon"] = rec
    return rec if isinstance(rec, Conversion) else None


def get_record(model: nn.Module) -> Conversion:
    """The :class:`Conversion` record carried by a converted model.

    Raises:
        SurgeryError: ``model`` was not produced by ``fxsurgeon.convert``.
    """
    rec = find_record(model)
    if rec is None:
        raise SurgeryError(
            f"{type(model).__name__} carries no fxsurgeon record (meta['fxsurgeon']); was it made by fxsurgeon.convert?"
        )
    return rec


def summary(model: nn.Module) -> str:
    """One call, human-readable: what ``convert()`` changed in ``model``, what it skipped, and how close it is."""
    return get_record(model).summary()
