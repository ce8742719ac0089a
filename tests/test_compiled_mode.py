"""Engine compiled mode: one fullgraph torch.compile graph of the compact loop, compiled once
per input shape class whatever the survivor pattern, with compact mode's results (up to rows
within rounding of a threshold)."""

from __future__ import annotations

import itertools

import pytest
import torch

import eenet_kernels as ek
from eenet.budget import Costs
from eenet.nn import ExitHead, MultiExitNetwork
from eenet.policies import EENet, ExitPolicy, MaxProb, Patience
from eenet.runtime import BudgetGuard, Engine, EngineOutput

C = 7
WIDTH = 10
SCORE_TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


class _Scaled(torch.nn.Module):
    """Linear + tanh, the output times a per-row input ``scale`` (N, 1)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(h)) * scale


def _mlp_net(seed: int = 0, exits: int = 3, row_input: bool = False) -> MultiExitNetwork:
    torch.manual_seed(seed)
    stages = [_Scaled(WIDTH) if row_input else
              torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh())
              for _ in range(exits)]
    return MultiExitNetwork(stages, [ExitHead.linear(WIDTH, C) for _ in range(exits)]).eval()


def _conv_net(seed: int = 0) -> MultiExitNetwork:
    """Conv stages with the paper's conv exit heads (batch norm in the heads)."""
    torch.manual_seed(seed)
    chans = [3, 8, 12]
    stages = [torch.nn.Sequential(torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.ReLU())
              for a, b in itertools.pairwise(chans)]
    return MultiExitNetwork(stages, [ExitHead.conv(b, C, width=6) for b in chans[1:]]).eval()


def _switch_net(exits: int = 3) -> MultiExitNetwork:
    """Identity stages; exit k's logits are (10 x_k, 0, ..., 0): a row leaves at the first
    exit k < K - 1 with x_k = 1 under MaxProb(0.9) (p = 0.9996; with x_k = 0, p = 1/7)."""
    stages, heads = [], []
    for k in range(exits):
        stage = torch.nn.Linear(WIDTH, WIDTH)
        head = ExitHead.linear(WIDTH, C)
        with torch.no_grad():
            stage.weight.copy_(torch.eye(WIDTH))
            stage.bias.zero_()
            head.classifier.weight.zero_()
            head.classifier.weight[0, k] = 10.0
            head.classifier.bias.zero_()
        stages.append(stage)
        heads.append(head)
    return MultiExitNetwork(stages, heads).eval()


def _switch_batch(exit_of_row: list[int]) -> torch.Tensor:
    """Rows for :func:`_switch_net` leaving at the given exits (K - 1: no early exit)."""
    x = torch.zeros(len(exit_of_row), WIDTH)
    for i, k in enumerate(exit_of_row):
        if k < 2:
            x[i, k] = 1.0
    return x


def _median_policy(kind: type[ExitPolicy], net: MultiExitNetwork, x: torch.Tensor,
                   **row_inputs: torch.Tensor) -> ExitPolicy:
    """Thresholds at each exit's median score on x, so that rows leave at every exit."""
    k = len(net.heads)
    if kind is Patience:
        return Patience([1.0] * k)
    with torch.no_grad():
        logits = [z.float() for z in net(x, **row_inputs)]
    if kind is EENet:
        g = torch.Generator().manual_seed(1)
        weights = [torch.randn(C + 2 + j + 1, generator=g) for j in range(k)]
        probe: ExitPolicy = EENet([0.0] * k, weights, [0.1] * k, use_vote=True)
    else:
        probe = kind([0.0] * k)
    scores = probe.scores(logits)
    thresholds = [float(scores[:, j].median()) for j in range(k)]
    return EENet(thresholds, weights, [0.1] * k, use_vote=True) if kind is EENet else (
        kind(thresholds))


def _assert_matches_compact(out: EngineOutput, want: EngineOutput, policy: ExitPolicy,
                            net: MultiExitNetwork, x: torch.Tensor,
                            **row_inputs: torch.Tensor) -> None:
    """Equal exits, logits and scores, except rows whose score lies within SCORE_TOL of the
    threshold at the first exit where the two disagree (those are exempt, no others)."""
    with torch.no_grad():
        scores = policy.scores([z.float() for z in net(x, **row_inputs)])
    thresholds = torch.tensor(policy.thresholds, dtype=torch.float32)
    differ = out.exit_index != want.exit_index
    at = torch.minimum(out.exit_index, want.exit_index)
    rows = torch.arange(x.shape[0])
    near = (scores[rows, at] - thresholds[at]).abs() <= SCORE_TOL
    assert bool((near | ~differ).all()), (
        f"rows {rows[differ & ~near].tolist()} exit at {out.exit_index[differ].tolist()} "
        f"compiled vs {want.exit_index[differ].tolist()} eager, far from the thresholds")
    same = ~differ
    torch.testing.assert_close(out.logits[same], want.logits[same], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.score[same], want.score[same], rtol=1e-5, atol=1e-5)
    assert out.logits.dtype == torch.float32 and out.exit_index.dtype == torch.int64
    assert not bool(out.forced.any())


