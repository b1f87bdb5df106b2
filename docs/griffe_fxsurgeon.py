"""Griffe extension for the API reference: fxsurgeon's docstrings use reST habits that Markdown mis-renders.

* Sphinx roles (``:func:`fxsurgeon.trace```, ``:class:`~fxsurgeon.record.Conversion```) become code spans
  (``~`` keeps the last component, as Sphinx shows it).
* Doctest examples (``>>>`` lines and their output, up to a blank line) become fenced ``pycon`` blocks, so
  their output (``['placeholder', ...]``) is not read as Markdown reference links.

It changes only the text mkdocstrings renders; the source and the doctests are untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")


def _role(m: re.Match) -> str:
    tilde, target = m.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _fence_doctests(text: str) -> str:
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith("```"):
            in_fence = not in_fence
        if not in_fence and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(f"{indent}```")
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def rewrite(text: str) -> str:
    """The docstring text as the API reference renders it."""
    return _fence_doctests(_ROLE.sub(_role, text))


class FxsurgeonDocstrings(griffe.Extension):
    """Apply :func:`rewrite` to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
