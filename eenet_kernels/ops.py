"""The single front-end of the ``eenet`` ops.

Every op exists once in the dispatcher as ``torch.ops.eenet.<name>`` (schemas in
``csrc/ops.cpp``, or :mod:`eenet_kernels._schemas` when the extension is not built), and
that op is the one path of every call: the public functions below, the engine,
``torch.compile`` / ``torch.export`` (through the fake kernels registered here) and C++
callers all reach the same kernels, chosen once per dispatch key at import:

- CPU: the compiled C++ kernel when the extension is built, else the reference;
- CUDA: the compiled CUDA kernels (csrc/cuda, backend ``cuda``) when the extension was
  built with them; else the Triton launcher (triton imported on the first call; the
  reference when triton cannot be imported);
- Meta / fake tensors: the fake kernels (metadata checks and output shapes);
- Autograd: the ops are inference ops, and no output ever requires grad, whatever the
  backend (a pass-through kernel runs the op below autograd);
- sparse and quantized tensors: the argument checks, which reject them by name.

``EENET_BACKEND=auto|reference|cpp|triton|cuda`` (or ``backend=`` per call) is a debugging
override: a backend other than the dispatcher's choice for the device is called directly.
``triton`` on CPU tensors runs only under the interpreter (``TRITON_INTERPRET=1``, tests);
``cuda`` needs CUDA tensors and an extension built with the CUDA kernels (``triton`` stays
available on CUDA tensors next to it).

``exit_score(..., check_finite=False)``: the kernels never let a row with NaN/inf logits
exit before the last exit (its score is NaN), so the default path costs no host sync;
``check_finite=True`` rejects NaN/inf feature rows up front instead (one host sync).
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from . import checks, reference
from . import triton as _triton
from ._schemas import SCHEMAS

BACKENDS: tuple[str, ...] = ("auto", "reference", "cpp", "triton", "cuda")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


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

_REFERENCE_IMPLS: dict[str, Callable] = {
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


# Whether the extension was built with the CUDA kernels (csrc/cuda): they then hold the CUDA
# key of every op, and no Triton forwarder is registered for it (below).
HAVE_CUDA_KERNELS: bool = all("CUDA" in keys for keys in _COMPILED_KEYS.values())


def compiled_backends(name: str) -> tuple[str, ...]:
    """Dispatch keys (``CPU``, ``CUDA``) served by a compiled kernel for op ``name``."""
    return _COMPILED_KEYS[name]


def triton_kernel(name: str) -> Callable | None:
    """The Triton entry point of op ``name`` (the reference's signature); None without
    triton."""
    mods = _triton.load()
    if mods is None:
        return None
    exit_mod, compact_mod = mods
    return getattr(exit_mod if name.startswith("exit_score") else compact_mod, name)


def cuda_kernel(name: str) -> Callable:
    """What the CUDA key of ``eenet::<name>`` runs when no compiled CUDA kernel is built: the
    Triton launcher, or the reference when triton cannot be imported."""
    return triton_kernel(name) or _REFERENCE_IMPLS[name]


def _lazy_cuda_kernel(name: str) -> Callable:
    """The registered CUDA kernel: :func:`cuda_kernel`, resolved on the first call so that
    ``import eenet_kernels`` does not import triton."""

    def kernel(*args: Any, **kwargs: Any) -> Any:
        return cuda_kernel(name)(*args, **kwargs)

    return kernel


def _written_tensors(name: str, args: Sequence[Any], kwargs: dict[str, Any]
                    ) -> tuple[list[str], list[torch.Tensor]]:
    """The buffers a call of op ``name`` writes, its ``Tensor(a!)`` arguments by schema:
    (their names, e.g. ``"dst[1]"``, the tensors)."""
    schema = getattr(torch.ops.eenet, name).default._schema
    names: list[str] = []
    out: list[torch.Tensor] = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = kwargs[arg.name] if arg.name in kwargs else args[i]
        if isinstance(value, list | tuple):
            names += [f"{arg.name}[{j}]" for j in range(len(value))]
            out += list(value)
        else:
            names.append(arg.name)
            out.append(value)
    return names, out


def _bump_versions(tensors: Sequence[torch.Tensor]) -> None:
    """What an in-place torch op does to the tensors it writes: autograd then refuses a
    backward through a value saved before the write."""
    for t in tensors:
        torch.autograd.graph.increment_version(t)


def _check_writable(op: str, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Refused before anything is written, as torch refuses its own in-place ops there: an
    inference tensor (made under ``torch.inference_mode``) outside inference mode, and, with
    grad mode on, a buffer that requires grad (the op writes below autograd, so a gradient
    through it would silently ignore the write). Not while torch.compile traces (it cannot
    trace these queries, and the traced graph reaches the dispatcher's kernels, whose
    Autograd step checks the same)."""
    if torch.compiler.is_compiling():
        return
    inference = torch.is_inference_mode_enabled()
    grad = torch.is_grad_enabled()
    for name, t in zip(names, tensors, strict=True):
        if not inference and t.is_inference():
            raise ValueError(f"eenet.{op}: {name} is an inference tensor (made under "
                             "torch.inference_mode) and the call runs outside inference "
                             "mode, where it cannot be written")
        if grad and t.requires_grad:
            raise ValueError(f"eenet.{op}: {name} requires grad; the op writes it without "
                             "recording the write for autograd: pass a buffer that does not "
                             "require grad, or call under torch.no_grad()")


def _below_autograd(name: str) -> Callable:
    """Autograd kernel: run the op without recording it, so that no output requires grad on
    any backend (the reference alone would otherwise differentiate, the compiled kernels
    not), and bump the versions of the buffers it writes (csrc/ops.cpp when built)."""
    op = getattr(torch.ops.eenet, name)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        names, written = _written_tensors(name, args, kwargs)
        _check_writable(name, names, written)
        with torch._C._AutoDispatchBelowAutograd():
            result = op(*args, **kwargs)
        _bump_versions(written)
        return result

    return kernel


# Layouts the kernels cannot read: their inputs reach the reference, whose checks reject
# them by argument name (the dispatcher would otherwise raise its own per-backend error).
_UNSUPPORTED_KEYS = ("SparseCPU", "SparseCUDA", "SparseCsrCPU", "SparseCsrCUDA",
                     "QuantizedCPU", "QuantizedCUDA")

_impl_lib = torch.library.Library("eenet", "IMPL")  # kept alive at module level
for _name, _fn in _REFERENCE_IMPLS.items():
    if "CPU" not in _COMPILED_KEYS[_name]:
        _impl_lib.impl(_name, _fn, "CPU")
    if "CUDA" not in _COMPILED_KEYS[_name]:
        _impl_lib.impl(_name, _lazy_cuda_kernel(_name), "CUDA")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"eenet::{_name}", "Autograd"):
        _impl_lib.impl(_name, _below_autograd(_name), "Autograd")  # csrc/ops.cpp when built
    for _key in _UNSUPPORTED_KEYS:
        _impl_lib.impl(_name, _fn, _key)


