"""Costs, budgets, FLOP counting, threshold quantiles, the geometric scan, heuristic policies."""

from __future__ import annotations

import math

import pytest
import torch

from eenet.budget import Budget, Costs, count_flops, measure, report
from eenet.nn import ExitHead, MultiExitNetwork
from eenet.policies import (
    Entropy,
    MaxProb,
    Patience,
    collect_exit_logits,
    first_exit,
    geometric_scan,
    thresholds_for_fractions,
)
from eenet.policies.calibration import geometric_fractions
from eenet_kernels import NEVER_EXIT


def _mlp(exits: int = 3, width: int = 10, classes: int = 7) -> MultiExitNetwork:
    torch.manual_seed(0)
    stages = [torch.nn.Linear(width, width) for _ in range(exits)]
    heads = [ExitHead.linear(width, classes) for _ in range(exits)]
    return MultiExitNetwork(stages, heads).eval()


def _synthetic_logits(n: int = 2000, exits: int = 4, classes: int = 10, seed: int = 0
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Later exits are sharper and more often right."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = []
    for k in range(exits):
        z = torch.randn(n, classes, generator=g)
        z[torch.arange(n), labels] += 0.8 + 0.8 * k
        logits.append(z)
    return logits, labels


def test_costs_validation() -> None:
    with pytest.raises(ValueError, match="must not decrease"):
        Costs([2.0, 1.0], "ms")
    with pytest.raises(ValueError, match="positive"):
        Costs([0.0, 1.0], "ms")
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="positive and finite"):
            Costs([1.0, bad, 3.0], "flops")
    with pytest.raises(ValueError, match="one value per exit"):
        Costs([], "ms")
    costs = Costs([1.0, 2.0, 4.0], "ms")
    assert costs.expected(torch.tensor([0, 1, 2, 2])) == pytest.approx((1 + 2 + 4 + 4) / 4)
    assert Costs.from_dict(costs.to_dict()) == costs


def test_budget_absolute() -> None:
    costs = Costs([1.0, 2.0, 4.0], "flops")
    assert Budget(0.5).absolute(costs) == pytest.approx(2.0)
    assert Budget(3.0, "flops").absolute(costs) == pytest.approx(3.0)
    assert Budget(9.0, "flops").absolute(costs) == pytest.approx(4.0)  # capped at the full cost
    with pytest.raises(ValueError, match="below the cost of the first exit"):
        Budget(0.2).absolute(costs)
    with pytest.raises(ValueError, match="costs are in 'flops'"):
        Budget(1.0, "ms").absolute(costs)
    with pytest.raises(ValueError, match=r"lie in \(0, 1\]"):
        Budget(1.5).absolute(costs)
    for bad in (math.nan, math.inf, -math.inf):
        for unit in ("fraction", "flops"):
            with pytest.raises(ValueError, match="a budget must be a finite number"):
                Budget(bad, unit)
    r = report(costs, torch.tensor([0, 2]), 0.5)
    assert r["achieved"] == pytest.approx(2.5) and r["ratio"] == pytest.approx(1.25)


def test_count_flops_hand_computed() -> None:
    """Exit k runs stages 0..k and heads 0..k: (k + 1) * (2*10*10 + 2*10*7) FLOPs/sample."""
    costs = count_flops(_mlp(), torch.randn(5, 10))
    assert costs.unit == "flops"
    assert costs.values == [pytest.approx((k + 1) * (200 + 140)) for k in range(3)]


