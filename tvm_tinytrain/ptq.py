"""Post-training quantization: a float model → an int8 ``.tflite`` file, as TFLite's converter makes.

::

    from tvm_tinytrain.ptq import quantize_tflite
    quantize_tflite(trainer, x_calibration, "model_int8.tflite")   # or (mod, path, params=params)

1. Read the float backbone (``predict`` of a trainer, or ``main`` of the module ``load_model``
   returned) as a chain of layers: conv and depthwise conv (+ bias, + ReLU, ReLU6 or clip(0, c):
   a ReLU whose calibrated range stops at c), global average pooling, flatten, fully connected
   (+ bias, + ReLU).
2. Run the chain in float64 numpy on the calibration samples; record each layer output's range
   (min and max, widened to hold 0).
3. Activations int8 with an asymmetric zero point: scale = (max − min) / 255, zero point =
   round(−128 − min / scale). Weights int8, symmetric, per output channel: scale = max |w| / 127.
   Biases int32 at scale s_x · s_w, zero point 0.
4. Write TFLite with ``tflite_writer``: an int8 NHWC input, CONV_2D, DEPTHWISE_CONV_2D,
   AVERAGE_POOL_2D (global), RESHAPE, FULLY_CONNECTED with the activations fused; the output is
   the int8 logits. These are operators the int8 reader (``frontend.tflite_int8``) imports.

The file takes int8 input (``tvm_tinytrain.quantize_input`` converts float data with its scale);
images are NHWC in the file, whatever the float model's layout. Not written: residual adds, max
pooling, dilations, and paddings TFLite's SAME / VALID cannot express (a stride-2 conv padded
(1, 1) on an even input: TFLite pads (0, 1)): each is refused with one line before anything is
written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from . import files
from .errors import InputError, ModelStructureError
from .layers import backbone
from .tflite_writer import (
    AVERAGE_POOL_2D,
    CONV_2D,
    CONV_OPTIONS,
    DEPTHWISE_CONV_2D,
    DEPTHWISE_OPTIONS,
    FC_OPTIONS,
    FULLY_CONNECTED,
    INT8,
    INT32,
    NO_ACTIVATION,
    POOL_OPTIONS,
    RELU,
    RELU6,
    RESHAPE,
    SAME,
    VALID,
    Op,
    Tensor,
    conv_options,
    depthwise_options,
    fc_options,
    pool_options,
    write_model,
)

SUPPORTED = "conv2d, depthwise conv2d, relu, clip(0, c), global mean, flatten, matmul + bias"
_FUSED = {None: NO_ACTIVATION, "relu": RELU, "relu6": RELU6}


@dataclass
class _Layer:
    kind: str                      # "conv", "dwconv", "pool", "linear"
    name: str                      # the layer's name in the file (its source node)
    weight: np.ndarray | None = None   # OIHW, or (out, in) for "linear"
    bias: np.ndarray | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    act: str | None = None         # None, "relu" or "relu6"
    cap: float | None = None       # clip(0, cap): a ReLU whose int8 output range ends at cap


class _Chain:
    """The float backbone read as a chain of layers (step 1)."""

    def __init__(self, func: relax.Function, params: dict[str, np.ndarray]):
        self.params = {p: p.name for p in func.params[1:]}
        self.values = params
        self.sources = dict(func.attrs["tinytrain.sources"]) if "tinytrain.sources" in func.attrs else {}
        x = func.params[0]
        self.input_shape = tuple(int(d) for d in x.ty.shape)
        if str(x.ty.dtype) != "float32" or len(self.input_shape) != 4:
            raise ModelStructureError(f"ptq quantizes float models with an image input; this one takes "
                                      f"{x.ty.dtype} {list(self.input_shape)}")
        self.nhwc = False               # the model's input is NHWC (a float TFLite file)
        self.layers: list[_Layer] = []
        self.current = x                # the activation the chain has reached
        self.flat = False               # the current activation is (1, features)
        self.biases: dict[relax.Var, np.ndarray] = {}     # reshape(bias param) → its values
        self.transposed: dict[relax.Var, str] = {}        # permute_dims(weight param) → its name
        for block in func.body.blocks:
            for b in block.bindings:
                self._binding(b.var, b.value)
        if func.body.body != self.current:
            self._refuse("the output", "the network does not end in its last layer")
        if not self.layers or self.layers[-1].kind != "linear":
            raise ModelStructureError("ptq needs a network that ends in a fully connected layer")

    def _refuse(self, where: str, detail: str):
        raise ModelStructureError(f"ptq cannot write {where} as int8 TFLite: {detail}; it writes chains of "
                                  f"{SUPPORTED}")

    def _param(self, expr, what: str) -> np.ndarray:
        if expr not in self.params:
            self._refuse(what, "its weight is computed, not a parameter")
        return np.asarray(self.values[self.params[expr]], np.float64)

    def _name(self, default: str) -> str:
        return self.sources.get(default, default)

    def _binding(self, var, value) -> None:
        if isinstance(value, relax.Var):
            if value == self.current:
                self.current = var
            return
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            self._refuse(var.name, "a binding that is not an operator call")
        op, args, attrs = value.op.name.removeprefix("relax."), value.args, value.attrs
        chained = len(args) > 0 and args[0] == self.current
        if op == "permute_dims" and args[0] in self.params:
            self.transposed[var] = args[0]
        elif op == "permute_dims" and chained and not self.layers and \
                [int(a) for a in attrs.axes] == [0, 3, 1, 2]:
            self.nhwc, self.current = True, var       # a float TFLite file's NHWC input
        elif op == "reshape" and args[0] in self.params:
            self.biases[var] = self._param(args[0], var.name).reshape(-1)
        elif op == "reshape" and chained and self.layers and self.layers[-1].kind == "pool":
            shape = [int(d) for d in value.ty.shape]
            if len(shape) != 2:
                self._refuse(var.name, f"a reshape to {shape} after pooling (only a flatten)")
            self.flat, self.current = True, var
        elif op == "nn.conv2d" and chained:
            self._conv(var, value)
        elif op == "matmul" and chained and args[1] in self.transposed:
            if not self.flat:
                self._refuse(var.name, "a fully connected layer on a tensor that is not flattened")
            weight = self._param(self.transposed[args[1]], var.name)
            name = self.params[self.transposed[args[1]]].rsplit(".", 1)[0]
            self.layers.append(_Layer("linear", self._name(name), weight))
            self.current = var
        elif op == "add" and chained and self.layers and self.layers[-1].kind != "pool" \
                and self.layers[-1].bias is None and self.layers[-1].act is None:
            other = args[1]
            bias = self.biases.get(other)
            if bias is None and other in self.params:
                bias = self._param(other, var.name).reshape(-1)
            if bias is None or bias.size != self.layers[-1].weight.shape[0]:
                self._refuse(var.name, "an add that is not a layer's bias (a residual add)")
            self.layers[-1].bias, self.current = bias, var
        elif op == "clip" and chained and self._repeats_cap(args):
            self.current = var  # the pool's mean cannot leave the range its input was clipped to
        elif op in ("nn.relu", "clip") and chained and self.layers and self.layers[-1].kind != "pool" \
                and self.layers[-1].act is None:
            act, cap = "relu", None
            if op == "clip":
                low, cap = float(args[1].value), float(args[2].value)
                if low != 0.0 or not cap > 0:
                    self._refuse(var.name, f"clip({low:g}, {cap:g}) (a clip must start at 0: ReLU6, or ReLU "
                                           "capped by its int8 range)")
                act = "relu6" if cap == 6.0 else "relu"
            self.layers[-1].act, self.layers[-1].cap, self.current = act, cap, var
        elif op == "mean" and chained and not self.flat \
                and sorted(int(a) for a in attrs.axis) == [2, 3]:
            self.layers.append(_Layer("pool", f"pool{len(self.layers)}"))
            self.flat = not bool(attrs.keepdims)
            self.current = var
        elif op == "nn.avg_pool2d" and chained and not self.flat and _global(args[0], attrs):
            self.layers.append(_Layer("pool", f"pool{len(self.layers)}"))
            self.current = var
        else:
            self._refuse(var.name, f"operator {op}" + ("" if chained else " off the chain"))

    def _repeats_cap(self, args) -> bool:
        """A clip after a global pool with the bounds of the clip before it (an int8 file's float twin)."""
        if len(self.layers) < 2 or self.layers[-1].kind != "pool" or self.layers[-2].act is None:
            return False
        cap = self.layers[-2].cap if self.layers[-2].cap is not None else \
            (6.0 if self.layers[-2].act == "relu6" else None)
        return cap is not None and (float(args[1].value), float(args[2].value)) == (0.0, cap)

    def _conv(self, var, call) -> None:
        a = call.attrs
        weight = self._param(call.args[1], var.name)
        if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
            self._refuse(var.name, f"a conv in layout {a.data_layout}/{a.kernel_layout}")
        if [int(d) for d in a.dilation] != [1, 1]:
            self._refuse(var.name, f"dilation {[int(d) for d in a.dilation]}")
        groups, channels = int(a.groups), int(call.args[0].ty.shape[1])
        if groups == 1:
            kind = "conv"
        elif groups == channels == weight.shape[0]:
            kind = "dwconv"
        else:
            self._refuse(var.name, f"a grouped conv ({groups} groups) that is not depthwise")
        name = self.params[call.args[1]].rsplit(".", 1)[0]
        self.layers.append(_Layer(kind, self._name(name), weight, None, tuple(int(s) for s in a.strides),
                                  tuple(int(p) for p in a.padding)))
        self.current = var


def _global(x, attrs) -> bool:
    """Whether an avg_pool2d averages the whole image (a float TFLite file's global pooling)."""
    return [int(d) for d in attrs.pool_size] == [int(d) for d in list(x.ty.shape)[2:]] \
        and not any(int(p) for p in attrs.padding) and str(attrs.layout) == "NCHW"


# ---- step 2: the float forward -----------------------------------------------------------------
def _conv_forward(x: np.ndarray, layer: _Layer) -> np.ndarray:
    """NCHW conv in float64: a sum over the window's offsets of channel contractions."""
    top, left, bottom, right = layer.padding
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, w = x.shape
    out_c, _, kh, kw = layer.weight.shape
    sh, sw = layer.stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    y = np.zeros((n, out_c, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            if layer.kind == "dwconv":
                y += patch * layer.weight[None, :, 0, i, j, None, None]
            else:
                y += np.einsum("nchw,oc->nohw", patch, layer.weight[:, :, i, j])
    return y


def _forward(layers: list[_Layer], x: np.ndarray) -> list[np.ndarray]:
    """Each layer's output (after its activation) for the NCHW batch ``x``."""
    outputs = []
    for layer in layers:
        if layer.kind in ("conv", "dwconv"):
            x = _conv_forward(x, layer)
            if layer.bias is not None:
                x = x + layer.bias[None, :, None, None]
        elif layer.kind == "pool":
            x = x.mean(axis=(2, 3), keepdims=True)
        else:
            x = x.reshape(len(x), -1) @ layer.weight.T
            if layer.bias is not None:
                x = x + layer.bias
        if layer.act is not None:
            x = np.clip(x, 0.0, layer.cap)
        outputs.append(x)
    return outputs


# ---- step 3: scales ------------------------------------------------------------------------------
def activation_quant(low: float, high: float) -> tuple[float, int]:
    """(scale, zero point) of an int8 tensor holding [low, high] (widened to hold 0), scale as float32."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    span = max(high - low, 1e-6)
    scale = float(np.float32(span / 255.0))
    zero = int(np.clip(np.round(-128.0 - low / scale), -128, 127))
    return scale, zero


def weight_quant(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (axis 0): int8 values and float32 scales, symmetric (zero point 0)."""
    peak = np.abs(weight.reshape(len(weight), -1)).max(axis=1)
    peak = np.where(peak > 0, peak, peak.max() if peak.max() > 0 else 1.0)
    scales = (peak / 127.0).astype(np.float32)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    q = np.clip(np.round(weight / scales.astype(np.float64).reshape(shape)), -127, 127).astype(np.int8)
    return q, scales


def _bias_quant(bias: np.ndarray | None, x_scale: float, w_scales: np.ndarray) -> np.ndarray:
    scale = np.float64(np.float32(x_scale)) * w_scales.astype(np.float64)
    if bias is None:
        return np.zeros(len(w_scales), np.int32)
    return np.clip(np.round(bias / scale), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)


# ---- step 4: the file --------------------------------------------------------------------------
def _tflite_padding(layer: _Layer, h: int, w: int) -> int:
    """SAME or VALID, the one that pads as ``layer`` does; refused when neither does."""
    if layer.padding == (0, 0, 0, 0):
        return VALID
    pads = []
    kernel = layer.weight.shape[2:]
    for size, k, s in ((h, kernel[0], layer.stride[0]), (w, kernel[1], layer.stride[1])):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    same = (pads[0][0], pads[1][0], pads[0][1], pads[1][1])
    if same != layer.padding:
        raise ModelStructureError(
            f"ptq cannot write layer {layer.name} as int8 TFLite: it pads (top, left, bottom, right) "
            f"{layer.padding} where TFLite's SAME pads {same} and VALID none; train the float model "
            f"with TFLite's padding")
    return SAME


class _Writer:
    def __init__(self):
        self.tensors: list[Tensor] = []
        self.ops: list[Op] = []

    def tensor(self, t: Tensor) -> int:
        self.tensors.append(t)
        return len(self.tensors) - 1


def _write(chain: _Chain, outputs: list[np.ndarray], x_range: tuple[float, float]) -> bytes:
    _, c, h, w = (chain.input_shape[i] for i in (0, 3, 1, 2)) if chain.nhwc else chain.input_shape
    wr = _Writer()
    sx, zx = activation_quant(*x_range)
    x = wr.tensor(Tensor("input", (1, h, w, c), INT8, scale=[sx], zero=[zx]))
    for layer, out in zip(chain.layers, outputs):
        shape = out.shape
        if layer.kind == "pool":
            y = wr.tensor(Tensor(layer.name, (1, 1, 1, shape[1]), INT8, scale=[sx], zero=[zx]))
            wr.ops.append(Op(AVERAGE_POOL_2D, [x], [y], POOL_OPTIONS, pool_options((h, w), (1, 1))))
            x, h, w = y, 1, 1
            continue
        sy, zy = activation_quant(out.min(), out.max())
        q, scales = weight_quant(layer.weight)
        bias = _bias_quant(layer.bias, sx, scales)
        fused = _FUSED[layer.act]
        if layer.kind == "linear":
            if wr.tensors[x].shape != (1, q.shape[1]):
                features = q.shape[1]
                dims = np.array([1, features], np.int32)
                shape_t = wr.tensor(Tensor(f"{layer.name}/shape", (2,), INT32, dims))
                flat = wr.tensor(Tensor(f"{layer.name}/flatten", (1, features), INT8, scale=[sx], zero=[zx]))
                wr.ops.append(Op(RESHAPE, [x, shape_t], [flat]))
                x = flat
            code, options_type, options, stored, axis = FULLY_CONNECTED, FC_OPTIONS, fc_options(fused), q, 0
            out_shape = (1, q.shape[0])
        else:
            padding = _tflite_padding(layer, h, w)
            h, w = shape[2], shape[3]
            out_shape = (1, h, w, shape[1])
            if layer.kind == "conv":
                code, options_type, axis = CONV_2D, CONV_OPTIONS, 0
                options, stored = conv_options(layer.stride, fused, padding), q.transpose(0, 2, 3, 1)
            else:
                code, options_type, axis = DEPTHWISE_CONV_2D, DEPTHWISE_OPTIONS, 3
                options, stored = depthwise_options(layer.stride, fused, padding), q.transpose(1, 2, 3, 0)
        wt = wr.tensor(Tensor(f"{layer.name}/weight", stored.shape, INT8, np.ascontiguousarray(stored),
                              scale=[float(s) for s in scales], zero=[0] * len(scales), axis=axis))
        bt = wr.tensor(Tensor(f"{layer.name}/bias", bias.shape, INT32, bias,
                              scale=[float(np.float32(sx) * np.float64(s)) for s in scales],
                              zero=[0] * len(scales)))
        y = wr.tensor(Tensor(layer.name, out_shape, INT8, scale=[sy], zero=[zy]))
        wr.ops.append(Op(code, [x, wt, bt], [y], options_type, options))
        x, sx, zx = y, sy, zy
    return write_model(wr.tensors, wr.ops, inputs=[0], outputs=[x])


def quantize_tflite(model, calibration, path: str | Path,
                    params: dict[str, np.ndarray] | None = None) -> Path:
    """Quantize the float ``model`` to int8 with ``calibration``; write it to ``path``, whole or not at all.

    ``model``: a trainer (:class:`~tvm_tinytrain.trainer.HostTrainer`, its current parameters) or
    the module ``load_model`` returned with its ``params``. ``calibration``: float samples stacked
    along a first axis, each in the model's input layout (``(n, 1, 8, 8)`` for an input of shape
    ``(1, 1, 8, 8)``); a few hundred training samples are plenty."""
    if isinstance(model, tvm.IRModule):
        if params is None:
            raise InputError("quantize_tflite(mod, calibration, path, params): a module needs its params")
        func, values = backbone(model), params
    else:
        func, values = model.predict_function, model.params()
    chain = _Chain(func, values)
    data = np.asarray(calibration, np.float64)
    sample = chain.input_shape[1:]
    if data.ndim == len(sample) + 2 and data.shape[1] == 1:
        data = data[:, 0]
    if data.ndim != len(sample) + 1 or tuple(data.shape[1:]) != sample or len(data) == 0:
        expected = ", ".join(map(str, sample))
        raise InputError(f"calibration has shape {list(data.shape)}; ptq needs (n, {expected}): n >= 1 "
                         f"samples in the model's input layout")
    if not np.all(np.isfinite(data)):
        raise InputError("calibration holds inf or NaN values; pass finite samples")
    nchw = data.transpose(0, 3, 1, 2) if chain.nhwc else data
    outputs = _forward(chain.layers, nchw)
    blob = _write(chain, outputs, (float(data.min()), float(data.max())))
    with files.replacing_file(path) as tmp:
        tmp.write_bytes(blob)
    return Path(path)
