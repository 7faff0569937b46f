"""Static memory planning: every buffer of a training step gets an offset in one arena.

The planner knows buffers (name, size, kind) and lifetimes (first and last kernel index), nothing of
Relax or TVM. The algorithm is TensorFlow Lite Micro's greedy planner, plus in-place chains:

1. Round every size up to ``alignment``; offsets are multiples of it (relative to an aligned arena base).
2. In-place hints: buffer B with ``reuse_of=A`` shares A's slot when A.last == B.first,
   B.size <= A.size and nobody else took A over (largest claimant wins); other hints are ignored.
   A chain A <- B <- C is one slot, alive from A.first to C.last, as big as its largest member.
3. Sort the slots by decreasing size (ties: earlier first step, then name) so the plan is deterministic.
4. Put each slot at the lowest offset that fits in a gap between the already-placed slots whose
   lifetimes intersect its own (or on top of them all).
5. The arena size is the highest end offset.

What it does not guarantee: an optimal arena. Packing intervals is NP-hard, and greedy-by-size can
lose to a hand plan (the four-buffer case in tests/test_memory_planner.py needs 200 bytes where 150
suffice). ``lower_bound`` (the largest live set) is a bound no plan beats, not a size it reaches.
The planner does not reorder kernels, split buffers or move them mid-life.

Views: a buffer with ``view_of=P`` has no slot of its own; it is the bytes of P from ``view_offset``
(a kernel that only copies a contiguous run of P, ``contiguous_slices``). Its lifetime must lie
within P's (the caller extends P's), and no buffer may take a view, or a P one of whose views is
still alive, over in place (the in-place writer would change bytes a view still reads).

``MemoryPlan.check_no_overlap`` verifies a plan independently; ``draw`` prints it as ASCII art and
``plot_png`` charts live bytes per kernel step, stacked by kind, under the arena size (the PNG is
written whole or not at all, ``tvm_tinytrain.files``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import replacing_file

KINDS = ("activation", "gradient", "scratch", "state")
_SYMBOLS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class Buffer:
    """A tensor's bytes, alive from kernel ``first`` (its writer) to kernel ``last`` (its last reader)."""

    name: str
    size: int
    first: int
    last: int
    kind: str
    reuse_of: str | None = None
    view_of: str | None = None  # the buffer whose bytes this one is (no slot of its own)
    view_offset: int = 0  # where in them it starts


def _round_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _validate(buffers: list[Buffer], alignment: int = 1) -> None:
    if alignment < 1:
        raise ValueError(f"alignment must be >= 1, got {alignment}")
    seen: set[str] = set()
    for b in buffers:
        if b.name in seen:
            raise ValueError(f"duplicate buffer name {b.name!r}")
        seen.add(b.name)
        if b.size < 0:
            raise ValueError(f"buffer {b.name!r} has negative size {b.size}")
        if not 0 <= b.first <= b.last:
            raise ValueError(f"buffer {b.name!r} has bad lifetime [{b.first}, {b.last}]")
    by_name = {b.name: b for b in buffers}
    for b in buffers:
        if b.view_of is None:
            continue
        p = by_name.get(b.view_of)
        if p is None or p is b:
            raise ValueError(f"buffer {b.name!r} is a view of {b.view_of!r}, which is not a buffer")
        if b.reuse_of is not None:
            raise ValueError(f"view {b.name!r} cannot also take {b.reuse_of!r} over in place")
        if not (0 <= b.view_offset and b.view_offset + b.size <= p.size and b.view_offset % alignment == 0):
            raise ValueError(f"view {b.name!r} (bytes [{b.view_offset}, {b.view_offset + b.size})) does not "
                             f"lie inside {p.name!r} ({p.size} B) at a multiple of {alignment}")
        if not p.first <= b.first <= b.last <= p.last:
            raise ValueError(f"view {b.name!r} (steps {b.first}..{b.last}) outlives {p.name!r} "
                             f"(steps {p.first}..{p.last})")
    for b in buffers:  # no cycles of views
        seen_views, name = set(), b.name
        while name is not None and name not in seen_views:
            seen_views.add(name)
            name = by_name[name].view_of
        if name is not None:
            raise ValueError(f"buffer {b.name!r} is a view of itself")


def _legal_hint(b: Buffer, by_name: dict[str, Buffer], viewed_until: dict[str, int]) -> bool:
    src = by_name.get(b.reuse_of) if b.reuse_of is not None else None
    return (src is not None and src is not b and src.last == b.first and b.size <= src.size
            and b.view_of is None and src.view_of is None and viewed_until.get(src.name, -1) < b.first)


