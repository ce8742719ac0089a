"""The runtime engine: every mode agrees with a hand-written early-exit loop, for every
policy; a compact stage is the fused op and the compaction, with one host sync; the buffer
cache stays under its byte cap; concurrent use is refused."""

from __future__ import annotations

import itertools
import re
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from eenet.budget import Costs
from eenet.nn import ExitHead, MultiExitNetwork
from eenet.policies import EENet, Entropy, ExitPolicy, MaxProb, Patience, collect_exit_logits
from eenet.runtime import (
    CACHE_BYTES,
    MODES,
    Engine,
    EngineOutput,
    RowState,
    bucket_rows,
    run_stages,
    simulate,
)
from eenet_kernels import reference

C = 7

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_net(seed: int = 0) -> MultiExitNetwork:
    """Three conv stages with the paper's conv exit heads (4-D activations, pooled exits)."""
    torch.manual_seed(seed)
    chans = [3, 8, 12, 16]
    stages = [torch.nn.Sequential(torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.ReLU())
              for a, b in itertools.pairwise(chans)]
    heads = [ExitHead.conv(b, C, width=6) for b in chans[1:]]
    return MultiExitNetwork(stages, heads).eval()


def _mlp_net(seed: int = 0, exits: int = 4, width: int = 10) -> MultiExitNetwork:
    torch.manual_seed(seed)
    stages = [torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())
              for _ in range(exits)]
    heads = [ExitHead.linear(width, C) for _ in range(exits)]
    return MultiExitNetwork(stages, heads).eval()


def _median_policy(kind: type[ExitPolicy], net: MultiExitNetwork, x: torch.Tensor
                   ) -> ExitPolicy:
    """Thresholds at each exit's median score on x, so that rows leave at every exit."""
    with torch.no_grad():
        logits = [z.float() for z in net(x)]
    k = len(logits)
    if kind is Patience:
        return Patience([1.0] * k)
    if kind is EENet:
        g = torch.Generator().manual_seed(1)
        weights = [torch.randn(C + 2 + j + 1, generator=g) for j in range(k)]
        probe = EENet([0.0] * k, weights, [0.1] * k, use_vote=True)
    else:
        probe = kind([0.0] * k)
    scores = probe.scores(logits)
    thresholds = [float(scores[:, j].median()) for j in range(k)]
    if kind is EENet:
        return EENet(thresholds, weights, [0.1] * k, use_vote=True)
    return kind(thresholds)


@torch.no_grad()
def _hand_loop(net: MultiExitNetwork, policy: ExitPolicy, x: torch.Tensor,
               **row_inputs: torch.Tensor) -> EngineOutput:
    """The expected results, written out: every stage and exit head on every row, each
    exit's score from the reference math on its fp32 logits with the earlier exits' scores
    and argmax as history, and each row takes the first exit whose score reaches its
    threshold (the last exit takes every row left)."""
    n = x.shape[0]
    rules = policy.rules()
    last = len(rules) - 1
    out = EngineOutput.empty(n, C, x.device)
    scores: list[torch.Tensor] = []
    preds: list[torch.Tensor] = []
    h = x
    for k, (stage, head, rule) in enumerate(zip(net.stages, net.heads, rules, strict=True)):
        h = stage(h, **row_inputs)
        z = head(h).float()
        prev_s = torch.stack(scores, dim=1) if scores else z.new_zeros(n, 0)
        prev_p = torch.stack(preds, dim=1) if preds else z.new_zeros(n, 0, dtype=torch.int64)
        s = reference.policy_score(z, rule.policy, prev_scores=prev_s, prev_preds=prev_p,
                                   sched_weight=rule.sched_weight, sched_bias=rule.sched_bias,
                                   use_vote=rule.use_vote)
        passes = torch.ones_like(s, dtype=torch.bool) if k == last else s >= rule.threshold
        takes = passes & (out.exit_index < 0)
        out.logits[takes], out.score[takes], out.exit_index[takes] = z[takes], s[takes], k
        scores.append(s)
        preds.append(z.argmax(dim=1))
    return out


def _assert_same(out: EngineOutput, want: EngineOutput, ctx: str = "") -> None:
    assert torch.equal(out.exit_index, want.exit_index), (ctx, out.exit_index, want.exit_index)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5, msg=ctx)
    torch.testing.assert_close(out.score, want.score, rtol=1e-5, atol=1e-5, equal_nan=True,
                               msg=ctx)


