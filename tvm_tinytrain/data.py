"""Data sets for a device: an ``.npz`` with ``x`` (and ``y``) checked against the model it trains.

``x`` stacks the samples along its first axis, each in the model file's own layout: for an input
of shape ``(1, 8, 8, 1)`` it is ``(N, 8, 8, 1)`` (``(N, 1, 8, 8, 1)`` is read too). ``y`` holds one
integer class per sample for a ``cross_entropy`` model, a target shaped like the output for an
``mse`` model, and is left out for an autoencoder (an ``mse`` model trained on its own input).
Float data for an int8 model is quantized with the model's input scale and zero point
(``metadata["input_quant"]``, TFLite's rounding: :func:`tvm_tinytrain.quantize.quantized`).

Everything that would make a step wrong is refused before a sample is sent, one line each
(:class:`InputError` naming the file and the way out).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .quantize import quantized


@dataclass
class Dataset:
    """Samples ready for a device: ``x[i]`` one sample in the input's dtype, ``y[i]`` its label
    or target (``y`` None: an autoencoder's own input)."""

    x: np.ndarray
    y: np.ndarray | None
    name: str = "data"

    def __len__(self) -> int:
        return len(self.x)


def load_data(path: str | Path, metadata: dict, name: str | None = None) -> Dataset:
    """Read ``path`` (an ``.npz`` with ``x`` and maybe ``y``) and check it against ``metadata``
    (an artifact's metadata.json: input, output, loss, input_quant)."""
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(f"{name} {why}; name an .npz file with x (and y)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{name} is not a readable .npz file ({err}); save it with "
                         "numpy.savez(path, x=..., y=...)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"{name} is a single array, not an .npz; save it with "
                         "numpy.savez(path, x=..., y=...)")
    with archive:
        if "x" not in archive.files:
            raise InputError(f"{name} has no array x (it holds {', '.join(archive.files) or 'nothing'}); "
                             "save it with numpy.savez(path, x=..., y=...)")
        try:
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise InputError(f"{name} is not a readable .npz file ({err}); save it with "
                             "numpy.savez(path, x=..., y=...)") from None
    return dataset(x, y, metadata, name)


def dataset(x, y, metadata: dict, name: str = "data") -> Dataset:
    """``x`` (and ``y``) checked against ``metadata`` as :func:`load_data` checks a file's."""
    x = _samples(np.asarray(x), metadata, name)
    if y is None:
        _check_own_input(metadata, name)
        return Dataset(x, None, name)
    y = np.asarray(y)
    if y.ndim == 0 or len(y) != len(x):
        held = f"{len(y)} entries" if y.ndim else "a single value"
        raise InputError(f"{name}: y holds {held} and x {len(x)} samples; give one y per sample")
    if metadata["loss"] == "cross_entropy":
        return Dataset(x, _labels(y, metadata, name), name)
    return Dataset(x, _targets(y, metadata, name), name)


def _samples(x: np.ndarray, metadata: dict, name: str) -> np.ndarray:
    spec = metadata["input"]
    shape = tuple(spec["shape"])
    sample = shape[1:] if len(shape) > 1 and shape[0] == 1 else shape
    if x.ndim == 0 or x.shape[1:] not in (sample, shape):
        raise InputError(f"{name}: x has shape {x.shape}; the model takes samples of shape {sample} "
                         f"(x of shape (N, {', '.join(map(str, sample))}), in the model file's own layout)")
    if len(x) == 0:
        raise InputError(f"{name} holds no samples (x has shape {x.shape}); give at least one")
    if x.dtype.kind not in "biuf":
        raise InputError(f"{name}: x has dtype {x.dtype}, which cannot become the model's {spec['dtype']}; "
                         "save numbers (float32, or int8 for an int8 model)")
    if x.dtype.kind == "f":
        _check_finite(x, "x", name)
    dtype = np.dtype(spec["dtype"])
    if dtype.kind in "iu":
        if x.dtype.kind == "f":
            x = _quantize(x, metadata.get("input_quant"), dtype, name)
        info = np.iinfo(dtype)
        if int(x.min()) < info.min or int(x.max()) > info.max:
            raise InputError(f"{name}: x values {x.min()}..{x.max()} do not fit the model's {dtype} "
                             f"({info.min}..{info.max}); save float data to have it quantized")
    return np.ascontiguousarray(x.reshape((len(x), *shape)), dtype)


def _quantize(x: np.ndarray, quant, dtype: np.dtype, name: str) -> np.ndarray:
    """TFLite's quantization of float data with the model's input (scale, zero point)."""
    if quant is None:
        raise InputError(f"{name}: x is {x.dtype} data and the model takes {dtype} without an input "
                         "scale; save the model's integer input")
    return quantized(x, quant, dtype)


def _check_finite(a: np.ndarray, what: str, name: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        first = int(np.argwhere(bad)[0][0])
        raise InputError(f"{name}: {what} holds {int(bad.sum())} inf/NaN values (first in sample {first}); "
                         "clean or drop those samples")


def _labels(y: np.ndarray, metadata: dict, name: str) -> np.ndarray:
    classes = int(metadata["output"]["shape"][-1])
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise InputError(f"{name}: y has shape {y.shape}; a cross_entropy model takes one integer class "
                         f"per sample (shape ({len(y)},))")
    y = y.reshape(-1)
    if y.dtype.kind == "f":
        _check_finite(y, "y", name)
        if not np.all(y == np.round(y)):
            raise InputError(f"{name}: y holds fractional values; labels are integer class indices "
                             f"0..{classes - 1}")
    elif y.dtype.kind not in "biu":
        raise InputError(f"{name}: y has dtype {y.dtype}; labels are integer class indices 0..{classes - 1}")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= classes)
    if bad.any():
        first = int(np.argmax(bad))
        raise InputError(f"{name}: label {y[first]} (sample {first}) is out of range: the model has "
                         f"{classes} classes, 0..{classes - 1}")
    return y.astype(np.dtype(metadata["label"]["dtype"]))


def _targets(y: np.ndarray, metadata: dict, name: str) -> np.ndarray:
    shape = tuple(metadata["output"]["shape"])
    sample = shape[1:] if len(shape) > 1 and shape[0] == 1 else shape
    if y.shape[1:] not in (sample, shape):
        raise InputError(f"{name}: y has shape {y.shape}; the model's targets are shaped {sample} per sample")
    if y.dtype.kind not in "biuf":
        raise InputError(f"{name}: y has dtype {y.dtype}; targets are numbers")
    if y.dtype.kind == "f":
        _check_finite(y, "y", name)
    return np.ascontiguousarray(y.reshape((len(y), *shape)), np.float32)


def _check_own_input(metadata: dict, name: str) -> None:
    if metadata["loss"] != "mse":
        raise InputError(f"{name} has no y; a {metadata['loss']} model needs one label per sample "
                         "(save it with numpy.savez(path, x=..., y=...))")
    if int(np.prod(metadata["output"]["shape"])) != int(np.prod(metadata["input"]["shape"])):
        raise InputError(f"{name} has no y, and the model's output {tuple(metadata['output']['shape'])} "
                         f"is not shaped like its input {tuple(metadata['input']['shape'])}: give targets y")