@pytest.mark.usefixtures("one_thread")
def test_measure_latency_is_cumulative() -> None:
    """measure's costs are measured per-sample times: a stage that sleeps 20 ms per call
    makes its exit's cost step 20 ms / batch size, halves per sample at twice the batch,
    dwarfs the fast stages; exit k's cost is the sum of the measured stage and head times
    0..k (nothing forced); the costs calibrate a policy that meets its budget."""
    import itertools
    import time

    class Sleep(torch.nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            time.sleep(0.02)
            return h

    net = _mlp()
    net.stages[1] = torch.nn.Sequential(Sleep(), net.stages[1])
    by_batch = {n: measure(net, torch.randn(n, 10), repeats=3, warmup=1) for n in (4, 8)}
    steps = {}
    for n, costs in by_batch.items():
        assert costs.unit == "ms" and len(costs.values) == 3
        assert costs.meta["batch_size"] == n
        parts = [s + h for s, h in zip(costs.meta["stage_ms"], costs.meta["head_ms"],
                                       strict=True)]
        assert all(p > 0 for p in parts)
        assert costs.values == pytest.approx(list(itertools.accumulate(parts)), rel=1e-12)
        steps[n] = parts
        assert 20.0 / n <= parts[1] < 3 * 20.0 / n  # ms per sample of the sleeping stage
        assert parts[1] > 5 * max(parts[0], parts[2])
    assert steps[8][1] / steps[4][1] == pytest.approx(0.5, abs=0.2)  # per sample
    costs = by_batch[8]
    logits, _ = _synthetic_logits(exits=3)
    policy = MaxProb.fit_logits(logits, costs, budget=0.6)
    exits, _ = policy.decide(logits)
    assert 0 < int((exits == 0).sum()) < exits.numel()
    assert report(costs, exits, 0.6)["ratio"] <= 1.0 + 1e-6


def test_first_exit_hand_computed() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.8, 0.0], [0.1, 0.1, 0.1],
                           [math.nan, 0.95, 0.3]])
    exit_index, score = first_exit(scores, [0.5, 0.7, 0.0])
    assert exit_index.tolist() == [0, 1, 2, 1]
    torch.testing.assert_close(score, torch.tensor([0.9, 0.8, 0.1, 0.95]))


def test_heuristic_scores_hand_computed() -> None:
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    logits = [z, z.flip(0)]
    p = torch.softmax(z, 1)
    max_prob = MaxProb([0.5, 0.0]).scores(logits)
    torch.testing.assert_close(max_prob[:, 0], p.max(1).values)
    entropy = Entropy([0.5, 0.0]).scores(logits)
    h = -(p * p.log()).sum(1)
    torch.testing.assert_close(entropy[:, 0], 1 - h / math.log(3))
    assert entropy[1, 0].item() == pytest.approx(0.0, abs=1e-6)  # uniform: no confidence
    agree = [torch.tensor([[1.0, 0, 0]]), torch.tensor([[2.0, 0, 0]]), torch.tensor([[0, 3.0, 0]])]
    assert Patience([1, 1, 0]).scores(agree).tolist() == [[0.0, 1.0, 0.0]]


def test_thresholds_for_fractions_meet_quantiles() -> None:
    g = torch.Generator().manual_seed(0)
    n = 1000
    scores = torch.rand(n, 4, generator=g)
    fractions = [0.4, 0.3, 0.2, 0.1]
    th = thresholds_for_fractions(scores, fractions, never=1.0)
    exit_index, _ = first_exit(scores, th)
    counts = torch.bincount(exit_index, minlength=4).tolist()
    for k in range(3):
        assert abs(counts[k] - fractions[k] * n) <= 1, counts
    assert th[-1] == 0.0
    nobody = thresholds_for_fractions(scores, [0.0, 0.0, 0.0, 1.0], never=1.0)
    assert nobody[:3] == [1.0, 1.0, 1.0]


def test_geometric_fractions() -> None:
    assert geometric_fractions(1.0, 4) == [0.25] * 4
    f = geometric_fractions(0.5, 3)
    assert f == pytest.approx([4 / 7, 2 / 7, 1 / 7])


@pytest.mark.usefixtures("one_thread")  # small element-wise ops: OpenMP only adds waits
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("cls", [MaxProb, Entropy], ids=lambda c: c.__name__)
def test_heuristic_fit_meets_budget(budget: float, cls: type) -> None:
    logits, _ = _synthetic_logits()
    costs = Costs([1.0, 2.0, 3.0, 4.0], "flops")
    policy = cls.fit_logits(logits, costs, budget)
    achieved = costs.expected(policy.decide(logits)[0]) / costs.full
    assert achieved <= budget + 1e-9
    assert achieved >= 0.95 * budget


def test_geometric_scan_budget_at_full_cost() -> None:
    logits, _ = _synthetic_logits(n=200)
    scores = MaxProb([0.0] * 4).scores(logits)
    costs = Costs([1.0, 2.0, 3.0, 4.0], "flops")
    th = geometric_scan(scores, costs, 4.0, never=1.0)
    assert costs.expected(first_exit(scores, th)[0]) <= 4.0