# ---------------------------------------------------------------------------------------
# Fake kernels: the same metadata checks, in the same order and under the same op names as
# the kernels, and the output shapes.


def _exit_outputs(feats: torch.Tensor, weight: torch.Tensor) -> reference.ExitResult:
    n, c = feats.shape[0], weight.shape[0]
    return (feats.new_empty((n, c), dtype=torch.float32),
            feats.new_empty((n,), dtype=torch.float32),
            feats.new_empty((n,), dtype=torch.bool),
            feats.new_empty((n,), dtype=torch.int64),
            feats.new_empty((n,), dtype=torch.bool))


@torch.library.register_fake("eenet::exit_score")
def _exit_score_fake(feats, weight, bias, policy, threshold, is_last=False, prev_scores=None,
                     prev_preds=None, sched_weight=None, sched_bias=0.0, use_vote=False):
    checks.check_exit_score(feats, weight, bias, policy, threshold, prev_scores, prev_preds,
                            sched_weight, use_vote, sched_bias=sched_bias)
    return _exit_outputs(feats, weight)


@torch.library.register_fake("eenet::exit_score_write")
def _exit_score_write_fake(feats, weight, bias, policy, threshold, is_last=False,
                           prev_scores=None, prev_preds=None, sched_weight=None, sched_bias=0.0,
                           use_vote=False, *, row_index, exit_index, out_logits, out_score,
                           out_exit):
    checks.check_exit_score(feats, weight, bias, policy, threshold, prev_scores, prev_preds,
                            sched_weight, use_vote, op="exit_score_write", sched_bias=sched_bias)
    checks.check_exit_write(feats, weight, row_index, exit_index, out_logits, out_score,
                            out_exit, reference.write_inputs(bias, prev_scores, prev_preds,
                                                             sched_weight))
    return _exit_outputs(feats, weight)


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


