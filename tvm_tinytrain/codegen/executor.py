"""The C executor: one static arena, the kernels called in plan order, the C API.

It replaces microTVM's AOT executor. Every tensor of a step is an address fixed at
compile time: an offset in ``<prefix>_arena`` (activations, gradients, kernel
scratch, the sample), a RAM array (trainable parameters, optimizer state, which
the updates overwrite in place) or a ``const`` array in flash (frozen parameters,
constants). A kernel call reads::

    /* k12 conv2d7: lv30, conv9.weight -> t12:lv31 */
    tinytrain_conv2d7(A(float, 34816), (float*)tinytrain_frozen_9, A(float, 0));
    #ifdef TINYTRAIN_PROFILE
      tinytrain_profile_kernel(12u);
    #endif

Each call is followed by a profile mark that only a build defining ``TINYTRAIN_PROFILE`` sees
(the ``qemu_cortex_m7`` template's ``profile`` option; ``tvm_tinytrain.micro.profile`` reads the
table): one slot per kernel, train_step's kernels ``0 .. n-1``, then predict's ``n .. n+m-1``. The
generated C never calls the mark without the macro, so a default build is the same program.
"""

from __future__ import annotations

import re

import numpy as np

from ..memory_report import LoweredFunction

PREFIX = "tinytrain"

C_TYPES = {"float32": "float", "float64": "double", "int8": "int8_t", "uint8": "uint8_t",
           "int16": "int16_t", "int32": "int32_t", "int64": "int64_t", "bool": "bool"}


def c_type(dtype: str) -> str:
    try:
        return C_TYPES[dtype]
    except KeyError:
        raise NotImplementedError(f"no C type for tensor dtype {dtype}") from None


def c_array(values: np.ndarray) -> str:
    """An initializer list that reads back bit for bit (9 significant digits for float32)."""
    flat = np.asarray(values).reshape(-1)
    if flat.dtype.kind == "f":
        if not np.all(np.isfinite(flat)):
            raise ValueError("a parameter holds inf or NaN; the model file is damaged")
        items = [_float_literal(v) for v in flat.astype(np.float64).tolist()]
    elif flat.dtype == np.bool_:
        items = ["1" if v else "0" for v in flat.tolist()]
    else:
        items = [str(int(v)) for v in flat.tolist()]
    lines = [", ".join(items[i:i + 8]) for i in range(0, len(items), 8)]
    return "{\n  " + ",\n  ".join(lines) + "\n}" if items else "{0}"


def _float_literal(v: float) -> str:
    text = f"{v:.9g}"
    return (text if any(c in text for c in ".e") else text + ".0") + "f"


def symbol(name: str) -> str:
    """A C identifier for a tensor name (``conv9.weight[:42]`` → ``conv9_weight_42``)."""
    return re.sub(r"\W+", "_", name).strip("_")


class Storage:
    """Where each tensor lives: the C expression of its address, by tensor name."""

    def __init__(self, persistent: dict[str, str], flash: dict[str, str]):
        self.persistent = persistent  # name → RAM array symbol (trainable, state)
        self.flash = flash  # name → const array symbol

    def address(self, name: str, fn: LoweredFunction) -> str:
        dtype = fn.tensors[name].dtype
        ctype = c_type(dtype)
        target = fn.in_place.get(name, name)
        if target in self.persistent:
            return f"(({ctype}*){self.persistent[target]})"
        if target in self.flash:
            return f"(({ctype}*){self.flash[target]})"
        return f"A({ctype}, {fn.plan.offsets[name]})"


def persistent_writes(fn: LoweredFunction, storage: Storage, k) -> list[str]:
    """The persistent tensors (trainable parameters, optimizer state) kernel ``k`` writes over."""
    targets = []
    for o in k.outputs:
        source = k.inplace.get(o, o)  # an in-place output is its input's buffer
        target = fn.in_place.get(source, source)
        if target in storage.persistent:
            targets.append(target)
    return targets


# The profile slots: each function's kernels follow those of the functions before it in this order.
PROFILED_FUNCTIONS = ("train_step", "predict")
PROFILE_MACRO = f"{PREFIX.upper()}_PROFILE"


