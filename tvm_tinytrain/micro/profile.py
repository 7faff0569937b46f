"""Instructions per kernel on the emulated Cortex-M7: the ``qemu_cortex_m7`` template's profile build.

A project made with :func:`profile_options` (``profile=1``) compiles the executor's profile marks
(``codegen/executor.py``): after each kernel call, the instructions since the clock's last reading
(the previous mark, or the protocol's reading just before the step began) are added to the kernel's
slot, train_step's kernels ``0 .. n-1`` then predict's. The device writes the table to
``build/profile.bin`` when it exits (end of the session); :func:`read_profile` maps the slots back to
the artifact's plan (``metadata.json``) and to the C function each slot called (``tinytrain_model.c``)::

    project = micro.create_project(artifact, "qemu_cortex_m7", "prof", profile_options(artifact))
    project.build()
    with project.session() as dev:
        dev.train_step(x, y)
    profile = read_profile(project)
    print(profile.markdown("train_step"))   # instructions per kernel family, per call

What it measures: a slot holds its kernel and the executor lines just before its call (the scratch
window, the previous kernel's checks), and the previous mark's own ~30 instructions; the slots of a
step sum to the step's ``last_cost`` less what runs after its last kernel (the rollback copies, the
return). The clock is SysTick under ``-icount shift=0``: it counts in steps of 40 instructions, so a
small kernel reads 0 or 40 while the sums stay exact. Families: a hand-written kernel by its C name; a
TVM kernel by its PrimFunc name without the trailing number, a convolution also by its weight's layer
kind and window (``qconv dwconv 3x3``).
"""

from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..codegen.artifact import Artifact
from ..codegen.executor import PROFILED_FUNCTIONS as FUNCTIONS  # the slot order
from ..errors import InputError
from .project import Project

PROFILE_FILE = "build/profile.bin"
MAGIC, VERSION = 0x46505454, 1  # "TTPF"
PREFIX = "tinytrain_"
# C sources of an artifact that hold no kernels: the executor, the parameters, the float helpers.
NOT_KERNELS = ("tinytrain_model.c", "tinytrain_params.c", "tinytrain_math.c", "tinytrain_kernels.c")


def profile_options(artifact: Artifact | dict) -> dict[str, str]:
    """The ``qemu_cortex_m7`` options of a profiling build of ``artifact`` (or its metadata): one slot
    per kernel of train_step and predict."""
    metadata = artifact.metadata if isinstance(artifact, Artifact) else artifact
    slots = sum(len(metadata["plan"][f]) for f in FUNCTIONS)
    return {"profile": "1", "profile_slots": str(max(slots, 1))}


@dataclass(frozen=True)
class KernelCost:
    """One kernel's slot: its instructions summed over ``calls`` calls of its function."""

    function: str  # "train_step" or "predict"
    kernel: int  # its index in the function's plan
    func: str  # the TIR PrimFunc
    symbol: str  # the C function the executor calls
    family: str
    calls: int
    instructions: int

    @property
    def per_call(self) -> float:
        return self.instructions / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class FamilyCost:
    family: str
    kernels: int  # kernels of the family in the function
    instructions: float  # per call of the function
    share: float  # of the function's profiled instructions


@dataclass
class Profile:
    kernels: list[KernelCost]

    def of(self, function: str) -> list[KernelCost]:
        """The kernels of ``function`` in plan order."""
        if function not in FUNCTIONS:
            raise InputError(f"no profile of {function!r}; profiled: {', '.join(FUNCTIONS)}")
        return [k for k in self.kernels if k.function == function]

    def calls(self, function: str) -> int:
        """How many times ``function`` ran in the session (0: never)."""
        return max((k.calls for k in self.of(function)), default=0)

    def total(self, function: str) -> float:
        """Instructions of the profiled kernels per call of ``function``."""
        return sum(k.per_call for k in self.of(function))

    def by_family(self, function: str) -> list[FamilyCost]:
        """Instructions per call of ``function`` by kernel family, the most first."""
        kernels: dict[str, list[KernelCost]] = defaultdict(list)
        for k in self.of(function):
            kernels[k.family].append(k)
        total = self.total(function) or 1.0
        rows = [FamilyCost(f, len(ks), sum(k.per_call for k in ks), sum(k.per_call for k in ks) / total)
                for f, ks in kernels.items()]
        return sorted(rows, key=lambda r: (-r.instructions, r.family))

    def markdown(self, function: str, top: int | None = None) -> str:
        """The family table of ``function`` (the ``top`` families, the rest on one line)."""
        rows = self.by_family(function)
        shown, rest = (list(rows), []) if top is None else (rows[:top], rows[top:])
        lines = [f"| {function} kernel family | kernels | instructions per call | share |",
                 "| --- | ---: | ---: | ---: |"]
        if rest:
            shown.append(FamilyCost(f"{len(rest)} other families", sum(r.kernels for r in rest),
                                    sum(r.instructions for r in rest), sum(r.share for r in rest)))
        lines += [f"| {r.family} | {r.kernels} | {r.instructions:,.0f} | {100 * r.share:.1f} % |"
                  for r in shown]
        lines.append(f"| total | {len(self.of(function))} | {self.total(function):,.0f} | 100 % |")
        return "\n".join(lines)


