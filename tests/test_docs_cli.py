"""docs/cli.md lists every subcommand and flag as the parser has them, and its examples run as printed."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from fxsurgeon.cli import build_parser, main

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_generated_from_the_parser():
    gen = _gen()
    page = (DOCS / "cli.md").read_text()
    assert gen.reference() in page, "docs/cli.md is stale: run `python docs/gen_cli.py`"


def test_cli_reference_names_every_subcommand_and_flag():
    page = (DOCS / "cli.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert f"## `fxsurgeon {name}`" in page
        for action in p._actions:
            if action.dest == "help":
                continue
            for flag in action.option_strings:
                assert f"`{flag}`" in page, (name, flag)


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_quick_start_runs_offline_as_printed(tmp_path, monkeypatch, capsys):
    block = _bash_blocks((DOCS / "cli.md").read_text().split("## Quick start", 1)[1])[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for line in block.strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "fxsurgeon"
        assert main(argv[1:]) == 0, line
    out = capsys.readouterr().out
    assert "weights: RANDOM" in out and "speed-up per round" in out
    assert (tmp_path / "small.safetensors").is_file()
