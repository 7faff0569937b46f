"""Which tensor of the model file each imported parameter came from, and how: found at compile time.

The readers name parameters after the layer index (``conv0.weight``, ``dwconv1.bias``,
``linear13.weight``), numbering conv, depthwise and fully connected layers in the file's operator
order. ``source_layers`` walks the file the same way and pairs each layer with its tensors
(TFLite: the operator's weight and bias, through a DEQUANTIZE of a constant; ONNX: the Conv /
Gemm / MatMul initializers, through a DequantizeLinear in QDQ form, a MatMul's bias in the Add
after it), then checks the pairing against the values the model was compiled from:

- ``float``: a float tensor equal to the parameter in its layout (TFLite OHWI / depthwise 1HWC,
  ONNX OIHW, a Gemm or MatMul's (in, out) weight transposed);
- ``int``: int8 weights / int32 biases equal to the parameter, or to ``round(file / 2^k)`` for a
  layer given ``k`` bits of weight headroom (its scales are then ``2^k`` times the file's);
- ``requantize``: an integer tensor whose dequantized values the parameter is (an int8 model's
  float32 classifier, a ``--dequantize`` twin, a weight-only int8 file): written back requantized.

A float ONNX layer whose BatchNormalization the reader folded in is paired with the folded values
(``bn``: export writes them and makes the BatchNormalization an Identity); a float Conv / Gemm
without a bias gets one (``create``), since the reader trains one. A parameter that matches none (a
Gemm's alpha, a MatMul's BatchNormalization) gets an ``error``: export refuses to write it, naming
it. ``attach_source`` stores the file and this table in the artifact (``source.tflite`` /
``source.onnx`` and ``metadata["source"]``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from .codegen.artifact import Artifact

LAYER_PARAM = re.compile(r"^(conv|dwconv|linear)(\d+)\.(weight|bias)$")
MAX_HEADROOM = 6
# file layout → (to the imported layout, channel axis in the file)
LAYOUTS = {"OHWI": ((0, 3, 1, 2), 0), "1HWC": ((3, 0, 1, 2), 3), "OIHW": (None, 0), "OI": (None, 0),
           "IO": ((1, 0), 1), "C": (None, 0)}


def to_param(array: np.ndarray, layout: str) -> np.ndarray:
    axes = LAYOUTS[layout][0]
    return array if axes is None else array.transpose(axes)


def from_param(array: np.ndarray, layout: str) -> np.ndarray:
    axes = LAYOUTS[layout][0]
    return array if axes is None else array.transpose(np.argsort(axes))


def dequantized(stored: np.ndarray, quant: tuple, layout: str) -> np.ndarray:
    """An integer tensor's real values, in the file's layout."""
    scale, zero, dim = quant
    shape = [1] * stored.ndim
    if scale.size > 1:
        shape[dim] = scale.size
    return (stored.astype(np.float64) - zero.reshape(shape)) * scale.reshape(shape)


def attach_source(artifact: Artifact, path: str | Path, params: dict[str, np.ndarray]) -> None:
    """Keep a byte copy of the model file in ``artifact`` and how its tensors map to ``params``."""
    path = Path(path)
    data = path.read_bytes()
    fmt = "tflite" if data[4:8] == b"TFL3" else "onnx"
    name = f"source.{fmt}"
    artifact.blobs[name] = data
    artifact.metadata["source"] = {
        "file": name, "name": path.name, "format": fmt, "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "layers": source_layers(data, fmt, params),
    }


def source_layers(data: bytes, fmt: str, params: dict[str, np.ndarray]) -> list[dict]:
    """One entry per layer of ``params`` (see the module docstring); never raises for a file the
    readers took: what cannot be paired is an entry's ``error``."""
    indices = sorted({int(m.group(2)) for m in map(LAYER_PARAM.match, params) if m})
    try:
        found = _tflite_layers(data) if fmt == "tflite" else _onnx_layers(data)
    except Exception as err:  # a file the reader took but this walk does not: no layer is writable
        found, why = [], f"the model file could not be walked ({type(err).__name__}: {err})"
    else:
        why = "the file has fewer conv / linear operators than the model"
    out = []
    for n in indices:
        names = {m.group(3): p for p in params if (m := LAYER_PARAM.match(p)) and int(m.group(2)) == n}
        entry = {"index": n, "weight": names.get("weight"), "bias": names.get("bias")}
        if n >= len(found):
            out.append({**entry, "error": why})
            continue
        layer = found[n]
        entry.update(op=layer["op"], input_scale=layer.get("input_scale"))
        entry["error"] = _check(entry, layer, params)
        entry["w"], entry["b"] = layer["w"]["binding"], (layer.get("b") or {}).get("binding")
        out.append(entry)
    return out


