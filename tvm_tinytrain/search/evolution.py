"""The evolutionary search: the sparse update with the largest summed gain under a memory budget.

A candidate is a bias depth k and, per candidate layer, a weight ratio or none. Its fitness is
``bias_gain[k] + Σ weight_gain[(layer, r)]`` (the contribution analysis' measurements, assumed to add
up, as in the paper); its cost comes from a cost function (the calibrated ``MemoryModel.cost``).

1. The population starts with the bias-only candidates (each k, no weights: a feasible answer whenever
   any bias depth fits) and random sparse ones.
2. Each generation keeps the elite and the best candidate of every bias depth, and breeds the rest by
   tournament, uniform crossover and mutation; every child is repaired as in a knapsack GA: lowered
   gene by gene, least gain lost per byte first, until it fits, then raised while it still fits.
3. The best candidate of each bias depth is then improved by hill climbing (changes of one or two
   genes, or a raise paid for by lowering others), and the best of them is the answer.

Deterministic for a seed. It does not promise the optimum (the problem is a knapsack); the tests
compare it with :func:`exhaustive` on small random instances. :func:`fit_to_planner` plans the winner
with the real planner and searches again, under a budget corrected by the planner's verdict.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .memory_model import key, parse, scheme_of

Cost = Callable[[int, dict[int, float]], int]


@dataclass
class Candidate:
    k: int  # the biases of the last k layers learn (and the classifier)
    ratios: dict[int, float]  # layer -> ratio of its output channels whose weights learn
    gain: float  # summed measured gains
    cost: int  # bytes: the cost function's, or the planner's after fit_to_planner

    def scheme(self) -> dict:
        return scheme_of(self.k, self.ratios)


class _Space:
    """Genomes are tuples: ``g[0]`` indexes the bias depths, ``g[1 + j]`` the choices of layer
    ``layers[j]`` (0 = no weights, then its ratios in increasing order)."""

    def __init__(self, bias_gain: dict[int, float], weight_gain: dict[tuple[int, float], float],
                 cost: Cost, budget: int):
        self.ks = sorted(bias_gain)
        self.layers = sorted({i for i, _ in weight_gain})
        self.choices = [[None, *sorted(r for j, r in weight_gain if j == i)] for i in self.layers]
        self.gains = [[float(bias_gain[k]) for k in self.ks]] + [
            [0.0, *(float(weight_gain[(i, r)]) for r in c[1:])] for i, c in zip(self.layers, self.choices)]
        self.sizes = [len(table) for table in self.gains]
        self._cost, self.budget = cost, budget
        self._memo: dict[tuple, int] = {}
        self._repaired: dict[tuple, tuple] = {}
        zero = (0,) * len(self.sizes)  # bytes per gene value, estimated around the smallest candidate
        self.unit = [[self.cost(_with(zero, [(p, v)])) - (self.cost(zero) if p else 0) for v in range(size)]
                     for p, size in enumerate(self.sizes)]
        n, m = len(self.sizes), max(self.sizes)  # the same as arrays, padded
        self.rows, self.cols = np.arange(n), np.arange(m)
        self.valid = self.cols[None, :] < np.array(self.sizes)[:, None]
        self.gain_table, self.unit_table = np.zeros((n, m)), np.zeros((n, m), dtype=np.int64)
        for p, size in enumerate(self.sizes):
            self.gain_table[p, :size], self.unit_table[p, :size] = self.gains[p], self.unit[p]

    def decode(self, g: tuple) -> tuple[int, dict[int, float]]:
        return self.ks[g[0]], {i: c[v] for i, c, v in zip(self.layers, self.choices, g[1:]) if v}

    def gain(self, g: tuple) -> float:
        return sum(table[v] for table, v in zip(self.gains, g))

    def cost(self, g: tuple) -> int:
        if g not in self._memo:
            self._memo[g] = int(self._cost(*self.decode(g)))
        return self._memo[g]

    def repaired(self, g: tuple) -> tuple:
        if g not in self._repaired:
            self._repaired[g] = _repair(self, g)
        return self._repaired[g]

    def rank(self, g: tuple) -> tuple:
        """Sort key, smaller is better: feasible first by gain then cost, infeasible by overshoot."""
        c = self.cost(g)
        return (0, -self.gain(g), c, g) if c <= self.budget else (1, c, 0, g)

    def candidate(self, g: tuple) -> Candidate:
        k, ratios = self.decode(g)
        return Candidate(k, ratios, self.gain(g), self.cost(g))


def _with(g: tuple, changes) -> tuple:
    h = list(g)
    for p, v in changes:
        h[p] = v
    return tuple(h)


def _repair(space: _Space, g: tuple) -> tuple:
    """Fit, then fill (a knapsack GA's repair): while over the budget, lower the gene that loses the
    least gain per byte freed; then raise, in order of gain per byte, each gene whose raise still fits.
    Bytes per change are estimated from ``space.unit``; every step is checked with the cost."""
    G, U, rows = space.gain_table, space.unit_table, space.rows
    while space.cost(g) > space.budget:
        a = np.array(g)
        freed = U[rows, a][:, None] - U
        ok = (space.cols[None, :] < a[:, None]) & (freed > 0)
        if ok.any():
            loss = np.where(ok, G[rows, a][:, None] - G, 0.0) / np.where(ok, freed, 1)
            p, w = np.unravel_index(np.argmin(np.where(ok, loss, np.inf)), ok.shape)
        else:
            up = np.flatnonzero(a)
            if up.size == 0:
                return g
            p, w = up[0], a[up[0]] - 1
        g = _with(g, [(int(p), int(w))])
    cost, a = space.cost(g), np.array(g)
    gain, dc = G - G[rows, a][:, None], U - U[rows, a][:, None]
    ps, vs = np.nonzero(space.valid & (gain > 0) & (dc <= space.budget - cost))
    if ps.size:
        gain, dc = gain[ps, vs], dc[ps, vs]
        order = np.lexsort((-vs, -ps, -gain / np.maximum(dc, 1), dc > 0))  # free raises first
        for p, v in zip(ps[order].tolist(), vs[order].tolist()):
            old = g[p]
            if space.gains[p][v] <= space.gains[p][old]:
                continue  # the gene was raised further already
            if cost + space.unit[p][v] - space.unit[p][old] <= space.budget:
                h = _with(g, [(p, v)])
                if space.cost(h) <= space.budget:
                    g, cost = h, space.cost(h)
    return g


def _climb(space: _Space, g: tuple) -> tuple:
    """Best-improvement hill climbing. Moves: every change of one or two genes, and every change that
    raises one gene and makes room by lowering others, cheapest gain lost per byte freed first. A
    move's cost is first estimated from its single changes (exact for an additive cost), then
    evaluated."""
    while True:
        base_gain, base_cost = space.gain(g), space.cost(g)
        singles = []  # (gain delta, cost delta, position, value)
        for p, size in enumerate(space.sizes):
            for v in range(size):
                if v != g[p]:
                    dg = space.gains[p][v] - space.gains[p][g[p]]
                    singles.append((dg, space.cost(_with(g, [(p, v)])) - base_cost, p, v))
        moves = [(dg, dc, ((p, v),)) for dg, dc, p, v in singles]
        moves += _pairs(singles, base_cost, space.budget)
        moves += _make_room(singles, base_cost, space.budget)
        moves = [m for m in moves if m[0] > 1e-12 and base_cost + m[1] <= space.budget]
        moves.sort()
        moves.sort(key=lambda m: -m[0])  # stable: the largest gain, then the smallest cost
        for _, _, change in moves:
            h = _with(g, change)
            if space.cost(h) <= space.budget and space.gain(h) > base_gain + 1e-12:
                g = h
                break
        else:
            return g


def _pairs(singles: list[tuple], base_cost: int, budget: int, most: int = 256) -> list[tuple]:
    """The ``most`` best changes of two different genes that gain and, by their singles' bytes, fit."""
    dg, dc, pos, val = (np.array(column) for column in zip(*singles))
    gain, cost = dg[:, None] + dg[None, :], dc[:, None] + dc[None, :]
    ok = np.triu(pos[:, None] != pos[None, :], 1) & (gain > 1e-12) & (base_cost + cost <= budget)
    a, b = np.nonzero(ok)
    best = np.lexsort((cost[a, b], -gain[a, b]))[:most]
    return [(float(gain[i, j]), int(cost[i, j]), ((int(pos[i]), int(val[i])), (int(pos[j]), int(val[j]))))
            for i, j in zip(a[best], b[best])]


def _make_room(singles: list[tuple], base_cost: int, budget: int) -> list[tuple]:
    """For each single change that gains but does not fit: it, plus the lowering changes (one per
    gene) that free its overshoot losing the least gain per byte."""
    frees = sorted((s for s in singles if s[1] < 0), key=lambda s: (-s[0] / -s[1], s[2], s[3]))
    moves = []
    for dg, dc, p, v in singles:
        over = base_cost + dc - budget
        if dg <= 0 or over <= 0:
            continue
        change, used = [(p, v)], {p}
        for fg, fc, q, w in frees:
            if q not in used:
                change.append((q, w))
                used.add(q)
                dg, dc, over = dg + fg, dc + fc, over + fc
                if over <= 0:
                    moves.append((dg, dc, tuple(change)))
                    break
    return moves


def evolve(bias_gain: dict[int, float], weight_gain: dict[tuple[int, float], float], cost: Cost,
           budget: int, *, seed: int = 0, population: int = 64, generations: int = 60,
           elite: int = 6, mutation: float | None = None, patience: int = 12) -> Candidate | None:
    """The candidate with the largest summed gain whose ``cost(k, ratios)`` is within ``budget``
    bytes, or None when nothing fits. ``bias_gain``: k → gain (its keys are the bias depths
    searched); ``weight_gain``: (layer, ratio) → gain (its keys, the weight choices). Besides the
    ``elite``, each generation keeps the best candidate of every bias depth (the depth moves many
    bytes at once: a child rarely crosses it alone); each of those is climbed at the end.
    ``mutation``: the chance of each gene changing (default: one gene per child on average); the
    search stops early when the best of every depth stayed the same for ``patience`` generations."""
    if not bias_gain:
        raise ValueError("evolve needs the gain of at least one bias depth (bias_gain is empty)")
    space = _Space(bias_gain, weight_gain, cost, budget)
    rnd = random.Random(seed)
    sizes, n = space.sizes, len(space.sizes)
    mutation = 1.0 / n if mutation is None else mutation
    pop = [(ki, *([0] * (n - 1))) for ki in range(sizes[0])]
    while len(pop) < population:
        density = rnd.uniform(0.0, 0.5)
        g = (rnd.randrange(sizes[0]),
             *(rnd.randrange(1, s) if rnd.random() < density else 0 for s in sizes[1:]))
        pop.append(space.repaired(g))
    still, best = 0, None
    for _ in range(generations):
        pop.sort(key=space.rank)
        leaders = _best_per_depth(pop)
        still = still + 1 if leaders == best else 0
        if still >= patience:
            break
        best = leaders
        children = list(dict.fromkeys([*pop[:elite], *leaders]))
        while len(children) < population:
            a, b = (pop[min(rnd.randrange(len(pop)) for _ in range(3))] for _ in range(2))  # tournaments
            child = [x if rnd.random() < 0.5 else y for x, y in zip(a, b)]
            flips = [p for p in range(n) if sizes[p] > 1 and rnd.random() < mutation] or [rnd.randrange(n)]
            for p in flips:
                if sizes[p] > 1:
                    child[p] = (child[p] + rnd.randrange(1, sizes[p])) % sizes[p]
            children.append(space.repaired(tuple(child)))
        pop = children
    pop.sort(key=space.rank)
    starts = [g for g in _best_per_depth(pop) if space.cost(g) <= budget]
    if not starts:
        return None
    return space.candidate(min((_climb(space, g) for g in starts), key=space.rank))


def _best_per_depth(ranked: list[tuple]) -> list[tuple]:
    """The first (best) genome of each bias depth in an already ranked population."""
    best: dict[int, tuple] = {}
    for g in ranked:
        best.setdefault(g[0], g)
    return list(best.values())


def exhaustive(bias_gain: dict[int, float], weight_gain: dict[tuple[int, float], float], cost: Cost,
               budget: int) -> Candidate | None:
    """The true optimum, by trying every candidate (small spaces only: the reference for evolve)."""
    space = _Space(bias_gain, weight_gain, cost, budget)
    best = None
    for g in itertools.product(*(range(s) for s in space.sizes)):
        c = space.cost(g)
        if c <= budget and (best is None or (space.gain(g), -c) > (space.gain(best), -space.cost(best))):
            best = g
    return None if best is None else space.candidate(best)


def fit_to_planner(bias_gain: dict[int, float], weight_gain: dict[tuple[int, float], float], cost: Cost,
                   budget: int, plan: Callable[[dict], int], *, plans: dict[str, int] | None = None,
                   rounds: int = 5, slack: float = 0.02, **search) -> tuple[Candidate | None, int]:
    """Search with ``cost``, plan the winner (``plan(scheme) -> bytes``), and search again while the
    planner disagrees, with the search's budget set to the winner's modelled cost × budget / planned:
    below it when the winner does not fit, above it when it fits with more than ``slack`` of the
    budget left (the model can also be pessimistic: the arena is a peak, not a sum). Scaled rather
    than lowered by the overshoot, so that a model off by more than the budget itself still leaves
    something to search. At most ``rounds`` winners; a winner found again ends the loop.

    Returns (the best scheme the planner says fits, the number of winners checked): the best of the
    winners and of ``plans`` (canonical JSON → bytes, e.g. the calibration's, with its bias-only
    schemes) by gain, its ``cost`` the planner's figure; None when no planned scheme fits. Each scheme
    is planned once (``plans`` are not planned again)."""
    known = dict(plans or {})
    limit, checked, winners = budget, 0, set()
    for _ in range(rounds):
        winner = evolve(bias_gain, weight_gain, cost, limit, **search)
        if winner is None:
            break
        checked += 1
        s = key(winner.scheme())
        if s not in known:
            known[s] = int(plan(winner.scheme()))
        if known[s] <= budget and (budget - known[s] <= slack * budget or s in winners):
            break
        winners.add(s)
        limit = int(winner.cost * budget / max(known[s], 1))  # the winner's cost, as the planner sees it
        if known[s] > budget:
            limit = min(limit, winner.cost - 1)
    return _best_planned(bias_gain, weight_gain, known, budget), checked


def _best_planned(bias_gain, weight_gain, known: dict[str, int], budget: int) -> Candidate | None:
    """The planned scheme within ``budget`` with the largest gain (then the smallest total)."""
    best = None
    for s, total in known.items():
        k, ratios = parse(json.loads(s))
        if total > budget or k not in bias_gain or any(ir not in weight_gain for ir in ratios.items()):
            continue
        c = Candidate(k, ratios, bias_gain[k] + sum(weight_gain[ir] for ir in ratios.items()), int(total))
        if best is None or (c.gain, -c.cost) > (best.gain, -best.cost):
            best = c
    return best