def dispatcher_backend(device: torch.device) -> str:
    """The backend that ``torch.ops.eenet.*`` runs on ``device``: ``cpp``, ``cuda``,
    ``triton`` or ``reference``."""
    if device.type == "cpu":
        return "cpp" if HAVE_EXTENSION else "reference"
    if device.type == "cuda":
        if HAVE_CUDA_KERNELS:
            return "cuda"
        return "triton" if _triton.is_available() else "reference"
    return "reference"


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend that will run an op on ``device``: ``reference``, ``cpp``, ``triton`` or
    ``cuda``.

    ``backend`` (or ``EENET_BACKEND`` when None) may be ``auto`` (the dispatcher's choice,
    :func:`dispatcher_backend`). A backend that cannot run here raises ``RuntimeError``
    instead of silently falling back.
    """
    choice = backend or os.environ.get("EENET_BACKEND", "auto") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"eenet: backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return dispatcher_backend(device)
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
    if choice == "cuda" and (device.type != "cuda" or not HAVE_CUDA_KERNELS):
        why = ("the extension was built without the CUDA kernels (csrc/cuda)"
               if not HAVE_CUDA_KERNELS else f"it runs on CUDA tensors, not {device.type}")
        raise RuntimeError(f"eenet: backend 'cuda' was requested but {why}")
    if choice == "cpp" and (device.type != "cpu" or not HAVE_EXTENSION):
        why = ("the compiled extension is not loaded" if not HAVE_EXTENSION
               else f"it runs on CPU tensors, not {device.type}")
        raise RuntimeError(f"eenet: backend 'cpp' was requested but {why}")
    return choice


def op_target(name: str, device: torch.device, backend: str | None = None) -> Callable:
    """What a public function calls for op ``name`` on ``device``: ``torch.ops.eenet.<name>``
    whenever the requested backend is the dispatcher's own choice there (always, unless a
    debugging override asks for another), else that backend's function."""
    chosen = resolve_backend(device, backend)
    if chosen == dispatcher_backend(device) or device.type == "meta":
        return getattr(torch.ops.eenet, name)
    if chosen == "reference":
        return _REFERENCE_IMPLS[name]
    if torch.compiler.is_compiling():
        # the launcher reads data pointers and storage offsets, which torch.compile cannot
        # trace; only the dispatcher's op has a fake kernel
        raise RuntimeError(
            f"eenet: backend 'triton' cannot be traced by torch.compile on {device.type} "
            f"tensors, where the dispatcher's kernels are '{dispatcher_backend(device)}': "
            "under torch.compile leave backend unset (or 'auto')")
    kernel = triton_kernel(name)
    if kernel is None:  # resolve_backend checked that triton imports; kept for -O runs
        raise RuntimeError("eenet: backend 'triton' was requested but triton cannot be imported")
    return kernel


def _bumps_nothing(target: Callable, name: str) -> bool:
    """Whether a call of ``target`` (from :func:`op_target`) leaves the written buffers'
    versions as they were: a Triton launcher called directly, or the dispatcher's kernels
    under ``torch.inference_mode``, which skips the Autograd step that bumps them (torch's
    own in-place ops still bump a normal tensor there); the reference's in-place writes bump
    them in any mode."""
    if target is _REFERENCE_IMPLS[name] or torch.compiler.is_compiling():
        return False  # (a traced graph's mutations are functionalised)
    return target is not getattr(torch.ops.eenet, name) or torch.is_inference_mode_enabled()


# ---------------------------------------------------------------------------------------
# Public functions.


class ExitScore(NamedTuple):
    """Result of :func:`exit_score`: logits (N, C) float32, score (N,) float32, exit_mask
    (N,) bool, pred (N,) int64 (argmax of the logits), keep (N,) bool (= ~exit_mask)."""

    logits: torch.Tensor
    score: torch.Tensor
    exit_mask: torch.Tensor
    pred: torch.Tensor
    keep: torch.Tensor


