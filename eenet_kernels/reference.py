"""Reference semantics of the ``eenet`` ops in plain torch: the oracle every backend matches.

Shapes: N active rows, D features, S pooled positions, C classes, k earlier exits,
N0 rows of the original batch (output buffers).

All arithmetic happens in float32 whatever the input dtype (fp16/bf16 inputs are upcast),
also under ``torch.autocast`` (which would otherwise run the matmuls in half precision), so
the reference is the "exact" side of every tolerance in the tests.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from . import checks


def autocast_on(t: torch.Tensor) -> bool:
    """Whether ``torch.autocast`` is on for ``t``'s device type (False for a device type it
    does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:
        return False


def fp32_math(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """A context in which torch ops on ``t``'s device type keep float32 inputs in float32:
    autocast switched off there where it is on."""
    if autocast_on(t):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def exit_logits(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """Exit classifier in fp32: feats (N, D) or (N, D, S) mean-pooled over S -> (N, C) float32."""
    with fp32_math(feats):
        x = feats.float()
        if x.dim() == 3:
            x = x.mean(dim=2)
        logits = x @ weight.float().t()
        if bias is not None:
            logits = logits + bias.float()
    return logits


def softmax_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p (N, C), max p (N,), conf = 1 - H(p) / log C (N,)) of fp32 logits (N, C).

    H is taken on the logits shifted by their row max, H = logsumexp(t) - sum p t: exact for
    logits of any magnitude (unshifted, both terms are ~max z and cancel), and no log of a
    zero probability. A class whose probability underflows to 0 adds nothing to the sum,
    also where its shifted logit is -inf (finite logits whose spread exceeds the float32
    range). Rows with a NaN/inf logit give NaN conf. conf is clamped at 0: for a (nearly)
    uniform row, float32 rounding puts H a few ulp above log C, which would give a score
    below the [0, 1] range thresholds are set and checked in.
    """
    shifted = logits - logits.amax(dim=1, keepdim=True)
    p = torch.softmax(logits, dim=1)
    p_t = torch.where(p > 0, p * shifted, torch.zeros_like(p))
    entropy = torch.logsumexp(shifted, dim=1) - p_t.sum(dim=1)
    conf = (1.0 - entropy / math.log(logits.shape[1])).clamp_min(0.0)  # NaN stays NaN
    return p, p.max(dim=1).values, conf


def _required(t: torch.Tensor | None, name: str, policy: str) -> torch.Tensor:
    if t is None:
        raise ValueError(f"eenet.policy_score: {name} is required for policy {policy!r}")
    return t


def policy_score(
    logits: torch.Tensor,
    policy: str,
    prev_scores: torch.Tensor | None = None,
    prev_preds: torch.Tensor | None = None,
    sched_weight: torch.Tensor | None = None,
    sched_bias: float = 0.0,
    use_vote: bool = False,
) -> torch.Tensor:
    """Per-row score (N,) float32 of a policy, from fp32 logits (N, C).

    - max_prob: max softmax probability.
    - entropy: 1 - H(p) / log C (1 = certain, 0 = uniform).
    - patience: length of the streak of earlier exits (k-1, k-2, ...) whose argmax equals
      this exit's argmax (PABEE's counter); 0 at the first exit.
    - eenet: sigmoid(w . [p, max p, conf, q_1..q_k, vote] + b) with vote the fraction of
      earlier exits agreeing with this exit's argmax (only when ``use_vote``; at the first
      exit, k = 0, the vote term is absent rather than 0 times its weight).
    Rows with a NaN/inf logit get a NaN score.
    """
    with fp32_math(logits):
        score = _score(logits, policy, prev_scores, prev_preds, sched_weight, sched_bias,
                       use_vote)
    finite = torch.isfinite(logits).all(dim=1)
    return torch.where(finite, score, torch.full_like(score, math.nan))


def _score(logits: torch.Tensor, policy: str, prev_scores: torch.Tensor | None,
           prev_preds: torch.Tensor | None, sched_weight: torch.Tensor | None,
           sched_bias: float, use_vote: bool) -> torch.Tensor:
    """:func:`policy_score` before the non-finite rows are set to NaN."""
    p, max_p, conf = softmax_stats(logits)
    pred = logits.argmax(dim=1)

    if policy == "max_prob":
        score = max_p
    elif policy == "entropy":
        score = conf
    elif policy == "patience":
        score = agreement_streak(pred, _required(prev_preds, "prev_preds", policy)).float()
    elif policy == "eenet":
        prev_scores = _required(prev_scores, "prev_scores", policy)
        weight = _required(sched_weight, "sched_weight", policy)
        parts = [p, max_p[:, None], conf[:, None], prev_scores]
        k = prev_scores.shape[1]
        if use_vote and k > 0:
            votes = vote_fraction(pred, _required(prev_preds, "prev_preds", policy))
            parts.append(votes[:, None])
        elif use_vote:
            weight = weight[:-1]
        features = torch.cat(parts, dim=1)
        score = torch.sigmoid(features @ weight + sched_bias)
    else:
        raise ValueError(f"eenet.policy_score: unknown policy {policy!r}")
    return score


def agreement_streak(pred: torch.Tensor, prev_preds: torch.Tensor) -> torch.Tensor:
    """(N,) int64: how many of the latest earlier exits, counted back from the newest, agree."""
    agree = prev_preds.long() == pred[:, None]
    # cumulative product from the newest earlier exit backwards stops at the first mismatch
    return agree.flip(1).long().cumprod(dim=1).sum(dim=1)


def vote_fraction(pred: torch.Tensor, prev_preds: torch.Tensor) -> torch.Tensor:
    """(N,) float32: fraction of earlier exits whose argmax equals ``pred``; 0 when k = 0."""
    k = prev_preds.shape[1]
    if k == 0:
        return torch.zeros(pred.shape, dtype=torch.float32, device=pred.device)
    return (prev_preds.long() == pred[:, None]).float().sum(dim=1) / k


ExitResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _decide(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, policy: str,
            threshold: float, is_last: bool, prev_scores: torch.Tensor | None,
            prev_preds: torch.Tensor | None, sched_weight: torch.Tensor | None,
            sched_bias: float, use_vote: bool) -> ExitResult:
    """The fused computation on checked arguments: see :func:`exit_score`."""
    logits = exit_logits(feats, weight, bias)
    score = policy_score(logits, policy, prev_scores, prev_preds, sched_weight, sched_bias,
                         use_vote)
    if is_last:
        exit_mask = torch.ones(score.shape, dtype=torch.bool, device=score.device)
    else:
        # in float32 against the smallest float32 >= threshold: exactly score >= threshold
        exit_mask = score >= checks.threshold_as_float32(threshold)  # NaN compares False
    return logits, score, exit_mask, logits.argmax(dim=1), ~exit_mask


@torch.no_grad()
def exit_score(
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    policy: str,
    threshold: float,
    is_last: bool = False,
    prev_scores: torch.Tensor | None = None,
    prev_preds: torch.Tensor | None = None,
    sched_weight: torch.Tensor | None = None,
    sched_bias: float = 0.0,
    use_vote: bool = False,
) -> ExitResult:
    """Fused exit head + confidence + policy score + decision.

    Returns ``logits`` (N, C) float32, ``score`` (N,) float32, ``exit_mask`` (N,) bool,
    ``pred`` (N,) int64 (the argmax of the logits, as ``torch.argmax``: first maximum, a NaN
    counting as the maximum) and ``keep`` (N,) bool (= ~exit_mask, the rows that go on):
    ``exit_mask = is_last | (score >= threshold)``; a row with NaN/inf logits never exits
    before the last exit (its score is NaN). The ops are inference ops: no output requires
    grad.
    """
    checks.check_exit_score(feats, weight, bias, policy, threshold, prev_scores, prev_preds,
                            sched_weight, use_vote, sched_bias=sched_bias)
    checks.check_exit_values("exit_score", sched_weight if policy == "eenet" else None)
    return _decide(feats, weight, bias, policy, threshold, is_last, prev_scores, prev_preds,
                   sched_weight, sched_bias, use_vote)


@torch.no_grad()
def exit_score_write(
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    policy: str,
    threshold: float,
    is_last: bool = False,
    prev_scores: torch.Tensor | None = None,
    prev_preds: torch.Tensor | None = None,
    sched_weight: torch.Tensor | None = None,
    sched_bias: float = 0.0,
    use_vote: bool = False,
    *,
    row_index: torch.Tensor,
    exit_index: int,
    out_logits: torch.Tensor,
    out_score: torch.Tensor,
    out_exit: torch.Tensor,
) -> ExitResult:
    """:func:`exit_score`, then write the exiting rows' results at their original positions.

    For each row i with ``exit_mask[i]``, at ``r = row_index[i]``: ``out_logits[r]`` gets the
    logits (cast to its dtype) when it is (N0, C), or the argmax when it is (N0,) integer;
    ``out_score[r] = score[i]``; ``out_exit[r] = exit_index``. Other rows are not touched.
    ``row_index`` holds distinct values in [0, N0); no output may overlap an input.
    """
    op = "exit_score_write"
    checks.check_exit_score(feats, weight, bias, policy, threshold, prev_scores, prev_preds,
                            sched_weight, use_vote, op=op, sched_bias=sched_bias)
    checks.check_exit_write(feats, weight, row_index, exit_index, out_logits, out_score, out_exit,
                            write_inputs(bias, prev_scores, prev_preds, sched_weight))
    checks.check_exit_values(op, sched_weight if policy == "eenet" else None, row_index,
                             out_score.shape[0])
    result = _decide(feats, weight, bias, policy, threshold, is_last, prev_scores, prev_preds,
                     sched_weight, sched_bias, use_vote)
    logits, score, exit_mask, pred = result[:4]
    rows = row_index[exit_mask].long()
    if out_logits.dim() == 2:
        out_logits[rows] = logits[exit_mask].to(out_logits.dtype)
    else:
        out_logits[rows] = pred[exit_mask].to(out_logits.dtype)
    out_score[rows] = score[exit_mask]
    out_exit[rows] = exit_index
    return result


def write_inputs(bias: torch.Tensor | None, prev_scores: torch.Tensor | None,
                 prev_preds: torch.Tensor | None, sched_weight: torch.Tensor | None
                 ) -> list[tuple[str, torch.Tensor | None]]:
    """The optional inputs of ``exit_score_write`` by name, for its aliasing check."""
    return [("bias", bias), ("prev_scores", prev_scores), ("prev_preds", prev_preds),
            ("sched_weight", sched_weight)]


@torch.no_grad()
def compact_out(keep: torch.Tensor, src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor]
                ) -> torch.Tensor:
    """Stable compaction: the rows of every ``src[i]`` where ``keep`` is true (any non-zero
    byte), in order, go to the first n rows of ``dst[i]``; later rows of ``dst[i]`` are
    untouched.

    keep (N,) bool; src[i] (N, ...) any dtype; dst[i] (>= N, ...) same dtype, contiguous, not
    overlapping keep, any src or another dst. Returns n as a 0-dim int64 tensor on keep's
    device.
    """
    checks.check_compact(keep, src, dst, op="compact_out")
    return _compact_into(keep, src, dst)


def _compact_into(keep: torch.Tensor, src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor]
                  ) -> torch.Tensor:
    rows = (keep.view(torch.uint8) != 0).nonzero().flatten()
    n = rows.shape[0]
    for s, d in zip(src, dst, strict=True):
        d[:n] = s[rows]
    return torch.tensor(n, dtype=torch.int64, device=keep.device)


@torch.no_grad()
def compact(keep: torch.Tensor, src: Sequence[torch.Tensor]
            ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Functional :func:`compact_out`: new (N, ...) buffers whose rows >= n are zero."""
    checks.check_compact(keep, src, None)
    kept = [torch.zeros_like(s, memory_format=torch.contiguous_format) for s in src]
    return kept, _compact_into(keep, src, kept)
