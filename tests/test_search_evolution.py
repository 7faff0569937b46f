"""The search's memory model (calibrated against the planner) and its evolutionary search.

The search is checked against :func:`exhaustive` (every candidate tried) on small random instances;
the memory model's slice bytes against the planner's own accounting of trainable parameters and
optimizer state; its additivity against the planner on a small CNN.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest

import tvm_tinytrain as tt
from tests.conftest import small_cnn
from tvm_tinytrain import zoo
from tvm_tinytrain.layers import Layer, layer_table
from tvm_tinytrain.search import memory_model as mm
from tvm_tinytrain.search.evolution import Candidate, evolve, exhaustive, fit_to_planner

RATIOS = mm.RATIOS


def instance(seed: int, layers: int = 5, ks=(0, 2, 4, 6)):
    """Random gains (some negative), a model with signed extras (its reach rule makes it not
    additive: a deep weight prices the candidate at a deeper bias depth), and a budget between below
    the cheapest candidate and above most of them."""
    rng = np.random.default_rng(seed)
    bias_gain = {k: 0.0 if k == 0 else float(rng.uniform(-0.02, 0.1)) for k in ks}
    base = {k: int(10_000 + 3_000 * j + rng.integers(0, 2_000)) for j, k in enumerate(ks)}
    weight_gain, weight = {}, {}
    for i in range(layers):
        size = int(rng.integers(500, 8_000))
        for r in RATIOS:
            weight_gain[(i, r)] = float(rng.uniform(-0.01, 0.05) * (0.5 + r))
            weight[(i, r)] = int(size * r + rng.integers(-300, 3_000))
    model = mm.MemoryModel(base, weight, num_layers=max(ks))
    return bias_gain, weight_gain, model, int(rng.uniform(9_000, 35_000))


def test_evolve_finds_the_exhaustive_optimum():
    found = 0
    for seed in range(22):
        layers = 6 if seed == 0 else 5  # 6 layers: 5^6 * 4 = 62,500 candidates
        bias_gain, weight_gain, model, budget = instance(seed, layers)
        best = exhaustive(bias_gain, weight_gain, model.cost, budget)
        got = evolve(bias_gain, weight_gain, model.cost, budget, seed=seed)
        assert (got is None) == (best is None), seed
        if best is None:
            continue
        found += 1
        assert got.gain == pytest.approx(best.gain, abs=1e-9), (seed, got, best)
        assert got.cost == model.cost(got.k, got.ratios) <= budget
        assert got.gain == pytest.approx(bias_gain[got.k] + sum(weight_gain[ir] for ir in got.ratios.items()))
    assert found >= 20


def test_evolve_never_returns_an_infeasible_candidate():
    for seed in range(6):
        bias_gain, weight_gain, model, _ = instance(100 + seed, 8)

        def cost(k, ratios, model=model):  # not additive: a penalty per pair of layers trained together
            return model.cost(k, ratios) + 700 * len(ratios) * (len(ratios) - 1) // 2

        for budget in (min(model.base.values()), 20_000, 60_000):
            got = evolve(bias_gain, weight_gain, cost, budget, seed=seed, generations=10)
            assert got is not None and got.cost == cost(got.k, got.ratios) <= budget


def test_nothing_fits_is_none():
    bias_gain, weight_gain, model, _ = instance(7)
    below = min(model.base.values()) - 1
    if min(model.weight.values()) < 0:  # a signed extra could let a candidate with weights fit
        model.weight = {ir: abs(v) for ir, v in model.weight.items()}
    assert evolve(bias_gain, weight_gain, model.cost, below) is None
    assert exhaustive(bias_gain, weight_gain, model.cost, below) is None
    assert fit_to_planner(bias_gain, weight_gain, model.cost, below, lambda s: 0) == (None, 0)


def test_a_bias_only_candidate_is_found_when_only_it_fits():
    bias_gain, weight_gain, model, _ = instance(8)
    model.weight = {ir: 10**6 for ir in model.weight}
    k = max(model.base, key=lambda k: (bias_gain[k], -model.base[k]))
    got = evolve(bias_gain, weight_gain, model.cost, model.base[k])
    assert got is not None and got.ratios == {} and got.gain == max(
        bias_gain[j] for j in model.base if model.base[j] <= model.base[k])


def big_instance(seed: int = 0, layers: int = 30):
    rng = np.random.default_rng(seed)
    ks = [0, 1, 5, 10, 15, 20, 25, 30]
    bias_gain = {k: 0.0 if k == 0 else float(rng.uniform(-0.02, 0.1)) for k in ks}
    base = {k: 30_000 + 1_500 * j for j, k in enumerate(ks)}
    weight_gain = {(i, r): float(rng.uniform(-0.01, 0.05)) for i in range(layers) for r in RATIOS}
    weight = {(i, r): int(rng.integers(300, 20_000) * r + rng.integers(-200, 2_000))
              for i in range(layers) for r in RATIOS}
    return bias_gain, weight_gain, mm.MemoryModel(base, weight, num_layers=31)


def test_evolve_is_deterministic_per_seed_and_fast():
    bias_gain, weight_gain, model = big_instance()
    start = time.process_time()  # CPU time: the machine may be shared
    first = evolve(bias_gain, weight_gain, model.cost, 120_000, seed=3)
    elapsed = time.process_time() - start
    assert elapsed < 2.0  # 30 layers x 4 ratios x 8 bias depths: about 0.8 s
    assert first == evolve(bias_gain, weight_gain, model.cost, 120_000, seed=3)
    assert first.cost <= 120_000 and len(first.ratios) > 3
    other = evolve(bias_gain, weight_gain, model.cost, 120_000, seed=4)
    assert other.cost <= 120_000 and other.gain >= first.gain - 0.01  # another seed, about as good


def test_fit_to_planner_with_a_planner_10_percent_over_the_model():
    bias_gain, weight_gain, model, _ = instance(3, 5)
    budget = 30_000
    calls = []

    def plan(scheme):
        calls.append(mm.key(scheme))
        return int(1.1 * model.cost(*mm.parse(scheme)))

    calibration = {mm.key(mm.scheme_of(k)): int(1.1 * a) for k, a in model.base.items()}
    first = evolve(bias_gain, weight_gain, model.cost, budget)
    assert plan(first.scheme()) > budget  # the model's winner does not fit by the planner
    calls.clear()
    got, rounds = fit_to_planner(bias_gain, weight_gain, model.cost, budget, plan, plans=calibration)
    assert got is not None and got.cost == plan(got.scheme()) <= budget
    assert 2 <= rounds <= 5 and len(calls) - 1 <= rounds  # each winner planned once (+ the check above)
    # the true optimum by the planner (exhaustive over the planner's figures): a planner that is the
    # model scaled is matched in one step (the search's budget scales the winner's cost)
    truth = exhaustive(bias_gain, weight_gain, lambda k, r: int(1.1 * model.cost(k, r)), budget)
    assert got.gain == pytest.approx(truth.gain, abs=1e-12)


def test_fit_to_planner_falls_back_on_the_best_planned_scheme():
    bias_gain, weight_gain, model, _ = instance(5)
    budget = 40_000
    plans = {mm.key(mm.scheme_of(k)): a for k, a in model.base.items()}

    def plan(scheme):  # whatever trains weights is one byte too many
        return budget + 1 if scheme.get("weights") else model.base[mm.parse(scheme)[0]]

    got, rounds = fit_to_planner(bias_gain, weight_gain, model.cost, budget, plan, plans=plans)
    assert rounds == 5
    best_k = max((k for k, a in model.base.items() if a <= budget), key=lambda k: bias_gain[k])
    assert got == Candidate(best_k, {}, bias_gain[best_k], model.base[best_k])


def test_fit_to_planner_takes_a_winner_that_fits_at_once():
    bias_gain, weight_gain, model, budget = instance(11)
    exact = lambda s: model.cost(*mm.parse(s))  # noqa: E731
    alone = evolve(bias_gain, weight_gain, model.cost, budget, seed=4)
    assert fit_to_planner(bias_gain, weight_gain, model.cost, budget, exact, seed=4, slack=1.0) == (alone, 1)
    got, rounds = fit_to_planner(bias_gain, weight_gain, model.cost, budget, exact, seed=4)
    assert got == alone and 1 <= rounds <= 5  # more rounds only when the winner leaves over 2 % unused


def test_fit_to_planner_uses_what_a_pessimistic_model_leaves():
    """The planner needs 30 % less than the model says: the budget the search sees is raised."""
    for seed in range(4):
        bias_gain, weight_gain, model, _ = instance(20 + seed)
        budget = 25_000
        planner = lambda k, r, model=model: int(0.7 * model.cost(k, r))  # noqa: E731
        alone = evolve(bias_gain, weight_gain, model.cost, budget)
        got, rounds = fit_to_planner(bias_gain, weight_gain, model.cost, budget,
                                     lambda s, p=planner: p(*mm.parse(s)))
        truth = exhaustive(bias_gain, weight_gain, planner, budget)
        assert got.cost == planner(got.k, got.ratios) <= budget and 2 <= rounds <= 3
        assert got.gain == pytest.approx(truth.gain, abs=1e-12) and got.gain > alone.gain


# the memory model


def conv(index: int, shape, groups: int = 1) -> Layer:
    return Layer(index, "dwconv" if groups > 1 else "conv", f"conv{index}.weight", f"conv{index}.bias",
                 tuple(shape), (1, shape[0], 4, 4), 0, f"conv{index}", groups)


def test_slice_bytes_by_hand():
    layer = conv(0, (16, 8, 3, 3))
    assert mm.slice_bytes(layer, 0.25, "int8", tt.SGD(lr=0.1)) == 4 * 72  # int8 copy, no state
    assert mm.slice_bytes(layer, 0.25, "int8", tt.SGD(lr=0.1, momentum=0.9)) == 4 * 72 * (1 + 4)
    assert mm.slice_bytes(layer, 1.0, "float32", tt.Adam(lr=0.1)) == 16 * 72 * 12 + 8  # m, v; two powers
    depthwise = conv(1, (24, 1, 3, 3), groups=8)  # multiplier 3: whole groups of 3 channels
    assert mm.trained_channels(depthwise, 0.05) == 3  # ceil(1.2) = 2 -> 3
    assert mm.slice_bytes(depthwise, 0.05, "float16", tt.SGD(lr=0.1, momentum=0.5)) == 3 * 9 * (2 + 2)


def test_cost_is_the_base_at_the_reach_plus_the_weights_and_round_trips():
    model = mm.MemoryModel({0: 1000, 3: 1500, 6: 2500, 8: 4000},
                           {(5, 0.5): 300, (6, 1.0): -40, (6, 0.125): 7, (1, 1.0): 90}, num_layers=8)
    assert model.cost(3, {}) == 1500
    assert model.cost(3, {5: 0.5, 6: 1.0}) == 1500 + 300 - 40  # layers 5, 6: reach 3, 2 <= 3
    assert model.cost(0, {6: 0.125}) == 1500 + 7  # reach 2: priced at depth 3, the next calibrated
    assert model.cost(0, {5: 0.5, 1: 1.0}) == 4000 + 300 + 90  # layer 1: reach 7 -> depth 8
    assert model.depth(6, {1: 1.0}) == 8 and model.depth(6, {5: 0.5}) == 6
    with pytest.raises(KeyError, match="bias depth 1"):
        model.cost(1, {})
    with pytest.raises(KeyError, match="layer 5 at ratio 0.25"):
        model.cost(0, {5: 0.25})
    again = mm.MemoryModel.from_json(model.to_json())
    assert again == model and mm.MemoryModel.from_dict(model.as_dict()) == model


def test_calibration_schemes_and_keys():
    schemes = mm.calibration_schemes([2], [1, 3], num_layers=5)
    keys = [mm.key(s) for s in schemes]
    # depths 0 (classifier), 2, 4 (layer 1's reach), 5 (all biases); 2 layers x 4 ratios at their reach
    assert len(set(keys)) == len(keys) == 4 + 2 * 4
    assert {"classifier": True} in schemes and {"bias": {"last": 5}, "classifier": True} in schemes
    assert {"bias": {"last": 4}, "weights": {"1": 0.125}, "classifier": True} in schemes
    assert {"bias": {"last": 2}, "weights": {"3": 1.0}, "classifier": True} in schemes
    assert all(mm.parse(s) == (s.get("bias", {}).get("last", 0),
                               {int(i): r for i, r in s.get("weights", {}).items()}) for s in schemes)


def test_fit_recovers_the_truth_it_was_planned_from():
    layers = [conv(0, (8, 1, 3, 3)), conv(1, (16, 8, 3, 3)), conv(2, (16, 1, 3, 3), groups=16),
              conv(3, (10, 16, 1, 1))]
    dtypes = {layer.weight: "int8" for layer in layers}
    optimizer = tt.SGD(lr=0.1, momentum=0.9)
    base = {0: 5000, 1: 5100, 2: 5200, 3: 5300, 4: 5600}
    truth = {(i, r): 100 * i + int(1000 * r) - 50 for i in range(3) for r in RATIOS}
    plans = {mm.key(mm.scheme_of(k)): a for k, a in base.items()}
    plans.update({mm.key(mm.scheme_of(4 - i, {i: r})): base[4 - i] + w for (i, r), w in truth.items()
                  if (i, r) != (1, 0.25)})  # one ratio not planned: it borrows its neighbour's extra
    unplanned = mm.key(mm.scheme_of(3, {1: 0.25}))
    assert set(plans) == {mm.key(s) for s in mm.calibration_schemes([1], range(3), 4)} - {unplanned}
    model = mm.fit(plans, [1], layers, RATIOS, optimizer, dtypes=dtypes)
    assert model.base == base and model.num_layers == 4
    assert set(model.weight) == set(truth)  # not the classifier (layer 3)
    assert {ir: w for ir, w in model.weight.items() if ir != (1, 0.25)} == {
        ir: w for ir, w in truth.items() if ir != (1, 0.25)}
    p = {r: mm.slice_bytes(layers[1], r, "int8", optimizer) for r in RATIOS}
    assert p[0.125] == 2 * 72 * 5 and p[0.25] == 4 * 72 * 5
    extra_at_eighth = truth[(1, 0.125)] - p[0.125]  # 2 channels: nearer to 4 than 8 (at 0.5)
    assert model.weight[(1, 0.25)] == p[0.25] + extra_at_eighth
    for (i, r), w in truth.items():  # exact on what was planned
        if (i, r) != (1, 0.25):
            assert model.cost(*mm.parse(mm.scheme_of(4 - i, {i: r}))) == base[4 - i] + w
    del plans[mm.key(mm.scheme_of(2))]
    with pytest.raises(KeyError, match=r"bias depth\(s\) \[2\]"):
        mm.fit(plans, [1], layers, RATIOS, optimizer, dtypes=dtypes)


# against the real planner, on a small CNN


def reports(mod, optimizer):
    """plan(scheme) -> the planner's MemoryReport, each scheme planned once."""
    from tvm_tinytrain.memory_report import memory_report
    from tvm_tinytrain.relay.transform import TinyTrain

    seen = {}

    def plan(scheme):
        if mm.key(scheme) not in seen:
            seen[mm.key(scheme)] = memory_report(TinyTrain(scheme=scheme, optimizer=optimizer)(mod),
                                                 compare_tvm=False)
        return seen[mm.key(scheme)]

    return plan


