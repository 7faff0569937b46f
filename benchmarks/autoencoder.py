"""On-device anomaly detection: the MLPerf Tiny ToyCar autoencoder adapting to its own machine.

The three ``toycar_ad_*`` files (float32, weight-only int8, full int8 with float I/O) are
fine-tuned with ``loss="mse"`` on their own input (``trainer.step(x)``, no target) on frames of
one synthetic machine: log-mel-like frames (5 × 128 mel bins, the model's 640 inputs) with a
fixed spectral profile, a per-frame gain and noise. Held-out frames of the same machine give
the reconstruction error (the anomaly score) before and after; frames of the same machine
with a narrow-band tone added (a worn bearing, say) are the anomalies, and the AUC of the
score separating them from held-out normal frames is reported before and after.

The int8 file's step is also built as C for the emulated Cortex-M7 under 256 KB with the
scheme the device can hold (all biases, the last two layers' weights): planned SRAM, the
SRAM measured on QEMU (static RAM + stack high-water mark) and instructions per step.

    python benchmarks/autoencoder.py [--epochs 2] [--no-qemu] [--json]     (about 1 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "models"
FILES = {"float32": "toycar_ad_float.tflite", "weight-only int8": "toycar_ad_weight_int8.tflite",
         "int8 (float I/O)": "toycar_ad_int8_float_io.tflite"}
DEVICE_SCHEME = {"bias": {"last": 10}, "weights": {"8": 1.0, "9": 1.0}}  # fits 256 KB as int8
# SGD, momentum 0.9: 1e-5 diverges at first on the float files (MSE ~100 gives large gradients);
# the int8 file's QAS-scaled step takes 1e-5
LR = {"float32": 1e-6, "weight-only int8": 1e-6, "int8 (float I/O)": 1e-5}
MOMENTUM = 0.9


def machine_frames(count: int, seed: int = 0, anomalous: bool = False) -> np.ndarray:
    """``count`` samples of shape (1, 640): 5 frames × 128 mel bins of one machine (a fixed
    spectral profile, in the int8 file's input range of about [-85, 19]), a per-frame gain and
    noise; ``anomalous`` adds a narrow-band tone of +12 around bin 40."""
    rng = np.random.default_rng(seed)
    profile = np.random.default_rng(99).normal(-10, 6, 128)
    frames = profile + rng.normal(0, 1.5, (count, 5, 1)) + rng.normal(0, 1.0, (count, 5, 128))
    if anomalous:
        frames[:, :, 38:43] += 12.0
    return frames.reshape(count, 1, 640).astype(np.float32)


def auc(normal: list[float], anomalous: list[float]) -> float:
    """P(score of an anomaly > score of a normal sample), ties counted half."""
    a, n = np.asarray(anomalous)[:, None], np.asarray(normal)[None, :]
    return float(np.mean((a > n) + 0.5 * (a == n)))


def fine_tune(name: str, lr: float, epochs: int) -> dict:
    import tvm_tinytrain as tt
    from tvm_tinytrain.quantize import input_quantization

    mod, params = tt.load_model(MODELS / name)
    int8 = input_quantization(mod) is not None
    data = (lambda d: tt.quantize_input(mod, d)) if int8 else (lambda d: d)
    train = data(machine_frames(200, seed=1))
    normal, anomalies = data(machine_frames(50, seed=2)), data(machine_frames(50, seed=3, anomalous=True))
    train_mod = tt.relay.transform.TinyTrain(scheme="full", loss="mse",
                                             optimizer=tt.SGD(lr=lr, momentum=MOMENTUM))(mod)
    trainer = tt.build(train_mod, params)

    def scores():
        return [trainer.anomaly_score(x) for x in normal], [trainer.anomaly_score(x) for x in anomalies]

    before = scores()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x in train:
            trainer.step(x)  # no target: the frame itself
    seconds = time.perf_counter() - t0
    after = scores()
    steps = epochs * len(train)
    return {"file": name, "lr": lr, "steps": steps, "ms_per_step": 1e3 * seconds / steps,
            "mse_before": float(np.mean(before[0])), "mse_after": float(np.mean(after[0])),
            "auc_before": auc(*before), "auc_after": auc(*after)}


def on_qemu() -> dict:
    import tvm_tinytrain as tt
    from tvm_tinytrain import micro
    from tvm_tinytrain.memory_report import memory_report

    mod, params = tt.load_model(MODELS / FILES["int8 (float I/O)"])
    optimizer = tt.SGD(lr=LR["int8 (float I/O)"])
    train_mod = tt.relay.transform.TinyTrain(DEVICE_SCHEME, loss="mse", optimizer=optimizer)(mod)
    planned = memory_report(train_mod, compare_tvm=False)
    artifact = tt.build(train_mod, params, target="c", budget="256KB")
    xs = tt.quantize_input(mod, machine_frames(3, seed=4))
    with tempfile.TemporaryDirectory() as tmp:
        project = micro.create_project(artifact, "qemu_cortex_m7", Path(tmp) / "qemu", {"ram_kb": "256"})
        project.build()
        ram = project.static_ram()
        with project.session() as dev:
            for x in xs:
                dev.train_step(x)  # no target: the int8 input, dequantized
            instructions = dev.last_cost
            high_water = dev.stack()[0]
    return {"scheme": DEVICE_SCHEME, "planned_sram_bytes": planned.total_sram_bytes,
            "measured_sram_bytes": ram["data"] + ram["bss"] + high_water,
            "instructions_per_step": instructions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs over 200 frames (default 2)")
    p.add_argument("--no-qemu", action="store_true", help="skip the emulated Cortex-M7 build")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    rows = {kind: fine_tune(name, LR[kind], args.epochs) for kind, name in FILES.items()}
    device = None if args.no_qemu else on_qemu()
    if args.json:
        print(json.dumps({"fine_tune": rows, "qemu": device}, indent=2))
        return 0
    print("| file | lr | steps | held-out MSE before → after | anomaly AUC before → after | ms/step (host) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, r in rows.items():
        print(f"| {kind} | {r['lr']:g} | {r['steps']} | {r['mse_before']:.1f} → {r['mse_after']:.1f} | "
              f"{r['auc_before']:.3f} → {r['auc_after']:.3f} | {r['ms_per_step']:.2f} |")
    if device:
        kb = lambda n: f"{n / 1024:.1f} KB"  # noqa: E731
        print(f"\nint8 on the emulated Cortex-M7, scheme {json.dumps(device['scheme'])}: SRAM planned "
              f"{kb(device['planned_sram_bytes'])}, measured {kb(device['measured_sram_bytes'])} (with the "
              f"protocol's buffers and the stack); {device['instructions_per_step']:,.0f} instructions "
              "per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
