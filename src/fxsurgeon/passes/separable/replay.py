"""Replaying a recorded separable conversion on a freshly built original (:func:`fxsurgeon.io.load`).

Registered as the separable pass's ``replay`` hook: every recorded layer gets its recorded form and rank
through ``layers=``, every other conv is excluded by name, and ``init="random"`` skips the SVDs (the saved
weights overwrite the modules anyway).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ...errors import SurgeryError

__all__ = ["escape_name", "replay_separable"]


def escape_name(name: str) -> str:
    """fnmatch pattern matching exactly ``name``.

    >>> escape_name("blocks[0].conv*")
    'blocks[[]0].conv[*]'
    """
    return re.sub(r"([*?\[])", r"[\1]", name)


def replay_separable(options: dict[str, Any], rewrites: list[dict], model: nn.Module) -> dict[str, Any]:
    """Options reproducing exactly the recorded separable rewrites on the freshly built ``model``.

    Every recorded layer gets its recorded form and rank through ``layers=`` (which forces the rewrite
    whatever its profitability; and a bias where bias correction added one); every other spatial conv is excluded by name; data-driven choices
    (``energy=``, budgets) are therefore not recomputed, and ``init="random"`` skips the SVDs.
    """
    layers: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(rewrites):
        d = r.get("details", {})
        rank, form = d.get("rank"), d.get("form", options.get("form", "dw-pw"))
        if type(rank) is not int or rank < 1:
            raise SurgeryError(f"separable rewrite of '{r['target']}' records no positive integer rank (field "
                               f"'record'['rewrites'][{i}]['details']['rank'] is {rank!r:.40}); it cannot be replayed")
        if not isinstance(form, str):
            raise SurgeryError(f"separable rewrite of '{r['target']}': field 'record'['rewrites'][{i}]['details']"
                               f"['form'] must be a string, got {form!r:.40}")
        layers[r["target"]] = {"form": form, "rank": rank}
        if "bias_correction" in d:  # the correction gave the replacement a bias: the saved weights fill it
            layers[r["target"]]["bias"] = True
    groups: dict[int, list[str]] = {}
    kernels = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, nn.modules.conv._ConvNd):
            groups.setdefault(id(mod), []).append(name)
            if name in layers:
                kernels.add(tuple(mod.kernel_size))
    exclude = [escape_name(n) for names in groups.values() if not set(names) & set(layers) for n in names]
    # "all" matches every spatial kernel; recorded 1×1 rewrites (pw-pw) need 1 named, and then every recorded
    # kernel is square (a conversion that rewrote 1×1 convs listed its sizes: "all" leaves 1×1 out)
    sizes: Any = "all"
    if (1, 1) in kernels:
        if any(len(set(k)) != 1 for k in kernels):
            raise SurgeryError("the separable record rewrites 1×1 convs and non-square kernels together, which no "
                               "single kernel_sizes selects; it cannot be replayed")
        sizes = tuple(sorted(k[0] for k in kernels))
    return {"layers": layers, "exclude": exclude, "include_stem": True, "kernel_sizes": sizes, "init": "random"}


