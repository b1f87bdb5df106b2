"""What a pass reports: every rewrite it made and every candidate it skipped, with the reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx

__all__ = ["NOMINAL_SHAPES_KEY", "PassResult", "Rewrite", "Skip"]

#: set in ``gm.meta`` by the pass manager while shapes come from a nominal probe input: channel counts are the
#: model's, spatial sizes are not (a pass must not decide on them)
NOMINAL_SHAPES_KEY = "fxsurgeon_nominal_shapes"


@dataclass
class Rewrite:
    """One change a pass made.

    Attributes:
        target: qualified name of the module (or graph node) rewritten, e.g. ``"layer1.0.conv1"``.
        before: short description of what was there, e.g. ``"Conv2d(64, 64, 3x3)"``.
        after: short description of the replacement.
        exact: True when the rewrite preserves the function to float precision.
        pass_name: the registered pass that made it.
        details: pass-specific figures (multiplier, discarded energy, MACs, ...); JSON-serialisable.
    """

    target: str
    before: str
    after: str
    exact: bool
    pass_name: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Skip:
    """A candidate a pass left alone, and why (e.g. ``"groups=32 > 1: already grouped"``)."""

    target: str
    reason: str
    pass_name: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PassResult:
    """What one pass did to a GraphModule, which it edited in place: its rewrites, its skips with their reasons,
    and figures about the whole pass (a budget's allocation) that belong to no single rewrite."""

    graph_module: fx.GraphModule
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    pass_name: str = ""
    #: pass-level figures for the conversion record's ``extras`` (e.g. ``{"allocation": budget summary}``);
    #: JSON-serialisable
    figures: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stamp(self.pass_name)

    def stamp(self, pass_name: str) -> PassResult:
        """Set ``pass_name`` on the result and on every record that has none."""
        self.pass_name = pass_name
        for r in (*self.rewrites, *self.skipped):
            if not r.pass_name:
                r.pass_name = pass_name
        return self

    @property
    def exact(self) -> bool:
        """True when every rewrite preserves the function (vacuously True with no rewrites)."""
        return all(r.exact for r in self.rewrites)