POLICIES = [MaxProb, Entropy, Patience, EENet]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", POLICIES, ids=lambda p: p.__name__)
@pytest.mark.parametrize("make_net", [_conv_net, _mlp_net], ids=["conv", "mlp"])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_engine_matches_hand_loop(mode: str, kind: type[ExitPolicy], make_net, n: int) -> None:
    net = make_net()
    x = torch.randn(n, 3, 8, 8) if make_net is _conv_net else torch.randn(n, 10)
    policy = _median_policy(kind, net, torch.randn(64, *x.shape[1:]))
    _assert_same(Engine(net, policy, mode=mode)(x), _hand_loop(net, policy, x))


@pytest.mark.parametrize("kind", POLICIES, ids=lambda p: p.__name__)
def test_simulate_matches_hand_loop(kind: type[ExitPolicy]) -> None:
    """simulate, the oracle the benchmarks check every peer with, is the same loop."""
    net = _mlp_net()
    x = torch.randn(97, 10)
    policy = _median_policy(kind, net, torch.randn(64, 10))
    want = _hand_loop(net, policy, x)
    assert len(set(want.exit_index.tolist())) > 1
    _assert_same(simulate(net, policy, x), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_network_calibrates_as_it_runs(dtype: torch.dtype) -> None:
    """An fp16/bf16 network: the calibration logits are the fused op's (fp32 heads on the
    upcast features, computed here by hand), so thresholds set on them split the samples in
    every mode exactly as the policy decides on them, and the budget holds in the engine."""
    net = _mlp_net(exits=3, width=32).to(dtype)
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4000, 32, generator=g)).to(dtype)
    logits, _ = collect_exit_logits(net, [(x, torch.zeros(4000, dtype=torch.int64))])
    with torch.no_grad():
        h = x
        for stage, head, z in zip(net.stages, net.heads, logits, strict=True):
            h = stage(h)
            w, b = head.classifier.weight.float(), head.classifier.bias.float()
            assert z.dtype == torch.float32
            torch.testing.assert_close(z, head.features(h).float() @ w.t() + b, rtol=0,
                                       atol=1e-5)
    costs = Costs([1.0, 2.0, 3.0], "flops")
    policy = MaxProb.fit_logits(logits, costs, 0.6)
    want, _ = policy.decide(logits)
    for mode in MODES:
        out = Engine(net, policy, mode=mode)(x)
        assert torch.equal(out.exit_index, want), (mode, int((out.exit_index != want).sum()))
        assert costs.expected(out.exit_index) <= 0.6 * costs.full


def test_engine_uses_every_exit_and_reuses_buffers() -> None:
    net = _mlp_net()
    x = torch.randn(256, 10)
    engine = Engine(net, _median_policy(MaxProb, net, x), mode="compact")
    first = engine(x)
    counts = torch.bincount(first.exit_index, minlength=4)
    assert bool((counts > 0).all()), counts
    buffers = next(iter(engine._cache._entries.values()))
    ptrs = [b.data_ptr() for b in buffers.stage_out.values()]
    second = engine(x)
    assert [b.data_ptr() for b in buffers.stage_out.values()] == ptrs
    assert torch.equal(first.exit_index, second.exit_index)


def test_engine_all_exit_at_first_and_none_early() -> None:
    net = _mlp_net()
    x = torch.randn(32, 10)
    everyone = Engine(net, MaxProb([0.0, 0.0, 0.0, 0.0]))(x)
    assert bool((everyone.exit_index == 0).all())
    nobody = Engine(net, MaxProb([1.0, 1.0, 1.0, 0.0]))(x)
    assert bool((nobody.exit_index == 3).all())
    torch.testing.assert_close(nobody.logits, net(x)[-1])


def test_engine_empty_batch() -> None:
    net = _mlp_net()
    out = Engine(net, MaxProb([0.5] * 4))(torch.randn(0, 10))
    assert out.logits.shape == (0, C) and out.exit_index.shape == (0,)


# -- what a compact stage costs ------------------------------------------------------------

RUNTIME_FILE = re.compile(r"eenet/runtime/(\w+\.py)\(")
VIEW_OPS = {"aten::slice", "aten::t", "aten::transpose", "aten::select", "aten::unbind",
            "aten::as_strided", "aten::alias", "aten::view"}
