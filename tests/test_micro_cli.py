"""The device verbs end to end through ``tvm_tinytrain.cli.main``: ``micro create-project /
list-templates / build / flash / reset-params``, ``run`` on the host program and on QEMU, and the bad
input each refuses (exit 2, one line, nothing half-written)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import require_tools
from onnx_ops import ort_session

import tvm_tinytrain as tt
from tvm_tinytrain import micro, zoo
from tvm_tinytrain.cli import main

CLASSES = 4


def cli(capsys, *argv) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit status, stdout, stderr); an error must be one line."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    if code == 2 and "usage:" not in err:
        assert err.startswith("tinytrain: error: ") and err.count("\n") == 1, err
    return code, out, err


def patterns(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An easy task: the class is the pattern of the 8x8 image (horizontal stripes, vertical
    stripes, fine or coarse checkerboard), under noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    i, j = np.mgrid[0:8, 0:8]
    shapes = [i % 2, j % 2, (i + j) % 2, (i // 4 + j // 4) % 2]
    x = rng.normal(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
    for k, c in enumerate(y):
        x[k, 0] += 2.0 * shapes[c]
    return x, y


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny 4-class CNN's artifact (last two layers learn) and train / test files of the task."""
    root = tmp_path_factory.mktemp("micro_cli")
    onnx.save(zoo.small_cnn(num_classes=CLASSES, input_hw=(8, 8), width=4), root / "m.onnx")
    mod, params = tt.load_model(root / "m.onnx")
    train_mod = tt.relay.transform.TinyTrain(scheme="last-k:2", optimizer=tt.SGD(lr=0.1))(mod)
    tt.build(train_mod, params, target="c", budget="64KB", model=root / "m.onnx").export(root / "model.tar")
    for name, (n, seed) in {"train": (120, 0), "test": (40, 1)}.items():
        x, y = patterns(n, seed)
        np.savez(root / f"{name}.npz", x=x, y=y)
    return root


# ---- help, templates -----------------------------------------------------------------------
@pytest.mark.parametrize("verb, words", [
    (["micro", "create-project"], ["PROJECT_DIR", "ARTIFACT", "TEMPLATE", "--board", "--option", "--force"]),
    (["micro", "list-templates"], ["--json", "options"]),
    (["micro", "build"], ["PROJECT_DIR"]),
    (["micro", "flash"], ["PROJECT_DIR", "--serial-port"]),
    (["micro", "reset-params"], ["PROJECT_DIR", "--serial-port", "--timeout", "compiled-in"]),
    (["run"], ["PROJECT_DIR", "--data", "--eval", "--epochs", "--lr", "--lr-schedule", "--save-every",
               "--serial-port", "--timeout", "--json", "--seed"]),
    (["export"], ["PROJECT_DIR", "--output", ".tflite", "--serial-port"]),
    (["micro"], ["create-project", "list-templates", "build", "flash", "reset-params"]),
])
def test_help_of_each_verb(capsys, verb, words):
    code, out, _ = cli(capsys, *verb, "--help")
    assert code == 0 and out.startswith(f"usage: tinytrain {' '.join(verb)}")
    for word in words:
        assert word in out, word


def test_the_old_create_project_is_gone(capsys):
    code, _, err = cli(capsys, "create-project", "model.tar", "--template", "host", "-o", "p")
    assert code == 2 and "invalid choice: 'create-project'" in err


def test_list_templates_shows_every_template_json(capsys):
    code, out, _ = cli(capsys, "micro", "list-templates", "--json")
    assert code == 0
    listed = {t["name"]: t for t in json.loads(out)}
    files = {p.parent.name: json.loads(p.read_text()) for p in micro.TEMPLATES.glob("*/template.json")}
    assert set(listed) == set(files) >= {"host", "qemu_cortex_m7"}
    for name, spec in files.items():
        assert listed[name]["description"] == spec["description"]
        assert listed[name]["boards"] == spec.get("boards", [])
        assert {k: (v["default"], v["help"]) for k, v in listed[name]["options"].items()} == \
            {k: (v["default"], v["help"]) for k, v in spec["options"].items()}
        assert all(v["help"] and v["default"] is not None for v in spec["options"].values()), name
    code, text, _ = cli(capsys, "micro", "list-templates")
    assert code == 0
    for name, spec in files.items():
        assert f"{name}: {spec['description']}" in text
        for key, option in spec["options"].items():
            assert re.search(rf"--option {key}=VALUE.*: {re.escape(option['help'])} "
                             rf"\(default {re.escape(option['default'])}\)", text), key
        if spec.get("boards"):
            assert f"boards (--board): {spec['boards'][0]} (default), {', '.join(spec['boards'][1:])}" in text


