"""``exit_score`` / ``exit_score_write``: the reference against independent float64
computations, every other backend against the reference.

- ``test_reference_*``: the oracle itself, on a modest pairwise grid, against formulas written
  here (float64 logits from the upcast inputs, softmax / max prob / entropy, the sigmoid
  scheduler, the patience streak and the vote counted in Python) and the write semantics.
- ``test_*_matches_reference``: each parity backend (``conftest.PARITY_BACKENDS``: cpp, and
  triton under ``TRITON_INTERPRET=1``) on a pairwise-sampled grid
  (``conftest.pairwise_cases``) holding every (backend, dtype, policy configuration) triple
  and every pair of values of any two axes: shapes (N = 0, 1, odd, 1000; D = 1, 33; C up to
  101; pooled (N, D, S) inputs; bias), the threshold (random, every row exits, no row
  exits, exactly at a reference score), is_last and NaN/inf rows. Triton rows keep to
  interpreter-friendly sizes (N <= 64, C <= 37); ``test_triton`` adds its tile shapes.
- known-answer tests (hand formulas) run on every backend, the reference included.

Tolerances: ``conftest.exit_tolerance`` (fp32 rounding of the dot, also for fp16/bf16 inputs;
scores through the policy's Lipschitz constant), decisions: ``conftest.assert_decisions_agree``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ALL_BACKENDS,
    DTYPES,
    PARITY_BACKENDS,
    Tolerance,
    ambiguous_rows,
    assert_covers,
    assert_decisions_agree,
    assert_logits_close,
    assert_scores_close,
    backend_param,
    decision_exempt,
    exit_tolerance,
    intra_op_threads,
    pairwise_cases,
    product_seeds,
)

import eenet_kernels as ek
from eenet_kernels import reference as ref

# one unit in the last place (relative) of each output dtype, for logits cast on write
CAST_RTOL = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
LOGIT_SENTINEL = -1000.0  # exact in float16 and bfloat16
INDEX_SENTINEL = -1
SCORE_SENTINEL = -5.0
DEFAULT_THREADS = torch.get_num_threads()  # before the module fixture pins it to 1
NONFINITE_ROWS = (2, 5)  # a NaN in row 2, an inf in row 5 (inject_nonfinite)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """One intra-op thread for this module's many tiny ops: OpenMP barriers make them 20x
    slower on a busy 2-core machine. ``test_cpp_multithreaded_matches_reference`` covers the
    threaded kernel paths."""
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
THRESHOLD_KINDS = ("random", "all", "none", "at_score")
OUT_KINDS = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32)
# feats dtype paired with each out_logits kind (float outputs keep the input dtype)
FEATS_FOR_OUT = {torch.float32: torch.float32, torch.float16: torch.float16,
                 torch.bfloat16: torch.bfloat16, torch.int64: torch.float16,
                 torch.int32: torch.bfloat16}
INDEX_DTYPE_PAIRS = ((torch.int32, torch.int64), (torch.int64, torch.int32))  # out_exit, row_index


def dtype_id(dtype: torch.dtype) -> str:
    """Short test id of a dtype."""
    return str(dtype).removeprefix("torch.")


def row_seed(label: str) -> int:
    """A stable seed from a test id."""
    return zlib.crc32(label.encode())


# ---------------------------------------------------------------------------------------
# Inputs.


def make_head(n: int, d: int, c: int, dtype: torch.dtype, pooled: int | None,
              with_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random feats (N, D) or (N, D, S), weight (C, D) and bias (C,) or None in ``dtype``."""
    shape = (n, d) if pooled is None else (n, d, pooled)
    scale = 1.0 if pooled is None else math.sqrt(pooled)  # keep the pooled spread similar
    feats = (torch.randn(shape) * scale).to(dtype)
    weight = (torch.randn(c, d) * (2.5 / math.sqrt(d))).to(dtype)
    bias = torch.randn(c).to(dtype) if with_bias else None
    return feats, weight, bias


def inject_nonfinite(feats: torch.Tensor) -> torch.Tensor:
    """A copy of feats (N >= 6) with a NaN in row 2 and an inf in row 5."""
    out = feats.clone()
    d = feats.shape[1]
    nan_at = (2, d - 1) if feats.dim() == 2 else (2, d - 1, 0)
    inf_at = (5, 0) if feats.dim() == 2 else (5, 0, feats.shape[2] - 1)
    out[nan_at] = math.nan
    out[inf_at] = math.inf
    return out


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


def choose_threshold(kind: str, case: Case, score: torch.Tensor) -> float:
    """``random``: inside the range of the finite scores (a random streak for patience);
    ``all``: the lowest threshold (every row with a score >= 0 exits); ``none``: the highest
    one (patience: a streak longer than the history); ``at_score``: exactly one row's score."""
    finite = score[torch.isfinite(score)]
    if case.policy == "patience":
        if kind == "random":
            return float(torch.randint(0, case.k + 2, ()).item())
        if kind == "at_score" and finite.numel():
            return float(finite[torch.randint(0, finite.numel(), ())])
        return {"all": 0.0, "none": float(case.k + 1)}.get(kind, 0.0)
    if kind == "all":
        return 0.0
    if kind == "none":
        return 1.0
    if finite.numel() == 0:
        return 0.5
    if kind == "at_score":
        return min(max(float(finite[torch.randint(0, finite.numel(), ())]), 0.0), 1.0)
    lo = min(max(float(finite.min()), 0.0), 1.0)
    hi = min(max(float(finite.max()), 0.0), 1.0)
    return lo + (hi - lo) * float(torch.rand(()).item())


def reference_result(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     case: Case, threshold: float, is_last: bool, kw: dict[str, Any]
                     ) -> ek.ExitScore:
    return ek.ExitScore(*ref.exit_score(feats, weight, bias, case.policy, threshold, is_last,
                                        **kw))


def check_result_types(out: ek.ExitScore, n: int, c: int, ctx: str) -> None:
    """The five fields' shapes and dtypes."""
    assert isinstance(out, ek.ExitScore), ctx
    assert out.logits.shape == (n, c) and out.logits.dtype == torch.float32, ctx
    assert out.score.shape == (n,) and out.score.dtype == torch.float32, ctx
    assert out.exit_mask.shape == (n,) and out.exit_mask.dtype == torch.bool, ctx
    assert out.pred.shape == (n,) and out.pred.dtype == torch.int64, ctx
    assert out.keep.shape == (n,) and out.keep.dtype == torch.bool, ctx


