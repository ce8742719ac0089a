"""Hostile input to the engine and the policies: stages that emit NaN / inf / 1e30 / 1e-42
for some rows, huge and denormal inputs, batches of 0 and 1 rows, non-contiguous inputs,
inputs requiring grad, calls under no_grad / inference_mode / enable_grad, policies that
never or always exit, with and without a budget guard, in every mode (a hypothesis fuzz,
derandomized); wrongly typed inputs and mismatched heads. Each gets the oracle's result
(exits identical) or a TypeError / ValueError naming the bad argument; rows with
non-finite logits never leave before the last exit unless the guard forces them, and the
telemetry counts them."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eenet.budget import Costs
from eenet.nn import ExitHead, MultiExitNetwork
from eenet.policies import EENet, Entropy, ExitPolicy, MaxProb, Patience
from eenet.runtime import MODES, BudgetGuard, Engine, EngineOutput, simulate

pytestmark = pytest.mark.usefixtures("one_thread")

K, W, C = 4, 6, 5
COSTS = Costs([1.0, 2.0, 3.5, 5.0], "flops")
MARGIN = 1e-3
"""Thresholds keep this far from every score, so that the kernels' and the reference's
rounding cannot flip a decision."""
VALUES = (math.nan, math.inf, -math.inf, 1e30, -1e30, 1e-42, -1e-42)
CONTEXTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "plain": contextlib.nullcontext, "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode, "enable_grad": torch.enable_grad}


class _Stage(torch.nn.Module):
    """tanh(linear(h)); then the rows whose ``at`` is this stage's index get ``value`` in
    the columns ``cols`` marks: per-row side inputs, so they follow their rows in every
    mode (compact mode compacts them with the rows)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.lin = torch.nn.Linear(W, W)

    def forward(self, h: torch.Tensor, at: torch.Tensor, value: torch.Tensor,
                cols: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(h))
        hit = (at == self.k).unsqueeze(1) & cols
        return torch.where(hit, value.unsqueeze(1).to(h.dtype), h)


def _net(seed: int) -> MultiExitNetwork:
    torch.manual_seed(seed)
    return MultiExitNetwork([_Stage(k) for k in range(K)],
                            [ExitHead.linear(W, C) for _ in range(K)]).eval()


def _probe(kind: str, seed: int) -> ExitPolicy:
    """A policy of ``kind`` with zero thresholds (its scores are what matter here)."""
    if kind == "EENet":
        g = torch.Generator().manual_seed(seed)
        return EENet([0.0] * K, [torch.randn(C + 3 + j, generator=g) for j in range(K)],
                     [0.1] * K, use_vote=True)
    return {"MaxProb": MaxProb, "Entropy": Entropy, "Patience": Patience}[kind]([0.0] * K)


