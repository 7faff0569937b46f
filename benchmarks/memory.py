"""Planned memory of one training step: full update, sparse update, sparse update + reordering.

For each network, ``TinyTrain`` builds the training step (batch 1, cross-entropy,
SGD lr 0.01) under three settings and ``tvm_tinytrain.memory_report`` plans its
arena:

- ``full``: every weight and bias learns, no operator reordering;
- ``sparse``: a sparse-update scheme in the spirit of the TinyTraining paper's
  MCUNet scheme (see ``paper_style_scheme``), no reordering;
- ``sparse+reorder``: the same scheme with the memory-saving reordering on;
- ``sparse+reorder, int8 classifier`` (int8 only): the same, the last layer kept
  int8 as the file has it instead of the default float32 classifier.

MobileNetV2 also gets ``bias-only`` and ``bias-only+reorder``: without
reordering every gradient buffer stays alive until the updates at the end.

Total SRAM = the planned arena (activations, gradients, scratch) + the
trainable parameters (SRAM copies) + SGD's one state, its 4-byte learning rate. Flash = the
frozen parameters and constants. The TVM column is TVM's own
``StaticPlanBlockMemory`` figure for the same lowered step. Every plan is
checked with ``check_no_overlap``. ``--dtype int8`` (the default) plans the int8
networks (the zoo's float ONNX quantized by ``zoo.quantize_qdq``, the MLPerf Tiny
``*_int8.tflite``), the paper's setting (Fig. 10a: int8, measured on the board);
``--dtype float32`` the float ones. ``--qemu`` also builds the sparse+reorder steps
of each zoo network as C for the emulated Cortex-M7 and measures it there: static
RAM from the linker, the painted stack's high-water mark, and instructions per
training step (``-icount``).

Networks: ``tvm_tinytrain.zoo``'s MobileNetV2-w0.35, ProxylessNAS-w0.3 and
MCUNet-like at ``--resolution``, and the MLPerf Tiny float models in
``../shared/models`` (fixed resolutions; skipped with a note when missing).

    python benchmarks/memory.py [--dtype int8] [--qemu] [--out benchmarks/results]
                                [--networks mobilenet_v2,vww]

writes ``memory_int8.md`` (``memory.md`` for float32), ``.json`` and ``.png`` (total SRAM per network
and setting, log scale) into ``--out`` and prints the markdown to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"
LR = 0.01
KB = 1024
INT8_CLASSIFIER = "sparse+reorder, int8 classifier"

# The paper's MCUNet scheme (42 layers): the layer indices and ratios scaled by paper_style_scheme.
PAPER_LAYERS = 42
PAPER_BIAS_LAST = 22
PAPER_WEIGHTS = {21: 1.0, 24: 1.0, 27: 1.0, 30: 1.0, 36: 0.125, 39: 0.25}

# TinyTraining paper, Fig. 10a: total memory in KB, int8, measured on the board.
PAPER_FIG10A = {
    "mobilenet_v2": {"full": 2939, "sparse": 335, "sparse+reorder": 141},
    "proxyless_nas": {"full": 2745, "sparse": 326, "sparse+reorder": 135},
    "mcunet_like": {"full": 3650, "sparse": 560, "sparse+reorder": 173},
}


@dataclass(frozen=True)
class Network:
    key: str
    label: str
    source: str  # "zoo" or a file name in SHARED_MODELS (float; "_float" → "_int8" for int8)
    extra_settings: tuple[str, ...] = ()


NETWORKS = {
    n.key: n
    for n in [
        Network("mobilenet_v2", "MobileNetV2-w0.35", "zoo", ("bias-only", "bias-only+reorder")),
        Network("proxyless_nas", "ProxylessNAS-w0.3", "zoo"),
        Network("mcunet_like", "MCUNet-like (5FPS)", "zoo"),
        Network("vww", "VWW MobileNetV1-0.25 (96)", "vww_96_float.tflite"),
        Network("resnet8", "ResNet-8 CIFAR-10 (32)", "resnet8_cifar10_float.tflite"),
    ]
}
SETTINGS = ("full", "sparse", "sparse+reorder", INT8_CLASSIFIER, "bias-only", "bias-only+reorder")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Planned SRAM/flash of one training step (batch 1, SGD) under full update, "
        "sparse update and sparse update + reordering, for several networks.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="directory for the markdown, JSON and PNG results (default benchmarks/results)",
    )
    parser.add_argument(
        "--networks",
        default=",".join(NETWORKS),
        help=f"comma-separated subset of {','.join(NETWORKS)} (default all)",
    )
    parser.add_argument("--dtype", choices=["int8", "float32"], default="int8",
                        help="plan the int8 networks (default, as the paper) or the float32 ones")
    parser.add_argument("--qemu", action="store_true",
                        help="also measure the zoo networks' sparse+reorder step on the emulated Cortex-M7")
    parser.add_argument(
        "--resolution",
        type=int,
        default=128,
        help="input height and width of the zoo networks (default 128; the .tflite models are fixed)",
    )
    args = parser.parse_args(argv)
    args.networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = sorted(set(args.networks) - set(NETWORKS))
    if unknown:
        parser.error(f"unknown network(s) {unknown}; choose from {', '.join(NETWORKS)}")
    if not args.networks:
        parser.error("--networks names no network")
    if args.resolution < 32:
        parser.error("--resolution must be at least 32")
    return args


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def paper_style_scheme(layers: list) -> dict:
    """The paper's MCUNet scheme (42 layers) scaled to ``len(layers)`` layers.

    In the paper's MCUNet every updated weight (layers 21, 24, 27, 30 in full;
    36 at 1/8 and 39 at 1/4 of the output channels) is the expansion 1x1 conv
    of an inverted bottleneck. Here each paper index i is scaled to i·n/42 and
    snapped to the nearest expansion conv (a conv followed by a depthwise conv;
    any conv but the classifier when there are fewer than six of those), going
    from the last one backwards so the picks stay distinct and in order.
    Biases: the last round(22·n/42) layers, extended to cover every updated
    weight; the classifier learns.
    """
    n = len(layers)
    convs = [layer.index for layer in layers if layer.kind != "linear"]
    expansion = [
        layer.index
        for layer, nxt in zip(layers, layers[1:])
        if layer.kind == "conv" and nxt.kind == "dwconv"
    ]
    candidates = expansion if len(expansion) >= len(PAPER_WEIGHTS) else convs
    if len(candidates) < len(PAPER_WEIGHTS):
        raise ValueError(f"{n} layers are too few for a paper-style scheme")
    chosen: dict[int, float] = {}
    below = n
    for paper_index in sorted(PAPER_WEIGHTS, reverse=True):
        target = paper_index * n / PAPER_LAYERS
        left = [c for c in candidates if c < below]
        # keep enough candidates below for the picks still to come
        left = left[len(PAPER_WEIGHTS) - len(chosen) - 1:]
        pick = min(left, key=lambda c: (abs(c - target), -c))
        chosen[pick] = PAPER_WEIGHTS[paper_index]
        below = pick
    bias_last = max(round(PAPER_BIAS_LAST * n / PAPER_LAYERS), n - min(chosen))
    return {
        "bias": {"last": bias_last},
        "weights": {str(i): chosen[i] for i in sorted(chosen)},
        "classifier": True,
    }


def load_network(net: Network, resolution: int, tmp: Path, dtype: str = "float32"):
    """``(mod, params, layers, resolution, path)``, or None when a shared model file is
    missing; ``path`` is the model file (built and quantized once for a zoo network)."""
    import tvm_tinytrain
    from tvm_tinytrain.layers import backbone

    if net.source == "zoo":
        import onnx

        from tvm_tinytrain import zoo

        builders = {
            "mobilenet_v2": lambda: zoo.mobilenet_v2(width_mult=0.35, resolution=resolution),
            "proxyless_nas": lambda: zoo.proxyless_nas(width_mult=0.3, resolution=resolution),
            "mcunet_like": lambda: zoo.mcunet_like(resolution=resolution),
        }
        model = builders[net.key]()
        if dtype == "int8":
            model = zoo.quantize_qdq(model)
        path = tmp / f"{net.key}_{dtype}.onnx"
        onnx.save(model, path)
    else:
        path = SHARED_MODELS / (net.source.replace("_float", "_int8") if dtype == "int8" else net.source)
        if not path.is_file():
            return None
    mod, params = tvm_tinytrain.load_model(str(path))
    shape = [int(d) for d in backbone(mod).params[0].ty.shape]  # NCHW or NHWC, batch 1
    return mod, params, tvm_tinytrain.layer_table(mod), max(shape[1:]), path


def training_step(mod, scheme, reorder: bool):
    import tvm_tinytrain

    return tvm_tinytrain.relay.transform.TinyTrain(
        scheme, optimizer=tvm_tinytrain.SGD(lr=LR), reorder=reorder
    )(mod)


def measure(mod, scheme, reorder: bool, compare_tvm: bool = True) -> dict:
    """Build the training step, plan it, check the plan; the figures of the report."""
    from tvm_tinytrain.memory_report import memory_report

    report = memory_report(training_step(mod, scheme, reorder), compare_tvm=compare_tvm)
    report.plan.check_no_overlap()
    return {
        "total_sram_bytes": report.total_sram_bytes,
        "arena_bytes": report.arena_bytes,
        "trainable_bytes": report.trainable_bytes,
        "optimizer_state_bytes": report.state_bytes,
        "flash_bytes": report.flash_bytes,
        "tvm_static_plan_bytes": report.tvm_planned_bytes,
        "report": report.as_dict(),
        "notes": list(report.notes),
    }


def measure_on_qemu(mod, params, scheme, tmp: Path) -> dict:
    """The sparse+reorder step as C on the emulated Cortex-M7: linker RAM, stack, instructions."""
    import numpy as np

    import tvm_tinytrain
    from tvm_tinytrain import micro

    train_mod = training_step(mod, scheme, True)
    artifact = tvm_tinytrain.build(train_mod, params, target="c")
    planned = artifact.metadata["memory"]["planned_sram_bytes"]
    ram_kb = max(320, -(-planned // KB) + 64)
    project = micro.create_project(artifact, "qemu_cortex_m7", tmp / "qemu",
                                   {"ram_kb": str(ram_kb), "flash_kb": "4096"})
    project.build()
    static = project.static_ram()
    shape = [int(d) for d in train_mod["predict"].params[0].ty.shape]
    dtype = str(train_mod["predict"].params[0].ty.dtype)
    x = np.random.default_rng(0).integers(-128, 128, shape).astype(dtype)
    with project.session() as dev:
        dev.train_step(x, 1)
        instructions = dev.last_cost
        high_water, _ = dev.stack()
    return {
        "qemu_planned_bytes": planned,
        "qemu_measured_bytes": static["data"] + static["bss"] + high_water,
        "qemu_arena_bytes": static["arena"],
        "qemu_stack_bytes": high_water,
        "qemu_instructions_per_step": int(instructions),
        "qemu_ms_at_216mhz_1ipc": instructions / 216e3,
    }


def run_network(net: Network, resolution: int, tmp: Path, dtype: str = "int8",
                qemu: bool = False) -> tuple[dict | None, list[dict]]:
    """The network's summary (None when skipped) and one row per setting."""
    import tvm_tinytrain

    start = time.perf_counter()
    loaded = load_network(net, resolution, tmp, dtype)
    if loaded is None:
        return None, []
    mod, params, layers, input_hw, path = loaded
    sparse = paper_style_scheme(layers)
    _progress(f"{net.label}: {len(layers)} layers, sparse scheme {json.dumps(sparse)}")
    schemes = {"full": "full", "sparse": sparse, "bias-only": "bias-only"}
    settings = ["full", "sparse", "sparse+reorder", *net.extra_settings]
    models = {s: (mod, params) for s in settings}
    if dtype == "int8":  # the classifier int8 too, as the file has it (float32 is the default)
        settings.insert(3, INT8_CLASSIFIER)
        models[INT8_CLASSIFIER] = tvm_tinytrain.load_model(str(path), float_classifier=False)
    rows = []
    for setting in settings:
        base, _, reorder = setting.partition("+")
        reorder = reorder.partition(",")[0]
        row = {"network": net.key, "label": net.label, "setting": setting, "reorder": bool(reorder)}
        row.update(measure(models[setting][0], schemes[base], bool(reorder), compare_tvm=dtype == "float32"))
        row["paper_kb"] = PAPER_FIG10A.get(net.key, {}).get(base + ("+reorder" if reorder else ""))
        if qemu and net.source == "zoo" and setting in ("sparse+reorder", INT8_CLASSIFIER):
            _progress(f"{net.label}: building the {setting} step for QEMU ...")
            row.update(measure_on_qemu(*models[setting], sparse, tmp / f"{net.key}_{len(rows)}"))
        rows.append(row)
    full = rows[0]["total_sram_bytes"]
    for row in rows:
        row["full_over_this"] = full / row["total_sram_bytes"]
    _progress(f"{net.label}: done in {time.perf_counter() - start:.1f} s")
    summary = {
        "network": net.key,
        "label": net.label,
        "layers": len(layers),
        "resolution": input_hw,
        "sparse_scheme": sparse,
    }
    return summary, rows


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / KB:,.1f}"


