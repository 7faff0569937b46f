"""Model files → the backbone IRModule (``main(x, *params) -> logits``, NCHW inside)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tvm

from ..errors import ModelFormatError
from .onnx_reader import read_onnx
from .tflite_reader import read_tflite

MAX_HEADROOM_BITS = 6  # the most bits weight_headroom (and `tinytrain --headroom`) takes


def load_model(
    path: str | Path, dtype: str = "float32", float_classifier: bool = True,
    dequantize: bool = False, weight_headroom: Mapping[int, int] | None = None,
) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """Read a ``.tflite`` (float32 or int8) or ``.onnx`` (float, or int8 QDQ) model.

    Returns ``(mod, params)``: ``mod["main"](x, *params)`` computes the logits,
    taking ``x`` in the file's own layout (NHWC for TFLite, NCHW for ONNX);
    ``params`` maps readable names (``conv0.weight``, ``linear13.bias``) to arrays.
    ``dtype="float64"`` builds the same graph in double precision (for gradient checks).

    An int8 model becomes a true integer graph (``relay_passes.int8_ops``): it takes
    int8 input (``quantize_input`` converts float data) and returns float logits.
    ``float_classifier`` (default, the paper's choice) makes its last fully
    connected layer float32; ``False`` keeps the file's int8 classifier exactly.
    ``dequantize=True`` reads an int8 TFLite file as its float twin instead: the
    same graph in float, weights and biases dequantized, float input, no rounding
    (``frontend.tflite_dequantized``); it is what int8 training approximates.
    ``weight_headroom={layer: bits}`` gives int8 layers (numbered as ``layer_table``
    numbers them) room to grow: their weights and biases are divided by 2^bits and
    their weight scales multiplied by it, so training can take a weight 2^bits past
    the file's range instead of clipping it at ±127 (the forward then differs from
    the file's by that rounding).
    """
    headroom = {int(k): int(v) for k, v in (weight_headroom or {}).items()}
    if any(k < 0 or not 0 <= v <= MAX_HEADROOM_BITS for k, v in headroom.items()):
        raise ValueError(f"weight_headroom maps layer indices to 0..{MAX_HEADROOM_BITS} bits, "
                         f"not {weight_headroom}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, not {dtype}")
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file")
    data = path.read_bytes()
    if len(data) >= 8 and data[4:8] == b"TFL3":
        return read_tflite(data, str(path), dtype, float_classifier, dequantize, headroom)
    if path.suffix.lower() == ".tflite":
        raise ModelFormatError(
            f"{path}: not a TFLite model (no TFL3 identifier); the file may be truncated or "
            "of another format"
        )
    if path.suffix.lower() == ".onnx" or data[:1] == b"\x08":
        return read_onnx(data, str(path), dtype, float_classifier, dequantize, headroom)
    raise ModelFormatError(
        f"{path}: unknown model format; tinytrain reads .tflite and .onnx files"
    )
