"""The Markdown summary of a batch: status counts, savings, and errors grouped by their cause.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from .job import STATUSES

__all__ = ["error_cause", "summary_markdown"]


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")


_NUMBER = re.compile(r"(?<![A-Za-z_])-?\d+(\.\d+)?(e-?\d+)?")


def error_cause(result: dict[str, Any]) -> str:
    """A short cause shared by similar failures: status, innermost error type and message without specifics.

    >>> error_cause({"status": "error", "error": "SurgeryError: torch.fx could not trace Net: in module "
    ...              "'blocks.0' (timm.X) at f.py:3 in forward: `x`: TraceError: symbolically traced "
    ...              "variables cannot be used as inputs to control flow. What you can do: ..."})
    'trace: TraceError: symbolically traced variables cannot be used as inputs to control flow'
    """
    status = result.get("status")
    err = str(result.get("error") or "")
    if status == "timeout":
        return f"timeout during {result.get('phase') or '?'}"
    if err.startswith("process killed by") or err.startswith("process exited"):
        return err.split(";")[0].split(" during ")[0]
    if "could not trace" in err:
        inner = err.split(": ", 1)[-1]
        inner = inner.split("What you can do")[0]
        m = re.search(r"`[^`]*`: ([A-Za-z_][\w.]*(Error|Exception)[^.]*)", inner)
        inner = m.group(1) if m else inner
        return "trace: " + _normalise(inner)
    if err.startswith("SurgeryError: unverifiable: this randomly initialised model is numerically chaotic"):
        return "unverifiable: the random-init model is numerically chaotic (amplifies float rounding)"
    if "changed" in err and "output" in err and "exact" in err:
        return "exact rewrites changed the output"
    if "out of memory" in err:
        return "out of memory"
    phase = result.get("phase")
    head = _normalise(err)
    return f"{phase}: {head}" if phase and phase not in ("convert",) else head


def _normalise(text: str, limit: int = 110) -> str:
    text = text.strip().splitlines()[0] if text.strip() else ""
    text = _QUOTED.sub("…", text)
    text = _NUMBER.sub("N", text)
    text = re.sub(r"0x[0-9a-f]+", "…", text)
    text = re.sub(r"\s+", " ", text).strip(" .:")
    return text[:limit]


def _fmt_int(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "–"


def _pct(after: float, before: float) -> str:
    return f"{after / before - 1:+.1%}" if before else "–"


def summary_markdown(results: Sequence[dict[str, Any]], title: str = "fxsurgeon batch", recipe: str | None = None,
                     worst: int = 10) -> str:
    """A Markdown summary: coverage line, status counts, totals, worst cases and errors grouped by cause."""
    by_status = Counter(r.get("status") for r in results)
    attempted = [r for r in results if r.get("status") != "skipped"]
    ok = [r for r in attempted if r.get("status") == "ok"]
    verified = [r for r in ok if r.get("verified")]
    within = [r for r in verified if (r.get("rel_error") is not None and r.get("tolerance") is not None
                                      and r["rel_error"] <= r["tolerance"])]  # "verified" means within tolerance
    lines = [f"# {title}", ""]
    meta = []
    if recipe:
        meta.append(f"recipe `{recipe}`")
    vers = next((r.get("versions") for r in results if r.get("versions")), None) or {}
    meta += [f"{k} {v}" for k, v in vers.items()]
    if meta:
        lines += [", ".join(meta), ""]
    share = f" ({len(within) / len(attempted):.1%})" if attempted else ""
    lines.append(f"**Coverage: {len(within)} of {len(attempted)} attempted models converted and verified{share}.**")
    lines.append("")
    lines += ["| status | models |", "|---|---:|"]
    lines += [f"| {s} | {by_status.get(s, 0)} |" for s in STATUSES]
    lines.append("")

    pb = sum(r.get("params_before") or 0 for r in ok)
    pa = sum(r.get("params_after") or 0 for r in ok)
    with_macs = [r for r in ok if r.get("macs_before") is not None and r.get("macs_after") is not None]
    mb = sum(r["macs_before"] for r in with_macs)
    ma = sum(r["macs_after"] for r in with_macs)
    secs = [r.get("seconds") or 0.0 for r in results]
    passes: dict[str, Counter] = defaultdict(Counter)
    for r in ok:
        for name, c in (r.get("passes") or {}).items():
            passes[name].update(c)
    lines += ["## Totals (converted models)", ""]
    lines.append(f"- parameters: {_fmt_int(pb)} → {_fmt_int(pa)} ({_pct(pa, pb)})")
    if with_macs:
        lines.append(f"- MACs (fvcore; one multiply-add = 1 MAC), {len(with_macs)} models counted: "
                     f"{_fmt_int(mb)} → {_fmt_int(ma)} ({_pct(ma, mb)})")
    else:
        lines.append("- MACs: not counted")
    for name, c in passes.items():
        lines.append(f"- `{name}`: {c['rewrites']:,} rewrites ({c['exact']:,} exact), {c['skipped']:,} skipped")
    if secs:
        srt = sorted(secs)
        lines.append(f"- time: {sum(secs) / 60:.1f} min in all, median {srt[len(srt) // 2]:.1f} s per model")
    lines.append("")

    lines += ["## Worst cases", ""]
    errs = sorted((r for r in verified if r.get("rel_error") is not None), key=lambda r: -r["rel_error"])[:worst]
    if errs:
        lines += ["Largest relative L2 output error:", "", "| model | rel. error | max abs error | tolerance | exact |",
                  "|---|---:|---:|---:|---|"]
        for r in errs:
            tol = f"{r['tolerance']:g}" if r.get("tolerance") is not None else "–"
            lines.append(f"| {r['model']} | {r['rel_error']:.3g} | {r.get('max_abs_error') or 0:.3g} | {tol} | "
                         f"{'yes' if r.get('exact_expected') else 'no'} |")
        lines.append("")
    grow = sorted(with_macs, key=lambda r: -(r["macs_after"] / r["macs_before"] if r["macs_before"] else 0))[:worst]
    if grow:
        lines += ["Highest MACs after / before:", "", "| model | MACs before | MACs after | change |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['macs_before']:,} | {r['macs_after']:,} | {_pct(r['macs_after'], r['macs_before'])} |"
                  for r in grow]
        lines.append("")
    slow = sorted(results, key=lambda r: -(r.get("seconds") or 0))[:min(worst, 5)]
    if slow:
        lines.append("Slowest: " + ", ".join(f"{r['model']} {r.get('seconds') or 0:.0f} s" for r in slow))
        lines.append("")

    failed = [r for r in attempted if r.get("status") in ("error", "timeout")]
    lines += ["## Errors by cause", ""]
    if not failed:
        lines += ["None.", ""]
    else:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in failed:
            groups[r.get("cause") or error_cause(r)].append(r)
        lines += ["| cause | models | which | example message |", "|---|---:|---|---|"]
        for cause, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            names = ", ".join(r["model"] for r in rs[:8]) + (f", … ({len(rs) - 8} more)" if len(rs) > 8 else "")
            example = _md_cell(str(rs[0].get("error") or ""), 300)
            lines.append(f"| {_md_cell(cause, 120)} | {len(rs)} | {names} | {example} |")
        lines.append("")
    skipped = [r for r in results if r.get("status") == "skipped"]
    if skipped:
        lines.append(f"Skipped: {len(skipped)} ({', '.join(sorted({str(r.get('cause') or r.get('error')) for r in skipped}))}).")
        lines.append("")
    return "\n".join(lines)


def _md_cell(text: str, limit: int) -> str:
    text = re.sub(r"\s+", " ", text).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
