"""Engine graph mode: the compact loop as graphs per (stage, batch-size bucket) on static
buffers, the bucket chosen on the host or on the device. On CPU the graphs are stood in for by
:class:`EagerGraphs` (each capture records the stage function, each replay calls it again on
the same buffers; a conditional branch tests its boolean on the host), which tests everything
but the CUDA capture itself: bucket choice, the trash rows of padding, static-buffer reuse
across batches and exit patterns, chunking, capture bookkeeping, the device-side branch
booleans. The CUDA tests run the engine's ``mode="graph"`` itself."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from conftest import padded_ids, tiny_bert_exits
from test_compiled_mode import _assert_matches_compact, _median_policy, _mlp_net, _switch_batch
from test_compiled_mode import _switch_net as switch_net

from eenet.budget import Costs
from eenet.policies import EENet, MaxProb, Patience
from eenet.runtime import BudgetGuard, Engine, EngineOutput
from eenet.runtime.graphs import (
    BUCKET_CHOICES,
    IF_NODE_SOURCES,
    CudaGraphs,
    EagerGraphs,
    GraphLoop,
    check_buckets,
    choose_bucket,
    conditional_nodes_missing,
    resolve_if_node_source,
)
from eenet_kernels import cuda_graphs
from eenet_kernels import ops as ek_ops

pytestmark = pytest.mark.usefixtures("one_thread")

BUCKETS = (1, 2, 4, 8, 16)


class CountingGraphs(EagerGraphs):
    """EagerGraphs that count captures, replays and branches taken, and can refuse a
    capture."""

    def __init__(self, refuse: Callable[[], bool] = lambda: False) -> None:
        self.captured = 0
        self.replayed = 0
        self.taken = 0
        self.refuse = refuse

    def branch(self, pred: torch.Tensor, fn: Callable[[], None]) -> None:
        assert pred.shape == () and pred.dtype == torch.bool
        self.taken += int(pred)
        super().branch(pred, fn)

    def capture(self, fn: Callable[[], None]):
        if self.refuse():
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured += 1
        graph = super().capture(fn)
        outer = self

        class Counted:
            def replay(self) -> None:
                outer.replayed += 1
                graph.replay()

        return Counted()


def _loop(engine: Engine, backend: EagerGraphs | None = None,
          buckets: tuple[int, ...] = BUCKETS, choice: str = "host") -> GraphLoop:
    policy = engine.policy
    return GraphLoop(engine.net, engine.exit_op_kwargs(torch.device("cpu")),
                     policy.needs_scores, policy.needs_preds, backend or EagerGraphs(), buckets,
                     choice)


def _run(loop: GraphLoop, x: torch.Tensor, **row_inputs: torch.Tensor) -> EngineOutput:
    with torch.no_grad():
        return EngineOutput(*loop(x, row_inputs))


def test_bucket_choice_and_checks() -> None:
    assert [choose_bucket(n, BUCKETS) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    with pytest.raises(ValueError, match="exceed the largest"):
        choose_bucket(17, BUCKETS)
    assert check_buckets([3, 5]) == (3, 5)
    for bad in ([], [0, 2], [4, 4], [8, 2], [1.5], [True]):
        with pytest.raises(ValueError, match="graph buckets"):
            check_buckets(bad)


@pytest.mark.parametrize("choice", BUCKET_CHOICES)
@pytest.mark.parametrize("kind", [MaxProb, Patience, EENet])
@pytest.mark.parametrize("n", [1, 3, 8, 9, 16, 40])
def test_matches_compact_at_every_size(kind: type, n: int, choice: str) -> None:
    """Sizes inside, at and above the buckets (40 runs in chunks of 16); the policy's history
    (EENet with the vote feature reads earlier scores and predictions) travels with the
    rows through the static buffers."""
    net = _mlp_net(seed=n)
    x = torch.randn(n, 10, generator=torch.Generator().manual_seed(n))
    policy = _median_policy(kind, net, torch.randn(64, 10))
    compact = Engine(net, policy, mode="compact")
    loop = _loop(compact, choice=choice)
    with torch.no_grad():
        want = compact(x)
    _assert_matches_compact(_run(loop, x), want, policy, net, x)


@pytest.mark.parametrize("choice", BUCKET_CHOICES)
def test_static_buffers_carry_nothing_between_calls(choice: str) -> None:
    """Batches with different exit patterns and sizes, one after another on the same
    buffers: stale rows (and, choosing on the device, stale survivor counts) of a bigger
    earlier batch never leak into a later one."""
    net = switch_net()
    engine = Engine(net, MaxProb([0.9] * 3), mode="compact")
    loop = _loop(engine, choice=choice)
    patterns = [[2] * 16, [0, 1, 2], [1] * 9, [2, 2], [0] * 5, [2, 0, 1, 2, 2, 1, 0, 2, 2],
                [2] * 4, [0] * 4, [2] * 3, [1, 0, 1]]
    for pattern in patterns:
        x = _switch_batch(pattern)
        out = _run(loop, x)
        assert out.exit_index.tolist() == pattern
        with torch.no_grad():
            want = engine(x)
        torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)


def test_captures_once_per_stage_and_bucket() -> None:
    net = switch_net()
    backend = CountingGraphs()
    loop = _loop(Engine(net, MaxProb([0.9] * 3)), backend)
    _run(loop, _switch_batch([2] * 5))             # stages 0, 1, 2 at bucket 8
    assert (backend.captured, loop.captures) == (3, 3)
    _run(loop, _switch_batch([0, 2, 2, 1, 2]))     # 0 @ 8, then 3 rows: 1 @ 4, 1 row: 2 @ 1
    assert loop.captures == 5
    replays = backend.replayed
    _run(loop, _switch_batch([0, 2, 2, 1, 2]))     # the same pattern: replays only
    assert loop.captures == 5 and backend.replayed == replays + 3
    _run(loop, _switch_batch([0] * 8))             # nobody goes on: stage 0 only
    assert backend.replayed == replays + 4
    held = loop.nbytes
    assert held > 0
    _run(loop, torch.zeros(4, 10))                 # the same input signature: no new buffers
    assert loop.nbytes == held


def test_device_choice_captures_once_per_first_bucket() -> None:
    """Choosing on the device, one graph per first-stage bucket runs the whole batch, and
    each later stage runs at exactly one bucket, the smallest holding its survivors."""
    net = switch_net()
    backend = CountingGraphs()
    loop = _loop(Engine(net, MaxProb([0.9] * 3)), backend, choice="device")
    _run(loop, _switch_batch([2] * 5))             # stage 0 @ 8; 1 @ 8; 2 @ 8
    assert (backend.captured, loop.captures) == (1, 1)
    taken = backend.taken
    _run(loop, _switch_batch([0, 2, 2, 1, 2]))     # the same first bucket: a replay
    assert loop.captures == 1 and backend.replayed == 2
    assert backend.taken == taken + 2              # stage 1 @ 4 (3 rows), stage 2 @ 1
    _run(loop, _switch_batch([0] * 8))             # nobody goes on: no branch taken
    assert backend.taken == taken + 2
    _run(loop, _switch_batch([2, 1, 0]))           # a first bucket of 4: a second graph
    assert loop.captures == 2


@pytest.mark.parametrize("choice", BUCKET_CHOICES)
def test_a_failing_stage_is_named(choice: str) -> None:
    class Fails(torch.nn.Module):  # but on the one-row probe that sizes the buffers
        def __init__(self, stage: torch.nn.Module) -> None:
            super().__init__()
            self.stage = stage

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            if h.shape[0] > 1:
                raise RuntimeError("cudaErrorStreamCaptureUnsupported")
            return self.stage(h)

    loop = _loop(Engine(switch_net(), MaxProb([0.9] * 3)), choice=choice)
    loop.stages[1] = Fails(loop.stages[1])
    with pytest.raises(RuntimeError, match=r"stage 1 \(bucket of 4 rows\) could not be "
                       r"captured: RuntimeError: cudaErrorStreamCaptureUnsupported"):
        _run(loop, _switch_batch([2, 2, 2]))


def test_a_batch_graph_that_cannot_be_captured_is_named() -> None:
    loop = _loop(Engine(switch_net(), MaxProb([0.9] * 3)), CountingGraphs(lambda: True),
                 choice="device")
    with pytest.raises(RuntimeError, match=r"the batch graph \(first bucket of 4 rows\)"):
        _run(loop, _switch_batch([2, 2, 2]))


def test_conditional_nodes_missing_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is not a CUDA build" in conditional_nodes_missing()
    with pytest.raises(RuntimeError, match=r"needs CUDA graph conditional nodes: .*not a CUDA"):
        CudaGraphs(torch.device("cuda"), conditional=True)
    monkeypatch.setattr(torch.version, "cuda", "12.2")
    assert "CUDA 12.2 has no graph conditional nodes" in conditional_nodes_missing()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    if hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"):
        assert conditional_nodes_missing() is None
    monkeypatch.delattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node", raising=False)
    monkeypatch.delattr(torch._C._CUDAGraph, "begin_capture_to_if_node", raising=False)
    assert "no CUDAGraph.begin_capture_to_if_node" in conditional_nodes_missing()


def _without_torch_if_nodes(monkeypatch: pytest.MonkeyPatch, cuda: str) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.delattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node", raising=False)
    monkeypatch.delattr(torch._C._CUDAGraph, "begin_capture_to_if_node", raising=False)


def test_if_node_sources_say_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each source's requirement on its own; "auto" needs one of the two, prefers torch's."""
    with pytest.raises(ValueError, match="if-node source must be one of"):
        conditional_nodes_missing("cuda")
    _without_torch_if_nodes(monkeypatch, "12.8")
    assert "has no CUDAGraph.begin_capture_to_if_node" in conditional_nodes_missing("torch")
    assert "need CUDA 13, not 12.8" in conditional_nodes_missing("eenet")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cuda_graphs, "_binding", lambda: None)
    assert "built without its CUDA kernels" in conditional_nodes_missing("eenet")
    both = conditional_nodes_missing("auto")
    assert "begin_capture_to_if_node" in both and "built without its CUDA kernels" in both
    with pytest.raises(RuntimeError, match=r"conditional nodes: .*without its CUDA kernels"):
        CudaGraphs(torch.device("cuda"), conditional=True, if_nodes="eenet")
    with pytest.raises(ValueError, match="if-node source must be one of"):
        CudaGraphs(torch.device("cuda"), conditional=True, if_nodes="cuda")
    monkeypatch.setattr(ek_ops, "HAVE_EXTENSION", False)
    assert "extension is not built" in conditional_nodes_missing("eenet")
    monkeypatch.setattr(ek_ops, "HAVE_EXTENSION", True)
    monkeypatch.setattr(cuda_graphs, "_binding", lambda: lambda *args: None)
    assert conditional_nodes_missing("eenet") is None
    assert conditional_nodes_missing("auto") is None
    assert resolve_if_node_source("auto") == "eenet"
    monkeypatch.setattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node",
                        lambda self, pred: None, raising=False)
    assert conditional_nodes_missing("torch") is None
    assert [resolve_if_node_source(s) for s in IF_NODE_SOURCES] == ["torch", "torch", "eenet"]


