"""The single front-end of the ``eenet`` ops.

Every op exists once in the dispatcher as ``torch.ops.eenet.<name>`` (schemas in
``csrc/ops.cpp``, or :mod:`eenet_kernels._schemas` when the extension is not built) with a
fake kernel for ``torch.compile`` / ``torch.export``. The public functions here add the
backend choice and the convenience arguments:

- ``EENET_BACKEND=auto|reference|cpp|triton`` (or ``backend=`` per call) picks the
  implementation; ``auto`` takes the compiled C++ kernel for CPU tensors when it is built,
  else the reference, and the Triton kernels for CUDA tensors when triton imports, else the
  reference. ``triton`` on CPU tensors runs only under the interpreter (``TRITON_INTERPRET=1``,
  tests). In the dispatcher, CUDA without a compiled kernel runs the Triton kernels (the
  reference when triton is missing), other devices without one the reference.
- ``exit_score(..., check_finite=True)`` rejects NaN/inf feature rows up front (one host
  sync); the kernels themselves never let a non-finite row exit before the last exit.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from . import checks, reference
from . import triton as _triton
from ._schemas import SCHEMAS

BACKENDS: tuple[str, ...] = ("auto", "reference", "cpp", "triton")


def _load_extension() -> bool:
    if os.environ.get("EENET_SKIP_EXT", "0") == "1":
        return False
    try:
        from . import _C  # noqa: F401  (registers the schemas and the C++ kernels)
    except ImportError as exc:
        warnings.warn(f"eenet_kernels: compiled extension not loaded ({exc}); using the "
                      "reference implementation", RuntimeWarning, stacklevel=3)
        return False
    return True


HAVE_EXTENSION: bool = _load_extension()

if not HAVE_EXTENSION:
    _def_lib = torch.library.Library("eenet", "DEF")  # kept alive at module level
    for _schema in SCHEMAS.values():
        _def_lib.define(_schema)

_REFERENCE_IMPLS = {
    "exit_score": reference.exit_score,
    "exit_score_write": reference.exit_score_write,
    "compact": reference.compact,
    "compact_out": reference.compact_out,
}

_COMPILED_KEYS: dict[str, tuple[str, ...]] = {
    name: tuple(k for k in ("CPU", "CUDA")
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"eenet::{name}", k))
    for name in SCHEMAS
}


def _triton_fn(name: str) -> Callable | None:
    """The Triton entry point of op ``name`` (reference signature); None without triton."""
    mods = _triton.load()
    if mods is None:
        return None
    exit_mod, compact_mod = mods
    return getattr(exit_mod if name.startswith("exit_score") else compact_mod, name)


def _cuda_fallback(name: str) -> Callable:
    """CUDA kernel of op ``name`` when none is compiled: Triton (imported on the first call),
    or the reference when triton cannot be imported."""

    def impl(*args: Any, **kwargs: Any) -> Any:
        fn = _triton_fn(name) or _REFERENCE_IMPLS[name]
        return fn(*args, **kwargs)

    return impl


# Devices without a compiled kernel run Triton (CUDA) or the reference (CPU) through the
# dispatcher, so that torch.ops.eenet.* works everywhere.
_impl_lib = torch.library.Library("eenet", "IMPL")
for _name, _fn in _REFERENCE_IMPLS.items():
    if "CPU" not in _COMPILED_KEYS[_name]:
        _impl_lib.impl(_name, _fn, "CPU")
    if "CUDA" not in _COMPILED_KEYS[_name]:
        _impl_lib.impl(_name, _cuda_fallback(_name), "CUDA")


def compiled_backends(name: str) -> tuple[str, ...]:
    """Dispatch keys (``CPU``, ``CUDA``) served by a compiled kernel for op ``name``."""
    return _COMPILED_KEYS[name]


# ---------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and metadata checks only.


@torch.library.register_fake("eenet::exit_score")
def _exit_score_fake(feats, weight, bias, policy, threshold, is_last=False, prev_scores=None,
                     prev_preds=None, sched_weight=None, sched_bias=0.0, use_vote=False):
    checks.check_exit_score(feats, weight, bias, policy, threshold, prev_scores, prev_preds,
                            sched_weight, use_vote)
    n, c = feats.shape[0], weight.shape[0]
    return (feats.new_empty((n, c), dtype=torch.float32),
            feats.new_empty((n,), dtype=torch.float32),
            feats.new_empty((n,), dtype=torch.bool))


@torch.library.register_fake("eenet::exit_score_write")
def _exit_score_write_fake(feats, weight, bias, policy, threshold, is_last=False,
                           prev_scores=None, prev_preds=None, sched_weight=None, sched_bias=0.0,
                           use_vote=False, *, row_index, exit_index, out_logits, out_score,
                           out_exit):
    checks.check_exit_write(feats, weight, row_index, exit_index, out_logits, out_score,
                            out_exit)
    return _exit_score_fake(feats, weight, bias, policy, threshold, is_last, prev_scores,
                            prev_preds, sched_weight, sched_bias, use_vote)


@torch.library.register_fake("eenet::compact")
def _compact_fake(keep, src):
    checks.check_compact(keep, src, None)
    kept = [torch.empty_like(s, memory_format=torch.contiguous_format) for s in src]
    return kept, keep.new_empty((), dtype=torch.int64)


@torch.library.register_fake("eenet::compact_out")
def _compact_out_fake(keep, src, dst):
    checks.check_compact(keep, src, dst, op="compact_out")
    return keep.new_empty((), dtype=torch.int64)


# ---------------------------------------------------------------------------------------
# Backend choice.


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend that will run an op on ``device``: ``reference``, ``cpp`` or ``triton``.

    ``backend`` (or ``EENET_BACKEND`` when None) may be ``auto``. A backend that cannot run
    here raises ``RuntimeError`` instead of silently falling back.
    """
    choice = backend or os.environ.get("EENET_BACKEND", "auto") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"eenet: backend must be one of {BACKENDS}, got {choice!r} "
                         "(the cuda backend is not part of this build yet)")
    if choice == "auto":
        if device.type == "cpu":
            return "cpp" if HAVE_EXTENSION else "reference"
        return "triton" if device.type == "cuda" and _triton.is_available() else "reference"
    if choice == "triton":
        why = None
        if device.type not in ("cpu", "cuda"):
            why = f"it runs on CUDA tensors, not {device.type}"
        elif device.type == "cpu" and not _triton.interpreting():
            why = "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        elif not _triton.is_available():
            why = "triton cannot be imported"
        if why is not None:
            raise RuntimeError(f"eenet: backend 'triton' was requested but {why}")
    if choice == "cpp" and (device.type != "cpu" or not HAVE_EXTENSION):
        why = ("the compiled extension is not loaded" if not HAVE_EXTENSION
               else f"it runs on CPU tensors, not {device.type}")
        raise RuntimeError(f"eenet: backend 'cpp' was requested but {why}")
    return choice


