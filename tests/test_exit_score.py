"""``exit_score`` / ``exit_score_write`` on every CPU backend against ``eenet_kernels.reference``.

Tolerances:
- logits: ``conftest.logit_tolerance`` (fp32 relative 1e-5, fp16/bf16 twice plain torch's error).
- scores: absolute ``SCORE_ATOL = 1e-4``. Every backend scores fp32 logits (fp16/bf16 inputs
  are upcast), so scores agree to about 1e-6; 1e-4 leaves room for summation order only.
- exit masks: ``conftest.assert_decisions_agree`` with the same score tolerance.
- ``patience`` scores and the EENet vote depend on the argmax: rows whose two largest reference
  logits are within twice the logit tolerance are left out of the comparisons that hinge on it.
Scores are also checked against an independent plain-torch/Python formulation of each policy,
evaluated on the backend's own logits, so that the reference itself is tested too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import DTYPES, assert_decisions_agree, intra_op_threads, logit_tolerance

import eenet_kernels as ek
from eenet_kernels import reference as ref

SCORE_ATOL = 1e-4
NS = (0, 1, 7, 64, 1000)
# one unit in the last place (relative) of each output dtype, for logits cast on write
CAST_RTOL = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
LOGIT_SENTINEL = -1000.0  # exact in float16 and bfloat16
INDEX_SENTINEL = -1
SCORE_SENTINEL = -5.0
DEFAULT_THREADS = torch.get_num_threads()  # before the module fixture pins it to 1


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """One intra-op thread for this module's thousands of tiny ops: OpenMP barriers make them
    20x slower on a busy 2-core machine. ``test_cpp_multithreaded_matches_reference`` covers
    the threaded kernel paths."""
    with intra_op_threads(1):
        yield


@dataclass(frozen=True)
class Case:
    """A policy configuration: history length k, prev_preds dtype and the EENet vote flag."""

    policy: str
    k: int = 0
    preds_dtype: torch.dtype | None = None
    use_vote: bool = False

    @property
    def uses_preds(self) -> bool:
        return self.policy == "patience" or self.use_vote

    def __str__(self) -> str:
        parts = [self.policy, f"k{self.k}"]
        if self.preds_dtype is not None:
            parts.append(str(self.preds_dtype).removeprefix("torch."))
        if self.use_vote:
            parts.append("vote")
        return "-".join(parts)


POLICY_CASES = (
    Case("max_prob"),
    Case("entropy"),
    Case("patience", 0, torch.int64),
    Case("patience", 2, torch.int32),
    Case("patience", 2, torch.int64),
    Case("eenet", 0),
    Case("eenet", 2),
    Case("eenet", 0, torch.int32, use_vote=True),
    Case("eenet", 2, torch.int32, use_vote=True),
    Case("eenet", 2, torch.int64, use_vote=True),
)
WRITE_CASES = (
    Case("max_prob"),
    Case("entropy"),
    Case("patience", 2, torch.int32),
    Case("eenet", 2, torch.int64, use_vote=True),
)


def dtype_id(dtype: torch.dtype) -> str:
    """Short test id of a dtype."""
    return str(dtype).removeprefix("torch.")


def make_head(n: int, d: int, c: int, dtype: torch.dtype, pooled: int | None,
              with_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random feats (N, D) or (N, D, S), weight (C, D) and bias (C,) or None in ``dtype``."""
    shape = (n, d) if pooled is None else (n, d, pooled)
    scale = 1.0 if pooled is None else math.sqrt(pooled)  # keep the pooled spread similar
    feats = (torch.randn(shape) * scale).to(dtype)
    weight = (torch.randn(c, d) * (2.5 / math.sqrt(d))).to(dtype)
    bias = torch.randn(c).to(dtype) if with_bias else None
    return feats, weight, bias


def policy_kwargs(case: Case, logits: torch.Tensor) -> dict[str, Any]:
    """History inputs for ``case``; prev_preds agree with the current argmax 60% of the time."""
    n, c = logits.shape
    kw: dict[str, Any] = {}
    if case.uses_preds:
        pred = logits.argmax(dim=1)
        rand = torch.randint(0, c, (n, case.k))
        agree = torch.rand(n, case.k) < 0.6
        kw["prev_preds"] = torch.where(agree, pred[:, None], rand).to(case.preds_dtype)
    if case.policy == "eenet":
        kw["prev_scores"] = torch.rand(n, case.k)
        kw["sched_weight"] = torch.randn(c + 2 + case.k + int(case.use_vote))
        kw["sched_bias"] = 0.3
        kw["use_vote"] = case.use_vote
    return kw


