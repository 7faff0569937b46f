"""``tinytrain verify``: the imported forward against the reference interpreter of its format.

1. Import the file as ``load_model(path, float_classifier=False)`` (an int8 file stays its own
   integer graph) and compile its ``main`` for the host (llvm, TVM's VirtualMachine).
2. Open the reference: LiteRT with its reference kernels (``BUILTIN_REF``) for ``.tflite``,
   onnxruntime with graph optimizations off for ``.onnx``: both give the same answer on every CPU.
3. Pick the reference tensor ours computes: the file's output, or the input of a trailing
   softmax (training works on logits, so the import drops it), or the int8 tensor under a
   trailing DEQUANTIZE.
4. Draw N seeded inputs: float inputs over a plausible range (images in [0, 1], anything else
   standard normal), int8 inputs over the whole int8 range; a file that takes float input and
   quantizes it gets floats over its QUANTIZE's range, and ours their ``quantize_input``.
5. Compare. Float: max error ≤ 1e-4 of the output's range. Int8: ≥ 99.9 % of outputs within one
   step of the output scale (LSB) and top-1 agreement ≥ 99 %. A weight-only int8 TFLite file
   (float activations) runs LiteRT's hybrid kernels, which quantize activations on the fly and
   so cannot match ours (the float model of the file's weights) to 1e-4: it passes with
   ≥ 99 % of outputs within 2 % of the output's range, and the report says so.

Top-1 agreement is reported for classifiers only: an output of the input's shape (an
autoencoder's reconstruction) is judged by its error relative to the output's range alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, ModelFormatError, TinyTrainError
from .frontend import load_model
from .quantize import input_quantization, quantize_input

FLOAT_TOLERANCE = 1e-4      # max |ours - ref| / output range, float outputs
INT8_WITHIN_1_LSB = 0.999   # share of int8 outputs within one output step
TOP1_AGREEMENT = 0.99
HYBRID_SPAN = 0.02          # hybrid kernels: an output is close within 2 % of the output range...
HYBRID_SHARE = 0.99         # ...and 99 % of them must be
INSTALL = 'pip install "tvm-tinytrain[verify]"'


class ReferenceMissingError(TinyTrainError):
    """The reference interpreter of the model's format is not installed."""


