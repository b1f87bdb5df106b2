"""Renderers for :class:`fxsurgeon.report.SavingsReport`: terminal table, Markdown, CSV row.

The Markdown is made for GitHub job summaries and PR comments: the totals line first, the per-pass table,
then per-module figures, rewrites, skips, uncounted ops and the FlopCounterMode cross-check in collapsible
``<details>`` blocks. Every figure of work is in MACs (fvcore: one multiply-add = 1 MAC).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..record import reason_key

if TYPE_CHECKING:
    from .savings import SavingsReport

__all__ = ["CSV_FIELDS", "csv_header", "to_csv", "to_markdown", "to_table", "totals_line"]

#: columns of :func:`to_csv`, in order
CSV_FIELDS = ("model", "weights", "input_shape", "params_before", "params_after", "param_savings", "macs_before",
              "macs_after", "mac_savings", "max_abs_error", "rel_error", "cosine_similarity", "top1_agreement",
              "fidelity_source", "rewrites", "exact_rewrites", "skipped")


def human(n: float | None) -> str:
    """``1818558976`` → ``"1.82G"``; small numbers stay whole.

    >>> human(18874368), human(2336), human(512)
    ('18.87M', '2.34K', '512')
    """
    if n is None:
        return "n/a"
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def change(before: float, after: float) -> str:
    """Relative change of ``after`` against ``before``: ``"-87.3%"``, ``"+4.0%"``, ``"n/a"`` from 0."""
    if after == before:
        return "0%"
    if not before:
        return "n/a"
    return f"{after / before - 1:+.1%}"


def _err(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def totals_line(r: SavingsReport) -> str:
    """The one-line summary the Markdown opens with.

    ``**Totals:** MACs per sample 18.87M → 2.39M (-87.3%) · parameters 18.43K → 2.34K (-87.3%) · relative L2 error 0.41``
    """
    return (f"**Totals:** MACs per sample {human(r.macs_before)} → {human(r.macs_after)} ({change(r.macs_before, r.macs_after)})"
            f" · parameters {human(r.params_before)} → {human(r.params_after)} "
            f"({change(r.params_before, r.params_after)}) · relative L2 error {_err(r.rel_error)}")


def _table(headers: list[str], rows: list[list[Any]], right: set[int] | None = None) -> str:
    """A pipe table with padded columns: valid Markdown, and readable as plain text."""
    right = set(range(1, len(headers))) if right is None else right
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if i in right else v.ljust(w)
                                 for i, (v, w) in enumerate(zip(vals, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _shapes(r: SavingsReport) -> str:
    return ", ".join("×".join(map(str, s)) for s in r.input_shapes)


RANDOM_WEIGHTS_NOTE = ("RANDOM WEIGHTS: the models were not given trained weights, so the fidelity figures say "
                       "nothing about a trained model (fresh residual branches can give 0 error for free). "
                       "Load trained weights (--weights FILE or --pretrained) for a meaningful comparison.")


def _fidelity_text(r: SavingsReport) -> str:
    if r.fidelity_source == "none":
        return "Fidelity: not measured (no outputs compared and no verification in the conversion record)."
    parts = [f"max abs error {_err(r.max_abs_error)}", f"relative L2 error {_err(r.rel_error)}"]
    if r.cosine_similarity is not None:
        parts.append(f"cosine similarity {r.cosine_similarity:.6f}")
    if r.top1_agreement is not None:
        parts.append(f"top-1 agreement {r.top1_agreement:.1%}")
    where = "on the report's inputs" if r.fidelity_source == "measured" else "from the conversion record"
    return f"Fidelity ({where}, {_shapes(r)}): " + ", ".join(parts) + "."


def _summary_rows(r: SavingsReport) -> list[list[Any]]:
    return [
        ["MACs per sample", f"{r.macs_before:,}", f"{r.macs_after:,}", change(r.macs_before, r.macs_after)],
        ["parameters", f"{r.params_before:,}", f"{r.params_after:,}", change(r.params_before, r.params_after)],
    ]


def _pass_rows(r: SavingsReport) -> list[list[Any]]:
    rows = []
    for name, p in r.passes.items():
        rows.append([name, p["rewrites"], p["exact"], p["skipped"],
                     f"{human(p['macs_before'])} → {human(p['macs_after'])}",
                     f"{p['macs_after'] - p['macs_before']:+,}",
                     f"{human(p['params_before'])} → {human(p['params_after'])}",
                     f"{p['params_after'] - p['params_before']:+,}"])
    u = r.unattributed
    if u["macs"] or u["params"]:
        rows.append(["(no rewrite)", "", "", "", "", f"{u['macs']:+,}", "", f"{u['params']:+,}"])
    return rows


# figures of the modules each pass's rewrites touched (fxsurgeon.report.attrib)
_PASS_HEADERS = ["pass", "rewrites", "exact", "skipped", "MACs before → after", "Δ MACs", "params before → after",
                 "Δ params"]


def _module_rows(r: SavingsReport, depth: int | None = None) -> list[list[Any]]:
    return [[("  " * max(m["depth"] - 1, 0) + m["name"]) if m["name"] else "model",
             f"{m['macs_before']:,}", f"{m['macs_after']:,}", change(m["macs_before"], m["macs_after"]),
             f"{m['params_before']:,}", f"{m['params_after']:,}", change(m["params_before"], m["params_after"])]
            for m in r.by_module(depth)]


_MODULE_HEADERS = ["module", "MACs before", "MACs after", "Δ", "params before", "params after", "Δ"]


def _uncounted_text(r: SavingsReport) -> str:
    ops = sorted(set(r.uncounted_ops["before"]) | set(r.uncounted_ops["after"]))
    if not ops:
        return "fvcore counted every op it met."
    rows = [[op, r.uncounted_ops["before"].get(op, 0), r.uncounted_ops["after"].get(op, 0)] for op in ops]
    return ("fvcore has no MAC formula for these ops and counts them as 0 (calls per model):\n\n"
            + _table(["op", "calls before", "calls after"], rows))


def _cross_rows(r: SavingsReport) -> list[list[Any]]:
    return [[o["op"], f"{o['fvcore_macs_before']:,}", f"{o['torch_flops_before']:,}", f"{o['fvcore_macs_after']:,}",
             f"{o['torch_flops_after']:,}", "yes" if o["agree"] else "no", o["reason"] or ""]
            for o in r.cross_check["ops"]]


_CROSS_HEADERS = ["op", "fvcore MACs before", "torch FLOPs before", "fvcore MACs after", "torch FLOPs after",
                  "2×MACs = FLOPs", "why not"]


def _skip_groups(skipped: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, dict[str, Any]]]:
    """Skips grouped by pass and reason (figures aside), most frequent first: (count, first skip, whole)."""
    counts = Counter((s["pass"], reason_key(s["reason"])) for s in skipped)
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for s in skipped:
        first.setdefault((s["pass"], reason_key(s["reason"])), s)
    return {key: (n, first[key]) for key, n in counts.most_common()}


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"


def to_markdown(r: SavingsReport, max_rows: int = 200) -> str:
    """Markdown for a GitHub job summary or PR comment; tables longer than ``max_rows`` are cut, saying so."""
    from .count import MACS_NOTE

    def cut(rows: list) -> tuple[list, str]:
        extra = f"\n\n… {len(rows) - max_rows} more rows in the JSON report" if len(rows) > max_rows else ""
        return rows[:max_rows], extra

    out = [f"### fxsurgeon savings report: `{r.model}`", ""]
    if r.random_weights:
        out += [f"> **{RANDOM_WEIGHTS_NOTE}**", ""]
    out += [totals_line(r), "",
           _table(["", "before", "after", "change"], _summary_rows(r)), "", _fidelity_text(r), "",
           f"<sub>{MACS_NOTE}. Inputs: {_shapes(r)}. Weights: {r.weights}.</sub>", ""]
    if r.passes:
        out += [_table(_PASS_HEADERS, _pass_rows(r), right={1, 2, 3, 5, 7}), ""]
    else:
        out += ["No conversion record on the converted model: no per-pass breakdown.", ""]
    rows, extra = cut(_module_rows(r))
    out += [_details(f"Per module (depth {r.module_depth})", _table(_MODULE_HEADERS, rows, right={1, 2, 3, 4, 5, 6})
                     + extra), ""]
    if r.rewrites:
        rows, extra = cut([[f"`{w['target']}`", w["pass"], f"{w['before']} → {w['after']}",
                            "yes" if w["exact"] else "no", f"{w['macs_before']:,} → {w['macs_after']:,}",
                            f"{w['params_before']:,} → {w['params_after']:,}"] for w in r.rewrites])
        out += [_details(f"Rewrites ({len(r.rewrites)})", _table(
            ["target", "pass", "change", "exact", "MACs", "params"], rows, right=set()) + extra), ""]
    if r.skipped:
        groups = _skip_groups(r.skipped)
        rows = [[p, n, example["reason"], f"`{example['target']}`"] for (p, _), (n, example) in groups.items()]
        out += [_details(f"Skipped ({len(r.skipped)})", _table(["pass", "count", "reason", "e.g."], rows,
                                                                right={1})), ""]
    out += [_details("Ops fvcore did not count", _uncounted_text(r)), ""]
    if r.cross_check is not None:
        c = r.cross_check
        body = (f"torch.utils.flop_counter.FlopCounterMode counts FLOPs = 2 × MACs, for matrix products, "
                f"convolutions and attention only: {c['torch_flops_before']:,} → {c['torch_flops_after']:,} FLOPs."
                "\n\n" + _table(_CROSS_HEADERS, _cross_rows(r), right={1, 2, 3, 4}))
        if c["modules"]:
            rows, extra = cut([[m["model"], f"`{m['module']}`", f"{m['fvcore_macs']:,}", f"{m['torch_flops']:,}",
                                ", ".join(f"{k} {v:+,}" for k, v in m["difference_macs"].items())]
                               for m in c["modules"]])
            body += ("\n\nWhere they differ (modules down to the report's depth; difference = fvcore MACs − "
                     "torch FLOPs / 2):\n\n" + _table(["model", "module", "fvcore MACs", "torch FLOPs",
                                                        "difference by op"], rows, right={2, 3}) + extra)
        out += [_details("Cross-check with PyTorch's FlopCounterMode", body), ""]
    return "\n".join(out)


def to_table(r: SavingsReport) -> str:
    """Plain-text report for a terminal: totals, fidelity, passes, modules, uncounted ops, cross-check."""
    from .count import MACS_NOTE

    out = [f"fxsurgeon savings report: {r.model} (inputs {_shapes(r)}, weights {r.weights})", MACS_NOTE, ""]
    if r.random_weights:
        out += [RANDOM_WEIGHTS_NOTE, ""]
    out += [_table(["", "before", "after", "change"], _summary_rows(r)), "", _fidelity_text(r), ""]
    if r.passes:
        out += [_table(_PASS_HEADERS, _pass_rows(r), right={1, 2, 3, 5, 7}), ""]
    out += [f"per module (depth {r.module_depth}):", _table(_MODULE_HEADERS, _module_rows(r),
                                                          right={1, 2, 3, 4, 5, 6}), ""]
    if r.skipped:
        groups = _skip_groups(r.skipped)
        out += ["skipped:"] + [f"  {p}: {n}× {example['reason']} (e.g. {example['target']})"
                               for (p, _), (n, example) in groups.items()] + [""]
    out.append(_uncounted_text(r))
    if r.cross_check is not None:
        bad = [o for o in r.cross_check["ops"] if not o["agree"]]
        out += ["", "cross-check with FlopCounterMode (FLOPs = 2 × MACs): "
                + ("agrees on every op" if not bad else "differs on " + ", ".join(o["op"] for o in bad))]
        out += [f"  {o['op']}: {o['reason']}" for o in bad]
    return "\n".join(out)


def csv_header() -> str:
    return ",".join(CSV_FIELDS) + "\n"


def to_csv(r: SavingsReport, header: bool = False) -> str:
    """One CSV line (``CSV_FIELDS``) for batch tables; with ``header=True`` the header line first."""
    d = r.to_dict()
    row = {k: d.get(k) for k in CSV_FIELDS}
    row["input_shape"] = ";".join("x".join(map(str, s)) for s in r.input_shapes)
    row["rewrites"] = len(r.rewrites)
    row["exact_rewrites"] = sum(1 for w in r.rewrites if w["exact"])
    row["skipped"] = len(r.skipped)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()
