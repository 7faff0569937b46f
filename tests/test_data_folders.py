"""Data folders (one sub-folder of images per class) read by ``tvm_tinytrain.data.load_data`` for the
model's input layout and dtype, against images decoded, resized and quantized here; the one-line
refusals; ``model_metadata`` against a built artifact's metadata; ``tinytrain run --data FOLDER``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import require_tools
from PIL import Image

import tvm_tinytrain as tt
from tvm_tinytrain import data as tdata
from tvm_tinytrain import micro, zoo
from tvm_tinytrain.cli import main
from tvm_tinytrain.data import load_data, model_metadata
from tvm_tinytrain.errors import InputError

CLASSES = ["zebra", "ant", "cat"]  # written in this order; labels follow the sorted names
SORTED = sorted(CLASSES)
PER_CLASS = 4
SIZE = (12, 10)  # the images' (width, height)
SCALE, ZERO = 0.0039215, -100  # an int8 input's quantization: pixels over 0.89 clip at 127


def metadata(shape, dtype="float32", quant=None, loss="cross_entropy", outputs=3, **extra) -> dict:
    """What an artifact's metadata.json says of a model with input ``shape``."""
    return {"loss": loss, "input": {"name": "input", "shape": list(shape), "dtype": dtype},
            "input_quant": quant, "label": {"name": "label", "shape": [1], "dtype": "int64"},
            "output": {"name": "out", "shape": [1, outputs], "dtype": "float32"}, **extra}


def image(rng, mode: str) -> Image.Image:
    pixels = rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def write_folder(root: Path, seed: int = 0) -> Path:
    """CLASSES × PER_CLASS images of mixed modes and suffixes, plus files and folders to skip."""
    rng = np.random.default_rng(seed)
    modes, suffixes = ["RGB", "L", "RGBA", "P"], [".png", ".PNG", ".png", ".bmp"]
    for c in CLASSES:
        folder = root / c
        folder.mkdir(parents=True)
        for k in range(PER_CLASS):
            image(rng, modes[k]).save(folder / f"{c}_{PER_CLASS - k}{suffixes[k]}")
        (folder / ".DS_Store").write_bytes(b"\0\1 not an image")
        (folder / "README").write_text("not an image")
        (folder / "._hidden.png").write_bytes(b"an AppleDouble file, not an image")
    (root / ".cache").mkdir()
    image(rng, "RGB").save(root / ".cache" / "x.png")  # a hidden folder is no class
    (root / "notes.txt").write_text("a file beside the class folders")
    return root


def reference(root: Path, mode: str, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(float64 images (N, H, W, C) in [0, 1], labels): each file decoded, converted, resized here."""
    xs, ys = [], []
    for label, c in enumerate(SORTED):
        for f in sorted((root / c).glob(f"{c}_*")):
            with Image.open(f) as im:
                pixels = np.asarray(im.convert(mode).resize(hw[::-1], Image.BILINEAR), np.float64) / 255
            xs.append(pixels.reshape(*hw, -1))
            ys.append(label)
    return np.stack(xs), np.array(ys)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folders") / "train")


# ---- reading ---------------------------------------------------------------------------------
def test_nhwc_float_model_reads_rgb(folder):
    d = load_data(folder, metadata((1, 6, 5, 3)))
    ref, labels = reference(folder, "RGB", (6, 5))
    assert d.classes == SORTED and len(d) == len(CLASSES) * PER_CLASS
    assert d.x.shape == (12, 1, 6, 5, 3) and d.x.dtype == np.float32
    np.testing.assert_allclose(d.x[:, 0], ref, atol=1e-6)
    np.testing.assert_array_equal(d.y, labels)
    assert d.y.dtype == np.int64 and list(d.y) == [0] * 4 + [1] * 4 + [2] * 4
    gray = d.x[6, 0]  # ant_3.PNG (the third of ant, sorted by name) was saved as L: three equal channels
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])


def test_nchw_float_model_reads_grayscale_and_rgb(folder):
    d = load_data(folder, metadata((1, 1, 6, 5)))
    ref, _ = reference(folder, "L", (6, 5))
    assert d.x.shape == (12, 1, 1, 6, 5)
    np.testing.assert_allclose(d.x[:, 0, 0], ref[..., 0], atol=1e-6)
    rgb = load_data(folder, metadata((1, 3, 6, 5))).x
    np.testing.assert_array_equal(rgb, load_data(folder, metadata((1, 6, 5, 3))).x.transpose(0, 1, 4, 2, 3))


def test_int8_model_gets_the_input_quantization(folder):
    d = load_data(folder, metadata((1, 7, 9, 3), "int8", [SCALE, ZERO]))
    ref, labels = reference(folder, "RGB", (7, 9))
    q = np.clip(np.round(ref / SCALE) + ZERO, -128, 127)
    assert d.x.dtype == np.int8 and d.x.shape == (12, 1, 7, 9, 3)
    np.testing.assert_array_equal(d.x[:, 0].astype(np.int64), q.astype(np.int64))
    np.testing.assert_array_equal(d.y, labels)
    assert d.x.max() == 127 and d.x.min() < -80  # some pixels clipped, the range is used


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """An 8-bit image k and its 16-bit copy 257·k (PNG, PGM) read alike (within the 8-bit resize's
    rounding), in both channel counts; Pillow's own conversion to L would make the copies white."""
    pixels = np.random.default_rng(3).integers(0, 256, (SIZE[1], SIZE[0]), dtype=np.uint8)
    for suffix in (".png", ".pgm"):
        (tmp_path / suffix[1:]).mkdir()
        Image.fromarray(pixels).save(tmp_path / suffix[1:] / f"8{suffix}")
        Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / suffix[1:] / f"16{suffix}")
        assert Image.open(tmp_path / suffix[1:] / f"16{suffix}").mode.startswith("I")
    for shape in ((1, 6, 5, 1), (1, 6, 5, 3)):
        x = load_data(tmp_path, metadata(shape)).x[:, 0]
        assert x.shape == (4, 6, 5, shape[-1]) and x.max() < 1
        for eight, sixteen in ((x[1], x[0]), (x[3], x[2])):  # "16..." sorts before "8..."
            np.testing.assert_allclose(sixteen, eight, atol=1.5 / 255)


