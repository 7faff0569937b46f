"""Data sets for a device: an ``.npz`` with ``x`` (and ``y``), or a folder of images, checked
against the model it trains.

``x`` stacks the samples along its first axis, each in the model file's own layout: for an input
of shape ``(1, 8, 8, 1)`` it is ``(N, 8, 8, 1)`` (``(N, 1, 8, 8, 1)`` is read too). ``y`` holds one
integer class per sample for a ``cross_entropy`` model, a target shaped like the output for an
``mse`` model, and is left out for an autoencoder (an ``mse`` model trained on its own input).
Float data for an int8 model is quantized with the model's input scale and zero point
(``metadata["input_quant"]``, TFLite's rounding: :func:`tvm_tinytrain.quantize.quantized`).

A folder holds one sub-folder of images per class (``train/cat/1.jpg``, ``train/dog/7.png``): the
classes are the sub-folder names sorted (sub-folder ``i`` is label ``i``), the images the files
with an image suffix (:data:`IMAGE_SUFFIXES`, any case) sorted by name; hidden files and folders
and other files are skipped. Each image is turned upright by its EXIF orientation, converted to
grayscale or RGB after the model's channel count, resized to the model's height and width
(bilinear) and scaled to float in [0, 1], then checked (and quantized) as float ``x`` is.

Everything that would make a step wrong is refused before a sample is sent, one line each
(:class:`InputError` naming the file and the way out).
"""

from __future__ import annotations

import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import InputError, SchemeError
from .quantize import quantized

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm"})
PROGRESS_OVER = 2000  # a folder of more images than this shows a progress bar (stderr)
_NPZ_HOW = "save it with numpy.savez(path, x=..., y=...)"


@dataclass
class Dataset:
    """Samples ready for a device: ``x[i]`` one sample in the input's dtype, ``y[i]`` its label
    or target (``y`` None: an autoencoder's own input); ``classes[k]`` the name of label ``k``
    (an image folder's sub-folder names; None for arrays)."""

    x: np.ndarray
    y: np.ndarray | None
    name: str = "data"
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.x)


def load_data(path: str | Path, metadata: dict, name: str | None = None) -> Dataset:
    """Read ``path`` (an ``.npz`` with ``x`` and maybe ``y``, or a folder of one sub-folder of
    images per class) and check it against ``metadata`` (an artifact's metadata.json, or
    :func:`model_metadata`: input, output, label, loss, input_quant)."""
    path = Path(path)
    name = name or str(path)
    if path.is_dir():
        return _load_folder(path, metadata, name)
    if not path.is_file():
        raise InputError(f"{name} does not exist; name an .npz file with x (and y), or a folder of one "
                         "sub-folder of images per class")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{name} is not a readable .npz file ({err}); {_NPZ_HOW}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"{name} is a single array, not an .npz; {_NPZ_HOW}")
    with archive:
        if "x" not in archive.files:
            raise InputError(f"{name} has no array x (it holds {', '.join(archive.files) or 'nothing'}); "
                             f"{_NPZ_HOW}")
        try:
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise InputError(f"{name} is not a readable .npz file ({err}); {_NPZ_HOW}") from None
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
                         f"({_NPZ_HOW})")
    if int(np.prod(metadata["output"]["shape"])) != int(np.prod(metadata["input"]["shape"])):
        raise InputError(f"{name} has no y, and the model's output {tuple(metadata['output']['shape'])} "
                         f"is not shaped like its input {tuple(metadata['input']['shape'])}: give targets y")


# ---- image folders ---------------------------------------------------------------------------
def _load_folder(path: Path, metadata: dict, name: str) -> Dataset:
    if metadata["loss"] != "cross_entropy":
        raise InputError(f"{name} is a folder of images, which gives class labels, and the model's loss is "
                         f"{metadata['loss']}; give an .npz with x and y (targets) instead")
    channels_last, (height, width, channels) = _image_layout(metadata, name)
    classes = _class_folders(path, name)
    outputs = int(metadata["output"]["shape"][-1])
    if len(classes) > outputs:
        raise InputError(f"{name} has {len(classes)} class folders and the model {outputs} outputs; "
                         f"remove {len(classes) - outputs} of the folders or train a model with "
                         f"{len(classes)} outputs")
    files = [(label, f) for label, (_, images) in enumerate(classes) for f in images]
    dtype = np.dtype(metadata["input"]["dtype"])
    quant = metadata.get("input_quant")
    x = np.empty((len(files), *(tuple(metadata["input"]["shape"])[1:])), dtype)
    from tqdm import tqdm

    mode = "RGB" if channels == 3 else "L"
    for i, (_, file) in enumerate(tqdm(files, desc=f"reading {name}", unit="image", file=sys.stderr,
                                       leave=False, disable=len(files) <= PROGRESS_OVER)):
        image = _read_image(file, mode, (width, height), name)
        image = image if channels_last else image.transpose(2, 0, 1)
        x[i] = _quantize(image, quant, dtype, name) if dtype.kind in "iu" else image
    y = np.array([label for label, _ in files], np.int64)
    return replace(dataset(x, y, metadata, name), classes=[c for c, _ in classes])