@dataclass
class VerifyReport:
    model: str
    reference: str               # which interpreter and kernels
    mode: str                    # "float", "int8" or "hybrid"
    samples: int
    inputs: str                  # how the inputs were drawn
    compared: str                # the reference tensor compared with ours
    output_shape: list[int]
    classification: bool
    max_abs_error: float
    output_range: float
    relative_error: float        # max_abs_error / output_range
    within_tolerance: float      # share of outputs within the mode's tolerance
    top1_agreement: float | None
    lsb_histogram: dict[str, int] | None = None
    criterion: str = ""
    passed: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The report as plain JSON types (a non-finite error becomes None)."""
        clean = lambda v: v if not isinstance(v, float) or np.isfinite(v) else None  # noqa: E731
        return {k: clean(v) for k, v in asdict(self).items()}

    def format(self) -> str:
        verdict = "AGREE" if self.passed else "DISAGREE"
        lines = [f"{verdict}: {self.model} vs {self.reference} on {self.samples} random inputs "
                 f"({self.criterion})"]
        if self.mode == "int8":
            h = self.lsb_histogram or {}
            total = max(sum(h.values()), 1)
            lines.append("  |ours - ref| in output steps (LSB): " + ", ".join(
                f"{k}: {v} ({v / total:.2%})" for k, v in h.items()))
        if self.mode == "hybrid":
            lines.append(f"  {self.within_tolerance:.2%} of outputs within {HYBRID_SPAN:.0%} of the output "
                         "range")
        lines.append(f"  max abs error {self.max_abs_error:.3g}, output range {self.output_range:.3g}, "
                     f"relative to the range {self.relative_error:.3g}")
        if self.top1_agreement is not None:
            lines.append(f"  top-1 agreement {self.top1_agreement:.1%}")
        else:
            lines.append("  not a classifier (output shaped like the input): judged by the error relative "
                         "to the output range")
        lines.append(f"  compared {self.compared}, output {tuple(self.output_shape)}; inputs {self.inputs}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclass
class _Reference:
    """A reference interpreter opened on the file, and what it compares with ours."""

    name: str
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    output_quant: tuple[float, int] | None   # (scale, zero point) of an int8 compared tensor
    softmax: bool                             # the file ends in a softmax (a classifier)
    compared: str
    run: Callable[[np.ndarray], np.ndarray]
    hybrid: bool = False


def _missing(package: str, err: ImportError) -> ReferenceMissingError:
    return ReferenceMissingError(f"the reference interpreter {package} is not installed ({err}); {INSTALL}")


def _litert(path: Path) -> _Reference:
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as err:
        raise _missing("ai-edge-litert", err)
    try:
        interp = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise ModelFormatError(f"{path}: LiteRT cannot run this file: {str(err).splitlines()[0]}")
    details = {d["index"]: d for d in interp.get_tensor_details()}
    producer = {int(o["outputs"][0]): o for o in interp._get_ops_details() if len(o["outputs"])}
    inp = interp.get_input_details()[0]
    out = int(interp.get_output_details()[0]["index"])
    softmax = False
    while out in producer and producer[out]["op_name"] in ("SOFTMAX", "DEQUANTIZE"):
        softmax |= producer[out]["op_name"] == "SOFTMAX"
        out = int(producer[out]["inputs"][0])
    tensor = details[out]
    quant = None
    if tensor["dtype"] == np.int8:
        scale, zero = tensor["quantization"]
        quant = (float(scale), int(zero))
    computed = {int(i) for o in producer.values() for i in o["outputs"]}
    hybrid = inp["dtype"] == np.float32 and any(  # int8 weights, float activations
        d["dtype"] == np.int8 and i not in computed and i != inp["index"] for i, d in details.items())

    def run(x: np.ndarray) -> np.ndarray:
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return interp.get_tensor(out).copy()

    return _Reference("LiteRT reference kernels", tuple(int(d) for d in inp["shape"]), np.dtype(inp["dtype"]),
                      quant, softmax, f"tensor {tensor['name']!r}", run, hybrid)


def _onnxruntime(path: Path) -> _Reference:
    try:
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper
    except ImportError as err:
        raise _missing("onnxruntime", err)
    model = onnx.load(str(path))
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {o: n for n in graph.node for o in n.output}
    inputs = [i for i in graph.input if i.name not in consts]
    out = graph.output[0].name
    # the trailing Q / DQ / Identity / Dropout / Softmax chain; compare at a softmax's input
    softmax, name = False, out
    while name in producer and producer[name].op_type in (
            "Softmax", "Identity", "Dropout", "QuantizeLinear", "DequantizeLinear"):
        node = producer[name]
        name = node.input[0]
        if node.op_type == "Softmax":
            softmax, out = True, name
    quant = None
    node = producer.get(out)
    if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in consts:
        scale = consts[node.input[1]].reshape(-1)
        zero = consts[node.input[2]].reshape(-1) if len(node.input) > 2 and node.input[2] in consts \
            else np.zeros(1, np.int64)
        if scale.size == 1:
            quant = (float(scale[0]), int(zero[0]))
    if out not in {o.name for o in graph.output}:
        del graph.output[:]
        graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ModelFormatError(f"{path}: onnxruntime cannot run this file: {str(err).splitlines()[0]}")
    feed = session.get_inputs()[0]
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
            for d in inputs[0].type.tensor_type.shape.dim]
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type))

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([out], {feed.name: x})[0]

    return _Reference("onnxruntime (graph optimizations off)", tuple(dims), dtype, quant, softmax,
                      f"tensor {out!r}", run)


def _ours(mod, params) -> Callable[[np.ndarray], np.ndarray]:
    import tvm
    from tvm import relax

    from relay_passes.plain_calls import PlainTIRCalls

    vm = relax.VirtualMachine(tvm.compile(PlainTIRCalls(mod), target="llvm"), tvm.cpu())
    weights = [tvm.runtime.tensor(params[p.name]) for p in mod["main"].params[1:]]
    return lambda x: vm["main"](tvm.runtime.tensor(x), *weights).numpy()


def _inputs(mod, ref: _Reference, ours_dtype: str, count: int, seed: int):
    """``count`` (ours, reference) input pairs and a description of how they were drawn."""
    rng = np.random.default_rng(seed)
    shape = ref.input_shape
    if ours_dtype == "int8" and ref.input_dtype == np.int8:
        xs = [rng.integers(-128, 128, size=shape, dtype=np.int8) for _ in range(count)]
        return [(x, x) for x in xs], "int8 uniform over [-128, 127]"
    if ours_dtype == "int8":  # the file quantizes float input: floats over its QUANTIZE's range
        scale, zero = input_quantization(mod)
        lo, hi = (-128 - zero) * scale, (127 - zero) * scale
        xs = [rng.uniform(lo, hi, size=shape).astype(ref.input_dtype) for _ in range(count)]
        return [(quantize_input(mod, x), x) for x in xs], \
            f"float uniform over the file's QUANTIZE range [{lo:.4g}, {hi:.4g}]"
    if len(shape) == 4:
        xs = [rng.uniform(0, 1, size=shape).astype(np.float32) for _ in range(count)]
        return [(x, x) for x in xs], "float images uniform over [0, 1]"
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]
    return [(x, x) for x in xs], "float standard normal"


def verify(path: str | Path, samples: int = 100, seed: int = 0, progress: bool = False) -> VerifyReport:
    """Run ``samples`` seeded random inputs through our forward and the reference; a report."""
    if samples < 1:
        raise InputError(f"--samples must be at least 1, not {samples}")
    path = Path(path)
    mod, params = load_model(path, float_classifier=False)
    suffix = path.suffix.lower()
    ref = _litert(path) if suffix == ".tflite" or path.read_bytes()[4:8] == b"TFL3" else _onnxruntime(path)
    x_param = mod["main"].params[0]
    ours_dtype = str(x_param.ty.dtype)
    ref.hybrid = ref.hybrid and ours_dtype != "int8"  # a full int8 file with float i/o is not hybrid
    if ref.hybrid:
        ref.name = "LiteRT hybrid kernels (activations quantized on the fly)"
    ours_shape = tuple(int(d) for d in x_param.ty.shape)
    if ours_shape != ref.input_shape:
        raise ModelFormatError(f"{path}: the import takes input {ours_shape}, the reference "
                               f"{ref.input_shape}; cannot compare")
    if progress:
        print(f"verify: compiling {path.name}'s forward for llvm", file=sys.stderr, flush=True)
    forward = _ours(mod, params)
    pairs, described = _inputs(mod, ref, ours_dtype, samples, seed)
    if progress:
        from tqdm import tqdm

        pairs = tqdm(pairs, desc="verify", file=sys.stderr, unit="input")
    ours, raw = [], []
    for mine, theirs in pairs:
        ours.append(np.asarray(forward(mine), np.float64))
        raw.append(ref.run(theirs))
    ours, refs = np.stack(ours), np.stack(raw).astype(np.float64)
    notes = []
    if ours.shape != refs.shape:
        if ours.size != refs.size:
            raise ModelFormatError(f"{path}: our output has shape {ours.shape[1:]}, the reference's "
                                   f"{ref.compared} {refs.shape[1:]}; cannot compare")
        notes.append(f"reference output shape {refs.shape[1:]} compared flattened")
        refs = refs.reshape(ours.shape)
    classification = ref.softmax or tuple(ours.shape[1:]) != ours_shape
    mode = "hybrid" if ref.hybrid else "int8" if ref.output_quant is not None else "float"
    if mode == "int8":
        scale, zero = ref.output_quant
        if np.issubdtype(raw[0].dtype, np.integer):  # LiteRT's int8 values, dequantized as ours are
            refs = (refs - zero) * scale
    diff = np.abs(ours - refs)
    span = float(np.max(refs) - np.min(refs)) if refs.size else 0.0
    span = span if span > 0 else float(np.max(np.abs(refs))) or 1.0
    max_abs = float(np.max(diff))
    top1 = None
    if classification:
        flat = ours.shape[0], -1
        top1 = float(np.mean(np.argmax(ours.reshape(flat), 1) == np.argmax(refs.reshape(flat), 1)))
    histogram = None
    if mode == "float":
        within = float(np.mean(diff <= FLOAT_TOLERANCE * span))
        passed = max_abs <= FLOAT_TOLERANCE * span
        criterion = f"max error ≤ {FLOAT_TOLERANCE:g} of the output range"
    elif mode == "int8":
        lsb = np.where(np.isfinite(diff), np.round(diff / scale), np.inf)
        histogram = {"0": int(np.sum(lsb == 0)), "1": int(np.sum(lsb == 1)), "2": int(np.sum(lsb == 2)),
                     ">2": int(np.sum(lsb > 2))}
        within = float(np.mean(lsb <= 1))
        passed = within >= INT8_WITHIN_1_LSB and (top1 is None or top1 >= TOP1_AGREEMENT)
        criterion = f"≥ {INT8_WITHIN_1_LSB:.1%} within 1 LSB" + (
            f", top-1 ≥ {TOP1_AGREEMENT:.0%}" if classification else "")
    else:
        within = float(np.mean(diff <= HYBRID_SPAN * span))
        passed = within >= HYBRID_SHARE and (top1 is None or top1 >= TOP1_AGREEMENT)
        criterion = (f"hybrid tolerance: ≥ {HYBRID_SHARE:.0%} within {HYBRID_SPAN:.0%} of the output range"
                     + (f", top-1 ≥ {TOP1_AGREEMENT:.0%}" if classification else ""))
        notes.append("the file is weight-only int8: LiteRT runs hybrid kernels that quantize "
                     "activations on the fly, so it only approximates the float model of the file's "
                     "weights that ours computes")
    if not np.all(np.isfinite(ours)):
        passed = False
        notes.append(f"{int(np.sum(~np.isfinite(ours)))} of our outputs are not finite")
    return VerifyReport(
        model=str(path), reference=ref.name, mode=mode, samples=samples, inputs=described,
        compared=ref.compared, output_shape=list(ours.shape[1:]), classification=bool(classification),
        max_abs_error=max_abs, output_range=span, relative_error=max_abs / span,
        within_tolerance=within, top1_agreement=top1, lsb_histogram=histogram, criterion=criterion,
        passed=bool(passed), notes=notes)