def independent_score(logits: torch.Tensor, case: Case, kw: dict[str, Any]) -> torch.Tensor:
    """Policy score from finite fp32 logits, written differently from the reference (float64)."""
    n, c = logits.shape
    logp = torch.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    max_p = p.max(dim=1).values
    conf = 1.0 + (p * logp).sum(dim=1) / math.log(c)
    pred = logits.argmax(dim=1).tolist()
    prev = kw["prev_preds"].tolist() if case.uses_preds else [[] for _ in range(n)]
    if case.policy == "max_prob":
        return max_p.float()
    if case.policy == "entropy":
        return conf.float()
    if case.policy == "patience":
        streaks = []
        for row_pred, row_prev in zip(pred, prev, strict=True):
            s = 0
            for q in reversed(row_prev):
                if q != row_pred:
                    break
                s += 1
            streaks.append(float(s))
        return torch.tensor(streaks, dtype=torch.float32).reshape(n)
    w = kw["sched_weight"].double()
    hist = kw["prev_scores"].double() @ w[c + 2:c + 2 + case.k]
    acc = p @ w[:c] + max_p * w[c] + conf * w[c + 1] + hist
    if case.use_vote and case.k > 0:
        votes = [sum(q == row_pred for q in row_prev) / case.k
                 for row_pred, row_prev in zip(pred, prev, strict=True)]
        acc = acc + torch.tensor(votes, dtype=torch.float64).reshape(n) * w[c + 2 + case.k]
    return torch.sigmoid(acc + kw["sched_bias"]).float()


def pick_threshold(case: Case, score: torch.Tensor) -> float:
    """A random threshold inside the range of the scores (a random streak for ``patience``)."""
    if case.policy == "patience":
        return float(torch.randint(0, case.k + 2, ()).item())
    finite = score[torch.isfinite(score)]
    if finite.numel() == 0:
        return 0.5
    lo = min(max(float(finite.min()), 0.0), 1.0)
    hi = min(max(float(finite.max()), 0.0), 1.0)
    return lo + (hi - lo) * float(torch.rand(()).item())


def ambiguous_rows(ref_logits: torch.Tensor, tol: float) -> torch.Tensor:
    """(N,) bool: rows whose two largest logits are too close for the argmax to be certain."""
    n, c = ref_logits.shape
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    top2 = ref_logits.topk(min(2, c), dim=1).values
    return (top2[:, 0] - top2[:, 1]) <= 2.0 * tol


def finite_tolerance(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     ref_logits: torch.Tensor) -> float:
    """``logit_tolerance`` over the rows with finite reference logits."""
    finite = torch.isfinite(ref_logits).all(dim=1)
    return logit_tolerance(feats[finite], weight, bias, ref_logits[finite])


def check_against_reference(out: ek.ExitScore, expect: tuple[torch.Tensor, ...],
                            feats: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None, case: Case, threshold: float,
                            ctx: str) -> torch.Tensor:
    """Assert a backend result matches the reference one; returns the rows compared exactly."""
    ref_logits, ref_score, ref_mask = expect
    n, c = feats.shape[0], weight.shape[0]
    assert out.logits.shape == (n, c) and out.logits.dtype == torch.float32, ctx
    assert out.score.shape == (n,) and out.score.dtype == torch.float32, ctx
    assert out.exit_mask.shape == (n,) and out.exit_mask.dtype == torch.bool, ctx
    finite = torch.isfinite(ref_logits).all(dim=1)
    tol = finite_tolerance(feats, weight, bias, ref_logits)
    assert torch.equal(torch.isfinite(out.logits), torch.isfinite(ref_logits)), ctx
    if bool(finite.any()):
        err = float((out.logits[finite] - ref_logits[finite]).abs().max())
        assert err <= tol, f"{ctx}: logits differ by {err} > {tol}"
    stable = ~ambiguous_rows(ref_logits, tol) if case.uses_preds else torch.ones(n, dtype=bool)
    torch.testing.assert_close(out.score[stable], ref_score[stable], atol=SCORE_ATOL, rtol=0,
                               equal_nan=True, msg=lambda m: f"{ctx}: scores: {m}")
    try:
        assert_decisions_agree(out.exit_mask[stable], ref_mask[stable], ref_score[stable],
                               threshold, SCORE_ATOL)
    except AssertionError as exc:
        raise AssertionError(f"{ctx}: {exc}") from exc
    return stable


def default_check_finite(feats: torch.Tensor) -> bool:
    """check_finite=True (the default) wherever the feats are finite."""
    return bool(torch.isfinite(feats).all())


