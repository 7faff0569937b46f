"""What the device learned, written back into the model file it was compiled from.

``export_project(PROJECT, "tuned.tflite")`` reads the trainable parameters off the device (or takes
them as ``params=``), and writes a copy of the original file (kept in the project at compile time,
``model/source.tflite`` / ``.onnx``, see ``source_map``) with every layer that learned rewritten:

1. each parameter goes back to its tensor (``metadata["source"]["layers"]``) in the file's layout
   (TFLite OHWI / depthwise 1HWC, ONNX OIHW, a Gemm / MatMul weight as the file stores it); a weight
   trained on its first k output channels is that slice written into the whole tensor;
2. int8 weights and int32 biases are written as the device holds them; a layer given ``2^k`` weight
   headroom keeps the device's smaller integers and gets its weight and bias scales times ``2^k``;
3. a float32 parameter whose tensor in the file is int8 / int32 (an int8 model's float classifier,
   a model trained as its ``--dequantize`` float twin, a weight-only int8 file) is requantized per
   output channel: ``s = max|w| / 127`` (symmetric), ``q = round(w / s)``, the bias
   ``round(b / (s_x · s))`` at scale ``s_x · s``; the scales are rewritten (``tflite_patch``
   grows a per-tensor vector to one per channel); a float file stays float;
4. the classifier's int8 output range (calibrated on the old logits) is set again: from the
   learned logits on ``samples=`` when given (the eval set; LiteRT / onnxruntime compute the
   features), else the file's range widened by a bound that never clips but is coarser;
5. a float ONNX layer whose BatchNormalization was folded at import is written folded, the
   BatchNormalization made an Identity; a float Conv / Gemm without a bias gets the one trained;
6. everything else (other tensors, operators, metadata, signature defs) is the source's bytes
   (TFLite) or the source's protobuf fields (ONNX), and the file is written whole or not at all.

A model trained as the float twin of an int8 file (``--dequantize``) is written back into the int8
file, every layer it trained requantized per channel as in 3 (its activations keep the file's
ranges, which the twin clipped to): the int8 file approximates what was trained, as it did before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, TinyTrainError
from .files import check_file, replacing_file
from .source_map import LAYOUTS, dequantized, folded, from_param, to_param

INT32 = (-(2 ** 31), 2 ** 31 - 1)


@dataclass
class ExportReport:
    path: Path
    format: str  # "tflite" or "onnx"
    tensors: list[str]  # the file's tensors (TFLite) / initializers (ONNX) written
    notes: list[str] = field(default_factory=list)  # requantized layers, output range, folded norms

    def summary(self) -> str:
        layers = f"{len(self.tensors)} tensor{'s' if len(self.tensors) != 1 else ''}"
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"{self.path}: the original {self.format} model with {layers} learned on the device{extra}"

    def __str__(self) -> str:
        return self.summary()


def export_project(project_dir: str | Path, output: str | Path, serial_port: str | None = None,
                   timeout: float = 30.0, *, params: dict[str, np.ndarray] | None = None,
                   samples=None) -> ExportReport:
    """Write the model file of ``project_dir`` with the parameters the device learned to ``output``.

    ``params`` (name → array, as ``Session.params()`` or ``HostTrainer.params()`` return them) skips
    the device. ``output`` ends in ``.tflite`` for a TFLite source, ``.onnx`` for an ONNX one.
    ``samples`` (inputs as the device takes them, e.g. the eval set) calibrate the int8 output range
    of a requantized classifier on its learned logits; without them the range is the file's widened
    by a bound that never clips (coarser)."""
    folder, meta = _model_folder(project_dir)
    source = meta.get("source")
    if not source:
        raise InputError(f"{project_dir} was compiled without a copy of its model file (before "
                         f"tinytrain kept one): compile the model again and make the project again")
    fmt = source["format"]
    if Path(str(output)).suffix.lower() != f".{fmt}":
        raise InputError(f"{output}: the model was a .{fmt} file, so the export is one: name the output "
                         f"*.{fmt}")
    check_file(output)
    try:
        data = (folder / source["file"]).read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {folder / source['file']} ({err.strerror}): make the project again") \
            from None
    if hashlib.sha256(data).hexdigest() != source["sha256"]:
        raise InputError(f"{folder / source['file']} is not the model the project was compiled from "
                         "(sha256 differs): make the project again")
    if params is None:
        params = _device_params(project_dir, serial_port, timeout)
    learned = _learned(meta, params)
    layers = [layer for layer in source["layers"] if _written(layer, learned)]
    for layer in layers:
        if layer.get("error"):
            raise InputError(f"{layer['weight'] or layer['bias']} cannot be written into "
                             f"{source['name']}: {layer['error']}")
    if fmt == "tflite":
        from .tflite_patch import TfliteFile as File
    else:
        from .onnx_patch import OnnxFile as File
    f = File(data)
    f.notes = []
    last = max(layer["index"] for layer in source["layers"])
    calibration = None if samples is None else (_checked_samples(samples, meta), meta.get("input_quant"))
    tensors = _write(f, layers, learned, last, calibration)
    with replacing_file(output) as tmp:
        tmp.write_bytes(f.to_bytes())
    return ExportReport(Path(output), fmt, tensors, f.notes)


def _checked_samples(samples, meta: dict) -> np.ndarray:
    """Calibration samples as the model takes them (its input's shape and dtype), or an InputError."""
    from .trainer import checked_sample

    spec = meta["input"]
    xs = np.asarray(samples)
    size = int(np.prod(spec["shape"]))
    if xs.size == 0 or xs.size % size:
        raise InputError(f"samples has shape {list(xs.shape)}; it takes n samples of {spec['shape']} "
                         f"({spec['dtype']}), as the device does")
    xs = checked_sample(xs.reshape(-1, *spec["shape"]), spec["dtype"])
    return xs.reshape(-1, *spec["shape"])


def _model_folder(project_dir: str | Path) -> tuple[Path, dict]:
    """The folder holding ``metadata.json`` (a project's ``model/``, or an artifact folder)."""
    path = Path(project_dir)
    for folder in (path / "model", path):
        if (folder / "metadata.json").is_file():
            try:
                return folder, json.loads((folder / "metadata.json").read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise InputError(f"cannot read {folder / 'metadata.json'} ({err}); make the project again") \
                    from None
    why = "does not exist" if not path.exists() else "is not a tinytrain project (no model/metadata.json)"
    raise InputError(f"{path} {why}; make one with tinytrain micro create-project")


def _device_params(project_dir, serial_port, timeout) -> dict[str, np.ndarray]:
    """The trainable parameters the device holds now (one session)."""
    from .micro import open_project

    with open_project(project_dir).session(serial_port=serial_port, timeout=timeout) as dev:
        return dev.params()


def _learned(meta: dict, values: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, int | None]]:
    """Each trainable tensor's learned values: name → (array, k) where k is the number of leading
    output channels learned (None: the whole tensor). Refuses missing names and inf / NaN."""
    splits = {str(k): int(v) for k, v in (meta.get("splits") or {}).items()}
    out = {}
    for spec in meta["trainable"]:
        name = spec["name"]
        base = next((w for w, k in splits.items() if name == f"{w}[:{k}]"), None)
        if name in values:
            value = np.asarray(values[name])
            key, k = (base, splits[base]) if base else (name, None)
        elif base is not None and base in values:  # HostTrainer.params(): the whole weight
            value, key, k = np.asarray(values[base]), base, None
        else:
            raise InputError(f"params lacks {name}: pass the device's (dev.params()) or the host "
                             f"trainer's (trainer.params()) parameters")
        expect = list(spec["shape"]) if k is not None or base is None else None
        if expect is not None and list(value.shape) != expect:
            raise InputError(f"{name} has shape {list(value.shape)}; the project's model has {expect}")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise InputError(f"{name} holds inf/NaN values: training diverged; lower the learning rate, "
                             f"reset the parameters (tinytrain micro reset-params) and train again")
        out[key] = (value, k)
    return out


def _written(layer: dict, learned: dict) -> bool:
    """A layer that learned, or one whose integers the device holds smaller (weight headroom)."""
    if layer["weight"] in learned or layer["bias"] in learned:
        return True
    return bool(not layer.get("error") and (layer.get("w") or {}).get("headroom"))


def _values(binding: dict, name: str | None, learned: dict, stored: np.ndarray, quant) -> np.ndarray:
    """A parameter's whole values as the device holds them (imported layout and type)."""
    layout = binding["layout"]
    if binding["mode"] == "requantize":
        base = to_param(dequantized(stored, quant, layout), layout)
    elif binding["mode"] == "int" and binding.get("headroom"):
        base = np.round(to_param(stored, layout).astype(np.float64) / 2 ** binding["headroom"])
    else:
        base = folded(to_param(stored, layout), binding)
    if name not in learned:
        return base
    value, k = learned[name]
    if k is None:
        return value.reshape(base.shape)
    whole = np.array(base, dtype=np.result_type(base.dtype, value.dtype))
    whole[:k] = value
    return whole


def requantize(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along ``axis``: (int8 values, scales = max|w| / 127)."""
    moved = np.moveaxis(np.asarray(w, np.float64), axis, 0)
    peak = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = scales.size
    q = np.clip(np.round(np.asarray(w, np.float64) / scales.reshape(shape).astype(np.float64)), -127, 127)
    return q.astype(np.int8), scales


def quantized_bias(b: np.ndarray, input_scale: float, w_scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias at ``s_x · s_w`` per channel, as converters write it: (values, scales)."""
    scales = (np.float32(input_scale) * np.asarray(w_scales, np.float32)).astype(np.float32)
    scales = np.broadcast_to(scales, np.shape(b)).astype(np.float32)
    q = np.clip(np.round(np.asarray(b, np.float64) / scales.astype(np.float64)), *INT32)
    return q.astype(np.int32), scales


def range_quantization(lo: float, hi: float) -> tuple[float, int]:
    """int8 (scale, zero point) of the range ``[lo, hi]`` widened to hold 0, as converters write it."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    return scale, int(np.clip(np.round(-128 - lo / scale), -128, 127))


def classifier_output(y_quant, old: dict, new: dict, x_peak: float, features: np.ndarray | None):
    """The int8 output quantization of a requantized classifier, so its learned logits are not
    clipped at ±127 (``old`` / ``new``: its weight ``w`` and bias ``b``, real values); None to keep
    the file's.

    - with ``features`` (the layer's real inputs on calibration samples): the range of the new
      logits on them;
    - without: the file's range ``[s(−128 − z), s(127 − z)]`` (calibrated on the old logits) grown on
      both sides by the most the change can move a logit, ``max_c(Σ|Δw_c|·x_peak + |Δb_c|)``,
      where ``x_peak`` is the largest |input| the layer's int8 input holds: never clipped, coarser."""
    w, b = np.asarray(new["w"], np.float64), np.asarray(new["b"], np.float64)
    if features is not None:
        logits = features.reshape(len(features), -1) @ w.T + b
        return range_quantization(logits.min(), logits.max())
    move = np.abs(w - old["w"]).sum(axis=1) * x_peak + np.abs(b - old["b"])
    if float(move.max(initial=0.0)) <= 0:
        return None
    scale, zero = float(y_quant[0][0]), int(y_quant[1][0])
    return range_quantization(scale * (-128 - zero) - move.max(), scale * (127 - zero) + move.max())


def _channel_scales(quant, channels: int) -> np.ndarray:
    scale = np.asarray(quant[0], np.float64).reshape(-1)
    return np.broadcast_to(scale, (channels,)).copy()


# ---- writing ---------------------------------------------------------------------------------------
def _write(f, layers: list[dict], learned: dict, last: int, samples) -> list[str]:
    """Write ``layers`` into ``f`` (a ``tflite_patch.TfliteFile`` or ``onnx_patch.OnnxFile``);
    the names of the tensors written. ``notes`` of what was requantized go to ``f.notes``."""
    written, classifier = [], None
    for layer in layers:
        wb, bb = layer["w"], layer.get("b")
        w_stored, w_quant = f.values(wb["ref"]), f.binding_quantization(wb)
        weight = _values(wb, layer["weight"], learned, w_stored, w_quant)
        w_scales = None if w_quant is None else _channel_scales(w_quant, weight.shape[0])
        old = {"w": _values(wb, None, learned, w_stored, w_quant), "b": 0.0}
        try:
            if wb["mode"] == "requantize":
                axis = LAYOUTS[wb["layout"]][1]
                q, w_scales = requantize(from_param(weight, wb["layout"]), axis)
                f.set_values(wb["ref"], q)
                f.set_binding_quantization(wb, w_scales, np.zeros(w_scales.size), axis)
                f.notes.append(f"layer {layer['index']} requantized to int8 per channel")
            else:
                f.set_values(wb["ref"], from_param(weight, wb["layout"]))
                if wb.get("headroom"):
                    w_scales = w_scales * 2 ** wb["headroom"]
                    f.set_binding_quantization(wb, w_quant[0] * 2 ** wb["headroom"], w_quant[1], w_quant[2])
            written.append(f.name(wb["ref"]))
            new = {"w": to_param(dequantized(f.values(wb["ref"]), f.binding_quantization(wb), wb["layout"]),
                                 wb["layout"]) if wb["mode"] == "requantize" else weight, "b": 0.0}
            if bb is not None and bb["ref"] is None:  # a bias the file lacks
                bb["ref"] = f.add_bias(bb["create"], bb["name"], weight.shape[0])
            if bb is not None:
                b_stored, b_quant = f.values(bb["ref"]), f.binding_quantization(bb)
                bias = _values(bb, layer["bias"], learned, b_stored, b_quant)
                old["b"] = _values(bb, None, learned, b_stored, b_quant)
                if bb["mode"] == "requantize":
                    q, b_scales = quantized_bias(bias, layer["input_scale"], w_scales)
                    f.set_values(bb["ref"], q)
                    f.set_binding_quantization(bb, b_scales, np.zeros(b_scales.size), 0)
                    new["b"] = q * b_scales.astype(np.float64)
                else:
                    f.set_values(bb["ref"], bias)
                    new["b"] = bias
                    if bb.get("headroom"):
                        scales = b_quant[0] * 2 ** bb["headroom"]
                        f.set_binding_quantization(bb, scales, b_quant[1], b_quant[2])
                written.append(f.name(bb["ref"]))
            if wb.get("bn"):  # written folded: the BatchNormalization goes
                f.drop_batchnorm(wb["bn"]["node"])
                f.notes.append(f"layer {layer['index']}'s BatchNormalization folded into it")
        except TinyTrainError as err:
            raise InputError(f"layer {layer['index']} ({layer['weight']}): {err}") from None
        if layer["index"] == last and wb["mode"] == "requantize":
            classifier = (layer, old, new)
    if classifier is not None and _set_classifier_output(f, *classifier, samples):
        written.append(f.output_name(classifier[0]))
    return written


def _set_classifier_output(f, layer: dict, old: dict, new: dict, samples) -> bool:
    """A requantized classifier's int8 output quantization, from :func:`classifier_output`;
    whether it changed."""
    quant = f.activations(layer)
    if quant is None:  # a float output needs no range
        return False
    (sx, zx, _), y_quant = quant
    features = None if samples is None else f.layer_inputs(layer, samples)
    x_peak = float(sx[0]) * max(abs(-128 - int(zx[0])), abs(127 - int(zx[0])))
    widened = classifier_output(y_quant, old, new, x_peak, features)
    if widened is not None:
        f.set_output_quantization(layer, *widened)
        how = "on the samples" if features is not None else "by the bound (no samples)"
        f.notes.append(f"its int8 output range set {how} to {widened[0] * 255:.3g} wide")
    return widened is not None