def test_ambiguous_layout(folder):
    """(1, 3, 3, 3): NHWC (TFLite's) unless the metadata says NCHW or the file was ONNX."""
    nhwc = load_data(folder, metadata((1, 3, 3, 3))).x
    np.testing.assert_allclose(nhwc[:, 0], reference(folder, "RGB", (3, 3))[0], atol=1e-6)
    for extra in ({"layout": "NCHW"}, {"source": {"format": "onnx"}}):
        np.testing.assert_array_equal(load_data(folder, metadata((1, 3, 3, 3), **extra)).x,
                                      nhwc.transpose(0, 1, 4, 2, 3))
    assert np.array_equal(load_data(folder, metadata((1, 3, 3, 3), source={"format": "tflite"})).x, nhwc)


def test_progress_bar_only_for_large_folders(folder, capsys, monkeypatch):
    load_data(folder, metadata((1, 6, 5, 3)))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(tdata, "PROGRESS_OVER", 11)
    load_data(folder, metadata((1, 6, 5, 3)))
    assert f"reading {folder}" in capsys.readouterr().err


# ---- refusals --------------------------------------------------------------------------------
def bad_folders(tmp: Path, folder: Path) -> list[tuple[Path, dict, list[str]]]:
    flat = tmp / "flat"
    flat.mkdir()
    image(np.random.default_rng(1), "RGB").save(flat / "a.png")
    empty = tmp / "empty"
    (empty / "ant").mkdir(parents=True)
    image(np.random.default_rng(1), "RGB").save(empty / "ant" / "a.png")
    (empty / "bee").mkdir()
    (empty / "bee" / "README").write_text("no images here")
    broken = tmp / "broken"
    (broken / "ant").mkdir(parents=True)
    image(np.random.default_rng(1), "RGB").save(broken / "ant" / "a.png")
    (broken / "ant" / "b.jpg").write_bytes(b"\xff\xd8 a truncated jpeg")
    rgb = metadata((1, 6, 5, 3))
    return [
        (flat, rgb, ["no class sub-folders", "a sub-folder of its own"]),
        (empty, rgb, ["class folder bee holds no images", "add some or remove the folder"]),
        (broken, rgb, [f"cannot read image {broken / 'ant' / 'b.jpg'}", "fix or remove"]),
        (folder, metadata((1, 6, 5, 3), loss="mse"), ["loss is mse", "give an .npz"]),
        (folder, metadata((1, 6, 5, 3), outputs=2), ["3 class folders", "2 outputs", "remove 1"]),
        (folder, metadata((1, 6, 5, 4)), ["neither 1", "nor 3", "give an .npz"]),
        (folder, metadata((1, 6, 5, 4), layout="NHWC"), ["4 channels", "1 (grayscale) or 3 (RGB)"]),
        (folder, metadata((1, 30)), ["(1, 30)", "not an image"]),
        (tmp / "missing", rgb, ["does not exist", "a folder of one sub-folder of images per class"]),
    ]


def test_bad_folders_are_one_line_each(folder, tmp_path):
    for path, meta, words in bad_folders(tmp_path, folder):
        with pytest.raises(InputError) as err:
            load_data(path, meta)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and all(w in message for w in words), message


