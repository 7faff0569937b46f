"""``tinytrain demo`` end to end: pretrain float on digits 0-4, quantize to int8, compile a sparse
step under 64 KB, build the host project, fine-tune it on 5-9 through ``run``, save, export.

Checked against what the demo does not compute itself: the saved device (reopened, it boots from
its save and scores what the demo reported), LiteRT on the exported file, the folder's contents;
without a C compiler the same steps run on TVM's host build and the demo says so."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tools

from tvm_tinytrain import demo, micro
from tvm_tinytrain.data import load_data
from tvm_tinytrain.errors import InputError, OutputError
from tvm_tinytrain.run import evaluate

TINYTRAIN = shutil.which("tinytrain") or str(Path(sys.executable).with_name("tinytrain"))


def _digits_5_9(folder: Path):
    test = np.load(folder / "digits_5-9_test.npz")
    return test["x"], test["y"]


def _litert_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from conftest import litert_reference

    interp, run = litert_reference(path)
    scale, zero = interp.get_input_details()[0]["quantization"]
    q = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
    return float(np.mean([np.argmax(run(sample[None])) == label for sample, label in zip(q, y)]))


def test_demo_on_the_host_project(tmp_path):
    require_tools("cc", "make")
    pytest.importorskip("ai_edge_litert")
    out = tmp_path / "demo"
    lines: list[str] = []
    result = demo.run_demo(pretrain_epochs=3, finetune_epochs=2, show_progress=False, log=lines.append,
                           output=out)
    assert result.target == "host" and result.notes == []
    assert result.before_accuracy < 0.1  # the classes 5-9 were never seen
    assert result.after_accuracy >= result.before_accuracy + 0.7
    assert result.finetune_steps == 2 * len(np.load(out / "digits_5-9_train.npz")["y"])
    assert 0 < result.planned_sram_bytes <= 64 * 1024
    assert result.cost_unit == "ns" and result.cost_per_step > 0
    assert result.measured_sram_bytes is None and "not measurable" in result.measured_sram_note
    assert json.loads((out / demo.MARKER).read_text()) == json.loads(json.dumps(result.as_dict()))
    text = "\n".join(lines)
    assert "64KB" in text and "planned SRAM" in text and "accuracy after" in text

    # the device saved what it learned: reopened, it boots from the save and scores as reported
    project = micro.open_project(out / "project")
    data = load_data(out / "digits_5-9_test.npz", project.metadata)  # as `tinytrain run --eval` reads it
    with project.session() as dev:
        assert dev.boot.source.startswith("slot")
        assert evaluate(dev, data, "cross_entropy") == pytest.approx(result.after_accuracy)
    x, y = _digits_5_9(out)

    # the exported file runs in LiteRT and keeps what the device learned
    assert result.exported_model == str(out / "digits_tuned.tflite")
    tuned = _litert_accuracy(out / "digits_tuned.tflite", x, y)
    assert tuned >= result.after_accuracy - 0.03
    assert _litert_accuracy(out / "digits_int8.tflite", x, y) < 0.1  # the file before: 5-9 unknown


def test_demo_without_a_c_compiler_runs_on_tvm_and_says_so(tmp_path, monkeypatch):
    pytest.importorskip("ai_edge_litert")
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "cc" else which(name, *a, **k))
    # and no LiteRT (an extra): the export still runs, its classifier range from the never-clipping bound
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ai_edge_litert" else find_spec(name, *a))
    out = tmp_path / "demo"
    lines: list[str] = []
    result = demo.run_demo(pretrain_epochs=3, finetune_epochs=2, show_progress=False, log=lines.append,
                           output=out)
    assert result.target == "tvm" and result.cost_unit == "ns"
    assert any("no cc" in note and "HostTrainer" in note for note in result.notes)
    assert any("no cc" in line for line in lines) and "no cc" in result.format()
    assert any("never clips" in note for note in result.notes)
    assert result.after_accuracy >= result.before_accuracy + 0.7
    assert micro.is_project(out / "project") and not (out / "project" / "build" / "tinytrain_host").exists()
    x, y = _digits_5_9(out)
    assert _litert_accuracy(out / "digits_tuned.tflite", x, y) >= result.after_accuracy - 0.03


def test_demo_refuses_a_folder_it_did_not_make_before_any_work(tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match="not a tinytrain demo folder") as err:
        demo.run_demo(output=keep, show_progress=False, log=lambda _: pytest.fail("started"))
    assert "\n" not in str(err.value)
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]
    assert (keep / "notes.txt").read_text() == "precious"
    with pytest.raises(InputError, match="unknown demo target 'stm32'"):
        demo.run_demo(output=tmp_path / "new", target="stm32", log=lambda _: None)
    with pytest.raises(InputError, match="finetune_epochs"):
        demo.run_demo(output=tmp_path / "new", finetune_epochs=0, log=lambda _: None)
    assert not (tmp_path / "new").exists()


def test_qemu_target_needs_its_tools(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(micro.ToolMissingError) as err:
        demo.run_demo(output=tmp_path / "q", target="qemu_cortex_m7", log=lambda _: None)
    assert "\n" not in str(err.value) and not (tmp_path / "q").exists()


@pytest.mark.slow
def test_demo_on_qemu_measures_sram(tmp_path):
    require_tools("arm-none-eabi-gcc", "qemu-system-arm", "make")
    result = demo.run_demo(pretrain_epochs=3, finetune_epochs=1, show_progress=False, log=lambda _: None,
                           output=tmp_path / "demo", target="qemu_cortex_m7")
    assert result.target == "qemu_cortex_m7" and result.cost_unit == "instructions"
    # measured: .data + .bss (arena, parameters, protocol buffers) + the stack a step used
    assert result.planned_sram_bytes < result.measured_sram_bytes < result.planned_sram_bytes + 16 * 1024
    assert result.after_accuracy >= result.before_accuracy + 0.6


@pytest.mark.slow
def test_demo_json(tmp_path):
    require_tools("cc", "make")
    proc = subprocess.run([TINYTRAIN, "demo", "--json", "--quiet"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout: one object; the story went to stderr
    assert "1/6 pretraining" in proc.stderr
    assert result["after_accuracy"] >= 0.85 and result["after_accuracy"] > result["before_accuracy"] + 0.7
    assert result["finetune_steps"] > 0 and result["cost_per_step"] > 0
    assert (tmp_path / "tinytrain-demo" / "digits_tuned.tflite").is_file()