def view_parents(name: str, buffers_by_name: dict[str, Buffer]):
    """The buffers a view lies in, nearest first: its parent, the parent's parent, ... (none for a
    buffer that is not a view). ``_validate`` has refused cycles."""
    parent = buffers_by_name[name].view_of
    while parent is not None:
        yield buffers_by_name[parent]
        parent = buffers_by_name[parent].view_of


def _viewed_until(buffers: list[Buffer]) -> dict[str, int]:
    """The last step a view of each viewed buffer (directly or through other views) is alive."""
    by_name = {b.name: b for b in buffers}
    until: dict[str, int] = {}
    for b in buffers:
        for p in view_parents(b.name, by_name):
            until[p.name] = max(until.get(p.name, -1), b.last)
    return until


def view_root(name: str, buffers_by_name: dict[str, Buffer]) -> tuple[str, int]:
    """The buffer whose slot a view lies in, and the view's offset from that slot's start."""
    chain = [buffers_by_name[name], *view_parents(name, buffers_by_name)]
    return chain[-1].name, sum(b.view_offset for b in chain[:-1])


def resolve_inplace(buffers: list[Buffer]) -> dict[str, str]:
    """The in-place hints the planner honours, as ``{buffer: input it takes over}``.

    A hint is legal when the input dies at the step this buffer is born and this buffer is no bigger.
    An input is taken over at most once (largest claimant first, then name); cycles are refused.
    """
    by_name = {b.name: b for b in buffers}
    viewed = _viewed_until(buffers)
    claims = sorted((b for b in buffers if _legal_hint(b, by_name, viewed)),
                    key=lambda b: (b.first, -b.size, b.name))
    taken: dict[str, str] = {}  # input -> successor
    accepted: dict[str, str] = {}  # successor -> input
    for b in claims:
        src = b.reuse_of
        if src in taken or _root(src, accepted) == b.name:
            continue
        taken[src] = b.name
        accepted[b.name] = src
    return accepted


def _root(name: str, inplace: dict[str, str]) -> str:
    while name in inplace:
        name = inplace[name]
    return name


@dataclass
class _Slot:
    root: str
    size: int  # raw bytes: the largest member
    first: int
    last: int
    members: list[str]


def _slots(buffers: list[Buffer], inplace: dict[str, str]) -> list[_Slot]:
    by_name = {b.name: b for b in buffers}
    slots: dict[str, _Slot] = {}
    for b in sorted(buffers, key=lambda b: (b.first, b.name)):  # chain order: inputs before successors
        if b.view_of is not None:
            continue  # a view has no slot: it lies in its parent's
        root = _root(b.name, inplace)
        slot = slots.get(root)
        if slot is None:
            r = by_name[root]
            slot = slots[root] = _Slot(root, 0, r.first, r.last, [])
        slot.members.append(b.name)
        slot.size = max(slot.size, b.size)
        slot.last = max(slot.last, b.last)
    return list(slots.values())


def _lowest_fit(size: int, offsets: np.ndarray, ends: np.ndarray) -> int:
    """The lowest offset where ``size`` bytes fit between the intervals [offsets, ends)."""
    if offsets.size == 0:
        return 0
    order = np.argsort(offsets, kind="stable")
    offs, ends = offsets[order], ends[order]
    covered = np.concatenate(([0], np.maximum.accumulate(ends)[:-1]))  # highest end below each interval
    fits = np.flatnonzero(offs - covered >= size)
    return int(covered[fits[0]]) if fits.size else int(max(ends.max(), 0))


def plan_memory(buffers: list[Buffer], alignment: int = 16) -> MemoryPlan:
    """Place every buffer in one arena: in-place chains first, then greedy by decreasing size."""
    _validate(buffers, alignment)
    inplace = resolve_inplace(buffers)
    slots = sorted(_slots(buffers, inplace), key=lambda s: (-s.size, s.first, s.root))
    n = len(slots)
    first, last = np.empty(n, np.int64), np.empty(n, np.int64)
    start, end = np.empty(n, np.int64), np.empty(n, np.int64)
    offsets: dict[str, int] = {}
    for i, slot in enumerate(slots):
        live = (first[:i] <= slot.last) & (last[:i] >= slot.first)
        size = _round_up(slot.size, alignment)
        offset = _lowest_fit(size, start[:i][live], end[:i][live])
        first[i], last[i], start[i], end[i] = slot.first, slot.last, offset, offset + size
        offsets.update(dict.fromkeys(slot.members, offset))
    by_name = {b.name: b for b in buffers}
    views = {b.name: b.view_of for b in buffers if b.view_of is not None}
    for name in views:
        root, delta = view_root(name, by_name)
        offsets[name] = offsets[root] + delta
    arena = int(end.max()) if n else 0
    return MemoryPlan(offsets, arena, list(buffers), alignment, inplace, views)