def test_capture_if_node_checks_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad predicates are refused before anything reaches CUDA (fake CUDA tensors: no GPU
    needed); without the extension's CUDA build it says so."""
    pred = torch.ones((), dtype=torch.bool)
    monkeypatch.setattr(cuda_graphs, "_binding", lambda: None)
    with pytest.raises(RuntimeError, match="built without its CUDA kernels"):
        cuda_graphs.capture_if_node(pred, None)
    calls: list[tuple] = []
    monkeypatch.setattr(cuda_graphs, "_binding", lambda: lambda *args: calls.append(args))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        bad = [torch.ones((), dtype=torch.bool),  # CPU
               torch.ones((), dtype=torch.float32, device="cuda"),
               torch.ones((), dtype=torch.uint8, device="cuda"),
               torch.ones((2,), dtype=torch.bool, device="cuda"),
               torch.ones((0,), dtype=torch.bool, device="cuda")]
    for p in bad:
        with pytest.raises(ValueError, match="one-element bool CUDA tensor"):
            cuda_graphs.capture_if_node(p, None)
    with pytest.raises(ValueError, match="must be a tensor, got bool"):
        cuda_graphs.capture_if_node(True, None)
    assert calls == []


def test_a_stage_that_cannot_be_captured_is_named() -> None:
    calls = {"n": 0}

    def refuse() -> bool:  # the second capture (stage 1) fails
        calls["n"] += 1
        return calls["n"] == 2

    loop = _loop(Engine(switch_net(), MaxProb([0.9] * 3)), CountingGraphs(refuse))
    with pytest.raises(RuntimeError, match=r"stage 1 \(bucket of 4 rows\) could not be captured"):
        _run(loop, _switch_batch([2, 2, 2]))


