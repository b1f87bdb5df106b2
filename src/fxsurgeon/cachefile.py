"""One JSON file of cached numbers, read as untrusted input and written atomically.

fxsurgeon keeps two kinds of measurements on disk between conversions: latency tables
(:mod:`fxsurgeon.budget.latency_table`) and the CP decomposition errors behind ``form="auto"`` menus
(:mod:`fxsurgeon.forms.cp_store`). Both are a speed-up only, so a file that does not validate is ignored (with a
warning) and rewritten, never executed or partly trusted: JSON only, a size cap before parsing, the format,
version and context compared, and every entry checked by the caller's ``valid`` function.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> f = CacheFile(Path(folder) / "t.json", "demo", 1, {"k": 1}, valid=lambda v: isinstance(v, float))
>>> f.write({"a": 1.5}); f.read()
{'a': 1.5}

Most callers use it as a lazily loaded dict whose new entries are written together:

>>> g = CacheFile(Path(folder) / "t.json", "demo", 1, {"k": 1}, valid=lambda v: isinstance(v, float))
>>> g.get("a"), g.get("b")
(1.5, None)
>>> g.put("b", 2.5); g.flush(); sorted(f.read().items())
[('a', 1.5), ('b', 2.5)]
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CacheFile"]

#: a cache file larger than this is not read
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_KEY_CHARS = 1000


class CacheFile:
    """A JSON file ``{"format", "version", "context", "entries": {key: value}}``.

    Args:
        path: the file (its folder is created on the first write); None keeps entries in memory only.
        fmt / version / context: what a file must say to be read; anything else makes it "not this cache".
        valid: ``value -> bool``, each entry's check (a file with one bad entry is ignored whole).
        what: how warnings name the file (``"latency cache"``).
        max_entries: on writing, entries kept at most: the new ones first, then as many old ones as fit.
    """

    def __init__(self, path: Path | None, fmt: str, version: int, context: dict[str, Any], *,
                 valid: Callable[[Any], bool], what: str = "cache", max_entries: int = 200_000) -> None:
        self.path = Path(path) if path is not None else None
        self.fmt, self.version, self.context = fmt, version, context
        self.valid, self.what, self.max_entries = valid, what, max_entries
        self.warnings: list[str] = []
        self._memory: dict[str, Any] | None = None  # the file's entries and ours, read on the first get/put
        self._pending: dict[str, Any] = {}  # ours, not yet written

    # ---------------------------------------------------------------------- entries in memory

    def _loaded(self) -> dict[str, Any]:
        if self._memory is None:
            self._memory = self.read()
        return self._memory

    def get(self, key: str, default: Any = None) -> Any:
        """An entry (the file is read on the first call), or ``default``."""
        return self._loaded().get(key, default)

    def put(self, key: str, value: Any) -> None:
        """Keep an entry; :meth:`flush` writes the new ones."""
        self._loaded()[key] = value
        if self.path is not None:
            self._pending[key] = value

    def flush(self) -> None:
        """Write the entries :meth:`put` since the last flush (merged with what another process wrote)."""
        if self._pending:
            self.write(self._pending)
            self._pending.clear()

    # --------------------------------------------------------------------------- the file

    def _warn(self, msg: str) -> None:
        if msg in self.warnings:  # the write re-reads the file it warned about: once is enough
            return
        self.warnings.append(msg)
        warnings.warn(msg, stacklevel=4)

    def _entries(self, data: Any) -> dict[str, Any] | None:
        if not isinstance(data, dict) or data.get("format") != self.fmt or data.get("version") != self.version:
            return None
        if data.get("context") != self.context or not isinstance(data.get("entries"), dict):
            return None
        out: dict[str, Any] = {}
        for key, value in data["entries"].items():
            if not isinstance(key, str) or len(key) > MAX_KEY_CHARS or not self.valid(value):
                return None
            out[key] = value
        return out

    def read(self) -> dict[str, Any]:
        """The file's entries; ``{}`` when it is missing, and (with a warning) when it does not validate."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            if self.path.stat().st_size > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            self._warn(f"{self.what} {self.path} is not a readable JSON table ({exc}); ignored, it will be rewritten")
            return {}
        entries = self._entries(data)
        if entries is None:
            self._warn(f"{self.what} {self.path} does not validate as an fxsurgeon {self.what} for this setting; "
                       "ignored, it will be rewritten")
            return {}
        return entries

    def write(self, new: dict[str, Any]) -> None:
        """Merge ``new`` into the file (re-read, so entries another process wrote are kept) and replace it
        atomically. An unwritable folder only warns: the cache is a speed-up."""
        if not new or self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            old = {k: v for k, v in self.read().items() if k not in new}
            room = max(self.max_entries - len(new), 0)
            merged = {**dict(list(old.items())[:room]), **new}
            payload = json.dumps({"format": self.fmt, "version": self.version, "context": self.context,
                                  "entries": dict(sorted(merged.items()))}, indent=0)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(payload)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:  # a read-only home, a full disk
            self._warn(f"{self.what} {self.path} could not be written ({exc}); measurements are not kept")
