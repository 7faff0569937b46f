"""Which parameters learn: sparse-update schemes resolved against a model's layers.

A scheme is a preset name, a dict, or a path to a JSON file::

    {"bias": {"last": 22},
     "weights": {"21": 1.0, "24": 1.0, "36": 0.125, "39": 0.25},
     "classifier": true}

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
    """Any accepted form (preset, dict, path) → the dict form, not yet validated."""
    check_form(scheme)
    if isinstance(scheme, dict):
        return scheme
    if isinstance(scheme, str) and scheme.lstrip().startswith("{"):
        try:
            return json.loads(scheme)
        except json.JSONDecodeError as err:
            raise SchemeError(f"scheme {scheme!r} is not valid JSON: {err}")
    if isinstance(scheme, Path) or (isinstance(scheme, str) and scheme.endswith(".json")):
        path = Path(scheme)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise SchemeError(f"scheme file {path} does not exist")
        except json.JSONDecodeError as err:
            raise SchemeError(f"scheme file {path} is not valid JSON: {err}")
    return preset(scheme, num_layers)


def resolve(scheme, layers: list[Layer]) -> dict[str, int | None]:
    """Parameter name → channels to update (None = all), weights before biases per layer."""
    spec = load(scheme, len(layers))
    n = len(layers)
    unknown = set(spec) - KEYS
    if unknown:
        raise SchemeError(
            f"scheme has unknown key(s) {', '.join(sorted(unknown))}; keys: bias, weights, classifier"
        )
    bias = spec.get("bias", {}) or {}
    if not isinstance(bias, dict) or set(bias) - {"last"}:
        raise SchemeError('scheme "bias" must look like {"last": N}')
    last_bias = bias.get("last", 0)
    if not isinstance(last_bias, int) or not 0 <= last_bias <= n:
        raise SchemeError(f'scheme "bias": {{"last": {last_bias!r}}} must be an integer in 0..{n}')
    ratios: dict[int, float] = {}
    for key, ratio in (spec.get("weights", {}) or {}).items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise SchemeError(f'scheme "weights" key {key!r} is not a layer index')
        if not 0 <= index < n:
            raise SchemeError(f"scheme names layer {index}, but the model has layers 0..{n - 1}")
        if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise SchemeError(f"scheme ratio {ratio!r} for layer {index} must be in (0, 1]")
        ratios[index] = float(ratio)
    if spec.get("classifier", False):
        ratios[n - 1] = 1.0
    trainable: dict[str, int | None] = {}
    for layer in layers:
        if layer.index in ratios:
            channels = math.ceil(ratios[layer.index] * layer.out_channels - 1e-9)
            channels = rounded_channels(layer.weight_shape, layer.groups, channels)
            trainable[layer.weight] = None if channels >= layer.out_channels else channels
        wants_bias = layer.index >= n - last_bias or (spec.get("classifier") and layer.index == n - 1)
        if wants_bias and layer.bias:
            trainable[layer.bias] = None
    if not trainable:
        raise SchemeError("the scheme trains nothing: name some biases, weights or the classifier")
    return trainable