def _live_matrix(buffers: list[Buffer], inplace: dict[str, str], kinds: list[str],
                 alignment: int = 1) -> np.ndarray:
    """Bytes alive per (kind, kernel step). An input taken over in place counts, at the step its
    successor is born, only for the bytes the successor does not cover (so a chain counts once)."""
    steps = max((b.last for b in buffers), default=-1) + 1
    delta = np.zeros((len(kinds), steps + 1), np.int64)
    successor = {src: dst for dst, src in inplace.items()}
    by_name = {b.name: b for b in buffers}
    row = {k: i for i, k in enumerate(kinds)}
    for b in buffers:
        if b.view_of is not None:
            continue  # its bytes are its parent's
        k, size = row[b.kind], _round_up(b.size, alignment)
        delta[k, b.first] += size
        delta[k, b.last + 1] -= size
        if b.name in successor:
            shared = _round_up(by_name[successor[b.name]].size, alignment)
            delta[k, b.last] -= shared
            delta[k, b.last + 1] += shared
    return np.cumsum(delta, axis=1)[:, :steps]


def _kinds(buffers: list[Buffer]) -> list[str]:
    return list(KINDS) + sorted({b.kind for b in buffers} - set(KINDS))


def lower_bound(buffers: list[Buffer], alignment: int = 1) -> int:
    """The largest total size of buffers alive at one kernel step: no plan can use a smaller arena.

    In-place chains (as ``resolve_inplace`` accepts them) count once. With ``alignment`` > 1 sizes are
    rounded up first, which still bounds any plan whose offsets are multiples of ``alignment``.
    """
    _validate(buffers, alignment)
    live = _live_matrix(buffers, resolve_inplace(buffers), _kinds(buffers), alignment).sum(axis=0)
    return int(live.max()) if live.size else 0