def _image_layout(metadata: dict, name: str) -> tuple[bool, tuple[int, int, int]]:
    """(channels last?, (height, width, channels)) of the model's input, for an image folder.

    The layout is ``metadata["layout"]`` when given (:func:`model_metadata` reads it off the
    graph); otherwise the channel axis is the one of axes 1 and 3 that holds 1 or 3. When both do
    (an input of shape (1, 3, 3, 3)), the model file's format decides (``metadata["source"]``: a
    TFLite file is NHWC, an ONNX file NCHW); without one, NHWC (TFLite's, the format of most
    pre-trained microcontroller models)."""
    shape = tuple(int(d) for d in metadata["input"]["shape"])
    if len(shape) != 4 or shape[0] != 1:
        raise InputError(f"{name} is a folder of images and the model's input has shape {shape}, not an "
                         "image (1, H, W, C) or (1, C, H, W); give an .npz with x and y instead")
    layout = metadata.get("layout")
    if layout is None:
        axes = [a for a in (3, 1) if shape[a] in (1, 3)]
        if not axes:
            raise InputError(f"{name} is a folder of images and the model's input {shape} has neither 1 "
                             "(grayscale) nor 3 (RGB) channels on axis 1 (NCHW) or 3 (NHWC); give an .npz "
                             "with x and y instead")
        fmt = (metadata.get("source") or {}).get("format")
        layout = "NCHW" if axes == [1] or (len(axes) == 2 and fmt == "onnx") else "NHWC"
    height, width, channels = shape[1:] if layout == "NHWC" else (shape[2], shape[3], shape[1])
    if channels not in (1, 3):
        raise InputError(f"{name} is a folder of images and the model's {layout} input {shape} has "
                         f"{channels} channels; images give 1 (grayscale) or 3 (RGB): give an .npz with x "
                         "and y instead")
    return layout == "NHWC", (height, width, channels)


def _class_folders(path: Path, name: str) -> list[tuple[str, list[Path]]]:
    """[(class name, its image files)], both sorted by name; hidden entries skipped."""
    try:
        folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise InputError(f"cannot read the folder {name} ({err.strerror}); check its permissions") from None
    if not folders:
        raise InputError(f"{name} has no class sub-folders; put each class's images in a sub-folder of "
                         f"its own ({Path(name) / 'cat' / '1.png'}, ...)")
    classes = []
    for folder in folders:
        try:
            images = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
                            and not f.name.startswith(".") and f.is_file())
        except OSError as err:
            raise InputError(f"cannot read the class folder {Path(name) / folder.name} ({err.strerror}); "
                             "check its permissions") from None
        if not images:
            raise InputError(f"{name}: class folder {folder.name} holds no images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))}); add some or remove the folder")
        classes.append((folder.name, images))
    return classes


def _read_image(file: Path, mode: str, size: tuple[int, int], name: str) -> np.ndarray:
    """``file`` upright, in ``mode`` (L or RGB), resized to ``size`` (width, height) bilinearly, as
    float32 in [0, 1] of shape (height, width, channels). A 16-bit grayscale image (PNG, PGM: Pillow's
    modes I;16 and I) is scaled from 0..65535, not clipped at 255 as Pillow's conversion to L would."""
    from PIL import Image, ImageOps

    try:
        with Image.open(file) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):
                image = Image.fromarray(np.asarray(image, np.float32) / np.float32(65535))  # mode F
                pixels = np.asarray(image.resize(size, Image.Resampling.BILINEAR), np.float32)[..., None]
                return np.repeat(pixels, 3 if mode == "RGB" else 1, axis=2)
            image = image.convert(mode).resize(size, Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise InputError(f"{name}: cannot read image {file} ({err}); fix or remove the file") from None
    pixels = np.asarray(image, np.float32) / np.float32(255)
    return pixels.reshape(size[1], size[0], -1)


# ---- a model's metadata, before it has an artifact ---------------------------------------------
def model_metadata(mod, loss: str = "cross_entropy") -> dict:
    """What :func:`load_data` checks data against, for a model as ``load_model`` returns it (an
    IRModule with ``main``; one ``TinyTrain`` returned, with ``predict``, too): the keys input,
    output, label, loss and input_quant of an artifact's metadata, and ``layout`` (the input's
    "NHWC" or "NCHW", read off the graph; None for an input that is not an image)."""
    from .layers import backbone
    from .quantize import input_quantization

    if loss not in ("cross_entropy", "mse"):
        raise SchemeError(f"unknown loss {loss!r}; choose cross_entropy or mse")
    func = backbone(mod)
    x = func.params[0]

    def info(ty, **name) -> dict:
        shape = [int(d) for d in ty.shape]
        return {**name, "shape": shape, "dtype": str(ty.dtype),
                "bytes": int(np.prod(shape)) * np.dtype(str(ty.dtype)).itemsize}

    output = info(func.ret_ty)
    if loss == "cross_entropy":  # one integer class per sample (relay_passes.append_loss)
        batch = output["shape"][0]
        label = {"name": "label", "shape": [batch], "dtype": "int64", "bytes": 8 * batch}
    else:
        label = {**output, "name": "label"}
    quant = input_quantization(mod)
    return {"loss": loss, "input": info(x.ty, name=x.name), "output": output, "label": label,
            "input_quant": None if quant is None else list(quant), "layout": _input_layout(func)}


def _input_layout(func) -> str | None:
    """"NHWC" when the backbone's first layout change permutes its input to NCHW (a TFLite file's
    image), "NCHW" for another 4-D input, None otherwise."""
    from tvm import relax

    x = func.params[0]
    if len(x.ty.shape) != 4:
        return None
    current = x
    for binding in func.body.blocks[0].bindings:
        value = binding.value
        if not isinstance(value, relax.Call) or not value.args or not value.args[0].same_as(current):
            continue
        op = getattr(value.op, "name", "")
        if op == "relax.astype":
            current = binding.var
        elif op == "relax.permute_dims":
            return "NHWC" if [int(a) for a in value.attrs.axes] == [0, 3, 1, 2] else "NCHW"
        else:
            break
    return "NCHW"
