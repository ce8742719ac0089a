"""Heuristic baselines: max-prob (MSDNet), entropy (BranchyNet), patience (PABEE).

Each is one threshold per exit on a hand-made confidence score. ``fit`` sets the thresholds
for a budget by the geometric exit-distribution scan on validation data, as the EENet paper
does for its baselines.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from eenet_kernels import NEVER_EXIT

from ..budget import Budget, Costs, as_budget
from .base import ExitPolicy
from .calibration import collect_exit_logits, geometric_scan


class HeuristicPolicy(ExitPolicy):
    """A threshold rule on a fixed score; subclasses name the score (the op's policy)."""

    kind: ClassVar[str]

    def never_threshold(self, num_exits: int) -> float:
        """The threshold no sample passes: NEVER_EXIT (just above 1) for probability-like
        scores, which reach 1.0 exactly where the softmax saturates in float32."""
        return NEVER_EXIT

    @classmethod
    def fit_logits(cls, logits: list[torch.Tensor], costs: Costs, budget: float | Budget
                   ) -> HeuristicPolicy:
        """Thresholds from validation logits (K tensors (N, C)) meeting ``budget``."""
        if len(logits) != len(costs.values):
            raise ValueError(f"the network has {len(logits)} exits but costs has "
                             f"{len(costs.values)} values")
        probe = cls([0.0] * len(logits))
        scores = probe.scores(logits)
        if scores.shape[0] == 0:
            raise ValueError(f"{cls.__name__} needs at least one validation sample to set "
                             "thresholds for a budget")
        b = as_budget(budget).absolute(costs)
        thresholds = geometric_scan(scores, costs, b, never=probe.never_threshold(len(logits)))
        return cls(thresholds)

    @classmethod
    def fit(cls, net: torch.nn.Module, val_loader, costs: Costs, budget: float | Budget
            ) -> HeuristicPolicy:
        """Run ``net`` over ``val_loader`` (batches in any form of :mod:`eenet.batches`) and
        :meth:`fit_logits` on its exits' logits."""
        logits, _ = collect_exit_logits(net, val_loader)
        return cls.fit_logits(logits, costs, budget)


class MaxProb(HeuristicPolicy):
    """Exit when the max softmax probability reaches the exit's threshold."""

    kind = "max_prob"


class Entropy(HeuristicPolicy):
    """Exit when 1 - H(p)/log C reaches the exit's threshold."""

    kind = "entropy"


class Patience(HeuristicPolicy):
    """Exit when the last ``threshold`` earlier exits agree with this exit's argmax (PABEE)."""

    kind = "patience"

    def never_threshold(self, num_exits: int) -> float:
        return float(num_exits)  # a streak at exit k is at most k < K
