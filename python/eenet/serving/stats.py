"""Serving telemetry: :class:`ServingStats`, the engine's snapshot, and :class:`StatsRecorder`,
the counters behind it.

The engine's worker thread updates the counters once per stage run (a handful of integer
additions and a bounded ``deque`` append under one lock); submitting threads count what they
submit and what was refused; cancelling threads count their cancellations. A snapshot copies
the counters under the same lock and computes the latency percentiles outside it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["BATCH_HISTORY", "LATENCY_HISTORY", "ServingStats", "StatsRecorder"]

BATCH_HISTORY = 256
"""Batch sizes kept per stage (the most recent runs)."""
LATENCY_HISTORY = 4096
"""Answer latencies kept for the percentiles (the most recent answers)."""


@dataclass(frozen=True)
class ServingStats:
    """One snapshot of a :class:`~eenet.serving.ServingEngine` (K = the network's exits).

    Requests (each sample of a ``submit_many`` counts as one):

    - ``submitted``: admitted to the queue (refused ones are not counted here).
    - ``answered``: futures that got an :class:`~eenet.serving.Answer` (forced ones
      included); ``failed``: futures that got an exception (``StageFailed``,
      ``DeadlineExceeded``, ``EngineClosed``, an internal error); ``cancelled``: futures
      cancelled before their answer. ``submitted - answered - failed - cancelled`` requests
      are in flight.
    - ``rejected``: submissions refused with ``QueueFull`` (never admitted).
    - ``deadline_forced``: answers sent at an earlier exit because the deadline passed (also
      in ``answered``); ``deadline_errors``: ``DeadlineExceeded`` failures (also in
      ``failed``).

    Exits: ``exits`` (K ints) the answers per exit, ``exit_rates`` (K floats) the same as
    fractions of ``answered`` (zeros before the first answer).

    Cost (only when the engine has costs, else None): ``cost_per_sample`` the mean cumulative
    cost of the exits taken (over every answer so far), ``budget`` the configured budget
    (None without one) converted to the same unit (a fraction times the full model's cost),
    and ``cost_unit`` that unit, the costs' own (a string, ``"ms"`` or ``"flops"``).

    Queues: ``queue_depth`` admitted requests not started yet (what ``queue_size`` bounds);
    ``stage_pending`` (K ints) rows waiting at each stage (stage 0: the not-started requests
    the worker has sorted into their shape groups).

    Batches: ``stage_runs`` / ``stage_rows`` (K ints each) the successful runs of each stage
    and the rows they ran (mean batch size = rows / runs); ``batch_sizes`` the last
    <= 256 batch sizes of each stage, oldest first.

    Latency (submit to answer, over the last <= 4096 answers; None before the first):
    ``latency_p50_s``, ``latency_p99_s`` (linear interpolation), ``latency_max_s``.

    ``uptime_s``: seconds since the engine was made.
    """

    submitted: int
    answered: int
    failed: int
    cancelled: int
    rejected: int
    deadline_forced: int
    deadline_errors: int
    exits: tuple[int, ...]
    exit_rates: tuple[float, ...]
    cost_per_sample: float | None
    budget: float | None
    cost_unit: str | None
    queue_depth: int
    stage_pending: tuple[int, ...]
    stage_runs: tuple[int, ...]
    stage_rows: tuple[int, ...]
    batch_sizes: tuple[tuple[int, ...], ...]
    latency_p50_s: float | None
    latency_p99_s: float | None
    latency_max_s: float | None
    uptime_s: float

    @property
    def in_flight(self) -> int:
        """Admitted requests without an outcome yet."""
        return self.submitted - self.answered - self.failed - self.cancelled

    @property
    def mean_batch_sizes(self) -> tuple[float | None, ...]:
        """Per stage, ``stage_rows / stage_runs`` (None for a stage that has not run)."""
        return tuple(rows / runs if runs else None
                     for rows, runs in zip(self.stage_rows, self.stage_runs, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-able values (tuples become lists)."""
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class StatsRecorder:
    """The counters of one engine with K exits. ``costs``: cumulative cost per exit (K
    floats) or None; ``budget`` (in the costs' unit) and ``unit`` go into the snapshots as
    they are. Thread-safe: every method takes the recorder's lock (never held while calling
    out)."""

    def __init__(self, num_exits: int, costs: Sequence[float] | None = None,
                 budget: float | None = None, unit: str | None = None) -> None:
        self.num_exits = num_exits
        self._costs = None if costs is None else tuple(float(c) for c in costs)
        self._budget = budget
        self._unit = unit
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._submitted = self._answered = self._failed = self._cancelled = 0
        self._rejected = self._deadline_forced = self._deadline_errors = 0
        self._exits = [0] * num_exits
        self._runs = [0] * num_exits
        self._rows = [0] * num_exits
        self._pending: tuple[int, ...] = (0,) * num_exits
        self._batches = [deque(maxlen=BATCH_HISTORY) for _ in range(num_exits)]
        self._latencies: deque[float] = deque(maxlen=LATENCY_HISTORY)

    # -- updates ---------------------------------------------------------------------------

    def submitted(self, n: int) -> None:
        """n requests admitted."""
        with self._lock:
            self._submitted += n

    def rejected(self, n: int) -> None:
        """n requests refused with QueueFull."""
        with self._lock:
            self._rejected += n

    def cancelled(self, n: int = 1) -> None:
        """n futures cancelled."""
        with self._lock:
            self._cancelled += n

    def stage_run(self, stage: int, rows: int) -> None:
        """A successful run of ``stage`` on ``rows`` rows."""
        with self._lock:
            self._runs[stage] += 1
            self._rows[stage] += rows
            self._batches[stage].append(rows)

    def answered(self, exit_index: int, latencies: Iterable[float] | None, forced: int = 0,
                 count: int | None = None) -> None:
        """Answers at ``exit_index`` with these latencies (seconds); ``forced`` of them sent
        out by their deadline. ``count`` (default: the number of latencies) may be negative,
        with no latencies, to take answers back that could not be delivered."""
        lat = [] if latencies is None else list(latencies)
        n = len(lat) if count is None else count
        if n == 0:
            return
        with self._lock:
            self._answered += n
            self._exits[exit_index] += n
            self._deadline_forced += forced
            self._latencies.extend(lat)

    def failed(self, n: int, deadline: bool = False) -> None:
        """n futures failed (``deadline``: with DeadlineExceeded); a negative n takes failures
        back that could not be delivered."""
        if n == 0:
            return
        with self._lock:
            self._failed += n
            if deadline:
                self._deadline_errors += n

    def set_pending(self, pending: Sequence[int]) -> None:
        """The rows now waiting at each stage (K ints)."""
        pending = tuple(pending)
        with self._lock:
            self._pending = pending

    # -- reading ---------------------------------------------------------------------------

    def snapshot(self, queue_depth: int) -> ServingStats:
        """A :class:`ServingStats` of the counters now, with ``queue_depth`` as given."""
        with self._lock:
            answered = self._answered
            exits = tuple(self._exits)
            latencies = np.fromiter(self._latencies, dtype=np.float64,
                                    count=len(self._latencies))
            fields = dict(
                submitted=self._submitted, answered=answered, failed=self._failed,
                cancelled=self._cancelled, rejected=self._rejected,
                deadline_forced=self._deadline_forced, deadline_errors=self._deadline_errors,
                stage_pending=self._pending, stage_runs=tuple(self._runs),
                stage_rows=tuple(self._rows),
                batch_sizes=tuple(tuple(b) for b in self._batches))
        rates = tuple(e / answered if answered else 0.0 for e in exits)
        cost = None
        if self._costs is not None and answered:
            cost = sum(e * c for e, c in zip(exits, self._costs, strict=True)) / answered
        p50 = p99 = peak = None
        if latencies.size:
            p50, p99 = (float(v) for v in np.percentile(latencies, [50, 99]))
            peak = float(latencies.max())
        return ServingStats(
            exits=exits, exit_rates=rates, cost_per_sample=cost,
            budget=self._budget if self._costs is not None else None,
            cost_unit=self._unit if self._costs is not None else None,
            queue_depth=queue_depth, latency_p50_s=p50, latency_p99_s=p99,
            latency_max_s=peak, uptime_s=time.monotonic() - self._start, **fields)