@pytest.mark.parametrize("choice", BUCKET_CHOICES)
def test_row_inputs_travel_with_the_rows(choice: str) -> None:
    net = _mlp_net(row_input=True)
    x = torch.randn(13, 10)
    scale = torch.rand(13, 1) + 0.5
    policy = _median_policy(MaxProb, net, torch.randn(64, 10), scale=torch.rand(64, 1) + 0.5)
    compact = Engine(net, policy, mode="compact")
    with torch.no_grad():
        want = compact(x, scale=scale)
    _assert_matches_compact(_run(_loop(compact, choice=choice), x, scale=scale), want, policy,
                            net, x, scale=scale)


@pytest.mark.parametrize("choice", BUCKET_CHOICES)
def test_padded_text_through_graphs(choice: str) -> None:
    net = tiny_bert_exits(layers=3, after=(1, 2))
    ids, mask = padded_ids([12, 3, 7, 1, 12, 5, 9, 2, 11, 4, 6], 12)
    policy = _median_policy(MaxProb, net, ids, attention_mask=mask)
    compact = Engine(net, policy, mode="compact")
    with torch.no_grad():
        want = compact(ids, attention_mask=mask)
    _assert_matches_compact(_run(_loop(compact, choice=choice), ids, attention_mask=mask), want,
                            policy, net, ids, attention_mask=mask)


