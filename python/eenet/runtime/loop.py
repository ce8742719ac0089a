"""The batched early-exit loop: the one loop every execution that runs stage by stage goes
through (the engine's ``mask`` and ``compact`` modes, the benchmark's peer methods).

Per stage k: run stage k on the rows present, let exit k decide (and write the results of
the rows that leave), then, except after the last exit, let the rows that stay go on.
How an exit scores and writes, and how leaving rows leave (masked, compacted, dropped by
boolean indexing, ...), is a :class:`Step`'s business; the loop holds no state of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch


@dataclass
class RowState:
    """The per-row state that travels with the n rows still present.

    - ``index``: (n,) int64, each row's position in the input batch.
    - ``scores``: (K, >= n) float32 or None: ``scores[j, i]`` is row i's score at exit j,
      filled for the exits already passed (the EENet scheduler's history); one row per exit,
      so that each exit's scores are contiguous. None when the policy reads no scores.
    - ``preds``: (K, >= n) int64 or None: the argmax at each exit passed, likewise (patience,
      the vote feature). None when the policy reads no predictions.
    - ``inputs``: per-row side inputs by name, each (n, ...), handed to every stage as
      keyword arguments (e.g. a padded batch's ``attention_mask``).
    """

    index: torch.Tensor
    scores: torch.Tensor | None = None
    preds: torch.Tensor | None = None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """n, the number of rows present."""
        return self.index.shape[0]

    def prev_scores(self, k: int) -> torch.Tensor | None:
        """(n, k) float32 view: the scores of exits 0..k-1 of the rows present."""
        return None if self.scores is None else self.scores[:k, :self.rows].t()

    def prev_preds(self, k: int) -> torch.Tensor | None:
        """(n, k) int64 view: the predictions of exits 0..k-1 of the rows present."""
        return None if self.preds is None else self.preds[:k, :self.rows].t()


Decision = TypeVar("Decision")


class Step(Protocol[Decision]):
    """What an execution method does around the stages of :func:`run_stages`."""

    def exit(self, k: int, h: torch.Tensor, rows: RowState) -> Decision:
        """Exit k on stage k's output h (n, ...) for the rows present: decide which rows
        leave, and write their results."""
        ...

    def advance(self, k: int, h: torch.Tensor, rows: RowState, decision: Decision
                ) -> tuple[torch.Tensor, RowState] | None:
        """After exit k (never the last): stage k+1's input and the rows it runs on, or None
        when no row goes on."""
        ...


def run_stages(stages: Sequence[Callable[..., torch.Tensor]], x: torch.Tensor, rows: RowState,
               step: Step[Decision]) -> None:
    """Run ``stages`` (modules, or callables like them: ``stage(h, **rows.inputs)``) on x
    (N, ...) and the rows ``rows`` describes, stage by stage, with ``step``'s exit decisions
    between them; the results are what ``step`` wrote."""
    h = x
    last = len(stages) - 1
    for k, stage in enumerate(stages):
        h = stage(h, **rows.inputs)
        decision = step.exit(k, h, rows)
        if k == last:
            return
        following = step.advance(k, h, rows, decision)
        if following is None:
            return
        h, rows = following
