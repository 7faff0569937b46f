"""Edits of an ONNX model's initializers, the twin of ``tflite_patch`` for ``export_tuned``.

A parameter is an initializer, named by ``source_map`` (``binding["ref"]``); in QDQ form it is read
through a DequantizeLinear (``binding["dq"]``, its node index) whose scale and zero point are
initializers too. Edits go through onnx's protobuf API: an initializer's values are replaced under
its name; new scales replace the DequantizeLinear's scale and zero point (a new initializer when
another node reads the same one) and set its ``axis`` when there is one scale per channel. Every
other node, initializer, attribute and metadata field is the source's.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class OnnxFile:
    """An ONNX model, its initializers readable and replaceable (see the module docstring)."""

    def __init__(self, data: bytes):
        self.model = onnx.load_model_from_string(data)
        self.graph = self.model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.users: dict[str, int] = {}
        for node in self.graph.node:
            for name in node.input:
                self.users[name] = self.users.get(name, 0) + 1

    def to_bytes(self) -> bytes:
        return self.model.SerializeToString()

    def name(self, ref: str) -> str:
        return ref

    def values(self, ref: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[ref])

    def set_values(self, ref: str, values: np.ndarray) -> None:
        old = self.values(ref)
        array = np.ascontiguousarray(values, old.dtype).reshape(old.shape)
        self.inits[ref].CopyFrom(numpy_helper.from_array(array, ref))

    def _const(self, node, slot: int, values: np.ndarray, name: str) -> None:
        """``node.input[slot]`` := an initializer holding ``values`` (a new one if ``name`` is shared)."""
        shared = self.users.get(name, 0) > 1 or name not in self.inits
        new = f"{name}_tuned_{node.output[0]}" if shared else name
        tensor = numpy_helper.from_array(values, new)
        if new in self.inits:
            self.inits[new].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.inits[new] = self.graph.initializer[-1]
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = new

    def add_bias(self, node_index: int, name: str, channels: int) -> str:
        """Give a float Conv / Gemm without a bias a bias initializer of zeros; its name."""
        while name in self.inits:
            name += "_"
        node = self.graph.node[node_index]
        self.graph.initializer.append(numpy_helper.from_array(np.zeros(channels, np.float32), name))
        self.inits[name] = self.graph.initializer[-1]
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        return name

    def drop_batchnorm(self, node_index: int) -> None:
        """A BatchNormalization whose affine was written into the layer before it → Identity."""
        node = self.graph.node[node_index]
        node.op_type = "Identity"
        del node.input[1:]
        del node.output[1:]
        del node.attribute[:]

    @staticmethod
    def _axis(node, default: int = 1) -> int:
        return next((a.i for a in node.attribute if a.name == "axis"), default)

    def _node_quant(self, node, ndim: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
        scale = self.values(node.input[1]).astype(np.float64).reshape(-1)
        has_zero = len(node.input) > 2 and node.input[2]
        zero = self.values(node.input[2]).astype(np.int64).reshape(-1) if has_zero else np.zeros(1, np.int64)
        return scale, np.broadcast_to(zero, scale.shape).copy(), self._axis(node) % max(ndim, 1)

    def binding_quantization(self, binding: dict):
        if binding.get("dq") is None:
            return None
        return self._node_quant(self.graph.node[binding["dq"]], self.values(binding["ref"]).ndim)

    def set_binding_quantization(self, binding: dict, scales, zeros, dim: int) -> None:
        dq = self.graph.node[binding["dq"]]
        scales = np.asarray(scales, np.float32).reshape(-1)
        old_scale = self.values(dq.input[1])
        if scales.size == old_scale.size:  # same length: the file's shape (0-D per tensor)
            scales = scales.reshape(old_scale.shape)
        self._const(dq, 1, scales, dq.input[1])
        if len(dq.input) > 2 and dq.input[2]:
            old_zero = self.values(dq.input[2])
            self._const(dq, 2, np.asarray(zeros, old_zero.dtype).reshape(scales.shape), dq.input[2])
        if scales.size > 1:
            kept = [a for a in dq.attribute if a.name != "axis"]
            del dq.attribute[:]
            dq.attribute.extend([*kept, helper.make_attribute("axis", dim)])

    # ---- the classifier's activations (QDQ) ---------------------------------------------------
    def _producer(self, name: str):
        return next((n for n in self.graph.node if name in n.output), None)

    def _readers(self, name: str) -> list:
        return [n for n in self.graph.node if name in n.input]

    def _output_quantize(self, layer: dict):
        """The int8 QuantizeLinear right after the layer (after a MatMul's bias Add), or None."""
        out = self.graph.node[layer["op"]].output[0]
        after = self._readers(out)
        if len(after) == 1 and after[0].op_type == "Add":
            after = self._readers(after[0].output[0])
        if len(after) != 1 or after[0].op_type != "QuantizeLinear" or len(after[0].input) < 3 \
                or not after[0].input[2] or self.values(after[0].input[2]).dtype != np.int8:
            return None
        return after[0]

    def activations(self, layer: dict):
        """(input quantization, output quantization) of an int8 layer, or None when either is not."""
        x = self._producer(self.graph.node[layer["op"]].input[0])
        q = self._output_quantize(layer)
        if x is None or x.op_type != "DequantizeLinear" or q is None:
            return None
        return self._node_quant(x), self._node_quant(q)

    def output_name(self, layer: dict) -> str:
        return self._output_quantize(layer).input[1]  # the scale rewritten

    def set_output_quantization(self, layer: dict, scale: float, zero: int) -> None:
        q = self._output_quantize(layer)
        for node in [q, *(n for n in self._readers(q.output[0]) if n.op_type == "DequantizeLinear")]:
            shape = self.values(node.input[1]).shape
            self._const(node, 1, np.full(shape, scale, np.float32), node.input[1])
            self._const(node, 2, np.full(shape, zero, np.int8), node.input[2])

    def layer_inputs(self, layer: dict, samples: tuple) -> np.ndarray:
        """The real values entering the layer on each sample (onnxruntime, no graph optimizations)."""
        import onnxruntime as ort

        xs, input_quant = samples
        name = self.graph.node[layer["op"]].input[0]
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        spec = sess.get_inputs()[0]
        out = []
        for x in xs:
            x = np.asarray(x)
            if x.dtype.kind in "iu" and input_quant:
                x = (x.astype(np.float32) - input_quant[1]) * np.float32(input_quant[0])
            out.append(sess.run([name], {spec.name: x.astype(np.float32).reshape(
                [d if isinstance(d, int) else 1 for d in spec.shape])})[0])
        return np.stack(out).astype(np.float64)