@pytest.mark.parametrize("template", ["host", "qemu_cortex_m7"])
def test_option_defaults_are_the_makefiles(template):
    """What list-templates calls the default is what make does without the option."""
    makefile = (micro.TEMPLATES / template / "Makefile").read_text()
    make_defaults = dict(re.findall(r"^(\w+) \?= (.*)$", makefile, re.M))
    spec = json.loads((micro.TEMPLATES / template / "template.json").read_text())
    for name, option in spec["options"].items():
        if option["variable"] in make_defaults:
            assert make_defaults[option["variable"]] == option["default"], name
        else:  # a flag the Makefile tests (ifeq ($(SANITIZE),1)): off unless given
            assert f"$({option['variable']})" in makefile and option["default"] == "0", name


# ---- create-project: bad input -------------------------------------------------------------
def test_create_project_bad_input_is_one_line_and_writes_nothing(work, tmp_path, capsys):
    tar = work / "model.tar"
    proj = tmp_path / "p"
    valid = ", ".join(micro.template_names())
    zephyr = micro.TEMPLATES / "zephyr" / "template.json"
    zephyr_boards = ", ".join(json.loads(zephyr.read_text())["boards"]) if zephyr.is_file() else None
    cases = [
        ((proj, tar, "arduino"), ["unknown template 'arduino'", valid]),
        ((proj, tar, "host", "--option", "ram_kb=4"), ["template host has no option ram_kb",
                                                       "opt, sanitize"]),
        ((proj, tar, "host", "--option", "sanitize=2"), ["sanitize=2", "one of 0, 1"]),
        ((proj, tar, "host", "--option", "sanitize"), ["--option 'sanitize' must read KEY=VALUE"]),
        ((proj, tar, "host", "--board", "nucleo_f746zg"), ["template host has no boards", "drop --board"]),
        ((proj, tmp_path / "missing.tar", "host"), ["missing.tar"]),
        ((proj, work / "train.npz", "host"), ["train.npz"]),
    ]
    if zephyr_boards:
        cases.append(((proj, tar, "zephyr", "--board", "uno"), ["no board 'uno'", zephyr_boards]))
    for argv, words in cases:
        code, out, err = cli(capsys, "micro", "create-project", *argv)
        assert code == 2 and out == "" and all(w in err for w in words), (argv, err)
        assert not proj.exists(), argv
    assert os.listdir(tmp_path) == []


