"""The on-disk cache file: JSON only, validated whole, written atomically, never trusted when it does not validate."""

from __future__ import annotations

import json
import os
import warnings

import pytest

from fxsurgeon import cachefile
from fxsurgeon.cachefile import CacheFile


def positive(v):
    return isinstance(v, float) and v > 0


def make(tmp_path, **kw):
    return CacheFile(tmp_path / "sub" / "t.json", "demo", 1, {"machine": "m"}, valid=positive, what="demo cache", **kw)


def test_round_trip_creates_the_folder_and_merges(tmp_path):
    f = make(tmp_path)
    assert f.read() == {}
    f.write({"a": 1.0})
    other = make(tmp_path)  # another process writing the same file
    other.write({"b": 2.0})
    f.write({"a": 3.0})
    assert make(tmp_path).read() == {"a": 3.0, "b": 2.0}
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".tmp-")]


def test_get_put_flush_read_lazily_and_write_only_new_entries(tmp_path):
    make(tmp_path).write({"a": 1.0})
    f = make(tmp_path)
    f.put("b", 2.0)  # a put before any get still sees the file's entries
    assert f.get("a") == 1.0 and f.get("b") == 2.0 and f.get("c") is None
    make(tmp_path).write({"a": 5.0})  # another process, after we read: its value survives our flush
    f.flush()
    assert make(tmp_path).read() == {"a": 5.0, "b": 2.0}
    f.flush()  # nothing new: no write
    assert make(tmp_path).read() == {"a": 5.0, "b": 2.0}


def test_no_path_keeps_entries_in_memory_only(tmp_path):
    f = CacheFile(None, "demo", 1, {}, valid=positive)
    f.put("a", 1.0)
    f.flush()
    assert f.get("a") == 1.0 and f.read() == {}
    assert list(tmp_path.iterdir()) == []


def test_empty_write_touches_nothing(tmp_path):
    make(tmp_path).write({})
    assert not (tmp_path / "sub").exists()


@pytest.mark.parametrize("text", [
    "{not json",
    "[]",
    json.dumps({"format": "other", "version": 1, "context": {"machine": "m"}, "entries": {}}),
    json.dumps({"format": "demo", "version": 2, "context": {"machine": "m"}, "entries": {}}),
    json.dumps({"format": "demo", "version": 1, "context": {"machine": "x"}, "entries": {"a": 1.0}}),
    json.dumps({"format": "demo", "version": 1, "context": {"machine": "m"}, "entries": {"a": 1.0, "b": -1.0}}),
    json.dumps({"format": "demo", "version": 1, "context": {"machine": "m"}, "entries": {"a": "__import__('os')"}}),
    json.dumps({"format": "demo", "version": 1, "context": {"machine": "m"}, "entries": {"k" * 2000: 1.0}}),
    json.dumps({"format": "demo", "version": 1, "context": {"machine": "m"}, "entries": [1.0]}),
])
def test_a_file_that_does_not_validate_is_ignored_whole_and_rewritten(tmp_path, text):
    f = make(tmp_path)
    f.path.parent.mkdir(parents=True)
    f.path.write_text(text)
    with pytest.warns(UserWarning, match="demo cache .* ignored, it will be rewritten"):
        assert f.read() == {}
    assert f.warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f.write({"c": 1.0})
    assert make(tmp_path).read() == {"c": 1.0}


def test_an_oversized_file_is_not_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr(cachefile, "MAX_FILE_BYTES", 100)
    f = make(tmp_path)
    f.write({f"k{i}": 1.0 for i in range(20)})
    with pytest.warns(UserWarning, match="larger than 100 bytes"):
        assert f.read() == {}


def test_max_entries_keeps_the_new_ones(tmp_path):
    f = make(tmp_path, max_entries=3)
    f.write({"a": 1.0, "b": 1.0})
    f.write({"c": 2.0, "d": 2.0})
    got = f.read()
    assert len(got) == 3 and got["c"] == got["d"] == 2.0


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a folder root cannot write around")
def test_an_unwritable_folder_only_warns(tmp_path):
    (tmp_path / "sub").mkdir()
    os.chmod(tmp_path / "sub", 0o500)
    try:
        with pytest.warns(UserWarning, match="could not be written"):
            make(tmp_path).write({"a": 1.0})
    finally:
        os.chmod(tmp_path / "sub", 0o700)


def test_a_path_that_is_a_folder_only_warns(tmp_path):
    f = make(tmp_path)
    f.path.mkdir(parents=True)  # the file's name is taken by a folder: neither read nor written
    with pytest.warns(UserWarning):
        f.write({"a": 1.0})
    assert any("could not be written" in w for w in f.warnings)
    assert f.path.is_dir() and not [p for p in f.path.parent.iterdir() if p.name.startswith(".tmp-")]