# ---------------------------------------------------------------------------------------
# Public functions.


class ExitScore(NamedTuple):
    """Result of :func:`exit_score`: logits (N, C) float32, score (N,) float32, exit_mask (N,)."""

    logits: torch.Tensor
    score: torch.Tensor
    exit_mask: torch.Tensor


def _check_finite_inputs(op: str, feats: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> None:
    if torch.compiler.is_compiling():
        return
    checks.check_finite_rows(op, "feats", feats)
    checks.check_finite_rows(op, "weight", weight)
    if bias is not None:
        checks.check_finite_rows(op, "bias", bias)


def exit_score(
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    policy: str = "max_prob",
    threshold: float = 0.5,
    is_last: bool = False,
    prev_scores: torch.Tensor | None = None,
    prev_preds: torch.Tensor | None = None,
    sched_weight: torch.Tensor | None = None,
    sched_bias: float = 0.0,
    use_vote: bool = False,
    check_finite: bool = True,
    backend: str | None = None,
) -> ExitScore:
    """Fused exit classifier + confidence + policy score + exit decision.

    Args:
        feats: (N, D) or (N, D, S) float32/float16/bfloat16; (N, D, S) is mean-pooled over S.
        weight: (C, D), bias: (C,) or None, same dtype as feats. C >= 2.
        policy: ``max_prob`` | ``entropy`` | ``patience`` | ``eenet``.
        threshold: exit when score >= threshold; in [0, 1] (``patience``: a streak length).
        is_last: every row exits (the last exit of the network).
        prev_scores: (N, k) float32 scores of the k earlier exits (``eenet``).
        prev_preds: (N, k) int32/int64 argmax of the earlier exits (``patience``, vote).
        sched_weight: (C + 2 + k [+ 1 with use_vote],) float32, sched_bias: the EENet
            scheduler's linear layer on [p, max p, conf, prev_scores, vote].
        check_finite: raise ``ValueError`` naming the rows when feats/weight/bias hold
            NaN/inf (costs one host sync; skipped under torch.compile).
        backend: override ``EENET_BACKEND`` for this call.

    Returns:
        :class:`ExitScore` (logits (N, C) float32, score (N,) float32, exit_mask (N,) bool).
    """
    if check_finite:
        _check_finite_inputs("exit_score", feats, weight, bias)
    args = (feats, weight, bias, policy, float(threshold), is_last, prev_scores, prev_preds,
            sched_weight, float(sched_bias), use_vote)
    chosen = resolve_backend(feats.device, backend)
    if chosen == "reference":
        return ExitScore(*reference.exit_score(*args))
    if chosen == "triton":
        return ExitScore(*_triton_fn("exit_score")(*args))
    return ExitScore(*torch.ops.eenet.exit_score(*args))


def exit_score_write(
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    row_index: torch.Tensor,
    exit_index: int,
    out_logits: torch.Tensor,
    out_score: torch.Tensor,
    out_exit: torch.Tensor,
    policy: str = "max_prob",
    threshold: float = 0.5,
    is_last: bool = False,
    prev_scores: torch.Tensor | None = None,
    prev_preds: torch.Tensor | None = None,
    sched_weight: torch.Tensor | None = None,
    sched_bias: float = 0.0,
    use_vote: bool = False,
    check_finite: bool = True,
    backend: str | None = None,
) -> ExitScore:
    """:func:`exit_score`, plus the result write of the exiting rows, in the same pass.

    For every exiting row i, at ``r = row_index[i]`` (its position in the original batch):
    ``out_logits[r]`` = its logits when out_logits is (N0, C) float, or its argmax when it is
    (N0,) int32/int64; ``out_score[r]`` (float32) = its score; ``out_exit[r]`` (int32/int64)
    = ``exit_index``. Rows that stay are not written. ``row_index`` (N,) int32/int64 must
    hold distinct values in [0, N0).
    """
    if check_finite:
        _check_finite_inputs("exit_score_write", feats, weight, bias)
    args = (feats, weight, bias, policy, float(threshold), is_last, prev_scores, prev_preds,
            sched_weight, float(sched_bias), use_vote)
    outs = {"row_index": row_index, "exit_index": int(exit_index), "out_logits": out_logits,
            "out_score": out_score, "out_exit": out_exit}
    chosen = resolve_backend(feats.device, backend)
    if chosen == "reference":
        return ExitScore(*reference.exit_score_write(*args, **outs))
    if chosen == "triton":
        return ExitScore(*_triton_fn("exit_score_write")(*args, **outs))
    return ExitScore(*torch.ops.eenet.exit_score_write(*args, **outs))


def compact(
    keep: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    out: Sequence[torch.Tensor] | None = None,
    *,
    backend: str | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stable stream compaction of several per-row tensors in one call.

    Args:
        keep: (N,) bool, the rows to keep.
        tensors: tensors of shape (N, ...), any dtype.
        out: optional preallocated buffers, one per tensor, shape (>= N, ...), same dtype,
            contiguous, not overlapping the inputs. Without it, new (N, ...) buffers are
            allocated and their rows >= n zero-filled.

    Returns:
        ``(kept, n)``: the buffers whose first n rows are the kept rows in their original
        order, and n as a 0-dim int64 tensor on keep's device (no host sync). Rows >= n of
        caller-provided buffers are left as they were.
    """
    src = list(tensors)
    chosen = resolve_backend(keep.device, backend)
    if chosen == "reference":
        functional, into = reference.compact, reference.compact_out
    elif chosen == "triton":
        functional, into = _triton_fn("compact"), _triton_fn("compact_out")
    else:
        functional, into = torch.ops.eenet.compact, torch.ops.eenet.compact_out
    if out is None:
        kept, count = functional(keep, src)
        return list(kept), count
    dst = list(out)
    return dst, into(keep, src, dst)


def take(kept: Sequence[torch.Tensor], count: torch.Tensor) -> list[torch.Tensor]:
    """The first ``count`` rows of each compacted buffer: the one host sync of a stage.

    Under ``torch.compile`` the count becomes an unbacked symbolic size (set
    ``torch._dynamo.config.capture_scalar_outputs = True`` for ``fullgraph=True``).
    """
    n = count.item()
    if torch.compiler.is_compiling():  # bounds for the unbacked size; eager slicing needs none
        torch._check(n >= 0)
        for t in kept:
            torch._check(n <= t.shape[0])
    return [t[:n] for t in kept]