OUTPUT_OPS = {"aten::zeros", "aten::full"}  # the call's result buffers (EngineOutput.empty)
TELEMETRY_OPS = Counter({"aten::isfinite": 1, "aten::all": 1, "aten::unsqueeze": 3,
                         "aten::eq": 1, "aten::cat": 1, "aten::sum": 1, "aten::add": 1})
"""What eenet.runtime.telemetry issues once per call (after the first): the batch's counts
and their addition to the running totals."""


def _profile(fn: Callable[[], object]) -> list:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return list(prof.events())


def _runtime_ops(fn: Callable[[], object]) -> dict[str, Counter[str]]:
    """The aten ops that eenet.runtime's own code issues in one call of ``fn`` (not those
    of the network's modules or inside the eenet ops), by module file and name: each aten
    event whose nearest enclosing Python frame lies in eenet/runtime/ and that no other op
    encloses. Read from the profiler's event tree, which holds the Python frames on every
    torch this suite runs on (the flat event list lacks them before torch 2.13)."""
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        fn()
    names: dict[str, Counter[str]] = {}

    def walk(ev: Any, frame: str | None) -> None:
        if ev.tag == _EventType.PyCall:
            frame = ev.name
        elif ev.tag == _EventType.TorchOp:
            where = None if frame is None else RUNTIME_FILE.search(frame)
            if ev.name.startswith("aten::") and where is not None:
                names.setdefault(where.group(1), Counter())[ev.name] += 1
            frame = None  # the ops inside an op are not a frame's own
        for child in ev.children:
            walk(child, frame)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, None)
    return names


@pytest.mark.parametrize("kind", POLICIES, ids=lambda p: p.__name__)
def test_compact_stage_is_the_op_and_the_compaction(kind: type[ExitPolicy]) -> None:
    """The engine takes the history (pred, score) and the survivors (keep) from the fused
    op's outputs: besides the result buffers, its own code issues views only, no argmax,
    negation or copy. The telemetry adds the same few ops once per call, however many
    stages run."""
    net = _mlp_net()
    x = torch.randn(64, 10)
    engine = Engine(net, _median_policy(kind, net, torch.randn(64, 10)))
    engine(x)  # buffers allocated
    ops = _runtime_ops(lambda: engine(x))
    stage_ops = ops.pop("engine.py", Counter()) + ops.pop("loop.py", Counter())
    assert stage_ops["aten::slice"] > 0, stage_ops  # the profile does see the engine's ops
    assert set(stage_ops) <= VIEW_OPS | OUTPUT_OPS, stage_ops
    assert ops == {"telemetry.py": TELEMETRY_OPS}, ops
    first_only = Engine(net, MaxProb([0.0] * 4))  # one stage instead of four
    assert bool((first_only(x).exit_index == 0).all())
    assert _runtime_ops(lambda: first_only(x))["telemetry.py"] == TELEMETRY_OPS
    quiet = Engine(net, engine.policy, telemetry=False)
    _assert_same(quiet(x), engine(x))
    assert "telemetry.py" not in _runtime_ops(lambda: quiet(x))
    assert quiet.last_telemetry is None
    with pytest.raises(RuntimeError, match="telemetry is off"):
        quiet.telemetry_totals()


def _syncs(fn: Callable[[], object]) -> int:
    """Host syncs of one call on CPU: ``aten::_local_scalar_dense`` (every ``.item()``,
    ``bool(t)``, ``int(t)``) and ``aten::nonzero`` (boolean indexing) events, as
    ``bench.runner.count_syncs`` counts them."""
    names = Counter(ev.name for ev in _profile(fn))
    return names["aten::_local_scalar_dense"] + names["aten::nonzero"]


@pytest.mark.parametrize("policy", [Patience([1.0] * 4), MaxProb([0.0] * 4),
                                    MaxProb([1.0, 1.0, 1.0, 0.0]), "median"],
                         ids=["patience", "all-first", "none-early", "median"])
def test_engine_one_host_sync_per_stage(policy: ExitPolicy | str) -> None:
    """compact mode reads the survivor count once after every exit the batch reaches but the
    last, and waits on the device nowhere else."""
    net = _mlp_net()
    x = torch.randn(64, 10)
    if policy == "median":
        policy = _median_policy(MaxProb, net, torch.randn(64, 10))
    engine = Engine(net, policy)
    out = engine(x)
    reached = int(out.exit_index.max()) + 1  # stages the batch ran
    assert _syncs(lambda: x.sum().item()) == 1 and _syncs(lambda: x[x[:, 0] > 0]) == 1
    assert _syncs(lambda: engine(x)) == min(reached, net.num_exits - 1)


