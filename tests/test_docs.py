"""The documentation: a short README that agrees with CI, a site that builds strictly, code that runs, and
results pages that match the results files."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxsurgeon.passes

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"

# a fenced ```python block, possibly indented (inside a list item or an admonition); the closing fence has the
# same indentation as the opening one
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text, dedented, in order."""
    return [textwrap.dedent(m.group("code")) for m in FENCE.finditer(text)]


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _page_id(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---------------------------------------------------------------------------------------------- the README

def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the limit is 250: move detail to docs/"


def test_readme_setup_commands_are_what_ci_runs():
    """.ci/run must run exactly the README's set-up command and the README's test command."""
    bash = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M)
    setup = [line for block in bash for line in block.splitlines() if line.startswith("python3 -m venv .venv")]
    tests = [line for block in bash for line in block.splitlines() if "-m pytest" in line]
    assert len(setup) == 1 and len(tests) == 1, (setup, tests)
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert setup[0] in ci, f".ci/run does not run the README's set-up command {setup[0]!r}"
    assert tests[0] in ci, f".ci/run does not run the README's test command {tests[0]!r}"


def test_python_blocks_are_found():
    """Guards the runner below: the fence pattern finds the blocks (an indented one too), in order."""
    text = "a\n```python\nx = 1\n```\n- item\n\n    ```python\n    y = x + 1\n    ```\n```text\nno\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x + 1\n"]
    assert len(python_blocks(README.read_text())) >= 1
    assert sum(len(python_blocks(p.read_text())) for p in pages()) >= 20


# ---------------------------------------------------------------------------------------------- code blocks

@pytest.mark.parametrize("page", [p for p in pages() if python_blocks(p.read_text())], ids=_page_id)
def test_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every ```python block of the page runs, on CPU and offline: in order, in one namespace per page.

    The blocks run in an empty folder (files they write land there) that sees the repository's recipes/.
    A pass a page registers is unregistered afterwards, so pages do not leak into each other or into the
    rest of the suite."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry = dict(fxsurgeon.passes.registry._PASSES)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    try:
        for i, code in enumerate(python_blocks(page.read_text()), 1):
            try:
                # dont_inherit: run the block as a user would, not with this file's `from __future__` flags
                exec(compile(code, f"{_page_id(page)} (python block {i})", "exec", dont_inherit=True), namespace)
            except Exception as exc:
                raise AssertionError(f"{_page_id(page)}: python block {i} failed: {exc!r}\n{code}") from exc
    finally:
        fxsurgeon.passes.registry._PASSES.clear()
        fxsurgeon.passes.registry._PASSES.update(registry)
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- the site

def test_site_builds_strictly(tmp_path: Path):
    """``mkdocs build --strict``: a broken link, a missing page or an unresolved API reference fails it."""
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(site)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    api = (site / "reference" / "api" / "index.html").read_text()
    for name in ("fxsurgeon.convert", "fxsurgeon.register_pass", "fxsurgeon.SurgeryError"):
        assert f'id="{name}"' in api, f"the API reference has no entry for {name}"
    assert 'id="fxsurgeon.models.cifar_resnet.load_resnet20"' in (site / "reference" / "models" / "index.html").read_text()


# ---------------------------------------------------------------------------------------------- results pages

def _render_module():
    spec = importlib.util.spec_from_file_location("fxsurgeon_render_docs", REPO / "benchmarks" / "render_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_pages_are_up_to_date():
    """The committed results pages and the README's results block are what render_docs.py makes of the
    results files: numbers are never copied by hand."""
    stale = [str(path.relative_to(REPO)) for path, text in _render_module().render().items()
             if not path.exists() or path.read_text() != text]
    assert not stale, f"out of date: {stale}; run `python benchmarks/render_docs.py` and commit the result"


def test_results_pages_follow_the_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A changed figure in a results file changes the page: the pages are read from the files."""
    mod = _render_module()
    results = tmp_path / "results"
    results.mkdir()
    for f in mod.RESULTS.iterdir():
        (results / f.name).symlink_to(f)
    data = json.loads((mod.RESULTS / "fidelity_resnet20.json").read_text())
    data["rows"][0]["accuracy"] = 12.34
    (results / "fidelity_resnet20.json").unlink()
    (results / "fidelity_resnet20.json").write_text(json.dumps(data))
    monkeypatch.setattr(mod, "RESULTS", results)
    assert "12.34 %" in mod.page_resnet20()
    assert "| original | 1.00× | 12.34 % |" in mod.readme_block()
