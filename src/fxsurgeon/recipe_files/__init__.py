"""The recipes shipped with fxsurgeon, as package data: ``--recipe mobile`` selects ``mobile.yaml`` here.

These files are the only copy; the repository's ``recipes/*.yaml`` are links to them, for people reading the
repository. Each file opens with a comment saying what it is for and how to run it.

>>> "mobile" in list_recipes()
True
>>> resolve_recipe("mobile").name
'mobile.yaml'
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ..errors import SurgeryError

__all__ = ["describe_recipe", "list_recipes", "resolve_recipe"]


def _folder() -> Path:
    return Path(str(resources.files(__name__)))


def list_recipes() -> list[str]:
    """Names of the shipped recipes (file names without ``.yaml``), sorted."""
    return sorted(p.stem for p in _folder().glob("*.yaml"))


def describe_recipe(name: str) -> str:
    """What a shipped recipe is for: its opening comment up to the first colon or full stop.

    >>> describe_recipe("mobile")
    'make a model cheaper, MobileNet style'
    """
    import re

    header = []
    for line in resolve_recipe(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") or not line.strip("# "):
            break
        header.append(line.lstrip("# ").strip())
    text = " ".join(header).split(" — ", 1)[-1]
    return re.split(r":\s|\.\s|\.$", text, maxsplit=1)[0]


def resolve_recipe(spec: str | os.PathLike) -> Path:
    """A recipe file: ``spec`` itself when it is a path or an existing file, else the shipped recipe of that name.

    Raises:
        SurgeryError: neither a file nor a shipped recipe name; the message lists the shipped names.
    """
    text = str(spec)
    path = Path(text)
    if path.is_file():
        return path
    looks_like_path = os.sep in text or "/" in text or path.suffix.lower() in (".yaml", ".yml", ".json")
    shipped = _folder() / f"{text}.yaml"
    if not looks_like_path and shipped.is_file():
        return shipped
    names = ", ".join(list_recipes())
    if looks_like_path:
        raise SurgeryError(f"recipe file {text!r} does not exist; shipped recipes by name: {names}")
    raise SurgeryError(f"{text!r} is neither a recipe file nor a shipped recipe; shipped recipes: {names} "
                       "(`fxsurgeon recipes` lists them)")
