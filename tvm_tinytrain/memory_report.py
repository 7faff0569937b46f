"""The memory of one training step: the lowered kernels → buffers → a static plan.

SRAM = the arena (activations, gradients, kernel scratch, planned together)
+ the trainable parameters and optimizer state (persistent; updates write
them in place). Flash = the frozen parameters and constants.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from relay_passes.attrs import attr_names, updated_state

from .contiguous_slices import contiguous_slices
from .lower import Kernel, Tensor, kernels, lower
from .memory import Buffer, MemoryPlan, plan_memory

ELEMENTWISE = 1  # TIR op_pattern: 0 elementwise, 1 broadcast


@dataclass
class LoweredFunction:
    """One function of the lowered module as the planner and the C generator see it."""

    name: str
    kernels: list[Kernel]
    tensors: dict[str, Tensor]
    outputs: list[str]
    params: list[str]
    in_place: dict[str, str]  # kernel output → the persistent tensor (parameter, state) it overwrites
    plan: MemoryPlan


@dataclass
class MemoryReport:
    plan: MemoryPlan
    trainable_bytes: int  # trainable parameters (SRAM copies)
    state_bytes: int  # optimizer state (SRAM)
    flash_bytes: int  # frozen parameters and constants
    num_kernels: int
    saved_activations: int = 0  # forward tensors kept alive past the loss, for the backward
    saved_bytes: int = 0
    rollback_bytes: int = 0  # the C step's copy of what it writes before its last non-finite check
    tvm_planned_bytes: int | None = None  # TVM's StaticPlanBlockMemory figure for the same step
    notes: list[str] = field(default_factory=list)
    lowered: tvm.IRModule | None = field(default=None, repr=False)
    step: LoweredFunction | None = field(default=None, repr=False)

    @property
    def arena_bytes(self) -> int:
        return self.plan.arena_bytes

    @property
    def total_sram_bytes(self) -> int:
        return self.arena_bytes + self.trainable_bytes + self.state_bytes + self.rollback_bytes

    def by_kind(self) -> dict[str, int]:
        return self.plan.bytes_by_kind()

    def largest_at_peak(self, n: int = 5) -> list[Buffer]:
        return self.plan.alive_at(self.plan.peak_step())[:n]

    def as_dict(self) -> dict:
        return {
            "arena_bytes": self.arena_bytes,
            "arena_by_kind_at_peak": self.by_kind(),
            "trainable_bytes": self.trainable_bytes,
            "optimizer_state_bytes": self.state_bytes,
            "rollback_bytes": self.rollback_bytes,
            "flash_bytes": self.flash_bytes,
            "total_sram_bytes": self.total_sram_bytes,
            "peak_kernel": self.plan.peak_step(),
            "kernels": self.num_kernels,
            "saved_activations": self.saved_activations,
            "saved_activation_bytes": self.saved_bytes,
            "largest_at_peak": [{"name": b.name, "kind": b.kind, "bytes": b.size}
                                for b in self.largest_at_peak()],
            "tvm_static_plan_bytes": self.tvm_planned_bytes,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def format(self) -> str:
        kb = lambda n: f"{n / 1024:,.1f} KB"  # noqa: E731
        kinds = self.by_kind()
        lines = [
            f"total SRAM  {kb(self.total_sram_bytes)}",
            f"  arena     {kb(self.arena_bytes)}  (at the peak, kernel {self.plan.peak_step()} of "
            f"{self.num_kernels}: activations {kb(kinds.get('activation', 0))}, gradients "
            f"{kb(kinds.get('gradient', 0))}, scratch {kb(kinds.get('scratch', 0))})",
            f"  trainable {kb(self.trainable_bytes)}"
            + (f" + optimizer state {kb(self.state_bytes)}" if self.state_bytes else "")
            + (f" + rollback copy {kb(self.rollback_bytes)} (undoes a non-finite step in C)"
               if self.rollback_bytes else ""),
            f"flash       {kb(self.flash_bytes)}  (frozen parameters and constants)",
            f"saved for the backward pass: {self.saved_activations} tensors, {kb(self.saved_bytes)}",
        ]
        if self.tvm_planned_bytes is not None:
            lines.append(f"TVM StaticPlanBlockMemory for the same step: {kb(self.tvm_planned_bytes)}")
        lines.append("largest tensors alive at the peak:")
        for b in self.largest_at_peak():
            lines.append(f"  {b.name:<40} {b.kind:<10} {kb(b.size)}")
        return "\n".join(lines + self.notes)


def elementwise_inputs(mod: tvm.IRModule, k: Kernel) -> list[str]:
    """The inputs of which each output element reads only the same element: all inputs of an
    elementwise op; those a kernel names in ``tinytrain.elementwise_in`` (the parameter an
    int8 update overwrites, relay_passes.fuse_update). Only these may share the output's bytes.
    (A hand-written kernel is opaque: :func:`in_place_input` says what it may overwrite.)"""
    attrs = mod[k.func].attrs
    if attrs is not None and "tinytrain.elementwise_in" in attrs:
        return [k.inputs[int(i)] for i in attrs["tinytrain.elementwise_in"]]
    if attrs is not None and "op_pattern" in attrs and int(attrs["op_pattern"]) <= ELEMENTWISE:
        return list(k.inputs)
    return []


def in_place_input(mod: tvm.IRModule, k: Kernel) -> str | None:
    """The input a kernel may write its output over (``tinytrain.inplace_in`` on a hand-written
    kernel, e.g. the int8 depthwise: each channel's output lands on input channels already read)."""
    attrs = mod[k.func].attrs
    if attrs is not None and "tinytrain.inplace_in" in attrs and len(k.outputs) == 1:
        return k.inputs[int(attrs["tinytrain.inplace_in"][0])]
    return None


def _last_use(ks: list[Kernel]) -> dict[str, int]:
    """The index of the last kernel that reads each tensor."""
    return {name: k.index for k in ks for name in k.inputs}


def _views(lowered: tvm.IRModule, ks: list[Kernel], tensors: dict[str, Tensor], arena: set[str],
           in_place: dict[str, str], lasts: dict[str, int], alignment: int) -> dict[str, tuple[str, int]]:
    """The kernel outputs planned as views, ``{output: (input, byte offset)}``; ``lasts`` (each
    tensor's last step) is extended to cover the views of each tensor.

    A kernel whose outputs are contiguous runs of one arena input (:func:`contiguous_slices`) makes
    views when that input is never written where it is read (``call_tir_inplace``), its outputs are
    arena tensors and each view starts at a multiple of ``alignment``; and when it costs no bytes:
    the views die before their input does, or the slices of that input cover all of it (a split:
    the input is kept as long as its longest-lived slice, in place of the slices' own bytes)."""
    written = {i for k in ks for i in k.inplace.values()}
    candidates: dict[str, list[tuple[Kernel, dict[int, tuple[int, int]]]]] = {}
    for k in ks:
        slices = contiguous_slices(lowered[k.func], len(k.inputs))
        if not slices or len({src for src, _ in slices.values()}) != 1:
            continue
        parent = k.inputs[next(iter(slices.values()))[0]]
        aligned = all(off % alignment == 0 for _, off in slices.values())
        if (parent in arena and parent not in written and aligned
                and not any(o in in_place or o in written for o in k.outputs)):
            candidates.setdefault(parent, []).append((k, slices))
    views: dict[str, tuple[str, int]] = {}
    for parent, group in candidates.items():
        covered = np.zeros(tensors[parent].nbytes, bool)
        for k, slices in group:
            for i, (_, off) in slices.items():
                covered[off:off + tensors[k.outputs[i]].nbytes] = True
        for k, slices in group:
            last = max(lasts[o] for o in k.outputs)
            if last > lasts[parent] and not covered.all():
                continue
            for i, (_, off) in slices.items():
                views[k.outputs[i]] = (parent, off)
            ancestor = parent
            while ancestor is not None:
                lasts[ancestor] = max(lasts[ancestor], last)
                ancestor = views.get(ancestor, (None, 0))[0]
    return views


def _buffers(lowered: tvm.IRModule, ks: list[Kernel], tensors: dict[str, Tensor], outputs: list[str],
             inputs: list[str], in_place: dict[str, str], loss_kernel: int,
             in_place_kernels: bool = True, views: bool = True, alignment: int = 16) -> list[Buffer]:
    """Arena buffers of one function: its arena inputs, every kernel output not written into a
    persistent tensor, and each kernel's scratch. Kernels after ``loss_kernel`` make gradients.
    An output may take over the slot of an input the planner sees die at its kernel: an elementwise
    input, or (``in_place_kernels``) the one a kernel says it overwrites (:func:`in_place_input`).
    With ``views``, a kernel's outputs that are contiguous runs of its input are views of it
    (:func:`_views`; the executor calls no kernel for them)."""
    end = len(ks)
    last_use = _last_use(ks)
    producer = {out for k in ks for out in k.outputs}
    lasts = {name: last_use.get(name, 0) for name in inputs}
    lasts.update({out: end if out in outputs else last_use.get(out, k.index)
                  for k in ks for out in k.outputs})
    arena = (set(inputs) | producer) - set(in_place)
    view_of = _views(lowered, ks, tensors, arena, in_place, lasts, alignment) if views else {}
    buffers = [Buffer(name, tensors[name].nbytes, 0, lasts[name], "activation") for name in inputs]
    for k in ks:
        kind = "activation" if k.index <= loss_kernel else "gradient"
        for out in k.outputs:
            if out in in_place:
                continue
            if out in view_of:
                parent, offset = view_of[out]
                buffers.append(Buffer(out, tensors[out].nbytes, k.index, lasts[out], kind,
                                      view_of=parent, view_offset=offset))
                continue
            reuse = k.inplace.get(out)
            if reuse is None and in_place_kernels:
                reuse = in_place_input(lowered, k)
            if reuse is None and len(k.outputs) == 1:
                same = [i for i in elementwise_inputs(lowered, k)
                        if i in producer and tensors[i].nbytes >= tensors[out].nbytes]
                reuse = same[0] if same else None
            buffers.append(Buffer(out, tensors[out].nbytes, k.index, lasts[out], kind, reuse))
        if k.scratch:
            buffers.append(Buffer(f"{k.outputs[0]}:scratch", k.scratch, k.index, k.index, "scratch"))
    return buffers


def plan_predict(lowered: tvm.IRModule, alignment: int = 16,
                 in_place_kernels: bool = True, views: bool = True) -> LoweredFunction:
    """The arena plan of ``predict`` (inference between training steps shares the same arena)."""
    ks, tensors, outputs = kernels(lowered, "predict")
    params = [p.name for p in lowered["predict"].params]
    buffers = _buffers(lowered, ks, tensors, outputs, params[:1], {}, len(ks), in_place_kernels, views,
                       alignment)
    plan = plan_memory(buffers, alignment=alignment)
    plan.check_no_overlap()
    return LoweredFunction("predict", ks, tensors, outputs, params, {}, plan)


def memory_report(train_mod: tvm.IRModule, alignment: int = 16, compare_tvm: bool = True,
                  hand_kernels: bool = True, in_place_kernels: bool = True,
                  views: bool = True) -> MemoryReport:
    """Plan the arena of ``train_step`` and account for every byte of the step.

    ``hand_kernels``: the int8 forward ops as the hand-written C kernels (what the C artifact
    runs), else TVM's; ``in_place_kernels``: a kernel that may overwrite its input (the int8
    depthwise) does so when the input dies there (False: plan every output apart, to compare);
    ``views``: a kernel that only copies a contiguous run of its input (a split) makes views of it
    instead of copies (False: plan every output apart, to compare)."""
    step = train_mod["train_step"]
    trainable = attr_names(step, "tinytrain.trainable")
    state = attr_names(step, "tinytrain.state")
    lowered = lower(train_mod, hand_kernels=hand_kernels)
    ks, tensors, outputs = kernels(lowered)
    end = len(ks)
    params = [p.name for p in step.params]
    frozen = set(params[2 + len(trainable) + len(state):])
    last_use = _last_use(ks)
    producer = {out: k for k in ks for out in k.outputs}
    loss_kernel = producer[outputs[0]].index if outputs and outputs[0] in producer else end
    in_place = {}  # kernel output → the persistent tensor it overwrites
    for new, old in zip(outputs[1:], [*trainable, *updated_state(step)], strict=True):
        if new in producer and last_use.get(old, -1) <= producer[new].index:
            in_place[new] = old
    buffers = _buffers(lowered, ks, tensors, outputs, params[:2], in_place, loss_kernel, in_place_kernels,
                       views, alignment)
    plan = plan_memory(buffers, alignment=alignment)
    plan.check_no_overlap()  # cheap, and a plan that overlaps must never reach C
    saved = [b for b in buffers
             if b.kind == "activation" and b.first < loss_kernel < b.last and b.view_of is None]
    flash = sum(tensors[n].nbytes for n in tensors if n in frozen or n.startswith("const"))
    report = MemoryReport(
        plan=plan,
        trainable_bytes=sum(tensors[n].nbytes for n in trainable),
        state_bytes=sum(tensors[n].nbytes for n in state),
        flash_bytes=flash,
        num_kernels=end,
        saved_activations=len(saved),
        saved_bytes=sum(b.size for b in saved),
        lowered=lowered,
        step=LoweredFunction("train_step", ks, tensors, outputs, params, in_place, plan),
    )
    from .codegen.build import rollback_bytes  # the C step's guard; codegen builds on this module

    report.rollback_bytes = rollback_bytes(step, report.step)
    not_in_place = [o for o in outputs[1:] if o in producer and o not in in_place]
    if not_in_place:
        report.notes.append(f"{len(not_in_place)} updates could not be done in place")
    if compare_tvm:
        report.tvm_planned_bytes = tvm_static_plan_bytes(lowered)
    return report


def tvm_static_plan_bytes(lowered: tvm.IRModule, func: str = "train_step") -> int:
    """TVM's own figure: StaticPlanBlockMemory, then the bytes estimate_memory_usage counts."""
    seq = tvm.transform.Sequential([
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
    ])
    planned = seq(tvm.IRModule({gv: f for gv, f in lowered.functions.items()}))
    total = 0
    storage = tvm.ir.Op.get("relax.memory.alloc_storage")
    builtin = tvm.ir.Op.get("relax.builtin.alloc_tensor")

    def visit(expr):
        nonlocal total
        if isinstance(expr, relax.Call) and expr.op == storage:
            total += int(expr.args[0].values[0])
        elif isinstance(expr, relax.Call) and expr.op == builtin:
            n = 1
            for d in expr.args[0].values:
                n *= int(d)
            total += n * tvm.DataType(expr.args[1].value).bits // 8

    relax.analysis.post_order_visit(planned[func], visit)
    return total