def _check_finite_inputs(op: str, feats: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> None:
    if torch.compiler.is_compiling():
        return
    checks.check_exit_score(feats, weight, bias, "max_prob", 0.0, None, None, None, False, op=op)
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
    check_finite: bool = False,
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
            NaN/inf (costs one host sync; skipped under torch.compile). Off by default: such
            rows get a NaN score and never exit before the last exit.
        backend: override ``EENET_BACKEND`` for this call.

    Returns:
        :class:`ExitScore` (logits (N, C) float32, score (N,) float32, exit_mask (N,) bool,
        pred (N,) int64, keep (N,) bool).
    """
    if check_finite:
        _check_finite_inputs("exit_score", feats, weight, bias)
    args = (feats, weight, bias, policy, float(threshold), is_last, prev_scores, prev_preds,
            sched_weight, float(sched_bias), use_vote)
    return ExitScore(*op_target("exit_score", feats.device, backend)(*args))


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
    check_finite: bool = False,
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
    if isinstance(exit_index, bool) or not isinstance(exit_index, numbers.Integral):
        raise TypeError(f"eenet.exit_score_write: exit_index must be an int, got "
                        f"{exit_index!r}")
    outs = {"row_index": row_index, "exit_index": int(exit_index), "out_logits": out_logits,
            "out_score": out_score, "out_exit": out_exit}
    if not _INT64_MIN <= outs["exit_index"] <= _INT64_MAX:
        # the schema's int cannot carry it to any kernel: raise the checks' own error here
        checks.check_exit_score(feats, weight, bias, policy, float(threshold), prev_scores,
                                prev_preds, sched_weight, use_vote, op="exit_score_write",
                                sched_bias=float(sched_bias))
        checks.check_exit_write(feats, weight, row_index, outs["exit_index"], out_logits,
                                out_score, out_exit)
    _check_writable("exit_score_write", ("out_logits", "out_score", "out_exit"),
                    (out_logits, out_score, out_exit))
    target = op_target("exit_score_write", feats.device, backend)
    result = ExitScore(*target(*args, **outs))
    if _bumps_nothing(target, "exit_score_write"):
        _bump_versions((out_logits, out_score, out_exit))
    return result


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
    if out is None:
        kept, count = op_target("compact", keep.device, backend)(keep, src)
        return list(kept), count
    dst = list(out)
    _check_writable("compact_out", [f"dst[{i}]" for i in range(len(dst))], dst)
    target = op_target("compact_out", keep.device, backend)
    count = target(keep, src, dst)
    if _bumps_nothing(target, "compact_out"):
        _bump_versions(dst)
    return dst, count


def take(kept: Sequence[torch.Tensor], count: torch.Tensor) -> list[torch.Tensor]:
    """The first ``count`` rows of each compacted buffer: the one host sync of a stage.

    ``count``: the 0-dim integer tensor :func:`compact` returns; ``TypeError`` for anything
    else, ``ValueError`` for a count outside [0, rows] of a buffer (a slice would silently
    take all but the last rows for a negative one, or fewer rows than asked for one too
    large). Under ``torch.compile`` the count becomes an unbacked symbolic size (set
    ``torch._dynamo.config.capture_scalar_outputs = True`` for ``fullgraph=True``).
    """
    if not isinstance(count, torch.Tensor) or count.dim() != 0 or count.dtype not in (
            torch.int64, torch.int32):
        what = (f"a {count.dim()}-dim {count.dtype} tensor" if isinstance(count, torch.Tensor)
                else type(count).__name__)
        raise TypeError(f"eenet.take: count must be the 0-dim int64 tensor compact returns, "
                        f"got {what}")
    n = count.item()
    if torch.compiler.is_compiling():  # bounds for the unbacked size
        torch._check(n >= 0)
        for t in kept:
            torch._check(n <= t.shape[0])
    else:
        for i, t in enumerate(kept):
            if not 0 <= n <= t.shape[0]:
                raise ValueError(f"eenet.take: count {n} is outside [0, {t.shape[0]}], the "
                                 f"rows of kept[{i}]")
    return [t[:n] for t in kept]