@pytest.mark.parametrize("cls", [MaxProb, Entropy], ids=lambda c: c.__name__)
def test_saturated_scores_do_not_pass_a_closed_exit(cls: type) -> None:
    """Scores of exactly 1.0 (a softmax saturated in float32) at an early exit: the full
    budget closes that exit (NEVER_EXIT, which no score reaches) and buys the whole
    network; lower budgets let the tied samples leave together."""
    g = torch.Generator().manual_seed(3)
    n = 400
    z0 = torch.randn(n, 5, generator=g)
    z0[: n * 3 // 10, 0] += 40.0  # 30% of the samples score 1.0 at exit 0
    logits = [z0, torch.randn(n, 5, generator=g)]
    costs = Costs([1.0, 4.0], "flops")
    assert int((cls([0.0, 0.0]).scores(logits)[:, 0] == 1.0).sum()) == n * 3 // 10
    full = cls.fit_logits(logits, costs, 1.0)
    assert full.thresholds[0] == NEVER_EXIT > 1.0
    assert costs.expected(full.decide(logits)[0]) == 4.0
    def achieved(budget: float) -> float:
        return costs.expected(cls.fit_logits(logits, costs, budget).decide(logits)[0])

    # the tied 30% leave together or not at all: 4.0 is over 0.9 x 4, so 0.3 + 0.7 x 4
    assert achieved(0.9) == pytest.approx(3.1)
    assert 0.97 * 0.6 * 4.0 <= achieved(0.6) <= 0.6 * 4.0


def test_policy_exit_count_mismatch() -> None:
    logits, _ = _synthetic_logits(n=50)
    with pytest.raises(ValueError, match="3 exit rules but the network has 4 exits"):
        MaxProb([0.5, 0.5, 0.0]).decide(logits)
    with pytest.raises(ValueError, match="costs has 3 values"):
        MaxProb.fit_logits(logits, Costs([1.0, 2.0, 3.0], "flops"), 0.5)


# -- thresholds between neighbouring scores ---------------------------------------------------

GAP = 1e-7  # far above the 1e-8 by which backends' scores of one input were seen to differ


def _gaps(scores: torch.Tensor, thresholds: list[float]) -> list[float]:
    """Per exit k < K-1: the smallest |score - t_k| over the samples that reach exit k."""
    exit_index, _ = first_exit(scores, thresholds)
    gaps = []
    for k in range(scores.shape[1] - 1):
        s = scores[exit_index >= k, k]
        s = s[~torch.isnan(s)]
        gaps.append(float((s - thresholds[k]).abs().min()) if s.numel() else math.inf)
    return gaps


def _quantile_exits(scores: torch.Tensor, fractions: list[float]) -> torch.Tensor:
    """Exit index (N,) with every threshold set on the quantile sample's own score, the
    quantile taken so that about sum(fractions[:k + 1]) of the samples are gone by exit k."""
    n, k_exits = scores.shape
    exit_index = torch.full((n,), k_exits - 1, dtype=torch.int64)
    remaining = torch.ones(n, dtype=torch.bool)
    for k in range(k_exits - 1):
        s = scores[remaining, k]
        gone = n - int(remaining.sum())
        want = min(round(sum(fractions[:k + 1]) * n) - gone, s.numel())
        if want > 0:
            v = torch.sort(s, descending=True).values[want - 1]
            leave = remaining & (scores[:, k] >= v)
            exit_index[leave] = k
            remaining &= ~leave
    return exit_index


@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "duplicated"])
def test_thresholds_lie_between_neighbouring_scores(duplicates: bool) -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(600, 4, generator=g)
    if duplicates:  # every score three times over, and coarse values that tie across samples
        scores = torch.cat([scores, scores, (scores * 20).round() / 20])
    fractions = [0.3, 0.25, 0.2, 0.25]
    th = thresholds_for_fractions(scores, fractions, never=1.0)
    assert min(_gaps(scores, th)) > GAP, _gaps(scores, th)
    assert all(float(torch.tensor(t, dtype=torch.float32)) == t for t in th)  # float32 values
    assert torch.equal(first_exit(scores, th)[0], _quantile_exits(scores, fractions))


def test_threshold_below_the_lowest_score_when_every_sample_exits() -> None:
    scores = torch.tensor([[0.6, 0.0], [0.8, 0.0], [0.7, 0.0]])
    th = thresholds_for_fractions(scores, [1.0, 0.0], never=1.0)
    assert th[0] == pytest.approx(0.3) and first_exit(scores, th)[0].tolist() == [0, 0, 0]


# (patience scores are whole streak lengths, exact on every backend: a threshold of 0 there
# lets every sample pass and cannot lie below the lowest streak)
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("cls", [MaxProb, Entropy], ids=lambda c: c.__name__)
def test_heuristic_thresholds_clear_every_validation_score(cls: type) -> None:
    logits, _ = _synthetic_logits(n=1000)
    logits = [torch.cat([z, z[:100]]) for z in logits]  # duplicated samples
    costs = Costs([1.0, 2.0, 3.0, 4.0], "flops")
    policy = cls.fit_logits(logits, costs, 0.5)
    scores = policy.scores(logits)
    assert min(_gaps(scores, policy.thresholds)) > GAP


