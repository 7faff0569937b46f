"""Which parameters learn: sparse-update schemes resolved against a model's layers.

A scheme is a preset name, a dict, or a path to a JSON file::

    {"bias": {"last": 22},
     "weights": {"21": 1.0, "24": 1.0, "36": 0.125, "39": 0.25},
     "classifier": true}

A scheme file from ``tinytrain search`` also holds, under ``"search"``, what the search measured
(planned memory, gains); reading the scheme ignores it.

Layers are the conv and linear layers numbered from the input (``tinytrain
summary``). A weight ratio r updates the first ⌈r·C_out⌉ output channels.
Presets: ``full``, ``last-layer`` (the classifier), ``bias-only`` (every bias
and the classifier), ``last-k:N`` (weights and biases of the last N layers).

The result is the neutral mapping the passes take: parameter name → output
channels to update (None = all of them), in layer order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from relay_passes.sparse_update import rounded_channels

from .errors import SchemeError
from .layers import Layer

PRESETS = ("full", "last-layer", "bias-only", "last-k:N")
KEYS = {"bias", "weights", "classifier"}
NOTES = {"search"}  # what tinytrain search measured, kept in its scheme files and ignored here


def check_form(scheme) -> None:
    """Refuse what is no preset, dict, JSON string or .json path, before any model is seen."""
    if isinstance(scheme, (dict, Path)):
        return
    if not isinstance(scheme, str):
        raise SchemeError(
            f"scheme must be a preset name, a dict or a .json path, not {type(scheme).__name__}"
        )
    if scheme.endswith(".json") or scheme.lstrip().startswith("{") or scheme.startswith("last-k:"):
        return
    if scheme not in PRESETS:
        raise SchemeError(f"unknown scheme {scheme!r}; presets: {', '.join(PRESETS)}, a dict or a .json path")


def preset(name: str, num_layers: int) -> dict:
    """A preset as the dict form."""
    last = num_layers - 1
    if name == "full":
        return {"bias": {"last": num_layers}, "weights": {str(i): 1.0 for i in range(num_layers)},
                "classifier": True}
    if name == "last-layer":
        return {"classifier": True}
    if name == "bias-only":
        return {"bias": {"last": num_layers}, "classifier": True}
    if name.startswith("last-k:"):
        try:
            k = int(name.split(":", 1)[1])
        except ValueError:
            k = 0
        if not 1 <= k <= num_layers:
            raise SchemeError(f"scheme {name!r}: N must be an integer in 1..{num_layers} for this model")
        return {"bias": {"last": k}, "weights": {str(i): 1.0 for i in range(num_layers - k, last + 1)},
                "classifier": True}
    check_form(name)  # raises: no preset has this name
    raise AssertionError(f"preset {name!r} is in PRESETS but has no definition")


def load(scheme, num_layers: int) -> dict:
    """Any accepted form (preset, dict, path) → the dict form, not yet checked against the model."""
    check_form(scheme)
    if isinstance(scheme, dict):
        spec = scheme
    elif isinstance(scheme, str) and scheme.lstrip().startswith("{"):
        try:
            spec = json.loads(scheme)
        except json.JSONDecodeError as err:
            raise SchemeError(f"scheme {scheme!r} is not valid JSON: {err}")
    elif isinstance(scheme, Path) or (isinstance(scheme, str) and scheme.endswith(".json")):
        path = Path(scheme)
        try:
            spec = json.loads(path.read_text())
        except FileNotFoundError:
            raise SchemeError(f"scheme file {path} does not exist")
        except (OSError, UnicodeDecodeError) as err:
            raise SchemeError(f"cannot read scheme file {path}: {getattr(err, 'strerror', None) or err}")
        except json.JSONDecodeError as err:
            raise SchemeError(f"scheme file {path} is not valid JSON: {err}")
    else:
        return preset(scheme, num_layers)
    if not isinstance(spec, dict):
        raise SchemeError(f"a scheme must be a JSON object like {EXAMPLE}, not {_json_type(spec)}")
    return spec


EXAMPLE = '{"bias": {"last": 2}, "weights": {"3": 0.5}, "classifier": true}'


def _json_type(value) -> str:
    """What a JSON reader calls ``value``: object, array, string, number, true / false, null."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return f"{names.get(type(value), type(value).__name__)} ({json.dumps(value, default=repr)[:40]})"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _last_bias(spec: dict, n: int) -> int:
    """``"bias": {"last": N}`` → N (absent or null: 0)."""
    bias = spec.get("bias")
    if bias is None:
        return 0
    if not isinstance(bias, dict) or set(bias) - {"last"}:
        raise SchemeError(f'scheme "bias" must look like {{"last": N}}, not {_json_type(bias)}')
    last = bias.get("last", 0)
    if not isinstance(last, int) or isinstance(last, bool) or not 0 <= last <= n:
        raise SchemeError(f'scheme "bias": "last" is {_json_type(last)}; it must be an integer in 0..{n} '
                          f"(the number of layers, counted from the output, whose bias learns)")
    return last


