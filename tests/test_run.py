"""``tinytrain run``'s library side: data files checked against the model (tvm_tinytrain.data), and
the run's bookkeeping (schedule, saves, Ctrl-C, evaluation) against a scripted device.

The end-to-end runs on the host program and QEMU are in test_micro_cli.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

import tvm_tinytrain as tt
from tvm_tinytrain import data as tdata
from tvm_tinytrain import micro, zoo
from tvm_tinytrain.cli import main
from tvm_tinytrain.errors import InputError
from tvm_tinytrain.run import RunResult, run

CLASSES = 4
SHAPE = [1, 1, 8, 8]


def metadata(loss="cross_entropy", dtype="float32", quant=None, out_shape=(1, CLASSES)) -> dict:
    label = {"name": "label", "shape": [1], "dtype": "int64"} if loss == "cross_entropy" else \
        {"name": "target", "shape": list(out_shape), "dtype": "float32"}
    return {"loss": loss, "input": {"name": "input", "shape": SHAPE, "dtype": dtype}, "input_quant": quant,
            "label": label, "output": {"name": "out", "shape": list(out_shape), "dtype": "float32"}}


# ---- data files ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A host project of a 4-class 8x8 CNN (not built: bad data is refused before the device starts)."""
    root = tmp_path_factory.mktemp("run")
    onnx.save(zoo.small_cnn(num_classes=CLASSES, input_hw=(8, 8), width=4), root / "m.onnx")
    mod, params = tt.load_model(root / "m.onnx")
    train_mod = tt.relay.transform.TinyTrain(scheme="last-layer", optimizer=tt.SGD(lr=0.1))(mod)
    artifact = tt.build(train_mod, params, target="c")
    return micro.create_project(artifact, "host", root / "proj").path


def good(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 8, 8)).astype(np.float32), rng.integers(0, CLASSES, n)