@pytest.mark.parametrize("choice", BUCKET_CHOICES)
def test_least_recently_used_signatures_are_dropped_and_captured_again(choice: str) -> None:
    """Padded text of three widths (three signatures), at most two kept: a signature seen
    again while kept replays its graphs, one dropped is captured again, and every batch
    still equals compact mode."""
    net = tiny_bert_exits(layers=3, after=(1, 2))
    batches = {w: padded_ids([w, 3, 1, w, 2], w) for w in (12, 8, 5)}
    ids, mask = batches[12]
    policy = _median_policy(MaxProb, net, ids, attention_mask=mask)
    compact = Engine(net, policy, mode="compact")
    loop = GraphLoop(net, compact.exit_op_kwargs(torch.device("cpu")), policy.needs_scores,
                     policy.needs_preds, EagerGraphs(), BUCKETS, choice, max_signatures=2)
    captured = []
    for w in (12, 8, 12, 5, 8, 12):
        ids, mask = batches[w]
        with torch.no_grad():
            want = compact(ids, attention_mask=mask)
        before = loop.captures
        _assert_matches_compact(_run(loop, ids, attention_mask=mask), want, policy, net, ids,
                                attention_mask=mask)
        captured.append(loop.captures > before)
        assert len(loop._plans) <= 2
    # 12 and 8 new; 12 kept; 5 new (8 dropped); 8 again (12 dropped); 12 again (5 dropped)
    assert captured == [True, True, False, True, True, True]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_signatures must be a positive int"):
            GraphLoop(net, compact.exit_op_kwargs(torch.device("cpu")), policy.needs_scores,
                      policy.needs_preds, EagerGraphs(), BUCKETS, choice, max_signatures=bad)


