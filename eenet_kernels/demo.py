"""A tour of the ops on a toy three-exit MLP (``python -m eenet_kernels.demo``).

Runs the batched early-exit loop of DESIGN.md (exit_score_write + compact + take per
stage) and the same model in full mode (every stage on every row, decisions afterwards),
checks that both give the same exit and logits for every sample, and prints the exit
distribution and the wall-clock ratio. Random weights: this shows the mechanics, not
accuracy (the trained demo arrives with the ``eenet`` package).
"""

from __future__ import annotations

import time

import torch

import eenet_kernels as ek

STAGES, WIDTH, CLASSES, BATCH = 3, 512, 10, 4096


class ToyMultiExit(torch.nn.Module):
    """STAGES x (Linear + ReLU) blocks, each followed by a linear exit classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
                                torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU())
            for _ in range(STAGES))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(WIDTH, CLASSES) for _ in range(STAGES))


def run_compact(model: ToyMultiExit, x: torch.Tensor, thresholds: list[float]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Early exit with compaction: each stage runs only on the rows still present."""
    n = x.shape[0]
    out_logits = x.new_zeros(n, CLASSES)
    out_score = x.new_zeros(n)
    out_exit = torch.full((n,), -1, dtype=torch.int64)
    h, idx = x, torch.arange(n)
    for k, (stage, head) in enumerate(zip(model.stages, model.heads, strict=True)):
        h = stage(h)
        decision = ek.exit_score_write(
            h, head.weight, head.bias, policy="max_prob", threshold=thresholds[k],
            is_last=k == STAGES - 1, row_index=idx, exit_index=k, out_logits=out_logits,
            out_score=out_score, out_exit=out_exit, check_finite=False)
        if k == STAGES - 1:
            break
        kept, count = ek.compact(~decision.exit_mask, [h, idx])
        h, idx = ek.take(kept, count)
        if h.shape[0] == 0:
            break
    return out_logits, out_exit


def run_full(model: ToyMultiExit, x: torch.Tensor, thresholds: list[float]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every stage on every row; the first exit whose score passes its threshold wins."""
    logits = []
    h = x
    for stage, head in zip(model.stages, model.heads, strict=True):
        h = stage(h)
        logits.append(head(h))
    out_logits = logits[-1].clone()
    out_exit = torch.full((x.shape[0],), STAGES - 1, dtype=torch.int64)
    decided = torch.zeros(x.shape[0], dtype=torch.bool)
    for k in range(STAGES - 1):
        take_here = (torch.softmax(logits[k], 1).max(1).values >= thresholds[k]) & ~decided
        out_logits[take_here] = logits[k][take_here]
        out_exit[take_here] = k
        decided |= take_here
    return out_logits, out_exit


def _best_time(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    torch.manual_seed(0)
    model = ToyMultiExit().eval()
    x = torch.randn(BATCH, WIDTH)
    with torch.no_grad():
        # thresholds at the median score of each exit: about half of the rows leave per exit
        h, thresholds = x, []
        for stage, head in zip(model.stages, model.heads, strict=True):
            h = stage(h)
            thresholds.append(float(torch.softmax(head(h), 1).max(1).values.median()))
        full_logits, full_exit = run_full(model, x, thresholds)
        ours_logits, ours_exit = run_compact(model, x, thresholds)
        same_exit = bool((full_exit == ours_exit).all())
        max_diff = float((full_logits - ours_logits).abs().max())
        t_full = _best_time(lambda: run_full(model, x, thresholds))
        t_ours = _best_time(lambda: run_compact(model, x, thresholds))

    backend = ek.resolve_backend(x.device)
    counts = torch.bincount(ours_exit, minlength=STAGES).tolist()
    print(f"eenet_kernels demo: {STAGES}-exit MLP, batch {BATCH}, width {WIDTH}, "
          f"CPU, backend {backend!r}")
    print(f"  samples per exit        : {counts}")
    print(f"  same exit as full mode  : {same_exit}")
    print(f"  max |logit difference|  : {max_diff:.2e}")
    print(f"  full mode               : {t_full * 1e3:8.2f} ms/batch")
    print(f"  compact mode (ours)     : {t_ours * 1e3:8.2f} ms/batch  "
          f"({t_full / t_ours:.2f}x the throughput of full)")
    if not same_exit or max_diff > 1e-4:
        raise SystemExit("demo: compact mode disagrees with full mode")


if __name__ == "__main__":
    main()
