"""Lowering a TinyTrain module to kernels in execution order.

``lower(train_mod)`` runs Relax's zero pipeline (LegalizeOps,
AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR) and then inlines every
intermediate TIR block it can (padding, elementwise epilogues), so a kernel
allocates no temporaries it does not need. ``kernels(lowered)`` lists the
``train_step`` kernels with their tensors: what the memory planner and the C
code generator walk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir.analysis import calculate_allocated_bytes

from relay_passes.exprs import constant_value
from relay_passes.reorder import ReorderForMemory


def _inline_intermediates(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Inline every block of ``func`` that can be inlined (pads, elementwise steps); a kernel
    already scheduled (``tinytrain.scheduled``: the int8 kernels) is left as it is."""
    if func.attrs is not None and "tinytrain.scheduled" in func.attrs:
        return func
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001 - no block structure: nothing to inline
        return func
    changed = True
    while changed:
        changed = False
        for block in sch.get_child_blocks(root):
            try:
                sch.compute_inline(block)
                changed = True
                break
            except Exception:  # noqa: BLE001 - not inlinable: the reduction or the output block
                continue
    return sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="InlineIntermediates")
def inline_intermediates(mod: tvm.IRModule, ctx) -> tvm.IRModule:
    out = tvm.IRModule(dict(mod.functions))
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            out[gv] = _inline_intermediates(func)
    return out


def lower(train_mod: tvm.IRModule, fuse: bool = False, hand_kernels: bool = True) -> tvm.IRModule:
    """Relax calls → TIR kernels (one per op unless ``fuse``), intermediates inlined.

    Unfused, a conv's output and its bias add are two tensors the planner can
    overlay in place; fused, TVM gives the kernel a private copy of the conv
    output (scratch as large as the activation). The memory-saving order is
    restored on the fused kernels when the module was reordered. With ``hand_kernels``
    the int8 forward kernels the hand-written C covers become calls of it
    (``codegen.s8_kernels.use_hand_kernels``; their scratch is a buffer of the PrimFunc,
    which :func:`scratch_bytes` counts like any temporary).
    """
    if hand_kernels:
        from .codegen.s8_kernels import use_hand_kernels  # codegen imports this module

        train_mod = use_hand_kernels(train_mod)
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
              relax.transform.FoldConstant()]
    if fuse:
        passes += [relax.transform.FuseOps(), relax.transform.FuseTIR()]
    mod = tvm.transform.Sequential(passes)(train_mod)
    step = mod["train_step"]
    if fuse and step.attrs is not None and "tinytrain.reordered" in step.attrs:
        # FuseOps places a group where its last member was. (Unfused, the kernels keep the
        # order of the bindings; scheduling them again would see no gradient seed, which
        # FoldConstant has folded, and take the backward for forward work.)
        mod = ReorderForMemory()(mod)
    return inline_intermediates(mod)


def scratch_bytes(mod: tvm.IRModule) -> dict[str, int]:
    """Bytes each TIR kernel allocates for itself (temporaries still left after inlining)."""
    tir = tvm.IRModule({gv: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)})
    seq = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
    ])
    sizes = calculate_allocated_bytes(seq(tir))
    return {name: int(sum(v.values())) for name, v in sizes.items()}


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    value: np.ndarray | None = field(default=None, repr=False)  # a constant's data

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class Kernel:
    index: int
    func: str  # the TIR PrimFunc's name
    inputs: list[str]  # tensor names: kernel outputs, function parameters or constants
    outputs: list[str]  # one, or several for a kernel that returns a tuple (split)
    scratch: int  # bytes of temporaries inside the kernel
    inplace: dict[str, str] = field(default_factory=dict)  # output → the input it overwrites


_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_CALL_TIR_INPLACE = tvm.ir.Op.get("relax.call_tir_inplace")


def _tensor(name: str, ty) -> Tensor:
    return Tensor(name, tuple(int(d) for d in ty.shape), str(ty.dtype))


def _constant(name: str, const) -> Tensor:
    """A Relax constant argument (``GenericConst``: a scalar's ``value`` is a Python number)."""
    t = _tensor(name, const.ty)
    t.value = np.full(t.shape, constant_value(const), dtype=t.dtype)
    return t


def kernels(lowered: tvm.IRModule, func: str = "train_step"):
    """(kernels in order, tensors by name, the names of the function's outputs)."""
    f = lowered[func]
    scratch = scratch_bytes(lowered)
    tensors: dict[str, Tensor] = {p.name: _tensor(p.name, p.ty) for p in f.params}
    names: dict = {p: p.name for p in f.params}
    result: list[Kernel] = []
    const_count = 0
    for block in f.body.blocks:
        for b in block.bindings:
            value = b.value
            if isinstance(value, relax.Call) and value.op in (_CALL_TIR, _CALL_TIR_INPLACE):
                inputs = []
                for arg in value.args[1].fields:
                    if arg in names:
                        inputs.append(names[arg])
                    elif isinstance(arg, tvm.ir.expr.GenericConst):  # a constant: flash
                        const_count += 1
                        name = f"const{const_count}"
                        tensors[name] = _constant(name, arg)
                        names[arg] = name
                        inputs.append(name)
                    else:
                        raise NotImplementedError(f"kernel argument {arg} of {b.var.name} is not a tensor")
                base = f"t{len(result)}:{b.var.name}"
                types = list(b.var.ty.fields) if isinstance(b.var.ty, relax.TupleType) else [b.var.ty]
                outs = [base if len(types) == 1 else f"{base}.{i}" for i in range(len(types))]
                for out, ty in zip(outs, types):
                    tensors[out] = _tensor(out, ty)
                names[b.var] = outs[0] if len(outs) == 1 else outs
                gv = value.args[0]
                kernel = Kernel(len(result), gv.name_hint, inputs, outs, scratch.get(gv.name_hint, 0))
                if value.op == _CALL_TIR_INPLACE:
                    indices = [int(i) for i in value.attrs.inplace_indices]
                    kernel.inplace = {o: inputs[i] for o, i in zip(outs, indices) if i >= 0}
                result.append(kernel)
            elif isinstance(value, relax.TupleGetItem):
                names[b.var] = names[value.tuple_value][value.index]
            elif isinstance(value, relax.Var):
                names[b.var] = names[value]
            elif isinstance(value, relax.Tuple):
                names[b.var] = [names[v] for v in value.fields]
            else:
                raise NotImplementedError(f"lowered binding {b.var.name} is not a kernel call: {value}")
    outputs = names[f.body.body] if f.body.body in names else []
    return result, tensors, outputs