# ---------------------------------------------------------------------------------------
# The independent formulation (float64, argmax and streaks in Python).


def float64_logits(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    """Exact-ish logits: float64 pooling and dot of the (exactly) upcast inputs."""
    x = feats.double()
    if x.dim() == 3:
        x = x.sum(dim=2) / x.shape[2]
    z = torch.einsum("nd,cd->nc", x, weight.double())
    return z if bias is None else z + bias.double()


def first_argmax(row: Sequence[float]) -> int:
    best = 0
    for j, v in enumerate(row):
        if v > row[best]:
            best = j
    return best


def float64_score(logits: torch.Tensor, case: Case, kw: dict[str, Any]) -> torch.Tensor:
    """(N,) float64 policy score of (N, C) logits; NaN on rows with a non-finite logit."""
    n, c = logits.shape
    z = logits.double()
    finite = torch.isfinite(z).all(dim=1)
    z = torch.where(finite[:, None], z, torch.zeros_like(z))
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    max_p = p.max(dim=1).values
    conf = 1.0 + (p * logp).sum(dim=1) / math.log(c)
    pred = [first_argmax(r) for r in z.tolist()]
    prev = kw["prev_preds"].tolist() if case.uses_preds else [[] for _ in range(n)]
    if case.policy == "max_prob":
        score = max_p
    elif case.policy == "entropy":
        score = conf
    elif case.policy == "patience":
        streaks = []
        for row_pred, row_prev in zip(pred, prev, strict=True):
            s = 0
            for q in reversed(row_prev):
                if q != row_pred:
                    break
                s += 1
            streaks.append(float(s))
        score = torch.tensor(streaks, dtype=torch.float64).reshape(n)
    else:
        w = kw["sched_weight"].double()
        acc = (p @ w[:c] + max_p * w[c] + conf * w[c + 1]
               + kw["prev_scores"].double() @ w[c + 2:c + 2 + case.k])
        if case.use_vote and case.k > 0:
            votes = [sum(q == row_pred for q in row_prev) / case.k
                     for row_pred, row_prev in zip(pred, prev, strict=True)]
            acc = acc + torch.tensor(votes, dtype=torch.float64).reshape(n) * w[c + 2 + case.k]
        score = 1.0 / (1.0 + torch.exp(-(acc + kw["sched_bias"])))
    return torch.where(finite, score, torch.full_like(score, math.nan))


# ---------------------------------------------------------------------------------------
# The comparison of a backend with the reference.


def rows_of(kw: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The per-row history inputs restricted to ``rows``."""
    return {k: v[rows] if k in ("prev_scores", "prev_preds") else v for k, v in kw.items()}


def check_parity(out: ek.ExitScore, expect: ek.ExitScore, feats: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor | None, case: Case,
                 kw: dict[str, Any], threshold: float, is_last: bool, ctx: str,
                 low_precision_dot: bool = False) -> torch.Tensor:
    """Assert a backend result matches the reference one (conftest's rule); returns the rows
    decided alike with the same argmax (where a write must match the reference's too)."""
    n, c = feats.shape[0], weight.shape[0]
    check_result_types(out, n, c, ctx)
    tol = exit_tolerance(feats, weight, bias, case.policy, kw.get("sched_weight"),
                         low_precision_dot)
    assert_logits_close(out.logits, expect.logits, tol, ctx)
    # consistency of the backend's own fields
    assert torch.equal(out.pred, out.logits.argmax(dim=1)), f"{ctx}: pred != argmax(logits)"
    assert torch.equal(out.keep, ~out.exit_mask), f"{ctx}: keep != ~exit_mask"
    own = torch.ones_like(out.exit_mask) if is_last else out.score >= threshold
    assert torch.equal(out.exit_mask, own), f"{ctx}: exit_mask does not follow the score"
    # the argmax: the reference's, except where its top two logits are within tolerance
    flipped = out.pred != expect.pred
    stray = flipped & ~ambiguous_rows(expect.logits, tol)
    assert not bool(stray.any()), (
        f"{ctx}: pred differs from the reference at rows {stray.nonzero().flatten().tolist()}")
    # where the backend took the other (tied) maximum, the reference semantics at its argmax
    want_score, want_mask = expect.score.clone(), expect.exit_mask.clone()
    if case.uses_preds and bool(flipped.any()):
        alt = ref.policy_score(out.logits[flipped], case.policy, **rows_of(kw, flipped))
        want_score[flipped] = alt
        want_mask[flipped] = True if is_last else alt >= threshold
    score_tol = tol.score_given(out.logits, expect.logits)
    if bool(flipped.any()):  # scored from the backend's own logits: no logit difference
        score_tol[flipped] = tol.score_given(out.logits[flipped], out.logits[flipped])
    assert_scores_close(out.score, want_score, score_tol, ctx)
    try:
        assert_decisions_agree(out.exit_mask, want_mask, want_score, threshold, score_tol,
                               is_last)
    except AssertionError as exc:
        raise AssertionError(f"{ctx}: {exc}") from exc
    return (out.exit_mask == expect.exit_mask) & ~flipped


# ---------------------------------------------------------------------------------------
# Grids.

SHAPE_AXES: dict[str, tuple[Any, ...]] = {
    "d": (1, 33),
    "pooled": (None, 3),
    "bias": (False, True),
    "threshold": THRESHOLD_KINDS,
    "is_last": (False, True),
    "nonfinite": (False, True),
}


def _feasible(row: dict[str, Any]) -> bool:
    """Constraints on (partial) grid rows: NaN/inf rows need N >= 7; the Triton interpreter
    (~50 ms per row tile) keeps to N <= 64, C <= 37."""
    if row.get("nonfinite") and row.get("n", 7) < 7:
        return False
    if row.get("backend") == "triton":
        return row.get("n", 0) <= 64 and row.get("c", 2) <= 37
    return True


PARITY_AXES: dict[str, tuple[Any, ...]] = {
    "backend": PARITY_BACKENDS,
    "dtype": DTYPES,
    "case": POLICY_CASES,
    "n": (0, 1, 7, 64, 1000),
    "c": (2, 5, 37, 101),
    **SHAPE_AXES,
}
PARITY_GRID = pairwise_cases(PARITY_AXES, product_seeds(PARITY_AXES, ("backend", "dtype", "case")),
                             _feasible)

REFERENCE_AXES: dict[str, tuple[Any, ...]] = {
    "dtype": DTYPES,
    "case": POLICY_CASES,
    "n": (0, 1, 7, 64),
    "c": (2, 5, 101),
    **SHAPE_AXES,
}
REFERENCE_GRID = pairwise_cases(REFERENCE_AXES,
                                product_seeds(REFERENCE_AXES, ("dtype", "case")), _feasible)

WRITE_AXES: dict[str, tuple[Any, ...]] = {
    "backend": PARITY_BACKENDS,
    "out_kind": OUT_KINDS,
    "case": WRITE_CASES,
    "n": (0, 1, 7, 64, 1000),
    "shape": ((2, None), (37, 3), (101, 3)),  # (C, S)
    "index_dtypes": INDEX_DTYPE_PAIRS,
    "threshold": THRESHOLD_KINDS,
    "is_last": (False, True),
    "nonfinite": (False, True),
}


def _write_feasible(row: dict[str, Any]) -> bool:
    c = row["shape"][0] if "shape" in row else 2
    return _feasible({k: v for k, v in {**row, "c": c}.items() if k != "shape"})


WRITE_GRID = pairwise_cases(WRITE_AXES, product_seeds(WRITE_AXES, ("backend", "out_kind", "case")),
                            _write_feasible)
REFERENCE_WRITE_AXES = {k: v for k, v in WRITE_AXES.items() if k != "backend"}
REFERENCE_WRITE_AXES["n"] = (0, 1, 7, 64)
REFERENCE_WRITE_GRID = pairwise_cases(
    REFERENCE_WRITE_AXES, product_seeds(REFERENCE_WRITE_AXES, ("out_kind", "case")),
    _write_feasible)


def row_id(row: dict[str, Any]) -> str:
    parts = []
    for key, value in row.items():
        if isinstance(value, torch.dtype):
            parts.append(dtype_id(value))
        elif key == "index_dtypes":
            parts.append("exit-" + "-idx-".join(dtype_id(v) for v in value))
        elif key == "shape":
            parts.append(f"C{value[0]}-{'2d' if value[1] is None else '3d'}")
        elif key == "pooled":
            parts.append("2d" if value is None else "3d")
        elif isinstance(value, bool):
            if value:
                parts.append(key)
        elif key in ("n", "d", "c"):
            parts.append(f"{key.upper()}{value}")
        else:
            parts.append(str(value))
    return "-".join(parts)


def grid_params(grid: Sequence[dict[str, Any]]) -> list[Any]:
    """pytest params of a grid's rows; rows of an unavailable backend are skipped."""
    params = []
    for row in grid:
        marks = backend_param(row["backend"]).marks if "backend" in row else ()
        params.append(pytest.param(row, id=row_id(row), marks=marks))
    return params


def test_grids_cover_every_value_and_combination() -> None:
    """The sampled grids hold every value of every axis, every (backend, dtype, policy)
    triple of the parity grid and every pair of values of any two axes."""
    for grid, axes, full in ((PARITY_GRID, PARITY_AXES, ("backend", "dtype", "case")),
                             (REFERENCE_GRID, REFERENCE_AXES, ("dtype", "case")),
                             (WRITE_GRID, WRITE_AXES, ("backend", "out_kind", "case")),
                             (REFERENCE_WRITE_GRID, REFERENCE_WRITE_AXES, ("out_kind", "case"))):
        assert_covers(grid, axes, full, _write_feasible if "out_kind" in axes else _feasible)
    assert all(r["n"] <= 64 and r["c"] <= 37 for r in PARITY_GRID if r["backend"] == "triton")
    assert any(r["threshold"] == "at_score" and r["case"].policy == "patience"
               for r in PARITY_GRID)


# ---------------------------------------------------------------------------------------
# The tolerance rule itself.


@pytest.mark.parametrize("pooled", (None, 3), ids=("2d", "3d"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=dtype_id)
def test_tolerance_catches_low_precision_logits(dtype: torch.dtype, pooled: int | None) -> None:
    """The fp32 rule rejects logits rounded through fp16 and logits that plain torch computes
    in the input dtype (the regressions it exists for); the gpu-only low-precision-dot
    allowance would let them pass, which is why only tensor-core kernels get it."""
    torch.manual_seed(1)
    feats, weight, bias = make_head(64, 33, 37, dtype, pooled, True)
    exact = ref.exit_logits(feats, weight, bias)
    tight = exit_tolerance(feats, weight, bias, "max_prob")
    loose = exit_tolerance(feats, weight, bias, "max_prob", low_precision_dot=True)
    x = feats.mean(dim=2) if pooled else feats
    regressions = {"rounded to fp16": exact.half().float(),
                   "computed in the input dtype": F.linear(x, weight, bias).float()}
    for label, bad in regressions.items():
        with pytest.raises(AssertionError, match="logits"):
            assert_logits_close(bad, exact, tight, label)
        assert_logits_close(bad, exact, loose, label)
    # while an fp32 result in another summation order passes
    reordered = (feats.float().mean(dim=2) if pooled else feats.float()).flip(1) @ \
        weight.float().flip(1).t() + bias.float()
    assert_logits_close(reordered, exact, tight, "reordered fp32 dot")


def test_decision_exemption_is_exactly_the_near_rows() -> None:
    """A flipped decision passes only on rows whose finite reference score lies within the
    row's tolerance of the threshold; never at the last exit, never with zero tolerance."""
    thr, t = 0.5, 2.0**-10  # powers of two: every offset below is exact in float32
    tol = torch.tensor([t] * 9 + [0.0, t], dtype=torch.float64)
    score = torch.tensor([thr - 2 * t, thr - t, thr - t / 2, thr, thr + t / 2, thr + t,
                          thr + 1.5 * t, math.nan, 0.9, thr, math.inf])
    want = torch.tensor([False, True, True, True, True, True, False, False, False, False,
                         False])
    assert torch.equal(decision_exempt(score, thr, tol, False), want)
    assert not bool(decision_exempt(score, thr, tol, True).any())
    ref_mask = score >= thr
    assert_decisions_agree(ref_mask, ref_mask, score, thr, tol)
    everyone = torch.ones_like(ref_mask)
    for i in range(score.shape[0]):
        mask = ref_mask.clone()
        mask[i] = ~mask[i]
        if bool(want[i]):
            assert_decisions_agree(mask, ref_mask, score, thr, tol)
        else:
            with pytest.raises(AssertionError, match=rf"rows \[{i}\]"):
                assert_decisions_agree(mask, ref_mask, score, thr, tol)
        stays = everyone.clone()
        stays[i] = False
        with pytest.raises(AssertionError, match=rf"rows \[{i}\]"):  # the last exit: none
            assert_decisions_agree(stays, everyone, score, thr, tol, is_last=True)


# ---------------------------------------------------------------------------------------
# The reference against the independent formulation.


def check_against_float64(res: ek.ExitScore, feats: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None, case: Case, kw: dict[str, Any],
                          threshold: float, is_last: bool, ctx: str) -> None:
    """A reference result against the independent formulation: float64 logits of the upcast
    inputs, their argmax, the float64 policy formulas on the result's own logits, the
    decisions they imply (conftest's exemption), keep = ~exit_mask."""
    n, c = feats.shape[0], weight.shape[0]
    check_result_types(res, n, c, ctx)
    truth = float64_logits(feats, weight, bias)
    tol = exit_tolerance(feats, weight, bias, case.policy, kw.get("sched_weight"))
    assert_logits_close(res.logits, truth, tol, ctx)
    settled = ~ambiguous_rows(truth, tol)
    assert torch.equal(res.pred[settled], truth.argmax(dim=1)[settled]), f"{ctx}: pred"
    want = float64_score(res.logits, case, kw)  # the formulas, on the result's logits
    score_tol = tol.score_given(res.logits, res.logits)  # same logits: the fp32 floor
    assert_scores_close(res.score, want, score_tol, ctx)
    want_mask = torch.ones(n, dtype=torch.bool) if is_last else want >= threshold
    assert_decisions_agree(res.exit_mask, want_mask, want, threshold, score_tol, is_last)
    assert torch.equal(res.keep, ~res.exit_mask), ctx


def prepare_row(row: dict[str, Any], logits_fn: Callable[..., torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any],
                           float]:
    """A grid row's inputs: (feats, weight, bias, policy kwargs, threshold), seeded by the
    row's id. The policy kwargs (history, scheduler weights) are drawn from the clean
    logits ``logits_fn(feats, weight, bias)``; NaN/inf rows are injected after that; the
    threshold comes from the reference's scores."""
    torch.manual_seed(row_seed(row_id(row)))
    case: Case = row["case"]
    feats, weight, bias = make_head(row["n"], row["d"], row["c"], row["dtype"], row["pooled"],
                                    row["bias"])
    kw = policy_kwargs(case, logits_fn(feats, weight, bias))
    if row["nonfinite"]:
        feats = inject_nonfinite(feats)
    probe = reference_result(feats, weight, bias, case, 0.0, False, kw)
    return feats, weight, bias, kw, choose_threshold(row["threshold"], case, probe.score)


@pytest.mark.parametrize("row", grid_params(REFERENCE_GRID))
def test_reference_matches_float64(row: dict[str, Any]) -> None:
    """reference.exit_score against float64 logits and scores computed here."""
    case: Case = row["case"]
    is_last = row["is_last"]
    feats, weight, bias, kw, threshold = prepare_row(
        row, lambda f, w, b: float64_logits(f, w, b).float())
    ctx = f"[reference] {row_id(row)} threshold={threshold!r}"
    res = reference_result(feats, weight, bias, case, threshold, is_last, kw)
    check_against_float64(res, feats, weight, bias, case, kw, threshold, is_last, ctx)
    finite = torch.isfinite(res.score)
    if row["nonfinite"]:
        assert not bool(finite[list(NONFINITE_ROWS)].any()), ctx
        assert res.exit_mask[list(NONFINITE_ROWS)].tolist() == [is_last] * 2, ctx
    if row["threshold"] == "at_score" and bool(finite.any()):  # score == threshold exits
        at = res.score == threshold
        assert bool(at.any()) and bool(res.exit_mask[at].all()), ctx
    if row["threshold"] == "all":  # scores >= 0 (entropy's clamped at 0)
        assert bool(res.exit_mask[finite].all()), ctx
    if row["threshold"] == "none" and case.policy == "patience" and not is_last:
        assert not bool(res.exit_mask.any()), ctx


# ---------------------------------------------------------------------------------------
# Every other backend against the reference.


def run_parity_row(backend: str, row: dict[str, Any], threads: int = 1) -> None:
    case: Case = row["case"]
    is_last = row["is_last"]
    feats, weight, bias, kw, threshold = prepare_row(row, ref.exit_logits)
    ctx = f"[{backend}] {row_id(row)} threshold={threshold!r}"
    expect = reference_result(feats, weight, bias, case, threshold, is_last, kw)
    with intra_op_threads(threads):
        out = ek.exit_score(feats, weight, bias, policy=case.policy, threshold=threshold,
                            is_last=is_last, check_finite=not row["nonfinite"], backend=backend,
                            **kw)
    check_parity(out, expect, feats, weight, bias, case, kw, threshold, is_last, ctx)
    if row["threshold"] == "all":
        assert bool(out.exit_mask[torch.isfinite(out.score)].all()), ctx
    if row["nonfinite"]:
        assert out.exit_mask[list(NONFINITE_ROWS)].tolist() == [is_last] * 2, ctx


@pytest.mark.parametrize("row", grid_params(PARITY_GRID))
def test_exit_score_matches_reference(row: dict[str, Any]) -> None:
    run_parity_row(row["backend"], row)


@pytest.mark.skipif(not ek.HAVE_EXTENSION, reason="needs the compiled extension")
@pytest.mark.parametrize(("n", "c"), [(1000, 101), (5000, 5)], ids=("N1000-C101", "N5000-C5"))
def test_cpp_multithreaded_matches_reference(n: int, c: int) -> None:
    """The C++ kernel on several intra-op threads (it splits rows in chunks of 16384 / C)."""
    threads = max(2, DEFAULT_THREADS)
    for i, case in enumerate(POLICY_CASES):
        row = {"dtype": DTYPES[i % 3], "case": case, "n": n, "c": c, "d": 33, "pooled": 2,
               "bias": True, "threshold": "random", "is_last": False, "nonfinite": i % 4 == 0}
        run_parity_row("cpp", row, threads)
    row = {"out_kind": torch.bfloat16, "case": WRITE_CASES[-1], "n": n, "shape": (c, 2),
           "index_dtypes": INDEX_DTYPE_PAIRS[0], "threshold": "random", "is_last": False,
           "nonfinite": False}
    run_write_row("cpp", row, threads)


# ---------------------------------------------------------------------------------------
# exit_score_write.


def sentinel_buffers(n0: int, c: int, out_kind: torch.dtype, exit_dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out_logits (N0, C) float or (N0,) int, out_score (N0,), out_exit (N0,) at sentinels."""
    if out_kind.is_floating_point:
        out_logits = torch.full((n0, c), LOGIT_SENTINEL, dtype=out_kind)
    else:
        out_logits = torch.full((n0,), INDEX_SENTINEL, dtype=out_kind)
    return (out_logits, torch.full((n0,), SCORE_SENTINEL),
            torch.full((n0,), INDEX_SENTINEL, dtype=exit_dtype))


def check_written(out: ek.ExitScore, bufs: Sequence[torch.Tensor], row_index: torch.Tensor,
                  exit_index: int, is_last: bool, ctx: str) -> None:
    """Exactly the exiting rows were written, at their row_index, with the op's own results
    (logits cast to the buffer's dtype, or the argmax); every other position untouched."""
    out_logits, out_score, out_exit = bufs
    n0 = out_score.shape[0]
    if is_last:
        assert bool(out.exit_mask.all()), ctx
    rows = row_index.long()[out.exit_mask]
    written = torch.zeros(n0, dtype=torch.bool)
    written[rows] = True
    assert int(written.sum()) == int(out.exit_mask.sum()), ctx
    if out_logits.is_floating_point():
        torch.testing.assert_close(out_logits[rows], out.logits[out.exit_mask].to(out_logits.dtype),
                                   atol=0, rtol=0, equal_nan=True,
                                   msg=lambda m: f"{ctx}: written logits: {m}")
        assert bool((out_logits[~written] == LOGIT_SENTINEL).all()), f"{ctx}: logits touched"
    else:
        want_pred = out.pred[out.exit_mask].to(out_logits.dtype)
        assert torch.equal(out_logits[rows], want_pred), f"{ctx}: written predictions"
        assert bool((out_logits[~written] == INDEX_SENTINEL).all()), f"{ctx}: preds touched"
    torch.testing.assert_close(out_score[rows], out.score[out.exit_mask], atol=0, rtol=0,
                               equal_nan=True, msg=lambda m: f"{ctx}: written scores: {m}")
    assert bool((out_score[~written] == SCORE_SENTINEL).all()), f"{ctx}: scores touched"
    assert bool((out_exit[rows] == exit_index).all()), f"{ctx}: written exit index"
    assert bool((out_exit[~written] == INDEX_SENTINEL).all()), f"{ctx}: exit touched"


def write_inputs(row: dict[str, Any]) -> tuple[Any, ...]:
    """feats, weight, bias, history kwargs, threshold, row_index and buffers of a write row."""
    case: Case = row["case"]
    c, pooled = row["shape"]
    n = row["n"]
    feats, weight, bias = make_head(n, 33, c, FEATS_FOR_OUT[row["out_kind"]], pooled,
                                    pooled is None)
    kw = policy_kwargs(case, ref.exit_logits(feats, weight, bias))
    if row["nonfinite"]:
        feats = inject_nonfinite(feats)
    probe = reference_result(feats, weight, bias, case, 0.0, False, kw)
    threshold = choose_threshold(row["threshold"], case, probe.score)
    exit_dtype, index_dtype = row["index_dtypes"]
    n0 = 2 * n + 3
    row_index = torch.randperm(n0)[:n].to(index_dtype)
    bufs = sentinel_buffers(n0, c, row["out_kind"], exit_dtype)
    return feats, weight, bias, kw, threshold, row_index, bufs


def call_write(backend: str, feats: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, case: Case, kw: dict[str, Any], threshold: float,
               is_last: bool, row_index: torch.Tensor, bufs: Sequence[torch.Tensor],
               exit_index: int, check_finite: bool) -> ek.ExitScore:
    return ek.exit_score_write(feats, weight, bias, row_index=row_index, exit_index=exit_index,
                               out_logits=bufs[0], out_score=bufs[1], out_exit=bufs[2],
                               policy=case.policy, threshold=threshold, is_last=is_last,
                               check_finite=check_finite, backend=backend, **kw)


@pytest.mark.parametrize("row", grid_params(REFERENCE_WRITE_GRID))
def test_reference_exit_score_write(row: dict[str, Any]) -> None:
    """The reference write: its result against the float64 formulation; exiting rows land
    at row_index, cast / argmax'd, the rest keeps its sentinels."""
    torch.manual_seed(row_seed(row_id(row)))
    case: Case = row["case"]
    feats, weight, bias, kw, threshold, row_index, bufs = write_inputs(row)
    ctx = f"[reference] {row_id(row)} threshold={threshold!r}"
    out = call_write("reference", feats, weight, bias, case, kw, threshold, row["is_last"],
                     row_index, bufs, 3, not row["nonfinite"])
    check_against_float64(out, feats, weight, bias, case, kw, threshold, row["is_last"], ctx)
    check_written(out, bufs, row_index, 3, row["is_last"], ctx)


def run_write_row(backend: str, row: dict[str, Any], threads: int = 1) -> None:
    """One exit_score_write call, checked on its own and against the reference write."""
    torch.manual_seed(row_seed(row_id(row)))
    case: Case = row["case"]
    feats, weight, bias, kw, threshold, row_index, bufs = write_inputs(row)
    ref_bufs = tuple(b.clone() for b in bufs)
    ctx = f"[{backend}] {row_id(row)} threshold={threshold!r}"
    with intra_op_threads(threads):
        out = call_write(backend, feats, weight, bias, case, kw, threshold, row["is_last"],
                         row_index, bufs, 3, not row["nonfinite"])
    check_write_against_reference(out, bufs, ref_bufs, row, feats, weight, bias, kw,
                                  threshold, row_index, ctx)


def check_write_against_reference(out: ek.ExitScore, bufs: Sequence[torch.Tensor],
                                  ref_bufs: Sequence[torch.Tensor], row: dict[str, Any],
                                  feats: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None, kw: dict[str, Any],
                                  threshold: float, row_index: torch.Tensor, ctx: str) -> None:
    """An exit_score_write result ``out`` and the buffers it wrote (CPU tensors), at exit 3
    of ``row``'s inputs, against the reference write into ``ref_bufs`` (untouched copies
    of the buffers before the call): the op's own result, exactly the exiting rows written
    at row_index (cast / argmax), and the reference write's buffers wherever the decision
    and argmax agree."""
    case: Case = row["case"]
    is_last, out_kind = row["is_last"], row["out_kind"]
    expect = ek.ExitScore(*ref.exit_score_write(
        feats, weight, bias, case.policy, threshold, is_last, **kw, row_index=row_index,
        exit_index=3, out_logits=ref_bufs[0], out_score=ref_bufs[1], out_exit=ref_bufs[2]))
    alike = check_parity(out, expect, feats, weight, bias, case, kw, threshold, is_last, ctx)
    check_written(out, bufs, row_index, 3, is_last, ctx)

    # the reference write's buffers, except at rows decided differently near the threshold
    # or whose argmax is a tie within tolerance (already checked above)
    skip = torch.zeros(bufs[1].shape[0], dtype=torch.bool)
    skip[row_index.long()[~alike]] = True
    same = ~skip
    out_logits, out_score, out_exit = bufs
    assert torch.equal(out_exit[same], ref_bufs[2][same]), f"{ctx}: out_exit vs reference"
    tol: Tolerance = exit_tolerance(feats, weight, bias, case.policy, kw.get("sched_weight"))
    at = torch.full(same.shape, -1, dtype=torch.long)
    at[row_index.long()] = torch.arange(row_index.shape[0])
    written = same & (at >= 0)
    score_tol = tol.score_given(out.logits, expect.logits)
    assert_scores_close(out_score[written], ref_bufs[1][written], score_tol[at[written]], ctx)
    assert torch.equal(out_score[same & (at < 0)], ref_bufs[1][same & (at < 0)]), ctx
    if out_kind.is_floating_point:
        got, want = out_logits[written].double(), ref_bufs[0][written].double()
        bound = tol.logits[at[written]] + CAST_RTOL[out_kind] * want.abs()
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{ctx}: finiteness"
        finite = torch.isfinite(want)
        assert bool(((got - want).abs()[finite] <= bound[finite]).all()), (
            f"{ctx}: out_logits vs reference")
    else:
        assert torch.equal(out_logits[same], ref_bufs[0][same]), f"{ctx}: preds vs reference"


@pytest.mark.parametrize("row", grid_params(WRITE_GRID))
def test_exit_score_write_matches_reference(row: dict[str, Any]) -> None:
    run_write_row(row["backend"], row)


# ---------------------------------------------------------------------------------------
# Known answers, on every backend (the reference included).


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


KNOWN_AXES: dict[str, tuple[Any, ...]] = {"backend": ALL_BACKENDS, "case": POLICY_CASES,
                                          "dtype": DTYPES}
KNOWN_GRID = pairwise_cases(KNOWN_AXES, product_seeds(KNOWN_AXES, ("backend", "case")))


@pytest.mark.parametrize("row", grid_params(KNOWN_GRID))
def test_known_scores_and_decisions(row: dict[str, Any]) -> None:
    """Constant logits: scores equal hand formulas; none / all exit on either side of them."""
    torch.manual_seed(5)
    backend, case, dtype = row["backend"], row["case"], row["dtype"]
    n, c = 64, 5
    for top in (0.0, 4.0):  # uniform, peaked
        feats, weight, bias = constant_logit_head(n, c, dtype, top)
        kw = known_kwargs(case, n, c)
        want = known_scores(case, c, top)
        out = ek.exit_score(feats, weight, bias, policy=case.policy, threshold=1.0,
                            backend=backend, **kw)
        assert torch.equal(out.logits, bias.float().expand(n, c)), "logits are the bias"
        assert bool((out.pred == 0).all()) and torch.equal(out.keep, ~out.exit_mask)
        torch.testing.assert_close(out.score, torch.full((n,), want), atol=1e-6, rtol=0)
        # threshold 1.0 (patience: streak 1): nobody exits; uniform rows have max_prob 1/C
        assert not bool(out.exit_mask.any())
        if case.policy == "patience":
            continue
        above = min(want + 1e-3, 1.0)
        below = max(want - 1e-3, 0.0)
        thresholds = [(above, False)] + ([(below, True)] if want > 1e-3 else [])
        if top > 0:  # peaked: every score is well above 0
            thresholds.append((0.0, True))
        for threshold, everyone in thresholds:
            out = ek.exit_score(feats, weight, bias, policy=case.policy, threshold=threshold,
                                backend=backend, **kw)
            assert out.exit_mask.tolist() == [everyone] * n, f"score {want} vs {threshold}"
            assert out.keep.tolist() == [not everyone] * n


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_patience_hand_computed(any_backend: str, dtype: torch.dtype) -> None:
    """Streaks counted back from the newest earlier exit, by hand."""
    weight = torch.eye(3, dtype=dtype)  # logits = feats
    feats = torch.tensor([[0.0, 0.0, 5.0]] * 4 + [[5.0, 0.0, 0.0]], dtype=dtype)
    # preds 2, 2, 2, 2, 0 -> streaks 2, 0, 3, 1, 3
    want = torch.tensor([2.0, 0.0, 3.0, 1.0, 3.0])
    for preds_dtype in (torch.int32, torch.int64):
        prev = torch.tensor([[1, 2, 2], [2, 2, 1], [2, 2, 2], [2, 1, 2], [0, 0, 0]],
                            dtype=preds_dtype)
        for threshold, mask in ((2.0, [True, False, True, False, True]), (0.0, [True] * 5),
                                (3.5, [False] * 5), (1.0, [True, False, True, True, True])):
            out = ek.exit_score(feats, weight, policy="patience", threshold=threshold,
                                prev_preds=prev, backend=any_backend)
            assert torch.equal(out.score, want), f"threshold {threshold}: {out.score}"
            assert out.exit_mask.tolist() == mask, f"threshold {threshold}"
            assert out.pred.tolist() == [2, 2, 2, 2, 0]
        out = ek.exit_score(feats, weight, policy="patience", threshold=3.5, is_last=True,
                            prev_preds=prev, backend=any_backend)
        assert torch.equal(out.score, want) and bool(out.exit_mask.all())
        assert not bool(out.keep.any())


@pytest.mark.parametrize("use_vote", (False, True), ids=("novote", "vote"))
def test_eenet_hand_computed(any_backend: str, use_vote: bool) -> None:
    """C=2, k=1: sigmoid(w . [p0, p1, max p, conf, q, (vote)] + b) with explicit numbers."""
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
                        use_vote=use_vote, backend=any_backend)
    torch.testing.assert_close(out.score, torch.tensor(want), atol=1e-6, rtol=0)
    assert out.exit_mask.tolist() == [use_vote, True]
    assert out.pred.tolist() == [1, 0] and out.keep.tolist() == [not use_vote, False]


@pytest.mark.parametrize("policy", ("entropy", "max_prob"))
def test_scores_exact_for_logits_of_any_magnitude(any_backend: str, policy: str) -> None:
    """Huge offsets (1e4 .. 1e30) and spreads (down to -3e38) of finite logits: the scores
    equal a float64 computation on the same fp32 logits (softmax statistics must be taken on
    logits shifted by their max; unshifted, the entropy's two terms cancel)."""
    z = torch.tensor([[0.0, -3e38, 1.0, 2.0, -1e30, 0.5],
                      [1e30, 1e30 - 5e23, 3e29, -3e38, 1e30, 0.0],
                      [1e4, 1e4 - 3, 1e4 - 80, 1e4 - 90, 1e4 - 200, 1e4 - 1],
                      [-1e6, -1e6 + 0.5, -1e6 - 2, -1e6 + 1, -1e6, -1e6 - 0.25],
                      [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    out = ek.exit_score(z, torch.eye(6), None, policy=policy, threshold=0.5,
                        check_finite=False, backend=any_backend)
    p = torch.softmax(z.double(), dim=1)
    if policy == "max_prob":
        truth = p.amax(dim=1)
    else:
        truth = 1 + (p * p.log().nan_to_num(neginf=0.0)).sum(dim=1) / math.log(6)
    torch.testing.assert_close(out.score.double(), truth, rtol=0, atol=2e-6)
    assert out.pred.tolist() == [3, 0, 0, 3, 0]


@pytest.mark.parametrize("c", (2, 3, 5, 7, 10, 13, 100, 1000))
def test_entropy_score_of_uniform_rows_is_zero_not_below(any_backend: str, c: int) -> None:
    """Uniform logits have H = log C; in float32, H rounds a few ulp above log C for many C
    (C = 7: 1 - H / log C = -1.2e-7), a score below [0, 1] that a fitted threshold of 0
    would then have to undercut. Every backend clamps at 0, so threshold 0 takes them all
    (a backend may still round a few ulp above 0); NaN rows stay NaN."""
    z = torch.zeros(4, c)
    z[1] = 2.5  # uniform at any offset
    z[2, 0] = 1e-7  # next to uniform
    z[3, 0] = math.nan
    out = ek.exit_score(z, torch.eye(c), None, policy="entropy", threshold=0.0,
                        check_finite=False, backend=any_backend)
    assert all(0.0 <= v < 1e-6 for v in out.score[:2].tolist())
    assert 0.0 <= float(out.score[2]) < 1e-5
    assert math.isnan(float(out.score[3]))
    assert out.exit_mask.tolist() == [True, True, True, False]


@pytest.mark.parametrize("pooled", (None, 5))
def test_autocast_leaves_the_classifier_in_fp32(any_backend: str, pooled: int | None) -> None:
    """Under ``torch.autocast`` (which would run a GEMM inside the op in bf16, ~1e-2 off)
    both ops give the float64 logits of their fp32 inputs to fp32 rounding."""
    g = torch.Generator().manual_seed(7)
    shape = (33, 64) if pooled is None else (33, 64, pooled)
    feats, weight, bias = (torch.randn(*shape, generator=g), torch.randn(5, 64, generator=g),
                           torch.randn(5, generator=g))
    pooled_feats = feats.double() if pooled is None else feats.double().mean(dim=2)
    want = pooled_feats @ weight.double().t() + bias.double()
    out_logits = torch.zeros(40, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = ek.exit_score(feats, weight, bias, policy="max_prob", threshold=0.5,
                              backend=any_backend)
        ek.exit_score_write(feats, weight, bias, policy="max_prob", threshold=0.5,
                            is_last=True, row_index=torch.arange(33), exit_index=0,
                            out_logits=out_logits, out_score=torch.zeros(40),
                            out_exit=torch.full((40,), -1), backend=any_backend)
    for got in (plain.logits, out_logits[:33]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(plain.score.double(), torch.softmax(want, 1).amax(1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ("entropy", "max_prob", "eenet"))
def test_never_exit_closes_an_exit_with_saturated_scores(any_backend: str, policy: str) -> None:
    """A softmax (or the scheduler's sigmoid) saturated in float32 scores exactly 1.0, so a
    threshold of 1.0 lets those rows exit; NEVER_EXIT (the smallest float32 above 1) lets no
    row exit but at the last exit, and it is accepted by every backend."""
    z = torch.tensor([[60.0, 0.0, -5.0], [0.0, 90.0, 1.0], [0.3, 0.1, 0.2]])
    # eenet: sigmoid(60 max p - 40), 1.0 in float32 for the two saturated rows
    eenet = {"prev_scores": torch.empty(3, 0), "sched_weight": torch.tensor([0.0] * 3 + [
        60.0, 0.0]), "sched_bias": -40.0} if policy == "eenet" else {}

    def run(threshold: float, is_last: bool = False) -> ek.ExitScore:
        return ek.exit_score(z, torch.eye(3), None, policy=policy, threshold=threshold,
                             is_last=is_last, backend=any_backend, **eenet)

    assert float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))) == ek.NEVER_EXIT
    at_one = run(1.0)
    assert at_one.score[:2].tolist() == [1.0, 1.0] and at_one.exit_mask.tolist() == [
        True, True, False]
    closed = run(ek.NEVER_EXIT)
    assert closed.exit_mask.tolist() == [False] * 3 and closed.keep.tolist() == [True] * 3
    assert run(ek.NEVER_EXIT, is_last=True).exit_mask.tolist() == [True] * 3


@pytest.mark.parametrize("op", ("exit_score", "exit_score_write"))
def test_check_finite_rejects_nonfinite_rows(any_backend: str, op: str) -> None:
    """check_finite=True names the NaN/inf feature rows, before any kernel runs."""
    feats, weight, bias = make_head(7, 4, 3, torch.float32, None, True)
    for pooled in (None, 2):
        x = inject_nonfinite(feats if pooled is None else feats[:, :, None].expand(7, 4, 2))
        extra: dict[str, Any] = {}
        fn = ek.exit_score
        if op == "exit_score_write":
            fn = ek.exit_score_write
            extra = {"row_index": torch.arange(7), "exit_index": 0,
                     "out_logits": torch.zeros(7, 3), "out_score": torch.zeros(7),
                     "out_exit": torch.zeros(7, dtype=torch.int64)}
        with pytest.raises(ValueError, match=rf"eenet\.{op}: feats .*rows \[2, 5\]"):
            fn(x, weight, bias, policy="max_prob", threshold=0.0, check_finite=True,
               backend=any_backend, **extra)


def nonfinite_head(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N=7 random 2-D feats with a NaN in row 2 and an inf in row 5."""
    feats, weight, bias = make_head(7, 4, 3, dtype, None, True)
    return inject_nonfinite(feats), weight, bias


@pytest.mark.parametrize("out_kind", OUT_KINDS, ids=dtype_id)
def test_exit_score_write_nonfinite_positions(any_backend: str, out_kind: torch.dtype) -> None:
    """NaN/inf rows are written only at the last exit (NaN score); never before."""
    torch.manual_seed(23)
    feats, weight, bias = nonfinite_head(FEATS_FOR_OUT[out_kind])
    row_index = torch.tensor([9, 0, 4, 1, 8, 2, 6])
    for is_last in (False, True):
        bufs = sentinel_buffers(10, 3, out_kind, torch.int32)
        out = call_write(any_backend, feats, weight, bias, Case("max_prob"), {}, 0.0, is_last,
                         row_index, bufs, 1, False)
        _, out_score, out_exit = bufs
        check_written(out, bufs, row_index, 1, is_last, f"is_last={is_last}")
        # rows 2 and 5 (NaN, inf) map to positions 4 and 2
        if is_last:
            assert bool(out_score[[4, 2]].isnan().all())
            assert out_exit[[4, 2]].tolist() == [1, 1]
        else:
            assert out_score[[4, 2]].tolist() == [SCORE_SENTINEL] * 2
            assert out_exit[[4, 2]].tolist() == [INDEX_SENTINEL] * 2
        # positions never addressed by row_index stay untouched; finite rows all exit
        assert out_score[[3, 5, 7]].tolist() == [SCORE_SENTINEL] * 3
        assert out_exit[[3, 5, 7]].tolist() == [INDEX_SENTINEL] * 3
        assert bool((out_exit[[9, 0, 1, 8, 6]] == 1).all())


@pytest.mark.parametrize("out_kind", OUT_KINDS, ids=dtype_id)
def test_exit_score_write_none_exit(any_backend: str, out_kind: torch.dtype) -> None:
    """Uniform logits (max_prob 1/C) at threshold 1.0: nothing is written at all."""
    torch.manual_seed(29)
    feats, weight, bias = constant_logit_head(64, 5, FEATS_FOR_OUT[out_kind], 0.0)
    out_logits, out_score, out_exit = sentinel_buffers(100, 5, out_kind, torch.int64)
    before = (out_logits.clone(), out_score.clone(), out_exit.clone())
    out = ek.exit_score_write(feats, weight, bias, row_index=torch.randperm(100)[:64],
                              exit_index=2, out_logits=out_logits, out_score=out_score,
                              out_exit=out_exit, policy="max_prob", threshold=1.0,
                              backend=any_backend)
    assert not bool(out.exit_mask.any()) and bool(out.keep.all())
    torch.testing.assert_close(out.score, torch.full((64,), 0.2), atol=1e-6, rtol=0)
    for got, want in zip((out_logits, out_score, out_exit), before, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("out_kind", (torch.int64, torch.int32), ids=dtype_id)
def test_exit_score_write_prediction_ties(any_backend: str, out_kind: torch.dtype) -> None:
    """Tied logits: the written prediction is the first maximum, like torch.argmax."""
    weight = torch.eye(4)  # logits = feats
    feats = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, -1.0], [3.0, -1.0, 0.0, 3.0]])
    out_logits, out_score, out_exit = sentinel_buffers(5, 4, out_kind, torch.int64)
    out = ek.exit_score_write(feats, weight, row_index=torch.tensor([4, 0, 2]), exit_index=1,
                              out_logits=out_logits, out_score=out_score, out_exit=out_exit,
                              policy="max_prob", threshold=0.0, backend=any_backend)
    assert out_logits.tolist() == [1, INDEX_SENTINEL, 0, INDEX_SENTINEL, 0]
    assert out.pred.tolist() == [0, 1, 0]
    e = math.exp
    want = [0.25, e(2) / (1 + 2 * e(2) + e(-1)), e(3) / (2 * e(3) + e(-1) + 1)]
    torch.testing.assert_close(out_score[[4, 0, 2]], torch.tensor(want), atol=1e-6, rtol=0)
