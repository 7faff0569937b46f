"""IR → IR passes that turn a backbone IRModule into a training IRModule.

Each module holds one pass with its IR before and after in its docstring.
This package imports nothing from ``tvm_tinytrain``: passes take neutral
arguments (parameter names, optimizer objects).
"""

from .append_loss import AppendLoss
from .gradient import BuildGradient
from .optimizer import SGD, Adam, ApplyOptimizer
from .tinytrain import TrainingPipeline

__all__ = ["AppendLoss", "BuildGradient", "ApplyOptimizer", "SGD", "Adam", "TrainingPipeline"]