def test_existing_folder_needs_force(work, tmp_path, capsys):
    tar = work / "model.tar"
    proj = tmp_path / "p"
    assert cli(capsys, "micro", "create-project", proj, tar, "host")[0] == 0
    (proj / "mine.txt").write_text("a file of the user's, inside the project")
    code, _, err = cli(capsys, "micro", "create-project", proj, tar, "qemu_cortex_m7")
    assert code == 2 and "already exists" in err and "--force" in err
    assert (proj / "mine.txt").is_file() and micro.open_project(proj).template_name == "host"
    code, out, _ = cli(capsys, "micro", "create-project", proj, tar, "qemu_cortex_m7", "--force",
                       "--option", "ram_kb=256", "stack_kb=8")
    assert code == 0 and "qemu_cortex_m7" in out and not (proj / "mine.txt").exists()
    project = micro.open_project(proj)
    assert (project.template_name, project.options, project.board) == \
        ("qemu_cortex_m7", {"ram_kb": "256", "stack_kb": "8"}, None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a project")
    code, _, err = cli(capsys, "micro", "create-project", other, tar, "host", "--force")
    assert code == 2 and "not a tinytrain project" in err and os.listdir(other) == ["notes.txt"]


def fake_template(root: Path, program: str, boards=None) -> Path:
    """A template whose build writes its arguments to build/prog and whose program is ``program``."""
    folder = root / "fake_template"
    folder.mkdir()
    spec = {"description": "a test template", "tools": {"sh": "a POSIX shell"},
            "options": {"speed": {"variable": "SPEED", "default": "1", "help": "how fast"}},
            "build": ["sh", "-c", 'mkdir -p build && echo "$*" > build/args && cp prog.py build/prog.py',
                      "sh", "{board}"],
            "binary": "build/prog.py", "run": [sys.executable, "{binary}"], "cost_unit": "ns"}
    if boards:
        spec["boards"] = boards
    (folder / "template.json").write_text(json.dumps(spec))
    (folder / "prog.py").write_text(program)
    return folder


def test_a_project_remembers_template_board_and_options(work, tmp_path, capsys):
    template = fake_template(tmp_path, "", boards=["alpha", "beta"])
    proj = tmp_path / "p"
    code, out, _ = cli(capsys, "micro", "create-project", proj, work / "model.tar", template,
                       "--board", "beta", "--option", "speed=3")
    assert code == 0 and "board beta" in out
    assert json.loads((proj / micro.PROJECT_MARKER).read_text()) == \
        {"template": "fake_template", "board": "beta", "options": {"speed": "3"}}
    assert cli(capsys, "micro", "build", proj)[0] == 0
    assert (proj / "build" / "args").read_text().split() == ["beta", "SPEED=3"]
    code, _, err = cli(capsys, "micro", "create-project", tmp_path / "q", work / "model.tar", template,
                       "--board", "gamma")
    assert code == 2 and "no board 'gamma'; choose one of alpha, beta" in err
    assert micro.create_project(work / "model.tar", template, tmp_path / "r").board == "alpha"  # the first


# ---- build, flash: bad input ---------------------------------------------------------------
def test_build_and_flash_need_a_project(work, tmp_path, capsys):
    for verb in ("build", "flash", "reset-params"):
        code, _, err = cli(capsys, "micro", verb, tmp_path / "nothing")
        assert code == 2 and "nothing does not exist" in err and "create-project" in err
    code, _, err = cli(capsys, "run", tmp_path, "--data", work / "train.npz")
    assert code == 2 and "is not a tinytrain project" in err
    proj = micro.create_project(work / "model.tar", "host", tmp_path / "p").path
    code, _, err = cli(capsys, "micro", "flash", proj)
    assert code == 2 and "build the project first" in err and f"tinytrain micro build {proj}" in err
    code, _, err = cli(capsys, "micro", "flash", proj, "--serial-port", "/dev/ttyNOPE9")
    assert code == 2 and "serial port /dev/ttyNOPE9 does not exist" in err


@pytest.mark.skipif(not (micro.TEMPLATES / "zephyr" / "template.json").is_file(), reason="no zephyr template")
def test_zephyr_build_without_west_says_what_to_install(work, tmp_path, capsys, monkeypatch):
    proj = tmp_path / "z"
    assert cli(capsys, "micro", "create-project", proj, work / "model.tar", "zephyr")[0] == 0
    assert micro.open_project(proj).board == "nucleo_f746zg"
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("ZEPHYR_BASE", raising=False)
    code, _, err = cli(capsys, "micro", "build", proj)
    assert code == 2 and "west" in err and "pip install west" in err and "ZEPHYR_BASE" in err
    assert not (proj / "build").exists()


# ---- end to end ----------------------------------------------------------------------------
def end_to_end(work, tmp_path, capsys, template: str) -> None:
    proj = tmp_path / template
    code, out, _ = cli(capsys, "micro", "create-project", proj, work / "model.tar", template)
    assert code == 0 and f"tinytrain micro build {proj}" in out
    code, out, err = cli(capsys, "micro", "build", proj)
    assert code == 0, err
    binary = micro.open_project(proj).binary
    assert out.strip() == f"built {binary}" and binary.is_file()
    code, out, _ = cli(capsys, "micro", "flash", proj)
    assert code == 0 and "is built" in out
    data = ("--data", work / "train.npz", "--eval", work / "test.npz")

    code, out, err = cli(capsys, "run", proj, *data, "--epochs", "3", "--lr", "0.2",
                         "--lr-schedule", "cosine", "--json")
    assert code == 0, err
    first = json.loads(out)
    assert {"accuracy_before", "accuracy_after", "epochs", "steps", "mean_loss", "cost_per_step", "cost_unit",
            "boot", "saves"} <= set(first)
    assert first["epochs"] == 3 and first["steps"] == 360 and len(first["mean_loss"]) == 3
    assert first["accuracy_after"] >= first["accuracy_before"] + 0.3 and first["accuracy_after"] >= 0.6, first
    assert first["mean_loss"][-1] < first["mean_loss"][0]
    unit = {"host": "ns", "qemu_cortex_m7": "instructions"}[template]
    assert first["cost_unit"] == unit and first["cost_per_step"] > 0
    assert "accuracy before" in err and "epoch 3/3" in err  # messages on stderr with --json
    assert first["boot"]["source"] == "compiled-in" and first["saves"] == 3

    code, out, err = cli(capsys, "run", proj, *data, "--epochs", "1", "--save-every", "50")
    assert code == 0, err
    assert "continuing from save" in out or "slot" in out, out  # the boot message, first
    before = float(re.search(r"accuracy before: ([\d.]+)%", out).group(1)) / 100
    assert before == pytest.approx(first["accuracy_after"], abs=1e-9)  # it continued
    assert re.search(r"cost per step: [\d,]+ " + unit, out) and "saved 3 time(s)" in out

    after = float(re.search(r"accuracy after: +([\d.]+)%", out).group(1)) / 100
    code, out, err = cli(capsys, "export", proj, "-o", tmp_path / "tuned.onnx")
    assert code == 0 and out.startswith(f"{tmp_path / 'tuned.onnx'}: the original onnx model"), err
    test = np.load(work / "test.npz")
    session = ort_session(tmp_path / "tuned.onnx")
    top1 = [int(np.argmax(session.run(None, {"input": x[None]})[0])) for x in test["x"]]
    assert np.mean(np.array(top1) == test["y"]) == pytest.approx(after, abs=1e-9)  # the device's weights
    code, _, err = cli(capsys, "export", proj, "-o", tmp_path / "tuned.tflite")
    assert code == 2 and "name the output *.onnx" in err and not (tmp_path / "tuned.tflite").exists()
    code, _, err = cli(capsys, "export", proj, "-o", tmp_path / "s.onnx", "--samples", work / "test.npz")
    assert code == 0, err  # the samples read as run reads data; a float classifier needs no range
    assert np.array_equal(onnx.load(tmp_path / "s.onnx").graph.initializer[0].raw_data,
                          onnx.load(tmp_path / "tuned.onnx").graph.initializer[0].raw_data)
    code, _, err = cli(capsys, "export", proj, "-o", tmp_path / "n.onnx", "--samples", tmp_path / "none.npz")
    assert code == 2 and "none.npz" in err and not (tmp_path / "n.onnx").exists()

    code, out, _ = cli(capsys, "micro", "reset-params", proj)
    assert code == 0 and "compiled-in" in out
    code, out, _ = cli(capsys, "run", proj, *data, "--epochs", "0", "--json")
    reset = json.loads(out)
    assert code == 0 and reset["steps"] == 0 and reset["boot"]["source"] == "compiled-in"
    assert reset["accuracy_before"] == reset["accuracy_after"] == first["accuracy_before"]


def test_every_verb_on_the_host_program(work, tmp_path, capsys):
    require_tools("cc", "make")
    end_to_end(work, tmp_path, capsys, "host")


def test_every_verb_on_qemu(work, tmp_path, capsys):
    require_tools("arm-none-eabi-gcc", "make", "qemu-system-arm")
    end_to_end(work, tmp_path, capsys, "qemu_cortex_m7")


# ---- a device that is not there or stops answering -----------------------------------------------
def test_a_device_that_stops_answering_is_named(work, tmp_path, capsys):
    template = fake_template(tmp_path, "import time\ntime.sleep(60)\n")
    proj = micro.create_project(work / "model.tar", template, tmp_path / "p").path
    assert cli(capsys, "micro", "build", proj)[0] == 0
    start = time.monotonic()
    code, _, err = cli(capsys, "run", proj, "--data", work / "train.npz", "--timeout", "1")
    assert time.monotonic() - start < 20
    assert code == 2 and re.search(r"did not answer .* within 1", err), err


def test_a_serial_port_that_does_not_exist(work, tmp_path, capsys):
    template = fake_template(tmp_path, "")
    proj = micro.create_project(work / "model.tar", template, tmp_path / "p").path
    assert cli(capsys, "micro", "build", proj)[0] == 0
    for verb in (("run", proj, "--data", work / "train.npz"), ("micro", "reset-params", proj)):
        code, _, err = cli(capsys, *verb, "--serial-port", "/dev/ttyNOPE9")
        assert code == 2 and "/dev/ttyNOPE9" in err, err


def test_ctrl_c_in_a_terminal_stops_after_the_step_and_saves(work, tmp_path):
    """A terminal's Ctrl-C reaches the whole foreground process group: tinytrain and its device program."""
    require_tools("cc", "make")
    proj = micro.create_project(work / "model.tar", "host", tmp_path / "p")
    proj.build()
    tinytrain = shutil.which("tinytrain") or str(Path(sys.executable).with_name("tinytrain"))
    proc = subprocess.Popen([tinytrain, "run", proj.path, "--data", work / "train.npz", "--epochs", "100000",
                             "--save-every", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 2/"):
                break
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    steps = int(re.search(r"interrupted after (\d+) steps; the device's parameters are saved", out).group(1))
    assert steps > 240 and "saved 1 time(s)" in out
    with proj.session() as dev:
        assert dev.boot.source != "compiled-in" and "continuing from" in dev.boot.message


def autoencoder(path: Path, features: int = 16, hidden: int = 4) -> None:
    """A dense autoencoder (Gemm, Relu, Gemm) with seeded weights, (1, features) in and out."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.3, (hidden, features)), "b1": np.zeros(hidden),
               "w2": rng.normal(0, 0.3, (features, hidden)), "b2": np.zeros(features)}
    nodes = [helper.make_node("Gemm", ["input", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["out"], transB=1)]
    graph = helper.make_graph(
        nodes, "ae", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, features])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, features])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def test_an_autoencoder_trains_on_its_own_input(tmp_path, capsys):
    """No y: the mse model reproduces its input; run reports the eval MSE (the mean anomaly score),
    which before training equals TVM's host trainer's on the same weights."""
    require_tools("cc", "make")
    autoencoder(tmp_path / "ae.onnx")
    mod, params = tt.load_model(tmp_path / "ae.onnx")
    train_mod = tt.relay.transform.TinyTrain(scheme="full", loss="mse", optimizer=tt.SGD(lr=0.05))(mod)
    tt.build(train_mod, params, target="c").export(tmp_path / "ae")
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(2, 16))
    x = (rng.normal(size=(80, 2)) @ basis).astype(np.float32)  # a plane in 16-D: learnable
    np.savez(tmp_path / "frames.npz", x=x)
    proj = tmp_path / "p"
    assert cli(capsys, "micro", "create-project", proj, tmp_path / "ae", "host")[0] == 0
    assert cli(capsys, "micro", "build", proj)[0] == 0
    frames = tmp_path / "frames.npz"
    code, out, err = cli(capsys, "run", proj, "--data", frames, "--eval", frames, "--epochs", "4", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert "accuracy_before" not in result and len(result["mean_loss"]) == 4 and result["steps"] == 320
    host = tt.build(train_mod, params)
    reference = np.mean([host.anomaly_score(s[None]) for s in x])
    assert result["mse_before"] == pytest.approx(reference, rel=1e-4)
    assert result["mse_after"] < 0.5 * result["mse_before"], result
    np.savez(tmp_path / "targets.npz", x=x, y=x)  # the same frames with explicit targets y = x
    code, out, err = cli(capsys, "run", proj, "--data", tmp_path / "targets.npz", "--epochs", "0", "--json")
    assert code == 0, err
    again = json.loads(out)  # continued from the save, scored against y instead of the input itself
    assert again["mse_before"] == again["mse_after"] == pytest.approx(result["mse_after"], rel=1e-6)


def test_float_data_for_an_int8_model_is_quantized_on_the_way(work, tmp_path, capsys):
    """An int8 model given float .npz data scores what it scores on ``tt.quantize_input`` of the same
    data saved as int8, and what onnxruntime's run of the QDQ file scores (within one sample: the
    device's classifier is float)."""
    require_tools("cc", "make")
    model = zoo.quantize_qdq(zoo.small_cnn(num_classes=CLASSES, input_hw=(8, 8), width=4),
                             calibration=patterns(32, 5)[0])
    onnx.save(model, tmp_path / "q.onnx")
    mod, params = tt.load_model(tmp_path / "q.onnx")
    train_mod = tt.relay.transform.TinyTrain(scheme="last-layer", optimizer=tt.SGD(lr=0.05))(mod)
    tt.build(train_mod, params, target="c").export(tmp_path / "q")
    proj = tmp_path / "p"
    assert cli(capsys, "micro", "create-project", proj, tmp_path / "q", "host")[0] == 0
    assert cli(capsys, "micro", "build", proj)[0] == 0
    test = np.load(work / "test.npz")
    np.savez(tmp_path / "int8.npz", x=tt.quantize_input(mod, test["x"]), y=test["y"])
    scores = []
    for data in (work / "test.npz", tmp_path / "int8.npz"):
        code, out, err = cli(capsys, "run", proj, "--data", data, "--epochs", "0", "--json")
        assert code == 0, err
        scores.append(json.loads(out)["accuracy_before"])
    assert scores[0] == scores[1]
    session = ort_session(tmp_path / "q.onnx")
    top1 = [int(np.argmax(session.run(None, {"input": x[None]})[0])) for x in test["x"]]
    assert abs(scores[0] - np.mean(np.array(top1) == test["y"])) <= 1 / len(top1) + 1e-9