def test_one_graph_whatever_the_exit_pattern() -> None:
    """Batches with every row leaving at exit 0, none leaving early, every row at exit 1 and
    mixed patterns, at several batch sizes: one graph (batch sizes >= 2 share it), the exact
    exits asked for; a batch of 1 (specialised by PyTorch) adds exactly one graph."""
    net = _switch_net()
    engine = Engine(net, MaxProb([0.9] * 3), mode="compiled", compile_backend="aot_eager")
    eager = Engine(net, engine.policy, mode="compact")
    patterns = [[0] * 8, [2] * 8, [1] * 5, [0, 1, 2, 1, 0, 2, 2, 0, 1, 1, 0, 2],
                [2, 0] * 10, [1, 2, 2]]
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for exits in patterns:
            x = _switch_batch(exits)
            out = engine(x)
            assert out.exit_index.tolist() == exits
            want = eager(x)
            torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
            torch.testing.assert_close(out.score, want.score, rtol=0, atol=0)
    assert engine.compiled_graphs == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1
    assert len(engine.compile_seconds) == 1 and engine.compile_seconds[0] > 0
    with torch.no_grad():
        assert engine(_switch_batch([0])).exit_index.tolist() == [0]
        assert engine(_switch_batch([2])).exit_index.tolist() == [2]
    assert engine.compiled_graphs == 2
    telemetry = engine.last_telemetry
    assert telemetry is not None and telemetry.exits == (0, 0, 1)


@pytest.mark.parametrize("kind", [MaxProb, Patience, EENet], ids=lambda p: p.__name__)
def test_matches_compact_mlp_with_row_inputs(kind: type[ExitPolicy]) -> None:
    """Every policy (history of scores and predictions through the graph), a row input
    compacted with the rows, three batch sizes: compact mode's results, one graph."""
    net = _mlp_net(row_input=True)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, WIDTH, generator=g) for n in (24, 9, 24)]
    scales = [torch.rand(x.shape[0], 1, generator=g) + 0.5 for x in batches]
    policy = _median_policy(kind, net, torch.cat(batches), scale=torch.cat(scales))
    engine = Engine(net, policy, mode="compiled", compile_backend="aot_eager")
    eager = Engine(net, policy, mode="compact")
    seen = set()
    with torch.no_grad():
        for x, scale in zip(batches, scales, strict=True):
            out = engine(x, scale=scale)
            _assert_matches_compact(out, eager(x, scale=scale), policy, net, x, scale=scale)
            seen.update(out.exit_index.tolist())
    first = 1 if kind is Patience else 0  # a patience streak is 0 at exit 0
    assert seen == set(range(first, 3)), "the batches should leave at every exit"
    assert engine.compiled_graphs == 1


def test_matches_compact_conv() -> None:
    """4-D activations and batch-norm exit heads, through the graph."""
    net = _conv_net()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 3, 6, 6, generator=g)
    policy = _median_policy(MaxProb, net, x)
    engine = Engine(net, policy, mode="compiled", compile_backend="aot_eager")
    with torch.no_grad():
        out = engine(x)
        _assert_matches_compact(out, Engine(net, policy, mode="compact")(x), policy, net, x)
        assert set(out.exit_index.tolist()) == {0, 1}
        assert engine(x[:7]).exit_index.tolist() == out.exit_index[:7].tolist()
    assert engine.compiled_graphs == 1


def test_inductor_default_backend() -> None:
    """The default backend (inductor) compiles the loop and gives compact mode's results."""
    net = _switch_net()
    engine = Engine(net, MaxProb([0.9] * 3), mode="compiled")
    assert engine.compile_backend == "inductor"
    with torch.no_grad():
        for exits in ([0, 1, 2, 2, 1, 0], [2] * 5, [0] * 9):
            assert engine(_switch_batch(exits)).exit_index.tolist() == exits
    assert engine.compiled_graphs == 1


def test_exemption_catches_a_far_disagreement() -> None:
    """The comparison exempts only rows near a threshold: a changed exit far from it fails."""
    net = _switch_net()
    policy = MaxProb([0.9] * 3)
    x = _switch_batch([0, 2, 1])
    with torch.no_grad():
        want = Engine(net, policy, mode="compact")(x)
    moved = EngineOutput(want.logits.clone(), want.exit_index.clone(), want.score.clone())
    moved.exit_index[0] = 2
    with pytest.raises(AssertionError, match="far from the thresholds"):
        _assert_matches_compact(moved, want, policy, net, x)


def test_empty_batch() -> None:
    engine = Engine(_mlp_net(), MaxProb([0.5] * 3), mode="compiled", compile_backend="aot_eager")
    with torch.no_grad():
        out = engine(torch.zeros(0, WIDTH))
    assert out.logits.shape == (0, C) and engine.compiled_graphs == 0


def test_guard_refused() -> None:
    net = _mlp_net()
    guard = BudgetGuard(Costs([1.0, 2.0, 3.0], "flops"), 0.5)
    with pytest.raises(ValueError, match="does not support a budget guard"):
        Engine(net, MaxProb([0.5] * 3), mode="compiled", guard=guard)


def test_bad_compile_backend_and_mode() -> None:
    net = _mlp_net()
    with pytest.raises(ValueError, match="compile_backend must be one of"):
        Engine(net, MaxProb([0.5] * 3), mode="compiled", compile_backend="bogus")
    with pytest.raises(ValueError, match="mode must be one of"):
        Engine(net, MaxProb([0.5] * 3), mode="compile")


@pytest.mark.skipif(not ek.HAVE_EXTENSION, reason="the reference is the dispatcher's choice")
def test_backend_override_refused() -> None:
    engine = Engine(_mlp_net(), MaxProb([0.5] * 3), mode="compiled", backend="reference")
    with pytest.raises(ValueError, match="runs the dispatcher's kernels"):
        engine(torch.zeros(4, WIDTH))