def read_profile(project: Project | str | Path) -> Profile:
    """The profile a ``profile=1`` project's device wrote at its last exit, mapped to its kernels."""
    root = project.path if isinstance(project, Project) else Path(project)
    path = root / PROFILE_FILE
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"no profile at {path} ({err.strerror}): make the project with "
                         "profile_options(artifact), run a session and close it") from None
    if len(data) < 16:
        raise InputError(f"{path} is {len(data)} bytes, too short for a profile; run the session again")
    magic, version, slots, lost = struct.unpack_from("<4I", data)
    if magic != MAGIC or version != VERSION or len(data) != 16 + 12 * slots:
        raise InputError(f"{path} is not a version-{VERSION} profile of the qemu_cortex_m7 template; "
                         "build the project again")
    cost = struct.unpack_from(f"<{slots}Q", data, 16)
    marks = struct.unpack_from(f"<{slots}I", data, 16 + 8 * slots)
    metadata = _metadata(root)
    plan = [(f, k) for f in FUNCTIONS for k in metadata["plan"][f]]
    if lost or slots < len(plan):
        raise InputError(f"the profile has {slots} slots for {len(plan)} kernels: make the project with "
                         f"profile_options(artifact) (profile_slots={len(plan)})")
    src = root / "model" / "src"
    symbols = _called_symbols(src / "tinytrain_model.c", len(plan))
    hand = hand_kernels(src)
    shapes = {t["name"]: t["shape"] for t in (*metadata["trainable"], *metadata["frozen"])}
    kernels = []
    for slot, (function, k) in enumerate(plan):
        symbol = symbols.get(slot, PREFIX + k["func"])
        family = kernel_family(k["func"], hand.get(symbol, symbol), k["inputs"], shapes)
        kernels.append(KernelCost(function, k["kernel"], k["func"], symbol, family, marks[slot], cost[slot]))
    return Profile(kernels)


def kernel_family(func: str, symbol: str, inputs: list[str], shapes: dict[str, list[int]]) -> str:
    """A hand-written kernel's C name (``symbol`` is not the PrimFunc's own) without the prefix; else
    the PrimFunc's name without its trailing number, with the layer kind and window of the first layer
    weight it reads (``qconv conv 1x1``; ``shapes``: tensor name → shape)."""
    name = symbol.removeprefix(PREFIX)
    if name != func:
        return name
    family = re.sub(r"\d+$", "", func)
    for tensor in inputs:
        match = re.fullmatch(r"([a-z]+)\d+\.weight(\[.*\])?", tensor)
        shape = shapes.get(tensor.split("[")[0]) if match else None
        if shape and len(shape) == 4:
            return f"{family} {match.group(1)} {shape[2]}x{shape[3]}"
        if shape:
            return f"{family} {match.group(1)}"
    return family


def _metadata(root: Path) -> dict:
    path = root / "model" / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {path} ({err}); make the project again") from None


_CALL = re.compile(rf"^  ({PREFIX}\w+)\(", re.MULTILINE)
_MARK = re.compile(rf"^  {PREFIX}profile_kernel\(([^;]*)\);", re.MULTILINE)


def _called_symbols(model_c: Path, slots: int) -> dict[int, str]:
    """Slot → the C function called just before its mark, from the executor's source."""
    try:
        text = model_c.read_text()
    except OSError:
        return {}
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define (\w+_KERNELS) (\d+)u", text)}
    out, last = {}, None
    for line in text.splitlines():
        call, mark = _CALL.match(line), _MARK.match(line)
        if mark:
            terms = [t.strip() for t in mark.group(1).split("+")]
            slot = sum(counts.get(t, 0) if not t.endswith("u") else int(t[:-1]) for t in terms)
            if last is not None and slot < slots:
                out[slot] = last
        elif call and not call.group(1).startswith((f"{PREFIX}workspace", f"{PREFIX}profile")):
            last = call.group(1)
    return out


_DEFINITION = re.compile(rf"^\w[\w ]*?\**\s*\b({PREFIX}\w+)\([^;{{]*\)\s*{{", re.MULTILINE)


def hand_kernels(src: Path) -> dict[str, str]:
    """C symbol the executor calls → the hand-written kernel it is or calls: a function the artifact
    defines outside TVM's kernels and the executor (a TVM kernel that calls one is a wrapper)."""
    hand = set()
    for path in src.glob("*.c"):
        if path.name not in NOT_KERNELS:
            hand.update(m.group(1) for m in _DEFINITION.finditer(path.read_text()))
    out = {name: name for name in hand}
    tvm_kernels = src / "tinytrain_kernels.c"
    if hand and tvm_kernels.is_file():
        text = tvm_kernels.read_text()
        starts = list(_DEFINITION.finditer(text))
        for m, end in zip(starts, [*(n.start() for n in starts[1:]), len(text)]):
            called = [c for c in re.findall(rf"\b({PREFIX}\w+)\(", text[m.end():end]) if c in hand]
            if called:
                out[m.group(1)] = called[0]
    return out
