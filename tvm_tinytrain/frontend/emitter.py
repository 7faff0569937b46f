"""Builds the backbone IRModule that every frontend produces.

A reader (ONNX, TFLite) walks its file and calls one method per operator; the
emitter writes the Relax binding, names the parameters after the layer index
(``conv0.weight``, ``dwconv1.bias``, ``linear13.weight``: conv and linear layers
numbered from the input, the numbering of the sparse-update scheme) and keeps
everything NCHW / OIHW, the only layouts Relax's Gradient handles.

The result is ``main(x, *params) -> logits`` with the attribute
``num_input = 1``: ``x`` in the file's own layout and dtype (a TFLite model
takes NHWC, so ``main`` starts with one ``permute_dims``), every trainable
tensor a parameter, and every other constant (clip bounds, pads) a constant.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as R

from relay_passes import int8_ops
from relay_passes.int8_ops import QAddParams, QConvParams, QPoolParams

from ..errors import ModelStructureError, UnsupportedOperatorError

Value = relax.Expr


class RelaxEmitter:
    """One backbone function under construction, built operator by operator."""

    def __init__(self, input_name: str, shape: tuple[int, ...], dtype: str, layout: str,
                 float_dtype: str = "float32", fmt: str = "ONNX",
                 weight_headroom: dict[int, int] | None = None):
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, not {layout}")
        self.layout = layout
        self.fmt = fmt  # the file format, for error messages
        self.float_dtype = float_dtype  # float64 only for gradient checks
        self.input = relax.Var(input_name, relax.TensorType(shape, dtype))
        self.params: dict[str, np.ndarray] = {}
        self.param_vars: list[relax.Var] = []
        self.sources: dict[str, str] = {}
        self.num_layers = 0
        self.bb = relax.BlockBuilder()
        self._frame = self.bb.function("main")
        self._frame.__enter__()
        self._df = self.bb.dataflow()
        self._df.__enter__()
        self.qas: dict[str, list[float]] = {}  # int8 parameter → QAS factor per output channel
        self.input_quant: tuple[float, int] | None = None
        self.weight_headroom = dict(weight_headroom or {})  # int8 layer index → bits of room to grow
        self.headroom_given: set[int] = set()
        x = self.input
        if dtype != float_dtype and dtype != "int8":
            x = self.bb.emit(R.astype(x, float_dtype))
        if layout == "NHWC" and len(shape) == 4:
            x = self.bb.emit(R.permute_dims(x, [0, 3, 1, 2]))
        self.entry = x

    # ---- helpers -----------------------------------------------------------
    @staticmethod
    def shape(value: Value) -> tuple[int, ...]:
        return tuple(int(d) for d in value.ty.shape)

    def _param(self, name: str, array: np.ndarray, dtype: str | None = None) -> relax.Var:
        dtype = dtype or self.float_dtype
        array = np.ascontiguousarray(array, dtype=dtype)
        var = relax.Var(name, relax.TensorType(array.shape, dtype))
        self.params[name] = array
        self.param_vars.append(var)
        return var

    def _new_layer(self, kind: str, source: str) -> str:
        prefix = f"{kind}{self.num_layers}"
        self.num_layers += 1
        self.sources[prefix] = source
        return prefix

    def constant(self, array: np.ndarray) -> Value:
        return relax.const(np.asarray(array), self.float_dtype)

    def _check_layer(self, x: Value, weight: np.ndarray, bias, groups: int, source: str) -> None:
        """A conv (OIHW) or linear (out, in) layer whose weight and bias fit its input."""
        x_shape, w_shape = self.shape(x), tuple(weight.shape)
        conv = len(w_shape) == 4
        why = None
        if len(w_shape) not in (2, 4) or 0 in w_shape:
            why = f"weight of shape {list(w_shape)}"
        elif conv and len(x_shape) != 4:
            why = f"a convolution of an input of shape {list(x_shape)} (it takes an image)"
        elif conv and (groups < 1 or x_shape[1] != w_shape[1] * groups or w_shape[0] % groups):
            why = (f"weight {list(w_shape)} in {groups} group(s) does not fit an input of "
                   f"{x_shape[1]} channels")
        elif not conv and (len(x_shape) != 2 or x_shape[1] != w_shape[1]):
            why = f"weight {list(w_shape)} does not fit an input of shape {list(x_shape)}"
        elif bias is not None and tuple(np.shape(bias)) != (w_shape[0],):
            why = f"bias of shape {list(np.shape(bias))} for {w_shape[0]} outputs"
        if why:
            raise ModelStructureError(f"{self.fmt} layer {source}: {why}; the file is corrupt or "
                                      "the layer is not one tinytrain reads")

    # ---- layers ------------------------------------------------------------
    def conv2d(
        self,
        x: Value,
        weight: np.ndarray,
        bias: np.ndarray | None,
        strides: tuple[int, int],
        padding: tuple[int, int, int, int],
        dilation: tuple[int, int],
        groups: int,
        source: str,
    ) -> Value:
        """``weight`` is OIHW; ``padding`` is (top, left, bottom, right)."""
        if tuple(dilation) != (1, 1):
            raise UnsupportedOperatorError(
                self.fmt, "convolution", source, ["dilation 1"],
                f"dilation {tuple(dilation)}: TVM 0.27 cannot differentiate dilated convolutions",
            )
        self._check_layer(x, weight, bias, groups, source)
        c_out = weight.shape[0]
        depthwise = groups > 1 and groups == self.shape(x)[1] and weight.shape[1] == 1
        prefix = self._new_layer("dwconv" if depthwise else "conv", source)
        w = self._param(f"{prefix}.weight", weight)
        b = self._param(f"{prefix}.bias", np.zeros(c_out) if bias is None else bias)
        y = self.bb.emit(
            R.nn.conv2d(x, w, strides=strides, padding=padding, dilation=dilation, groups=groups)
        )
        return self.bb.emit(R.add(y, R.reshape(b, (1, c_out, 1, 1))))

    def linear(self, x: Value, weight: np.ndarray, bias: np.ndarray | None, source: str) -> Value:
        """``weight`` is (out, in), as a fully connected layer stores it."""
        self._check_layer(x, weight, bias, 1, source)
        prefix = self._new_layer("linear", source)
        w = self._param(f"{prefix}.weight", weight)
        b = self._param(f"{prefix}.bias", np.zeros(weight.shape[0]) if bias is None else bias)
        y = self.bb.emit(R.matmul(x, R.permute_dims(w)))
        return self.bb.emit(R.add(y, b))

    # ---- quantized layers (int8 activations, see relay_passes.int8_ops) ----
    def _qparams(self, prefix: str, weight: np.ndarray, bias: np.ndarray | None, q: QConvParams):
        c_out = weight.shape[0]
        w = self._param(f"{prefix}.weight", weight, "int8")
        b = self._param(f"{prefix}.bias", np.zeros(c_out) if bias is None else bias, "int32")
        sw = np.asarray(q.sw, np.float64)
        # QAS (reference.md): weight gradient × s_W⁻², bias gradient × s_W⁻²·s_x⁻²
        self.qas[w.name] = [float(v) for v in sw ** -2]
        self.qas[b.name] = [float(v) for v in (sw * q.sx) ** -2]
        return w, b

    def _with_headroom(self, weight: np.ndarray, bias: np.ndarray | None, q: QConvParams):
        """The next layer's int8 weights with ``weight_headroom`` bits of room to grow: weights and
        bias divided by 2^bits (rounded), weight scales times 2^bits. The layer computes nearly the
        same function with fewer levels, and training can take a weight 2^bits past the file's range.

            w int8 [-127, 127], s_w   →   round(w / 2) in [-64, 64], 2·s_w   (1 bit)
        """
        bits = self.weight_headroom.get(self.num_layers, 0)
        if not bits:
            return weight, bias, q
        self.headroom_given.add(self.num_layers)
        k = 2 ** bits
        weight = np.round(weight.astype(np.float64) / k).astype(np.int8)
        bias = None if bias is None else np.round(np.asarray(bias, np.float64) / k).astype(np.int64)
        return weight, bias, replace(q, sw=tuple(s * k for s in q.sw), mult=(), shift=())

    def qconv2d(self, x: Value, weight: np.ndarray, bias: np.ndarray | None, q: QConvParams,
                source: str) -> Value:
        """int8 conv: ``weight`` OIHW int8 (per-channel scales ``q.sw``), ``bias`` int32."""
        self._check_layer(x, weight, bias, q.groups, source)
        depthwise = q.groups > 1 and q.groups == self.shape(x)[1] and weight.shape[1] == 1
        weight, bias, q = self._with_headroom(weight, bias, q)
        prefix = self._new_layer("dwconv" if depthwise else "conv", source)
        w, b = self._qparams(prefix, weight, bias, q)
        return int8_ops.emit_qconv(self.bb, x, w, b, q)

    def qlinear(self, x: Value, weight: np.ndarray, bias: np.ndarray | None, q: QConvParams,
                source: str) -> Value:
        """int8 fully connected layer: ``weight`` (out, in) int8, ``bias`` int32."""
        self._check_layer(x, weight, bias, 1, source)
        weight, bias, q = self._with_headroom(weight, bias, q)
        prefix = self._new_layer("linear", source)
        w, b = self._qparams(prefix, weight, bias, q)
        return int8_ops.emit_qlinear(self.bb, x, w, b, q)

    def qadd(self, a: Value, b: Value, q: QAddParams) -> Value:
        return int8_ops.emit_qadd(self.bb, a, b, q)

    def qavg_pool(self, x: Value, q: QPoolParams) -> Value:
        return int8_ops.emit_qavgpool(self.bb, x, q)

    def dequantize(self, x: Value, scale: float, zero: int) -> Value:
        return int8_ops.emit_dequantize(self.bb, x, scale, zero)

    # ---- elementwise and shape ops ----------------------------------------
    def relu(self, x: Value) -> Value:
        return self.bb.emit(R.nn.relu(x))

    def clip(self, x: Value, lo: float, hi: float) -> Value:
        if lo == 0.0 and hi == float("inf"):
            return self.relu(x)
        return self.bb.emit(R.clip(x, float(lo), float(hi)))

    def add(self, a: Value, b: Value) -> Value:
        return self.bb.emit(R.add(a, b))

    def multiply(self, a: Value, b: Value) -> Value:
        return self.bb.emit(R.multiply(a, b))

    def mean(self, x: Value, axes: list[int], keepdims: bool) -> Value:
        return self.bb.emit(R.mean(x, axis=axes, keepdims=keepdims))

    def avg_pool(self, x, pool, strides, padding, count_include_pad: bool) -> Value:
        return self.bb.emit(
            R.nn.avg_pool2d(
                x, pool_size=pool, strides=strides, padding=padding,
                count_include_pad=count_include_pad,
            )
        )

    def max_pool(self, x, pool, strides, padding) -> Value:
        return self.bb.emit(R.nn.max_pool2d(x, pool_size=pool, strides=strides, padding=padding))

    def reshape(self, x: Value, shape: tuple[int, ...]) -> Value:
        return self.bb.emit(R.reshape(x, shape))

    def permute(self, x: Value, axes: list[int]) -> Value:
        return self.bb.emit(R.permute_dims(x, axes))

    def softmax(self, x: Value, axis: int) -> Value:
        return self.bb.emit(R.nn.softmax(x, axis=axis))

    def pad(self, x: Value, pads: list[int], value: float) -> Value:
        """``pads`` is (before, after) per axis, flattened: [b0, a0, b1, a1, ...]."""
        return self.bb.emit(R.nn.pad(x, pads, pad_value=float(value)))

    # ---- result ------------------------------------------------------------
    def finish(self, output: Value) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
        if len(self.shape(output)) != 2:
            raise ModelStructureError(
                f"the model's output has shape {self.shape(output)}; tinytrain trains "
                "classifiers and regressors with a (batch, features) output"
            )
        if self.num_layers == 0:
            raise ModelStructureError("the model has no conv or linear layer: nothing to train")
        missing = sorted(i for i, bits in self.weight_headroom.items()
                         if bits and i not in self.headroom_given)
        if missing:
            raise ModelStructureError(
                f"weight_headroom (--headroom) names layer(s) {missing}, which are not int8 conv or "
                f"linear layers (the model has layers 0-{self.num_layers - 1}; a float32 classifier "
                "has no int8 weights); `tinytrain summary` lists them"
            )
        out = self.bb.emit_output(output)
        self._df.__exit__(None, None, None)
        self.bb.emit_func_output(out, params=[self.input, *self.param_vars])
        self._frame.__exit__(None, None, None)
        mod = self.bb.get()
        func = mod["main"].with_attr("num_input", 1)
        func = func.with_attr("tinytrain.sources", dict(self.sources))
        if self.qas:
            func = func.with_attr("tinytrain.qas", dict(self.qas))
        if self.input_quant is not None:
            func = func.with_attr("tinytrain.input_quant", [float(self.input_quant[0]),
                                                            int(self.input_quant[1])])
        mod["main"] = func
        return mod, self.params