def test_engine_bad_inputs() -> None:
    net = _mlp_net()
    with pytest.raises(ValueError, match="mode must be one of"):
        Engine(net, MaxProb([0.5] * 4), mode="fast")
    with pytest.raises(ValueError, match="3 exit rules but the network has 4 exits"):
        Engine(net, MaxProb([0.5] * 3))
    with pytest.raises(ValueError, match="cache_bytes must be an int >= 0"):
        Engine(net, MaxProb([0.5] * 4), cache_bytes=-1)


# -- the shared stage loop -------------------------------------------------------------------


class _Recording:
    """A loop step that records the calls and lets ``stay[k]`` rows go on after exit k."""

    def __init__(self, stay: list[int]) -> None:
        self.stay = stay
        self.calls: list[tuple[str, int, int]] = []

    def exit(self, k: int, h: torch.Tensor, rows: RowState) -> int:
        self.calls.append(("exit", k, h.shape[0]))
        return self.stay[k]

    def advance(self, k: int, h: torch.Tensor, rows: RowState, stay: int
                ) -> tuple[torch.Tensor, RowState] | None:
        self.calls.append(("advance", k, stay))
        if stay == 0:
            return None
        return h[:stay], RowState(rows.index[:stay])


def test_run_stages_order_and_stop() -> None:
    stages = torch.nn.ModuleList(torch.nn.Identity() for _ in range(3))
    x = torch.randn(8, 2)
    step = _Recording([5, 2, 9])
    run_stages(stages, x, RowState(torch.arange(8)), step)
    assert step.calls == [("exit", 0, 8), ("advance", 0, 5), ("exit", 1, 5), ("advance", 1, 2),
                          ("exit", 2, 2)]  # no advance after the last exit
    step = _Recording([3, 0, 9])
    run_stages(stages, x, RowState(torch.arange(8)), step)
    assert step.calls == [("exit", 0, 8), ("advance", 0, 3), ("exit", 1, 3), ("advance", 1, 0)]


# -- row inputs ------------------------------------------------------------------------------


