"""The budget guard: a per-batch cost limit the runtime enforces by cutting the survivors'
run short.

Costs are cumulative (:class:`eenet.budget.Costs`): c_k is what a row leaving at exit k has
cost (stages 0..k, heads 0..k). A guard's limit L is an average cost per sample, in the
costs' unit (a bare number is a fraction of the full model's cost, as for
:class:`eenet.budget.Budget`); a batch of N rows may spend N * L in all.

The rule, after exit k (never the last): with E the cost of the rows that have left so far
(each at the c_j of the exit it took) and s rows still going on, the survivors run stage
k + 1 only if E + s * c_{k+1} <= N * L, i.e. if all of them could still reach exit k + 1
within the limit. Otherwise every survivor leaves at exit k, with exit k's logits and score,
flagged as forced (:attr:`eenet.runtime.EngineOutput.forced`).

The bound: a guarded batch spends sum_i c_{exit(i)} <= max(N * L, N * c_0). Proof: the
survivors go on to exit k + 1 only when what the batch has spent by then, E + s * c_{k+1},
stays within N * L, and a forced exit at k spends no more than the batch had spent at exit
k, so the spending never rises above N * L after exit 0; exit 0 itself costs N * c_0, which
no rule can avoid. A limit below c_0 thus sends every row out at exit 0.

Every mode applies the rule to the same per-exit row counts with the same float arithmetic
(:class:`GuardLedger`), so full, mask and compact agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # eenet.budget imports eenet.runtime (timing): imported where used
    from ..budget import Budget, Costs


class BudgetGuard:
    """A per-batch cost limit (module docstring): ``costs`` the cumulative cost per exit,
    ``limit`` the average cost per sample a batch may spend: a float is a fraction of
    ``costs.full`` in (0, 1]; a :class:`~eenet.budget.Budget` is a fraction or a value in
    the costs' unit (> 0)."""

    def __init__(self, costs: Costs, limit: float | Budget) -> None:
        from ..budget import Costs

        if not isinstance(costs, Costs):
            raise TypeError(f"costs must be an eenet.budget.Costs, got {type(costs).__name__}")
        self.costs = costs
        self.limit = _per_sample(costs, limit)
        """The limit as an average cost per sample, in ``costs.unit``."""

    @property
    def num_exits(self) -> int:
        return len(self.costs.values)

    def batch_limit(self, rows: int) -> float:
        """What a batch of ``rows`` rows may spend in all: rows * :attr:`limit`."""
        return rows * self.limit

    def ledger(self, rows: int) -> GuardLedger:
        """A fresh account for one batch of ``rows`` rows."""
        return GuardLedger(self.costs.values, self.batch_limit(rows), rows)

    def cut(self, counts: Sequence[int]) -> int | None:
        """The exit at which the guard cuts a batch whose rows would, unguarded, leave
        ``counts[k]`` at exit k (K ints): every row headed past that exit is forced out
        there; None when the guard lets the batch run as decided."""
        if len(counts) != self.num_exits:
            raise ValueError(f"counts must have one value per exit ({self.num_exits}), got "
                             f"{len(counts)}")
        ledger = self.ledger(sum(counts))
        for k in range(self.num_exits - 1):
            if ledger.cut_after(k, ledger.present - counts[k]):
                return k
        return None

    def __repr__(self) -> str:
        return (f"BudgetGuard(limit={self.limit:.4g} {self.costs.unit} per sample, "
                f"{self.limit / self.costs.full:.3g} of the full model)")


class GuardLedger:
    """One batch's account under a guard: the rows present and the cost of the rows that
    have left. Host ints and floats only: the counts it reads are the survivor counts the
    runtime already has on the host."""

    def __init__(self, values: Sequence[float], limit: float, rows: int) -> None:
        self.values = values
        self.limit = limit
        """The batch's total limit."""
        self.present = rows
        """Rows still in the batch."""
        self.left_cost = 0.0
        """Cost of the rows that have left: sum of c_k over them."""

    def cut_after(self, k: int, survivors: int) -> bool:
        """After exit k (not the last), ``survivors`` of the rows present going on: account
        for the rows that left at k and say whether the survivors must leave at k too."""
        self.left_cost += (self.present - survivors) * self.values[k]
        self.present = survivors
        return survivors > 0 and self.left_cost + survivors * self.values[k + 1] > self.limit


def _per_sample(costs: Costs, limit: float | Budget) -> float:
    """``limit`` as an average cost per sample in the costs' unit."""
    from ..budget import Budget

    if isinstance(limit, bool) or not isinstance(limit, int | float | Budget):
        raise TypeError(f"limit must be a fraction of the full cost (float) or an "
                        f"eenet.budget.Budget, got {type(limit).__name__}")
    value, unit = (limit.value, limit.unit) if isinstance(limit, Budget) else (limit, "fraction")
    value = float(value)
    if unit == "fraction":
        if not 0.0 < value <= 1.0:
            raise ValueError(f"limit: a fraction of the full cost must lie in (0, 1], got "
                             f"{value}")
        return value * costs.full
    if unit != costs.unit:
        raise ValueError(f"limit is in {unit!r} but the costs are in {costs.unit!r}")
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"limit must be a positive finite cost, got {value} {unit}")
    return value
