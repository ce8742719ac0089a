"""The budget guard and the telemetry: every guarded batch stays within its bound, on random
inputs and on inputs crafted so that no row exits early; the forced rows are exactly the
rows cut; full, mask and compact agree; a guard adds no host sync and no stage run; the
telemetry matches a recount from the outputs."""

from __future__ import annotations

import pytest
import torch
from test_engine import POLICIES, _assert_same, _median_policy, _mlp_net, _syncs

from eenet.budget import Budget, Costs
from eenet.nn import MultiExitNetwork
from eenet.policies import ExitPolicy, MaxProb
from eenet.runtime import MODES, BudgetGuard, Engine, EngineOutput, Telemetry, simulate

pytestmark = pytest.mark.usefixtures("one_thread")

COSTS = Costs([1.0, 2.5, 3.0, 5.0], "flops")  # uneven steps: 1.5, 0.5, 2.0


def _spent(out: EngineOutput, costs: Costs = COSTS) -> float:
    """Sum over the rows of the cumulative cost of the exit each took (float64)."""
    return float(costs.tensor()[out.exit_index].sum())


def _bound(guard: BudgetGuard, rows: int) -> float:
    """The guard's documented bound for a batch: max(N * L, N * c_0)."""
    return max(guard.batch_limit(rows), rows * guard.costs.values[0])


def _uniform_early_heads(net: MultiExitNetwork) -> MultiExitNetwork:
    """The net with every exit head but the last one predicting the uniform distribution
    (zero weights and bias): max-prob 1/C on every row, so no row leaves early."""
    for head in net.heads[:-1]:
        torch.nn.init.zeros_(head.classifier.weight)
        torch.nn.init.zeros_(head.classifier.bias)
    return net


def _slowdown(net: MultiExitNetwork, x: torch.Tensor, steps: int = 30) -> torch.Tensor:
    """A slowdown input in the manner of DeepSloth: x moved by gradient descent on the early
    exits' max-prob, which keeps every row below the early thresholds."""
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    for _ in range(steps):
        logits = net(x)[:-1]
        loss = sum(torch.softmax(z, dim=1).amax(dim=1).sum() for z in logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach()


def _inputs(kind: str) -> tuple[MultiExitNetwork, ExitPolicy, torch.Tensor]:
    """(net, policy, x): ``random`` rows leave at every exit; ``uniform`` and ``slowdown``
    inputs leave no row before the last exit without a guard."""
    net = _mlp_net()
    g = torch.Generator().manual_seed(7)
    policy = _median_policy(MaxProb, net, torch.randn(64, 10, generator=g))
    x = torch.randn(96, 10, generator=g)
    if kind == "uniform":
        return _uniform_early_heads(net), policy, x
    if kind == "slowdown":
        return net, policy, _slowdown(net, x)
    return net, policy, x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["random", "uniform", "slowdown"])
@pytest.mark.parametrize("limit", [0.25, 0.4, 0.8])
def test_guard_bound_holds(mode: str, kind: str, limit: float) -> None:
    """Guarded, a batch spends at most max(N * L, N * c_0); unguarded, the crafted inputs
    send (nearly) every row to the last exit and spend more than the limit."""
    net, policy, x = _inputs(kind)
    guard = BudgetGuard(COSTS, limit)
    free = Engine(net, policy, mode=mode)(x)
    guarded = Engine(net, policy, mode=mode, guard=guard)(x)
    n = x.shape[0]
    assert _spent(guarded) <= _bound(guard, n) * (1 + 1e-12)
    if kind != "random":
        last = free.exit_index == net.num_exits - 1
        assert bool(last.all()) if kind == "uniform" else float(last.float().mean()) > 0.9
        assert _spent(free) > guard.batch_limit(n)
        assert bool(guarded.forced.any())
    elif limit == 0.4:
        assert len(set(free.exit_index.tolist())) == net.num_exits  # rows leave everywhere
        assert _spent(free) > guard.batch_limit(n)  # ... and the guard has work to do