def test_engine_graph_mode_refuses_cpu_and_the_guard() -> None:
    net = _mlp_net()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        Engine(net, MaxProb([0.5] * 3), mode="graph")(torch.randn(4, 10))
    guard = BudgetGuard(Costs([1.0, 2.0, 3.0], "flops"), 0.5)
    with pytest.raises(ValueError, match="does not support a budget guard"):
        Engine(net, MaxProb([0.5] * 3), mode="graph", guard=guard)
    with pytest.raises(ValueError, match="graph buckets"):
        Engine(net, MaxProb([0.5] * 3), mode="graph", graph_buckets=(4, 2))
    with pytest.raises(ValueError, match="bucket choice must be one of"):
        Engine(net, MaxProb([0.5] * 3), mode="graph", graph_bucket_choice="gpu")


def _needs_cuda(choice: str, if_nodes: str = "auto") -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if choice == "device" and (missing := conditional_nodes_missing(if_nodes)) is not None:
        pytest.skip(f"no CUDA graph conditional nodes from {if_nodes!r}: {missing}")


@pytest.mark.gpu
@pytest.mark.parametrize("if_nodes", ["torch", "eenet"])
def test_cuda_if_node_body_runs_exactly_when_the_predicate_holds(if_nodes: str) -> None:
    """One capture, replays with the predicate set between them: the body's work happens on
    the replays where it holds, the work around it on every replay, and the work after it
    sees the body's writes. The extension's IF node also takes any non-zero byte as true
    (torch's reads the byte as a C++ bool, for which 2 is undefined)."""
    _needs_cuda("device", if_nodes)
    device = torch.device("cuda")
    backend = CudaGraphs(device, conditional=True, if_nodes=if_nodes)
    pred = torch.zeros((), dtype=torch.bool, device=device)
    x = torch.arange(8.0, device=device)
    out = torch.zeros(8, device=device)
    after = torch.zeros(8, device=device)
    hits = torch.zeros((), device=device)

    def body() -> None:
        hits.add_(1)
        out.mul_(torch.full_like(out, 2.0))  # a temporary allocated inside the body

    def step() -> None:
        out.copy_(x + 1)
        backend.branch(pred, body)
        after.copy_(out - 1)

    graph = backend.capture(step)
    hits.zero_()
    values = [(True, 1), (False, 1), (True, 2)] + ([(2, 3)] if if_nodes == "eenet" else [])
    for value, want_hits in values:
        pred.view(torch.uint8).fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        scale = 2.0 if value else 1.0
        assert hits.item() == want_hits
        assert out.tolist() == [(i + 1) * scale for i in range(8)]
        assert after.tolist() == [(i + 1) * scale - 1 for i in range(8)]