def profile_slot(function: str, kernel_index: int) -> str:
    """The C expression of a kernel's profile slot: train_step's kernels count from 0, predict's
    follow them through the count train_step's body defines (its body comes first in the file)."""
    before = PROFILED_FUNCTIONS[:PROFILED_FUNCTIONS.index(function)]
    return " + ".join([*(_kernel_count_macro(f) for f in before), f"{kernel_index}u"])


def _kernel_count_macro(function: str) -> str:
    return f"{PROFILE_MACRO}_{function.upper()}_KERNELS"


def _profiled(line: str) -> list[str]:
    return [f"#ifdef {PROFILE_MACRO}", line, "#endif"]


def function_body(fn: LoweredFunction, storage: Storage, kernel_symbols: dict[str, str],
                  workspace: dict[str, int], after: dict[int, list[str]] | None = None) -> list[str]:
    """The kernel calls of one function, in plan order, each with its scratch window set first,
    its profile mark (``#ifdef TINYTRAIN_PROFILE``, train_step and predict) right after it, then
    the lines ``after[kernel index]`` (checks). A kernel whose outputs the plan made views of its
    input (``MemoryPlan.views``) is not called: its outputs already are those bytes."""
    lines = []
    for k in fn.kernels:
        lines.append(f"  /* k{k.index} {k.func}: {', '.join(k.inputs)} -> {', '.join(k.outputs)} */")
        if all(o in fn.plan.views for o in k.outputs):  # its outputs are views of its input: no copy
            lines.append("  /* (views of the input: nothing to copy) */")
        else:
            lines += _kernel_call(fn, storage, k, kernel_symbols[k.func], workspace)
        if fn.name in PROFILED_FUNCTIONS:
            lines += _profiled(f"  {PREFIX}_profile_kernel({profile_slot(fn.name, k.index)});")
        lines += (after or {}).get(k.index, [])
    if fn.name in PROFILED_FUNCTIONS[:-1]:  # the later functions' slots start after this one's
        lines += _profiled(f"#define {_kernel_count_macro(fn.name)} {len(fn.kernels)}u")
    return lines


def _kernel_call(fn: LoweredFunction, storage: Storage, k, symbol: str,
                 workspace: dict[str, int]) -> list[str]:
    """Kernel ``k``'s call, its scratch window set first."""
    fresh = [o for o in k.outputs if o not in k.inplace]  # an in-place output is its input's buffer
    args = [storage.address(n, fn) for n in (*k.inputs, *fresh)]
    lines = []
    need = workspace.get(symbol, 0)
    if need:
        slot = f"{k.outputs[0]}:scratch"
        if slot not in fn.plan.offsets or need > _slot_bytes(fn, slot):
            raise AssertionError(f"kernel {k.func} needs {need} B of workspace; the plan gave it less")
        lines.append(f"  {PREFIX}_workspace_window({fn.plan.offsets[slot]}u, {need}u);")
    return lines + [f"  {symbol}({', '.join(args)});"]


def _slot_bytes(fn: LoweredFunction, name: str) -> int:
    size = next(b.size for b in fn.plan.buffers if b.name == name)
    return -(-size // fn.plan.alignment) * fn.plan.alignment


WORKSPACE_CALL = re.compile(rf"{PREFIX}_workspace_alloc\(1, 0, \(uint64_t\)(\d+)ULL")
FUNCTION = re.compile(r"^void (\w+)\(", re.MULTILINE)


def workspace_bytes(kernels_source: str, alignment: int = 16) -> dict[str, int]:
    """Bytes each C kernel asks the workspace allocator for (each call rounded to ``alignment``)."""
    need: dict[str, int] = {}
    starts = [(m.start(), m.group(1)) for m in FUNCTION.finditer(kernels_source)]
    for (start, name), (end, _) in zip(starts, [*starts[1:], (len(kernels_source), "")]):
        calls = WORKSPACE_CALL.findall(kernels_source[start:end])
        if calls:
            need[name] = sum(-(-int(n) // alignment) * alignment for n in calls)
    return need