# ---- a model's metadata, and tinytrain run -----------------------------------------------------
@pytest.fixture(scope="module")
def float_model(tmp_path_factory) -> tuple[Path, dict]:
    """A 3-class RGB 8x8 CNN from an ONNX file: its path and its C artifact (last layer learns)."""
    root = tmp_path_factory.mktemp("model")
    onnx.save(zoo.small_cnn(num_classes=3, input_hw=(8, 8), in_channels=3, width=4), root / "m.onnx")
    mod, params = tt.load_model(root / "m.onnx")
    train_mod = tt.relay.transform.TinyTrain(scheme="last-layer", optimizer=tt.SGD(lr=0.1))(mod)
    return root / "m.onnx", tt.build(train_mod, params, target="c", model=root / "m.onnx")


def agree(ours: dict, artifact_metadata: dict) -> None:
    built = json.loads(json.dumps(artifact_metadata, default=str))
    assert ours["loss"] == built["loss"] and ours["input_quant"] == built["input_quant"]
    for key in ("input", "output", "label"):
        assert {k: ours[key][k] for k in ("shape", "dtype", "bytes")} == \
            {k: built[key][k] for k in ("shape", "dtype", "bytes")}, key


def test_model_metadata_agrees_with_the_artifact(float_model, folder):
    path, artifact = float_model
    mod, _ = tt.load_model(path)
    ours = model_metadata(mod)
    agree(ours, artifact.metadata)
    assert ours["layout"] == "NCHW" and ours["input"]["shape"] == [1, 3, 8, 8]
    assert model_metadata(mod, "mse")["label"] == {**ours["output"], "name": "label"}
    np.testing.assert_array_equal(load_data(folder, ours).x, load_data(folder, artifact.metadata).x)


def test_model_metadata_reads_a_tflite_files_layout(tmp_path):
    """A TFLite file's NHWC input is found from the graph, also where its shape cannot tell."""
    from tvm_tinytrain.demo import float_cnn
    from tvm_tinytrain.ptq import quantize_tflite

    onnx.save(float_cnn(width=4), tmp_path / "f.onnx")
    mod, params = tt.load_model(tmp_path / "f.onnx")
    quantize_tflite(mod, np.random.default_rng(0).uniform(0, 1, (8, 1, 8, 8)), tmp_path / "q.tflite", params)
    for dequantize in (False, True):
        meta = model_metadata(tt.load_model(tmp_path / "q.tflite", dequantize=dequantize)[0])
        assert meta["layout"] == "NHWC" and meta["input"]["shape"] == [1, 8, 8, 1]
        assert meta["input"]["dtype"] == ("float32" if dequantize else "int8")
        assert (meta["input_quant"] is None) == dequantize
    assert model_metadata(mod)["layout"] == "NCHW"


@pytest.mark.slow
def test_model_metadata_of_an_int8_model_agrees_with_its_artifact(tmp_path):
    """The int8 file's input dtype and quantization (its C build takes ~20 s)."""
    from tvm_tinytrain.demo import float_cnn
    from tvm_tinytrain.ptq import quantize_tflite

    onnx.save(float_cnn(width=4), tmp_path / "f.onnx")
    mod, params = tt.load_model(tmp_path / "f.onnx")
    quantize_tflite(mod, np.random.default_rng(0).uniform(0, 1, (8, 1, 8, 8)), tmp_path / "q.tflite", params)
    qmod, qparams = tt.load_model(tmp_path / "q.tflite")
    train_mod = tt.relay.transform.TinyTrain(scheme="last-layer", optimizer=tt.SGD(lr=0.1))(qmod)
    ours = model_metadata(qmod)
    agree(ours, tt.build(train_mod, qparams, target="c").metadata)
    assert ours["input"]["dtype"] == "int8" and ours["input_quant"][1] == -128


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tinytrain_run_on_a_folder(float_model, folder, tmp_path, capsys):
    """The folder trains the host program as the same images saved as an .npz do; a bad folder is
    exit 2, one line, before the device starts."""
    require_tools("cc", "make")
    _, artifact = float_model
    proj = micro.create_project(artifact, "host", tmp_path / "proj").path
    for bad in (tmp_path / "missing", folder / "ant"):
        code, out, err = cli(capsys, "run", proj, "--data", bad)
        assert code == 2 and out == "" and err.count("\n") == 1 and str(bad) in err, err
    assert cli(capsys, "micro", "build", proj)[0] == 0
    ref, labels = reference(folder, "RGB", (8, 8))
    np.savez(tmp_path / "same.npz", x=ref.transpose(0, 3, 1, 2).astype(np.float32), y=labels)
    scores = []
    for data in (folder, tmp_path / "same.npz"):
        code, out, err = cli(capsys, "run", proj, "--data", data, "--epochs", "0", "--json")
        assert code == 0, err
        scores.append(json.loads(out))
    assert scores[0]["accuracy_before"] == scores[1]["accuracy_before"] and scores[0]["eval_samples"] == 12
    code, out, err = cli(capsys, "run", proj, "--data", folder, "--epochs", "1", "--json")
    assert code == 0 and json.loads(out)["steps"] == 12, err