def test_limit_below_the_first_exit() -> None:
    """A limit under c_0 sends every row out at exit 0 (the cost no rule avoids)."""
    net, policy, x = _inputs("uniform")
    guard = BudgetGuard(COSTS, Budget(0.5, "flops"))
    for mode in MODES:
        out = Engine(net, policy, mode=mode, guard=guard)(x)
        assert bool((out.exit_index == 0).all()) and bool(out.forced.all()), mode
        assert _spent(out) == _bound(guard, x.shape[0]) == x.shape[0] * COSTS.values[0]


@pytest.mark.parametrize("kind", POLICIES, ids=lambda p: p.__name__)
@pytest.mark.parametrize("squeeze", [0.9, 0.7])
def test_guarded_modes_agree(kind: type[ExitPolicy], squeeze: float) -> None:
    """With the guard binding (a limit below what the batch spends unguarded), full, mask
    and compact give the same exits, forced flags, logits and scores; the forced rows are
    exactly the rows headed past the cut, now at the cut exit with its logits and score;
    the other rows keep their unguarded results."""
    net = _mlp_net()
    g = torch.Generator().manual_seed(3)
    policy = _median_policy(kind, net, torch.randn(64, 10, generator=g))
    x = torch.randn(80, 10, generator=g)
    free = simulate(net, policy, x)
    guard = BudgetGuard(COSTS, squeeze * _spent(free) / (80 * COSTS.full))
    outs = {mode: Engine(net, policy, mode=mode, guard=guard)(x) for mode in MODES}
    full = outs["full"]
    for mode, out in outs.items():
        _assert_same(out, full, mode)
        assert torch.equal(out.forced, full.forced), mode
    assert bool(full.forced.any()) and not bool(full.forced.all())
    cut = int(full.exit_index[full.forced][0])
    assert torch.equal(full.forced, free.exit_index > cut)
    assert bool((full.exit_index[full.forced] == cut).all())
    keep = ~full.forced
    assert torch.equal(full.exit_index[keep], free.exit_index[keep])
    torch.testing.assert_close(full.logits[keep], free.logits[keep], rtol=0, atol=0)
    with torch.no_grad():
        logits = [z.float() for z in net(x)]
    torch.testing.assert_close(full.logits[full.forced], logits[cut][full.forced])
    scores = policy.scores(logits)
    torch.testing.assert_close(full.score[full.forced], scores[full.forced, cut])
    hist = torch.bincount(free.exit_index, minlength=4).tolist()
    assert guard.cut(hist) == cut


@pytest.mark.parametrize("mode", MODES)
def test_guard_that_never_binds_changes_nothing(mode: str) -> None:
    """A guard at the full model's cost (never binding) gives bit-identical results to no
    guard; with no guard nothing is forced."""
    net = _mlp_net()
    policy = _median_policy(MaxProb, net, torch.randn(64, 10))
    x = torch.randn(50, 10)
    free = Engine(net, policy, mode=mode)(x)
    loose = Engine(net, policy, mode=mode, guard=BudgetGuard(COSTS, 1.0))(x)
    for name in ("logits", "exit_index", "score", "forced"):
        assert torch.equal(getattr(free, name), getattr(loose, name)), name
    assert not bool(free.forced.any())


