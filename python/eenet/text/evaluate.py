"""Every exit policy on SST-2 sentences: fit on one sentence split, evaluate on the other.

Policies are fitted on the dev sentences (872) and evaluated on the test sentences (1,821),
never on train phrases: sentences are longer and harder than the sub-sentence phrases of
train.tsv, so thresholds set on held-out phrases overshoot the budget on sentences.
Thresholds are set under FLOP costs (device-independent); the achieved cost on test is
reported both in FLOPs and in measured latency at the serving batch size, as fractions of
the full model. Accuracy comes with a 95% percentile bootstrap interval, and EENet is
compared with the best heuristic at each budget (the heuristic with the highest test
accuracy there, which favours the heuristics) by a paired bootstrap of the accuracy
difference on the same test sentences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..budget import Costs
from ..demo import BUDGETS, POLICY_CLASSES, fit_policy
from ..policies import ExitPolicy
from ..stats import bootstrap_ci, paired_bootstrap
from .recipe import SplitLogits

__all__ = ["TEXT_BUDGETS", "Comparison", "PolicyRow", "compare", "evaluate_policies",
           "exit_accuracies", "score_auc", "score_aucs", "verdict"]

# the budgets of the SST-2 report: the demo's 30..90% and two below, where most sentences
# must leave at the first exits (the first exit, after layer 1, costs 17% of the model)
TEXT_BUDGETS: tuple[float, ...] = (0.2, 0.25, *BUDGETS)

@dataclass
class PolicyRow:
    """One policy at one budget, on the evaluation split."""

    budget: float
    policy: str
    accuracy: float
    low: float
    high: float
    cost_flops: float  # achieved average cost, fraction of the full model's FLOPs
    cost_ms: float  # the same exits priced with the measured latency costs
    exit_mix: list[float]  # fraction of the samples leaving at each exit


@dataclass
class Comparison:
    """EENet minus the best heuristic at one budget: paired bootstrap of the accuracy
    difference on the same samples."""

    budget: float
    heuristic: str
    diff: float
    low: float
    high: float
    p_le_0: float
    verdict: str  # "wins", "ties" or "loses" (the interval above, across or below 0)
    headroom: float  # the last exit's accuracy minus the heuristic's: what is left to gain


def exit_accuracies(split: SplitLogits) -> list[float]:
    """Accuracy of every exit on its own (K floats)."""
    return [float((z.argmax(dim=1) == split.labels).float().mean()) for z in split.logits]


def _correct(policy: ExitPolicy, split: SplitLogits) -> tuple[torch.Tensor, torch.Tensor]:
    exit_index, _ = policy.decide(split.logits)
    stacked = torch.stack(split.logits, dim=1)
    pred = stacked[torch.arange(split.labels.shape[0]), exit_index].argmax(dim=1)
    return (pred == split.labels).double(), exit_index


def evaluate_policies(fit: SplitLogits, held_out: SplitLogits, costs_flops: Costs,
                      costs_ms: Costs, budgets: tuple[float, ...] = BUDGETS,
                      policies: tuple[type[ExitPolicy], ...] = POLICY_CLASSES,
                      resamples: int = 2000, eenet_options: dict[str, Any] | None = None,
                      ) -> tuple[list[PolicyRow], dict[tuple[str, float], torch.Tensor]]:
    """Fit every policy on ``fit`` at every budget (a fraction of the full FLOPs) and
    evaluate it on ``held_out``: the rows, and each (policy, budget)'s per-sample
    correctness (N,) float64 on ``held_out`` for paired comparisons."""
    rows: list[PolicyRow] = []
    correct: dict[tuple[str, float], torch.Tensor] = {}
    k_exits = len(held_out.logits)
    for b in budgets:
        for cls in policies:
            policy = fit_policy(cls, fit.logits, fit.labels, costs_flops, b, eenet_options)
            ok, exit_index = _correct(policy, held_out)
            acc, low, high = bootstrap_ci(ok, num_samples=resamples)
            mix = torch.bincount(exit_index, minlength=k_exits).double() / len(exit_index)
            rows.append(PolicyRow(b, cls.__name__, acc, low, high,
                                  costs_flops.expected(exit_index) / costs_flops.full,
                                  costs_ms.expected(exit_index) / costs_ms.full,
                                  [float(f) for f in mix]))
            correct[(cls.__name__, b)] = ok
    return rows, correct


def verdict(low: float, high: float) -> str:
    """``wins`` when the interval of the difference lies above 0, ``loses`` below, else
    ``ties``."""
    return "wins" if low > 0 else "loses" if high < 0 else "ties"


def compare(rows: list[PolicyRow], correct: dict[tuple[str, float], torch.Tensor],
            last_exit_accuracy: float, ours: str = "EENet", resamples: int = 2000
            ) -> list[Comparison]:
    """Per budget: ``ours`` against the heuristic with the highest accuracy there;
    ``last_exit_accuracy`` (the full model's) gives each comparison's headroom."""
    out: list[Comparison] = []
    for b in sorted({r.budget for r in rows}):
        others = [r for r in rows if r.budget == b and r.policy != ours]
        if not others or (ours, b) not in correct:
            continue
        best = max(others, key=lambda r: r.accuracy)
        res = paired_bootstrap(correct[(ours, b)], correct[(best.policy, b)],
                               num_samples=resamples)
        out.append(Comparison(b, best.policy, res["diff"], res["low"], res["high"],
                              res["p_le_0"], verdict(res["low"], res["high"]),
                              last_exit_accuracy - best.accuracy))
    return out


def score_auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``score`` (N,) for the (N,) bool ``positive``: the chance
    that a random positive scores above a random negative, ties counting one half (average
    ranks, the Mann-Whitney form). NaN without positives or without negatives."""
    if score.dim() != 1 or positive.shape != score.shape:
        raise ValueError(f"score and positive must be (N,) alike, got {tuple(score.shape)} and "
                         f"{tuple(positive.shape)}")
    pos = positive.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, order = score.double().sort()
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2  # 1-based average rank of each tie group
    ranks = torch.empty_like(values)
    ranks[order] = average[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score_aucs(policy: ExitPolicy, split: SplitLogits) -> list[float]:
    """Per exit k: the AUC of the policy's exit-k score for "exit k is right", over every
    sample of the split (how well the score ranks that exit's right answers above its
    wrong ones, whatever the threshold)."""
    scores = policy.scores(split.logits)
    return [score_auc(scores[:, k], z.argmax(dim=1) == split.labels)
            for k, z in enumerate(split.logits)]


def rows_to_dicts(rows: list[PolicyRow] | list[Comparison]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