def test_entropy_fit_on_a_uniform_first_exit_serves() -> None:
    """A zero (untrained or dead) first head gives uniform logits; with C = 7 their float32
    entropy score was -1.2e-7, the fit at the first exit's cost put its threshold there, and
    the engine refused the policy. Scores are clamped at 0, so the fit serves, every sample
    leaves at exit 0 as the budget asks."""
    from eenet.policies import collect_exit_logits
    from eenet.runtime import Engine

    net = _mlp(classes=7)
    with torch.no_grad():
        net.heads[0].classifier.weight.zero_()
        net.heads[0].classifier.bias.zero_()
    x = torch.randn(64, 10)
    costs = count_flops(net, x)
    logits, _ = collect_exit_logits(net, [(x, torch.zeros(64, dtype=torch.long))])
    policy = Entropy.fit_logits(logits, costs, costs.values[0] / costs.full)
    assert all(0.0 <= t <= NEVER_EXIT for t in policy.thresholds)
    assert policy.decide(logits)[0].tolist() == [0] * 64
    result = Engine(net, policy)(x)
    assert result.exit_index.tolist() == [0] * 64


@pytest.mark.parametrize("cls", [MaxProb, Entropy], ids=lambda c: c.__name__)
def test_nan_scores_at_one_exit_move_on_to_the_next(cls: type) -> None:
    """10% of the rows have a NaN logit at exit 0 only. A budget of 0.9 c_0 + 0.1 c_1 + a
    little is met by taking every other row at exit 0 and those at exit 1; with per-exit
    targets the NaN rows fell through to the last exit and the fit went over budget."""
    g = torch.Generator().manual_seed(0)
    n = 400
    logits = [torch.randn(n, 10, generator=g) * (k + 1) for k in range(4)]
    logits[0][:40, 0] = math.nan
    costs = Costs([1.0, 2.0, 3.0, 4.0], "flops")
    asked = 0.9 * 1.0 + 0.1 * 2.0 + 0.05
    policy = cls.fit_logits(logits, costs, asked / costs.full)
    exits, _ = policy.decide(logits)
    assert costs.expected(exits) <= asked + 1e-9
    assert bool((exits[:40] >= 1).all())
    assert costs.expected(exits) >= 0.99 * asked


def test_thresholds_for_fractions_carry_a_shortfall_forward() -> None:
    """Exit 0 can give only 2 of the 3 samples asked for (two NaN): exit 1 takes the one
    missing as well as its own (per-exit targets left it to the last exit)."""
    scores = torch.tensor([[0.9, 0.5, 0.0], [0.8, 0.6, 0.0], [math.nan, 0.3, 0.0],
                           [math.nan, 0.1, 0.0]])
    th = thresholds_for_fractions(scores, [0.75, 0.25, 0.0], never=1.0)
    assert first_exit(scores, th)[0].tolist() == [0, 0, 1, 1]


def test_heuristic_constructors_take_what_the_op_takes() -> None:
    from eenet.policies import ExitPolicy

    MaxProb([0.0, 1.0, NEVER_EXIT, 0.0])
    Patience([0.0, 3.0, 100.0])
    for cls, thresholds, why in (
            (MaxProb, [1.5, 0.0], r"threshold 0 is 1\.5: a 'max_prob' threshold must be "
                                  r"finite and in \[0, 1\] or NEVER_EXIT"),
            (Entropy, [0.5, -0.2], r"threshold 1 is -0\.2: a 'entropy' threshold"),
            (Patience, [-1.0, 0.0], r"threshold 0 is -1: a 'patience' threshold must be "
                                    "finite and >= 0"),
            (Patience, [math.inf, 0.0], "threshold 0 is inf")):
        with pytest.raises(ValueError, match=why):
            cls(thresholds)
    for thresholds in ("05", ["0.5", 0.0], [True, 0.0]):
        with pytest.raises(TypeError, match="thresholds must be a list of numbers"):
            MaxProb(thresholds)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"not a valid MaxProb policy entry: .*list of numbers"):
        ExitPolicy.from_dict({"class": "MaxProb", "thresholds": "05"})


