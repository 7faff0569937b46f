"""Ahead-of-time C: the training step as standalone C over one static arena.

``tvm_tinytrain.build(train_mod, params, target="c", budget="256KB")`` returns an
:class:`Artifact`; ``artifact.export("out")`` (or ``"out.tar"``) writes it.
"""

from .artifact import Artifact
from .budget import BudgetError, parse_budget
from .build import build_c

__all__ = ["Artifact", "BudgetError", "build_c", "parse_budget"]