class _ScaledStage(torch.nn.Module):
    """A stage with a per-row side input: tanh(linear(h) * scale[:, None])."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(10, 10)

    def forward(self, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(h) * scale[:, None])


@pytest.mark.parametrize("mode", MODES)
def test_row_inputs_follow_their_rows(mode: str) -> None:
    """A per-row side input reaches every stage, compacted with the rows in compact mode."""
    torch.manual_seed(3)
    net = MultiExitNetwork([_ScaledStage() for _ in range(4)],
                           [ExitHead.linear(10, C) for _ in range(4)]).eval()
    x = torch.randn(97, 10)
    scale = torch.rand(97) * 4 + 0.1
    before = scale.clone()
    with torch.no_grad():
        scores = MaxProb([0.0] * 4).scores([z.float() for z in net(x, scale=scale)])
    policy = MaxProb([float(scores[:, k].median()) for k in range(3)] + [0.0])
    want = _hand_loop(net, policy, x, scale=scale)
    out = Engine(net, policy, mode=mode)(x, scale=scale)
    _assert_same(out, want)
    assert len(set(out.exit_index.tolist())) == 4
    assert torch.equal(scale, before)
    # the side input matters: a wrong one (not compacted alike) would change the results
    other = _hand_loop(net, policy, x, scale=scale.flip(0))
    assert not torch.equal(other.exit_index, want.exit_index)


def test_bad_row_inputs() -> None:
    net = _mlp_net()
    engine = Engine(net, MaxProb([0.5] * 4))
    x = torch.randn(8, 10)
    with pytest.raises(ValueError, match=r"row input 'mask' must have one row per input row"):
        engine(x, mask=torch.ones(7))
    with pytest.raises(ValueError, match="one row per input row"):
        engine(x, mask=torch.tensor(1.0))
    with pytest.raises(TypeError, match="row input 'mask' must be a tensor"):
        engine(x, mask=[1] * 8)


# -- the buffer cache ------------------------------------------------------------------------


def test_buffer_cache_keeps_the_recent_shapes() -> None:
    net = _mlp_net()
    engine = Engine(net, MaxProb([0.5] * 4), cache_shapes=2)
    for n in (8, 9, 8, 10):
        engine(torch.randn(n, 10))
    assert [key[0] for key in engine._cache._entries] == [8, 10]
    with pytest.raises(ValueError, match="cache_shapes must be a positive int"):
        Engine(net, MaxProb([0.5] * 4), cache_shapes=0)


def test_bucket_rows() -> None:
    sizes = range(1, 5000)
    buckets = [bucket_rows(n) for n in sizes]
    assert all(n <= b <= n * 9 / 8 for n, b in zip(sizes, buckets, strict=True))
    assert buckets == sorted(buckets)
    assert [bucket_rows(n) for n in range(1, 17)] == list(range(1, 17))
    assert len({bucket_rows(n) for n in range(100_000, 100_008)}) == 1
    assert len(set(buckets)) < len(buckets) / 10


def test_batch_sizes_in_a_bucket_share_buffers() -> None:
    """Batches differing by a row reuse one set of buffers (larger than the batch), with
    the same results as the loop."""
    net = _mlp_net()
    policy = _median_policy(MaxProb, net, torch.randn(64, 10))
    engine = Engine(net, policy)
    engine(torch.randn(1000, 10))
    held = engine.buffer_bytes
    assert held > 0
    for n in range(1001, 1008):
        x = torch.randn(n, 10)
        _assert_same(engine(x), _hand_loop(net, policy, x), f"n={n}")
        assert engine.buffer_bytes == held


def test_buffer_cache_stays_under_its_byte_cap() -> None:
    """Across many batch shapes the cache holds at most ``cache_bytes`` between calls; a
    batch too big for the cap alone still gives the right results; the default is 256 MiB."""
    assert CACHE_BYTES == 256 << 20
    net = _mlp_net(width=32)
    policy = _median_policy(MaxProb, net, torch.randn(64, 32))
    cap = 96 << 10
    engine = Engine(net, policy, cache_bytes=cap, cache_shapes=64)
    g = torch.Generator().manual_seed(0)
    sizes = [int(n) for n in torch.randint(1, 400, (30,), generator=g)] + [2000, 3]
    most = 0
    for n in sizes:
        x = torch.randn(n, 32, generator=g)
        _assert_same(engine(x), _hand_loop(net, policy, x), f"n={n}")
        assert engine.buffer_bytes <= cap, (n, engine.buffer_bytes)
        most = max(most, engine.buffer_bytes)
    assert most > cap // 2  # the cache was used, not just empty
    nothing = Engine(net, policy, cache_bytes=0)
    x = torch.randn(50, 32)
    _assert_same(nothing(x), _hand_loop(net, policy, x))
    assert nothing.buffer_bytes == 0


# -- threads ---------------------------------------------------------------------------------


class _GateStage(torch.nn.Module):
    """Identity; its first call signals ``entered`` and waits for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(timeout=30)
        return h


@pytest.mark.parametrize("mode", MODES)
def test_engine_refuses_concurrent_use(mode: str) -> None:
    """A second thread calling an engine that is running a batch gets a RuntimeError that
    says what to do; the running batch is unaffected and the engine works afterwards."""
    net = _mlp_net()
    policy = _median_policy(MaxProb, net, torch.randn(64, 10))
    gate = _GateStage()
    net.stages[1] = torch.nn.Sequential(gate, net.stages[1])
    engine = Engine(net, policy, mode=mode)
    x, y = torch.randn(64, 10), torch.randn(48, 10)
    result: list[EngineOutput] = []
    worker = threading.Thread(target=lambda: result.append(engine(x)))
    worker.start()
    try:
        assert gate.entered.wait(timeout=30)  # the worker is inside the engine
        with pytest.raises(RuntimeError, match="give each thread its own Engine"):
            engine(y)
    finally:
        gate.release.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
    _assert_same(result[0], _hand_loop(net, policy, x))
    _assert_same(engine(y), _hand_loop(net, policy, y))


# -- the op demo -----------------------------------------------------------------------------


def test_op_demo_checks_pass(capsys: pytest.CaptureFixture[str]) -> None:
    from eenet_kernels import demo

    demo.main()
    out = capsys.readouterr().out
    assert ": False" not in out and out.count(": True") == 5, out
