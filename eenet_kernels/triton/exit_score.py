"""Triton kernel of ``eenet::exit_score`` / ``eenet::exit_score_write``.

One program per tile of ``BLOCK_N`` rows does everything the op needs for those rows:

1. logits: feats (N, D) or (N, D, S) (mean-pooled over S on the fly) times weight (C, D)^T
   plus bias, with fp32 accumulation (``tl.dot`` over D tiles), one (BLOCK_N, BLOCK_C) tile
   of classes at a time; each tile is written to the (N, C) float32 logits output;
2. softmax statistics, online across the C tiles (running max m, sum of e = exp(z - m),
   sum of e * (z - m), and for EENet the sum of e * w_c): no probability is ever stored;
3. argmax with ``torch.argmax`` semantics (first maximum, a NaN counts as the maximum) and
   the row's finiteness;
4. the policy score (``POLICY`` is a constexpr: one body for all policies), the decision
   ``is_last or score >= threshold`` (non-finite rows: NaN score, exit only at the last exit);
5. for ``exit_score_write``, the scatter of the exiting rows' logits (or argmax), score and
   exit index to their original positions ``row_index[i]``.

With few row tiles for the GPU's SMs (small N) and several C tiles, the classes are split
instead (:func:`class_chunk`): a first launch runs one program per (row tile, chunk of C
tiles) doing steps 1-3 for its classes and storing the chunk's statistics (N, chunks, 8),
a second runs one program per row tile that merges them in chunk order (the same merge as
across tiles) and does steps 4-5. Both forms come from one kernel body (``PHASE``).

The semantics are those of :mod:`eenet_kernels.reference`; arithmetic is fp32 throughout.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .. import checks, reference

POLICY_IDS: dict[str, int] = {"max_prob": 0, "entropy": 1, "patience": 2, "eenet": 3}
# out_logits kinds of the write variant
_WRITE_NONE, _WRITE_LOGITS, _WRITE_PREDS = 0, 1, 2


@triton.jit
def _bf16_rtne(x):
    """fp32 -> bf16 rounded to nearest even, as the GPU casts; the interpreter's own cast
    does not round that way. NaN stays a quiet NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _merge_stats(m, s, t, w, best, idx, nan, fin, m2, s2, t2, w2, best2, idx2, nan2, fin2):
    """Merge softmax statistics of two disjoint class ranges, the second after the first.

    Per row: m the max of the finite logits (-inf if none), s = sum e, t = sum e (z - m), w =
    sum e sched_w with e = exp(z - m) over the finite logits; best / idx / nan the argmax state
    (value, index, saw a NaN: the first NaN, else the first maximum, wins); fin = 1 while every
    logit is finite. Empty ranges (s = 0) contribute nothing and never make a NaN.
    """
    m_new = tl.maximum(m, m2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    d1 = tl.where(s > 0, m - m_safe, 0.0)
    d2 = tl.where(s2 > 0, m2 - m_safe, 0.0)
    a1 = tl.where(s > 0, tl.exp(d1), 0.0)
    a2 = tl.where(s2 > 0, tl.exp(d2), 0.0)
    # a range whose weight underflowed adds nothing (d may be -inf there: 0 * -inf is NaN)
    t_new = (tl.where(a1 > 0, a1 * (t + d1 * s), 0.0)
             + tl.where(a2 > 0, a2 * (t2 + d2 * s2), 0.0))
    s_new = a1 * s + a2 * s2
    w_new = a1 * w + a2 * w2
    take = (nan == 0) & ((nan2 != 0) | (best2 > best))
    idx_new = tl.where(take, idx2, idx)
    best_new = tl.where(take, best2, best)
    return (m_new, s_new, t_new, w_new, best_new, idx_new, nan | nan2,
            tl.minimum(fin, fin2))


@triton.jit
def _exit_score_kernel(
    feats_ptr, stride_fn, stride_fd, stride_fs,
    w_ptr, stride_wc, stride_wd,
    bias_ptr, stride_b,
    logits_ptr, score_ptr, exit_ptr, pred_ptr, keep_ptr,
    prev_scores_ptr, stride_qn, stride_qk,
    prev_preds_ptr, stride_pn, stride_pk,
    sched_w_ptr, sched_bias,
    row_index_ptr, out_logits_ptr, out_score_ptr, out_exit_ptr, exit_index, n0,
    stats_ptr, istats_ptr, n_chunks, chunk_c,
    threshold, inv_s, inv_log_c,
    N, D, C, S, K,
    POLICY: tl.constexpr, IS_LAST: tl.constexpr, HAS_BIAS: tl.constexpr, POOL: tl.constexpr,
    USE_VOTE: tl.constexpr, WRITE: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr,
    PHASE: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # PHASE 0: one program per row tile does everything, all classes in turn.
    # PHASE 1 (split over classes, for parallelism): program (row tile, chunk) computes the
    # logits and softmax statistics of classes [chunk * chunk_c, ...) and stores the
    # statistics to stats (N, n_chunks, 5) fp32 / istats (N, n_chunks, 3) int32.
    # PHASE 2 (the second launch of a split): one program per row tile merges the chunks'
    # statistics, then scores, decides and writes as PHASE 0 does.
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    cols0 = tl.arange(0, BLOCK_C)
    ds0 = tl.arange(0, BLOCK_D)
    NEG_INF: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 2**30

    m = tl.full([BLOCK_N], NEG_INF, tl.float32)      # running max of the finite logits
    sum_e = tl.zeros([BLOCK_N], tl.float32)           # sum exp(z - m)
    sum_et = tl.zeros([BLOCK_N], tl.float32)          # sum exp(z - m) * (z - m)
    sum_ew = tl.zeros([BLOCK_N], tl.float32)          # sum exp(z - m) * sched_w[c] (eenet)
    best = tl.full([BLOCK_N], NEG_INF, tl.float32)    # argmax state: value, index, saw NaN
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    best_nan = tl.zeros([BLOCK_N], tl.int32)
    finite = tl.full([BLOCK_N], 1, tl.int32)
    # the logits of the last class tile, still in registers when it is the only one
    z_tile = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)

    if PHASE == 2:
        for j in range(0, n_chunks):
            f = stats_ptr + (rows64 * n_chunks + j) * 5
            g = istats_ptr + (rows64 * n_chunks + j) * 3
            m, sum_e, sum_et, sum_ew, best, best_idx, best_nan, finite = _merge_stats(
                m, sum_e, sum_et, sum_ew, best, best_idx, best_nan, finite,
                tl.load(f, mask=row_ok, other=NEG_INF), tl.load(f + 1, mask=row_ok, other=0.0),
                tl.load(f + 2, mask=row_ok, other=0.0), tl.load(f + 3, mask=row_ok, other=0.0),
                tl.load(f + 4, mask=row_ok, other=NEG_INF), tl.load(g, mask=row_ok, other=0),
                tl.load(g + 1, mask=row_ok, other=0), tl.load(g + 2, mask=row_ok, other=1))
    else:
        c_begin = 0
        c_end = C
        if PHASE == 1:
            c_begin = tl.program_id(1) * chunk_c
            c_end = tl.minimum(c_begin + chunk_c, C)
        for c0 in range(c_begin, c_end, BLOCK_C):
            cols = c0 + cols0
            col_ok = cols < c_end
            cols64 = cols.to(tl.int64)
            acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + ds0
                d_ok = ds < D
                ds64 = ds.to(tl.int64)  # offsets in int64: strides times indices pass 2^31
                x_ptrs = feats_ptr + rows64[:, None] * stride_fn + ds64[None, :] * stride_fd
                x_mask = row_ok[:, None] & d_ok[None, :]
                w = tl.load(w_ptr + cols64[None, :] * stride_wc + ds64[:, None] * stride_wd,
                            mask=d_ok[:, None] & col_ok[None, :], other=0.0)
                if POOL:
                    x = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                    x_s = x_ptrs  # stepped by the stride: no index * stride product to overflow
                    for _ in range(0, S):
                        x += tl.load(x_s, mask=x_mask, other=0.0).to(tl.float32)
                        x_s += stride_fs
                    # the pooled mean stays fp32 (as in the reference): an fp32 product too
                    acc = tl.dot(x * inv_s, w.to(tl.float32), acc, input_precision="ieee")
                else:
                    x = tl.load(x_ptrs, mask=x_mask, other=0.0)
                    if UPCAST:
                        # the interpreter's dot cannot multiply bf16 operands (uint16 there)
                        acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc,
                                     input_precision="ieee")
                    else:
                        acc = tl.dot(x, w, acc, input_precision="ieee")
            z = acc
            if HAS_BIAS:
                z += tl.load(bias_ptr + cols64 * stride_b, mask=col_ok,
                             other=0.0).to(tl.float32)[None, :]
            tl.store(logits_ptr + rows64[:, None] * C + cols[None, :], z,
                     mask=row_ok[:, None] & col_ok[None, :])
            z_tile = z

            # this tile's statistics: argmax (first maximum; the first NaN wins over all),
            # finiteness, softmax sums over its finite entries relative to its own max
            is_nan = z != z
            is_fin = tl.abs(z) < float("inf")
            t_fin = tl.min(tl.where(col_ok[None, :], is_fin.to(tl.int32), 1), axis=1)
            nan_idx = tl.min(tl.where(is_nan & col_ok[None, :], cols[None, :], BIG), axis=1)
            z_num = tl.where(col_ok[None, :] & ~is_nan, z, NEG_INF)
            t_max = tl.max(z_num, axis=1)
            max_idx = tl.min(tl.where((z_num == t_max[:, None]) & col_ok[None, :],
                                      cols[None, :], BIG), axis=1)
            t_nan = nan_idx < BIG
            use = col_ok[None, :] & is_fin
            t_m = tl.max(tl.where(use, z, NEG_INF), axis=1)
            zd = tl.where(use, z - tl.where(t_m == NEG_INF, 0.0, t_m)[:, None], 0.0)
            e = tl.where(use, tl.exp(zd), 0.0)
            t_w = tl.zeros([BLOCK_N], tl.float32)
            if POLICY == 3:
                sw = tl.load(sched_w_ptr + cols, mask=col_ok, other=0.0)
                t_w = tl.sum(e * sw[None, :], axis=1)
            m, sum_e, sum_et, sum_ew, best, best_idx, best_nan, finite = _merge_stats(
                m, sum_e, sum_et, sum_ew, best, best_idx, best_nan, finite,
                t_m, tl.sum(e, axis=1), tl.sum(tl.where(e > 0, e * zd, 0.0), axis=1), t_w, t_max,
                tl.where(t_nan, nan_idx, max_idx), t_nan.to(tl.int32), t_fin)

    if PHASE == 1:
        f = stats_ptr + (rows64 * n_chunks + tl.program_id(1)) * 5
        g = istats_ptr + (rows64 * n_chunks + tl.program_id(1)) * 3
        tl.store(f, m, mask=row_ok)
        tl.store(f + 1, sum_e, mask=row_ok)
        tl.store(f + 2, sum_et, mask=row_ok)
        tl.store(f + 3, sum_ew, mask=row_ok)
        tl.store(f + 4, best, mask=row_ok)
        tl.store(g, best_idx, mask=row_ok)
        tl.store(g + 1, best_nan, mask=row_ok)
        tl.store(g + 2, finite, mask=row_ok)
    else:
        _score_decide_write(
            rows, row_ok, rows64, cols0, logits_ptr, score_ptr, exit_ptr, pred_ptr, keep_ptr,
            prev_scores_ptr, stride_qn, stride_qk, prev_preds_ptr, stride_pn, stride_pk,
            sched_w_ptr, sched_bias, row_index_ptr, out_logits_ptr, out_score_ptr,
            out_exit_ptr, exit_index, n0, threshold, inv_log_c, C, K,
            sum_e, sum_et, sum_ew, best_idx, finite, z_tile,
            POLICY, IS_LAST, USE_VOTE, WRITE, ROUND_BF16, PHASE == 0, ONE_TILE and PHASE == 0,
            BLOCK_N, BLOCK_C)


