"""Argument checks of the Python layer: the reference backend, the Triton launchers and the
fake kernels that ``torch.compile`` / ``torch.export`` trace all call these functions, in
the same order, so an argument error reads the same on every Python path. The compiled
layer has its own copy in ``csrc/checks.h``; ``tests/test_bad_inputs.py`` holds the two to
the same exception type and message for every bad-input case.

Every error starts with ``eenet.<op>: `` and names the offending argument: ``TypeError`` for
dtypes, ``IndexError`` for out-of-range indices, ``ValueError`` otherwise.

Metadata checks (shapes, dtypes, devices, layouts, aliasing) inspect no values, so they
also run on fake and meta tensors. Value checks (:func:`check_exit_values`,
:func:`check_finite_rows`) read data: they run only on CPU tensors, where reading costs no
device sync; on CUDA the kernels skip out-of-range rows instead.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.symbolic_shapes import guard_or_false

POLICIES: tuple[str, ...] = ("max_prob", "entropy", "patience", "eenet")
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)
NEVER_EXIT: float = 1.0 + 2.0**-23
"""The threshold of a closed exit for the probability-like policies (max_prob, entropy,
eenet): the smallest float32 above 1. Their scores are at most 1 (a saturated softmax or
sigmoid gives exactly 1.0 in float32, which a threshold of 1.0 lets exit), so no row reaches
it; the thresholds they accept are [0, 1] and this value."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fail(op: str, message: str, kind: type[Exception] = ValueError) -> None:
    raise kind(f"eenet.{op}: {message}")


def _check_dense(op: str, name: str, t: torch.Tensor) -> None:
    """Sparse and quantized tensors have no plain strided data for the kernels to read."""
    if t.layout != torch.strided:
        layout = str(t.layout).removeprefix("torch.")
        _fail(op, f"{name} must be a dense (strided) tensor, got layout {layout}")
    if t.is_quantized:
        _fail(op, f"{name} must be a dense (strided) tensor, got a quantized tensor")


