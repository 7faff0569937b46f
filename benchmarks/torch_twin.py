"""A PyTorch twin of an ONNX model (``tvm_tinytrain.zoo`` or any float model the
project's ONNX frontend reads), for benchmarks and reference checks.

``torch_module_from_onnx(model)`` returns an ``nn.Module`` that runs the ONNX
graph node by node with torch ops, so ``twin(x)`` equals onnxruntime's output
and training it is a fair PyTorch baseline. Supported ops are those of
``tvm_tinytrain.frontend.onnx_reader.SUPPORTED``, with ONNX semantics:

- Conv (N-d; strides, dilations, groups incl. depthwise multipliers, pads incl.
  asymmetric ones, applied with ``F.pad`` first; auto_pad), Relu, Clip (bounds
  from inputs or, before opset 11, attributes; either may be absent), Add
  (numpy broadcasting), MatMul, Gemm (alpha, beta, transA, transB), Softmax
  (axis; the 2-D coercion before opset 13), Identity, Dropout (identity);
- AveragePool (count_include_pad 0/1, asymmetric pads), MaxPool (dilations),
  GlobalAveragePool, ReduceMean (axes as attribute or, opset 18, as input;
  keepdims, noop_with_empty_axes);
- Reshape (0 copies a dim unless allowzero, -1 inferred), Flatten (axis),
  Pad (constant mode; pads and constant value as inputs or, before opset 11,
  attributes; opset-18 axes);
- BatchNormalization with inference semantics (running statistics) in train
  mode too, with trainable scale and shift, so the twin computes one function.

Every float initializer is a parameter or a buffer of the module (float32;
``.double()`` converts them all). Trainable parameters are what a training
framework would train: Conv and Gemm weights and biases, MatMul weights (and
the constant of an Add right after a MatMul, which the frontend folds into that
linear layer's bias), BatchNormalization scale and shift. Other constants
(Clip bounds, Add operands, running statistics, pad values) are buffers.
Initializers shared by several nodes are one parameter. Integer initializers
that give shapes, axes or pads are read once, when the twin is built.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

SUPPORTED_OPS = (
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Clip",
    "Conv",
    "Dropout",
    "Flatten",
    "Gemm",
    "GlobalAveragePool",
    "Identity",
    "MatMul",
    "MaxPool",
    "Pad",
    "ReduceMean",
    "Relu",
    "Reshape",
    "Softmax",
)


# ---- padding helpers ------------------------------------------------------------------------


def _torch_pad(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads → ``F.pad``'s order: last axis first."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [int(b), int(e)]
    return out


def _spatial_pads(
    attrs: dict, spatial: tuple[int, ...], kernel: list[int], strides: list[int], dilations: list[int]
) -> list[int]:
    """ONNX ``pads`` [x1_begin, x2_begin, ..., x1_end, x2_end, ...] of a conv or pool."""
    nd = len(kernel)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        return [int(p) for p in attrs.get("pads", [0] * (2 * nd))]
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise NotImplementedError(f"auto_pad {auto_pad!r}")
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


# ---- op modules: forward takes the node's inputs in ONNX order (None when absent) ------------


class _Conv(nn.Module):
    def __init__(self, attrs: dict, nd: int):
        super().__init__()
        self.attrs = attrs
        self.strides = [int(s) for s in attrs.get("strides", [1] * nd)]
        self.dilations = [int(d) for d in attrs.get("dilations", [1] * nd)]
        self.groups = int(attrs.get("group", 1))
        self.nd = nd

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        kernel = list(weight.shape[2:])
        pads = _spatial_pads(self.attrs, tuple(x.shape[2:]), kernel, self.strides, self.dilations)
        begin, end = pads[: self.nd], pads[self.nd :]
        if begin == end:
            padding = begin
        else:  # asymmetric: pad explicitly, then a conv without padding
            x = F.pad(x, _torch_pad(begin, end))
            padding = [0] * self.nd
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.nd - 1]
        return conv(x, weight, bias, self.strides, padding, self.dilations, self.groups)


class _Pool(nn.Module):
    def __init__(self, op: str, attrs: dict):
        super().__init__()
        if attrs.get("ceil_mode", 0):
            raise NotImplementedError(f"{op} ceil_mode=1")
        self.op = op
        self.attrs = attrs
        self.kernel = [int(k) for k in attrs["kernel_shape"]]
        nd = len(self.kernel)
        self.nd = nd
        self.strides = [int(s) for s in attrs.get("strides", [1] * nd)]
        self.dilations = [int(d) for d in attrs.get("dilations", [1] * nd)]
        if op == "AveragePool" and any(d != 1 for d in self.dilations):
            raise NotImplementedError(f"AveragePool dilations {self.dilations}")
        self.count_include_pad = bool(attrs.get("count_include_pad", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = self.nd
        pads = _spatial_pads(self.attrs, tuple(x.shape[2:]), self.kernel, self.strides, self.dilations)
        begin, end = pads[:nd], pads[nd:]
        if self.op == "MaxPool":
            if any(pads):
                x = F.pad(x, _torch_pad(begin, end), value=-math.inf)
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
            return pool(x, self.kernel, self.strides, 0, self.dilations)
        avg = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
        native = begin == end and all(2 * p <= k for p, k in zip(begin, self.kernel))
        if native:  # torch pads symmetrically and counts like ONNX
            return avg(x, self.kernel, self.strides, begin, False, self.count_include_pad)
        torch_pads = _torch_pad(begin, end)
        total = avg(F.pad(x, torch_pads), self.kernel, self.strides)  # pads count as zeros
        if self.count_include_pad:
            return total
        # Divide by the number of real elements in each window instead of the kernel size.
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        return total / avg(F.pad(ones, torch_pads), self.kernel, self.strides)


class _Relu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class _Clip(nn.Module):
    """Bounds come as inputs (tensors or None); before opset 11, as attributes."""

    def __init__(self, low: float | None = None, high: float | None = None):
        super().__init__()
        self.low, self.high = low, high

    def forward(
        self, x: torch.Tensor, low: torch.Tensor | None = None, high: torch.Tensor | None = None
    ) -> torch.Tensor:
        low = self.low if low is None else low
        high = self.high if high is None else high
        if low is None and high is None:
            return x
        return torch.clamp(x, min=low, max=high)


class _Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _MatMul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class _Gemm(nn.Module):
    """alpha * A' @ B' + beta * C, A' = A^T when transA, B' = B^T when transB."""

    def __init__(self, attrs: dict):
        super().__init__()
        self.alpha = float(attrs.get("alpha", 1.0))
        self.beta = float(attrs.get("beta", 1.0))
        self.trans_a = bool(attrs.get("transA", 0))
        self.trans_b = bool(attrs.get("transB", 0))

    def forward(
        self, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.trans_a:
            a = a.t()
        w = weight if self.trans_b else weight.t()  # (N, K), as F.linear takes it
        if (
            self.alpha == 1.0
            and self.beta == 1.0
            and bias is not None
            and bias.dim() == 1
            and bias.shape[0] == w.shape[0]
        ):
            return F.linear(a, w, bias)
        y = F.linear(a, w)
        if self.alpha != 1.0:
            y = y * self.alpha
        if bias is not None:
            y = y + (bias * self.beta if self.beta != 1.0 else bias)
        return y


class _BatchNorm(nn.Module):
    """Inference-mode batch norm (running statistics) in every mode."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
    ) -> torch.Tensor:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=self.eps)