@pytest.mark.gpu
@pytest.mark.parametrize("if_nodes", ["torch", "eenet"])
def test_cuda_device_choice_matches_compact_for_each_if_node_source(if_nodes: str) -> None:
    _needs_cuda("device", if_nodes)
    device = torch.device("cuda")
    net = _mlp_net().cuda()
    policy = _median_policy(EENet, net, torch.randn(256, 10, device=device))
    compact = Engine(net, policy, mode="compact")
    loop = GraphLoop(net, compact.exit_op_kwargs(device), policy.needs_scores,
                     policy.needs_preds, CudaGraphs(device, True, if_nodes), (1, 8, 64),
                     "device")

    def cpu(o: EngineOutput) -> EngineOutput:
        return EngineOutput(o.logits.cpu(), o.exit_index.cpu(), o.score.cpu(), o.forced.cpu())

    for n in (1, 7, 64, 200):
        x = torch.randn(n, 10, device=device)
        with torch.no_grad():
            want = compact(x)
        for _ in range(2):  # the capture, then a replay on the same buffers
            out = _run(loop, x)
        _assert_matches_compact(cpu(out), cpu(want), policy, copy.deepcopy(net).cpu(), x.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("choice", BUCKET_CHOICES)
@pytest.mark.parametrize("n", [1, 7, 64, 200])
def test_cuda_graph_mode_matches_compact(n: int, choice: str) -> None:
    _needs_cuda(choice)
    net = _mlp_net().cuda()
    x = torch.randn(n, 10, device="cuda")
    policy = _median_policy(EENet, net, torch.randn(256, 10, device="cuda"))
    compact = Engine(net, policy, mode="compact")
    graph = Engine(net, policy, mode="graph", graph_buckets=(1, 8, 64),
                   graph_bucket_choice=choice)
    with torch.no_grad():
        want = compact(x)
        for _ in range(3):  # capture, then replays on the same buffers
            out = graph(x)
    def cpu(o: EngineOutput) -> EngineOutput:
        return EngineOutput(o.logits.cpu(), o.exit_index.cpu(), o.score.cpu(), o.forced.cpu())

    _assert_matches_compact(cpu(out), cpu(want), policy, copy.deepcopy(net).cpu(), x.cpu())
    assert graph.graph_captures >= 1 and graph.graph_bytes > 0


@pytest.mark.gpu
@pytest.mark.parametrize("choice", BUCKET_CHOICES)
def test_cuda_device_choice_runs_without_host_syncs(choice: str) -> None:
    """Under CUDA's sync debug mode "error" a host sync raises: the device bucket choice runs
    replayed batches of changing exit patterns without one, the host choice (one read per
    stage) raises, which shows the check sees syncs."""
    _needs_cuda(choice)
    net = switch_net().cuda()
    engine = Engine(net, MaxProb([0.9] * 3), mode="graph", graph_buckets=(1, 2, 4, 8),
                    graph_bucket_choice=choice)
    patterns = [[2] * 8, [0, 1, 2, 2, 1, 0, 2, 2], [0] * 8, [1, 1, 2, 0, 0, 0, 0, 0]]
    batches = [_switch_batch(p).cuda() for p in patterns]
    for x in batches:  # captures
        engine(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if choice == "host":
            with pytest.raises(RuntimeError, match="synchroniz"):
                engine(batches[1])
            return
        outs = [engine(x) for x in batches]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for out, pattern in zip(outs, patterns, strict=True):
        assert out.exit_index.cpu().tolist() == pattern


@pytest.mark.gpu
@pytest.mark.parametrize("choice", BUCKET_CHOICES)
def test_cuda_graph_mode_under_autocast(choice: str) -> None:
    """Captured under autocast, the graphs cast the weights themselves: autocast's cast
    cache, whose bf16 copies are freed when its region ends (here overwritten with NaN by
    the allocations that follow), is off during the capture. Autocast off is another
    signature, captured anew in fp32."""
    _needs_cuda(choice)
    net = switch_net().cuda()
    engine = Engine(net, MaxProb([0.9] * 3), mode="graph", graph_buckets=(1, 2, 4, 8),
                    graph_bucket_choice=choice)
    pattern = [0, 1, 2, 2, 1, 0, 2]
    x = _switch_batch(pattern).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        first = engine(x)  # captures
    width = x.shape[1]
    junk = [torch.full((width, width), math.nan, device="cuda", dtype=torch.bfloat16)
            for _ in range(256)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        captured = engine.graph_captures
        again = engine(x)  # replays
        assert engine.graph_captures == captured
    plain = engine(x)
    assert engine.graph_captures > captured
    del junk
    for out in (first, again, plain):
        assert out.exit_index.cpu().tolist() == pattern
        assert bool(torch.isfinite(out.logits).all())
    torch.testing.assert_close(again.logits, first.logits, rtol=0, atol=0)
    torch.testing.assert_close(plain.logits, first.logits, rtol=0, atol=0)
