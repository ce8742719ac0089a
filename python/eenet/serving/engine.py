"""The re-batching serving engine: one request = one sample, answered by a future.

A stage-queue executor (the scheme of E3 and DREX): one worker thread runs the network
stage by stage on batches it assembles itself, so that the survivors of different batches
merge at the deeper stages instead of running there in ever smaller batches.

Data flow
---------
``submit`` checks the sample, puts it in the bounded admission queue (``queue_size``
requests not started yet; back-pressure per ``on_full``, never a silent drop) and returns a
``concurrent.futures.Future``. The worker sorts admitted rows into **shape groups** (the
sample's shape, dtype and device and those of every row input: only rows of one group can be
stacked) and keeps, per group and stage k, a queue of pending rows. A pending row carries
what stage k needs: its activation (a view of the previous run's output), its row inputs,
the policy's history (its scores and predictions at exits 0..k-1, stacked into the fused
op's ``prev_scores`` (n, k) float32 and ``prev_preds`` (n, k) int64), exit k-1's logits and
score (for a deadline's forced exit), its deadline and its future.

A step of the worker: take the admission queue into the stage queues, drop cancelled rows,
settle rows past their deadline, pick one queue (:meth:`ServingEngine._pick`), take up to
``max_batch`` of its rows (earliest deadline first, then admission order), run stage k and
exit k on them (``ek.exit_score`` with the runtime engine's per-exit arguments, on
``head.features(h, **head_row_inputs(head, row_inputs))``), answer the rows that exit and
append the others to stage k+1's queue.

Scheduling rule
---------------
A queue is *ready* when any of these holds:

1. it is a stage-0 queue (admission: new rows never wait for more rows), or a queue that
   does not merge (its rows are one run's survivors, see ``rebatch``);
2. it holds its target batch (``max_batch``; with ``rebatch="auto"`` the profiled size from
   which bigger batches stop paying, see below);
3. its oldest row has waited ``max_wait_ms`` at this stage;
4. nothing is pending upstream of it: no row of its shape group waits at a shallower stage,
   so no row could still join it (waiting would only wait for new requests);
5. the engine is closing (drain).

The shallowest non-empty queue of every group is ready by rule 4, so the worker never idles
while rows are pending. Among the ready queues it runs the deepest stage (finish the work
in flight, free its memory, answer its requests), then the one whose first row has the
earliest deadline, then the one whose oldest row waited longest. A deeper queue that is not
ready waits while the shallower stages feed it, at most ``max_wait_ms``.

``rebatch``
-----------
- ``"always"``: every stage queue merges the survivors of every run of its group.
- ``"never"``: each stage-0 run is an *admitted group*: its survivors form their own queue at
  every later stage (ready at once, rule 1), so the group runs through all stages by itself,
  exactly the per-batch compact loop of :class:`eenet.runtime.Engine` fed with the batches
  that formed in the admission queue.
- ``"auto"``: per shape group, after its first stage-0 run, the worker profiles every
  stage (with its exit) on copies of the sample of a row that passed stage 0 (so a bad
  request cannot spoil a profile; the run merges everywhere, and so does the group until a
  run has such a row) at the batch sizes ``buckets`` (default :data:`PROFILE_SIZES`,
  capped at ``max_batch``): warm-up, then the best of
  :data:`PROFILE_REPEATS` timed calls. Stage k >= 1 merges iff its time per row at the
  largest size is at most :data:`MERGE_GAIN` (0.8) times its time per row at batch 1: a
  merge costs latency (rows wait up to ``max_wait_ms``), so it must buy a clear saving, and
  20% is well above the few percent that repeated timings of one call differ by on a CPU.
  A merging stage's target batch is the smallest profiled size whose time per row is within
  :data:`SATURATION` (10%) of the best one: beyond it, waiting for more rows buys little.
  Stages that do not merge behave as in ``"never"``. A merging stage of ``"auto"`` *waits*
  (rules 2 and 3) only while its group is backlogged, ``max_batch`` or more rows waiting
  for stage 0: then the server cannot keep up and bigger batches at the deeper stages buy
  capacity. Below that it runs at once with the survivors that have gathered (they still
  merge, without waiting): measured on a CPU, waiting for more rows below saturation only
  added latency (``bench.serve``). The profile and the decisions are in
  :attr:`ServingEngine.plans`. A profile that raises leaves the group merging everywhere.
  Profiling stalls the worker for a few dozen stage calls, so only the first
  ``max_profiles`` groups (default 8) are profiled, and a group of a kind no profiled group
  has (another rank, dtype, device or set of row inputs). Every other group reuses the plan
  of the profiled group of its kind whose sample has the number of elements nearest its
  own (preferring a profile that succeeded): token ids of a new length take the plan of
  the nearest profiled length. ``plans`` keeps at most :data:`MAX_PLANS` entries: past
  that, the plans not profiled, of groups with no row pending, are forgotten oldest first
  (a group seen again takes its plan again; profiled plans are kept).

Failures, deadlines, closing
----------------------------
A run of stage k (its stacking, the stage, the exit head and the op) that raises is retried
``retries`` times on the same rows. When every attempt fails, the rows are split in halves
that run one after the other, once each, a failing part of several rows being halved again:
the rows that fail alone fail with :class:`StageFailed` naming the stage, chained to the
last exception, and the others go on as if their batch had been those parts. So a request
the network cannot take (token ids outside the vocabulary, a sequence past the positions)
fails by itself, never the requests batched with it; the engine keeps serving. Isolating b
bad rows of a batch of n costs about 2 b log2(n) extra runs (2n - 2 when the stage fails
on every row). A row past its deadline leaves with exit k-1's answer, flagged ``forced``
(``on_deadline="exit"``; a row that has passed no exit yet, and every row with
``on_deadline="error"``, fails with :class:`DeadlineExceeded`); deadlines are checked
before every stage run, so a row can overrun its deadline by the one run in progress (with
the parts of a failed run that it isolates).
``close(drain=True)`` answers everything admitted, ``close(drain=False)`` fails what is
pending with :class:`EngineClosed` after the run in progress; both refuse new requests. An
unexpected error inside the worker itself fails every pending future with that error and
makes ``submit`` raise :class:`EngineClosed` chained to it: the worker never dies silently.

Dropping an engine: the worker thread holds its engine only weakly between stage runs, so an
engine dropped without ``close()`` answers what it admitted (its futures hold it), is
collected once idle and unreferenced, and its worker stops then.

Interpreter exit: close an engine when done with it (``with engine:`` or ``close()``). One
left running is closed by an ``atexit`` hook of this module (it holds the engines through
weak references, so it keeps none alive): the stage run in progress finishes, every other
pending request fails with :class:`EngineClosed` (its message says that the interpreter
exited with the engine open), and the hook waits for the worker to stop. An engine whose
``close(drain=True, timeout=...)`` returned before its drain was done finishes the drain
first. The hook runs once the interpreter has joined its non-daemon threads (those still
waiting for answers get them) and before it finalizes: a daemon worker still inside a
torch op at finalization would be killed in C++ code, and the process would abort
("terminate called without an active exception").

Threads: ``submit``, ``submit_many``, ``snapshot``, ``close`` and ``Future.cancel`` may be
called from any number of threads. Callbacks run in the worker thread when a request is
answered (or in the cancelling thread): keep them short, they delay the next stage run. The
network runs in the worker thread only, under ``torch.inference_mode()``.
"""

