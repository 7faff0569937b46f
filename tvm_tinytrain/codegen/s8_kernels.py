"""The int8 forward kernels as calls to hand-written C (``runtime/tinytrain_s8.c``).

``use_hand_kernels(mod)`` replaces each PrimFunc that ``relay_passes/int8_ops`` tagged
``tinytrain.qop`` (a quantized conv or fully connected layer) and that a C kernel covers by a
PrimFunc with the same parameters whose body is one ``T.call_extern``: the geometry, zero points
and clamp baked in as int32 constants, the kernel's scratch as a buffer the function allocates
(the arena's, in the C artifact). The same C then serves the C artifact (``kernels_c`` prints the
prototype) and the host llvm build (the symbol resolved from a library loaded RTLD_GLOBAL)::

    @T.prim_func                                        # tagged tinytrain.qop = "tinytrain_qconv"
    def qconv(in0: T.Buffer((1, 16, 32, 32), "int8"), in1: T.Buffer((96, 16, 1, 1), "int8"), ...,
              y: T.Buffer((1, 96, 32, 32), "int8")):
        ... the TE kernel's blocks ...

    @T.prim_func                                        # + tinytrain.hand_kernel = "tinytrain_s8_conv_1x1"
    def qconv(in0: T.Buffer((1, 16, 32, 32), "int8"), in1: ..., y: T.Buffer((1, 96, 32, 32), "int8")):
        scratch = T.alloc_buffer((272,), "int16")
        T.call_extern("int32", "tinytrain_s8_conv_1x1", in0.data, in1.data, in2.data, in3.data,
                      in4.data, y.data, scratch.data, 16, 1024, 96, 16, -128, -128, -128, 127)

Covered (batch 1): a conv with groups 1 (1x1 stride 1 unpadded: ``tinytrain_s8_conv_1x1``; any
other: ``tinytrain_s8_conv``), a depthwise conv with channel multiplier 1
(``tinytrain_s8_depthwise``, tagged ``tinytrain.inplace_in = [0]`` when its output fits in its
input: the C may then write y over x), a fully connected layer (``tinytrain_s8_linear``). Anything
else keeps its TE kernel. The ``*_scratch`` functions are the one place the scratch sizes live.
"""

from __future__ import annotations

import tvm
from tvm import tirx

RUNTIME_SOURCES = ("tinytrain_s8.c", "tinytrain_s8.h")  # under codegen/runtime

QOP = "tinytrain.qop"
HAND_KERNEL = "tinytrain.hand_kernel"
INPLACE_IN = "tinytrain.inplace_in"


def pass_pixels(k: int) -> int:
    """Pixels a conv packs per pass over its output channels (their columns of ``k`` in the scratch):
    up to sixteen when the columns are short, so each output channel pair's set-up serves more
    outputs, down to two (beyond two pixels, at most 512 int16 of columns)."""
    return 2 * max(1, min(8, 256 // k))


def conv_1x1_scratch(in_c: int) -> tuple[int, str]:
    """(elements, dtype): one pass's columns of x - zx and the column being packed."""
    return (pass_pixels(in_c) + 1) * in_c, "int16"


def conv_scratch(in_c: int, kh: int, kw: int) -> tuple[int, str]:
    """(elements, dtype): one pass's im2col columns and the column being packed."""
    k = in_c * kh * kw
    return (pass_pixels(k) + 1) * k, "int16"


def depthwise_scratch(oh: int, ow: int, kh: int, kw: int, sh: int, sw: int) -> tuple[int, str]:
    """(elements, dtype): one input plane padded with the zero point (the rows and columns the output
    reads), 4 bytes of slack, and a channel's taps widened to int16 pairs for SMLAD."""
    taps = 4 * kh * (2 * (kw // 4) + kw % 4)
    return ((oh - 1) * sh + kh) * ((ow - 1) * sw + kw) + 4 + taps, "int8"


def linear_scratch(k: int) -> tuple[int, str]:
    """(elements, dtype): x - zx, packed, and unpacked."""
    return 2 * k, "int16"


def _shape(param) -> list[int]:
    return [int(d) for d in param.ty.shape]


def _hand_call(func: tirx.PrimFunc) -> tuple[str, tuple[int, str], list[int], bool] | None:
    """(C name, scratch, scalars, in place) of the kernel that computes ``func``, or None."""
    kw = {str(k): v for k, v in func.attrs["tinytrain.qkwargs"].items()}
    zx, zy, lo, hi = (int(kw[k]) for k in ("zx", "zy", "lo", "hi"))
    x, w = _shape(func.params[0]), _shape(func.params[1])
    y = _shape(func.params[-1])
    if x[0] != 1:
        return None
    if str(func.attrs[QOP]) == "tinytrain_qlinear":
        return "tinytrain_s8_linear", linear_scratch(x[1]), [x[1], w[0], zx, zy, lo, hi], False
    (_, c, h, wd), (o, i_g, kh, kwd), (_, _, oh, ow) = x, w, y
    (sh, sw), (pt, pl, pb, pr) = [int(v) for v in kw["strides"]], [int(v) for v in kw["padding"]]
    groups = int(kw["groups"])
    if groups == 1:
        if (kh, kwd, sh, sw, pt, pl, pb, pr) == (1, 1, 1, 1, 0, 0, 0, 0):
            return ("tinytrain_s8_conv_1x1", conv_1x1_scratch(c),
                    [c, h * wd, o, pass_pixels(c), zx, zy, lo, hi], False)
        geometry = [c, h, wd, o, oh, ow, kh, kwd, sh, sw, pt, pl, pass_pixels(c * kh * kwd)]
        return "tinytrain_s8_conv", conv_scratch(c, kh, kwd), [*geometry, zx, zy, lo, hi], False
    if groups == c == o and i_g == 1:
        return ("tinytrain_s8_depthwise", depthwise_scratch(oh, ow, kh, kwd, sh, sw),
                [c, h, wd, oh, ow, kh, kwd, sh, sw, pt, pl, zx, zy, lo, hi], oh * ow <= h * wd)
    return None


def hand_kernel(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` (a tagged quantized kernel) as a call to its C kernel, or None when none covers it."""
    call = _hand_call(func)
    if call is None:
        return None
    name, (size, dtype), scalars, inplace = call
    # from the arena's workspace window whatever its size (TVM prints one under 1 KB as a stack array,
    # which the planner, which reserves it in the arena, would count twice)
    scratch = tirx.decl_buffer((size,), dtype, "scratch", scope="global.workspace")
    pointers = [tirx.buffer_data(p) for p in func.params] + [tirx.buffer_data(scratch)]
    body = tirx.SeqStmt([tirx.AllocBuffer(scratch), tirx.Evaluate(tirx.call_extern(
        "int32", name, *pointers, *(tirx.IntImm("int32", v) for v in scalars)))])
    attrs = {k: v for k, v in func.attrs.items() if k != "tirx.noalias"}  # y may be x
    attrs[HAND_KERNEL] = name
    # opaque (relax.OpPatternKind.kOpaque): AnnotateTIROpPattern would take a body that is one extern
    # call for elementwise (and keeps a pattern already set), so FuseOps would fuse the conv with its
    # neighbours and the planner let its output overwrite its input
    attrs["op_pattern"] = 8
    if inplace:
        attrs[INPLACE_IN] = [0]
    return tirx.PrimFunc(func.params, body, attrs=tvm.ir.make_node("ir.DictAttrs", **attrs))


def use_hand_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every tagged quantized kernel that a C kernel covers calling it instead."""
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and QOP in func.attrs:
            new = hand_kernel(func)
            if new is not None:
                out[gv] = new
    return out
