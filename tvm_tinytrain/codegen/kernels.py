"""TIR kernels → plain C functions, with no TVM header and no packed calling convention.

TVM 0.27 only lowers a PrimFunc's buffer parameters inside ``MakePackedAPI``, whose C
takes ``(void* self, void* args, int num_args, void* result)`` and checks DLTensors.
We run the same lowering passes up to that point and then do what a plain C ABI
needs: each buffer parameter becomes a pointer parameter, and every
``buffer_data(param)`` in the body becomes that pointer. Before and after, for a
3×3 conv::

    def k(input: T.Buffer((1, 1, 8, 8), "float32"), w: T.Buffer((4, 1, 3, 3), "float32"), out: ...):
        input_1 = T.decl_buffer((64,), data=input.data) ...

    void tinytrain_k0(float* input, float* w, float* out) { ... input[...] ... }

Temporaries of 1 KB or more still call ``TVMBackendAllocWorkspace``; the source is
rewritten to call the executor's arena allocator (``<prefix>_workspace_alloc``)
instead, and a failure sets ``<prefix>_kernel_failed``. ``expf``/``logf`` become the
artifact's own (``<prefix>_expf``), so the
host and the Cortex-M build compute bit-identical results whatever their libm.
"""

from __future__ import annotations

import re

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from .set_aside import SetAside

_TARGET = {"kind": "c"}
_BUFFER_DATA = tvm.ir.Op.get("tirx.buffer_data")

_LOWERING = [  # TVM's default s_tir pipeline, less its GPU steps, up to MakePackedAPI
    s_tir.transform.CanonicalizeLoop(),
    s_tir.transform.LowerInitBlock(),
    s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
    s_tir.transform.ConvertBlocksToOpaque(),
    s_tir.transform.CompactBufferAllocation(),
    s_tir.transform.LowerMatchBuffer(),
    s_tir.transform.StmtSimplify(),
    s_tir.transform.LowerOpaqueBlock(),
    tirx.transform.FlattenBuffer(),
    tirx.transform.NarrowDataType(32),
    s_tir.transform.LoopPartition(),
    tirx.transform.VectorizeLoop(False),  # plain scalar C: the C compiler vectorises
    tirx.transform.StorageRewrite(),
    s_tir.transform.HoistIfThenElse(),
    tirx.transform.UnrollLoop(),
    s_tir.transform.RenormalizeSplitPattern(),
    tirx.transform.StmtSimplify(),
    tirx.transform.RemoveNoOp(),
    s_tir.transform.RewriteUnsafeSelect(),
    tirx.transform.CommonSubexprElim(),
    tirx.transform.VerifyMemory(),
]


def _pointer_params(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Buffer-typed parameters → ``T.handle(dtype)`` pointers (what MakePackedAPI would bind)."""
    pointers, used = {}, set()
    for param in func.params:
        if not isinstance(param.ty, tirx.BufferType):
            raise NotImplementedError(f"kernel parameter {param.name} is not a buffer: {param.ty}")
        name = re.sub(r"\W+", "_", param.name).strip("_") or "arg"  # "w[:42]" is no C name
        while name in used:
            name += "_"
        used.add(name)
        pointers[param] = tirx.Var(name, tvm.ir.PointerType(tvm.ir.PrimType(param.dtype)))

    def replace(call):
        if isinstance(call.op, tvm.ir.Op) and call.op.same_as(_BUFFER_DATA) and call.args[0] in pointers:
            return pointers[call.args[0]]
        return call

    body = tvm_ffi.structural_map(func.body, [(tvm.ir.Call, replace)])
    zero = tvm.tirx.IntImm("int32", 0)
    for key, value in (("device_id", 0), ("device_type", 1)):  # CPU: where LowerTVMBuiltin allocates
        body = tirx.AttrStmt(zero, key, tvm.tirx.IntImm("int32", value), body)
    return tirx.PrimFunc([pointers[p] for p in func.params], body, attrs=func.attrs)


def _plain(func: tirx.PrimFunc, symbol: str) -> tirx.PrimFunc:
    func = func.with_attr("global_symbol", symbol).without_attr("tirx.noalias")
    return func.without_attr("tirx.is_entry_func") if "tirx.is_entry_func" in func.attrs else func


_PRELUDE = re.compile(r'^(#define TVM_EXPORTS|#include "tvm/.*"|void\* __tvm_ffi__library_ctx = NULL;)$')
_ENTRY = "// CodegenC: NOTE: Auto-generated entry function"


def _clean(source: str, prefix: str) -> str:
    """TVM's C text → a self-contained translation unit with only ``prefix``-named symbols."""
    source = source.split(_ENTRY)[0]
    lines = [line for line in source.splitlines()
             if not _PRELUDE.match(line) and not line.startswith("// tvm target:")]
    text = "\n".join(lines)
    text = re.sub(r"#ifdef __cplusplus\nextern \"C\"\n#endif\n", "", text)
    text = text.replace("TVM_DLL ", "")
    text = re.sub(r"\bTVMBackendAllocWorkspace\b", f"{prefix}_workspace_alloc", text)
    text = re.sub(r"\bTVMBackendFreeWorkspace\b", f"{prefix}_workspace_free", text)
    text = re.sub(r"\b(expf|logf)\(", lambda m: f"{prefix}_{m.group(1)}(", text)
    # TIR's reinterpret of a float as uint32 prints as a pointer cast (strict-aliasing UB)
    text = re.sub(r"\*\(uint32_t \*\)\(&\((\w+)\)\)", lambda m: f"{prefix}_float_bits({m.group(1)})", text)
    # a failed workspace call returns -1 from a void function: record it for the executor instead
    text = text.replace("return -1;", f"{{ {prefix}_kernel_failed = 1; return; }}")
    text = _DEFINITION.sub(_mark_params_used, text)
    return text.strip() + "\n"


_DEFINITION = re.compile(r"^(\w+ \w+\(([^)]*)\)) \{$", re.MULTILINE)


def _mark_params_used(m: re.Match) -> str:
    """TVM passes a kernel tensors it may not read (nll_loss's logits): keep ``-Wextra`` quiet."""
    names = [p.split()[-1].lstrip("*") for p in m.group(2).split(",") if p.strip()]
    return m.group(1) + " {\n" + "".join(f"  (void){n};\n" for n in names)


def kernels_c(funcs: dict[str, tirx.PrimFunc], prefix: str) -> str:
    """C source of every kernel: ``{C name: PrimFunc}`` → one translation unit's text.

    Large integer values of loads (the int8 requantization) are set aside while the passes run
    (:mod:`.set_aside`: the same C, 350 s → 7 s for the int8 MobileNetV2 step's 409 kernels)."""
    target = tvm.target.Target(_TARGET)
    aside = SetAside()
    mod = tvm.IRModule({name: aside.set_aside(_plain(f, name)) for name, f in funcs.items()})
    mod = tirx.transform.BindTarget(target)(mod)
    mod = tvm.transform.Sequential(_LOWERING)(mod)
    mod = tvm.IRModule({gv: _pointer_params(f) for gv, f in mod.functions.items()})
    mod = tvm.transform.Sequential([tirx.transform.LowerTVMBuiltin(), tirx.transform.LowerIntrin(),
                                    aside.module_pass("put_back")])(mod)
    source = tvm.get_global_func("target.build.c")(mod, target).inspect_source()
    return _clean(source, prefix)
