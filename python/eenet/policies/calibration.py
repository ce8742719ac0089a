"""Threshold setting from validation scores: per-exit quantiles and the geometric scan.

Both heuristics (max-prob, entropy, patience) and EENet set thresholds greedily, exit by
exit, so that a chosen fraction of the whole validation set leaves at each exit (a quantile
of the scores among the samples still present). The heuristics choose the fractions from a
geometric family p_k ∝ q^k and scan q until the achieved average cost meets the budget.
"""

from __future__ import annotations

import math

import torch

from eenet_kernels.checks import threshold_as_float32

from ..batches import check_padding, split_batch
from ..budget import Costs
from ..modes import eval_mode


def thresholds_for_fractions(scores: torch.Tensor, fractions: list[float] | torch.Tensor,
                             never: float, floor: float = 0.0) -> list[float]:
    """Greedy per-exit thresholds so that about ``fractions[k]`` of all N samples exit at k.

    scores (N, K) float32 (NaN never exits); fractions (K,) (the last one is implied).
    The targets are cumulative: exit k takes what brings the samples gone by exit k to
    about ``sum(fractions[:k + 1]) * N``, so a shortfall at one exit (too few samples with a
    score there: NaN scores, which never exit) moves on to the next exit instead of to the
    last, and tied samples taken beyond a target are taken off the next.
    ``never`` is the threshold used where no sample should exit: above every score the
    policy can give (``NEVER_EXIT`` for probability-like scores, which reach 1.0 exactly
    where they saturate); ``floor`` the bottom of the score range (0 for every policy's
    score). Ties at the quantile let every tied sample exit.

    No threshold sits on a sample's score: at exit k, with v the score of the last sample
    taken (the quantile) among those still present, the threshold is the midpoint between v
    and the next lower distinct score present (``floor`` if there is none), rounded to
    float32, the dtype the scores are compared in. The samples that exit are the same as with
    a threshold of v, but a sample equal to (or a duplicate of) the one at the quantile does
    not tie with the threshold, where backends computing the score to a different last bit
    could split on it. Only where the two neighbours are adjacent float32 values (nothing lies
    between them) is the threshold v itself. Thresholds are float32-representable.
    """
    n, k_exits = scores.shape
    wanted = torch.as_tensor(fractions, dtype=torch.float64).flatten()
    if wanted.numel() not in (k_exits - 1, k_exits) or not bool(
            (torch.isfinite(wanted) & (wanted >= 0)).all()):
        raise ValueError(f"fractions must be {k_exits - 1} or {k_exits} finite numbers >= 0 "
                         f"(one per exit, the last optional), got {wanted.tolist()}")
    remaining = torch.ones(n, dtype=torch.bool, device=scores.device)
    cumulative = wanted.cumsum(0).tolist()
    thresholds: list[float] = []
    for k in range(k_exits - 1):
        s = scores[remaining, k]
        s = s[~torch.isnan(s)]
        gone = n - int(remaining.sum())
        want = min(round(cumulative[k] * n) - gone, s.numel())
        if want <= 0:
            t = never
        else:
            v = float(torch.sort(s, descending=True).values[want - 1])
            if v >= never:
                t = never
            else:
                lower = s[s < v]
                t = _between(float(lower.max()) if lower.numel() else floor, v)
        thresholds.append(t)
        remaining &= ~(scores[:, k] >= threshold_as_float32(t))  # as the kernels compare
    thresholds.append(0.0)
    return thresholds


def _between(low: float, high: float) -> float:
    """A float32 value t with low < t <= high, as near their midpoint as float32 allows
    (``high`` when no float32 lies strictly between them, or when low >= high)."""
    if not low < high:
        return high
    mid = float(torch.tensor(0.5 * (low + high), dtype=torch.float32))
    return mid if low < mid <= high else high


def geometric_fractions(q: float, k_exits: int) -> list[float]:
    """p_k ∝ q^k, k = 0..K-1 (q < 1 favours early exits, q > 1 late ones)."""
    w = [q**k for k in range(k_exits)]
    total = sum(w)
    return [x / total for x in w]


def achieved_exits(scores: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Exit index (N,) of every sample under the thresholds (first passing exit)."""
    from .base import first_exit

    return first_exit(scores, thresholds)[0]


def geometric_scan(scores: torch.Tensor, costs: Costs, budget: float, never: float,
                   iterations: int = 60) -> list[float]:
    """Thresholds of the geometric family whose achieved cost on ``scores`` meets ``budget``.

    ``budget`` is absolute (the costs' unit). Bisection on log q; returns the largest-cost
    thresholds that do not exceed the budget (or the cheapest found if none does).
    """
    k_exits = scores.shape[1]
    if len(costs.values) != k_exits:
        raise ValueError(f"costs have {len(costs.values)} exits but the scores have {k_exits}")

    def evaluate(log_q: float) -> tuple[list[float], float]:
        th = thresholds_for_fractions(scores, geometric_fractions(math.exp(log_q), k_exits),
                                      never)
        return th, costs.expected(achieved_exits(scores, th))

    lo, hi = -20.0, 20.0
    best_th, best_cost = evaluate(lo)
    th_hi, cost_hi = evaluate(hi)
    if cost_hi <= budget:
        return th_hi
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        th, cost = evaluate(mid)
        if cost <= budget:
            lo, best_th, best_cost = mid, th, cost
        else:
            hi = mid
        if abs(best_cost - budget) <= 1e-4 * budget:
            break
    return best_th


@torch.no_grad()
def collect_exit_logits(net: torch.nn.Module, loader) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every exit's logits on a whole loader: (K tensors (N, C) float32, labels (N,) int64).

    ``loader`` yields batches in any form of :mod:`eenet.batches` (``(x, y)``, ``(x, y,
    row_inputs)``, a dict). A network the engine runs (``stages`` and exit ``heads``, as
    ``MultiExitNetwork``) gives the logits the engine computes
    (:func:`eenet.runtime.engine.every_exit_logits`: fp32 heads, also for an fp16/bf16
    network), so that thresholds set on them split the samples as the engine does; any
    other ``net(x, **row_inputs)`` must return the list of its K exits' logits. Raises
    ``ValueError`` for a loader without samples and for labels that are not integers.
    """
    from ..runtime.engine import check_exit_network, every_exit_logits

    staged = getattr(net, "stages", None) is not None and getattr(net, "heads", None) is not None
    if staged:
        check_exit_network(net)
    per_exit: list[list[torch.Tensor]] = []
    labels = []
    first = next(net.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    with eval_mode(net):
        for batch in loader:
            x, y, row_inputs = split_batch(batch)
            check_padding(net, x, row_inputs)
            x, row_inputs = x.to(device), {k: v.to(device) for k, v in row_inputs.items()}
            outs = every_exit_logits(net, x, row_inputs) if staged else net(x, **row_inputs)
            if not per_exit:
                per_exit = [[] for _ in outs]
            for k, z in enumerate(outs):
                per_exit[k].append(z.float().cpu())
            labels.append(y.cpu())
    if not per_exit:
        raise ValueError("the loader yielded no batches")
    y = torch.cat(labels)
    if y.numel() == 0:
        raise ValueError("the loader yielded no samples (every batch had 0 rows)")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"the loader's labels must be integers, got {y.dtype} (a float label "
                         "would be cut to an integer)")
    return [torch.cat(z) for z in per_exit], y.long()
