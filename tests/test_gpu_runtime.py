"""The runtime on a GPU: the engine's modes and ``simulate`` against an fp32 oracle on CUDA,
and one early-exit stage (exit_score_write + compact_out) captured in a CUDA graph and
replayed.

The CUDA tests are ``gpu``-marked: skipped without CUDA (conftest) and under
``TRITON_INTERPRET=1`` (the interpreter runs on CPU tensors only). The oracle check itself
(:func:`assert_matches_oracle`) also runs on CPU, unmarked, on the same network and policies,
and a test shows that it rejects a single wrong exit away from the threshold.

Tolerance of the oracle check. The oracle runs the stages in the network's dtype on the whole
batch, then every exit head in float32 on the upcast features (``reference.exit_logits``) and
the policy's score and first exit in float32 (``reference.policy_score``). The engine runs a
stage on the rows still present, so a low-precision GEMM may round differently at another
batch size; ``simulate`` takes its logits from the heads in the network's dtype (rounded to
it). Exits must match the oracle's on every row except the rows near a decision at some exit
up to the oracle's exit: the score within ``SCORE_TOL[dtype]`` of that exit's threshold
(not for patience, whose integer streaks are exact), or, for the policies that read earlier
predictions, the two largest logits of that exit within ``2 * LOGIT_TOL[dtype]`` of each
other (each may move by LOGIT_TOL: an argmax that may flip). On the rows that match and are
not near a decision, logits are compared within ``LOGIT_TOL`` and scores within
``SCORE_TOL``.

- float32: 1e-4 for both (fp32 rounding of logits of magnitude < 10 over a 64-wide dot is
  ~1e-6; the margin covers a TF32-free GPU GEMM's other summation order).
- bfloat16: logits 2e-2 (a bf16 logit is rounded by up to 2^-9 relative, 1.6e-2 at
  magnitude 8; one bf16 ulp in a stage's activations moves the logits less), scores 2e-2
  (max-prob moves by at most half the logit error; entropy by 3/2 of it in the worst case,
  ~1/4 of it measured). With these, up to ``MAX_EXEMPT[dtype]`` of the rows (or the one row
  of a one-row batch) may be exempt (bf16 exempts many: simulate's logits are bf16); a check
  that exempts more fails, as it would check little.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import eenet_kernels as ek
from eenet.nn import ExitHead, MultiExitNetwork
from eenet.policies import Entropy, ExitPolicy, MaxProb, Patience
from eenet.runtime import MODES, Engine, EngineOutput, simulate
from eenet_kernels import reference

C = 10
SCORE_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
LOGIT_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
MAX_EXEMPT = {torch.float32: 0.05, torch.bfloat16: 0.5}

compiled = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="compiled Triton kernels needed: run with TRITON_INTERPRET unset")


def _net(device: str, dtype: torch.dtype) -> MultiExitNetwork:
    torch.manual_seed(0)
    stages = [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()) for _ in range(3)]
    heads = [ExitHead.linear(64, C) for _ in range(3)]
    with torch.no_grad():  # logits of magnitude ~5: scores spread over their range
        for head in heads:
            head.classifier.weight.mul_(8.0)
    return MultiExitNetwork(stages, heads).to(device, dtype).eval()


def _policy(kind: type[ExitPolicy], net: MultiExitNetwork, calibration: torch.Tensor
            ) -> ExitPolicy:
    """Median thresholds on a calibration batch (not the tested batch: a one-row batch would
    sit on its own median)."""
    if kind is Patience:
        return Patience([1.0] * 3)
    with torch.no_grad():
        scores = kind([0.0] * 3).scores([z.float() for z in net(calibration)])
    return kind([float(scores[:, 0].median()), float(scores[:, 1].median()), 0.0])


@dataclass
class Oracle:
    """Every exit on every row in float32: logits (N, K, C), scores (N, K), the first exit
    taken (N,) int64."""

    logits: torch.Tensor
    scores: torch.Tensor
    exit_index: torch.Tensor


@torch.no_grad()
def fp32_oracle(net: MultiExitNetwork, policy: ExitPolicy, x: torch.Tensor) -> Oracle:
    """The reference math on the whole batch (module docstring)."""
    n = x.shape[0]
    rules = policy.rules()
    logits, scores, preds = [], [], []
    h = x
    for stage, head, rule in zip(net.stages, net.heads, rules, strict=True):
        h = stage(h)
        z = reference.exit_logits(head.features(h), head.classifier.weight,
                                  head.classifier.bias)
        prev_s = torch.stack(scores, dim=1) if scores else z.new_zeros(n, 0)
        prev_p = torch.stack(preds, dim=1) if preds else z.new_zeros(n, 0, dtype=torch.int64)
        scores.append(reference.policy_score(
            z, rule.policy, prev_scores=prev_s, prev_preds=prev_p,
            sched_weight=rule.sched_weight, sched_bias=rule.sched_bias, use_vote=rule.use_vote))
        preds.append(z.argmax(dim=1))
        logits.append(z)
    s = torch.stack(scores, dim=1)
    passes = s >= torch.tensor(policy.thresholds, device=s.device)
    passes[:, -1] = True
    return Oracle(torch.stack(logits, dim=1), s, passes.int().argmax(dim=1))


def near_a_decision(oracle: Oracle, policy: ExitPolicy, dtype: torch.dtype) -> torch.Tensor:
    """(N,) bool: rows whose decision at some exit up to the oracle's exit may flip under
    rounding (module docstring)."""
    k = oracle.scores.shape[1]
    thresholds = torch.tensor(policy.thresholds, device=oracle.scores.device)
    if policy.kind == "patience":  # integer streaks: only a flipped argmax changes one
        near = torch.zeros_like(oracle.scores, dtype=torch.bool)
    else:
        near = (oracle.scores - thresholds).abs() <= SCORE_TOL[dtype]
    near[:, -1] = False  # the last exit takes every row left, whatever its score
    if policy.needs_preds:
        top2 = oracle.logits.topk(2, dim=2).values
        near |= (top2[..., 0] - top2[..., 1]) <= 2 * LOGIT_TOL[dtype]
    upto = torch.arange(k, device=near.device) <= oracle.exit_index[:, None]
    return (near & upto).any(dim=1)


def assert_matches_oracle(out: EngineOutput, oracle: Oracle, policy: ExitPolicy,
                          dtype: torch.dtype, what: str) -> None:
    """Exits equal the oracle's except on rows near a decision; on the other rows, logits
    and score equal the oracle's at that exit within the dtype's tolerance."""
    near = near_a_decision(oracle, policy, dtype)
    assert int(near.sum()) <= max(1.0, MAX_EXEMPT[dtype] * near.numel()), (
        f"{what}: {int(near.sum())} of {near.numel()} rows near a decision")
    same = out.exit_index == oracle.exit_index
    wrong = ~same & ~near
    assert not bool(wrong.any()), (
        f"{what}: exits differ from the fp32 oracle away from every threshold at rows "
        f"{wrong.nonzero().flatten().tolist()}: got {out.exit_index[wrong].tolist()}, "
        f"oracle {oracle.exit_index[wrong].tolist()}")
    rows = (same & ~near).nonzero().flatten()
    taken = oracle.exit_index[rows]
    tol = LOGIT_TOL[dtype]
    torch.testing.assert_close(out.logits[rows], oracle.logits[rows, taken], rtol=tol,
                               atol=tol, msg=what)
    torch.testing.assert_close(out.score[rows], oracle.scores[rows, taken],
                               rtol=SCORE_TOL[dtype], atol=SCORE_TOL[dtype], msg=what)


def check_modes_against_oracle(device: str, mode: str, kind: type[ExitPolicy],
                               dtype: torch.dtype, n: int) -> None:
    """The engine in ``mode`` and ``simulate`` on a batch of n rows against the oracle."""
    net = _net(device, dtype)
    g = torch.Generator(device=device).manual_seed(n)
    x = torch.randn(n, 64, device=device, generator=g).to(dtype)
    calibration = torch.randn(256, 64, device=device, generator=g).to(dtype)
    policy = _policy(kind, net, calibration)
    oracle = fp32_oracle(net, policy, x)
    assert_matches_oracle(Engine(net, policy, mode=mode)(x), oracle, policy, dtype, mode)
    assert_matches_oracle(simulate(net, policy, x), oracle, policy, dtype, "simulate")


MODE_GRID = pytest.mark.parametrize("mode", MODES)
KIND_GRID = pytest.mark.parametrize("kind", [MaxProb, Entropy, Patience],
                                    ids=lambda p: p.__name__)
DTYPE_GRID = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
N_GRID = pytest.mark.parametrize("n", [1, 300])


@pytest.mark.gpu
@compiled
@MODE_GRID
@KIND_GRID
@DTYPE_GRID
@N_GRID
def test_engine_on_cuda_matches_fp32_oracle(mode: str, kind: type[ExitPolicy],
                                            dtype: torch.dtype, n: int) -> None:
    check_modes_against_oracle("cuda", mode, kind, dtype, n)


@pytest.mark.usefixtures("one_thread")
@MODE_GRID
@KIND_GRID
@DTYPE_GRID
@N_GRID
def test_engine_on_cpu_matches_fp32_oracle(mode: str, kind: type[ExitPolicy],
                                           dtype: torch.dtype, n: int) -> None:
    """The CUDA test's check, run on CPU (the C++ kernels or the reference)."""
    check_modes_against_oracle("cpu", mode, kind, dtype, n)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", [MaxProb, Patience], ids=lambda p: p.__name__)
