"""``from tvm_tinytrain import relay; relay.transform.TinyTrain(...)``: the pass as TVM users know it."""

from . import transform

__all__ = ["transform"]