from __future__ import annotations

import atexit
import itertools
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

import eenet_kernels as ek

from ..budget import is_number
from ..nn.heads import classifier_operands
from ..runtime.engine import Engine, check_network, exit_features, guarded_stages
from .stats import ServingStats, StatsRecorder

if TYPE_CHECKING:
    from ..budget import Costs
    from ..policies.base import ExitPolicy

__all__ = ["MAX_PLANS", "MERGE_GAIN", "PROFILE_REPEATS", "PROFILE_SIZES", "REBATCH_MODES",
           "SATURATION", "Answer", "DeadlineExceeded", "EngineClosed", "QueueFull", "RebatchPlan",
           "RequestCancelled", "ServingConfig", "ServingEngine", "ServingError",
           "StageFailed", "plan_from_profile"]

REBATCH_MODES: tuple[str, ...] = ("auto", "always", "never")
ON_FULL: tuple[str, ...] = ("reject", "block")
ON_DEADLINE: tuple[str, ...] = ("exit", "error")
PROFILE_SIZES: tuple[int, ...] = (1, 4, 16, 64)
"""Batch sizes ``rebatch="auto"`` profiles without ``buckets`` (capped at ``max_batch``)."""
PROFILE_REPEATS = 3
"""Timed calls per stage and size in a profile (the best one counts), after one warm-up."""
MAX_PLANS = 1024
"""The most entries :attr:`ServingEngine.plans` keeps (module docstring, ``rebatch``)."""
MERGE_GAIN = 0.8
"""``rebatch="auto"`` merges at a stage whose time per row at the largest profiled size is
at most this fraction of its time per row at batch 1."""
SATURATION = 1.1
"""A merging stage's target batch: the smallest profiled size whose time per row is within
this factor of the best."""


# -- errors ----------------------------------------------------------------------------------


class ServingError(Exception):
    """Base class of the serving engine's errors."""


class QueueFull(ServingError):
    """The admission queue holds ``queue_size`` requests: ``on_full="reject"`` refuses at
    once, ``"block"`` after waiting ``block_timeout_s`` for room."""


class RequestCancelled(ServingError, CancelledError):
    """What ``result()`` / ``exception()`` of a cancelled request's future raise (a
    ``concurrent.futures.CancelledError``)."""


class DeadlineExceeded(ServingError):
    """The request's deadline passed before it could be answered (no exit passed yet, or
    ``on_deadline="error"``)."""


class EngineClosed(ServingError):
    """The engine is closed (or its worker stopped on an internal error, chained): no new
    requests; with ``close(drain=False)``, the pending ones fail with it."""


class StageFailed(ServingError):
    """Stage ``stage`` (the stage, its exit head or the exit op) raised on every one of the
    ``attempts`` runs that held this request, the last of them on it alone; the last exception
    is chained (``__cause__``). ``rows``: the rows of the batch it came in (the others ran
    without it)."""

    def __init__(self, message: str, stage: int | None = None, attempts: int = 1,
                 rows: int = 0) -> None:
        super().__init__(message)
        self.stage = stage
        self.attempts = attempts
        self.rows = rows

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.stage, self.attempts, self.rows))


# -- configuration and answers ---------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _seconds(v: object) -> float | None:
    """``v`` as a finite float when it is a number (:func:`eenet.budget.is_number`: an int,
    a float, a NumPy scalar, a 0-dim real tensor); None for anything else (a bool, a string,
    NaN, inf)."""
    if not is_number(v):
        return None
    f = float(v)  # type: ignore[arg-type]
    return f if math.isfinite(f) else None


def _private(t: torch.Tensor) -> torch.Tensor:
    """A copy of a submitted tensor that the caller cannot change."""
    return t.detach().clone()


@dataclass(frozen=True)
class ServingConfig:
    """How a :class:`ServingEngine` batches, queues, retries and reports (module docstring).

    - ``max_batch``: rows per stage run, at most (int >= 1).
    - ``buckets``: optional increasing batch sizes (ints >= 1); a stage runs
      ``min(pending, max_batch)`` rows, never padded: buckets are the sizes
      ``rebatch="auto"`` profiles (and so the targets it can pick).
    - ``max_wait_ms``: a merging stage's oldest row waits at most this long (>= 0).
    - ``queue_size``: admitted requests not started yet, at most (int >= 1).
    - ``on_full``: ``"reject"`` (``QueueFull`` at once) or ``"block"`` (wait up to
      ``block_timeout_s`` seconds for room, then ``QueueFull``).
    - ``retries``: extra attempts of a failed stage run (int >= 0).
    - ``rebatch``: ``"auto"``, ``"always"`` or ``"never"``.
    - ``max_profiles``: how many shape groups ``rebatch="auto"`` profiles (int >= 1); a
      later group reuses the plan of a profiled group of its kind (module docstring).
    - ``on_deadline``: ``"exit"`` (leave at the exit reached, flagged forced) or
      ``"error"`` (``DeadlineExceeded``).
    - ``device``: where the network runs (default: its parameters' device; it must be there).
    - ``costs`` / ``budget``: an :class:`eenet.budget.Costs` (one value per exit) and a budget
      (a fraction of the full model's cost, or an :class:`eenet.budget.Budget`), for the
      cost telemetry only (:class:`~eenet.serving.ServingStats`); the engine enforces no
      budget.
    """

    max_batch: int = 64
    buckets: tuple[int, ...] | None = None
    max_wait_ms: float = 2.0
    queue_size: int = 1024
    on_full: str = "reject"
    block_timeout_s: float = 1.0
    retries: int = 0
    rebatch: str = "auto"
    max_profiles: int = 8
    on_deadline: str = "exit"
    device: torch.device | str | None = None
    costs: Costs | None = None
    budget: Any = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_batch) or self.max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {self.max_batch!r}")
        if self.buckets is not None:
            b = tuple(self.buckets) if isinstance(self.buckets, list | tuple) else None
            if not b or not all(_is_int(v) and v >= 1 for v in b) or list(b) != sorted(
                    set(b)):
                raise ValueError(f"buckets must be None or increasing ints >= 1, got "
                                 f"{self.buckets!r}")
            object.__setattr__(self, "buckets", b)
        if not _is_real(self.max_wait_ms) or self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got "
                             f"{self.max_wait_ms!r}")
        if not _is_int(self.queue_size) or self.queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {self.queue_size!r}")
        if self.on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {ON_FULL}, got {self.on_full!r}")
        if not _is_real(self.block_timeout_s) or self.block_timeout_s < 0:
            raise ValueError(f"block_timeout_s must be a finite number >= 0, got "
                             f"{self.block_timeout_s!r}")
        if not _is_int(self.retries) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")
        if self.rebatch not in REBATCH_MODES:
            raise ValueError(f"rebatch must be one of {REBATCH_MODES}, got {self.rebatch!r}")
        if not _is_int(self.max_profiles) or self.max_profiles < 1:
            raise ValueError(f"max_profiles must be an int >= 1, got {self.max_profiles!r}")
        if self.on_deadline not in ON_DEADLINE:
            raise ValueError(f"on_deadline must be one of {ON_DEADLINE}, got "
                             f"{self.on_deadline!r}")
        if self.device is not None:
            object.__setattr__(self, "device", torch.device(self.device))
        if self.budget is not None and self.costs is None:
            raise ValueError("a budget needs costs (ServingConfig(costs=..., budget=...))")


