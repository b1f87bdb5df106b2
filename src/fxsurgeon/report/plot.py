"""Per-stage chart of a savings report: MACs and parameters before/after, as PNG, SVG or PDF.

Drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, no backend switch, no global
matplotlib state touched, so it is safe in scripts, notebooks and servers alike. Nothing is written unless
:func:`plot_stages` is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SurgeryError

if TYPE_CHECKING:
    from .savings import SavingsReport

__all__ = ["FORMATS", "plot_stages"]

FORMATS = (".png", ".svg", ".pdf")


def plot_stages(report: SavingsReport, path: str | Path) -> Path:
    """Write grouped bars of MACs and parameters per stage (:meth:`SavingsReport.stages`) to ``path``.

    The format follows the suffix (``.png``, ``.svg`` or ``.pdf``). Returns the path written.

    >>> import torch, torch.nn as nn, tempfile, os, fxsurgeon
    >>> net = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    >>> x = torch.randn(1, 32, 16, 16)
    >>> r = fxsurgeon.savings(net, fxsurgeon.convert(net, example_inputs=x), x)
    >>> out = plot_stages(r, os.path.join(tempfile.mkdtemp(), "stages.svg"))
    >>> out.read_text().lstrip().startswith("<?xml")
    True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise SurgeryError(f"plot file {str(path)!r}: unknown format {path.suffix!r}; use one of {FORMATS}")
    if not path.parent.is_dir():
        raise SurgeryError(f"plot file {str(path)!r}: folder {str(path.parent)!r} does not exist")
    stages = report.stages() or [r for r in report.by_module(0)]
    names = [s["name"] or "model" for s in stages]
    fig = Figure(figsize=(max(6.0, 0.55 * len(names) + 2.5), 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    xs = range(len(names))
    width = 0.4
    for ax, key, label in ((axes[0], "macs", "MACs (millions)"), (axes[1], "params", "parameters (millions)")):
        before = [s[f"{key}_before"] / 1e6 for s in stages]
        after = [s[f"{key}_after"] / 1e6 for s in stages]
        ax.bar([x - width / 2 for x in xs], before, width, label="before", color="#9e9e9e")
        ax.bar([x + width / 2 for x in xs], after, width, label="after", color="#1f77b4")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    axes[0].set_title(
        f"{report.model}: MACs {report.macs_before / 1e6:.1f}M → {report.macs_after / 1e6:.1f}M, "
        f"parameters {report.params_before / 1e6:.2f}M → {report.params_after / 1e6:.2f}M\n"
        "MACs = multiply-accumulates (fvcore counts one multiply-add as one)", fontsize=10)
    axes[1].set_xticks(list(xs), names, rotation=45, ha="right")
    try:
        fig.savefig(path)
    except OSError as exc:
        raise SurgeryError(f"cannot write plot {str(path)!r}: {exc}") from exc
    return path