def _ratios(spec: dict, layers: list[Layer]) -> dict[int, float]:
    """``"weights": {"INDEX": RATIO}`` → {index: ratio}, every key a layer and every ratio in (0, 1]."""
    weights = spec.get("weights")
    if weights is None:
        return {}
    n = len(layers)
    if not isinstance(weights, dict):
        raise SchemeError(f'scheme "weights" must be an object like {{"3": 0.5}} (layer index → ratio of '
                          f"output channels), not {_json_type(weights)}")
    ratios: dict[int, float] = {}
    for key, ratio in weights.items():
        text = str(key).strip()
        if isinstance(key, bool) or not (text.isdigit() or isinstance(key, int)):
            raise SchemeError(f'scheme "weights" key {key!r} is not a layer index (0..{n - 1})')
        index = int(key)
        if not 0 <= index < n:
            raise SchemeError(f'scheme "weights" names layer {index}, but the model has layers 0..{n - 1}')
        if index in ratios:
            raise SchemeError(f'scheme "weights" names layer {index} twice')
        if not _is_number(ratio) or not 0 < ratio <= 1:
            raise SchemeError(f'scheme "weights" ratio {_json_type(ratio)} for layer {index} must be a '
                              f"number in (0, 1]")
        out = layers[index].out_channels
        if math.ceil(ratio * out - 1e-9) < 1:
            raise SchemeError(f'scheme "weights" ratio {ratio!r} for layer {index} gives none of its {out} '
                              f"output channels; 1/{out} = {1 / out:.4g} trains one")
        ratios[index] = float(ratio)
    return ratios


def resolve(scheme, layers: list[Layer]) -> dict[str, int | None]:
    """Parameter name → channels to update (None = all), weights before biases per layer."""
    spec = load(scheme, len(layers))
    n = len(layers)
    unknown = {str(key) for key in spec} - KEYS - NOTES
    if unknown:
        raise SchemeError(
            f"scheme has unknown key(s) {', '.join(sorted(unknown))}; keys: bias, weights, classifier"
        )
    last_bias = _last_bias(spec, n)
    ratios = _ratios(spec, layers)
    classifier = spec.get("classifier", False)
    if classifier is None:
        classifier = False
    if not isinstance(classifier, bool):
        raise SchemeError(f'scheme "classifier" must be true or false, not {_json_type(classifier)}')
    if classifier:
        ratios[n - 1] = 1.0
    trainable: dict[str, int | None] = {}
    for layer in layers:
        if layer.index in ratios:
            channels = math.ceil(ratios[layer.index] * layer.out_channels - 1e-9)
            channels = rounded_channels(layer.weight_shape, layer.groups, channels)
            trainable[layer.weight] = None if channels >= layer.out_channels else channels
        wants_bias = layer.index >= n - last_bias or (classifier and layer.index == n - 1)
        if wants_bias and layer.bias:
            trainable[layer.bias] = None
    if not trainable:
        raise SchemeError("the scheme trains nothing: name some biases, weights or the classifier")
    return trainable