def test_oracle_check_rejects_one_wrong_exit(kind: type[ExitPolicy]) -> None:
    """One row sent to another exit, away from every threshold, fails the check (a rate
    criterion such as 98% agreement would accept it); a row near a decision is exempt."""
    net = _net("cpu", torch.float32)
    x = torch.randn(300, 64)
    policy = _policy(kind, net, torch.randn(256, 64))
    oracle = fp32_oracle(net, policy, x)
    out = Engine(net, policy)(x)
    assert_matches_oracle(out, oracle, policy, torch.float32, "engine")
    near = near_a_decision(oracle, policy, torch.float32)
    far = int((~near).nonzero()[0])
    bad = EngineOutput(out.logits, out.exit_index.clone(), out.score)
    bad.exit_index[far] = (bad.exit_index[far] + 1) % 3
    with pytest.raises(AssertionError, match="away from every threshold"):
        assert_matches_oracle(bad, oracle, policy, torch.float32, "engine")
    # a row whose score sits on its threshold is exempt
    row = int(oracle.exit_index.argmin())
    if kind is Patience:  # its argmax at exit 0 a tie
        oracle.logits[row, 0, :2] = oracle.logits[row, 0].max()
    else:
        oracle.scores[row, 0] = policy.thresholds[0]
    assert bool(near_a_decision(oracle, policy, torch.float32)[row])


@pytest.mark.gpu
@compiled
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
        _, count = ek.compact(res.keep, [feats, row_index], out=[kept_h, kept_idx])
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