def write(tmp_path, name="d.npz", **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def bad_files(tmp_path):
    x, y = good()
    (tmp_path / "text.npz").write_text("not a zip")
    np.save(tmp_path / "single.npy", x)
    nan = x.copy()
    nan[2, 0, 3, 3] = np.nan
    return [
        (tmp_path / "missing.npz", ["missing.npz", "does not exist"]),
        (tmp_path / "text.npz", ["text.npz", "not a readable .npz"]),
        (tmp_path / "single.npy", ["single.npy", "single array"]),
        (write(tmp_path, "nox.npz", data=x, y=y), ["no array x", "data"]),
        (write(tmp_path, "empty.npz", x=x[:0], y=y[:0]), ["no samples"]),
        (write(tmp_path, "shape.npz", x=x.reshape(6, 8, 8, 1), y=y), ["(6, 8, 8, 1)", "(1, 8, 8)"]),
        (write(tmp_path, "strings.npz", x=np.full((6, 1, 8, 8), "a"), y=y), ["dtype <U1"]),
        (write(tmp_path, "nan.npz", x=nan, y=y), ["1 inf/NaN", "sample 2"]),
        (write(tmp_path, "noy.npz", x=x), ["no y", "cross_entropy"]),
        (write(tmp_path, "short.npz", x=x, y=y[:4]), ["y holds 4", "x 6 samples"]),
        (write(tmp_path, "range.npz", x=x, y=np.array([0, 1, 2, 3, 4, 0])), ["label 4", "sample 4", "0..3"]),
        (write(tmp_path, "neg.npz", x=x, y=np.array([0, -1, 2, 3, 1, 0])), ["label -1", "sample 1"]),
        (write(tmp_path, "frac.npz", x=x, y=y + 0.5), ["fractional", "0..3"]),
        (write(tmp_path, "onehot.npz", x=x, y=np.eye(CLASSES)[y]), ["(6, 4)", "one integer class"]),
    ]


def test_bad_data_is_one_line_each_before_the_device_starts(project, tmp_path, capsys):
    """Every refusal names the file and the problem, exit 2, one line; the project is never built,
    so reaching the device would fail differently."""
    x, y = good()
    ok = write(tmp_path, "ok.npz", x=x, y=y)
    for path, words in bad_files(tmp_path):
        for argv in (["--data", path], ["--data", ok, "--eval", path]):
            code = main(["run", str(project), *map(str, argv)])
            out, err = capsys.readouterr()
            assert code == 2 and out == "", (path, err)
            assert err.startswith("tinytrain: error: ") and err.count("\n") == 1, err
            assert path.name in err and all(w in err for w in words), (path.name, err)
    assert not (project / "build").exists()


def test_good_data_in_either_stacked_layout(tmp_path):
    x, y = good()
    for stacked in (x, x[:, None]):  # (N, 1, 8, 8) and (N, 1, 1, 8, 8) for a (1, 1, 8, 8) input
        d = tdata.load_data(write(tmp_path, x=stacked, y=y), metadata())
        assert d.x.shape == (6, 1, 1, 8, 8) and d.x.dtype == np.float32 and len(d) == 6
        np.testing.assert_array_equal(d.x.reshape(x.shape), x)
        np.testing.assert_array_equal(d.y, y) and d.y.dtype == np.int64
    d = tdata.load_data(write(tmp_path, x=x.astype(np.float64), y=y.astype(np.float32)), metadata())
    assert d.x.dtype == np.float32 and d.y.dtype == np.int64


def test_float_data_for_an_int8_model_is_quantized_as_quantize_input(tmp_path):
    """The reference: ``tt.quantize_input`` of the imported int8 model (its own input scale)."""
    path = tmp_path / "q.onnx"
    onnx.save(zoo.quantize_qdq(zoo.small_cnn(num_classes=CLASSES, input_hw=(8, 8), width=4)), path)
    mod, _ = tt.load_model(path)
    scale, zero = tt.quantize.input_quantization(mod)
    meta = metadata(dtype="int8", quant=[scale, zero])
    x, y = good(20)
    x *= 3  # some values clip
    d = tdata.load_data(write(tmp_path, x=x, y=y), meta)
    assert d.x.dtype == np.int8
    np.testing.assert_array_equal(d.x.reshape(x.shape), tt.quantize_input(mod, x))
    q = tt.quantize_input(mod, x)
    np.testing.assert_array_equal(tdata.load_data(write(tmp_path, x=q, y=y), meta).x.reshape(x.shape), q)
    wide = np.linspace(-300, 299, 6 * 64).round().astype(np.int32).reshape(6, 1, 8, 8)
    with pytest.raises(InputError, match=r"x values -300..299 do not fit the model's int8"):
        tdata.dataset(wide, y[:6], meta)


def test_autoencoder_data_without_y(tmp_path):
    ae = metadata("mse", out_shape=(1, 1, 8, 8))
    x, _ = good()
    d = tdata.load_data(write(tmp_path, x=x), ae)
    assert d.y is None and len(d) == 6
    with pytest.raises(InputError, match="not shaped like its input"):
        tdata.load_data(write(tmp_path, x=x), metadata("mse", out_shape=(1, 3)))
    targets = tdata.dataset(x, x * 2, ae)
    np.testing.assert_array_equal(targets.y.reshape(x.shape), x * 2)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(InputError, match="y holds 1 inf/NaN"):
        tdata.dataset(x, bad, ae)


# ---- the run against a scripted device ------------------------------------------------------------
class ScriptedDevice:
    """A device whose loss is the step number and whose prediction is right for samples with
    x[0,0,0,0] > 0 after training (wrong for all before); records rates, steps and saves."""

    cost_unit = "instructions"

    def __init__(self, log, on_step=None):
        self.log, self.on_step = log, on_step
        self.rate, self.steps, self.last_cost = 0.5, 0, None
        self.boot = SimpleNamespace(source="slot 1", sequence=7, message="continuing from save #7")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.log.append(("closed",))

    @property
    def learning_rate(self):
        return self.rate

    @learning_rate.setter
    def learning_rate(self, value):
        self.rate = float(value)

    def train_step(self, x, y=None):
        self.steps += 1
        self.last_cost = 1000.0 + self.steps
        self.log.append(("step", int(x.reshape(-1)[1]), self.rate))
        if self.on_step:
            self.on_step(self.steps)
        return float(self.steps)

    def predict(self, x):
        right = int(x.reshape(-1)[2]) if self.steps else (int(x.reshape(-1)[2]) + 1) % CLASSES
        return np.eye(CLASSES, dtype=np.float32)[right][None]

    def anomaly_score(self, x):
        return 1.0 / (1 + self.steps)

    def save(self):
        self.log.append(("save", self.steps, self.rate))
        return 7 + sum(1 for e in self.log if e[0] == "save")


class ScriptedProject(micro.Project):
    def __init__(self, path, device):
        super().__init__(path, {}, {})
        self.device = device

    def session(self, serial_port=None, timeout=30.0):
        self.log_args = (serial_port, timeout)
        return self.device


def scripted(tmp_path, loss="cross_entropy", on_step=None):
    (tmp_path / "model").mkdir(exist_ok=True)
    out = (1, CLASSES) if loss == "cross_entropy" else (1, 1, 8, 8)
    (tmp_path / "model" / "metadata.json").write_text(json.dumps(metadata(loss, out_shape=out)))
    log = []
    return ScriptedProject(tmp_path, ScriptedDevice(log, on_step)), log


def numbered(n):
    """Samples whose element 1 is their index and element 2 their label."""
    x = np.zeros((n, 1, 8, 8), np.float32)
    x.reshape(n, -1)[:, 1] = np.arange(n)
    y = np.arange(n) % CLASSES
    x.reshape(n, -1)[:, 2] = y
    return x, y


def test_epochs_saves_losses_and_costs(tmp_path):
    project, log = scripted(tmp_path)
    seen = []
    result = run(project, numbered(5), numbered(8), epochs=3, seed=3, timeout=7.0, log=seen.append)
    assert isinstance(result, RunResult) and project.log_args == (None, 7.0)
    steps = [e for e in log if e[0] == "step"]
    for epoch in range(3):  # each epoch visits every sample once, in a seeded shuffled order
        assert sorted(s[1] for s in steps[5 * epoch:5 * epoch + 5]) == list(range(5))
    assert [s[1] for s in steps] != list(range(5)) * 3
    (tmp_path / "b").mkdir()
    again, _ = scripted(tmp_path / "b")
    run(again, numbered(5), epochs=3, seed=3)
    assert [e[1] for e in again.device.log if e[0] == "step"] == [s[1] for s in steps]
    assert [e[1] for e in log if e[0] == "save"] == [5, 10, 15]  # default: every epoch
    assert result.mean_loss == [3.0, 8.0, 13.0] and result.epochs == 3 and result.steps == 15
    assert result.cost_per_step == 1008.0 and result.cost_unit == "instructions"
    assert result.accuracy_before == 0.0 and result.accuracy_after == 1.0 and result.eval_samples == 8
    assert result.saves == 3 and result.last_save == 10
    assert result.boot == {"source": "slot 1", "sequence": 7, "message": "continuing from save #7"}
    assert seen[0] == "device: continuing from save #7"
    assert any("epoch 2/3: mean loss 8.0000" in line for line in seen)
    d = result.as_dict()
    assert {"accuracy_before", "accuracy_after", "epochs", "steps", "mean_loss", "cost_per_step", "cost_unit",
            "boot", "saves"} <= set(d) and "mse_before" not in d
    json.dumps(d)


def test_save_every_and_cosine_schedule(tmp_path):
    project, log = scripted(tmp_path)
    run(project, numbered(5), epochs=2, lr=0.2, lr_schedule="cosine", save_every=3)
    rates = [e[2] for e in log if e[0] == "step"]
    expected = [0.5 * 0.2 * (1 + math.cos(math.pi * i / 10)) for i in range(10)]
    np.testing.assert_allclose(rates, expected, rtol=1e-12)
    saves = [e for e in log if e[0] == "save"]
    assert [s[1] for s in saves] == [3, 6, 9, 10]  # every 3 steps, and what is left at the end
    assert all(s[2] == 0.2 for s in saves)  # a save keeps the starting rate, not the decayed one
    project, log = scripted(tmp_path)
    run(project, numbered(4), epochs=1, lr_schedule="cosine")  # from the device's own rate
    assert [e[2] for e in log if e[0] == "step"][0] == 0.5


def test_epochs_zero_only_evaluates(tmp_path):
    project, log = scripted(tmp_path)
    result = run(project, numbered(6), epochs=0)
    assert not [e for e in log if e[0] in ("step", "save")]
    assert result.accuracy_before == result.accuracy_after == 0.0 and result.eval_samples == 6
    assert result.steps == 0 and result.mean_loss == [] and result.cost_per_step is None


def test_mse_reports_the_mean_anomaly_score(tmp_path):
    project, _ = scripted(tmp_path, loss="mse")
    x, _ = numbered(4)
    result = run(project, (x, None), (x, None), epochs=1)
    assert result.mse_before == 1.0 and result.mse_after == pytest.approx(1 / 5)
    assert "accuracy_before" not in result.as_dict() and result.as_dict()["mse_after"] == pytest.approx(0.2)


def test_ctrl_c_stops_after_the_current_step_and_saves(tmp_path):
    def interrupt(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    project, log = scripted(tmp_path, on_step=interrupt)
    result = run(project, numbered(5), numbered(4), epochs=3)
    assert result.interrupted and result.steps == 7 and result.epochs == 1
    assert [e[1] for e in log if e[0] == "save"] == [5, 7]
    assert result.mean_loss == [3.0, 6.5] and result.accuracy_after is None
    assert signal.getsignal(signal.SIGINT) is before


def test_bad_settings_are_refused_before_the_device_starts(tmp_path):
    project, log = scripted(tmp_path)
    for kwargs, words in (({"epochs": -1}, "epochs must be an integer >= 0"),
                          ({"save_every": 0}, "save_every must be an integer >= 1"),
                          ({"lr": float("nan")}, "finite"), ({"lr": 0}, "> 0"),
                          ({"lr_schedule": "step"}, "unknown learning-rate schedule")):
        with pytest.raises(InputError, match=words):
            run(project, numbered(4), **kwargs)
    assert log == []