class _Counting(torch.nn.Module):
    """A stage that counts the rows it runs on."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows: list[int] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.rows.append(h.shape[0])
        return self.inner(h)


def test_compact_guard_adds_no_sync_and_no_stage() -> None:
    """Compact mode under a binding guard: one host sync per stage run (telemetry included),
    no stage after the cut."""
    net, policy, x = _inputs("uniform")
    guard = BudgetGuard(COSTS, 0.5)  # 96 rows * 2.5: cut after exit 1
    assert guard.cut([0, 0, 0, 96]) == 1
    net.stages = torch.nn.ModuleList(_Counting(s) for s in net.stages)
    engine = Engine(net, policy, guard=guard)
    out = engine(x)
    assert bool((out.exit_index == 1).all()) and bool(out.forced.all())
    assert [s.rows for s in net.stages] == [[96], [96], [], []]
    assert _syncs(lambda: engine(x)) == 2
    assert engine.last_telemetry is engine.last_telemetry  # read once, kept
    assert engine.last_telemetry.exits == (0, 96, 0, 0)


def _recount(out: EngineOutput, costs: Costs | None, limit: float | None) -> Telemetry:
    return Telemetry(
        batches=1, rows=out.exit_index.shape[0],
        exits=tuple(torch.bincount(out.exit_index, minlength=4).tolist()),
        forced=int(out.forced.sum()),
        nonfinite=int((~torch.isfinite(out.logits).all(dim=1)).sum()),
        cost_spent=None if costs is None else _spent(out, costs), cost_limit=limit,
        unit=None if costs is None else costs.unit)


def _same_telemetry(got: Telemetry | None, want: Telemetry) -> None:
    assert got is not None
    assert got == Telemetry(**{**want.__dict__, "cost_spent": got.cost_spent})
    if want.cost_spent is None:
        assert got.cost_spent is None
    else:
        assert got.cost_spent == pytest.approx(want.cost_spent, rel=1e-12)


class _Poison(torch.nn.Module):
    """Stage wrapper: the rows in ``rows`` come out as NaN / inf (non-finite at every later
    exit)."""

    def __init__(self, inner: torch.nn.Module, rows: list[int]) -> None:
        super().__init__()
        self.inner = inner
        self.rows = rows

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.inner(h).clone()
        bad = torch.isin(torch.arange(h.shape[0]), torch.tensor(self.rows))
        h[bad] = torch.where(torch.arange(h.shape[1]) % 2 == 0, float("nan"), float("inf"))
        return h


@pytest.mark.parametrize("mode", MODES)
def test_telemetry_matches_a_recount(mode: str) -> None:
    """Per batch and in total: rows, rows per exit, forced, non-finite rows, cost spent and
    allowed equal a recount from the outputs; non-finite rows never leave early; reset zeroes
    the totals; costs without a guard price the exits; no costs, no cost."""
    net = _mlp_net()
    g = torch.Generator().manual_seed(5)
    policy = _median_policy(MaxProb, net, torch.randn(64, 10, generator=g))
    net.stages[0] = _Poison(net.stages[0], [0, 3])
    guard = BudgetGuard(COSTS, 0.6)
    engine = Engine(net, policy, mode=mode, guard=guard)
    assert engine.last_telemetry is None
    outs = []
    for n in (40, 7, 0, 25):
        x = torch.randn(n, 10, generator=g)
        outs.append(engine(x))
        want = _recount(outs[-1], COSTS, guard.batch_limit(n))
        _same_telemetry(engine.last_telemetry, want)
    for out in outs[:2] + outs[3:]:  # the non-finite rows leave last, or forced
        assert bool(((out.exit_index == 3) | out.forced)[[0, 3]].all())
    assert engine.last_telemetry.nonfinite == 2
    assert sum(int(o.forced.sum()) for o in outs) > 0
    totals = engine.telemetry_totals()
    assert totals.batches == 4 and totals.rows == 72
    exits = [_recount(o, None, None).exits for o in outs]
    assert totals.exits == tuple(sum(e[k] for e in exits) for k in range(4))
    assert totals.forced == sum(int(o.forced.sum()) for o in outs)
    assert totals.nonfinite == 6  # rows 0 and 3 of the three non-empty batches
    assert totals.cost_spent == pytest.approx(sum(_spent(o) for o in outs), rel=1e-12)
    assert totals.cost_limit == pytest.approx(guard.batch_limit(72))
    assert totals.cost_per_sample == pytest.approx(totals.cost_spent / 72)
    last = engine.last_telemetry
    engine.reset_telemetry()
    assert engine.telemetry_totals() == Telemetry(0, 0, (0, 0, 0, 0), 0, 0, 0.0, 0.0, "flops")
    assert engine.last_telemetry is last
    priced = Engine(net, policy, mode=mode, costs=COSTS)
    out = priced(torch.randn(9, 10, generator=g))
    _same_telemetry(priced.last_telemetry, _recount(out, COSTS, None))
    assert not bool(out.forced.any())
    assert out.exit_index[[0, 3]].tolist() == [3, 3]  # NaN scores never pass a threshold
    bare = Engine(net, policy, mode=mode)
    out = bare(torch.randn(9, 10, generator=g))
    _same_telemetry(bare.last_telemetry, _recount(out, None, None))
    assert bare.telemetry_totals().cost_per_sample is None


def test_guard_rule() -> None:
    """The rule on hand-worked counts: costs 1, 2.5, 3, 5; limit 2.5 per sample, so a batch
    of 10 may spend 25."""
    guard = BudgetGuard(COSTS, Budget(2.5, "flops"))
    assert guard.limit == 2.5 and guard.batch_limit(10) == 25.0
    assert guard.cut([10, 0, 0, 0]) is None  # everyone leaves at exit 0: 10
    assert guard.cut([0, 10, 0, 0]) is None  # 10 * 2.5 = 25 <= 25: reach exit 1
    assert guard.cut([0, 0, 10, 0]) == 1     # 10 * 3 = 30 > 25: cut after exit 1
    assert guard.cut([5, 0, 0, 5]) == 2      # 5 + 5 * 3 = 20 <= 25, 5 + 5 * 5 = 30 > 25
    assert guard.cut([0, 0, 0, 0]) is None   # an empty batch
    assert BudgetGuard(COSTS, 0.5).limit == 2.5  # a fraction of the full cost, 5
    ledger = guard.ledger(10)
    assert not ledger.cut_after(0, 10) and ledger.cut_after(1, 10)
    assert ledger.left_cost == 0.0 and ledger.present == 10
    with pytest.raises(ValueError, match="one value per exit"):
        guard.cut([10, 0])


def test_guard_arguments() -> None:
    net = _mlp_net()
    policy = MaxProb([0.5] * 4)
    for limit in (0.0, 1.5, float("nan"), -0.2):
        with pytest.raises(ValueError, match=r"limit: a fraction of the full cost must lie"):
            BudgetGuard(COSTS, limit)
    with pytest.raises(ValueError, match="limit must be a positive finite cost"):
        BudgetGuard(COSTS, Budget(-3.0, "flops"))
    with pytest.raises(ValueError, match="a budget must be a finite number"):
        BudgetGuard(COSTS, Budget(float("inf"), "flops"))
    with pytest.raises(ValueError, match="limit is in 'ms' but the costs are in 'flops'"):
        BudgetGuard(COSTS, Budget(2.0, "ms"))
    for limit in (True, "0.5", None):
        with pytest.raises(TypeError, match="limit must be a fraction"):
            BudgetGuard(COSTS, limit)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"costs must be an eenet\.budget\.Costs"):
        BudgetGuard([1.0, 2.0], 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the guard's costs have 3 values but the network has 4"):
        Engine(net, policy, guard=BudgetGuard(Costs([1.0, 2.0, 3.0], "flops"), 0.5))
    with pytest.raises(TypeError, match=r"guard must be an eenet\.runtime\.BudgetGuard"):
        Engine(net, policy, guard=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="costs has 3 values but the network has 4 exits"):
        Engine(net, policy, costs=Costs([1.0, 2.0, 3.0], "flops"))
    with pytest.raises(TypeError, match=r"costs must be an eenet\.budget\.Costs"):
        Engine(net, policy, costs=[1.0, 2.0, 3.0, 4.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="costs differ from the guard's costs"):
        Engine(net, policy, guard=BudgetGuard(COSTS, 0.5), costs=Costs([1, 2, 3, 4], "flops"))
    assert "2.5 flops per sample" in repr(BudgetGuard(COSTS, 0.5))
