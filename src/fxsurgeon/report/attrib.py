"""Which rewrite saved or added what: MACs and parameters of the modules each rewrite touched, per pass.

A rewrite touches its target (the qualified name it rewrote) and the modules a pass names in its details under
``module``, ``modules`` or ``consumers`` (at any depth, e.g. ``details["sites"][i]["consumers"]``): the concat
fusion pass adds a fusion conv under a new name and narrows the consumers after it. A rewrite's figures are the
fvcore MACs and parameters of those modules in the original and the converted model (0 where a model has no
module of that name: added or removed). A module is counted once, for the first rewrite that touches it; the
change no rewrite explains is reported as *unattributed*, so the per-pass figures always add up to the total.

>>> from fxsurgeon.passes.base import Rewrite
>>> footprint(Rewrite("cat", "cat", "cat → fusion", True, details={"module": "fusion", "role": "head"}),
...           {"fusion", "head"})
['fusion']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..passes.base import Rewrite
from .count import Counts

__all__ = ["FOOTPRINT_KEYS", "attribute_rewrites", "footprint"]

#: keys of ``Rewrite.details`` whose string values (or lists of them) name modules the rewrite touched
FOOTPRINT_KEYS = ("module", "modules", "consumers")

_FIGURES = ("macs_before", "macs_after", "params_before", "params_after")


def footprint(rewrite: Rewrite, modules: Iterable[str]) -> list[str]:
    """The module names ``rewrite`` touched that exist in ``modules``: its target and the names under
    :data:`FOOTPRINT_KEYS` in its details, outermost only (a name inside another listed one is dropped)."""
    known = set(modules)
    names = [rewrite.target]

    def walk(obj: Any, key: str | None) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, k)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, key)
        elif isinstance(obj, str) and key in FOOTPRINT_KEYS:
            names.append(obj)

    walk(rewrite.details, None)
    names = [n for n in dict.fromkeys(names) if n and n in known]
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def _figures(counts: Counts, name: str, side: str) -> dict[str, int]:
    present = name in counts.module_macs
    return {f"macs_{side}": counts.module_macs.get(name, 0),
            f"params_{side}": counts.params.get(name, 0) if present else 0}


def attribute_rewrites(
    rewrites: Iterable[Rewrite], pass_counts: dict[str, dict[str, int]], before: Counts, after: Counts
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]], dict[str, int]]:
    """Rows per rewrite, totals per pass and the unattributed change (see the module docstring).

    Args:
        rewrites: the conversion record's rewrites, in order.
        pass_counts: ``Conversion.counts()``: ``{pass: {"rewrites", "exact", "skipped"}}``.
        before / after: fvcore counts of the original and the converted model.

    Returns:
        ``(rows, passes, unattributed)``: each row has the rewrite's target, pass, before/after text,
        ``exact``, ``modules`` (the names counted for it), the four figures, ``counted`` (False when every
        module it touched was counted for an earlier rewrite) and its details; ``passes`` adds the summed
        figures to ``pass_counts``; ``unattributed`` is ``{"macs", "params"}`` after − before not explained.
    """
    passes = {name: {**c, **dict.fromkeys(_FIGURES, 0)} for name, c in pass_counts.items()}
    names = set(before.module_names) | set(after.module_names)
    counted: list[str] = []
    rows = []
    for r in rewrites:
        fresh = [n for n in footprint(r, names) if not any(n == c or n.startswith(c + ".") for c in counted)]
        # a fresh name may enclose names counted earlier: count only its new part
        inside = [c for c in counted if any(c.startswith(n + ".") for n in fresh)]
        inner = [c for c in inside if not any(c.startswith(o + ".") for o in inside)]
        fig = dict.fromkeys(_FIGURES, 0)
        for sign, group in ((1, fresh), (-1, inner)):
            for n in group:
                for counts, side in ((before, "before"), (after, "after")):
                    for k, v in _figures(counts, n, side).items():
                        fig[k] += sign * v
        counted += fresh
        rows.append({"target": r.target, "pass": r.pass_name, "before": r.before, "after": r.after,
                     "exact": r.exact, "modules": fresh, **fig, "counted": bool(fresh), "details": r.details})
        p = passes.setdefault(r.pass_name, {"rewrites": 0, "exact": 0, "skipped": 0, **dict.fromkeys(_FIGURES, 0)})
        for k in _FIGURES:
            p[k] += fig[k]
    d_macs = sum(p["macs_after"] - p["macs_before"] for p in passes.values())
    d_params = sum(p["params_after"] - p["params_before"] for p in passes.values())
    unattributed = {
        "macs": (after.total_macs - before.total_macs) - d_macs,
        "params": (after.params.get("", 0) - before.params.get("", 0)) - d_params,
    }
    return rows, passes, unattributed