def _threshold(scores: torch.Tensor, style: str, upper: float) -> float:
    """A threshold in [0, upper] for one exit's scores (N,), at least MARGIN from each
    finite score but 0: ``always`` 0 (every finite score passes), ``never`` above them all
    when there is room below ``upper``, else (and for ``split``) the middle of the gap
    between two neighbouring scores nearest the median, else 0."""
    if style == "always":
        return 0.0
    finite = scores[torch.isfinite(scores)].double().unique(sorted=True)
    top = float(finite.max()) if finite.numel() else 0.0
    if style == "never" and top < upper - MARGIN:
        return min(top + 0.25, upper)
    wide = ((finite[1:] - finite[:-1]) > 2 * MARGIN).nonzero().flatten()
    if wide.numel() == 0:
        return 0.0
    i = int(wide[(wide - finite.numel() // 2).abs().argmin()])
    return float((finite[i] + finite[i + 1]) / 2)


def _policy(kind: str, style: str, seed: int, logits: list[torch.Tensor]) -> ExitPolicy:
    probe = _probe(kind, seed)
    scores = probe.scores(logits)
    upper = math.inf if kind == "Patience" else 1.0
    thresholds = [_threshold(scores[:, j], style, upper) for j in range(K)]
    if kind == "EENet":
        return EENet(thresholds, probe.sched_weights, probe.sched_biases, use_vote=True)
    return type(probe)(thresholds)


@dataclass(frozen=True)
class Case:
    n: int
    kind: str
    style: str
    hits: tuple[tuple[int, int, float, bool], ...]  # (row, stage, value, every column)
    x_hits: tuple[tuple[int, int, float], ...]  # (row, column, value) of x itself
    scale: float
    layout: str
    requires_grad: bool
    context: str
    guard: float | None
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.sampled_from([0, 1, 2, 5, 13]))
    hit = st.tuples(st.integers(0, max(n - 1, 0)), st.integers(0, K - 1),
                    st.sampled_from(VALUES), st.booleans())
    return Case(
        n=n, kind=draw(st.sampled_from(["MaxProb", "Entropy", "Patience", "EENet"])),
        style=draw(st.sampled_from(["split", "split", "never", "always"])),
        hits=tuple(draw(st.lists(hit, max_size=n))),
        x_hits=tuple(draw(st.lists(st.tuples(st.integers(0, max(n - 1, 0)),
                                             st.integers(0, W - 1), st.sampled_from(VALUES)),
                                   max_size=n))),
        scale=draw(st.sampled_from([1.0, 1.0, 1e30, 1e-42])),
        layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
        requires_grad=draw(st.booleans()), context=draw(st.sampled_from(list(CONTEXTS))),
        guard=draw(st.sampled_from([None, None, 0.3, 0.6])), seed=draw(st.integers(0, 3)))


def _batch(case: Case) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x (n, W) in the case's layout and scale with its hostile values, and the poisoning
    row inputs (the value column non-contiguous unless the layout is)."""
    g = torch.Generator().manual_seed(case.seed + 100)
    n = case.n
    if case.layout == "strided":
        x = torch.randn(n, 2 * W, generator=g)[:, ::2]
    elif case.layout == "transposed":
        x = torch.randn(W, n, generator=g).t()
    else:
        x = torch.randn(n, W, generator=g)
    x = x * case.scale
    for row, col, v in case.x_hits:
        x[row, col] = v
    at = torch.full((n,), -1, dtype=torch.int64)
    value = torch.zeros(2 * n)[::2] if case.layout != "contiguous" else torch.zeros(n)
    cols = torch.zeros(n, W, dtype=torch.bool)
    for row, stage, v, every in case.hits:
        at[row], value[row] = stage, v
        cols[row] = True if every else torch.arange(W) % 2 == 0
    if case.requires_grad:
        x.requires_grad_(True)
    return x, {"at": at, "value": value, "cols": cols}


def _assert_agree(out: EngineOutput, want: EngineOutput, ctx: str) -> None:
    """Exits and forced flags identical; logits the same NaN / inf pattern and, where
    finite, within 1e-5 of the row's largest finite logit (the kernels' fused GEMM sums in
    another order, and huge logits cancel); scores within 1e-5."""
    assert torch.equal(out.exit_index, want.exit_index), (ctx, out.exit_index, want.exit_index)
    assert torch.equal(out.forced, want.forced), (ctx, out.forced, want.forced)
    assert torch.equal(torch.isnan(out.logits), torch.isnan(want.logits)), ctx
    finite = torch.isfinite(want.logits)
    assert torch.equal(torch.isfinite(out.logits), finite), ctx
    assert torch.equal(out.logits[~finite & ~torch.isnan(want.logits)],
                       want.logits[~finite & ~torch.isnan(want.logits)]), ctx  # the infinities
    size = torch.where(finite, want.logits.abs(), 0.0).amax(dim=1, keepdim=True)
    err = torch.where(finite, (out.logits - want.logits).abs(), 0.0)
    assert bool((err <= 1e-5 * (1 + size)).all()), (ctx, err.max())
    torch.testing.assert_close(out.score, want.score, rtol=1e-5, atol=1e-5, equal_nan=True,
                               msg=ctx)


def _assert_invariants(out: EngineOutput, n: int, ctx: str) -> None:
    """Every row has an exit; a row whose logits are not finite left at the last exit or
    was forced out; nothing requires grad."""
    assert out.exit_index.shape == (n,) and out.logits.shape == (n, C), ctx
    assert bool(((out.exit_index >= 0) & (out.exit_index < K)).all()), (ctx, out.exit_index)
    nonfinite = ~torch.isfinite(out.logits).all(dim=1)
    early = nonfinite & (out.exit_index < K - 1) & ~out.forced
    assert not bool(early.any()), (ctx, out.exit_index, out.logits)
    assert not any(t.requires_grad for t in (out.logits, out.score)), ctx


def _assert_telemetry(engine: Engine, out: EngineOutput, ctx: str) -> None:
    t = engine.last_telemetry
    assert t is not None
    assert t.rows == out.exit_index.shape[0], ctx
    assert t.exits == tuple(torch.bincount(out.exit_index, minlength=K).tolist()), ctx
    assert t.forced == int(out.forced.sum()), ctx
    assert t.nonfinite == int((~torch.isfinite(out.logits).all(dim=1)).sum()), ctx


@settings(max_examples=150, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_hostile_batches(case: Case) -> None:
    """Every mode gives simulate's exits, forced flags, logits and scores on the case; the
    invariants hold; the inputs are left as they were; the telemetry matches; compact mode
    gives the same again on buffers made under the first call's grad mode."""
    net = _net(case.seed)
    x, rows = _batch(case)
    before = (x.detach().clone(), {k: v.clone() for k, v in rows.items()})
    with torch.no_grad():
        logits = [z.float() for z in net(x, **rows)]
    policy = _policy(case.kind, case.style, case.seed, logits)
    guard = None if case.guard is None else BudgetGuard(COSTS, case.guard)
    want = simulate(net, policy, x, guard=guard, **rows)
    _assert_invariants(want, case.n, "simulate")
    engines = {mode: Engine(net, policy, mode=mode, guard=guard, costs=COSTS)
               for mode in MODES}
    for mode, engine in engines.items():
        with CONTEXTS[case.context]():
            out = engine(x, **rows)
        _assert_agree(out, want, mode)
        _assert_invariants(out, case.n, mode)
        _assert_telemetry(engine, out, mode)
    again = engines["compact"](x, **rows)  # buffers made under case.context, reused
    _assert_agree(again, want, "compact, second call")
    if guard is not None:
        spent = float(COSTS.tensor()[want.exit_index].sum())
        assert spent <= max(guard.batch_limit(case.n), case.n * COSTS.values[0]) * (1 + 1e-12)
    torch.testing.assert_close(x.detach(), before[0], rtol=0, atol=0, equal_nan=True)
    assert x.grad is None
    for name, was in before[1].items():
        torch.testing.assert_close(rows[name], was, rtol=0, atol=0, equal_nan=True)
    if case.style == "never" and not case.hits + case.x_hits and case.guard is None:
        assert bool((want.exit_index == K - 1).all())


# -- the documented extremes ---------------------------------------------------------------


def _poisoned(n: int, rows_hit: list[int], stage: int = 0) -> dict[str, torch.Tensor]:
    at = torch.full((n,), -1, dtype=torch.int64)
    at[rows_hit] = stage
    return {"at": at, "value": torch.full((n,), math.nan),
            "cols": torch.ones(n, W, dtype=torch.bool)}


@pytest.mark.parametrize("mode", MODES)
def test_policies_that_never_and_always_exit(mode: str) -> None:
    """max-prob at threshold 1.0 on logits that never saturate: every row leaves last, with
    the last exit's logits; threshold 0: every row at exit 0 but the NaN rows, which leave
    last; telemetry counts the NaN rows."""
    net = _net(0)
    x = torch.randn(33, W)
    rows = _poisoned(33, [4, 20])
    with torch.no_grad():
        logits = [z.float() for z in net(x, **rows)]
    finite = torch.isfinite(logits[0]).all(dim=1)
    assert float(torch.softmax(logits[0][finite], dim=1).max()) < 0.99  # far from 1.0
    never = Engine(net, MaxProb([1.0] * K), mode=mode)
    out = never(x, **rows)
    assert bool((out.exit_index == K - 1).all())
    torch.testing.assert_close(out.logits, logits[-1], equal_nan=True)
    always = Engine(net, MaxProb([0.0] * K), mode=mode)
    out = always(x, **rows)
    assert out.exit_index.tolist() == [K - 1 if i in (4, 20) else 0 for i in range(33)]
    assert always.last_telemetry is not None and always.last_telemetry.nonfinite == 2
    assert always.last_telemetry.exits == (31, 0, 0, 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches(mode: str, n: int) -> None:
    net = _net(1)
    x = torch.randn(n, W)
    rows = _poisoned(n, [])
    policy = MaxProb([0.3] * K)
    guard = BudgetGuard(COSTS, 0.5)
    engine = Engine(net, policy, mode=mode, guard=guard)
    _assert_agree(engine(x, **rows), simulate(net, policy, x, guard=guard, **rows), mode)
    assert engine.last_telemetry is not None and engine.last_telemetry.rows == n


@pytest.mark.parametrize("mode", MODES)
def test_grad_modes_share_buffers(mode: str) -> None:
    """Calls under inference_mode, no_grad, enable_grad (x requiring grad) and none, in turn
    on one engine (compact mode: the same buffers), all give simulate's results and nothing
    that requires grad."""
    net = _net(2)
    policy = MaxProb([0.3] * K)
    engine = Engine(net, policy, mode=mode)
    for name in ("inference_mode", "plain", "enable_grad", "no_grad", "inference_mode"):
        x = torch.randn(9, W, requires_grad=name == "enable_grad")
        rows = _poisoned(9, [2])
        with CONTEXTS[name]():
            out = engine(x, **rows)
        _assert_agree(out, simulate(net, policy, x, **rows), name)
        _assert_invariants(out, 9, name)
        assert x.grad is None


# -- wrong arguments -------------------------------------------------------------------------


def _plain_net(seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    stages = [torch.nn.Sequential(torch.nn.Linear(W, W), torch.nn.Tanh()) for _ in range(K)]
    return MultiExitNetwork(stages, [ExitHead.linear(W, C) for _ in range(K)]).eval()


def _run(mode: str) -> Callable[..., EngineOutput]:
    """The mode's entry point: ``simulate`` for full (the engine's full mode calls it), the
    engine otherwise."""
    def run(net: torch.nn.Module, policy: ExitPolicy, x: object, **rows: object) -> EngineOutput:
        if mode == "full":
            return simulate(net, policy, x, **rows)  # type: ignore[arg-type]
        return Engine(net, policy, mode=mode)(x, **rows)  # type: ignore[arg-type]
    return run


BAD_X: list[tuple[object, type[Exception], str]] = [
    ([[0.0] * W] * 3, TypeError, r"x must be a torch\.Tensor with one row per sample, got list"),
    (None, TypeError, r"x must be a torch\.Tensor with one row per sample, got NoneType"),
    (1.5, TypeError, r"x must be a torch\.Tensor with one row per sample, got float"),
    (torch.tensor(1.0), ValueError, r"x must have a batch dimension"),
    (torch.ones(3, W, dtype=torch.int64), TypeError,
     r"x has dtype torch\.int64 but the network's first stage computes in torch\.float32"),
    (torch.ones(3, W, dtype=torch.float64), TypeError, r"x has dtype torch\.float64"),
    (torch.ones(3, W + 2), ValueError,
     r"x of shape \(3, 8\) and dtype torch\.float32 does not fit the network's first stage"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("x, error, message", BAD_X,
                         ids=["list", "None", "float", "0-dim", "int64", "float64", "wrong-D"])
def test_wrong_inputs_name_x(mode: str, x: object, error: type[Exception], message: str
                             ) -> None:
    engine = Engine(_plain_net(), MaxProb([0.5] * K), mode=mode)
    with pytest.raises(error, match=message):
        engine(x)  # type: ignore[arg-type]
    assert engine(torch.randn(3, W)).exit_index.shape == (3,)  # the engine still works


def test_token_ids_that_fail_the_encoder_are_not_blamed_on_their_dtype() -> None:
    from conftest import tiny_bert_exits

    net = tiny_bert_exits()  # 64 positions: 77 tokens do not fit
    ids = torch.randint(3, 50, (2, 77))
    with pytest.raises(ValueError, match=r"x of shape \(2, 77\) and dtype torch\.int64 does "
                                         r"not fit the network's first stage"):
        Engine(net, MaxProb([0.6, 0.0]), mode="compact")(ids)


class _Fails(torch.nn.Module):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(W, W)
        self.message = message

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(self.message)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("message", [
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`",
    "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"], ids=["kernel-fault", "cublas", "cudnn"])
def test_device_failures_in_the_first_stage_are_not_blamed_on_x(mode: str, message: str
                                                                 ) -> None:
    net = _plain_net()
    net.stages[0] = _Fails(message)
    with pytest.raises(RuntimeError) as info:
        Engine(net, MaxProb([0.5] * K), mode=mode)(torch.randn(3, W))
    assert type(info.value) is RuntimeError and str(info.value) == message


@pytest.mark.parametrize("mode", MODES)
def test_wrong_row_inputs(mode: str) -> None:
    net = _net(0)
    engine = Engine(net, MaxProb([0.5] * K), mode=mode)
    x, rows = torch.randn(4, W), _poisoned(4, [])
    with pytest.raises(TypeError, match="row input 'value' must be a tensor, got NoneType"):
        engine(x, **{**rows, "value": None})
    with pytest.raises(ValueError, match="row input 'cols' must have one row per input row"):
        engine(x, **{**rows, "cols": rows["cols"][:3]})


class _Tuple(torch.nn.Module):
    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h, h


class _DropRow(torch.nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[1:]


@pytest.mark.parametrize("mode", MODES)
def test_mismatched_network(mode: str) -> None:
    """A head whose classifier does not fit its features, a stage returning a tuple or
    dropping rows: a call error naming the head or stage; heads with different class
    counts, an EENet policy for another C, a policy with the wrong number of rules or a
    non-finite threshold, a net or policy of the wrong type: refused up front."""
    run = _run(mode)
    policy = MaxProb([0.3] * K)
    x = torch.randn(5, W)
    net = _plain_net()
    net.heads[1] = ExitHead.linear(W + 1, C)
    with pytest.raises(ValueError, match=r"exit head 1: its features must be \(5, 7\) or "
                                         r"\(5, 7, S\) to fit its classifier"):
        run(net, MaxProb([1.0] * K), x)  # no row leaves before exit 1
    net = _plain_net()
    net.stages[1] = torch.nn.Sequential(net.stages[1], _Tuple())
    with pytest.raises(TypeError, match="stage 1 returned a tuple, not a tensor"):
        run(net, MaxProb([1.0] * K), x)
    net = _plain_net()
    net.stages[2] = torch.nn.Sequential(net.stages[2], _DropRow())
    with pytest.raises(ValueError, match=r"exit head 2: .* got \(4, 6\)"):
        run(net, MaxProb([1.0] * K), x)
    net = _plain_net()
    net.heads[2] = ExitHead.linear(W, C + 2)
    with pytest.raises(ValueError, match=r"classifiers have out_features \[5, 5, 7, 5\]"):
        run(net, policy, x)
    net = _plain_net()
    for head in net.heads:
        head.classifier = torch.nn.Linear(W, 1)
    with pytest.raises(ValueError, match=r"same C >= 2 classes; .* out_features \[1, 1, 1, 1\]"):
        run(net, policy, x)
    net = _plain_net()
    g = torch.Generator().manual_seed(0)
    eenet = EENet([0.5] * K, [torch.randn(C + 4 + j, generator=g) for j in range(K)], [0.0] * K)
    with pytest.raises(ValueError, match="score heads are for 7 classes but the network has 5"):
        run(net, eenet, x)
    with pytest.raises(ValueError, match="MaxProb has 3 exit rules but the network has 4"):
        run(net, MaxProb([0.5] * 3), x)
    mutated = MaxProb([0.5] * K)
    mutated.thresholds[1] = math.nan
    with pytest.raises(ValueError, match="policy threshold 1 is nan: a 'max_prob' threshold "
                                         r"must be finite and in \[0, 1\]"):
        run(net, mutated, x)
    mutated.thresholds[1] = 1.5
    with pytest.raises(ValueError, match=r"policy threshold 1 is 1\.5"):
        run(net, mutated, x)
    patience = Patience([1.0] * K)
    patience.thresholds[0] = -1.0
    with pytest.raises(ValueError, match="policy threshold 0 is -1: a 'patience' threshold "
                                         "must be finite and >= 0"):
        run(net, patience, x)
    with pytest.raises(TypeError, match=r"policy must be an eenet\.policies\.ExitPolicy, got "
                                        "NoneType"):
        run(net, None, x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="net must have stages and heads"):
        run(torch.nn.Linear(W, C), policy, x)
    net.heads[3] = torch.nn.Linear(W, C)  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"net\.heads\[3\] must have features\(\) and an "
                                        "nn.Linear classifier"):
        run(net, policy, x)


# -- the policies' offline oracle ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["MaxProb", "Entropy", "Patience", "EENet"])
def test_policy_oracle_on_hostile_logits(kind: str) -> None:
    """The offline oracle on NaN / inf / huge / denormal logits: a score is NaN exactly
    where the exit's logits are not finite (for EENet, whose score reads the earlier
    scores, from there on); with threshold 0 every row leaves at its first exit with a
    finite score, or last. Malformed logits lists raise naming the entry."""
    probe = _probe(kind, 0)
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(12, C, generator=g) for _ in range(K)]
    logits[0][0], logits[1][1, 2], logits[0][2, 0] = math.nan, math.inf, -math.inf
    logits[0][3], logits[1][4], logits[2][5] = 1e30, -1e30, 1e-42
    logits[1][6, 1], logits[2][6] = math.nan, math.nan
    bad = torch.stack([~torch.isfinite(z).all(dim=1) for z in logits], dim=1)  # (N, K)
    if kind == "EENet":
        bad = bad.cummax(dim=1).values
    assert torch.equal(torch.isnan(probe.scores(logits)), bad)
    exits, _ = _policy(kind, "always", 0, logits).decide(logits)
    good = ~bad
    good[:, -1] = True
    assert torch.equal(exits, good.to(torch.uint8).argmax(dim=1))
    assert exits[[0, 2, 6]].tolist() == ([3, 3, 0] if kind == "EENet" else [1, 1, 0])
    for wrong, error, message in [
            (logits[0], TypeError, r"logits must be a list of K tensors"),
            ([*logits[:2], logits[2][:5], logits[3]], ValueError,
             r"logits\[2\] must be \(N, C\) with C >= 2 and the shape of logits\[0\]"),
            ([*logits[:3], logits[3][:, :1]], ValueError, r"logits\[3\] must be \(N, C\)"),
            ([logits[0][0], *logits[1:]], ValueError, r"logits\[0\] must be \(N, C\)"),
            ([*logits[:3], logits[3].long()], TypeError,
             r"logits\[3\] must be a floating-point tensor, got torch\.int64"),
            ([*logits[:3], None], TypeError, r"logits\[3\] must be a floating-point tensor, "
                                              "got NoneType"),
            (logits[:3], ValueError, "has 4 exit rules but the network has 3 exits")]:
        with pytest.raises(error, match=message):
            probe.decide(wrong)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold 1 is inf: a 'max_prob' threshold must be "
                                         "finite"):
        MaxProb([0.5, math.inf, 0.5, 0.0])