@dataclass(frozen=True)
class Answer:
    """A request's answer: ``logits`` (C,) float32 on CPU at exit ``exit_index``, the
    policy's ``score`` there, ``forced`` (its deadline sent it out at the exit it had
    reached, before the policy would have) and ``latency_s`` (submit to answer)."""

    logits: torch.Tensor
    exit_index: int
    score: float
    forced: bool
    latency_s: float


@dataclass(frozen=True)
class RebatchPlan:
    """How the stages of one shape group batch (see the module docstring, ``rebatch``).

    ``merge`` (K bools): whether stage k's queue merges the survivors of different runs
    (stage 0, the admission, always does); ``target`` (K ints): the rows at which a merging
    stage runs without waiting; ``sizes``: the profiled batch sizes and ``per_row_s`` (K
    tuples, one time per size, seconds per row of stage k with its exit) for
    ``rebatch="auto"`` (empty otherwise); ``error``: why the profile failed, if it did;
    ``profiled_on``: the group key of the profiled group whose plan this group reuses (None:
    profiled on this group, or not ``"auto"``)."""

    merge: tuple[bool, ...]
    target: tuple[int, ...]
    sizes: tuple[int, ...] = ()
    per_row_s: tuple[tuple[float, ...], ...] = ()
    error: str | None = None
    profiled_on: tuple | None = None


def plan_from_profile(sizes: Sequence[int], per_row_s: Sequence[Sequence[float]]
                      ) -> RebatchPlan:
    """The ``rebatch="auto"`` decisions from a profile: ``sizes`` increasing batch sizes
    starting at 1, ``per_row_s[k][i]`` stage k's seconds per row at ``sizes[i]``. Stage k
    >= 1 merges iff ``per_row_s[k][-1] <= MERGE_GAIN * per_row_s[k][0]``; its target is the
    smallest size within ``SATURATION`` of its best time per row (stage 0: merging, the
    largest size)."""
    sizes = tuple(int(s) for s in sizes)
    if not sizes or sizes[0] != 1:
        raise ValueError(f"a profile's sizes must start at 1, got {sizes}")
    merge, target = [], []
    for k, times in enumerate(per_row_s):
        if len(times) != len(sizes):
            raise ValueError(f"stage {k}: {len(times)} times for {len(sizes)} sizes")
        best = min(times)
        merge.append(k == 0 or times[-1] <= MERGE_GAIN * times[0])
        target.append(sizes[-1] if k == 0 else
                      next(s for s, t in zip(sizes, times, strict=True)
                           if t <= SATURATION * best))
    return RebatchPlan(tuple(merge), tuple(target), sizes,
                       tuple(tuple(float(t) for t in ts) for ts in per_row_s))


class _Future(Future):
    """A request's future: ``result()`` / ``exception()`` of a cancelled request raise
    :class:`RequestCancelled` (a ``CancelledError``)."""

    def result(self, timeout: float | None = None) -> Answer:
        try:
            return super().result(timeout)
        except CancelledError as exc:
            if isinstance(exc, RequestCancelled) or not self.cancelled():
                raise
            raise RequestCancelled("the request was cancelled") from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        except CancelledError as exc:
            if isinstance(exc, RequestCancelled) or not self.cancelled():
                raise
            raise RequestCancelled("the request was cancelled") from None


# -- the worker's state ----------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Row:
    """One pending request. ``x``: the next stage's input for this row (the sample, then a
    view of the last stage output's row); ``inputs``: its row inputs (views); ``scores``
    (k,) float32 / ``preds`` (k,) int64: its history at exits 0..k-1 (None when the policy
    reads none); ``logits`` (C,) float32 CPU / ``score``: exit k-1's results; ``stage``: k,
    the next stage it runs."""

    fut: _Future
    x: torch.Tensor
    inputs: dict[str, torch.Tensor]
    group: tuple
    submitted: float
    deadline: float
    seq: int = 0
    stage: int = 0
    enqueued: float = 0.0
    scores: torch.Tensor | None = None
    preds: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    score: float = math.nan


def _order(row: _Row) -> tuple[float, int]:
    return (row.deadline, row.seq)


@dataclass(eq=False)
class _Queue:
    """The rows of one shape group waiting at one stage; ``run``: None for a merging queue,
    else the id of the run whose survivors these are. Rows are kept sorted by (deadline,
    admission order)."""

    group: tuple
    stage: int
    run: int | None
    target: int
    rows: list[_Row] = field(default_factory=list)

    def add(self, rows: Iterable[_Row]) -> None:
        self.rows.extend(rows)
        self.rows.sort(key=_order)  # runs of sorted rows: linear time

    def take(self, n: int) -> list[_Row]:
        taken, self.rows = self.rows[:n], self.rows[n:]
        return taken

    def oldest(self) -> float:
        return min(r.enqueued for r in self.rows)


@dataclass
class _RunOutput:
    """A stage run's results: stage output h (n, ...) and row inputs on the device; on the
    CPU exit mask, scores, logits (n, C) float32; the survivors' new history (n, k+1)."""

    h: torch.Tensor
    inputs: dict[str, torch.Tensor]
    exit_mask: list[bool]
    score: list[float]
    logits: torch.Tensor
    scores: torch.Tensor | None
    preds: torch.Tensor | None


def _settle(fut: Future, result: Any = None, exc: BaseException | None = None) -> bool:
    """Set ``fut``'s result or exception unless it is done (cancelled) already; whether it
    was set."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        return False
    return True


def _others(n: int) -> str:
    return "the other row" if n == 1 else f"the other {n} rows"


def _group_key(x: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> tuple:
    return (tuple(x.shape), x.dtype, x.device,
            tuple((name, tuple(t.shape), t.dtype, t.device)
                  for name, t in sorted(inputs.items())))


def _kind(group: tuple) -> tuple:
    """What a shape group is apart from its sizes: x's rank, dtype and device and each row
    input's name, rank, dtype and device."""
    shape, dtype, device, inputs = group
    return (len(shape), dtype, device,
            tuple((name, len(s), d, dev) for name, s, d, dev in inputs))


def _describe_group(group: tuple) -> str:
    shape, dtype, device, inputs = group
    text = f"x {shape} {dtype} on {device}"
    for name, s, d, _ in inputs:
        text += f", {name} {s} {d}"
    return text


# -- engines left open at interpreter exit -------------------------------------------------