def run_policy_case(backend: str, feats: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, case: Case, ctx: str, threads: int = 1) -> None:
    """Random threshold: the backend (on ``threads`` intra-op threads) matches the reference
    and the independent formulation."""
    kw = policy_kwargs(case, ref.exit_logits(feats, weight, bias))
    _, probe, _ = ref.exit_score(feats, weight, bias, case.policy, 0.0, **kw)
    threshold = pick_threshold(case, probe)
    ctx = f"{ctx} {case} threshold={threshold:.6g}"
    expect = ref.exit_score(feats, weight, bias, case.policy, threshold, **kw)
    with intra_op_threads(threads):
        out = ek.exit_score(feats, weight, bias, policy=case.policy, threshold=threshold,
                            check_finite=default_check_finite(feats), backend=backend, **kw)
    check_against_reference(out, expect, feats, weight, bias, case, threshold, ctx)
    own = independent_score(out.logits, case, kw)
    torch.testing.assert_close(out.score, own, atol=SCORE_ATOL, rtol=0,
                               msg=lambda m: f"{ctx}: independent scores: {m}")
    # the decision follows the backend's own score exactly
    assert torch.equal(out.exit_mask, out.score >= threshold), ctx


@pytest.mark.parametrize("with_bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("pooled", (None, 3), ids=("2d", "3d"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("c", (2, 5, 101), ids=lambda v: f"C{v}")
@pytest.mark.parametrize("d", (1, 33), ids=lambda v: f"D{v}")
@pytest.mark.parametrize("n", NS, ids=lambda v: f"N{v}")
def test_exit_score_matches_reference(backend: str, n: int, d: int, c: int, dtype: torch.dtype,
                                      pooled: int | None, with_bias: bool) -> None:
    """Every policy configuration, random threshold, against the reference."""
    torch.manual_seed(7919 * n + 101 * d + c)
    feats, weight, bias = make_head(n, d, c, dtype, pooled, with_bias)
    for case in POLICY_CASES:
        run_policy_case(backend, feats, weight, bias, case, f"[{backend}]")


@pytest.mark.parametrize("write", (False, True), ids=("exit_score", "exit_score_write"))
@pytest.mark.parametrize("pooled", (None, 3), ids=("2d", "3d"))
def test_check_finite_empty_batch(backend: str, pooled: int | None, write: bool) -> None:
    """N = 0 with the default check_finite=True returns empty results (no reshape error)."""
    feats, weight, bias = make_head(0, 33, 5, torch.float32, pooled, True)
    if write:
        out_logits, out_score, out_exit = sentinel_buffers(4, 5, torch.float32, torch.int64)
        out = ek.exit_score_write(feats, weight, bias, row_index=torch.zeros(0, dtype=torch.long),
                                  exit_index=0, out_logits=out_logits, out_score=out_score,
                                  out_exit=out_exit, backend=backend)
        assert bool((out_exit == INDEX_SENTINEL).all())
    else:
        out = ek.exit_score(feats, weight, bias, backend=backend)
    assert out.logits.shape == (0, 5) and out.score.shape == (0,) and out.exit_mask.shape == (0,)


@pytest.mark.parametrize("case", POLICY_CASES, ids=str)
@pytest.mark.parametrize("n", (1, 64, 1000), ids=lambda v: f"N{v}")
def test_is_last_everyone_exits(backend: str, n: int, case: Case) -> None:
    """is_last=True exits every row whatever the threshold; scores are still computed."""
    torch.manual_seed(n + 11)
    feats, weight, bias = make_head(n, 33, 5, torch.float32, 2, True)
    kw = policy_kwargs(case, ref.exit_logits(feats, weight, bias))
    threshold = float(case.k + 1) if case.policy == "patience" else 1.0
    expect = ref.exit_score(feats, weight, bias, case.policy, threshold, True, **kw)
    out = ek.exit_score(feats, weight, bias, policy=case.policy, threshold=threshold,
                        is_last=True, backend=backend, **kw)
    assert bool(out.exit_mask.all())
    check_against_reference(out, expect, feats, weight, bias, case, threshold, str(case))


@pytest.mark.parametrize("policy", ("max_prob", "eenet"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_threshold_zero_everyone_exits_random(backend: str, dtype: torch.dtype,
                                              policy: str) -> None:
    """max_prob > 0 and sigmoid >= 0 always: threshold 0 exits every row of random data."""
    torch.manual_seed(3)
    case = Case(policy, 2) if policy == "eenet" else Case(policy)
    feats, weight, bias = make_head(1000, 33, 101, dtype, None, True)
    kw = policy_kwargs(case, ref.exit_logits(feats, weight, bias))
    out = ek.exit_score(feats, weight, bias, policy=policy, threshold=0.0, backend=backend, **kw)
    assert bool(out.exit_mask.all())


def constant_logit_head(n: int, c: int, dtype: torch.dtype, top: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero weight, bias [top, 0, ..., 0]: every row has logits equal to the bias, argmax 0."""
    feats = torch.randn(n, 33).to(dtype)
    weight = torch.zeros(c, 33, dtype=dtype)
    bias = torch.zeros(c, dtype=dtype)
    bias[0] = top
    return feats, weight, bias


def known_scores(case: Case, c: int, top: float) -> float:
    """Hand formulas for the constant-logit head (prev_preds 1, prev_scores 0, w 0, b -10)."""
    if case.policy == "max_prob":
        return math.exp(top) / (math.exp(top) + c - 1)
    if case.policy == "entropy":
        p = [math.exp(top) / (math.exp(top) + c - 1)] + [1 / (math.exp(top) + c - 1)] * (c - 1)
        return 1.0 + sum(q * math.log(q) for q in p) / math.log(c)
    if case.policy == "patience":
        return 0.0  # pred 0, every earlier exit said 1
    return 1.0 / (1.0 + math.exp(10.0))  # sigmoid(-10): zero scheduler weights


def known_kwargs(case: Case, n: int, c: int) -> dict[str, Any]:
    """History inputs of the known-answer tests."""
    kw: dict[str, Any] = {}
    if case.uses_preds:
        kw["prev_preds"] = torch.ones(n, case.k, dtype=case.preds_dtype)
    if case.policy == "eenet":
        kw["prev_scores"] = torch.rand(n, case.k)
        kw["sched_weight"] = torch.zeros(c + 2 + case.k + int(case.use_vote))
        kw["sched_bias"] = -10.0
        kw["use_vote"] = case.use_vote
    return kw


@pytest.mark.parametrize("case", POLICY_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("top", (0.0, 4.0), ids=("uniform", "peaked"))
def test_known_scores_and_decisions(backend: str, dtype: torch.dtype, top: float,
                                    case: Case) -> None:
    """Constant logits: scores equal hand formulas; none / all exit on either side of them."""
    torch.manual_seed(5)
    n, c = 64, 5
    feats, weight, bias = constant_logit_head(n, c, dtype, top)
    kw = known_kwargs(case, n, c)
    want = known_scores(case, c, top)
    out = ek.exit_score(feats, weight, bias, policy=case.policy, threshold=1.0, backend=backend,
                        **kw)
    assert torch.equal(out.logits, bias.float().expand(n, c)), "logits are the bias"
    torch.testing.assert_close(out.score, torch.full((n,), want), atol=SCORE_ATOL, rtol=0)
    # threshold 1.0 (patience: streak 1): nobody exits; uniform rows have max_prob 1/C
    assert not bool(out.exit_mask.any())
    if case.policy == "patience":
        return
    above = min(want + 1e-3, 1.0)
    below = max(want - 1e-3, 0.0)
    if want > 1e-3:  # entropy of uniform rows is 0: only the upper side is informative
        out = ek.exit_score(feats, weight, bias, policy=case.policy, threshold=below,
                            backend=backend, **kw)
        assert bool(out.exit_mask.all()), f"score {want} >= threshold {below}"
    out = ek.exit_score(feats, weight, bias, policy=case.policy, threshold=above,
                        backend=backend, **kw)
    assert not bool(out.exit_mask.any()), f"score {want} < threshold {above}"


@pytest.mark.parametrize("policy", ("max_prob", "entropy", "eenet"))
def test_threshold_zero_everyone_exits_known(backend: str, policy: str) -> None:
    """Peaked constant logits (all scores well above 0): threshold 0 exits every row."""
    torch.manual_seed(6)
    case = Case(policy, 2) if policy == "eenet" else Case(policy)
    feats, weight, bias = constant_logit_head(64, 5, torch.float32, 4.0)
    out = ek.exit_score(feats, weight, bias, policy=policy, threshold=0.0, backend=backend,
                        **known_kwargs(case, 64, 5))
    assert bool(out.exit_mask.all())


@pytest.mark.parametrize("preds_dtype", (torch.int32, torch.int64), ids=dtype_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_patience_hand_computed(backend: str, dtype: torch.dtype,
                                preds_dtype: torch.dtype) -> None:
    """Streaks counted back from the newest earlier exit, by hand."""
    torch.manual_seed(0)
    weight = torch.eye(3, dtype=dtype)  # logits = feats
    feats = torch.tensor([[0.0, 0.0, 5.0]] * 4 + [[5.0, 0.0, 0.0]], dtype=dtype)
    prev = torch.tensor([[1, 2, 2], [2, 2, 1], [2, 2, 2], [2, 1, 2], [0, 0, 0]],
                        dtype=preds_dtype)
    # preds 2, 2, 2, 2, 0 -> streaks 2, 0, 3, 1, 3
    want = torch.tensor([2.0, 0.0, 3.0, 1.0, 3.0])
    for threshold, mask in ((2.0, [True, False, True, False, True]), (0.0, [True] * 5),
                            (3.5, [False] * 5), (1.0, [True, False, True, True, True])):
        out = ek.exit_score(feats, weight, policy="patience", threshold=threshold,
                            prev_preds=prev, backend=backend)
        assert torch.equal(out.score, want), f"threshold {threshold}: {out.score}"
        assert out.exit_mask.tolist() == mask, f"threshold {threshold}"
    out = ek.exit_score(feats, weight, policy="patience", threshold=3.5, is_last=True,
                        prev_preds=prev, backend=backend)
    assert torch.equal(out.score, want) and bool(out.exit_mask.all())


@pytest.mark.parametrize("use_vote", (False, True), ids=("novote", "vote"))
def test_eenet_hand_computed(backend: str, use_vote: bool) -> None:
    """C=2, k=1: sigmoid(w . [p0, p1, max p, conf, q, (vote)] + b) with explicit numbers."""
    torch.manual_seed(0)
    weight = torch.eye(2)  # logits = feats
    feats = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    # p = [0.25, 0.75] / [0.75, 0.25]; max p = 0.75; H = 0.5623351446;
    # conf = 1 - H / ln 2 = 0.1887218755; preds 1 / 0
    prev_scores = torch.tensor([[0.4], [0.9]])
    prev_preds = torch.tensor([[1], [1]])  # vote 1 / 0
    sched_weight = [1.0, -2.0, 0.5, 3.0, -1.0] + ([0.7] if use_vote else [])
    # row 0: 0.25 - 1.5 + 0.375 + 3 * conf - 0.4 + 0.25 (+ 0.7) = -0.4588343734 (+ 0.7)
    # row 1: 0.75 - 0.5 + 0.375 + 3 * conf - 0.9 + 0.25 (+ 0.0) = 0.5411656266
    want = [0.5600008796 if use_vote else 0.3872623793, 0.6320835305]
    out = ek.exit_score(feats, weight, policy="eenet", threshold=0.5, prev_scores=prev_scores,
                        prev_preds=prev_preds if use_vote else None,
                        sched_weight=torch.tensor(sched_weight), sched_bias=0.25,
                        use_vote=use_vote, backend=backend)
    torch.testing.assert_close(out.score, torch.tensor(want), atol=1e-5, rtol=0)
    assert out.exit_mask.tolist() == [use_vote, True]


def nonfinite_head(dtype: torch.dtype, pooled: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N=7 random feats with a NaN in row 2 and an inf in row 5."""
    feats, weight, bias = make_head(7, 4, 3, dtype, pooled, True)
    if pooled is None:
        feats[2, 1] = math.nan
        feats[5, 0] = math.inf
    else:
        feats[2, 1, 0] = math.nan
        feats[5, 0, 1] = math.inf
    return feats, weight, bias


@pytest.mark.parametrize("case", POLICY_CASES, ids=str)
@pytest.mark.parametrize("pooled", (None, 2), ids=("2d", "3d"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nonfinite_rows(backend: str, dtype: torch.dtype, pooled: int | None,
                        case: Case) -> None:
    """NaN/inf rows: NaN score, no exit before the last exit; rejected with check_finite."""
    torch.manual_seed(17)
    feats, weight, bias = nonfinite_head(dtype, pooled)
    good_feats = torch.where(torch.isfinite(feats), feats, torch.zeros_like(feats))
    kw = policy_kwargs(case, ref.exit_logits(good_feats, weight, bias))
    bad = torch.zeros(7, dtype=torch.bool)
    bad[[2, 5]] = True
    for is_last in (False, True):
        expect = ref.exit_score(feats, weight, bias, case.policy, 0.0, is_last, **kw)
        out = ek.exit_score(feats, weight, bias, policy=case.policy, threshold=0.0,
                            is_last=is_last, check_finite=False, backend=backend, **kw)
        ctx = f"{case} is_last={is_last}"
        assert bool(out.score[bad].isnan().all()), f"{ctx}: {out.score}"
        assert bool(out.score[~bad].isfinite().all()), f"{ctx}: {out.score}"
        assert not bool(out.logits[bad].isfinite().all(dim=1).any()), ctx
        assert out.exit_mask[bad].tolist() == [is_last, is_last], ctx
        check_against_reference(out, expect, feats, weight, bias, case, 0.0, ctx)
    for fn, name in ((ek.exit_score, "exit_score"), (ek.exit_score_write, "exit_score_write")):
        extra: dict[str, Any] = {}
        if fn is ek.exit_score_write:
            extra = {"row_index": torch.arange(7), "exit_index": 0,
                     "out_logits": torch.zeros(7, 3, dtype=dtype),
                     "out_score": torch.zeros(7), "out_exit": torch.zeros(7, dtype=torch.int64)}
        with pytest.raises(ValueError, match=rf"eenet\.{name}: feats .*rows \[2, 5\]"):
            fn(feats, weight, bias, policy=case.policy, threshold=0.0, backend=backend,
               **kw, **extra)


@pytest.mark.parametrize("policy", ("entropy", "max_prob"))
def test_scores_exact_for_logits_of_any_magnitude(backend: str, policy: str) -> None:
    """Huge offsets (1e4 .. 1e30) and spreads (down to -3e38) of finite logits: the scores
    equal a float64 computation on the same fp32 logits (softmax statistics must be taken on
    logits shifted by their max; unshifted, the entropy's two terms cancel)."""
    z = torch.tensor([[0.0, -3e38, 1.0, 2.0, -1e30, 0.5],
                      [1e30, 1e30 - 5e23, 3e29, -3e38, 1e30, 0.0],
                      [1e4, 1e4 - 3, 1e4 - 80, 1e4 - 90, 1e4 - 200, 1e4 - 1],
                      [-1e6, -1e6 + 0.5, -1e6 - 2, -1e6 + 1, -1e6, -1e6 - 0.25],
                      [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    out = ek.exit_score(z, torch.eye(6), None, policy=policy, threshold=0.5,
                        check_finite=False, backend=backend)
    p = torch.softmax(z.double(), dim=1)
    if policy == "max_prob":
        truth = p.amax(dim=1)
    else:
        truth = 1 + (p * p.log().nan_to_num(neginf=0.0)).sum(dim=1) / math.log(6)
    torch.testing.assert_close(out.score.double(), truth, rtol=0, atol=2e-6)


def sentinel_buffers(n0: int, c: int, out_kind: torch.dtype, exit_dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out_logits (N0, C) float or (N0,) int, out_score (N0,), out_exit (N0,) at sentinels."""
    if out_kind.is_floating_point:
        out_logits = torch.full((n0, c), LOGIT_SENTINEL, dtype=out_kind)
    else:
        out_logits = torch.full((n0,), INDEX_SENTINEL, dtype=out_kind)
    return (out_logits, torch.full((n0,), SCORE_SENTINEL),
            torch.full((n0,), INDEX_SENTINEL, dtype=exit_dtype))


def run_write_case(backend: str, feats: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, case: Case, kw: dict[str, Any], threshold: float,
                   is_last: bool, out_kind: torch.dtype, exit_dtype: torch.dtype,
                   index_dtype: torch.dtype, ctx: str, threads: int = 1) -> None:
    """One exit_score_write call (on ``threads`` intra-op threads), checked on its own and
    against the reference write."""
    n, c = feats.shape[0], weight.shape[0]
    n0 = 2 * n + 3
    exit_index = 3
    row_index = torch.randperm(n0)[:n].to(index_dtype)
    bufs = sentinel_buffers(n0, c, out_kind, exit_dtype)
    ref_bufs = tuple(b.clone() for b in bufs)
    with intra_op_threads(threads):
        out = ek.exit_score_write(feats, weight, bias, row_index=row_index,
                                  exit_index=exit_index, out_logits=bufs[0], out_score=bufs[1],
                                  out_exit=bufs[2], policy=case.policy, threshold=threshold,
                                  is_last=is_last, check_finite=default_check_finite(feats),
                                  backend=backend, **kw)
    expect = ref.exit_score_write(feats, weight, bias, case.policy, threshold, is_last, **kw,
                                  row_index=row_index, exit_index=exit_index,
                                  out_logits=ref_bufs[0], out_score=ref_bufs[1],
                                  out_exit=ref_bufs[2])
    stable = check_against_reference(out, expect, feats, weight, bias, case, threshold, ctx)
    out_logits, out_score, out_exit = bufs
    if is_last:
        assert bool(out.exit_mask.all()), ctx

    # exactly the exiting rows were written, at their row_index positions
    rows = row_index.long()[out.exit_mask]
    written = torch.zeros(n0, dtype=torch.bool)
    written[rows] = True
    assert int(written.sum()) == int(out.exit_mask.sum()), ctx
    if out_kind.is_floating_point:
        torch.testing.assert_close(out_logits[rows], out.logits[out.exit_mask].to(out_kind),
                                   atol=0, rtol=0, equal_nan=True,
                                   msg=lambda m: f"{ctx}: written logits: {m}")
        assert bool((out_logits[~written] == LOGIT_SENTINEL).all()), f"{ctx}: logits touched"
    else:
        want_pred = out.logits[out.exit_mask].argmax(dim=1).to(out_kind)
        assert torch.equal(out_logits[rows], want_pred), f"{ctx}: written predictions"
        assert bool((out_logits[~written] == INDEX_SENTINEL).all()), f"{ctx}: preds touched"
    torch.testing.assert_close(out_score[rows], out.score[out.exit_mask], atol=0, rtol=0,
                               equal_nan=True, msg=lambda m: f"{ctx}: written scores: {m}")
    assert bool((out_score[~written] == SCORE_SENTINEL).all()), f"{ctx}: scores touched"
    assert bool((out_exit[rows] == exit_index).all()), f"{ctx}: written exit index"
    assert bool((out_exit[~written] == INDEX_SENTINEL).all()), f"{ctx}: exit touched"

    # same buffers as the reference write, except rows decided differently near the threshold
    # (or, for predictions, rows whose argmax is ambiguous)
    ref_logits, _, ref_mask = expect
    tol = finite_tolerance(feats, weight, bias, ref_logits)
    comparable = (out.exit_mask == expect[2]) & stable
    if not out_kind.is_floating_point:
        comparable &= ~ambiguous_rows(ref_logits, tol)
    skip = torch.zeros(n0, dtype=torch.bool)
    skip[row_index.long()[~comparable]] = True
    keep = ~skip
    assert torch.equal(out_exit[keep], ref_bufs[2][keep]), f"{ctx}: out_exit vs reference"
    torch.testing.assert_close(out_score[keep], ref_bufs[1][keep], atol=SCORE_ATOL, rtol=0,
                               equal_nan=True, msg=lambda m: f"{ctx}: out_score vs ref: {m}")
    if out_kind.is_floating_point:
        got, want = out_logits[keep].float(), ref_bufs[0][keep].float()
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got)), f"{ctx}: out_logits finiteness"
        bound = tol + CAST_RTOL[out_kind] * want[finite].abs()
        assert bool(((got[finite] - want[finite]).abs() <= bound).all()), (
            f"{ctx}: out_logits vs reference")
    else:
        assert torch.equal(out_logits[keep], ref_bufs[0][keep]), f"{ctx}: preds vs reference"
    assert bool(ref_mask[comparable].eq(out.exit_mask[comparable]).all()), ctx


OUT_KINDS = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32)
# feats dtype paired with each out_logits kind (float outputs keep the input dtype)
FEATS_FOR_OUT = {torch.float32: torch.float32, torch.float16: torch.float16,
                 torch.bfloat16: torch.bfloat16, torch.int64: torch.float16,
                 torch.int32: torch.bfloat16}


@pytest.mark.parametrize(("exit_dtype", "index_dtype"),
                         [(torch.int32, torch.int64), (torch.int64, torch.int32)],
                         ids=lambda v: dtype_id(v))
@pytest.mark.parametrize("out_kind", OUT_KINDS, ids=dtype_id)
@pytest.mark.parametrize("n", NS, ids=lambda v: f"N{v}")
def test_exit_score_write(backend: str, n: int, out_kind: torch.dtype, exit_dtype: torch.dtype,
                          index_dtype: torch.dtype) -> None:
    """Exiting rows land at row_index, cast / argmax'd; other positions keep their sentinels."""
    torch.manual_seed(31 * n + OUT_KINDS.index(out_kind))
    dtype = FEATS_FOR_OUT[out_kind]
    for c, pooled in ((2, None), (101, 3)):
        feats, weight, bias = make_head(n, 33, c, dtype, pooled, pooled is None)
        # every case at a random threshold, then one case (cycled) at the last exit
        last_case = WRITE_CASES[(n + c) % len(WRITE_CASES)]
        for case, is_last in [(case, False) for case in WRITE_CASES] + [(last_case, True)]:
            kw = policy_kwargs(case, ref.exit_logits(feats, weight, bias))
            _, probe, _ = ref.exit_score(feats, weight, bias, case.policy, 0.0, **kw)
            threshold = pick_threshold(case, probe)
            ctx = f"[{backend}] C{c} {case} threshold={threshold:.6g} is_last={is_last}"
            run_write_case(backend, feats, weight, bias, case, kw, threshold, is_last,
                           out_kind, exit_dtype, index_dtype, ctx)


@pytest.mark.parametrize("out_kind", OUT_KINDS, ids=dtype_id)
def test_exit_score_write_nonfinite_rows(backend: str, out_kind: torch.dtype) -> None:
    """NaN/inf rows are written only at the last exit (NaN score); never before."""
    torch.manual_seed(23)
    dtype = FEATS_FOR_OUT[out_kind]
    feats, weight, bias = nonfinite_head(dtype, None)
    case = Case("max_prob")
    for is_last in (False, True):
        run_write_case(backend, feats, weight, bias, case, {}, 0.0, is_last, out_kind,
                       torch.int64, torch.int32, f"[{backend}] is_last={is_last}")
    n0 = 10
    row_index = torch.tensor([9, 0, 4, 1, 8, 2, 6])
    for is_last in (False, True):
        out_logits, out_score, out_exit = sentinel_buffers(n0, 3, out_kind, torch.int32)
        ek.exit_score_write(feats, weight, bias, row_index=row_index, exit_index=1,
                            out_logits=out_logits, out_score=out_score, out_exit=out_exit,
                            policy="max_prob", threshold=0.0, is_last=is_last,
                            check_finite=False, backend=backend)
        # rows 2 and 5 (NaN, inf) map to positions 4 and 2
        if is_last:
            assert bool(out_score[[4, 2]].isnan().all())
            assert out_exit[[4, 2]].tolist() == [1, 1]
        else:
            assert out_score[[4, 2]].tolist() == [SCORE_SENTINEL] * 2
            assert out_exit[[4, 2]].tolist() == [INDEX_SENTINEL] * 2
        # positions never addressed by row_index stay untouched
        assert out_score[[3, 5, 7]].tolist() == [SCORE_SENTINEL] * 3
        assert out_exit[[3, 5, 7]].tolist() == [INDEX_SENTINEL] * 3
        assert bool((out_exit[[9, 0, 1, 8, 6]] == 1).all())


@pytest.mark.parametrize("out_kind", OUT_KINDS, ids=dtype_id)
def test_exit_score_write_none_exit(backend: str, out_kind: torch.dtype) -> None:
    """Uniform logits (max_prob 1/C) at threshold 1.0: nothing is written at all."""
    torch.manual_seed(29)
    feats, weight, bias = constant_logit_head(64, 5, FEATS_FOR_OUT[out_kind], 0.0)
    out_logits, out_score, out_exit = sentinel_buffers(100, 5, out_kind, torch.int64)
    before = (out_logits.clone(), out_score.clone(), out_exit.clone())
    out = ek.exit_score_write(feats, weight, bias, row_index=torch.randperm(100)[:64],
                              exit_index=2, out_logits=out_logits, out_score=out_score,
                              out_exit=out_exit, policy="max_prob", threshold=1.0,
                              backend=backend)
    assert not bool(out.exit_mask.any())
    torch.testing.assert_close(out.score, torch.full((64,), 0.2), atol=SCORE_ATOL, rtol=0)
    for got, want in zip((out_logits, out_score, out_exit), before, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("out_kind", (torch.int64, torch.int32), ids=dtype_id)
def test_exit_score_write_prediction_ties(backend: str, out_kind: torch.dtype) -> None:
    """Tied logits: the written prediction is the first maximum, like torch.argmax."""
    torch.manual_seed(37)
    weight = torch.eye(4)  # logits = feats
    feats = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, -1.0], [3.0, -1.0, 0.0, 3.0]])
    out_logits, out_score, out_exit = sentinel_buffers(5, 4, out_kind, torch.int64)
    ek.exit_score_write(feats, weight, row_index=torch.tensor([4, 0, 2]), exit_index=1,
                        out_logits=out_logits, out_score=out_score, out_exit=out_exit,
                        policy="max_prob", threshold=0.0, backend=backend)
    assert out_logits.tolist() == [1, INDEX_SENTINEL, 0, INDEX_SENTINEL, 0]
    e = math.exp
    want = [0.25, e(2) / (1 + 2 * e(2) + e(-1)), e(3) / (2 * e(3) + e(-1) + 1)]
    torch.testing.assert_close(out_score[[4, 0, 2]], torch.tensor(want), atol=1e-5, rtol=0)


@pytest.mark.skipif(not ek.HAVE_EXTENSION, reason="needs the compiled extension")
@pytest.mark.parametrize(("n", "c"), [(1000, 101), (5000, 5)], ids=("N1000-C101", "N5000-C5"))
def test_cpp_multithreaded_matches_reference(n: int, c: int) -> None:
    """The C++ kernel on several intra-op threads (it splits rows in chunks of 16384 / C)."""
    torch.manual_seed(41)
    threads = max(2, DEFAULT_THREADS)
    feats, weight, bias = make_head(n, 33, c, torch.float32, 2, True)
    for case in POLICY_CASES:
        run_policy_case("cpp", feats, weight, bias, case, "[cpp] threads", threads)
    case = WRITE_CASES[-1]
    kw = policy_kwargs(case, ref.exit_logits(feats, weight, bias))
    for out_kind in (torch.bfloat16, torch.int64):
        run_write_case("cpp", feats, weight, bias, case, kw, 0.5, False, out_kind, torch.int32,
                       torch.int64, f"[cpp] threads {out_kind}", threads)