def _check(entry: dict, layer: dict, params: dict[str, np.ndarray]) -> str | None:
    """Set each binding's mode (and headroom); the reason the layer cannot be written, or None."""
    headroom = 0
    for key, what in (("w", "weight"), ("b", "bias")):
        name = entry[what]
        if name is None:
            continue
        found = layer.get(key)
        if found is None:
            return f"the file has no {what} tensor for {name} (the reader made one of zeros)"
        if "error" in found:
            return found["error"]
        param = np.asarray(params[name])
        binding, stored, quant = found["binding"], found["stored"], found["quant"]
        ref = binding["ref"]
        try:
            values = to_param(stored, binding["layout"])
        except ValueError:
            return f"{name}: the file's tensor {ref} has shape {list(stored.shape)}"
        if values.shape != param.shape:
            return f"{name} has shape {list(param.shape)}, the file's tensor {ref} {list(stored.shape)}"
        if param.dtype.kind == "f" and stored.dtype.kind == "f":
            binding["mode"] = "float"
            if "bn" in layer:  # a BatchNormalization the reader folded in: export folds it too
                binding["bn"] = layer["bn"]
                values = folded(values, binding)
            if not _close(values, param):
                return (f"{name} differs from the file's tensor {ref}: it was computed from several "
                        f"tensors at import (a folded BatchNormalization, a Gemm's alpha / beta)")
        elif param.dtype.kind in "iu" and stored.dtype.kind in "iu":
            binding["mode"] = "int"
            k = headroom if key == "b" else next(
                (k for k in range(MAX_HEADROOM + 1) if np.array_equal(_shrunk(values, k), param)), None)
            if k is None or not np.array_equal(_shrunk(values, k), param):
                return f"{name} differs from the file's tensor {ref}"
            headroom = binding["headroom"] = k
        elif param.dtype.kind == "f" and quant is not None:
            binding["mode"] = "requantize"
            if not _close(to_param(dequantized(stored, quant, binding["layout"]), binding["layout"]), param):
                return f"{name} differs from the file's tensor {ref} dequantized"
            if key == "b" and layer.get("input_scale") is None:
                return f"{name}: the scale of its layer's input is unknown"
        else:
            return f"{name} is {param.dtype}, the file's tensor {ref} {stored.dtype} without scales"
    return None


def folded(values: np.ndarray, binding: dict) -> np.ndarray:
    """A weight (output channels first) or bias with its layer's BatchNormalization folded in, as
    the ONNX reader folds it: ``w·scale``, ``b·scale + shift``."""
    bn = binding.get("bn")
    if bn is None:
        return values
    scale = np.asarray(bn["scale"]).reshape(-1, *[1] * (values.ndim - 1))
    return values * scale + (np.asarray(bn["shift"]) if binding["layout"] == "C" else 0.0)


def _shrunk(values: np.ndarray, k: int) -> np.ndarray:
    return values if k == 0 else np.round(values.astype(np.float64) / 2 ** k).astype(np.int64)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(a).max(initial=0)))))


# ---- TFLite --------------------------------------------------------------------------------------
def _tflite_layers(data: bytes) -> list[dict]:
    from tflite.BuiltinOperator import BuiltinOperator as B

    from .tflite_patch import TfliteFile

    f = TfliteFile(data)
    ops = [f.graph.Operators(i) for i in range(f.graph.OperatorsLength())]

    def code(op) -> int:
        c = f.model.OperatorCodes(op.OpcodeIndex())
        return max(c.BuiltinCode(), c.DeprecatedBuiltinCode())

    dequantize = {op.Outputs(0): op.Inputs(0) for op in ops if code(op) == B.DEQUANTIZE}
    layouts = {B.CONV_2D: "OHWI", B.DEPTHWISE_CONV_2D: "1HWC", B.FULLY_CONNECTED: "OI"}
    layers = []
    for position, op in enumerate(ops):
        if code(op) not in layouts:
            continue
        quant = f.quantization(op.Inputs(0))
        layer = {"op": position, "input_scale": None if quant is None else float(quant[0][0])}
        for key, slot, layout in (("w", 1, layouts[code(op)]), ("b", 2, "C")):
            if op.InputsLength() <= slot or op.Inputs(slot) < 0:
                continue
            index = dequantize.get(op.Inputs(slot), op.Inputs(slot))
            layer[key] = {"binding": {"ref": index, "name": f.name(index), "layout": layout},
                          "stored": f.values(index), "quant": f.quantization(index)}
        layers.append(layer)
    return layers


