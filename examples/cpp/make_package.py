"""Builds the inputs of examples/cpp/aoti_run: a small multi-exit CNN compiled ahead of time
into ``<out>/loop.pt2`` by ``eenet.runtime.package_engine``, and ``<out>/cases.pt``, the
input batches with the outputs of ``Engine(net, policy, mode="compact")`` on them.

    .venv/bin/python examples/cpp/make_package.py build/cmake/aoti

Everything is deterministic (fixed seeds): the network (``eenet.models.small_cnn``, random
weights with each exit's classifier rescaled so that the scores spread, eval mode) and the
batches. The MaxProb thresholds are chosen on the batches so
that rows leave at every exit, each one halfway between two neighbouring scores of the
rows it splits, far from every score (a row within rounding of a threshold could exit
elsewhere in the compiled code).

``cases.pt`` is ``torch.save`` of ``{"cases": [{"inputs": [x, *row_inputs], "logits",
"exit_index", "score"}, ...]}``: the C++ side reads it with ``torch::jit::pickle_load`` (libtorch's
reader of ``torch.save`` files), which returns the dict as an IValue with the tensors'
dtypes and shapes, so no format of our own is needed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import eenet_kernels  # noqa: F401  (registers the eenet ops)
from eenet.models import small_cnn
from eenet.policies import MaxProb
from eenet.runtime import Engine, package_engine

IMAGE = 16
CLASSES = 10
BATCH_SIZES = (5, 17)
EXPORT_ROWS = 4  # the example batch of the export: another size than the checked ones
GAIN = 3.0       # logit scale of the rescaled classifiers (build_net)
MIN_GAP = 1e-4   # least distance from a threshold to any row's score at that exit


def build_net(x: torch.Tensor) -> torch.nn.Module:
    """small_cnn with random weights, each exit's classifier rescaled on ``x``: with random
    weights the pooled features barely vary between rows and every softmax is near uniform,
    so each classifier gets unit-variance inputs (per feature, over ``x``) and a gain that
    spreads the max-probabilities over about 0.2 to 0.95."""
    torch.manual_seed(0)
    net = small_cnn(in_channels=1, num_classes=CLASSES, image_size=IMAGE,
                    widths=(8, 16, 32), head_width=8).eval()
    feats: dict[int, torch.Tensor] = {}
    hooks = [head.classifier.register_forward_hook(
        lambda _m, inputs, _out, k=k: feats.__setitem__(k, inputs[0]))
        for k, head in enumerate(net.heads)]
    with torch.no_grad():
        net(x)
        for hook in hooks:
            hook.remove()
        for k, head in enumerate(net.heads):
            f = feats[k].reshape(-1, feats[k].shape[-1])
            weight = head.classifier.weight * GAIN / f.std(0).clamp_min(1e-6)
            head.classifier.weight.copy_(weight)
            head.classifier.bias.copy_(-weight @ f.mean(0))
    return net


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [3.0 * torch.randn(n, 1, IMAGE, IMAGE, generator=g) for n in BATCH_SIZES]


def spread_thresholds(net: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """MaxProb thresholds under which about a K-th of the rows leave at each exit: at exit k,
    among the rows still running, the midpoint of the widest gap between neighbouring
    scores near the wanted split."""
    with torch.no_grad():
        logits = [z.float() for z in net(x)]
    k_exits = len(logits)
    scores = MaxProb([0.0] * k_exits).scores(logits)
    running = torch.ones(x.shape[0], dtype=torch.bool)
    thresholds = []
    for k in range(k_exits - 1):
        s = scores[running, k].sort(descending=True).values
        n = s.numel()
        want = max(1, round(n / (k_exits - k)))
        # candidate splits i (rows [0, i) leave) around `want`, the widest gap wins
        cands = [i for i in range(max(1, want - 2), min(n - 1, want + 2) + 1)]
        i = max(cands, key=lambda i: float(s[i - 1] - s[i]))
        gap = float(s[i - 1] - s[i])
        if gap < 2 * MIN_GAP:
            raise SystemExit(f"make_package: exit {k}: no split with a gap >= {2 * MIN_GAP}")
        t = float(s[i] + s[i - 1]) / 2
        thresholds.append(t)
        running &= scores[:, k] < t
    return [*thresholds, 1.0]  # the last exit takes every row left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for loop.pt2 and cases.pt")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    xs = batches()
    net = build_net(torch.cat(xs))
    policy = MaxProb(spread_thresholds(net, torch.cat(xs)))
    engine = Engine(net, policy, mode="compact")
    cases = []
    for x in xs:
        with torch.no_grad():
            out = engine(x)
        counts = torch.bincount(out.exit_index, minlength=len(net.heads)).tolist()
        print(f"make_package: {x.shape[0]} rows, rows per exit {counts}")
        cases.append({"inputs": [x.contiguous()], "logits": out.logits.contiguous(),
                      "exit_index": out.exit_index.contiguous(),
                      "score": out.score.contiguous()})
    torch.save({"cases": cases}, args.out / "cases.pt")

    start = time.perf_counter()
    g = torch.Generator().manual_seed(2)
    example = torch.randn(EXPORT_ROWS, 1, IMAGE, IMAGE, generator=g)
    path = package_engine(net, policy, str(args.out / "loop.pt2"), example)
    print(f"make_package: {path} ({time.perf_counter() - start:.1f} s), thresholds "
          f"{[round(t, 5) for t in policy.thresholds]}")


if __name__ == "__main__":
    main()
