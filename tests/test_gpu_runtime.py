"""The runtime on a GPU: the engine's modes against the oracle on CUDA, and one early-exit
stage (exit_score_write + compact_out) captured in a CUDA graph and replayed.

Every test here is ``gpu``-marked: skipped without CUDA (conftest) and under
``TRITON_INTERPRET=1`` (the interpreter runs on CPU tensors only).
"""

from __future__ import annotations

import os

import pytest
import torch

import eenet_kernels as ek
from eenet.nn import ExitHead, MultiExitNetwork
from eenet.policies import Entropy, MaxProb, Patience
from eenet.runtime import MODES, Engine, simulate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="compiled Triton kernels needed: run with TRITON_INTERPRET unset"),
]

C = 10


def _net(dtype: torch.dtype) -> MultiExitNetwork:
    torch.manual_seed(0)
    stages = [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()) for _ in range(3)]
    heads = [ExitHead.linear(64, C) for _ in range(3)]
    return MultiExitNetwork(stages, heads).to("cuda", dtype).eval()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", [MaxProb, Entropy, Patience], ids=lambda p: p.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 300])
def test_engine_on_cuda_matches_simulate(mode: str, kind: type, dtype: torch.dtype,
                                         n: int) -> None:
    net = _net(dtype)
    x = torch.randn(n, 64, device="cuda", dtype=dtype)
    calibration = torch.randn(256, 64, device="cuda", dtype=dtype)  # thresholds off x's scores
    with torch.no_grad():
        scores = kind([0.0] * 3).scores([z.float() for z in net(calibration)])
    policy = Patience([1.0] * 3) if kind is Patience else kind(
        [float(scores[:, 0].median()), float(scores[:, 1].median()), 0.0])
    oracle = simulate(net, policy, x)
    out = Engine(net, policy, mode=mode)(x)
    # exits can differ only where a score sits within float noise of its threshold
    same = out.exit_index == oracle.exit_index
    assert float(same.float().mean()) >= 0.98, (out.exit_index, oracle.exit_index)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.logits[same], oracle.logits[same], rtol=tol, atol=tol)


def test_stage_replays_in_a_cuda_graph() -> None:
    """Scoring, result write and compaction of one stage have no host sync, so the stage can
    be captured once and replayed on new inputs; each replay equals the eager stage."""
    n, d = 512, 128
    torch.manual_seed(1)
    weight = torch.randn(C, d, device="cuda") * 0.2
    bias = torch.randn(C, device="cuda")
    feats = torch.randn(n, d, device="cuda")   # the graph's static input
    row_index = torch.arange(n, device="cuda")
    out_logits = torch.zeros(n, C, device="cuda")
    out_score = torch.zeros(n, device="cuda")
    out_exit = torch.full((n,), -1, dtype=torch.int64, device="cuda")
    kept_h = torch.zeros(n, d, device="cuda")
    kept_idx = torch.zeros(n, dtype=torch.int64, device="cuda")

    def stage() -> torch.Tensor:
        res = ek.exit_score_write(feats, weight, bias, row_index=row_index, exit_index=0,
                                  out_logits=out_logits, out_score=out_score,
                                  out_exit=out_exit, policy="max_prob", threshold=0.6,
                                  check_finite=False)
        _, count = ek.compact(~res.exit_mask, [feats, row_index], out=[kept_h, kept_idx])
        return count

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        stage()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        count = stage()

    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        feats.copy_(torch.randn(n, d, device="cuda", generator=gen))
        for t in (out_logits, out_score, kept_h, kept_idx):
            t.zero_()
        out_exit.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        want = ek.exit_score(feats, weight, bias, policy="max_prob", threshold=0.6,
                             backend="reference")
        stay = ~want.exit_mask
        m = int(stay.sum())
        assert 0 < m < n, "the threshold should split the batch"
        assert int(count) == m
        assert torch.equal(kept_idx[:m], stay.nonzero().flatten())
        assert torch.equal(kept_h[:m], feats[stay])
        assert torch.equal(out_exit == 0, want.exit_mask)
        torch.testing.assert_close(out_logits[want.exit_mask], want.logits[want.exit_mask],
                                   rtol=1e-4, atol=1e-4)