_RUNNING: weakref.WeakSet[ServingEngine] = weakref.WeakSet()
"""The engines whose worker thread runs (a worker removes its engine when it stops)."""
_RUNNING_LOCK = threading.Lock()
_AT_EXIT_MESSAGE = ("the Python interpreter exited with the serving engine open (close it, "
                   "e.g. `with engine:` or engine.close(), to answer pending requests)")


def _close_running_engines() -> None:
    """The ``atexit`` hook (module docstring, interpreter exit): close every engine whose
    worker still runs and wait for the worker to stop."""
    with _RUNNING_LOCK:
        engines = list(_RUNNING)
    for engine in engines:
        engine._close_at_exit()


atexit.register(_close_running_engines)


# -- the worker thread -----------------------------------------------------------------------

# how often an idle worker looks whether its engine is gone, in case the wake-up of
# _wake_on_collect came between its check and its wait (a collection inside the wait's own
# allocations)
_IDLE_RECHECK_S = 1.0


def _wake_on_collect(work: threading.Condition) -> Callable[[weakref.ref], None]:
    """The callback of the worker's weak reference to its engine: wakes the worker waiting
    on ``work`` once the engine is collected (it holds ``work``, never the engine)."""

    def wake(_ref: weakref.ref) -> None:
        with work:
            work.notify_all()

    return wake


def _wait_for_work(ref: weakref.ref[ServingEngine], work: threading.Condition) -> bool:
    """Wait, holding the engine only weakly, until it has work (True) or is gone (False)."""
    with work:
        while True:
            engine = ref()
            if engine is None:
                return False
            if engine._has_work():
                return True
            del engine
            work.wait(_IDLE_RECHECK_S)


def _serve(ref: weakref.ref[ServingEngine], work: threading.Condition) -> None:
    """The worker thread: scheduling steps while the engine has work. Between steps it holds
    the engine only through ``ref``, so that an engine dropped without ``close()`` is
    collected once it is idle (what it admitted is answered first: its futures hold it), and
    the worker then stops."""
    engine = None
    try:
        with torch.inference_mode():
            while _wait_for_work(ref, work):
                engine = ref()
                if engine is None or not engine._step():
                    return
                engine = None
    except BaseException as exc:  # an internal error: fail everything, refuse more
        engine = engine if engine is not None else ref()
        if engine is not None:
            engine._die(exc)
    finally:
        engine = engine if engine is not None else ref()
        if engine is not None:
            with _RUNNING_LOCK:
                _RUNNING.discard(engine)


# -- the engine ------------------------------------------------------------------------------


