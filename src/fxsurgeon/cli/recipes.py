"""``fxsurgeon recipes``: list the recipes shipped with fxsurgeon, or print one.
"""

from __future__ import annotations

import argparse
import sys

from .common import verbosity_parent

__all__ = ["add_recipes_command"]


def _cmd_recipes(args: argparse.Namespace) -> int:
    from ..recipe_files import describe_recipe, list_recipes, resolve_recipe

    if args.name:
        path = resolve_recipe(args.name)
        sys.stdout.write(path.read_text(encoding="utf-8"))
        return 0
    names = list_recipes()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {describe_recipe(name)}")
    if not args.quiet:
        print("\nuse one with --recipe NAME; `fxsurgeon recipes NAME` prints it (copy it to make your own)")
    return 0


def add_recipes_command(sub) -> None:
    p = sub.add_parser("recipes", help="list the shipped recipes, or print one",
                       description="List the recipes shipped with fxsurgeon (usable as --recipe NAME), or print "
                                   "one to copy and edit.", parents=[verbosity_parent()])
    p.add_argument("name", nargs="?", help="print this recipe's YAML")
    p.set_defaults(func=_cmd_recipes)
