"""Small model zoo: ONNX CNNs with seeded random weights, built without torch.

Every model takes one NCHW float32 tensor named ``input`` (batch 1) and returns
float32 ``logits`` of shape ``(1, num_classes)``. Models use opset 17 and IR
version 8 (so onnxruntime 1.31 runs them) and only these ops: Conv (incl.
grouped / depthwise), Relu, Clip (ReLU6, bounds as initializer inputs),
BatchNormalization, Add, GlobalAveragePool, Flatten, Gemm.

Weights are He-initialised (``std = sqrt(2 / fan_in)``) for convs followed by
an activation, LeCun-initialised (``std = sqrt(1 / fan_in)``) for the linear
projection convs and the classifier, so activations stay O(1) through deep
networks. Initializer names follow torchvision's style
(``features.3.conv.1.weight``).

``count_macs`` counts conv and Gemm multiply-accumulates of any such model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never losing more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class _Block:
    """One mobile inverted bottleneck: expansion, kernel, output channels, stride."""

    expand: int
    kernel: int
    out_channels: int
    stride: int


class _GraphBuilder:
    """Emits ONNX nodes and initializers while tracking the current tensor.

    Every ``conv``/``act``/``add`` call appends to the graph and moves
    ``self.x`` (name of the current tensor) and ``self.channels`` along.
    """

    def __init__(
        self, in_channels: int, input_hw: tuple[int, int], seed: int, batchnorm: bool = False
    ):
        self.rng = np.random.default_rng(seed)
        self.batchnorm = batchnorm
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.input_shape = (1, in_channels, *input_hw)
        self.x = "input"
        self.channels = in_channels
        self._counter = 0
        self._clip_bounds: tuple[str, str] | None = None

    # -- helpers ---------------------------------------------------------
    def _fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def _init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def _emit(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self._fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        self.x = out
        return out

    # -- layers ----------------------------------------------------------
    def conv(
        self,
        name: str,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "relu",
    ) -> str:
        """Conv (+ BatchNormalization when enabled) (+ activation) on the current tensor."""
        cin = self.channels
        fan_in = cin // groups * kernel * kernel
        gain = 2.0 if act else 1.0
        weight = self.rng.normal(
            0.0, np.sqrt(gain / fan_in), (out_channels, cin // groups, kernel, kernel)
        )
        inputs = [self.x, self._init(f"{name}.weight", weight)]
        if not self.batchnorm:
            inputs.append(self._init(f"{name}.bias", self.rng.uniform(-0.05, 0.05, out_channels)))
        pad = kernel // 2
        self._emit(
            "Conv",
            inputs,
            "conv",
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
            group=groups,
            dilations=[1, 1],
        )
        self.channels = out_channels
        if self.batchnorm:
            self._batchnorm(f"{name}.bn")
        if act:
            self.act(act)
        return self.x

    def _batchnorm(self, name: str) -> str:
        c = self.channels
        stats = {
            "weight": self.rng.uniform(0.8, 1.2, c),
            "bias": self.rng.normal(0.0, 0.05, c),
            "running_mean": self.rng.normal(0.0, 0.05, c),
            "running_var": self.rng.uniform(0.8, 1.2, c),
        }
        inputs = [self.x] + [self._init(f"{name}.{key}", value) for key, value in stats.items()]
        return self._emit("BatchNormalization", inputs, "bn", epsilon=1e-5)

    def act(self, kind: str) -> str:
        """``relu`` or ``relu6`` (Clip with shared min/max initializers)."""
        if kind == "relu":
            return self._emit("Relu", [self.x], "relu")
        if kind == "relu6":
            if self._clip_bounds is None:
                self._clip_bounds = (
                    self._init("relu6.min", np.array(0.0)),
                    self._init("relu6.max", np.array(6.0)),
                )
            return self._emit("Clip", [self.x, *self._clip_bounds], "relu6")
        raise ValueError(f"unknown activation {kind!r}; supported: relu, relu6")

    def add(self, other: str) -> str:
        return self._emit("Add", [self.x, other], "add")

    def inverted_residual(self, name: str, block: _Block, act: str = "relu6") -> str:
        """1x1 expand (skipped when expand == 1), kxk depthwise, linear 1x1 project, residual."""
        identity, cin = self.x, self.channels
        hidden = cin * block.expand
        index = 0
        if block.expand != 1:
            self.conv(f"{name}.conv.{index}", hidden, 1, act=act)
            index += 1
        self.conv(
            f"{name}.conv.{index}", hidden, block.kernel, block.stride, groups=hidden, act=act
        )
        self.conv(f"{name}.conv.{index + 1}", block.out_channels, 1, act=None)
        if block.stride == 1 and cin == block.out_channels:
            self.add(identity)
        return self.x

    def classifier(self, name: str, num_classes: int) -> str:
        """GlobalAveragePool, Flatten, Gemm(transB=1) producing ``logits``."""
        self._emit("GlobalAveragePool", [self.x], "pool")
        self._emit("Flatten", [self.x], "flatten", axis=1)
        weight = self.rng.normal(0.0, np.sqrt(1.0 / self.channels), (num_classes, self.channels))
        bias = self.rng.uniform(-0.05, 0.05, num_classes)
        inputs = [self.x, self._init(f"{name}.weight", weight), self._init(f"{name}.bias", bias)]
        self.nodes.append(helper.make_node("Gemm", inputs, ["logits"], name="logits", transB=1))
        self.x, self.channels = "logits", num_classes
        return self.x

    def model(self, graph_name: str) -> onnx.ModelProto:
        """Finish: the graph with ``input`` and ``logits`` as its only input/output."""
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(self.input_shape))],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, self.channels])],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tvm_tinytrain.zoo"
        )
        model.ir_version = IR_VERSION
        return model


def _mobile_net(
    name: str,
    *,
    resolution: int,
    num_classes: int,
    seed: int,
    stem: int,
    blocks: list[_Block],
    last_channels: int | None,
    act: str,
    batchnorm: bool = False,
) -> onnx.ModelProto:
    """Stem conv 3x3/2, inverted residual blocks, optional 1x1 head conv, classifier."""
    b = _GraphBuilder(3, (resolution, resolution), seed, batchnorm)
    b.conv("features.0", stem, 3, stride=2, act=act)
    for i, block in enumerate(blocks, start=1):
        b.inverted_residual(f"features.{i}", block, act=act)
    if last_channels is not None:
        b.conv(f"features.{len(blocks) + 1}", last_channels, 1, act=act)
    b.classifier("classifier", num_classes)
    return b.model(name)


def small_cnn(
    num_classes: int = 10,
    input_hw: tuple[int, int] = (8, 8),
    in_channels: int = 1,
    width: int = 8,
    seed: int = 0,
) -> onnx.ModelProto:
    """A tiny CNN for quick training tests (about 30 K MACs at 8x8, width 8).

    conv3x3(pad 1, ``width``) + Relu -> conv3x3 stride 2 (``2*width``) + Relu
    -> depthwise 3x3 + Clip(0, 6) -> pointwise 1x1 (``2*width``) + Relu
    -> GlobalAveragePool -> Flatten -> Gemm(transB=1) -> logits.
    """
    b = _GraphBuilder(in_channels, input_hw, seed)
    b.conv("conv1", width, 3)
    b.conv("conv2", 2 * width, 3, stride=2)
    b.conv("dwconv", 2 * width, 3, groups=2 * width, act="relu6")
    b.conv("pwconv", 2 * width, 1)
    b.classifier("fc", num_classes)
    return b.model("small_cnn")


# (expansion t, output channels c, repeats n, first stride s), torchvision's table.
_MOBILENET_V2_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def mobilenet_v2(
    width_mult: float = 0.35,
    resolution: int = 128,
    num_classes: int = 10,
    seed: int = 0,
    batchnorm: bool = False,
) -> onnx.ModelProto:
    """MobileNetV2 (Sandler et al. 2018) as in torchvision.

    Stem conv 3x3/2 (``32*w`` channels), 17 inverted residual blocks of the
    (t, c, n, s) table above (kernel 3, ReLU6 as Clip, residual Add when stride
    1 and in == out), 1x1 conv to 1280 (not scaled when ``w < 1``), pool, FC.
    Channels are ``_make_divisible(c * w, 8)``. With ``batchnorm`` every conv is
    followed by BatchNormalization and has no bias; otherwise BN is folded.
    At w=0.35, 128x128, 10 classes: 18.95 M MACs (the TinyTraining paper says
    17 M; TF-slim's table says 20 M with 1000 classes, which this gives: 20.2 M).
    At w=1 and w=0.35, 224x224, 1000 classes: 300.8 M and 59.3 M, as published.
    """
    blocks = [
        _Block(t, 3, _make_divisible(c * width_mult), s if i == 0 else 1)
        for t, c, n, s in _MOBILENET_V2_SETTINGS
        for i in range(n)
    ]
    return _mobile_net(
        "mobilenet_v2",
        resolution=resolution,
        num_classes=num_classes,
        seed=seed,
        stem=_make_divisible(32 * width_mult),
        blocks=blocks,
        last_channels=_make_divisible(1280 * max(1.0, width_mult)),
        act="relu6",
        batchnorm=batchnorm,
    )


# ProxylessNAS-mobile style: per stage (channels, stride, [(expansion, kernel), ...]).
_PROXYLESS_STAGES = [
    (16, 1, [(1, 3)]),
    (32, 2, [(3, 5), (3, 3)]),
    (40, 2, [(3, 7), (3, 3), (3, 5), (3, 5)]),
    (80, 2, [(6, 7), (3, 5), (3, 5), (3, 5)]),
    (96, 1, [(6, 5), (3, 5), (3, 5), (3, 5)]),
    (192, 2, [(6, 7), (6, 7), (3, 7), (3, 7)]),
    (320, 1, [(6, 7)]),
]


def _staged_blocks(
    stages: list[tuple[int, int, list[tuple[int, int]]]], width_mult: float
) -> list[_Block]:
    return [
        _Block(t, k, _make_divisible(c * width_mult), s if i == 0 else 1)
        for c, s, layers in stages
        for i, (t, k) in enumerate(layers)
    ]


def proxyless_nas(
    width_mult: float = 0.3, resolution: int = 128, num_classes: int = 10, seed: int = 0
) -> onnx.ModelProto:
    """A ProxylessNAS-mobile-shaped network (Cai et al. 2019), not an exact replica.

    Stem conv 3x3/2 (``32*w``), 20 mobile inverted bottlenecks with kernels
    3/5/7 and expansions 3/6 in the stages of the table above (channels
    16, 32, 40, 80, 96, 192, 320 times ``w``, rounded to 8; ProxylessNAS-mobile's
    skipped slots left out), 1x1 conv to 1280 (unscaled), pool, FC. ReLU6.
    At w=0.3, 128x128, 10 classes: 19.9 M MACs (paper: 19 M); at w=1, 224x224,
    1000 classes: 320 M, as published for ProxylessNAS-mobile.
    """
    return _mobile_net(
        "proxyless_nas",
        resolution=resolution,
        num_classes=num_classes,
        seed=seed,
        stem=_make_divisible(32 * width_mult),
        blocks=_staged_blocks(_PROXYLESS_STAGES, width_mult),
        last_channels=1280,
        act="relu6",
    )


# MCUNet-like: per stage (channels, stride, [(expansion, kernel), ...]).
_MCUNET_STAGES = [
    (8, 1, [(1, 3)]),
    (16, 2, [(3, 7), (3, 3)]),
    (24, 2, [(4, 7), (3, 5), (4, 5)]),
    (40, 2, [(4, 7), (3, 3), (4, 5)]),
    (48, 1, [(4, 5), (3, 5)]),
    (96, 2, [(5, 7), (4, 5), (3, 3)]),
    (160, 1, [(5, 5)]),
]


def mcunet_like(resolution: int = 128, num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """A network shaped like MCUNet-5FPS (Lin et al. 2020), not an exact replica.

    Stem conv 3x3/2 (16), 15 mobile inverted bottlenecks from the table above
    (channels 8, 16, 24, 40, 48, 96, 160; kernels 3/5/7 and expansions 3-5
    mixed per block, the way TinyNAS-searched networks look), no 1x1 head conv
    (MCUNet classifies straight from the 160-channel feature map), pool, FC.
    ReLU6. Depths and kernels were chosen to land on the paper's MAC count.
    At 128x128, 10 classes: 23.5 M MACs (paper: 23 M).
    """
    return _mobile_net(
        "mcunet_like",
        resolution=resolution,
        num_classes=num_classes,
        seed=seed,
        stem=16,
        blocks=_staged_blocks(_MCUNET_STAGES, 1.0),
        last_channels=None,
        act="relu6",
    )


def count_macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of every Conv and Gemm (batch included), from inferred shapes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        shapes[info.name] = [d.dim_value for d in info.type.tensor_type.shape.dim]
    total = 0
    for node in graph.node:
        if node.op_type == "Conv":
            weight = shapes[node.input[1]]
            total += int(np.prod(shapes[node.output[0]])) * int(np.prod(weight[1:]))
        elif node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            a_shape, b_shape = shapes[node.input[0]], shapes[node.input[1]]
            m, k = a_shape[::-1] if attrs.get("transA", 0) else a_shape
            n = b_shape[0] if attrs.get("transB", 0) else b_shape[1]
            total += m * k * n
    return total


def quantize_qdq(
    model: onnx.ModelProto, calibration: np.ndarray | None = None, seed: int = 0
) -> onnx.ModelProto:
    """``model`` quantized to int8 in QDQ form, as ``load_model`` imports it as an integer graph.

    onnxruntime's ``quantize_static``: QuantFormat.QDQ, QInt8 activations (asymmetric,
    MinMax calibration) and QInt8 weights (symmetric, per output channel), the biases
    int32 at ``s_x·s_w``; Relu / Clip vanish into their producer's output range.
    ``calibration`` holds the samples to calibrate on, stacked along the batch axis
    (shape ``(n, C, H, W)`` for a ``(1, C, H, W)`` input); by default 8 standard normal
    samples drawn with ``seed``. BatchNormalization is folded into the convs first
    (onnxruntime's ``quant_pre_process``). Needs onnxruntime.
    """
    import tempfile
    from pathlib import Path

    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as err:
        raise ImportError(
            f"quantize_qdq needs onnxruntime's quantization tools ({err}); pip install onnxruntime"
        ) from err

    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise ValueError(f"quantize_qdq takes a single-input model; this one has {len(inputs)}")
    name = inputs[0].name
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
             for d in inputs[0].type.tensor_type.shape.dim]
    if calibration is None:
        rng = np.random.default_rng(seed)
        samples = [rng.standard_normal(shape).astype(np.float32) for _ in range(8)]
    else:
        data = np.asarray(calibration, np.float32)
        if data.ndim == len(shape) - 1:
            data = data[None]
        if data.ndim != len(shape) or tuple(data.shape[1:]) != tuple(shape[1:]):
            raise ValueError(
                f"calibration has shape {data.shape}; expected (n, {', '.join(map(str, shape[1:]))})"
            )
        samples = [data[i:i + 1] for i in range(data.shape[0])]

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._samples = iter(samples)

        def get_next(self):
            sample = next(self._samples, None)
            return None if sample is None else {name: sample}

    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, source)
        if any(node.op_type == "BatchNormalization" for node in model.graph.node):
            folded = Path(tmp) / "folded.onnx"
            quant_pre_process(str(source), str(folded), skip_symbolic_shape=True)
            source = folded
        quantize_static(
            str(source), str(out), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        )
        return onnx.load(str(out))
