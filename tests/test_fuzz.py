"""Mutated model files (benchmarks/fuzz.py, 200 of them, fixed seed): each one loads as a working
model (non-empty layer table) or is refused with a one-line TinyTrainError; never a raw exception,
a multi-line error, a crash, a hang or an out-of-memory. Files load in child processes."""

from __future__ import annotations

from benchmarks import fuzz

CHEAP = ["toycar_ad_float.tflite", "toycar_ad_weight_int8.tflite", "toycar_ad_int8_float_io.tflite",
         "vww_96_float.tflite", "resnet8_cifar10_float.tflite"]  # the int8 CNNs take seconds per load


def test_mutated_models_load_or_are_refused_in_one_line(shared_model, tmp_path):
    seeds = fuzz.shared_seeds([shared_model(name).name for name in CHEAP], shared_model(CHEAP[0]).parent)
    seeds += fuzz.built_seeds(qdq=False)
    report = fuzz.run_fuzz(seeds, 200, seed=2024, jobs=2, steps=2, timeout=120, out=tmp_path / "kept")
    assert report.count == 200
    assert report.bad == 0, report.format()
    assert report.outcomes["loaded"] + report.outcomes["loaded+stepped"] > 0
    assert report.outcomes["refused"] > 0