class ServingEngine:
    """Serve ``net`` (an :class:`eenet.nn.MultiExitNetwork`) under ``policy`` (an
    :class:`~eenet.policies.ExitPolicy`) one request at a time, re-batching at every stage
    (module docstring). ``with engine:`` starts the worker and closes (draining) at the
    end; ``submit`` also starts it.

    Input checks at ``submit`` (the call raises): ``x`` and every row input must be tensors
    (``TypeError``) on the CPU or the engine's device (``ValueError``; CPU ones are moved
    when their batch runs); a floating-point ``x`` must have the first stage's parameter
    dtype (``TypeError``: the engine does not cast); ``submit_many``'s inputs need a batch
    dimension, the same n everywhere (``ValueError``); ``deadline_s`` a finite number > 0.
    A sample the network cannot take (a wrong shape, an integer image) is found when its
    group's stage 0 runs: its future fails with :class:`StageFailed` (stage 0), chained to a
    ``ValueError`` / ``TypeError`` naming the sample's shape and dtype. Samples of another
    shape form their own group, and a failed run is split until its failing rows run alone
    (module docstring, failures), so a bad sample never fails the rows batched with it.

    Closing: call :meth:`close` (or use ``with engine:``) when done; it may be called any
    number of times. An engine dropped unclosed stops its worker once it is collected; one
    left open at interpreter exit is closed then: the stage run in progress finishes and the
    other pending requests fail with :class:`EngineClosed` (module docstring).
    """

    def __init__(self, net: torch.nn.Module, policy: ExitPolicy,
                 config: ServingConfig | None = None) -> None:
        from ..budget import Costs, as_budget

        config = ServingConfig() if config is None else config
        if not isinstance(config, ServingConfig):
            raise TypeError(f"config must be a ServingConfig, got {type(config).__name__}")
        check_network(net, policy)
        params = list(net.parameters())
        net_device = params[0].device if params else torch.device("cpu")
        device = config.device if config.device is not None else net_device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if params and net_device != device:
            raise ValueError(f"the network is on {net_device} but config.device is {device}; "
                             "move the network there first")
        batched = Engine(net, policy, telemetry=False)
        self.net = net.eval()
        self.policy = batched.policy
        self.config = config
        self.device = device
        self.num_exits = len(net.heads)
        self.num_classes = net.heads[-1].classifier.out_features
        # the per-exit arguments of the fused op, exactly as the batched engine builds them
        self._exit_kwargs: list[dict[str, Any]] = batched.exit_op_kwargs(device)
        self._stages = guarded_stages(net)
        self._heads = list(net.heads)
        first = next((p for p in net.stages[0].parameters() if p.is_floating_point()), None)
        self._input_dtype = None if first is None else first.dtype
        self._needs_scores = policy.needs_scores
        self._needs_preds = policy.needs_preds

        budget = unit = None
        costs = config.costs
        if costs is not None:
            if not isinstance(costs, Costs):
                raise TypeError(f"config.costs must be an eenet.budget.Costs, got "
                                f"{type(costs).__name__}")
            if len(costs.values) != self.num_exits:
                raise ValueError(f"config.costs has {len(costs.values)} values but the network "
                                 f"has {self.num_exits} exits")
            unit = costs.unit
            if config.budget is not None:
                budget = as_budget(config.budget).absolute(costs)
        self._stats = StatsRecorder(self.num_exits, None if costs is None else costs.values,
                                    budget, unit)

        # shared with submitting threads, under self._lock
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)  # the worker waits for requests
        self._space = threading.Condition(self._lock)  # blocked submitters wait for room
        self._intake: deque[_Row] = deque()
        self._not_started = 0
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._abort = False
        self._abort_message = "the serving engine was closed without draining"
        self._cancel_dirty = False
        self._broken: BaseException | None = None
        # the worker's own
        self._queues: dict[tuple, _Queue] = {}
        self._pending = [0] * self.num_exits
        self._running: list[_Row] = []
        self._runs = itertools.count()
        self.plans: dict[tuple, RebatchPlan] = {}
        """The :class:`RebatchPlan` of each shape group seen (at most :data:`MAX_PLANS`), by
        group key (x's shape, dtype and device, then (name, shape, dtype, device) of each row
        input); the worker adds to it (read it, e.g. :meth:`describe_plans`, with that in
        mind)."""
        self._profiled: dict[tuple, RebatchPlan] = {}  # the groups "auto" profiled

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> ServingEngine:
        """Start the worker thread (once; a no-op when running). Returns the engine."""
        with self._lock:
            self._check_open()
            if self._thread is None:
                # a daemon thread: the interpreter does not wait for it before its atexit
                # hooks, one of which (_close_running_engines) stops it before finalization
                ref = weakref.ref(self, _wake_on_collect(self._work))
                self._thread = threading.Thread(target=_serve, args=(ref, self._work),
                                                name="eenet-serving", daemon=True)
                with _RUNNING_LOCK:
                    _RUNNING.add(self)
                self._thread.start()
        return self

    def __enter__(self) -> ServingEngine:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests (``submit`` raises :class:`EngineClosed`); ``drain=True``:
        answer everything admitted, then stop; ``drain=False``: fail the pending requests
        with :class:`EngineClosed` once the stage run in progress is done. Waits up to
        ``timeout`` seconds (None: until done) for the worker to stop. Idempotent: it may be
        called again, from any thread or a callback (which does not wait for the worker it
        runs in), e.g. ``drain=False`` after a draining close that takes too long; a
        ``drain=True`` after a ``drain=False`` does not bring the failed requests back."""
        with self._lock:
            self._closing = True
            if not drain:
                self._abort = True
            thread = self._thread
            self._work.notify_all()
            self._space.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _close_at_exit(self) -> None:
        """At interpreter exit: an open engine fails its pending requests (after the run in
        progress), a draining one finishes its drain; waits for the worker to stop."""
        with self._lock:
            drain = self._closing and not self._abort
            if not self._closing:
                self._abort_message = _AT_EXIT_MESSAGE
        self.close(drain=drain)

    @property
    def closed(self) -> bool:
        """Whether the engine refuses new requests."""
        return self._closing or self._broken is not None

    def _check_open(self) -> None:
        if self._broken is not None:
            raise EngineClosed("the serving engine's worker stopped on an internal error: "
                               f"{type(self._broken).__name__}: {self._broken}"
                               ) from self._broken
        if self._closing:
            raise EngineClosed("the serving engine is closed")

    # -- requests --------------------------------------------------------------------------

    def submit(self, x: torch.Tensor, deadline_s: float | None = None,
               callback: Callable[[Future], object] | None = None,
               **row_inputs: torch.Tensor) -> Future:
        """Queue one sample ``x`` (no batch dimension, e.g. (1, 28, 28) or (L,) token ids)
        with its row inputs (no batch dimension, e.g. ``attention_mask`` (L,)); returns a
        ``Future[Answer]``. ``deadline_s``: seconds from now, a real number > 0 (see
        ``on_deadline``); ``callback(future)`` runs once when the future is done (answered,
        failed or cancelled). The engine keeps a copy of ``x`` and the row inputs, so the
        caller may refill its buffers as soon as ``submit`` returns. Raises ``QueueFull``,
        ``EngineClosed`` or an input error (class docstring)."""
        submitted = time.monotonic()
        deadline = self._deadline(submitted, deadline_s)
        self._check_tensor("x", x)
        self._check_dtype(x)
        for name, t in row_inputs.items():
            self._check_tensor(f"row input {name!r}", t)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        row = self._make_row(_private(x), {name: _private(t) for name, t in row_inputs.items()},
                             submitted, deadline, callback)
        self._admit([row])
        return row.fut

    def submit_many(self, xs: torch.Tensor, deadline_s: float | None = None,
                    callback: Callable[[Future], object] | None = None,
                    **row_inputs: torch.Tensor) -> list[Future]:
        """:meth:`submit` of each of the n samples of ``xs`` (n, ...), with the matching rows
        of every row input (n, ...): n futures, admitted all together or not at all (the
        engine keeps a copy of ``xs`` and the row inputs, as ``submit`` does)."""
        submitted = time.monotonic()
        deadline = self._deadline(submitted, deadline_s)
        self._check_tensor("xs", xs)
        if xs.dim() == 0:
            raise ValueError("xs must have a batch dimension, (n, ...), got a 0-dim tensor")
        self._check_dtype(xs)
        n = xs.shape[0]
        for name, t in row_inputs.items():
            self._check_tensor(f"row input {name!r}", t)
            if t.dim() == 0 or t.shape[0] != n:
                raise ValueError(f"row input {name!r} must have one row per sample, shape "
                                 f"({n}, ...), got {tuple(t.shape)}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        xs = _private(xs)
        inputs = {name: _private(t) for name, t in row_inputs.items()}
        rows = [self._make_row(xs[i], {name: t[i] for name, t in inputs.items()},
                               submitted, deadline, callback) for i in range(n)]
        self._admit(rows)
        return [r.fut for r in rows]

    def snapshot(self) -> ServingStats:
        """The engine's :class:`ServingStats` now."""
        return self._stats.snapshot(self._not_started)

    @staticmethod
    def _deadline(now: float, deadline_s: float | None) -> float:
        if deadline_s is None:
            return math.inf
        seconds = _seconds(deadline_s)
        if seconds is None or seconds <= 0:
            raise ValueError(f"deadline_s must be None or a finite real number of seconds > 0 "
                             f"(an int, a float, a NumPy scalar or a 0-dim tensor), got "
                             f"{deadline_s!r}")
        return now + seconds

    def _check_tensor(self, what: str, t: object) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu" and t.device != self.device:
            raise ValueError(f"{what} is on {t.device}; the engine runs on {self.device} and "
                             "takes tensors on the CPU or on that device")

    def _check_dtype(self, x: torch.Tensor) -> None:
        if (x.is_floating_point() and self._input_dtype is not None
                and x.dtype != self._input_dtype):
            raise TypeError(f"x has dtype {x.dtype} but the network's first stage computes in "
                            f"{self._input_dtype}; convert the sample (the engine does not)")

    def _make_row(self, x: torch.Tensor, inputs: dict[str, torch.Tensor], submitted: float,
                  deadline: float, callback: Callable[[Future], object] | None) -> _Row:
        fut = _Future()
        fut.add_done_callback(self._on_done)
        if callback is not None:
            fut.add_done_callback(callback)
        return _Row(fut, x, inputs, _group_key(x, inputs), submitted, deadline)

    def _on_done(self, fut: Future) -> None:
        """Every future's first callback: on a cancellation, tell ``concurrent.futures.wait``
        / ``as_completed`` (what an executor's worker would do), count it and wake the worker
        to drop the request's row."""
        if fut.cancelled():
            fut.set_running_or_notify_cancel()
            self._stats.cancelled()
            with self._lock:
                self._cancel_dirty = True
                self._work.notify()

    def _admit(self, rows: list[_Row]) -> None:
        cfg = self.config
        n = len(rows)
        with self._lock:
            self._check_open()
            if self._thread is None:
                self.start()
            if n > cfg.queue_size:
                self._stats.rejected(n)
                raise QueueFull(f"{n} requests at once exceed the queue size "
                                f"({cfg.queue_size})")
            if self._not_started + n > cfg.queue_size:
                if cfg.on_full == "reject" or threading.current_thread() is self._thread:
                    # (a callback submitting from the worker thread cannot wait for room:
                    # only that thread makes room)
                    self._stats.rejected(n)
                    raise QueueFull(f"the admission queue is full ({self._not_started} of "
                                    f"{cfg.queue_size} requests waiting)")
                end = time.monotonic() + cfg.block_timeout_s
                while self._not_started + n > cfg.queue_size:
                    left = end - time.monotonic()
                    if left <= 0:
                        self._stats.rejected(n)
                        raise QueueFull(f"the admission queue stayed full for "
                                        f"{cfg.block_timeout_s:g} s ({self._not_started} of "
                                        f"{cfg.queue_size} requests waiting)")
                    self._space.wait(left)
                    self._check_open()
            for row in rows:
                row.seq = next(self._seq)
            self._not_started += n
            self._intake.extend(rows)
            self._stats.submitted(n)
            self._work.notify()

    def _release(self, n: int) -> None:
        """n not-started requests left the admission queue (ran, dropped or failed)."""
        if n:
            with self._lock:
                self._not_started -= n
                self._space.notify_all()

    # -- the worker ------------------------------------------------------------------------

    def _die(self, exc: BaseException) -> None:
        with self._lock:
            self._broken = exc
            rows = list(self._intake)
            self._intake.clear()
            self._not_started = 0  # every row not started fails below
            self._space.notify_all()
        rows += self._running + [r for q in self._queues.values() for r in q.rows]
        self._queues.clear()
        self._running = []
        self._pending = [0] * self.num_exits
        self._fail(rows, lambda row: exc)

    def _has_work(self) -> bool:
        """Under ``self._lock``: whether the worker has a step to take (a request, a queued
        row, a close or a cancellation to act on)."""
        return bool(self._intake or self._queues or self._closing or self._cancel_dirty)

    def _step(self) -> bool:
        """One scheduling step (the worker calls it when :meth:`_has_work`); False when the
        worker is done."""
        with self._lock:
            intake = list(self._intake)
            self._intake.clear()
            closing, abort, message = self._closing, self._abort, self._abort_message
            dirty, self._cancel_dirty = self._cancel_dirty, False
        self._enqueue_new(intake)
        if abort:
            self._fail_all(message)
            return False
        if dirty:
            self._drop_cancelled()
        now = time.monotonic()
        self._expire(now)
        queue = self._pick(now, closing)
        if queue is not None:
            self._run(queue, queue.take(self.config.max_batch))
        self._stats.set_pending(self._pending)
        return queue is not None or not closing

    def _queue(self, group: tuple, stage: int, run: int | None) -> _Queue:
        key = (group, stage, run)
        queue = self._queues.get(key)
        if queue is None:
            plan = self.plans.get(group)
            target = self.config.max_batch if plan is None else plan.target[stage]
            queue = self._queues[key] = _Queue(group, stage, run, target)
        return queue

    def _enqueue_new(self, rows: list[_Row]) -> None:
        live, dropped = [], 0
        now = time.monotonic()
        for row in rows:
            if row.fut.cancelled():
                dropped += 1
                continue
            row.enqueued = now
            live.append(row)
        self._release(dropped)
        by_group: dict[tuple, list[_Row]] = {}
        for row in live:
            by_group.setdefault(row.group, []).append(row)
        for group, members in by_group.items():
            self._queue(group, 0, None).add(members)
        self._pending[0] += len(live)

    def _remove_empty(self) -> None:
        for key in [key for key, q in self._queues.items() if not q.rows]:
            del self._queues[key]

    def _drop_cancelled(self) -> None:
        released = 0
        for q in self._queues.values():
            kept = [r for r in q.rows if not r.fut.cancelled()]
            gone = len(q.rows) - len(kept)
            if gone:
                q.rows = kept
                self._pending[q.stage] -= gone
                if q.stage == 0:
                    released += gone
        self._remove_empty()
        self._release(released)

    def _expire(self, now: float) -> None:
        """Settle the rows past their deadline (each queue's first rows, by its order)."""
        expired: list[_Row] = []
        released = 0
        for q in self._queues.values():
            i = 0
            while i < len(q.rows) and q.rows[i].deadline <= now:
                i += 1
            if i:
                expired += q.rows[:i]
                q.rows = q.rows[i:]
                self._pending[q.stage] -= i
                if q.stage == 0:
                    released += i
        if not expired:
            return
        self._remove_empty()
        self._release(released)
        forced: dict[int, list[tuple[_Row, Answer]]] = {}
        errors: list[_Row] = []
        for row in expired:
            if self.config.on_deadline == "exit" and row.stage > 0:
                k = row.stage - 1
                ans = Answer(row.logits, k, row.score, True, now - row.submitted)
                forced.setdefault(k, []).append((row, ans))
            else:
                errors.append(row)
        for k, answers in forced.items():
            self._answer(k, answers, forced=True)

        def error(row: _Row) -> DeadlineExceeded:
            where = ("before its first exit" if row.stage == 0 else
                     f"after exit {row.stage - 1}")
            return DeadlineExceeded(f"the request's deadline passed {where} "
                                    f"({now - row.submitted:.4g} s after submit)")

        self._fail(errors, error, deadline=True)

    def _fail_all(self, message: str) -> None:
        """Fail every queued row with :class:`EngineClosed` (``message``)."""
        rows = [r for q in self._queues.values() for r in q.rows]
        released = sum(len(q.rows) for q in self._queues.values() if q.stage == 0)
        self._queues.clear()
        self._pending = [0] * self.num_exits
        self._release(released)
        self._fail(rows, lambda row: EngineClosed(message))

    def _pick(self, now: float, closing: bool) -> _Queue | None:
        """The queue to run now (module docstring, scheduling rule), or None when none is
        pending."""
        if not self._queues:
            return None
        shallowest: dict[tuple, int] = {}
        backlog: dict[tuple, int] = {}  # rows waiting for stage 0, per group
        for q in self._queues.values():
            s = shallowest.get(q.group)
            if s is None or q.stage < s:
                shallowest[q.group] = q.stage
            if q.stage == 0:
                backlog[q.group] = backlog.get(q.group, 0) + len(q.rows)
        wait = self.config.max_wait_ms / 1e3
        load_aware = self.config.rebatch == "auto"
        best, best_key = None, None
        for q in self._queues.values():
            # auto: a merging stage waits for more rows only while its group is backlogged
            # (a full batch waits for stage 0): then a bigger batch buys capacity; below
            # that, waiting would only add latency, so it runs with what has gathered
            ready = (closing or q.stage == 0 or q.run is not None or len(q.rows) >= q.target
                     or q.stage == shallowest[q.group]
                     or (load_aware and backlog.get(q.group, 0) < self.config.max_batch))
            oldest = q.oldest()
            if not ready and now - oldest < wait:
                continue
            key = (q.stage, -q.rows[0].deadline, -oldest)
            if best_key is None or key > best_key:
                best, best_key = q, key
        return best

    def _run(self, queue: _Queue, rows: list[_Row]) -> None:
        """Run ``queue``'s stage on ``rows`` (taken from it) and route the results."""
        k = queue.stage
        if not queue.rows:
            del self._queues[(queue.group, queue.stage, queue.run)]
        self._pending[k] -= len(rows)
        if k == 0:
            self._release(len(rows))
        rows = [r for r in rows if not r.fut.cancelled()]
        if not rows:
            return
        self._running = rows
        samples = None  # (row, its sample) of a run whose group is to be profiled after it
        if k == 0 and queue.group not in self.plans:
            plan = self._plan_without_profile(queue.group)
            if plan is None:  # merge everywhere until a row has passed stage 0
                samples = [(r, r.x, r.inputs) for r in rows]
                plan = self._merge_everywhere()
            self._add_plan(queue.group, plan)
            queue.target = plan.target[0]
        failed = self._run_isolating(queue, rows)
        if samples is not None:
            self._profile_group(queue.group, samples, failed)
        self._running = []

    def _attempt(self, k: int, rows: list[_Row], attempts: int) -> _RunOutput | Exception:
        """Stage k on ``rows``, tried up to ``attempts`` times: its output, or the last
        exception."""
        for attempt in range(attempts):
            try:
                return self._compute(k, rows)
            except Exception as exc:
                if attempt == attempts - 1:
                    return exc
        raise AssertionError("attempts must be >= 1")

    def _run_isolating(self, queue: _Queue, rows: list[_Row]) -> set[int]:
        """Run ``queue``'s stage on ``rows`` (``1 + retries`` attempts); when every attempt
        fails, run each half of the rows on its own (one attempt per part, halving again
        while a part of several rows fails), so that only the rows that fail alone fail and
        one bad request never fails the others of its batch. A ``close(drain=False)`` stops
        it between parts (the rest fail with :class:`EngineClosed`). Returns the ids of the
        rows that failed."""
        k, first = queue.stage, 1 + self.config.retries
        parts: list[tuple[list[_Row], int]] = [(rows, 0)]  # (rows, attempts they failed)
        failed: set[int] = set()  # ids of the rows that failed
        while parts:
            if len(parts) > 1 or parts[0][1]:
                with self._lock:
                    abort, message = self._abort, self._abort_message
                if abort:  # close(drain=False): the parts not run yet fail now
                    rest = [r for part, _ in parts for r in part]
                    failed |= set(map(id, rest))
                    self._fail(rest, lambda row, why=message: EngineClosed(why))
                    self._running = [r for r in self._running if id(r) not in failed]
                    break
            part, failed_before = parts.pop()
            part = [r for r in part if not r.fut.cancelled()]
            if not part:
                continue
            tries = first if failed_before == 0 else 1
            out = self._attempt(k, part, tries)
            if isinstance(out, Exception) and len(part) > 1:
                half = len(part) // 2
                parts += [(part[half:], failed_before + tries),
                          (part[:half], failed_before + tries)]
                continue
            if isinstance(out, _RunOutput):
                self._stats.stage_run(k, len(part))
                self._route(queue, part, out)
            else:
                self._stage_failed(k, part[0], out, failed_before + tries, len(rows))
                failed.add(id(part[0]))
            settled = set(map(id, part))  # routed or failed: no longer the worker's to fail
            self._running = [r for r in self._running if id(r) not in settled]
        return failed

    def _stage_failed(self, k: int, row: _Row, cause: Exception, attempts: int,
                      batch: int) -> None:
        """Fail ``row``: stage k raised ``cause`` on each of the ``attempts`` runs that held
        it, the first of them on its batch of ``batch`` rows, the last on it alone."""
        msg = (f"stage {k} (or its exit) failed on this request after {attempts} attempt"
               f"{'s' if attempts > 1 else ''}"
               + (f" (the last on it alone; {_others(batch - 1)} of its batch ran without "
                  "it)" if batch > 1 else "")
               + f": {type(cause).__name__}: {cause}")
        exc = StageFailed(msg, stage=k, attempts=attempts, rows=batch)
        exc.__cause__ = cause
        self._fail([row], lambda _row: exc)

    def _compute(self, k: int, rows: list[_Row]) -> _RunOutput:
        """Stage k and exit k on ``rows``: stack their inputs, run, bring the decisions, the
        scores and the logits to the CPU (one host sync)."""
        n, device = len(rows), self.device
        x = torch.stack([r.x for r in rows]).to(device)
        inputs = {name: torch.stack([r.inputs[name] for r in rows]).to(device)
                  for name in rows[0].inputs}
        prev_scores = prev_preds = None
        if self._needs_scores:
            prev_scores = (torch.stack([r.scores for r in rows]) if k else
                           torch.empty(n, 0, dtype=torch.float32, device=device))
        if self._needs_preds:
            prev_preds = (torch.stack([r.preds for r in rows]) if k else
                          torch.empty(n, 0, dtype=torch.int64, device=device))
        h = self._stages[k](x, **inputs)
        head = self._heads[k]
        feats, weight, bias = classifier_operands(head, exit_features(k, head, h, n, inputs))
        res = ek.exit_score(feats, weight, bias, prev_scores=prev_scores, prev_preds=prev_preds,
                            **self._exit_kwargs[k])
        packed = torch.cat((res.logits.float(), res.score[:, None],
                            res.exit_mask[:, None].float()), dim=1)
        with torch.inference_mode(False):  # answers are ordinary tensors
            host = packed.to("cpu", copy=True)
        c = self.num_classes
        scores = preds = None
        if prev_scores is not None:
            scores = torch.cat((prev_scores, res.score[:, None]), dim=1)
        if prev_preds is not None:
            preds = torch.cat((prev_preds, res.pred[:, None]), dim=1)
        return _RunOutput(h, inputs, (host[:, c + 1] > 0.5).tolist(), host[:, c].tolist(),
                          host[:, :c], scores, preds)

    def _route(self, queue: _Queue, rows: list[_Row], out: _RunOutput) -> None:
        """Answer the rows that exit at this stage; queue the others at the next stage."""
        k = queue.stage
        now = time.monotonic()
        logits = out.logits.unbind(0)
        answers: list[tuple[_Row, Answer]] = []
        survivors: list[_Row] = []
        for i, row in enumerate(rows):
            if out.exit_mask[i]:
                answers.append((row, Answer(logits[i], k, out.score[i], False,
                                            now - row.submitted)))
                continue
            row.x = out.h[i]
            row.inputs = {name: t[i] for name, t in out.inputs.items()}
            if out.scores is not None:
                row.scores = out.scores[i]
            if out.preds is not None:
                row.preds = out.preds[i]
            row.logits = logits[i]
            row.score = out.score[i]
            row.stage = k + 1
            row.enqueued = now
            survivors.append(row)
        if survivors:
            plan = self.plans.get(queue.group)
            merge = plan is None or plan.merge[k + 1]
            self._queue(queue.group, k + 1, None if merge else next(self._runs)).add(survivors)
            self._pending[k + 1] += len(survivors)
        self._answer(k, answers)

    # -- settling futures (counted first, so that a snapshot taken once a future is done
    # -- counts it; a future cancelled meanwhile is taken back out) -------------------------

    def _answer(self, k: int, answers: list[tuple[_Row, Answer]], forced: bool = False
                ) -> None:
        """Answer these rows at exit k."""
        answers = [(r, a) for r, a in answers if not r.fut.cancelled()]
        self._stats.set_pending(self._pending)
        if not answers:
            return
        self._stats.answered(k, [a.latency_s for _, a in answers],
                             forced=len(answers) if forced else 0)
        lost = sum(not _settle(r.fut, a) for r, a in answers)
        if lost:
            self._stats.answered(k, None, forced=-lost if forced else 0, count=-lost)

    def _fail(self, rows: list[_Row], error: Callable[[_Row], BaseException],
              deadline: bool = False) -> None:
        """Fail these rows, each with its own exception ``error(row)``."""
        rows = [r for r in rows if not r.fut.cancelled()]
        self._stats.set_pending(self._pending)
        if not rows:
            return
        self._stats.failed(len(rows), deadline=deadline)
        lost = sum(not _settle(r.fut, exc=error(r)) for r in rows)
        if lost:
            self._stats.failed(-lost, deadline=deadline)

    # -- rebatch plans ---------------------------------------------------------------------

    def _add_plan(self, group: tuple, plan: RebatchPlan) -> None:
        """Record ``group``'s plan; past :data:`MAX_PLANS`, forget the oldest plans that were
        not profiled, of groups with no row pending."""
        self.plans[group] = plan
        excess = len(self.plans) - MAX_PLANS
        if excess <= 0:
            return
        pending = {q.group for q in self._queues.values()} | {group}
        for old in [g for g in self.plans if g not in self._profiled and g not in pending
                    ][:excess]:
            del self.plans[old]

    def _merge_everywhere(self) -> RebatchPlan:
        k_exits, cfg = self.num_exits, self.config
        return RebatchPlan((True,) * k_exits, (cfg.max_batch,) * k_exits)

    def _plan_without_profile(self, group: tuple) -> RebatchPlan | None:
        """``group``'s plan where it needs no profile: ``"always"``, ``"never"``, or
        ``"auto"`` once ``max_profiles`` groups are profiled and one is of its kind (its
        plan); None where the group is to be profiled."""
        k_exits, cfg = self.num_exits, self.config
        if cfg.rebatch == "always":
            return self._merge_everywhere()
        if cfg.rebatch == "never":
            return RebatchPlan((True,) + (False,) * (k_exits - 1), (cfg.max_batch,) * k_exits)
        source = self._nearest_profiled(group)
        if source is not None and len(self._profiled) >= cfg.max_profiles:
            return replace(self._profiled[source], profiled_on=source)
        return None

    def _profile_group(self, group: tuple, samples: list[tuple[_Row, torch.Tensor,
                                                                dict[str, torch.Tensor]]],
                       failed: set[int]) -> None:
        """After ``group``'s first stage-0 run: profile it on the sample of a row that passed
        stage 0 and give it that plan (its survivors, queued at stage 1 under the provisional
        plan, move to a queue of their own where stage 1 does not merge). When every row
        failed (or was cancelled), the group is profiled after its next run."""
        good = next(((x, inputs) for row, x, inputs in samples
                     if id(row) not in failed and not row.fut.cancelled()), None)
        if good is None:
            del self.plans[group]
            return
        cfg = self.config
        base = cfg.buckets if cfg.buckets is not None else PROFILE_SIZES
        sizes = sorted({1, cfg.max_batch} | {b for b in base if b < cfg.max_batch})
        try:
            plan = plan_from_profile(sizes, self._profile(*good, sizes))
        except Exception as exc:  # the group runs unprofiled: merge everywhere
            plan = replace(self._merge_everywhere(), error=f"{type(exc).__name__}: {exc}")
        self._profiled[group] = plan
        self._add_plan(group, plan)
        for key, q in list(self._queues.items()):
            if q.group != group or q.run is not None:
                continue
            q.target = plan.target[q.stage]
            if not plan.merge[q.stage]:
                del self._queues[key]
                q.run = next(self._runs)
                self._queues[(group, q.stage, q.run)] = q

    def _nearest_profiled(self, group: tuple) -> tuple | None:
        """The profiled group of ``group``'s kind whose sample has the number of elements
        nearest ``group``'s (one whose profile succeeded first, then the smaller on a tie)."""
        kind, size = _kind(group), math.prod(group[0])
        same = [g for g in self._profiled if _kind(g) == kind]
        return min(same, key=lambda g: (self._profiled[g].error is not None,
                                        abs(math.prod(g[0]) - size), math.prod(g[0])),
                   default=None)

    def _profile(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor],
                 sizes: Sequence[int]) -> list[list[float]]:
        """Seconds per row of every stage with its exit, at each batch size, on copies of
        the sample ``x`` (with its ``row_inputs``): per size and stage, one warm-up and the
        best of :data:`PROFILE_REPEATS` calls (a CUDA device is synchronised around each)."""
        device = self.device
        per_row: list[list[float]] = [[] for _ in range(self.num_exits)]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for b in sizes:
            h = x.unsqueeze(0).expand(b, *x.shape).contiguous().to(device)
            inputs = {name: t.unsqueeze(0).expand(b, *t.shape).contiguous().to(device)
                      for name, t in row_inputs.items()}
            for k in range(self.num_exits):
                prev_s = (torch.zeros(b, k, dtype=torch.float32, device=device)
                          if self._needs_scores else None)
                prev_p = (torch.zeros(b, k, dtype=torch.int64, device=device)
                          if self._needs_preds else None)
                head = self._heads[k]

                def call(h: torch.Tensor = h, k: int = k, head: Any = head, b: int = b,
                         inputs: dict[str, torch.Tensor] = inputs,
                         prev_s: torch.Tensor | None = prev_s,
                         prev_p: torch.Tensor | None = prev_p) -> torch.Tensor:
                    out = self._stages[k](h, **inputs)
                    f, weight, bias = classifier_operands(
                        head, exit_features(k, head, out, b, inputs))
                    res = ek.exit_score(f, weight, bias, prev_scores=prev_s, prev_preds=prev_p,
                                        **self._exit_kwargs[k])
                    res.score.cpu()
                    return out

                out = call()
                best = math.inf
                for _ in range(PROFILE_REPEATS):
                    sync()
                    t0 = time.perf_counter()
                    call()
                    sync()
                    best = min(best, time.perf_counter() - t0)
                per_row[k].append(best / b)
                h = out
        return per_row

    def describe_plans(self) -> list[str]:
        """One line per shape group: its group and which stages merge (with their target)."""
        lines = []
        for group, plan in list(self.plans.items()):
            stages = ", ".join(f"{k}:{'merge@' + str(t) if m else 'per-batch'}"
                               for k, (m, t) in enumerate(zip(plan.merge, plan.target,
                                                              strict=True)))
            lines.append(f"{_describe_group(group)}: {stages}"
                         + (f" (profile failed: {plan.error})" if plan.error else "")
                         + (f" (the plan of {_describe_group(plan.profiled_on)})"
                            if plan.profiled_on is not None else ""))
        return lines
