"""Results files: JSON lines appended one result at a time, read back for resuming a batch.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..cli.common import MIN_FREE_BYTES
from ..errors import SurgeryError
from .isolation import finite_json

__all__ = ["ResultsFile", "check_writable", "latest_results"]


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse early, with a clear message, when ``path`` cannot be written or its disk is (nearly) full."""
    p = Path(path)
    if p.is_dir():
        raise SurgeryError(f"{what} {str(p)!r} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise SurgeryError(f"cannot write {what} {str(p)!r}: directory {str(parent)!r} does not exist")
    try:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides, as for open()
        os.close(fd)
    except OSError as exc:
        raise SurgeryError(f"cannot write {what} {str(p)!r}: {exc.strerror or exc}") from exc
    free = shutil.disk_usage(parent).free
    if free < MIN_FREE_BYTES:
        raise SurgeryError(
            f"disk holding {what} {str(p)!r} is nearly full ({free / 2**20:.1f} MiB free, need at least "
            f"{MIN_FREE_BYTES // 2**20} MiB); free some space or write elsewhere"
        )
    return p


class ResultsFile:
    """A JSON-lines results file appended one complete line per model, safe against kills.

    Opening cuts off a torn last line (a line without its newline: the writer died mid-write or the disk
    filled); :meth:`read` skips any line that is not a JSON object with a ``model``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.repaired_bytes = 0
        self._repair()

    def _repair(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                f.truncate(keep)
                self.repaired_bytes = len(data) - keep

    def read(self) -> tuple[list[dict[str, Any]], int]:
        """(every valid result in file order, number of unreadable lines)."""
        if not self.path.exists():
            return [], 0
        out, bad = [], 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                if isinstance(obj, dict) and isinstance(obj.get("model"), str):
                    out.append(obj)
                else:
                    bad += 1
        return out, bad

    def append(self, result: dict[str, Any]) -> None:
        """Append one result as one line: a single ``os.write`` on an ``O_APPEND`` descriptor, then fsync."""
        data = (json.dumps(finite_json(result), default=str, allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides
        try:
            size = os.fstat(fd).st_size
            written = os.write(fd, data)
            if written != len(data):  # disk full: take the partial line back out rather than leave it torn
                os.ftruncate(fd, size)
                raise SurgeryError(f"could not write a whole result line to {str(self.path)!r} (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)


def latest_results(results: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last result per model (a ``--force`` or ``--retry-failed`` rerun appends a newer line)."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        out.pop(r["model"], None)
        out[r["model"]] = r
    return out