class _GlobalAveragePool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


class _ReduceMean(nn.Module):
    def __init__(self, axes: list[int] | None, keepdims: bool, noop_with_empty_axes: bool):
        super().__init__()
        self.axes, self.keepdims, self.noop = axes, keepdims, noop_with_empty_axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.axes:
            if self.noop:
                return x
            axes = tuple(range(x.dim()))
        else:
            axes = tuple(a % x.dim() for a in self.axes)
        return x.mean(dim=axes, keepdim=self.keepdims)


class _Reshape(nn.Module):
    def __init__(self, shape: list[int], allowzero: bool):
        super().__init__()
        self.shape, self.allowzero = shape, allowzero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [x.shape[i] if v == 0 and not self.allowzero else v for i, v in enumerate(self.shape)]
        return x.reshape(shape)


class _Flatten(nn.Module):
    """ONNX Flatten: dims before ``axis`` become the rows, the rest the columns."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim() if self.axis < 0 else self.axis
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


class _Softmax(nn.Module):
    def __init__(self, axis: int, coerce_2d: bool):
        super().__init__()
        self.axis, self.coerce_2d = axis, coerce_2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.coerce_2d:
            return torch.softmax(x, dim=self.axis)
        axis = self.axis % x.dim()  # before opset 13: softmax of the 2-D flattening at axis
        rows = math.prod(x.shape[:axis])
        return torch.softmax(x.reshape(rows, -1), dim=1).reshape(x.shape)


class _Pad(nn.Module):
    """Constant-mode Pad; ``pads`` per ONNX: all begins, then all ends (of ``axes``)."""

    def __init__(self, pads: list[int], axes: list[int] | None, value: float):
        super().__init__()
        self.pads, self.axes, self.default = pads, axes, value

    def forward(self, x: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
        rank = x.dim()
        axes = list(range(rank)) if self.axes is None else [a % rank for a in self.axes]
        n = len(axes)
        begin, end = [0] * rank, [0] * rank
        for i, axis in enumerate(axes):
            begin[axis], end[axis] = self.pads[i], self.pads[n + i]
        fill = self.default if value is None else float(value)
        return F.pad(x, _torch_pad(begin, end), mode="constant", value=fill)


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# ---- graph ----------------------------------------------------------------------------------

# Per op: the module attribute each input is held under when it is an initializer, and which of
# those attributes are trainable parameters (the rest become buffers).
_INPUTS = {
    "Conv": (("x", "weight", "bias"), {"weight", "bias"}),
    "Gemm": (("a", "weight", "bias"), {"weight", "bias"}),
    "MatMul": (("a", "b"), {"a", "b"}),
    "BatchNormalization": (
        ("x", "weight", "bias", "running_mean", "running_var"),
        {"weight", "bias"},
    ),
    "Clip": (("x", "min", "max"), set()),
    "Add": (("a", "b"), set()),
    "Pad": (("x",), set()),  # the constant value is input 2, wired separately
    "Relu": (("x",), set()),
    "Identity": (("x",), set()),
    "Dropout": (("x",), set()),
    "AveragePool": (("x",), set()),
    "MaxPool": (("x",), set()),
    "GlobalAveragePool": (("x",), set()),
    "ReduceMean": (("x",), set()),
    "Reshape": (("x",), set()),
    "Flatten": (("x",), set()),
    "Softmax": (("x",), set()),
}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


class OnnxTwin(nn.Module):
    """Runs the ONNX graph's nodes in order; ``layers[i]`` computes node ``i``.

    ``wiring[i]`` is node ``i``'s inputs as ``(kind, key)``: ``("env", tensor name)`` for a
    computed tensor, ``("attr", name)`` for a constant held by ``layers[i]``, ``("none", None)``
    for an absent optional input; and its output name.
    """

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        graph = model.graph
        self.opset = _opset(model)
        self._arrays: dict[str, np.ndarray] = {}
        for init in graph.initializer:
            array = numpy_helper.to_array(init)
            if np.issubdtype(array.dtype, np.floating):
                array = array.astype(np.float32)
            self._arrays[init.name] = array
        self._shared: dict[str, nn.Parameter] = {}
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self._consumers.setdefault(name, []).append(node)
        self._graph_outputs = {o.name for o in graph.output}
        self._producer = {out: node for node in graph.node for out in node.output}

        inputs = [i.name for i in graph.input if i.name not in self._arrays]
        if len(inputs) != 1:
            raise NotImplementedError(f"the twin runs single-input models; inputs: {inputs}")
        self.input_name = inputs[0]
        self.output_name = graph.output[0].name
        layers, self.wiring = [], []
        for node in graph.node:
            for extra in node.output[1:]:
                if extra and (extra in self._consumers or extra in self._graph_outputs):
                    raise NotImplementedError(
                        f"{node.op_type} node {node.name!r}: its output {extra!r} is used"
                    )
            layer, slots = self._layer(node)
            layers.append(layer)
            self.wiring.append((slots, node.output[0]))
        self.layers = nn.ModuleList(layers)
        del self._arrays, self._shared, self._consumers, self._producer

    # ---- construction ----------------------------------------------------------------------
    def _int_const(self, node: onnx.NodeProto, index: int, what: str) -> list[int] | None:
        """A structural input (shape, axes, pads) as ints; None when absent."""
        if len(node.input) <= index or not node.input[index]:
            return None
        name = node.input[index]
        if name not in self._arrays:
            raise NotImplementedError(
                f"{node.op_type} node {node.name!r}: its {what} ({name}) is computed at run time"
            )
        return [int(v) for v in self._arrays[name].reshape(-1)]

    def _hold(self, layer: nn.Module, attr: str, name: str, trainable: bool) -> None:
        array = self._arrays[name]
        if trainable and np.issubdtype(array.dtype, np.floating):
            if name not in self._shared:  # tied initializers stay one parameter
                self._shared[name] = nn.Parameter(torch.tensor(array))
            layer.register_parameter(attr, self._shared[name])
        else:
            layer.register_buffer(attr, torch.tensor(array))

    def _wire(self, node: onnx.NodeProto, layer: nn.Module, trainable: set[str]) -> list[tuple]:
        slots = []
        for index, attr in enumerate(_INPUTS[node.op_type][0]):
            name = node.input[index] if index < len(node.input) else ""
            if not name:
                slots.append(("none", None))
            elif name in self._arrays:
                self._hold(layer, attr, name, attr in trainable)
                slots.append(("attr", attr))
            else:
                slots.append(("env", name))
        while slots and slots[-1][0] == "none":
            slots.pop()
        return slots

    def _folded_matmul_bias(self, node: onnx.NodeProto) -> set[str]:
        """Add(MatMul(x, W), c) with constant c of out-features size: c is a linear bias."""
        trainable = set()
        for attr, name, other in zip("ab", node.input, reversed(node.input)):
            matmul = self._producer.get(other)
            if (
                name in self._arrays
                and matmul is not None
                and matmul.op_type == "MatMul"
                and len(matmul.input) > 1
                and matmul.input[1] in self._arrays
                and len(self._consumers.get(other, [])) == 1
                and other not in self._graph_outputs
                and self._arrays[name].size == self._arrays[matmul.input[1]].shape[-1]
            ):
                trainable.add(attr)
        return trainable

    def _layer(self, node: onnx.NodeProto) -> tuple[nn.Module, list[tuple]]:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if op not in _INPUTS:
            raise NotImplementedError(
                f"ONNX op {op} at node {node.name!r}; supported: {', '.join(SUPPORTED_OPS)}"
            )
        trainable = _INPUTS[op][1]
        if op == "Conv":
            weight = node.input[1]
            rank = self._arrays[weight].ndim if weight in self._arrays else 4
            layer = _Conv(attrs, rank - 2)
        elif op == "Gemm":
            layer = _Gemm(attrs)
        elif op == "MatMul":
            layer = _MatMul()
        elif op == "BatchNormalization":
            if attrs.get("training_mode", 0):
                raise NotImplementedError("BatchNormalization training_mode=1")
            layer = _BatchNorm(float(attrs.get("epsilon", 1e-5)))
        elif op == "Clip":  # opset < 11: bounds are attributes
            layer = _Clip(attrs.get("min"), attrs.get("max"))
        elif op == "Add":
            layer = _Add()
            trainable = self._folded_matmul_bias(node)
        elif op == "Relu":
            layer = _Relu()
        elif op in ("Identity", "Dropout"):
            layer = _Identity()
        elif op in ("AveragePool", "MaxPool"):
            layer = _Pool(op, attrs)
        elif op == "GlobalAveragePool":
            layer = _GlobalAveragePool()
        elif op == "ReduceMean":
            axes = attrs.get("axes")
            if axes is None:
                axes = self._int_const(node, 1, "axes")
            layer = _ReduceMean(
                None if axes is None else [int(a) for a in axes],
                bool(attrs.get("keepdims", 1)),
                bool(attrs.get("noop_with_empty_axes", 0)),
            )
        elif op == "Reshape":
            shape = self._int_const(node, 1, "shape")
            if shape is None:
                raise NotImplementedError(f"Reshape node {node.name!r} without a shape input")
            layer = _Reshape(shape, bool(attrs.get("allowzero", 0)))
        elif op == "Flatten":
            layer = _Flatten(int(attrs.get("axis", 1)))
        elif op == "Softmax":
            default = -1 if self.opset >= 13 else 1
            layer = _Softmax(int(attrs.get("axis", default)), coerce_2d=self.opset < 13)
        elif op == "Pad":
            mode = attrs.get("mode", b"constant")
            if mode not in (b"constant", "constant"):
                raise NotImplementedError(f"Pad mode {mode!r}; only constant padding")
            pads = self._int_const(node, 1, "pads")
            if pads is None:  # opset < 11: attributes
                pads = [int(p) for p in attrs.get("pads", [])]
            layer = _Pad(pads, self._int_const(node, 3, "axes"), float(attrs.get("value", 0.0)))
        slots = self._wire(node, layer, trainable)
        if op == "Pad" and len(node.input) > 2 and node.input[2]:
            name = node.input[2]
            if name in self._arrays:
                self._hold(layer, "value", name, trainable=False)
                slots.append(("attr", "value"))
            else:
                slots.append(("env", name))
        return layer, slots

    # ---- run -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input_name: x}
        for layer, (slots, output) in zip(self.layers, self.wiring, strict=True):
            args = [
                env[key] if kind == "env" else getattr(layer, key) if kind == "attr" else None
                for kind, key in slots
            ]
            env[output] = layer(*args)
        return env[self.output_name]


def torch_module_from_onnx(model: onnx.ModelProto) -> nn.Module:
    """A float32 ``nn.Module`` computing the same function as the ONNX ``model``."""
    return OnnxTwin(model)
