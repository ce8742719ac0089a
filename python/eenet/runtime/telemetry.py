"""Per-batch telemetry of the engine: exits taken, forced exits, non-finite rows and cost.

At the end of every call the engine counts, on the batch's device and without waiting on it,
the rows per exit, the forced rows and the rows with finite logits: one (K + 2,) int64
vector from a handful of ops issued once per call, whatever the number of stages. The
numbers reach the host only when read (:attr:`Recorder.last`, :meth:`Recorder.totals`), at
one host sync per read; a call itself adds none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # eenet.budget imports eenet.runtime (timing)
    from ..budget import Costs


@dataclass(frozen=True)
class Telemetry:
    """Counts over ``batches`` engine calls (one for :attr:`Engine.last_telemetry`).

    - ``rows``: rows served.
    - ``exits``: K ints, the rows that left at each exit (forced rows included).
    - ``forced``: rows the budget guard sent out early (0 without a guard).
    - ``nonfinite``: rows whose returned logits hold a NaN or an infinity. Their policy
      score is NaN, so the policy never lets them leave before the last exit; only the
      budget guard can send them out earlier.
    - ``cost_spent``: sum over the rows of the cumulative cost of the exit each took, in
      ``unit``; None when the engine has no costs.
    - ``cost_limit``: what the budget guard allowed these batches in all (the sum of the
      per-batch limits), in ``unit``; None without a guard.
    """

    batches: int
    rows: int
    exits: tuple[int, ...]
    forced: int
    nonfinite: int
    cost_spent: float | None
    cost_limit: float | None
    unit: str | None

    @property
    def cost_per_sample(self) -> float | None:
        """``cost_spent / rows`` (None without costs or rows)."""
        if self.cost_spent is None or self.rows == 0:
            return None
        return self.cost_spent / self.rows


def batch_counts(exit_index: torch.Tensor, forced: torch.Tensor, logits: torch.Tensor,
                 exits: torch.Tensor) -> torch.Tensor:
    """(K + 2,) int64 on the batch's device: rows per exit (K), forced rows, rows with
    finite logits; from exit_index (N,) int64, forced (N,) bool, logits (N, C) float and
    ``exits`` = arange(K) on that device. No host sync."""
    finite = torch.isfinite(logits).all(dim=1)
    flags = torch.cat((exit_index.unsqueeze(1) == exits, forced.unsqueeze(1),
                       finite.unsqueeze(1)), dim=1)
    return flags.sum(dim=0)


@dataclass
class _Batch:
    """A batch's counts, still on its device until read."""

    counts: torch.Tensor
    rows: int
    limit: float | None
    read: Telemetry | None = None


class Recorder:
    """The engine's telemetry: the last batch and running totals (per device on which
    batches ran), with ``costs`` (or None) to price the exits; ``guarded``: whether the
    batches run under a budget guard (their limits are summed)."""

    def __init__(self, num_exits: int, costs: Costs | None, guarded: bool) -> None:
        self.num_exits = num_exits
        self.costs = costs
        self.guarded = guarded
        self._exits: dict[torch.device, torch.Tensor] = {}
        self._last: _Batch | None = None
        self.reset()

    def reset(self) -> None:
        """Zero the running totals (the last batch stays readable)."""
        self._totals: dict[torch.device, torch.Tensor] = {}
        self._batches = 0
        self._rows = 0
        self._limit = 0.0

    def record(self, exit_index: torch.Tensor, forced: torch.Tensor, logits: torch.Tensor,
               limit: float | None) -> None:
        """Count one batch (shapes as :func:`batch_counts`) served under ``limit`` (the
        guard's total for the batch, or None), on its device; no host sync."""
        device = exit_index.device
        exits = self._exits.get(device)
        if exits is None:
            exits = self._exits[device] = torch.arange(self.num_exits, device=device)
        counts = batch_counts(exit_index, forced, logits, exits)
        total = self._totals.get(device)
        # out of place: a total made under torch.inference_mode() cannot be updated in place
        # outside it
        self._totals[device] = counts if total is None else total + counts
        rows = exit_index.shape[0]
        self._last = _Batch(counts, rows, limit)
        self._batches += 1
        self._rows += rows
        if limit is not None:
            self._limit += limit

    @property
    def last(self) -> Telemetry | None:
        """The last batch's telemetry (read from the device on first access), or None
        before the first batch."""
        batch = self._last
        if batch is None:
            return None
        if batch.read is None:
            batch.read = self._telemetry(1, batch.rows, batch.counts.tolist(), batch.limit)
        return batch.read

    def totals(self) -> Telemetry:
        """The sums over every batch since the engine was made or :meth:`reset` (one host
        sync per device the batches ran on)."""
        counts = [0] * (self.num_exits + 2)
        for total in self._totals.values():
            counts = [a + b for a, b in zip(counts, total.tolist(), strict=True)]
        return self._telemetry(self._batches, self._rows, counts,
                               self._limit if self.guarded else None)

    def _telemetry(self, batches: int, rows: int, counts: list[int], limit: float | None
                   ) -> Telemetry:
        exits = tuple(int(c) for c in counts[:self.num_exits])
        spent = None
        if self.costs is not None:
            spent = float(sum(n * c for n, c in zip(exits, self.costs.values, strict=True)))
        return Telemetry(batches=batches, rows=rows, exits=exits,
                         forced=int(counts[self.num_exits]),
                         nonfinite=rows - int(counts[self.num_exits + 1]), cost_spent=spent,
                         cost_limit=limit, unit=None if self.costs is None else self.costs.unit)
