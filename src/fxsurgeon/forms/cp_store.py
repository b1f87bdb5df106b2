"""A disk cache of the CP errors behind ``pw-dw-pw`` menus, so a second conversion of the same weights skips the fits.

A ``form="auto"`` budget asks, for every 3×3 conv, the error of a rank-R CP decomposition at up to 24 ranks; each
is an ALS fit (:mod:`fxsurgeon.forms.cp`), two thirds of a warm latency-budget conversion of timm resnet50. The
result is two floats that depend only on the weight's values, the rank, the sweeps, the tolerance, the ALS ridge,
the number of threads the fit ran on and the code that computed it, so they can be kept: one entry per
``sha256(weight) × shape × dtype × rank × sweeps × tol × ridge × threads`` in a JSON file whose context names the torch
version, the CPU's instruction set and :data:`ALGORITHM` (bumped whenever the decomposition changes). A cached
error is the same float a new fit on this machine would give, so a warm conversion decides exactly as a cold one.

The file is read as untrusted input (:class:`fxsurgeon.cachefile.CacheFile`): JSON only, every entry two finite
floats with ``0 <= error <= norm2``; anything else is ignored with a warning and rewritten. A tampered entry can
only mislead a menu (the budget's whole-model check still measures what was built), never run code.

Stores are used through :func:`cp_error_store` (a context variable, nothing global changes):

>>> import tempfile, torch
>>> from pathlib import Path
>>> store = CPErrorStore(Path(tempfile.mkdtemp()))
>>> w = CPErrorStore.weight_id(torch.ones(4, 4, 3, 3))
>>> store.get(w, 2, 30, 1e-7, 1e-5, 1) is None
True
>>> store.put(w, 2, 30, 1e-7, 1e-5, 1, 0.25, 144.0); store.flush()
>>> CPErrorStore(store.path.parent).get(w, 2, 30, 1e-7, 1e-5, 1)
(0.25, 144.0)
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..cachefile import CacheFile

__all__ = ["ALGORITHM", "CPErrorStore", "active_store", "cp_error_store"]

FORMAT = "fxsurgeon-cp-menu-errors"
VERSION = 1
#: which CP code computed the errors: bump when the start, the ALS or the error changes (old files are then
#: ignored and rewritten, not trusted). The fit's settings (sweeps, tolerance, ridge, threads) are in each key.
ALGORITHM = "slice-svd-start+als-line-search+ridge/3"
#: entries a file keeps (about 100 bytes each; a resnet50 conversion adds a few hundred)
MAX_ENTRIES = 100_000


def _cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an old or unusual build
        return "unknown"


def _valid(value: Any) -> bool:
    if not isinstance(value, list) or len(value) != 2:
        return False
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in value):
        return False
    error, norm2 = value
    return error <= norm2 * (1 + 1e-9) + 1e-300


class CPErrorStore:
    """CP menu errors of one machine and torch build, in ``folder`` (one file per context).

    Args:
        folder: where the file lives (the latency budget passes its latency cache folder).
    """

    def __init__(self, folder: Path) -> None:
        self.context = {"torch": torch.__version__, "cpu": _cpu_capability(), "machine": platform.machine(),
                        "algorithm": ALGORITHM}
        digest = hashlib.sha256(json.dumps(self.context, sort_keys=True).encode()).hexdigest()[:20]
        self.path = Path(folder).expanduser() / f"cp-menu-errors-{digest}.json"
        self.file = CacheFile(self.path, FORMAT, VERSION, self.context, valid=_valid, what="CP error cache",
                              max_entries=MAX_ENTRIES)
        self.hits = 0
        self.fits = 0

    @staticmethod
    def weight_id(weight: torch.Tensor) -> str:
        """What a fit depends on in the weight: sha256 of its values, its shape and dtype (hash it once per menu)."""
        w = weight.detach().to(device="cpu").contiguous()
        raw = (w.float() if w.dtype == torch.bfloat16 else w).numpy().tobytes()
        shape = "x".join(str(d) for d in w.shape)
        return f"{hashlib.sha256(raw).hexdigest()[:32]}|{shape}|{str(w.dtype).removeprefix('torch.')}"

    @staticmethod
    def _key(weight_id: str, rank: int, sweeps: int, tol: float, ridge: float, threads: int) -> str:
        return f"{weight_id}|r{rank}|s{sweeps}|t{tol!r}|g{ridge!r}|th{threads}"

    def get(self, weight_id: str, rank: int, sweeps: int, tol: float, ridge: float,
            threads: int) -> tuple[float, float] | None:
        """``(error, norm2)`` of this fit when it was kept, else None."""
        hit = self.file.get(self._key(weight_id, rank, sweeps, tol, ridge, threads))
        if hit is None:
            return None
        self.hits += 1
        return float(hit[0]), float(hit[1])

    def put(self, weight_id: str, rank: int, sweeps: int, tol: float, ridge: float, threads: int, error: float,
            norm2: float) -> None:
        self.file.put(self._key(weight_id, rank, sweeps, tol, ridge, threads), [float(error), float(norm2)])
        self.fits += 1

    def flush(self) -> None:
        """Write the new errors (atomically, merged with what another process wrote)."""
        self.file.flush()

    def summary(self) -> dict[str, Any]:
        return {"cache_file": str(self.path), "hits": self.hits, "fits": self.fits,
                "warnings": list(self.file.warnings)}


_STORE: contextvars.ContextVar[CPErrorStore | None] = contextvars.ContextVar("fxsurgeon_cp_error_store",
                                                                              default=None)


@contextlib.contextmanager
def cp_error_store(store: CPErrorStore | None) -> Iterator[CPErrorStore | None]:
    """Within it, CP menu errors are looked up in ``store`` and new ones kept there (None: no disk cache).
    Its owner writes them with :meth:`CPErrorStore.flush` once it is done (not at every exit: a budget enters
    once per layer)."""
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)


def active_store() -> CPErrorStore | None:
    """The store of the innermost :func:`cp_error_store`, if any."""
    return _STORE.get()