@pytest.mark.parametrize("int8", [False, True])
def test_slice_bytes_are_the_planners_trainable_and_state_bytes(tmp_path, int8):
    model = small_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(zoo.quantize_qdq(model) if int8 else model, path)
    mod, _ = tt.load_model(path)
    layers, dtypes = layer_table(mod), mm.param_dtypes(mod)
    assert dtypes[layers[1].weight] == ("int8" if int8 else "float32")
    optimizer = tt.Adam(lr=0.01) if int8 else tt.SGD(lr=0.01, momentum=0.9)
    plan = reports(mod, optimizer)
    n = len(layers)
    bias_only = plan(mm.scheme_of(n))
    i, r = (1, 0.25) if int8 else (2, 1.0)  # a slice of a conv; a whole depthwise conv
    report = plan(mm.scheme_of(n, {i: r}))
    planner = report.trainable_bytes + report.state_bytes - bias_only.trainable_bytes - bias_only.state_bytes
    assert mm.slice_bytes(layers[i], r, dtypes[layers[i].weight], optimizer) == planner > 0


def test_the_calibrated_model_against_the_planner(tmp_path):
    """Exact on the schemes it was calibrated on; on two layers at once (their extras assumed to add
    up, while the arena is a peak) the two schemes below measured -48 B of 10,052 B (-0.5 %) and
    -688 B of 13,188 B (-5.2 %): asserted within 10 %."""
    path = tmp_path / "small.onnx"
    onnx.save(small_cnn(), path)
    mod, _ = tt.load_model(path)
    layers = layer_table(mod)
    n, optimizer = len(layers), tt.SGD(lr=0.01, momentum=0.9)
    plan = reports(mod, optimizer)
    ks, idx, ratios = [2], [0, 3], (0.25, 1.0)
    schemes = mm.calibration_schemes(ks, idx, n, ratios=ratios)
    plans = {mm.key(s): plan(s).total_sram_bytes for s in schemes}
    assert plans[mm.key(schemes[0])] == mm.planned_total(mod, schemes[0], optimizer=optimizer)
    model = mm.fit(plans, ks, layers, ratios, optimizer, dtypes=mm.param_dtypes(mod), layers_idx=idx)
    for s in schemes:
        assert model.cost(*mm.parse(s)) == plans[mm.key(s)]
    for k, two in [(2, {0: 1.0, 3: 0.25}), (5, {0: 0.25, 3: 1.0})]:
        truth = plan(mm.scheme_of(k, two)).total_sram_bytes
        error = model.cost(k, two) - truth
        print(f"bias {k} + {two}: planner {truth} B, model {truth + error} B ({100 * error / truth:+.1f} %)")
        assert abs(error) <= 0.10 * truth
