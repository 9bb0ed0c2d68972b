"""Pass infrastructure: a pass maps a GraphModule to ``PassResult(gm, modified)``.

Modelled on torch.fx's pass infra: passes are small callables that may declare
``requires``/``ensures`` checks; the PassManager runs them in order and can lint the graph
after each one, so a broken rewrite fails at the pass that broke it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.fx as fx

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool


class GraphPass:
    """Base class: subclasses implement :meth:`call`; checks are optional."""

    name: str = ""

    def requires(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        """Raise if ``gm`` is not in the state this pass needs."""

    def ensures(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        """Raise if this pass did not leave ``gm`` in the promised state."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        self.ensures(result.gm)
        return result

    def __repr__(self) -> str:
        return self.name or type(self).__name__


PassLike = GraphPass | Callable[[fx.GraphModule], PassResult]


class PassManager:
    """Runs passes in order; ``lint`` re-checks the graph after every modifying pass."""

    def __init__(self, passes: Sequence[PassLike], lint: bool = True) -> None:
        self.passes = list(passes)
        self.lint = lint

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for p in self.passes:
            result = p(gm)
            gm = result.gm
            if result.modified:
                modified = True
                if self.lint:
                    gm.graph.lint()
                    gm.recompile()
            log.debug("pass %r modified=%s", p, result.modified)
        return PassResult(gm, modified)
