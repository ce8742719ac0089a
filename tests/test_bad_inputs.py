"""Bad inputs: every backend raises the documented exception with the documented message.

Messages start with ``eenet.<op>: `` and name the offending argument; dtype errors are
``TypeError``, out-of-range indices ``IndexError``, everything else ``ValueError``.

- ``test_reference_raises_documented_error``: the reference (``eenet_kernels/checks.py``)
  raises each case's literal type and message;
- ``test_backend_raises_like_reference``: every other backend (cpp: ``csrc/checks.h``;
  triton: the Python checks again, before its launch) raises exactly the reference's type
  and message string for the same input, case by case;
- valid empty inputs (N = 0) raise nothing on any backend.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import PARITY_BACKENDS, backend_param

import eenet_kernels as ek

N, D, C, N0, K = 4, 3, 5, 6, 2
EXIT_OPS = ("exit_score", "exit_score_write")
COMPACT_OPS = ("compact", "compact_out")
# the accepted thresholds of the probability-like policies, as the range errors state them
PROB_RANGE = "threshold must lie in [0, 1] (or be NEVER_EXIT, a closed exit)"


# ---------------------------------------------------------------------------------------
# Valid defaults; every case overrides a few of them.


def exit_defaults(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Valid arguments of exit_score_write (exit_score ignores the output ones)."""
    gen = torch.Generator().manual_seed(0)
    return {
        "feats": torch.randn(N, D, generator=gen).to(dtype),
        "weight": torch.randn(C, D, generator=gen).to(dtype),
        "bias": torch.randn(C, generator=gen).to(dtype),
        "policy": "max_prob",
        "threshold": 0.5,
        "row_index": torch.tensor([5, 0, 3, 1]),
        "exit_index": 1,
        "out_logits": torch.zeros(N0, C),
        "out_score": torch.zeros(N0),
        "out_exit": torch.zeros(N0, dtype=torch.int64),
    }


OUT_KEYS = ("row_index", "exit_index", "out_logits", "out_score", "out_exit")


def run_exit(op: str, backend: str, **over: Any) -> Any:
    """Call the public exit_score / exit_score_write with the defaults updated by ``over``."""
    args = {**exit_defaults(), **over}
    feats, weight, bias = args.pop("feats"), args.pop("weight"), args.pop("bias")
    if op == "exit_score":
        for key in OUT_KEYS:
            args.pop(key)
        return ek.exit_score(feats, weight, bias, backend=backend, **args)
    return ek.exit_score_write(feats, weight, bias, backend=backend, **args)


def run_compact(op: str, backend: str, keep: torch.Tensor | None = None,
                src: list[torch.Tensor] | None = None, dst: list[torch.Tensor] | None = None
                ) -> Any:
    """Call the public compact, functional (op 'compact') or out form (op 'compact_out')."""
    keep = torch.tensor([True, False, True, True]) if keep is None else keep
    src = [torch.zeros(N, 2), torch.arange(N)] if src is None else src
    if op == "compact":
        return ek.compact(keep, src, backend=backend)
    dst = [torch.zeros(N, 2), torch.zeros(N, dtype=torch.int64)] if dst is None else dst
    return ek.compact(keep, src, out=dst, backend=backend)


# ---------------------------------------------------------------------------------------
# The cases.


@dataclass(frozen=True)
class Case:
    """One bad input: ``call(backend)`` must raise ``exc`` whose first line is ``message``
    (or starts with it when ``exact`` is False)."""

    id: str
    op: str
    call: Callable[[str], Any]
    exc: type[Exception]
    message: str
    exact: bool = True