# ---- ONNX ----------------------------------------------------------------------------------------
def _onnx_layers(data: bytes) -> list[dict]:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_model_from_string(data)
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: (i, n) for i, n in enumerate(graph.node) for o in n.output}
    readers: dict[str, list] = {}
    for i, n in enumerate(graph.node):
        for name in n.input:
            readers.setdefault(name, []).append((i, n))

    def attrs(node) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def tensor(name: str, layout: str, what: str) -> dict:
        """The initializer behind ``name`` (directly, or a DequantizeLinear of one)."""
        made = producer.get(name)
        if made is not None and made[1].op_type == "DequantizeLinear":
            dq = made[1]
            ref = dq.input[0]
            if ref not in inits or dq.input[1] not in inits:
                return {"error": f"the {what} {name} is not a DequantizeLinear of initializers"}
            scale = inits[dq.input[1]].astype(np.float64).reshape(-1)
            zero_name = dq.input[2] if len(dq.input) > 2 and dq.input[2] else None
            zero = inits[zero_name].astype(np.int64).reshape(-1) if zero_name else np.zeros(1, np.int64)
            axis = int(attrs(dq).get("axis", 1)) % max(inits[ref].ndim, 1)
            return {"binding": {"ref": ref, "name": ref, "layout": layout, "dq": made[0],
                                "scale": dq.input[1], "zero_point": zero_name},
                    "stored": inits[ref], "quant": (scale, np.broadcast_to(zero, scale.shape), axis)}
        if name not in inits:
            return {"error": f"the {what} {name} is not an initializer of the file"}
        return {"binding": {"ref": name, "name": name, "layout": layout}, "stored": inits[name],
                "quant": None}

    def input_scale(node) -> float | None:
        made = producer.get(node.input[0])
        if made is None or made[1].op_type != "DequantizeLinear" or made[1].input[1] not in inits:
            return None
        return float(inits[made[1].input[1]].reshape(-1)[0])

    def matmul_bias(out: str) -> str | None:
        """The constant an Add after the MatMul adds (directly, or after a Q → DQ)."""
        chain = readers.get(out, [])
        if len(chain) == 1 and chain[0][1].op_type == "QuantizeLinear":
            dq = readers.get(chain[0][1].output[0], [])
            if len(dq) == 1 and dq[0][1].op_type == "DequantizeLinear":
                out, chain = dq[0][1].output[0], readers.get(dq[0][1].output[0], [])
        if len(chain) == 1 and chain[0][1].op_type == "Add":
            other = [n for n in chain[0][1].input if n != out]
            if len(other) == 1 and (other[0] in inits or other[0] in producer):
                return other[0]
        return None

    def batchnorm_after(out: str, channels: int) -> dict | None:
        """The inference BatchNormalization alone reading ``out``, as (node, scale, shift)."""
        chain = readers.get(out, [])
        if len(chain) != 1 or chain[0][1].op_type != "BatchNormalization" or chain[0][1].input[0] != out:
            return None
        index, bn = chain[0]
        if any(readers.get(o) for o in bn.output[1:] if o) or any(n not in inits for n in bn.input[1:5]):
            return None
        gamma, beta, mean, var = (inits[n].astype(np.float64).reshape(-1) for n in bn.input[1:5])
        if any(v.size != channels for v in (gamma, beta, mean, var)):
            return None
        scale = gamma / np.sqrt(var + float(attrs(bn).get("epsilon", 1e-5)))
        return {"node": index, "scale": scale.tolist(), "shift": (beta - mean * scale).tolist()}

    layers = []
    for position, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        a = attrs(node)
        if node.op_type == "Conv":
            layout, bias = "OIHW", node.input[2] if len(node.input) > 2 and node.input[2] else None
        elif node.op_type == "Gemm":
            layout = "OI" if a.get("transB", 0) else "IO"
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        else:
            layout, bias = "IO", matmul_bias(node.output[0])
        layer = {"op": position, "input_scale": input_scale(node),
                 "w": tensor(node.input[1], layout, "weight")}
        stored_w = layer["w"].get("stored")
        if node.op_type != "MatMul" and "quant" in layer["w"] and layer["w"]["quant"] is None:
            channels = stored_w.shape[1 if layout == "IO" else 0] if stored_w.ndim >= 2 else 0
            bn = batchnorm_after(node.output[0], channels)
            if bn is not None:
                layer["bn"] = bn
            if bias is None:  # the reader made a bias of zeros: export adds one to the node
                layer["b"] = {"binding": {"ref": None, "name": f"{node.name or node.output[0]}.bias",
                                          "layout": "C", "create": position},
                              "stored": np.zeros(channels, stored_w.dtype), "quant": None}
        if bias is not None:
            layer["b"] = tensor(bias, "C", "bias")
            if "stored" in layer["b"] and layer["b"]["stored"].ndim != 1:
                layer["b"] = {"error": f"the bias {bias} has shape {list(layer['b']['stored'].shape)}"}
        layers.append(layer)
    return layers