@triton.jit
def _score_decide_write(
    rows, row_ok, rows64, cols0, logits_ptr, score_ptr, exit_ptr, pred_ptr, keep_ptr,
    prev_scores_ptr, stride_qn, stride_qk, prev_preds_ptr, stride_pn, stride_pk,
    sched_w_ptr, sched_bias, row_index_ptr, out_logits_ptr, out_score_ptr,
    out_exit_ptr, exit_index, n0, threshold, inv_log_c, C, K,
    sum_e, sum_et, sum_ew, best_idx, finite, z_tile,
    POLICY: tl.constexpr, IS_LAST: tl.constexpr, USE_VOTE: tl.constexpr,
    WRITE: tl.constexpr, ROUND_BF16: tl.constexpr, SAME_PROGRAM_LOGITS: tl.constexpr,
    LOGITS_IN_REGISTERS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The policy score from the merged statistics, the decision, the score / exit / pred /
    keep stores and, for the write variant, the scatter of the exiting rows to
    ``row_index``. ``z_tile``: the row tile's logits when all C fit one class tile
    (``LOGITS_IN_REGISTERS``), written out directly instead of read back."""
    ok_e = sum_e > 0
    sum_e_safe = tl.where(ok_e, sum_e, 1.0)
    max_p = 1.0 / sum_e_safe
    # H = logsumexp(z) - sum p z = log(sum_e) - sum e (z - m) / sum_e
    conf = 1.0 - (tl.log(sum_e_safe) - sum_et / sum_e_safe) * inv_log_c
    conf = tl.where(conf < 0.0, 0.0, conf)  # the reference's clamp at 0; NaN stays NaN

    if POLICY == 2 or USE_VOTE:
        streak = tl.zeros([BLOCK_N], tl.int32)
        alive = tl.full([BLOCK_N], 1, tl.int32)
        agree = tl.zeros([BLOCK_N], tl.int32)
        for j in range(0, K):
            # newest earlier exit first: the streak stops at the first disagreement
            q = tl.load(prev_preds_ptr + rows64 * stride_pn + (K - 1 - j) * stride_pk,
                        mask=row_ok, other=-1)
            same = (q == best_idx.to(q.dtype)).to(tl.int32)
            alive = alive & same
            streak += alive
            agree += same

    if POLICY == 0:
        score = max_p
    elif POLICY == 1:
        score = conf
    elif POLICY == 2:
        score = streak.to(tl.float32)
    else:
        acc_s = sum_ew / sum_e_safe + sched_bias
        acc_s += max_p * tl.load(sched_w_ptr + C) + conf * tl.load(sched_w_ptr + C + 1)
        for j in range(0, K):
            q_s = tl.load(prev_scores_ptr + rows64 * stride_qn + j * stride_qk, mask=row_ok,
                          other=0.0)
            acc_s += q_s * tl.load(sched_w_ptr + C + 2 + j)
        if USE_VOTE:  # noqa: SIM102  (constexpr test apart from the runtime one)
            if K > 0:
                acc_s += agree.to(tl.float32) / K * tl.load(sched_w_ptr + C + 2 + K)
        score = 1.0 / (1.0 + tl.exp(-acc_s))
    score = tl.where((finite != 0) & ok_e, score, float("nan"))
    exits = row_ok if IS_LAST else row_ok & (score >= threshold)
    tl.store(score_ptr + rows, score, mask=row_ok)
    tl.store(exit_ptr + rows, exits.to(tl.uint8), mask=row_ok)
    tl.store(pred_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(keep_ptr + rows, (row_ok & ~exits).to(tl.uint8), mask=row_ok)

    if WRITE != 0:
        r = tl.load(row_index_ptr + rows, mask=exits, other=0).to(tl.int64)
        w_ok = exits & (r >= 0) & (r < n0)  # row_index values are checked by the launcher
        tl.store(out_score_ptr + r, score, mask=w_ok)
        k_exit = tl.zeros([BLOCK_N], tl.int64) + exit_index
        tl.store(out_exit_ptr + r, k_exit.to(out_exit_ptr.dtype.element_ty), mask=w_ok)
        if WRITE == 2:
            tl.store(out_logits_ptr + r, best_idx.to(out_logits_ptr.dtype.element_ty),
                     mask=w_ok)
        elif LOGITS_IN_REGISTERS:
            wm = w_ok[:, None] & (cols0 < C)[None, :]
            z = _bf16_rtne(z_tile) if ROUND_BF16 else z_tile
            tl.store(out_logits_ptr + r[:, None] * C + cols0[None, :],
                     z.to(out_logits_ptr.dtype.element_ty), mask=wm)
        else:
            # the decision needed every class: read the logits back (written earlier by
            # this program's threads, or by the first launch of a split)
            if SAME_PROGRAM_LOGITS:
                tl.debug_barrier()
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + cols0
                wm = w_ok[:, None] & (cols < C)[None, :]
                z = tl.load(logits_ptr + rows64[:, None] * C + cols[None, :], mask=wm)
                if ROUND_BF16:
                    z = _bf16_rtne(z)
                tl.store(out_logits_ptr + r[:, None] * C + cols[None, :],
                         z.to(out_logits_ptr.dtype.element_ty), mask=wm)


def _interpreted() -> bool:
    """True when ``TRITON_INTERPRET=1`` turned the kernel into an interpreted function."""
    return isinstance(_exit_score_kernel, InterpretedFunction)


def _quiet_interpreter(interpreted: bool) -> contextlib.AbstractContextManager:
    """The interpreter computes with numpy, which warns about the NaN/inf that non-finite
    rows legitimately produce; compiled kernels are silent about them."""
    if not interpreted:
        return contextlib.nullcontext()
    import numpy as np

    return np.errstate(invalid="ignore", over="ignore", divide="ignore")


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def block_sizes(n: int, d: int, c: int, dtype: torch.dtype, pooled: bool
                ) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_C, BLOCK_D, num_warps) for a problem; every block is >= 16 (tl.dot).

    Not timed on hardware yet. Chosen from sm_90 compiles of every policy / dtype / pooling
    variant: none of these spills registers. BLOCK_C covers C <= 128 in one tile (larger C
    loops over tiles, re-reading the row tile's feats from L2).
    """
    if _interpreted():  # few, large tiles: every interpreted op costs Python overhead
        return _pow2_clamp(n, 16, 64), _pow2_clamp(c, 16, 64), _pow2_clamp(d, 16, 64), 1
    block_c = _pow2_clamp(c, 16, 128)
    block_n = 16 if n <= 16 else 32
    block_d = 32 if dtype == torch.float32 or pooled else 64
    num_warps = 8 if block_n * block_c >= 4096 else 4
    return block_n, block_c, block_d, num_warps


def launch(
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
    write: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> reference.ExitResult:
    """Allocate the outputs and launch the kernel on checked arguments (the entry points
    below check them).

    Args: as :func:`exit_score`; ``write`` = (row_index (N,), exit_index, out_logits (N0, C)
    float or (N0,) int, out_score (N0,) float32, out_exit (N0,) int) for the write variant.
    Block sizes come from :func:`block_sizes` (tests patch it to force several tiles).

    Returns: logits (N, C) float32, score (N,) float32, exit_mask (N,) bool, pred (N,) int64,
    keep (N,) bool. No host syncs and no data-dependent branches (CUDA-graph capturable).
    """
    n, d = feats.shape[0], feats.shape[1]
    c = weight.shape[0]
    logits = feats.new_empty((n, c), dtype=torch.float32)
    score = feats.new_empty((n,), dtype=torch.float32)
    exit_mask = feats.new_empty((n,), dtype=torch.bool)
    pred = feats.new_empty((n,), dtype=torch.int64)
    keep = feats.new_empty((n,), dtype=torch.bool)
    if n == 0:
        return logits, score, exit_mask, pred, keep
    pooled = feats.dim() == 3
    s = feats.shape[2] if pooled else 1
    stride_fs = feats.stride(2) if pooled else 0
    pol = POLICY_IDS[policy]
    k = 0
    if pol == POLICY_IDS["eenet"] and prev_scores is not None and sched_weight is not None:
        k = prev_scores.shape[1]
        sched_weight = sched_weight.contiguous()
    elif prev_preds is not None:
        k = prev_preds.shape[1]
    if pol != POLICY_IDS["patience"] and not use_vote:
        prev_preds = None
    if pol != POLICY_IDS["eenet"]:
        prev_scores = sched_weight = None
    if write is None:
        row_index, exit_index, out_logits, out_score, out_exit = None, 0, None, None, None
        n0, write_kind = 0, _WRITE_NONE
    else:
        row_index, exit_index, out_logits, out_score, out_exit = write
        n0 = out_score.shape[0]
        write_kind = _WRITE_LOGITS if out_logits.dim() == 2 else _WRITE_PREDS
        row_index = row_index.contiguous()
    block_n, block_c, block_d, num_warps = block_sizes(n, d, c, feats.dtype, pooled)
    row_tiles = triton.cdiv(n, block_n)
    interpreted = _interpreted()
    chunk_c = class_chunk(row_tiles, c, block_c, None if interpreted else _sm_count(feats))
    n_chunks = triton.cdiv(c, chunk_c)
    stats = istats = None
    if n_chunks > 1:
        stats = feats.new_empty((n, n_chunks, 5), dtype=torch.float32)
        istats = feats.new_empty((n, n_chunks, 3), dtype=torch.int32)
    args = (
        feats, feats.stride(0), feats.stride(1), stride_fs,
        weight, weight.stride(0), weight.stride(1),
        bias, bias.stride(0) if bias is not None else 0,
        logits, score, exit_mask.view(torch.uint8), pred, keep.view(torch.uint8),
        prev_scores, prev_scores.stride(0) if prev_scores is not None else 0,
        prev_scores.stride(1) if prev_scores is not None else 0,
        prev_preds, prev_preds.stride(0) if prev_preds is not None else 0,
        prev_preds.stride(1) if prev_preds is not None else 0,
        sched_weight, float(sched_bias),
        row_index, out_logits, out_score, out_exit, int(exit_index), n0,
        stats, istats, n_chunks, chunk_c,
        checks.threshold_as_float32(threshold), 1.0 / s, 1.0 / math.log(c),
        n, d, c, s, k,
    )
    meta = {
        "POLICY": pol, "IS_LAST": bool(is_last), "HAS_BIAS": bias is not None, "POOL": pooled,
        "USE_VOTE": bool(use_vote), "WRITE": write_kind,
        "UPCAST": interpreted and feats.dtype == torch.bfloat16,
        "ROUND_BF16": (interpreted and out_logits is not None
                       and out_logits.dtype == torch.bfloat16),
        "ONE_TILE": c <= block_c,
        "BLOCK_N": block_n, "BLOCK_C": block_c, "BLOCK_D": block_d, "num_warps": num_warps,
    }
    with _quiet_interpreter(interpreted):
        if n_chunks == 1:
            _exit_score_kernel[(row_tiles,)](*args, PHASE=0, **meta)
        else:
            _exit_score_kernel[(row_tiles, n_chunks)](*args, PHASE=1, **meta)
            _exit_score_kernel[(row_tiles,)](*args, PHASE=2, **meta)
    return logits, score, exit_mask, pred, keep


def _sm_count(t: torch.Tensor) -> int:
    return torch.cuda.get_device_properties(t.device).multi_processor_count


def class_chunk(row_tiles: int, c: int, block_c: int, num_sms: int | None) -> int:
    """Classes per program: all C (one launch) when the row tiles alone give the GPU enough
    programs, else C split in chunks of whole BLOCK_C tiles so that row tiles x chunks fill
    about two waves (a second launch then merges the chunks' softmax statistics).

    Not timed on hardware yet (``bench.tune`` measures it). ``num_sms`` None: the
    interpreter, which never splits unless a test patches this function.
    """
    tiles = triton.cdiv(c, block_c)
    if num_sms is None or tiles == 1 or row_tiles >= num_sms:
        return c
    chunks = min(tiles, triton.cdiv(2 * num_sms, row_tiles))
    return triton.cdiv(tiles, chunks) * block_c


# ---------------------------------------------------------------------------------------
# Entry points with the reference's signatures: the CUDA kernels of eenet::exit_score and
# eenet::exit_score_write (registered by eenet_kernels.ops), and the debug override
# backend="triton" on CPU tensors under the interpreter.


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
) -> reference.ExitResult:
    """Triton :func:`eenet_kernels.reference.exit_score` (same arguments and results)."""
    checks.check_exit_score(feats, weight, bias, policy, threshold, prev_scores, prev_preds,
                            sched_weight, use_vote, sched_bias=sched_bias)
    checks.check_exit_values("exit_score", sched_weight if policy == "eenet" else None)
    return launch(feats, weight, bias, policy, threshold, is_last, prev_scores, prev_preds,
                  sched_weight, sched_bias, use_vote)


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
) -> reference.ExitResult:
    """Triton :func:`eenet_kernels.reference.exit_score_write` (same arguments and results).

    The value checks of ``row_index`` (range, distinct) and ``sched_weight`` (finite) run on
    CPU tensors only (the interpreter, as in the other CPU backends): on CUDA they would cost
    a host sync per stage, so there the kernel skips out-of-range rows instead of writing out
    of bounds, and duplicate row indices are the caller's contract (the engine's are distinct
    by construction).
    """
    op = "exit_score_write"
    checks.check_exit_score(feats, weight, bias, policy, threshold, prev_scores, prev_preds,
                            sched_weight, use_vote, op=op, sched_bias=sched_bias)
    checks.check_exit_write(feats, weight, row_index, exit_index, out_logits, out_score,
                            out_exit, reference.write_inputs(bias, prev_scores, prev_preds,
                                                             sched_weight))
    checks.check_exit_values(op, sched_weight if policy == "eenet" else None, row_index,
                             out_score.shape[0])
    return launch(feats, weight, bias, policy, threshold, is_last, prev_scores, prev_preds,
                  sched_weight, sched_bias, use_vote,
                  write=(row_index, exit_index, out_logits, out_score, out_exit))