def _check_dtype(op: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    _check_dense(op, name, t)
    if t.dtype not in allowed:
        names = ", ".join(_dtype_name(d) for d in allowed)
        _fail(op, f"{name} must have dtype in ({names}), got {_dtype_name(t.dtype)}", TypeError)


def _check_rank(op: str, name: str, t: torch.Tensor, ranks: Sequence[int], layout: str) -> None:
    if t.dim() not in ranks:
        _fail(op, f"{name} must be {layout}, got a {t.dim()}-D tensor of shape {tuple(t.shape)}")


def _check_device(op: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        _fail(op, f"{name} is on {t.device} but feats is on {device}; all tensors must share one "
              "device")


FLOAT32_TINY = 1.1754943508222875e-38
"""The smallest normal float32."""
FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32."""


def threshold_as_float32(threshold: float) -> float:
    """The float32 threshold every kernel compares the float32 scores with: the smallest
    float32 >= ``threshold`` (>= 0, checked), so that ``score >= t32`` holds exactly where
    ``score >= threshold`` does (rounding to the nearest float32 would let a score just
    below the threshold exit). A positive threshold below the smallest normal float32 is
    raised to it, which devices flushing denormals to zero would otherwise read as 0."""
    if threshold <= 0.0:
        return 0.0
    if threshold < FLOAT32_TINY:
        return FLOAT32_TINY
    try:
        (t32,) = struct.unpack("<f", struct.pack("<f", threshold))  # to nearest
    except OverflowError:
        return math.inf
    if t32 < threshold:
        (bits,) = struct.unpack("<I", struct.pack("<f", t32))
        (t32,) = struct.unpack("<f", struct.pack("<I", bits + 1))  # the next float32 up
    return t32


def check_exit_score(
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    policy: str,
    threshold: float,
    prev_scores: torch.Tensor | None,
    prev_preds: torch.Tensor | None,
    sched_weight: torch.Tensor | None,
    use_vote: bool,
    op: str = "exit_score",
    sched_bias: float = 0.0,
) -> None:
    """Validate the common arguments of ``exit_score`` and ``exit_score_write`` (metadata)."""
    if policy not in POLICIES:
        _fail(op, f"policy must be one of {POLICIES}, got {policy!r}")
    _check_dtype(op, "feats", feats, FLOAT_DTYPES)
    _check_rank(op, "feats", feats, (2, 3), "2-D (N, D) or 3-D (N, D, S)")
    n, d = feats.shape[0], feats.shape[1]
    if d < 1:
        _fail(op, "feats must have D >= 1 features, got D = 0")
    if feats.dim() == 3 and feats.shape[2] < 1:
        _fail(op, "feats must have S >= 1 positions to pool over, got S = 0")
    device = feats.device
    _check_device(op, "weight", weight, device)
    _check_dtype(op, "weight", weight, (feats.dtype,))
    _check_rank(op, "weight", weight, (2,), "2-D (C, D)")
    if weight.shape[1] != d:
        _fail(op, f"weight must have shape (C, {d}) to match feats' D = {d}, got "
              f"{tuple(weight.shape)}")
    c = weight.shape[0]
    if c < 2:
        _fail(op, f"weight must have C >= 2 classes, got C = {c}")
    if bias is not None:
        _check_device(op, "bias", bias, device)
        _check_dtype(op, "bias", bias, (feats.dtype,))
        if bias.dim() != 1 or bias.shape[0] != c:
            _fail(op, f"bias must have shape ({c},) to match weight, got {tuple(bias.shape)}")
    if not math.isfinite(threshold):
        _fail(op, f"threshold must be finite, got {threshold:g}")
    if policy == "patience":
        if threshold < 0:
            _fail(op, f"threshold must be >= 0 for policy 'patience', got {threshold:.9g}")
    elif not 0.0 <= threshold <= NEVER_EXIT:
        _fail(op, f"threshold must lie in [0, 1] (or be NEVER_EXIT, a closed exit) for policy "
                  f"{policy!r}, got {threshold:.9g}")
    if use_vote and policy != "eenet":
        _fail(op, f"use_vote applies only to policy 'eenet', got policy {policy!r}")

    history = None
    if policy == "eenet":
        if prev_scores is None:
            _fail(op, "prev_scores is required for policy 'eenet' (shape (N, k), k earlier exits)")
        _check_device(op, "prev_scores", prev_scores, device)
        _check_dtype(op, "prev_scores", prev_scores, (torch.float32,))
        _check_rank(op, "prev_scores", prev_scores, (2,), "2-D (N, k)")
        if prev_scores.shape[0] != n:
            _fail(op, f"prev_scores must have N = {n} rows to match feats, got "
                  f"{prev_scores.shape[0]}")
        history = prev_scores.shape[1]
        if sched_weight is None:
            _fail(op, "sched_weight is required for policy 'eenet'")
        _check_device(op, "sched_weight", sched_weight, device)
        _check_dtype(op, "sched_weight", sched_weight, (torch.float32,))
        want = c + 2 + history + int(use_vote)
        if sched_weight.dim() != 1 or sched_weight.shape[0] != want:
            _fail(op, f"sched_weight must have shape ({want},) = C + 2 + k"
                  f"{' + 1 (vote)' if use_vote else ''} with C = {c}, k = {history}, got "
                  f"{tuple(sched_weight.shape)}")
        if not abs(sched_bias) <= FLOAT32_MAX:  # (NaN fails too) the kernels add it in fp32
            _fail(op, f"sched_bias must be finite in float32, got {sched_bias:g}")
    if policy == "patience" or use_vote:
        if prev_preds is None:
            _fail(op, f"prev_preds is required for {'the vote feature' if use_vote else 'policy'}"
                  f"{'' if use_vote else ' patience'} (shape (N, k), k earlier exits)")
        _check_device(op, "prev_preds", prev_preds, device)
        _check_dtype(op, "prev_preds", prev_preds, INDEX_DTYPES)
        _check_rank(op, "prev_preds", prev_preds, (2,), "2-D (N, k)")
        if prev_preds.shape[0] != n:
            _fail(op, f"prev_preds must have N = {n} rows to match feats, got "
                  f"{prev_preds.shape[0]}")
        if history is not None and prev_preds.shape[1] != history:
            _fail(op, f"prev_preds must have k = {history} columns to match prev_scores, got "
                  f"{prev_preds.shape[1]}")


def check_exit_write(
    feats: torch.Tensor,
    weight: torch.Tensor,
    row_index: torch.Tensor,
    exit_index: int,
    out_logits: torch.Tensor,
    out_score: torch.Tensor,
    out_exit: torch.Tensor,
    inputs: Sequence[tuple[str, torch.Tensor | None]] = (),
) -> None:
    """Validate the output-buffer arguments of ``exit_score_write`` (metadata).

    ``inputs``: the op's other tensor arguments as (name, tensor or None), in schema order
    after feats and weight (bias, prev_scores, prev_preds, sched_weight): no output buffer
    may overlap an input or another output, since the kernels read the inputs while they
    write the outputs.
    """
    op = "exit_score_write"
    device = feats.device
    n, c = feats.shape[0], weight.shape[0]
    for name, t in (("row_index", row_index), ("out_logits", out_logits),
                    ("out_score", out_score), ("out_exit", out_exit)):
        _check_device(op, name, t, device)
    _check_dtype(op, "row_index", row_index, INDEX_DTYPES)
    if row_index.dim() != 1 or row_index.shape[0] != n:
        _fail(op, f"row_index must have shape ({n},) to match feats, got {tuple(row_index.shape)}")
    _check_dtype(op, "out_score", out_score, (torch.float32,))
    _check_rank(op, "out_score", out_score, (1,), "1-D (N0,)")
    n0 = out_score.shape[0]
    _check_dtype(op, "out_exit", out_exit, INDEX_DTYPES)
    if out_exit.dim() != 1 or out_exit.shape[0] != n0:
        _fail(op, f"out_exit must have shape ({n0},) like out_score, got {tuple(out_exit.shape)}")
    top = torch.iinfo(out_exit.dtype).max
    if not 0 <= exit_index <= top:
        _fail(op, f"exit_index must lie in [0, {top}] (out_exit is "
              f"{_dtype_name(out_exit.dtype)}), got {exit_index}")
    if out_logits.dim() == 2:
        _check_dtype(op, "out_logits", out_logits, FLOAT_DTYPES)
        if tuple(out_logits.shape) != (n0, c):
            _fail(op, f"out_logits must have shape ({n0}, {c}) (logits) or ({n0},) (predictions),"
                  f" got {tuple(out_logits.shape)}")
    elif out_logits.dim() == 1:
        _check_dtype(op, "out_logits", out_logits, INDEX_DTYPES)
        if out_logits.shape[0] != n0:
            _fail(op, f"out_logits must have shape ({n0}, {c}) (logits) or ({n0},) (predictions),"
                  f" got {tuple(out_logits.shape)}")
    else:
        _fail(op, f"out_logits must be 2-D (N0, C) logits or 1-D (N0,) predictions, got a "
              f"{out_logits.dim()}-D tensor")
    outputs = (("out_logits", out_logits), ("out_score", out_score), ("out_exit", out_exit))
    for name, t in outputs:
        if not t.is_contiguous():
            _fail(op, f"{name} must be contiguous")
    readers = [("feats", feats), ("weight", weight), *inputs, ("row_index", row_index)]
    for i, (name, t) in enumerate(outputs):
        for other, u in [*readers, *outputs[:i]]:
            if u is not None and overlaps(t, u):
                _fail(op, f"{name} overlaps {other}; pass a separate buffer")


def check_exit_values(
    op: str,
    sched_weight: torch.Tensor | None,
    row_index: torch.Tensor | None = None,
    n0: int = 0,
) -> None:
    """Value checks of the exit ops, for CPU tensors only (no device sync there):
    sched_weight finite; row_index values in [0, n0) and distinct."""
    if sched_weight is not None and sched_weight.device.type == "cpu" and _has_data(sched_weight):
        bad = (~torch.isfinite(sched_weight)).nonzero().flatten()
        if bad.numel():
            _fail(op, f"sched_weight must be finite, got {sched_weight[bad[0]].item():g} at "
                  f"position {int(bad[0])}")
    if row_index is None or row_index.device.type != "cpu" or not _has_data(row_index):
        return
    out_of_range = ((row_index < 0) | (row_index >= n0)).nonzero().flatten()
    if out_of_range.numel():
        pos = int(out_of_range[0])
        _fail(op, f"row_index values must lie in [0, {n0}), got {int(row_index[pos])} at "
              f"position {pos}", IndexError)
    if row_index.numel() > 1:
        order = torch.argsort(row_index, stable=True)
        same = row_index[order[1:]] == row_index[order[:-1]]
        if bool(same.any()):
            later = int(order[1:][same].min())
            value = int(row_index[later])
            first = int((row_index == value).nonzero()[0])
            _fail(op, f"row_index values must be distinct, got {value} at positions {first} "
                  f"and {later}")


def _has_data(t: torch.Tensor) -> bool:
    """Whether t's values can be read (not a meta or fake tensor)."""
    return t.device.type != "meta" and not is_fake(t) and t.numel() > 0


def check_finite_rows(op: str, name: str, t: torch.Tensor) -> None:
    """Value check (one host sync): reject NaN/inf, naming the first offending rows."""
    if not _has_data(t):
        return
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        _fail(op, f"{name} has NaN/inf values in rows {rows}"
              f"{' (first 5 shown)' if int(bad.sum()) > 5 else ''}")


def check_compact(
    keep: torch.Tensor, src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor] | None,
    op: str = "compact",
) -> None:
    """Validate ``compact`` / ``compact_out`` arguments (metadata, aliasing included)."""
    _check_dtype(op, "keep", keep, (torch.bool,))
    _check_rank(op, "keep", keep, (1,), "1-D (N,)")
    n, device = keep.shape[0], keep.device
    for i, t in enumerate(src):
        _check_dense(op, f"src[{i}]", t)
        if t.dim() < 1 or t.shape[0] != n:
            _fail(op, f"src[{i}] must have N = {n} rows like keep, got shape {tuple(t.shape)}")
        if t.device != device:
            _fail(op, f"src[{i}] is on {t.device} but keep is on {device}; all tensors must "
                  "share one device")
    if dst is None:
        return
    if len(dst) != len(src):
        _fail(op, f"dst must hold one buffer per src tensor: {len(src)} src, {len(dst)} dst")
    for i, (s, d) in enumerate(zip(src, dst, strict=True)):
        _check_dense(op, f"dst[{i}]", d)
        if d.device != device:
            _fail(op, f"dst[{i}] is on {d.device} but keep is on {device}; all tensors must "
                  "share one device")
        if d.dtype != s.dtype:
            _fail(op, f"dst[{i}] must have the dtype of src[{i}] ({_dtype_name(s.dtype)}), got "
                  f"{_dtype_name(d.dtype)}", TypeError)
        if d.dim() != s.dim() or d.shape[1:] != s.shape[1:] or d.shape[0] < n:
            tail = "".join(f", {x}" for x in s.shape[1:])
            _fail(op, f"dst[{i}] must have shape (>= {n}{tail}) to hold src[{i}] of shape "
                  f"{tuple(s.shape)}, got {tuple(d.shape)}")
        if not d.is_contiguous():
            _fail(op, f"dst[{i}] must be contiguous")
    # after the per-buffer checks; the kernels read keep and every src while they write
    for i, d in enumerate(dst):
        if overlaps(d, keep):
            _fail(op, f"dst[{i}] overlaps keep; pass a separate buffer")
        for j, s in enumerate(src):
            if overlaps(d, s):
                _fail(op, f"dst[{i}] overlaps src[{j}]; compaction into its own source is not "
                      "supported, pass a separate buffer")
        for j in range(i):
            if overlaps(d, dst[j]):
                _fail(op, f"dst[{i}] overlaps dst[{j}]; pass a separate buffer")


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Conservative aliasing test: intersecting byte ranges in memory (strided and expanded
    tensors included). Real tensors are compared by address, so two storages over one
    buffer (two ``torch.from_numpy`` / ``frombuffer`` / DLPack views of it) are caught too;
    meta and fake tensors (no data, data pointers all 0) overlap only within one storage.
    With symbolic sizes (tracing) an undecidable overlap counts as none: the eager call
    decides it on concrete sizes."""
    if a.device != b.device:
        return False
    if guard_or_false(a.numel() == 0) or guard_or_false(b.numel() == 0):
        return False
    addressed = not (a.device.type == "meta" or is_fake(a) or is_fake(b))
    if not addressed and a.untyped_storage()._cdata != b.untyped_storage()._cdata:
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        start = t.data_ptr() if addressed else t.storage_offset() * t.element_size()
        extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
        return start, start + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return guard_or_false(a0 < b1) and guard_or_false(b0 < a1)