def markdown(rows: list[dict], networks: list[dict], skipped: list[str], dtype: str = "int8") -> str:
    lines = [
        f"# Training-step memory ({dtype}): full vs sparse update vs sparse update + reordering",
        "",
        f"Batch 1, cross-entropy, SGD (its only state: the 4-byte learning rate, counted with the "
        f"trainable column). **Ours: {dtype}, planned** by "
        "`tvm_tinytrain.memory_report` (int8: int8 activations and weights, int32 biases, float32 "
        "classifier and gradients). **Paper: int8, measured** on the board (TinyTraining, Fig. 10a).",
        "",
        f"| network | setting | ours: total SRAM KB ({dtype}, planned; arena + trainable) | arena KB "
        "| trainable KB | flash KB | TVM StaticPlanBlockMemory KB | full / this (ours) "
        "| paper Fig. 10a KB (int8, measured) | full / this (paper) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    paper_full = {}
    for row in rows:
        paper = row["paper_kb"]
        if row["setting"] == "full" and paper is not None:
            paper_full[row["network"]] = paper
        paper_ratio = (
            f"{paper_full[row['network']] / paper:.1f}x" if paper and row["network"] in paper_full else "-"
        )
        cells = [
            row["label"],
            row["setting"],
            _kb(row["total_sram_bytes"]),
            _kb(row["arena_bytes"]),
            _kb(row["trainable_bytes"] + row["optimizer_state_bytes"]),
            _kb(row["flash_bytes"]),
            _kb(row["tvm_static_plan_bytes"]),
            f"{row['full_over_this']:.1f}x",
            "-" if paper is None else f"{paper:,}",
            paper_ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Sparse schemes used (the paper's MCUNet scheme scaled to each network's layers):", ""]
    for net in networks:
        lines.append(
            f"- {net['label']} ({net['layers']} layers, {net['resolution']}x{net['resolution']}): "
            f"`{json.dumps(net['sparse_scheme'])}`"
        )
    measured = [r for r in rows if "qemu_measured_bytes" in r]
    if measured:
        lines += ["", "Measured on the emulated Cortex-M7 (qemu-system-arm mps2-an500, the sparse+reorder "
                  "step as C, one step, `-icount shift=0`):", "",
                  "| network | setting | planned SRAM KB | measured KB (.data + .bss + stack high-water) "
                  "| linker arena KB "
                  "| instructions / step | ms at 216 MHz, 1 instr/cycle | paper KB | paper ms (Fig. 10c) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        paper_ms = {"mobilenet_v2": 373, "proxyless_nas": 443, "mcunet_like": 546}
        for r in measured:
            lines.append(
                f"| {r['label']} | {r['setting']} | {_kb(r['qemu_planned_bytes'])} "
                f"| {_kb(r['qemu_measured_bytes'])} "
                f"| {_kb(r['qemu_arena_bytes'])} | {r['qemu_instructions_per_step']:,} "
                f"| {r['qemu_ms_at_216mhz_1ipc']:,.0f} | {r['paper_kb'] or '-'} "
                f"| {paper_ms.get(r['network'], '-')} |")
    notes = sorted({f"{r['label']} {r['setting']}: {n}" for r in rows for n in r["notes"]})
    if notes or skipped:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes + skipped]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars of total SRAM (log scale) per network and setting; the paper's int8 as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows))
    colors = dict(zip(SETTINGS, plt.get_cmap("tab10").colors))
    width = 0.8 / max(len([r for r in rows if r["label"] == lab]) for lab in labels)
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(labels)), 5), dpi=100)
    seen: set[str] = set()
    for x, label in enumerate(labels):
        group = [r for r in rows if r["label"] == label]
        for i, row in enumerate(group):
            pos = x + (i - (len(group) - 1) / 2) * width
            kb = row["total_sram_bytes"] / KB
            ax.bar(pos, kb, width * 0.95, color=colors[row["setting"]],
                   label=None if row["setting"] in seen else row["setting"])
            seen.add(row["setting"])
            ax.annotate(f"{kb:,.0f}", (pos, kb), ha="center", va="bottom", fontsize=7)
            if row["paper_kb"] is not None:
                ax.plot(pos, row["paper_kb"], marker="_", markersize=14, markeredgewidth=2, color="black",
                        label=None if "paper" in seen else "paper Fig. 10a (int8, measured)")
                seen.add("paper")
    ax.set_yscale("log")
    lowest = min(min(r["total_sram_bytes"] / KB, r["paper_kb"] or float("inf")) for r in rows)
    ax.set_ylim(bottom=lowest / 2)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("total SRAM, KB (log)")
    ax.set_title(f"Training-step SRAM (ours: {rows[0].get('dtype', 'float32')}, planned; arena + trainable)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    rows: list[dict] = []
    networks: list[dict] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.networks:
            net = NETWORKS[key]
            _progress(f"{net.label}: building and planning ...")
            summary, net_rows = run_network(net, args.resolution, Path(tmp), args.dtype, args.qemu)
            for row in net_rows:
                row["dtype"] = args.dtype
            if summary is None:
                note = f"{net.label} skipped: {SHARED_MODELS / net.source} is missing"
                _progress(note)
                skipped.append(note)
                continue
            networks.append(summary)
            rows.extend(net_rows)

    text = markdown(rows, networks, skipped, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "memory" if args.dtype == "float32" else f"memory_{args.dtype}"
    (args.out / f"{stem}.md").write_text(text)
    result = {
        "dtype": args.dtype,
        "batch": 1,
        "optimizer": f"SGD(lr={LR})",
        "zoo_resolution": args.resolution,
        "paper_fig10a_kb_int8_measured": PAPER_FIG10A,
        "networks": networks,
        "rows": rows,
        "skipped": skipped,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    if rows:
        plot(rows, args.out / f"{stem}.png")
    print(text, end="")
    _progress(f"wrote {args.out / stem}.md, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
