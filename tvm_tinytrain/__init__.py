"""tvm-tinytrain: on-device training for microcontrollers, as a compiler plugin for Apache TVM."""

from relay_passes import SGD, Adam

from . import relay
from .errors import (
    InputError,
    ModelFormatError,
    ModelStructureError,
    NonFiniteError,
    OutputError,
    SchemeError,
    TinyTrainError,
    UnsupportedOperatorError,
)
from .export import export_onnx
from .frontend import load_model
from .layers import layer_table
from .quantize import quantize_input
from .trainer import HostTrainer, build

__version__ = "0.1.0"

__all__ = [
    "Adam", "HostTrainer", "InputError", "ModelFormatError", "ModelStructureError", "NonFiniteError",
    "OutputError", "SGD", "SchemeError", "TinyTrainError", "UnsupportedOperatorError", "build", "export_onnx",
    "layer_table", "load_model", "quantize_input", "relay",
]