@dataclass
class MemoryPlan:
    """Each buffer's offset in one arena; ``inplace`` maps a buffer to the input it took over in place,
    ``views`` a view to the buffer whose bytes it is."""

    offsets: dict[str, int]
    arena_bytes: int
    buffers: list[Buffer]
    alignment: int = 1
    inplace: dict[str, str] = field(default_factory=dict)
    views: dict[str, str] = field(default_factory=dict)

    # ----- live-set queries -------------------------------------------------------------------
    def _by_kind(self) -> tuple[list[str], np.ndarray]:
        kinds = _kinds(self.buffers)
        return kinds, _live_matrix(self.buffers, self.inplace, kinds)

    def live_bytes_per_step(self) -> list[int]:
        """Bytes alive at each kernel index (raw sizes; an in-place chain counts once)."""
        return [int(x) for x in self._by_kind()[1].sum(axis=0)]

    def peak_step(self) -> int:
        """The first kernel index with the most live bytes (0 for an empty plan)."""
        live = self.live_bytes_per_step()
        return int(np.argmax(live)) if live else 0

    def alive_at(self, step: int) -> list[Buffer]:
        """Buffers alive at ``step``, largest first (ties by name); views are in their parents."""
        alive = [b for b in self.buffers if b.first <= step <= b.last and b.view_of is None]
        return sorted(alive, key=lambda b: (-b.size, b.name))

    def bytes_by_kind(self) -> dict[str, int]:
        """The live set at the peak step split by kind: values sum to ``live_bytes_per_step()[peak]``.

        The four standard kinds are always present (0 when absent); other kinds are added after them.
        """
        kinds, live = self._by_kind()
        if live.shape[1] == 0:
            return dict.fromkeys(kinds, 0)
        peak = int(np.argmax(live.sum(axis=0)))
        return {k: int(live[i, peak]) for i, k in enumerate(kinds)}

    # ----- verification -------------------------------------------------------------------------
    def check_no_overlap(self) -> None:
        """Raise AssertionError naming two buffers alive at one step whose bytes overlap.

        Members of one in-place chain are allowed to share bytes, and so are a view and the buffers it
        is a view of (directly or through other views), where it must lie inside their bytes and
        lifetime. Also checks every buffer has an offset and lies inside the arena.
        """
        bufs = self.buffers
        for b in bufs:
            assert b.name in self.offsets, f"buffer {b.name!r} has no offset"
            off = self.offsets[b.name]
            assert 0 <= off and off + b.size <= self.arena_bytes, (
                f"buffer {b.name!r} [{off}, {off + b.size}) lies outside the arena of {self.arena_bytes} B")
        by_name = {b.name: b for b in bufs}
        ancestors: dict[str, set[str]] = {}
        for b in bufs:
            off = self.offsets[b.name]
            for p in view_parents(b.name, by_name):
                assert (self.offsets[p.name] <= off and off + b.size <= self.offsets[p.name] + p.size
                        and p.first <= b.first and b.last <= p.last), (
                    f"view {b.name!r} does not lie inside {p.name!r} (bytes or steps)")
            ancestors[b.name] = {p.name for p in view_parents(b.name, by_name)}
        first = np.array([b.first for b in bufs], np.int64)
        last = np.array([b.last for b in bufs], np.int64)
        start = np.array([self.offsets[b.name] for b in bufs], np.int64)
        end = start + np.array([b.size for b in bufs], np.int64)
        roots = {}
        group = np.array([roots.setdefault(_root(b.name, self.inplace), len(roots)) for b in bufs])
        for i in range(len(bufs)):
            j = np.arange(i + 1, len(bufs))
            bad = ((first[j] <= last[i]) & (first[i] <= last[j]) & (start[j] < end[i]) & (start[i] < end[j])
                   & (group[j] != group[i]) & (end[j] > start[j]) & (end[i] > start[i]))
            for other in np.flatnonzero(bad):  # a view and what it is a view of share their bytes
                b = bufs[int(j[other])]
                if b.name in ancestors[bufs[i].name] or bufs[i].name in ancestors[b.name]:
                    bad[other] = False
            if bad.any():
                a, b = bufs[i], bufs[int(j[np.argmax(bad)])]
                raise AssertionError(
                    f"buffers {a.name!r} (bytes [{start[i]}, {end[i]}), steps {a.first}..{a.last}) and "
                    f"{b.name!r} (bytes [{self.offsets[b.name]}, {self.offsets[b.name] + b.size}), "
                    f"steps {b.first}..{b.last}) overlap")

    # ----- pictures -----------------------------------------------------------------------------
    def draw(self, width: int = 80) -> str:
        """ASCII art: one row per kernel step, one column per ``arena/cols`` bytes, a letter per buffer.

        A cell shows the buffer that starts latest among those covering it ('.' when free); the
        legend below maps letters to buffers (letters repeat after 62 buffers).
        """
        live = self.live_bytes_per_step()
        steps = len(live)
        label = f"{max(steps - 1, 0):d}"
        total = f"{max(live, default=0):d}"
        cols = max(8, width - len(label) - len(total) - 5)
        scale = max(self.arena_bytes / cols, 1e-9)
        order = sorted(self.buffers, key=lambda b: (b.first, b.name))
        symbol = {b.name: _SYMBOLS[i % len(_SYMBOLS)] for i, b in enumerate(order)}
        peak = max(live, default=0)
        lines = [f"arena {self.arena_bytes} B, peak live {peak} B at step {self.peak_step()}, "
                 f"1 column = {scale:.1f} B"]
        for t in range(steps):
            row = ["."] * cols
            for b in order:
                if b.first <= t <= b.last and b.size > 0:
                    lo = int(self.offsets[b.name] / scale)
                    hi = max(lo + 1, int(np.ceil((self.offsets[b.name] + b.size) / scale)))
                    row[lo:min(hi, cols)] = [symbol[b.name]] * (min(hi, cols) - lo)
            lines.append(f"{t:>{len(label)}} |{''.join(row)}| {live[t]:>{len(total)}}")
        for b in order:
            extra = f", in place of {self.inplace[b.name]}" if b.name in self.inplace else ""
            lines.append(f"  {symbol[b.name]} {b.name}: {b.kind}, {b.size} B @ {self.offsets[b.name]}, "
                         f"steps {b.first}..{b.last}{extra}")
        return "\n".join(lines)

    def plot_png(self, path: str | Path, title: str = "Memory plan") -> Path:
        """Save a PNG of live bytes per kernel step, stacked by kind, with the arena size as a line."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        kinds, live = self._by_kind()
        keep = [i for i, k in enumerate(kinds) if k in KINDS or live[i].any()]
        steps = np.arange(live.shape[1])
        fig = Figure(figsize=(8, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        bottom = np.zeros(live.shape[1], np.int64)
        for i in keep:
            ax.fill_between(steps, bottom, bottom + live[i], step="mid", label=kinds[i], linewidth=0)
            bottom = bottom + live[i]
        ax.axhline(self.arena_bytes, color="black", linestyle="--", label=f"arena {self.arena_bytes} B")
        ax.set_xlabel("kernel step")
        ax.set_ylabel("live bytes")
        ax.set_title(title)
        ax.set_ylim(0, max(self.arena_bytes, int(bottom.max(initial=0)), 1) * 1.1)
        ax.legend(loc="upper right", fontsize="small")
        fig.tight_layout()
        with replacing_file(path) as tmp:  # whole or not at all; OutputError naming path and reason
            fig.savefig(tmp, format="png")
        return Path(path)