def _exit_cases(op: str) -> list[Case]:
    def case(id_: str, exc: type[Exception], message: str, exact: bool = True,
             **over: Callable[[], Any]) -> Case:
        def call(backend: str) -> Any:
            return run_exit(op, backend, **{k: v() for k, v in over.items()})

        return Case(f"{op}-{id_}", op, call, exc, f"eenet.{op}: {message}", exact)

    def preds(n: int = N, k: int = K, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.zeros(n, k, dtype=dtype)

    def half() -> dict[str, torch.Tensor]:
        return exit_defaults(torch.float16)

    eenet = {"policy": lambda: "eenet", "prev_scores": lambda: torch.rand(N, K),
             "sched_weight": lambda: torch.randn(C + 2 + K)}
    vote = {**eenet, "use_vote": lambda: True, "prev_preds": preds,
            "sched_weight": lambda: torch.randn(C + 3 + K)}
    patience = {"policy": lambda: "patience", "threshold": lambda: 1.0, "prev_preds": preds}
    return [
        case("feats_1d", ValueError,
             "feats must be 2-D (N, D) or 3-D (N, D, S), got a 1-D tensor of shape (4,)",
             feats=lambda: torch.randn(N)),
        case("feats_4d", ValueError,
             "feats must be 2-D (N, D) or 3-D (N, D, S), got a 4-D tensor of shape (4, 3, 2, 2)",
             feats=lambda: torch.randn(N, D, 2, 2)),
        case("feats_int32", TypeError,
             "feats must have dtype in (float32, float16, bfloat16), got int32",
             feats=lambda: torch.ones(N, D, dtype=torch.int32)),
        case("feats_float64", TypeError,
             "feats must have dtype in (float32, float16, bfloat16), got float64",
             feats=lambda: torch.randn(N, D, dtype=torch.float64)),
        case("feats_s0", ValueError, "feats must have S >= 1 positions to pool over, got S = 0",
             feats=lambda: torch.randn(N, D, 0)),
        case("weight_d_mismatch", ValueError,
             "weight must have shape (C, 3) to match feats' D = 3, got (5, 4)",
             weight=lambda: torch.randn(C, D + 1)),
        case("weight_1d", ValueError, "weight must be 2-D (C, D), got a 1-D tensor of shape (3,)",
             weight=lambda: torch.randn(D)),
        case("weight_float64", TypeError, "weight must have dtype in (float32), got float64",
             weight=lambda: torch.randn(C, D, dtype=torch.float64)),
        case("weight_float32_for_half_feats", TypeError,
             "weight must have dtype in (float16), got float32",
             feats=lambda: half()["feats"], bias=lambda: half()["bias"]),
        case("c_1", ValueError, "weight must have C >= 2 classes, got C = 1",
             weight=lambda: torch.randn(1, D), bias=lambda: None),
        case("bias_short", ValueError, "bias must have shape (5,) to match weight, got (4,)",
             bias=lambda: torch.randn(C - 1)),
        case("bias_2d", ValueError, "bias must have shape (5,) to match weight, got (1, 5)",
             bias=lambda: torch.randn(1, C)),
        case("bias_float64", TypeError, "bias must have dtype in (float32), got float64",
             bias=lambda: torch.randn(C, dtype=torch.float64)),
        case("threshold_nan", ValueError, "threshold must be finite, got nan",
             threshold=lambda: math.nan),
        case("threshold_inf", ValueError, "threshold must be finite, got inf",
             threshold=lambda: math.inf),
        case("threshold_entropy_1.5", ValueError,
             f"{PROB_RANGE} for policy 'entropy', got 1.5",
             policy=lambda: "entropy", threshold=lambda: 1.5),
        case("threshold_max_prob_neg", ValueError,
             f"{PROB_RANGE} for policy 'max_prob', got -0.5",
             threshold=lambda: -0.5),
        case("threshold_max_prob_2", ValueError,
             f"{PROB_RANGE} for policy 'max_prob', got 2",
             threshold=lambda: 2),
        case("threshold_max_prob_long", ValueError,
             f"{PROB_RANGE} for policy 'max_prob', got 1.23456789",
             threshold=lambda: 1.23456789),
        case("threshold_just_above_never_exit", ValueError,
             f"{PROB_RANGE} for policy 'max_prob', got 1.00000024",
             threshold=lambda: 1.0 + 2.0**-22),
        case("threshold_patience_neg", ValueError,
             "threshold must be >= 0 for policy 'patience', got -1",
             **{**patience, "threshold": lambda: -1}),
        case("unknown_policy", ValueError,
             "policy must be one of ('max_prob', 'entropy', 'patience', 'eenet'), got 'pabee'",
             policy=lambda: "pabee"),
        case("use_vote_entropy", ValueError,
             "use_vote applies only to policy 'eenet', got policy 'entropy'",
             policy=lambda: "entropy", use_vote=lambda: True, prev_preds=preds),
        case("eenet_missing_prev_scores", ValueError,
             "prev_scores is required for policy 'eenet' (shape (N, k), k earlier exits)",
             **{**eenet, "prev_scores": lambda: None}),
        case("eenet_prev_scores_wrong_n", ValueError,
             "prev_scores must have N = 4 rows to match feats, got 3",
             **{**eenet, "prev_scores": lambda: torch.rand(N - 1, K)}),
        case("eenet_prev_scores_1d", ValueError,
             "prev_scores must be 2-D (N, k), got a 1-D tensor of shape (4,)",
             **{**eenet, "prev_scores": lambda: torch.rand(N)}),
        case("eenet_prev_scores_float64", TypeError,
             "prev_scores must have dtype in (float32), got float64",
             **{**eenet, "prev_scores": lambda: torch.rand(N, K, dtype=torch.float64)}),
        case("eenet_missing_sched_weight", ValueError,
             "sched_weight is required for policy 'eenet'",
             **{**eenet, "sched_weight": lambda: None}),
        case("eenet_sched_weight_length", ValueError,
             "sched_weight must have shape (9,) = C + 2 + k with C = 5, k = 2, got (8,)",
             **{**eenet, "sched_weight": lambda: torch.randn(C + 1 + K)}),
        case("eenet_vote_sched_weight_length", ValueError,
             "sched_weight must have shape (10,) = C + 2 + k + 1 (vote) with C = 5, k = 2, "
             "got (9,)",
             **{**vote, "sched_weight": lambda: torch.randn(C + 2 + K)}),
        case("eenet_vote_missing_prev_preds", ValueError,
             "prev_preds is required for the vote feature (shape (N, k), k earlier exits)",
             **{**vote, "prev_preds": lambda: None}),
        case("eenet_vote_prev_preds_k", ValueError,
             "prev_preds must have k = 2 columns to match prev_scores, got 3",
             **{**vote, "prev_preds": lambda: preds(k=K + 1)}),
        case("patience_missing_prev_preds", ValueError,
             "prev_preds is required for policy patience (shape (N, k), k earlier exits)",
             **{**patience, "prev_preds": lambda: None}),
        case("patience_prev_preds_wrong_n", ValueError,
             "prev_preds must have N = 4 rows to match feats, got 5",
             **{**patience, "prev_preds": lambda: preds(n=N + 1)}),
        case("patience_prev_preds_1d", ValueError,
             "prev_preds must be 2-D (N, k), got a 1-D tensor of shape (4,)",
             **{**patience, "prev_preds": lambda: torch.zeros(N, dtype=torch.int64)}),
        case("patience_prev_preds_float", TypeError,
             "prev_preds must have dtype in (int32, int64), got float32",
             **{**patience, "prev_preds": lambda: preds(dtype=torch.float32)}),
        case("eenet_sched_bias_nan", ValueError, "sched_bias must be finite in float32, got nan",
             **{**eenet, "sched_bias": lambda: math.nan}),
        case("eenet_sched_bias_beyond_float32", ValueError,
             "sched_bias must be finite in float32, got 1e+39",
             **{**eenet, "sched_bias": lambda: 1e39}),
        case("eenet_sched_weight_inf", ValueError,
             "sched_weight must be finite, got inf at position 2",
             **{**eenet, "sched_weight": lambda: torch.tensor([0.5, -1.0, math.inf, 0.0, 1.0,
                                                               2.0, 0.1, 0.2, 0.3])}),
        case("feats_sparse", ValueError,
             "feats must be a dense (strided) tensor, got layout sparse_coo",
             feats=lambda: torch.randn(N, D).to_sparse()),
        case("weight_sparse", ValueError,
             "weight must be a dense (strided) tensor, got layout sparse_coo",
             weight=lambda: torch.randn(C, D).to_sparse()),
    ]


def _feats_and_out_score() -> dict[str, Callable[[], Any]]:
    """feats and out_score views of one float32 buffer."""
    base = torch.randn(N * D)
    return {"feats": lambda: base.view(N, D), "out_score": lambda: base[:N0]}


def _two_storages(numel: int, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors of ``numel`` values with storages of their own over one buffer (as two
    ``torch.from_numpy`` or DLPack views of it are)."""
    buf = bytearray(numel * torch.empty((), dtype=dtype).element_size())
    a, b = torch.frombuffer(buf, dtype=dtype), torch.frombuffer(buf, dtype=dtype)
    assert a.untyped_storage()._cdata != b.untyped_storage()._cdata
    return a, b


def _feats_and_out_logits_of_one_buffer() -> dict[str, Callable[[], Any]]:
    """feats and out_logits over one buffer through two storages, out_logits one row on."""
    a, b = _two_storages(N0 * C + C)
    return {"feats": lambda: a[:N * D].view(N, D), "out_logits": lambda: b[C:].view(N0, C)}


def _bias_and_out_score() -> dict[str, Callable[[], Any]]:
    """bias and out_score sharing one element."""
    base = torch.zeros(C + N0 - 1)
    return {"bias": lambda: base[:C], "out_score": lambda: base[C - 1:]}


def _row_index_and_out_exit() -> dict[str, Callable[[], Any]]:
    """row_index (valid values) inside out_exit's storage."""
    base = torch.tensor([0, 0, 5, 0, 3, 1], dtype=torch.int64)
    return {"row_index": lambda: base[2:], "out_exit": lambda: base}


def _logits_and_score() -> dict[str, Callable[[], Any]]:
    """out_logits and out_score sharing their last / first elements."""
    base = torch.zeros(N0 * C + N0 - 1)
    return {"out_logits": lambda: base[:N0 * C].view(N0, C), "out_score": lambda: base[-N0:]}


def _write_cases() -> list[Case]:
    op = "exit_score_write"

    def case(id_: str, exc: type[Exception], message: str, exact: bool = True,
             **over: Callable[[], Any]) -> Case:
        def call(backend: str) -> Any:
            return run_exit(op, backend, **{k: v() for k, v in over.items()})

        return Case(f"{op}-{id_}", op, call, exc, f"eenet.{op}: {message}", exact)

    return [
        case("row_index_short", ValueError, "row_index must have shape (4,) to match feats, "
             "got (3,)", row_index=lambda: torch.tensor([5, 0, 3])),
        case("row_index_2d", ValueError, "row_index must have shape (4,) to match feats, "
             "got (4, 1)", row_index=lambda: torch.tensor([[5], [0], [3], [1]])),
        case("row_index_float", TypeError, "row_index must have dtype in (int32, int64), got "
             "float32", row_index=lambda: torch.tensor([5.0, 0.0, 3.0, 1.0])),
        case("row_index_too_large", IndexError,
             "row_index values must lie in [0, 6), got 6 at position 2",
             row_index=lambda: torch.tensor([5, 0, 6, 1], dtype=torch.int32)),
        case("row_index_negative", IndexError,
             "row_index values must lie in [0, 6), got -1 at position 2",
             row_index=lambda: torch.tensor([5, 0, -1, 1])),
        case("exit_index_negative", ValueError, "exit_index must lie in [0, "
             "9223372036854775807] (out_exit is int64), got -1", exit_index=lambda: -1),
        case("exit_index_beyond_int32", ValueError, "exit_index must lie in [0, 2147483647] "
             "(out_exit is int32), got 2147483648", exit_index=lambda: 2**31,
             out_exit=lambda: torch.zeros(N0, dtype=torch.int32)),
        case("exit_index_beyond_int64", ValueError, "exit_index must lie in [0, "
             "9223372036854775807] (out_exit is int64), got 9223372036854775808",
             exit_index=lambda: 2**63),
        case("out_score_expanded", ValueError, "out_score must be contiguous",
             out_score=lambda: torch.zeros(1).expand(N0)),
        case("out_exit_uint8", TypeError, "out_exit must have dtype in (int32, int64), got uint8",
             out_exit=lambda: torch.zeros(N0, dtype=torch.uint8)),
        case("row_index_int16", TypeError,
             "row_index must have dtype in (int32, int64), got int16",
             row_index=lambda: torch.tensor([5, 0, 3, 1], dtype=torch.int16)),
        case("out_score_overlaps_bias", ValueError,
             "out_score overlaps bias; pass a separate buffer", **_bias_and_out_score()),
        case("row_index_duplicate", ValueError,
             "row_index values must be distinct, got 3 at positions 1 and 3",
             row_index=lambda: torch.tensor([5, 3, 0, 3])),
        case("out_score_overlaps_feats", ValueError,
             "out_score overlaps feats; pass a separate buffer", **_feats_and_out_score()),
        case("out_logits_overlaps_feats_through_another_storage", ValueError,
             "out_logits overlaps feats; pass a separate buffer",
             **_feats_and_out_logits_of_one_buffer()),
        case("out_exit_overlaps_row_index", ValueError,
             "out_exit overlaps row_index; pass a separate buffer", **_row_index_and_out_exit()),
        case("out_score_overlaps_out_logits", ValueError,
             "out_score overlaps out_logits; pass a separate buffer", **_logits_and_score()),
        case("out_score_float64", TypeError, "out_score must have dtype in (float32), got float64",
             out_score=lambda: torch.zeros(N0, dtype=torch.float64)),
        case("out_score_2d", ValueError,
             "out_score must be 1-D (N0,), got a 2-D tensor of shape (6, 1)",
             out_score=lambda: torch.zeros(N0, 1)),
        case("out_logits_wrong_c", ValueError,
             "out_logits must have shape (6, 5) (logits) or (6,) (predictions), got (6, 6)",
             out_logits=lambda: torch.zeros(N0, C + 1)),
        case("out_logits_wrong_n0", ValueError,
             "out_logits must have shape (6, 5) (logits) or (6,) (predictions), got (5, 5)",
             out_logits=lambda: torch.zeros(N0 - 1, C)),
        case("out_preds_wrong_n0", ValueError,
             "out_logits must have shape (6, 5) (logits) or (6,) (predictions), got (7,)",
             out_logits=lambda: torch.zeros(N0 + 1, dtype=torch.int64)),
        case("out_preds_float", TypeError,
             "out_logits must have dtype in (int32, int64), got float32",
             out_logits=lambda: torch.zeros(N0)),
        case("out_logits_int", TypeError,
             "out_logits must have dtype in (float32, float16, bfloat16), got int64",
             out_logits=lambda: torch.zeros(N0, C, dtype=torch.int64)),
        case("out_logits_3d", ValueError,
             "out_logits must be 2-D (N0, C) logits or 1-D (N0,) predictions, got a 3-D tensor",
             out_logits=lambda: torch.zeros(N0, C, 1)),
        case("out_exit_float", TypeError, "out_exit must have dtype in (int32, int64), got "
             "float32", out_exit=lambda: torch.zeros(N0)),
        case("out_exit_short", ValueError, "out_exit must have shape (6,) like out_score, got "
             "(5,)", out_exit=lambda: torch.zeros(N0 - 1, dtype=torch.int64)),
        case("out_logits_noncontiguous", ValueError, "out_logits must be contiguous",
             out_logits=lambda: torch.zeros(C, N0).t()),
        case("out_score_noncontiguous", ValueError, "out_score must be contiguous",
             out_score=lambda: torch.zeros(2 * N0)[::2]),
        case("out_exit_noncontiguous", ValueError, "out_exit must be contiguous",
             out_exit=lambda: torch.zeros(2 * N0, dtype=torch.int32)[::2]),
    ]


def _compact_cases(op: str) -> list[Case]:
    def case(id_: str, exc: type[Exception], message: str,
             build: Callable[[], dict[str, Any]]) -> Case:
        def call(backend: str) -> Any:
            return run_compact(op, backend, **build())

        return Case(f"{op}-{id_}", op, call, exc, f"eenet.{op}: {message}")

    cases = [
        case("keep_uint8", TypeError, "keep must have dtype in (bool), got uint8",
             lambda: {"keep": torch.ones(N, dtype=torch.uint8)}),
        case("keep_int64", TypeError, "keep must have dtype in (bool), got int64",
             lambda: {"keep": torch.ones(N, dtype=torch.int64)}),
        case("keep_2d", ValueError, "keep must be 1-D (N,), got a 2-D tensor of shape (2, 2)",
             lambda: {"keep": torch.ones(2, 2, dtype=torch.bool)}),
        case("keep_0d", ValueError, "keep must be 1-D (N,), got a 0-D tensor of shape ()",
             lambda: {"keep": torch.tensor(True)}),
        case("src_wrong_n", ValueError, "src[1] must have N = 4 rows like keep, got shape (3, 2)",
             lambda: {"src": [torch.zeros(N, 2), torch.zeros(N - 1, 2)]}),
        case("src_0d", ValueError, "src[0] must have N = 4 rows like keep, got shape ()",
             lambda: {"src": [torch.tensor(1.0)]}),
        case("src_sparse", ValueError,
             "src[0] must be a dense (strided) tensor, got layout sparse_coo",
             lambda: {"src": [torch.zeros(N, 2).to_sparse(), torch.arange(N)]}),
    ]
    if op == "compact":
        return cases

    def overlap_strided() -> dict[str, Any]:
        base = torch.zeros(2 * N)
        return {"src": [base[::2]], "dst": [base]}

    def overlap_partial() -> dict[str, Any]:
        base = torch.zeros(10, 2)
        return {"src": [base[:N], torch.zeros(N, 2)], "dst": [torch.zeros(N, 2), base[2:8]]}

    def overlap_keep() -> dict[str, Any]:
        base = torch.tensor([True, False, True, True, False, False])
        return {"keep": base[:N], "src": [torch.ones(N, dtype=torch.bool)], "dst": [base[2:]]}

    def overlap_dst() -> dict[str, Any]:
        base = torch.zeros(N, 2)  # 32 bytes: also the (N,) int64 buffer of src[1]
        return {"dst": [base, base.view(-1).view(torch.int64)]}

    def overlap_other_storage() -> dict[str, Any]:
        a, b = _two_storages(2 * (N + 1))
        return {"src": [a[:2 * N].view(N, 2), torch.arange(N)],
                "dst": [b[2:].view(N, 2), torch.zeros(N, dtype=torch.int64)]}

    def same() -> dict[str, Any]:
        src = [torch.zeros(N, 2), torch.arange(N)]
        return {"src": src, "dst": src}

    return [
        *cases,
        case("dst_count", ValueError, "dst must hold one buffer per src tensor: 2 src, 1 dst",
             lambda: {"dst": [torch.zeros(N, 2)]}),
        case("dst_dtype", TypeError, "dst[1] must have the dtype of src[1] (int64), got int32",
             lambda: {"dst": [torch.zeros(N, 2), torch.zeros(N, dtype=torch.int32)]}),
        case("dst_too_few_rows", ValueError,
             "dst[0] must have shape (>= 4, 2) to hold src[0] of shape (4, 2), got (3, 2)",
             lambda: {"dst": [torch.zeros(N - 1, 2), torch.zeros(N, dtype=torch.int64)]}),
        case("dst_trailing_shape", ValueError,
             "dst[0] must have shape (>= 4, 2) to hold src[0] of shape (4, 2), got (4, 3)",
             lambda: {"dst": [torch.zeros(N, 3), torch.zeros(N, dtype=torch.int64)]}),
        case("dst_rank", ValueError,
             "dst[1] must have shape (>= 4) to hold src[1] of shape (4,), got (4, 1)",
             lambda: {"dst": [torch.zeros(N, 2), torch.zeros(N, 1, dtype=torch.int64)]}),
        case("keep_sparse", ValueError,
             "keep must be a dense (strided) tensor, got layout sparse_coo",
             lambda: {"keep": torch.ones(N, dtype=torch.bool).to_sparse()}),
        case("dst_expanded", ValueError, "dst[0] must be contiguous",
             lambda: {"dst": [torch.zeros(1, 2).expand(N, 2), torch.zeros(N, dtype=torch.int64)]}),
        case("dst_noncontiguous", ValueError, "dst[0] must be contiguous",
             lambda: {"dst": [torch.zeros(2, N).t(), torch.zeros(N, dtype=torch.int64)]}),
        case("dst_is_src", ValueError, "dst[0] overlaps src[0]; compaction into its own source "
             "is not supported, pass a separate buffer", same),
        case("dst_partial_overlap", ValueError, "dst[1] overlaps src[0]; compaction into its "
             "own source is not supported, pass a separate buffer", overlap_partial),
        case("dst_overlaps_strided_src", ValueError, "dst[0] overlaps src[0]; compaction into "
             "its own source is not supported, pass a separate buffer", overlap_strided),
        case("dst_overlaps_keep", ValueError, "dst[0] overlaps keep; pass a separate buffer",
             overlap_keep),
        case("dst_overlaps_src_through_another_storage", ValueError, "dst[0] overlaps src[0]; "
             "compaction into its own source is not supported, pass a separate buffer",
             overlap_other_storage),
        case("dst_overlaps_dst", ValueError, "dst[1] overlaps dst[0]; pass a separate buffer",
             overlap_dst),
    ]


CASES: list[Case] = [
    *(c for op in EXIT_OPS for c in _exit_cases(op)),
    *_write_cases(),
    *(c for op in COMPACT_OPS for c in _compact_cases(op)),
]


def _order_case() -> dict[str, Any]:
    src = [torch.zeros(N, 2), torch.arange(N)]
    return {"src": src, "dst": [src[0], torch.zeros(N, dtype=torch.int32)]}


# Cases that only make sense as a comparison of the backends (no single right answer).
CROSS_ONLY: list[Case] = [
    Case("compact_out-overlap_and_dtype", "compact_out",
         lambda backend: run_compact("compact_out", backend, **_order_case()), Exception,
         "eenet.compact_out: ", exact=False),
]


def expected_pattern(case: Case) -> str:
    """Regex for pytest.raises: the whole first line, or a prefix of it."""
    tail = r"(?:\n|\Z)" if case.exact else ""
    return r"\A" + re.escape(case.message) + tail


# ---------------------------------------------------------------------------------------
# Tests.


def test_case_ids_unique() -> None:
    """Guard against a copy-paste case shadowing another."""
    ids = [c.id for c in CASES + CROSS_ONLY]
    assert len(ids) == len(set(ids))


def raised(case: Case, backend: str) -> tuple[type[BaseException], str] | None:
    """(exception type, message) that ``case`` raises on ``backend``; None if it passes."""
    try:
        case.call(backend)
    except Exception as exc:
        return type(exc), str(exc)
    return None


def _reference_params() -> list[Any]:
    return [pytest.param(case, id=case.id) for case in CASES]


def _parity_params() -> list[Any]:
    return [pytest.param(case, backend, marks=backend_param(backend).marks,
                         id=f"{backend}-{case.id}")
            for case in CASES + CROSS_ONLY for backend in PARITY_BACKENDS]


@pytest.mark.parametrize("case", _reference_params())
def test_reference_raises_documented_error(case: Case) -> None:
    """The documented exception type (not a subclass) and message, on the reference."""
    assert case.message.startswith(f"eenet.{case.op}: ")
    with pytest.raises(case.exc, match=expected_pattern(case)) as info:
        case.call("reference")
    assert type(info.value) is case.exc


@pytest.mark.parametrize(("case", "backend"), _parity_params())
def test_backend_raises_like_reference(case: Case, backend: str) -> None:
    """The backend raises the reference's exception type with the reference's exact
    message for the same bad input."""
    want = raised(case, "reference")
    assert want is not None, "the reference accepted the input"
    assert raised(case, backend) == want


def test_cpp_messages_have_no_extra_text() -> None:
    """C++ errors reach Python as the bare message: no C++ backtrace or source location."""
    if not ek.HAVE_EXTENSION:
        pytest.skip("needs the compiled cpp backend")
    with pytest.raises(ValueError) as info:
        run_exit("exit_score", "cpp", feats=torch.randn(N))
    text = str(info.value)
    assert "\n" not in text.strip()
    assert "Exception raised from" not in text


# ---------------------------------------------------------------------------------------
# Valid empty inputs.


def _empty_policy_args(policy: str) -> dict[str, Any]:
    if policy == "eenet":
        return {"prev_scores": torch.zeros(0, K), "prev_preds": torch.zeros(0, K, dtype=torch.long),
                "sched_weight": torch.randn(C + 3 + K), "use_vote": True}
    if policy == "patience":
        return {"prev_preds": torch.zeros(0, K, dtype=torch.int32), "threshold": 1.0}
    return {}


def _check_empty_exit(op: str, backend: str, policy: str, shape: tuple[int, ...],
                      check_finite: bool) -> None:
    """N = 0 feats give (0, C) logits, (0,) score and mask, and leave the outputs untouched."""
    out_logits = torch.full((N0, C), 3.0)
    out_score = torch.full((N0,), 4.0)
    out_exit = torch.full((N0,), 7, dtype=torch.int64)
    res = run_exit(
        op, backend, feats=torch.randn(shape), policy=policy, check_finite=check_finite,
        row_index=torch.zeros(0, dtype=torch.int64), out_logits=out_logits,
        out_score=out_score, out_exit=out_exit, **_empty_policy_args(policy))
    assert res.logits.shape == (0, C) and res.logits.dtype == torch.float32
    assert res.score.shape == (0,) and res.score.dtype == torch.float32
    assert res.exit_mask.shape == (0,) and res.exit_mask.dtype == torch.bool
    assert res.pred.shape == (0,) and res.pred.dtype == torch.int64
    assert res.keep.shape == (0,) and res.keep.dtype == torch.bool
    assert bool((out_logits == 3.0).all() & (out_score == 4.0).all() & (out_exit == 7).all())


@pytest.mark.parametrize("shape", [(0, D), (0, D, 2)], ids=["2d", "3d"])
@pytest.mark.parametrize("policy", ["max_prob", "entropy", "patience", "eenet"])
@pytest.mark.parametrize("op", EXIT_OPS)
def test_exit_score_empty_batch(any_backend: str, op: str, policy: str,
                                shape: tuple[int, ...]) -> None:
    """N = 0 is valid for every policy and feats rank (finite check off)."""
    _check_empty_exit(op, any_backend, policy, shape, check_finite=False)


@pytest.mark.parametrize("shape", [(0, D), (0, D, 2)], ids=["2d", "3d"])
@pytest.mark.parametrize("op", EXIT_OPS)
def test_exit_score_empty_batch_finite_check(any_backend: str, op: str,
                                             shape: tuple[int, ...]) -> None:
    """N = 0 is valid with check_finite=True too."""
    _check_empty_exit(op, any_backend, "max_prob", shape, check_finite=True)


@pytest.mark.parametrize("op", COMPACT_OPS)
def test_compact_empty_batch(any_backend: str, op: str) -> None:
    """N = 0 compacts to empty buffers and a zero count; out buffers stay untouched."""
    keep = torch.zeros(0, dtype=torch.bool)
    src = [torch.zeros(0), torch.zeros(0, 3, dtype=torch.int32),
           torch.zeros(5, 0, 7, dtype=torch.bfloat16).transpose(0, 1)]
    dst = [torch.full((2,), 9.0), torch.full((0, 3), 9, dtype=torch.int32),
           torch.full((1, 5, 7), 9.0, dtype=torch.bfloat16)]
    kept, count = run_compact(op, any_backend, keep=keep, src=src, dst=dst)
    assert count.dim() == 0 and count.dtype == torch.int64 and int(count) == 0
    if op == "compact":
        assert [tuple(k.shape) for k in kept] == [(0,), (0, 3), (0, 5, 7)]
        assert [k.dtype for k in kept] == [s.dtype for s in src]
    else:
        assert all(k is d for k, d in zip(kept, dst, strict=True))
        assert bool((dst[0] == 9).all() & (dst[2] == 9).all())


# ---------------------------------------------------------------------------------------
# Devices (needs CUDA).


@pytest.mark.gpu
def test_tensors_on_different_devices(any_backend: str) -> None:
    """A secondary tensor on another device than the primary one is named in a ValueError."""
    feats, weight = torch.randn(N, D), torch.randn(C, D, device="cuda")
    with pytest.raises(ValueError, match=re.escape(
            f"eenet.exit_score: weight is on {weight.device} but feats is on cpu; all tensors "
            "must share one device")):
        ek.exit_score(feats, weight, backend=any_backend)
    src = torch.zeros(N, 2, device="cuda")
    for op in COMPACT_OPS:
        with pytest.raises(ValueError, match=re.escape(
                f"eenet.{op}: src[0] is on {src.device} but keep is on cpu; all tensors must "
                "share one device")):
            run_compact(op, any_backend, src=[src], dst=[torch.zeros(N, 2)])