def test_costs_expected_and_measure_check_their_arguments() -> None:
    costs = Costs([1.0, 2.0, 4.0], "flops")
    assert costs.expected(torch.tensor([0, 2, 2], dtype=torch.int32)) == pytest.approx(3.0)
    for bad, why in ((torch.tensor([0, -1]), r"in \[0, 3\) for these costs, got -1"),
                     (torch.tensor([3, 0]), "got 3"),
                     (torch.tensor([0.0, 1.0]), "must be integers"),
                     (torch.tensor([True]), "must be integers")):
        with pytest.raises(ValueError, match=why):
            costs.expected(bad)
    for kwargs, why in (({"repeats": 0}, "repeats must be an integer >= 1, got 0"),
                        ({"warmup": -1}, "warmup must be an integer >= 0"),
                        ({"repeats": 2.5}, "repeats must be an integer")):
        with pytest.raises(ValueError, match=why):
            measure(_mlp(), torch.randn(4, 10), **kwargs)


def test_report_keeps_the_budget_asked() -> None:
    """A budget above the full model's cost is asked as given (ratio against it); what a
    policy can spend is the full cost (``effective``)."""
    costs = Costs([1.0, 2.0, 3.0], "flops")
    r = report(costs, torch.tensor([2, 2]), Budget(6.0, "flops"))
    assert (r["asked"], r["effective"], r["achieved"]) == (6.0, 3.0, 3.0)
    assert r["ratio"] == pytest.approx(0.5) and r["fraction_of_full"] == pytest.approx(1.0)
    r = report(costs, torch.tensor([0, 2]), 0.5)
    assert (r["asked"], r["effective"]) == (1.5, 1.5) and r["ratio"] == pytest.approx(4 / 3)


def test_calibration_data_must_hold_samples_with_integer_labels() -> None:
    """A loader of empty batches fits no policy (every budget would look met on 0 samples,
    and the fit would close every early exit); float labels are refused, not cut."""
    net = _mlp()
    costs = Costs([1.0, 2.0, 3.0], "flops")
    empty = [(torch.zeros(0, 10), torch.zeros(0, dtype=torch.int64))] * 2
    with pytest.raises(ValueError, match="yielded no samples"):
        MaxProb.fit(net, empty, costs, 0.5)
    for cls in (MaxProb, Entropy, Patience):
        with pytest.raises(ValueError, match="needs at least one validation sample"):
            cls.fit_logits([torch.zeros(0, 7)] * 3, costs, 0.5)
    with pytest.raises(ValueError, match="labels must be integers"):
        collect_exit_logits(net, [(torch.randn(3, 10), torch.tensor([1.0, 2.5, 3.0]))])


def test_thresholds_for_fractions_checks_the_fractions() -> None:
    scores = torch.rand(20, 3)
    assert len(thresholds_for_fractions(scores, [0.3, 0.3], NEVER_EXIT)) == 3
    assert len(thresholds_for_fractions(scores, [0.3, 0.3, 0.4], NEVER_EXIT)) == 3
    for bad in ([0.3], [0.3, 0.3, 0.2, 0.2], [math.nan, 0.5], [-0.1, 0.5], [math.inf, 0.0]):
        with pytest.raises(ValueError, match="fractions must be 2 or 3 finite numbers"):
            thresholds_for_fractions(scores, bad, NEVER_EXIT)


def test_costs_need_an_example_with_rows() -> None:
    net = _mlp()
    for fn in (count_flops, measure):
        with pytest.raises(ValueError, match="at least one row"):
            fn(net, torch.zeros(0, 10))


def test_costs_take_numbers_and_a_unit_name() -> None:
    for values in ([1.0, True], ["1", 2.0], "12"):
        with pytest.raises(TypeError, match="costs must be a list of numbers"):
            Costs(values, "flops")
    for unit in (5, "", None):
        with pytest.raises(TypeError, match="a cost unit must be a non-empty string"):
            Costs([1.0, 2.0], unit)
    with pytest.raises(TypeError, match="a cost unit must be a non-empty string"):
        Costs.from_dict({"values": [1.0, 2.0], "unit": 5})  # (was read as the unit "5")
    from eenet.policies import EENet

    with pytest.raises(TypeError, match="sched_biases must be numbers"):
        EENet([0.5, 0.0], [torch.zeros(4), torch.zeros(5)], ["0.5", 0.0])


def test_costs_and_biases_take_0_dim_tensors() -> None:
    from eenet.policies import EENet

    assert Costs(torch.tensor([1.0, 2.0]), "flops").values == [1.0, 2.0]
    assert EENet([0.5, 0.0], [torch.zeros(4), torch.zeros(5)],
                 [torch.tensor(0.25), 0.0]).sched_biases == [0.25, 0.0]
    with pytest.raises(TypeError, match="costs must be a list of numbers"):
        Costs([torch.tensor(True), torch.tensor(2.0)], "flops")
