"""A tour of the ops on one early-exit stage (``python -m eenet_kernels.demo``).

A batch's per-row state (the stage's activation h (N, D) and each row's position in the
input batch) meets an exit. ``exit_score_write`` scores every row in one fused pass
(classifier, softmax, max-prob score, threshold) and writes the results of the rows that
leave at their input positions; ``compact`` moves the rows that stay to the front of every
state tensor in one call; ``take`` reads their count, the stage's one host sync. The demo
checks each step against the same computation in plain torch and prints what happened.
Random weights: this shows the mechanics, not accuracy. The loop over a whole network's
stages is ``eenet.runtime.Engine``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import eenet_kernels as ek

BATCH, WIDTH, CLASSES = 4096, 512, 10
SCORE_TOL = 1e-5  # decisions are compared away from the threshold (fp32 rounding)


def main() -> None:
    torch.manual_seed(0)
    h = torch.randn(BATCH, WIDTH)
    weight = torch.randn(CLASSES, WIDTH) / WIDTH ** 0.5
    bias = torch.randn(CLASSES)
    index = torch.arange(BATCH)
    out_logits = torch.zeros(BATCH, CLASSES)
    out_score = torch.zeros(BATCH)
    out_exit = torch.full((BATCH,), -1, dtype=torch.int64)

    # plain torch, unfused: classifier, softmax, max-prob score; the threshold at the median
    # score, so that about half of the rows leave
    plain_logits = F.linear(h, weight, bias)
    plain_score = torch.softmax(plain_logits, dim=1).max(dim=1).values
    threshold = float(plain_score.median())

    res = ek.exit_score_write(h, weight, bias, row_index=index, exit_index=0,
                              out_logits=out_logits, out_score=out_score, out_exit=out_exit,
                              policy="max_prob", threshold=threshold)
    kept, count = ek.compact(res.keep, [h, index])
    h_next, index_next = ek.take(kept, count)

    away = (plain_score - threshold).abs() > SCORE_TOL
    checks = {
        "logits as plain torch": bool(torch.allclose(res.logits, plain_logits, atol=1e-4)),
        "decisions as plain torch": bool(
            (res.exit_mask == (plain_score >= threshold))[away].all()),
        "pred = argmax, keep = ~exit": bool(torch.equal(res.pred, res.logits.argmax(dim=1))
                                            and torch.equal(res.keep, ~res.exit_mask)),
        "leaving rows written in place": bool(
            torch.equal(out_exit, torch.where(res.exit_mask, 0, -1))
            and torch.equal(out_logits[res.exit_mask], res.logits[res.exit_mask])
            and torch.equal(out_score[res.exit_mask], res.score[res.exit_mask])),
        "staying rows compacted in order": bool(
            torch.equal(h_next, h[res.keep]) and torch.equal(index_next, index[res.keep])),
    }
    print(f"eenet_kernels demo: one exit, batch {BATCH}, width {WIDTH}, {CLASSES} classes, "
          f"CPU, backend {ek.resolve_backend(h.device)!r}")
    print(f"  threshold (median max-prob)    : {threshold:.4f}")
    print(f"  rows leaving / staying         : {int(res.exit_mask.sum())} / {h_next.shape[0]}")
    print(f"  next stage runs on             : h {tuple(h_next.shape)}, rows "
          f"{index_next[:5].tolist()} ...")
    for name, ok in checks.items():
        print(f"  {name:<31}: {ok}")
    if not all(checks.values()):
        raise SystemExit("demo: the ops disagree with plain torch")


if __name__ == "__main__":
    main()
