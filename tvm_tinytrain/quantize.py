"""Float data → the int8 input an int8 model takes, with the model's own input scale."""

from __future__ import annotations

import warnings

import numpy as np
import tvm

from .errors import InputError
from .layers import backbone


def input_quantization(model) -> tuple[float, int] | None:
    """(scale, zero point) of an int8 model's input; None for a float model.

    ``model``: the module ``load_model`` or ``TinyTrain`` returned, or a ``HostTrainer``.
    """
    func = getattr(model, "predict_function", None)
    if func is None:
        if not isinstance(model, tvm.IRModule):
            raise InputError("quantize_input takes the model's IRModule or HostTrainer, "
                             f"not {type(model).__name__}")
        func = backbone(model)
    if "tinytrain.input_quant" not in func.attrs:
        return None
    scale, zero = func.attrs["tinytrain.input_quant"]
    return float(scale), int(zero)


def reconstruction_target(x, output_shape: tuple[int, ...], quant: tuple[float, int] | None) -> np.ndarray:
    """What an autoencoder reproduces: its input ``x`` as float (an int8 input dequantized with the
    model's input ``quant``, ``(x − zero) · scale``), shaped like the output."""
    x = np.asarray(x)
    if x.size != int(np.prod(output_shape)):
        raise InputError(f"the model's output {tuple(output_shape)} is not shaped like its input "
                         f"{x.shape}: give targets (y) to train it")
    target = x.astype(np.float64)
    if quant is not None:
        target = (target - int(quant[1])) * float(quant[0])
    return target.astype(np.float32).reshape(output_shape)


def quantized(x_float, quant: tuple[float, int], dtype=np.int8) -> np.ndarray:
    """``clip(round(x / scale) + zero)`` in ``dtype``'s range: TFLite's quantization with (scale, zero)."""
    scale, zero = float(quant[0]), int(quant[1])
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x_float, np.float32) / np.float32(scale)) + zero
    return np.clip(q, info.min, info.max).astype(dtype)


def quantize_input(model, x_float) -> np.ndarray:
    """``clip(round(x / scale) + zero, -128, 127)`` as int8, TFLite's quantization of
    the model's input. Works on any array shape (one sample or a stack)."""
    quant = input_quantization(model)
    if quant is None:
        raise InputError("this model takes float input: pass the data as it is, no quantize_input")
    scale, zero = quant
    q = quantized(x_float, quant)
    if q.size and int(q.max()) - int(q.min()) < 16:
        lo, hi = (-128 - zero) * scale, (127 - zero) * scale
        warnings.warn(
            f"quantize_input: the data spans only {int(q.max()) - int(q.min()) + 1} of the 256 int8 "
            f"steps; this model expects inputs in [{lo:g}, {hi:g}] (scale {scale:g}, zero point "
            f"{zero}): rescale the data to that range", stacklevel=2)
    return q
