"""The static memory planner: random lifetimes, in-place hints, a known greedy result, pictures."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tvm_tinytrain.memory import KINDS, Buffer, MemoryPlan, lower_bound, plan_memory, resolve_inplace


def random_buffers(rng: np.random.Generator, n: int, steps: int) -> list[Buffer]:
    """``n`` buffers over ``steps`` kernels; about a third carry an in-place hint, legal or not."""
    buffers: list[Buffer] = []
    for i in range(n):
        first = int(rng.integers(0, steps))
        last = int(min(steps - 1, first + rng.geometric(0.3) - 1))
        size = int(rng.choice([int(rng.integers(0, 64)), int(rng.integers(1, 4096))]))
        kind = str(rng.choice(list(KINDS) + ["other"]))
        reuse_of = None
        if buffers and rng.random() < 0.35:
            src = buffers[int(rng.integers(0, len(buffers)))]
            if rng.random() < 0.6:  # mostly make it legal
                first, size = src.last, int(rng.integers(0, src.size + 1))
                last = max(last, first)
            reuse_of = src.name
        buffers.append(Buffer(f"b{i}", size, first, last, kind, reuse_of))
    return buffers


def random_cases(count: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(rng.integers(1, 60))
        steps = int(rng.integers(1, 40))
        alignment = int(rng.choice([1, 4, 16, 64]))
        yield rng, random_buffers(rng, n, steps), alignment


def test_random_plans_are_valid_and_deterministic():
    ratios = []
    for rng, buffers, alignment in random_cases():
        plan = plan_memory(buffers, alignment=alignment)
        plan.check_no_overlap()
        bound = lower_bound(buffers, alignment=alignment)
        assert plan.arena_bytes >= bound >= lower_bound(buffers)
        assert plan.arena_bytes <= sum(-(-b.size // alignment) * alignment for b in buffers)
        assert all(off % alignment == 0 for off in plan.offsets.values())
        assert max(plan.live_bytes_per_step()) <= plan.arena_bytes
        assert sum(plan.bytes_by_kind().values()) == plan.live_bytes_per_step()[plan.peak_step()]
        for dst, src in plan.inplace.items():
            assert plan.offsets[dst] == plan.offsets[src]
        shuffled = [buffers[i] for i in rng.permutation(len(buffers))]
        again = plan_memory(shuffled, alignment=alignment)
        assert again.offsets == plan.offsets and again.arena_bytes == plan.arena_bytes
        if bound:
            ratios.append(plan.arena_bytes / bound)
    ratios = np.array(ratios)
    print(f"\narena / lower bound over {len(ratios)} cases: mean {ratios.mean():.4f}, "
          f"max {ratios.max():.4f}, optimal in {np.mean(ratios == 1.0):.0%}")


def test_unaligned_plan_fits_in_sum_of_sizes():
    for _, buffers, _ in random_cases(50, seed=1):
        plan = plan_memory(buffers, alignment=1)
        plan.check_no_overlap()
        assert lower_bound(buffers) <= plan.arena_bytes <= sum(b.size for b in buffers)


def test_known_greedy_result():
    # Greedy by size puts A and D at 0, B on top of A, and C must clear both B and D: 200 bytes,
    # where a hand plan (C at 0, D at 50) needs only the lower bound, 150.
    buffers = [
        Buffer("A", 100, 0, 1, "activation"),
        Buffer("B", 50, 1, 2, "activation"),
        Buffer("C", 50, 2, 3, "gradient"),
        Buffer("D", 80, 3, 4, "gradient"),
    ]
    plan = plan_memory(buffers, alignment=1)
    assert plan.offsets == {"A": 0, "D": 0, "B": 100, "C": 150}
    assert plan.arena_bytes == 200
    assert lower_bound(buffers) == 150
    assert plan.live_bytes_per_step() == [100, 150, 100, 130, 80]
    assert plan.peak_step() == 1
    assert [b.name for b in plan.alive_at(1)] == ["A", "B"]
    assert plan.bytes_by_kind() == {"activation": 150, "gradient": 0, "scratch": 0, "state": 0}
    hand = MemoryPlan({"A": 0, "B": 100, "C": 0, "D": 50}, 150, buffers)
    hand.check_no_overlap()


def test_greedy_fills_gaps_lowest_first():
    buffers = [
        Buffer("big", 64, 0, 9, "state"),
        Buffer("mid", 32, 0, 2, "activation"),
        Buffer("late", 32, 5, 9, "activation"),
        Buffer("small", 16, 1, 6, "scratch"),
    ]
    plan = plan_memory(buffers, alignment=16)
    # big at 0; mid and late (disjoint lifetimes) both at 64; small clears both of them.
    assert plan.offsets == {"big": 0, "mid": 64, "late": 64, "small": 96}
    assert plan.arena_bytes == 112


def test_alignment_rounds_sizes_and_offsets():
    buffers = [Buffer(f"x{i}", 10 + i, 0, 3, "activation") for i in range(5)]
    plan = plan_memory(buffers, alignment=16)
    plan.check_no_overlap()
    assert sorted(plan.offsets.values()) == [0, 16, 32, 48, 64]
    assert plan.arena_bytes == 80
    assert plan_memory(buffers, alignment=1).arena_bytes == sum(b.size for b in buffers)
    assert lower_bound(buffers, alignment=16) == 80
    with pytest.raises(ValueError):
        plan_memory(buffers, alignment=0)


def test_inplace_hint_honoured_when_legal():
    buffers = [
        Buffer("x", 64, 0, 2, "activation"),
        Buffer("relu", 64, 2, 4, "activation", reuse_of="x"),
        Buffer("grad", 48, 4, 6, "gradient", reuse_of="relu"),  # smaller: still legal
        Buffer("other", 64, 1, 5, "activation"),
    ]
    plan = plan_memory(buffers, alignment=16)
    plan.check_no_overlap()
    assert plan.inplace == {"relu": "x", "grad": "relu"}
    assert plan.offsets["x"] == plan.offsets["relu"] == plan.offsets["grad"]
    assert plan.arena_bytes == 128
    assert lower_bound(buffers) == 128  # the chain counts once at its shared steps
    assert plan.live_bytes_per_step() == [64, 128, 128, 128, 128, 112, 48]
    assert plan.bytes_by_kind() == {"activation": 128, "gradient": 0, "scratch": 0, "state": 0}


@pytest.mark.parametrize(
    "hint",
    [
        Buffer("y", 64, 1, 3, "activation", reuse_of="x"),  # lifetimes overlap beyond one step
        Buffer("y", 80, 2, 3, "activation", reuse_of="x"),  # bigger than its input
        Buffer("y", 64, 3, 4, "activation", reuse_of="x"),  # input already dead: not in place
        Buffer("y", 64, 2, 3, "activation", reuse_of="nope"),  # no such input
        Buffer("y", 64, 2, 3, "activation", reuse_of="y"),  # itself
    ],
)
def test_inplace_hint_ignored_when_illegal(hint):
    buffers = [Buffer("x", 64, 0, 2, "activation"), hint]
    plan = plan_memory(buffers, alignment=16)
    plan.check_no_overlap()
    assert plan.inplace == {}
    if hint.first <= 2:
        assert plan.offsets["x"] != plan.offsets["y"]


def test_inplace_one_claimant_and_no_cycles():
    buffers = [
        Buffer("x", 64, 0, 2, "activation"),
        Buffer("small", 16, 2, 3, "activation", reuse_of="x"),
        Buffer("large", 48, 2, 3, "activation", reuse_of="x"),
    ]
    assert resolve_inplace(buffers) == {"large": "x"}
    plan_memory(buffers).check_no_overlap()
    loop = [Buffer("p", 32, 1, 1, "scratch", reuse_of="q"), Buffer("q", 32, 1, 1, "scratch", reuse_of="p")]
    assert len(resolve_inplace(loop)) == 1
    plan = plan_memory(loop)
    plan.check_no_overlap()
    assert plan.offsets["p"] == plan.offsets["q"]


def test_check_no_overlap_names_the_buffers():
    buffers = [Buffer("a", 32, 0, 2, "activation"), Buffer("b", 32, 2, 3, "gradient")]
    with pytest.raises(AssertionError, match="'a'.*'b'"):
        MemoryPlan({"a": 0, "b": 16}, 64, buffers).check_no_overlap()
    with pytest.raises(AssertionError, match="outside the arena"):
        MemoryPlan({"a": 0, "b": 48}, 64, buffers).check_no_overlap()
    MemoryPlan({"a": 0, "b": 32}, 64, buffers).check_no_overlap()
    MemoryPlan({"a": 0, "b": 0}, 32, [buffers[0], Buffer("b", 32, 3, 3, "gradient")]).check_no_overlap()


def test_bad_buffers_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        plan_memory([Buffer("a", 1, 0, 0, "state"), Buffer("a", 1, 0, 0, "state")])
    with pytest.raises(ValueError, match="lifetime"):
        plan_memory([Buffer("a", 1, 3, 2, "state")])
    with pytest.raises(ValueError, match="negative"):
        plan_memory([Buffer("a", -1, 0, 0, "state")])


def test_empty_and_zero_size():
    plan = plan_memory([])
    assert plan.arena_bytes == 0 and plan.live_bytes_per_step() == [] and lower_bound([]) == 0
    assert plan.bytes_by_kind() == dict.fromkeys(KINDS, 0)
    plan.draw()
    plan = plan_memory([Buffer("z", 0, 0, 1, "scratch"), Buffer("a", 16, 0, 1, "state")])
    plan.check_no_overlap()
    assert plan.arena_bytes == 16


def test_draw_and_plot_png(tmp_path):
    buffers = random_buffers(np.random.default_rng(7), 12, 10)
    plan = plan_memory(buffers)
    art = plan.draw(width=72)
    print("\n" + art)
    rows = [line for line in art.splitlines() if "|" in line]
    assert len(rows) == len(plan.live_bytes_per_step())
    assert all(len(line) <= 72 for line in rows)
    assert all(b.name in art for b in buffers)
    path = plan.plot_png(tmp_path / "plan.png", title="random plan")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_2000_buffers():
    buffers = random_buffers(np.random.default_rng(3), 2000, 600)
    start = time.perf_counter()
    plan = plan_memory(buffers)
    planned = time.perf_counter() - start
    plan.check_no_overlap()
    checked = time.perf_counter() - start - planned
    bound = lower_bound(buffers, alignment=16)
    print(f"\n2000 buffers: planned in {planned:.3f} s, checked in {checked:.3f} s, "
          f"arena {plan.arena_bytes} B vs lower bound {bound} B ({plan.arena_bytes / bound:.3f}x)")
    assert plan.arena_bytes >= bound
