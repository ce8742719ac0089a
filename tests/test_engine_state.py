"""What an engine serves when things change around it: the policy it was made with (not the
object's later state), the network's current dtype (compact buffers and graph-mode graphs
follow a cast), and autocast (every mode runs, the exits scored in fp32)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_compiled_mode import _median_policy, _mlp_net, _switch_batch, _switch_net
from test_engine import _hand_loop

from eenet.nn import MultiExitNetwork, classifier_operands
from eenet.policies import EENet, MaxProb, Patience
from eenet.runtime import Engine, EngineOutput, simulate
from eenet.runtime.graphs import EagerGraphs, GraphLoop
from eenet_kernels import reference

pytestmark = pytest.mark.usefixtures("one_thread")

EAGER_MODES = ("full", "mask", "compact")


def _same(out: EngineOutput, want: EngineOutput, ctx: str) -> None:
    assert out.exit_index.tolist() == want.exit_index.tolist(), ctx
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5, msg=ctx)
    torch.testing.assert_close(out.score, want.score, rtol=1e-5, atol=1e-5, msg=ctx)


# -- the policy ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [MaxProb, EENet], ids=lambda k: k.__name__)
def test_a_policy_changed_after_construction_changes_no_mode(kind: type) -> None:
    """Every mode serves the thresholds (and EENet weights) the engine was made with; the
    changed policy would send the rows elsewhere, so a mode that followed it would fail."""
    net = _mlp_net(seed=3)
    x = torch.randn(40, 10, generator=torch.Generator().manual_seed(3))
    policy = _median_policy(kind, net, torch.randn(64, 10))
    original = copy.deepcopy(policy)
    engines = {mode: Engine(net, policy, mode=mode, compile_backend="eager")
               for mode in (*EAGER_MODES, "compiled")}
    policy.thresholds[:] = [0.0] * len(policy.thresholds)  # every row would leave at exit 0
    if isinstance(policy, EENet):
        policy.sched_weights[0].neg_()
    assert not bool((_hand_loop(net, policy, x).exit_index
                     == _hand_loop(net, original, x).exit_index).all())
    want = _hand_loop(net, original, x)
    for mode, engine in engines.items():
        _same(engine(x), want, mode)
        served = engine.policy
        served.thresholds[0] = 1.0  # a copy: the engine still serves the original
        assert engine.policy.thresholds == original.thresholds
        _same(engine(x), want, f"{mode} after its policy copy was changed")


def test_backend_names_are_checked_at_construction() -> None:
    net = _mlp_net()
    with pytest.raises(ValueError, match="backend must be None or one of"):
        Engine(net, MaxProb([0.5] * 3), backend="cuBLAS")


# -- the network's dtype ---------------------------------------------------------------------


def _id_switch_net() -> MultiExitNetwork:
    """:func:`_switch_net` behind an embedding: id p (0, 1, 2) is the row that leaves at
    exit p, so an int64 input keeps its dtype whatever the network is cast to, and bf16
    holds every value (0, 1, 10) exactly."""
    net = _switch_net()
    embed = torch.nn.Embedding(3, net.stages[0].in_features)
    with torch.no_grad():
        embed.weight.copy_(_switch_batch([0, 1, 2]))
    net.stages[0] = torch.nn.Sequential(embed, net.stages[0])
    return net.eval()


PATTERNS = ([0, 1, 2, 2, 1, 0, 2], [2, 2, 2, 1, 1, 0, 0])


def test_compact_buffers_follow_a_cast_network() -> None:
    """Int ids in, so the buffer key stays the same when the network goes fp32 -> bf16 ->
    fp32: the stage buffers are made anew in the new dtype (and counted once)."""
    net = _id_switch_net()
    engines = {mode: Engine(net, MaxProb([0.9] * 3), mode=mode) for mode in EAGER_MODES}
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        net.to(dtype)
        for pattern in PATTERNS:
            ids = torch.tensor(pattern)
            outs = {mode: engine(ids) for mode, engine in engines.items()}
            for mode, out in outs.items():
                assert out.exit_index.tolist() == pattern, (mode, dtype)
                _same(out, outs["full"], f"{mode} {dtype}")
        fresh = Engine(net, MaxProb([0.9] * 3), mode="compact")
        for pattern in PATTERNS:
            fresh(torch.tensor(pattern))
        assert engines["compact"].buffer_bytes == fresh.buffer_bytes, dtype


def test_graphs_are_captured_again_when_the_weights_move() -> None:
    """A graph replays reads of the parameters' memory as captured: after a cast the loop
    drops its plans and captures again (with EagerGraphs standing in on the CPU)."""
    net = _id_switch_net()
    engine = Engine(net, MaxProb([0.9] * 3), mode="compact")
    loop = GraphLoop(net, engine.exit_op_kwargs(torch.device("cpu")), False, False,
                     EagerGraphs(), (4, 8))
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            net.to(dtype)
            before = loop.captures
            for pattern in PATTERNS:
                logits, exit_index, _ = loop(torch.tensor(pattern), {})
                assert exit_index.tolist() == pattern, dtype
                torch.testing.assert_close(logits, engine(torch.tensor(pattern)).logits,
                                           rtol=0, atol=0)
            assert loop.captures > before, dtype
        captured = loop.captures
        loop(torch.tensor(PATTERNS[0]), {})  # nothing moved: the graphs are replayed
        assert loop.captures == captured


# -- autocast --------------------------------------------------------------------------------


def test_graphs_under_autocast_are_another_signature() -> None:
    """Graphs captured under autocast run its half-precision kernels: the autocast dtype is
    part of the signature, so a batch without autocast (or with another dtype) gets graphs
    of its own, each matching compact mode under the same autocast."""
    net = _mlp_net(seed=2)
    policy = _median_policy(MaxProb, net, torch.randn(64, 10))
    engine = Engine(net, policy, mode="compact")
    loop = GraphLoop(net, engine.exit_op_kwargs(torch.device("cpu")), False, False,
                     EagerGraphs(), (4, 16))
    x = torch.randn(13, 10, generator=torch.Generator().manual_seed(2))
    counts = []
    with torch.no_grad():
        for dtype in (None, torch.bfloat16, torch.float16, None, torch.bfloat16):
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logits, exit_index, score = loop(x, {})
                want = engine(x)
            assert exit_index.tolist() == want.exit_index.tolist(), dtype
            torch.testing.assert_close(logits, want.logits, rtol=0, atol=0)
            torch.testing.assert_close(score, want.score, rtol=0, atol=0)
            counts.append(loop.captures)
    assert counts[0] < counts[1] < counts[2] == counts[3] == counts[4]




def test_reference_scores_in_fp32_under_autocast() -> None:
    """The reference's classifier and EENet scheduler keep fp32 under autocast (which would
    run their matmuls in bf16, ~1e-2 off), against a float64 computation."""
    g = torch.Generator().manual_seed(0)
    feats, weight, bias = (torch.randn(33, 64, generator=g), torch.randn(5, 64, generator=g),
                           torch.randn(5, generator=g))
    want = feats.double() @ weight.double().t() + bias.double()
    sched = torch.randn(5 + 2 + 1, generator=g)
    prev = torch.rand(33, 1, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = reference.exit_logits(feats, weight, bias)
        score = reference.policy_score(logits, "eenet", prev_scores=prev,
                                       prev_preds=torch.zeros(33, 1, dtype=torch.int64),
                                       sched_weight=sched, sched_bias=0.3)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), want, rtol=1e-5, atol=1e-4)
    p = torch.softmax(want, dim=1)
    conf = 1 + (p * p.log()).sum(dim=1) / torch.log(torch.tensor(5.0, dtype=torch.float64))
    parts = torch.cat([p, p.amax(dim=1, keepdim=True), conf[:, None], prev.double()], dim=1)
    torch.testing.assert_close(score.double(), torch.sigmoid(parts @ sched.double() + 0.3),
                               rtol=1e-5, atol=1e-5)


def test_classifier_operands_promote_only_under_autocast() -> None:
    head = _mlp_net().heads[0]
    f = torch.randn(4, 10, dtype=torch.bfloat16)
    assert classifier_operands(head, f)[1] is head.classifier.weight  # the op refuses it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g, w, b = classifier_operands(head, f)
        same = classifier_operands(head, f.float())
    assert g.dtype == w.dtype == b.dtype == torch.float32
    assert torch.equal(g, f.float()) and torch.equal(w, head.classifier.weight)
    assert same[1] is head.classifier.weight


@pytest.mark.parametrize("kind", [MaxProb, EENet], ids=lambda k: k.__name__)
def test_every_mode_runs_under_autocast(kind: type) -> None:
    """Under CPU autocast the stages give bf16 features to fp32 classifiers: every mode
    runs, and they agree, a row within 1e-4 of a threshold exempt from the exit (the
    kernels and the reference sum in another order). The switch network's exact values
    leave no row near a threshold: there every mode takes exactly the asked-for exits."""
    net = _mlp_net(seed=5)
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(5))
    policy = _median_policy(kind, net, torch.randn(64, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = {mode: Engine(net, policy, mode=mode)(x) for mode in EAGER_MODES}
        with torch.no_grad():
            scores = policy.scores(every_logits(net, x))
    thresholds = torch.tensor(policy.thresholds)
    for mode, out in outs.items():
        want = outs["full"]
        at = torch.minimum(out.exit_index, want.exit_index)
        near = (scores[torch.arange(64), at] - thresholds[at]).abs() <= 1e-4
        differ = out.exit_index != want.exit_index
        assert not bool((differ & ~near).any()), mode
        torch.testing.assert_close(out.logits[~differ], want.logits[~differ], rtol=1e-5,
                                   atol=1e-5)
    assert len(set(outs["full"].exit_index.tolist())) == 3  # rows leave at every exit

    switch = _switch_net()
    pattern = [0, 2, 1, 1, 2, 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for mode in EAGER_MODES:
            out = Engine(switch, MaxProb([0.9] * 3), mode=mode)(_switch_batch(pattern))
            assert out.exit_index.tolist() == pattern, mode
    assert torch.equal(simulate(switch, MaxProb([0.9] * 3), _switch_batch(pattern)).exit_index,
                       torch.tensor(pattern))


def every_logits(net: MultiExitNetwork, x: torch.Tensor) -> list[torch.Tensor]:
    """Each exit's logits as the fused op computes them: fp32 on the features the stages
    give (under the caller's autocast), written out without the engine's helpers."""
    logits, h = [], x
    for stage, head in zip(net.stages, net.heads, strict=True):
        h = stage(h)
        f = head.features(h).double()
        logits.append((f @ head.classifier.weight.double().t()
                       + head.classifier.bias.double()).float())
    return logits


def test_a_threshold_between_float32_values_decides_alike_offline_and_in_every_mode() -> None:
    """Patience scores are exact integers, computed alike everywhere: a threshold of 1 + 1e-9
    (1.0 when rounded to the nearest float32) keeps a streak of 1 from leaving, offline
    (policy.decide, full mode) as in the kernels (exact score >= threshold)."""
    net = _switch_net()  # every exit predicts class 0: the streak is k at exit k
    x = _switch_batch([2] * 6)
    policy = Patience([1 + 1e-9, 1 + 1e-9, 0.0])
    with torch.no_grad():
        offline = policy.decide([z.float() for z in net(x)])[0]
    assert offline.tolist() == [2] * 6  # a nearest-rounded threshold would take exit 1
    for mode in EAGER_MODES:
        assert Engine(net, policy, mode=mode)(x).exit_index.tolist() == [2] * 6, mode
