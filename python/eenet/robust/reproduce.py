"""RDI-Nets and DeepSloth on the demo data, end to end (``make robust``, ``eenet robust``,
``python -m eenet.robust.reproduce``).

Three models of one backbone (:func:`eenet.models.small_cnn`) are trained on the same
split with fixed seeds: RDI-Nets (:func:`eenet.robust.rdi_train`, max-average adversarial
examples at every exit), the single-exit baseline with PGD adversarial training
(:func:`eenet.robust.single_exit`, :func:`eenet.robust.adversarial_train`), and an
undefended multi-exit model (:func:`eenet.train.multi_exit`). Policies are fitted on the
clean validation split: RDI-Nets' uniform entropy thresholds
(:func:`eenet.robust.uniform_entropy_policy_logits`), EENet and MaxProb at a budget. The
test split is then attacked and served (:mod:`eenet.robust.evaluate`):

1. accuracy: clean and under every PGD form (main, single-exit k, average, max-average,
   and the per-sample worst case over them), crafted on each network at the dataset's test
   strength, the inputs served by the engine under the policy; each exit alone under the
   same inputs; the average cost per sample, as a fraction of the backbone's FLOPs;
2. slowdown (DeepSloth's uniform objective on the early exits): average cost on clean vs
   attacked inputs and the share of the saving the attack erases,
   ``(cost_slow - cost_clean) / (full - cost_clean)``;
3. the budget guard (:class:`eenet.runtime.BudgetGuard`, limit = the policy's clean
   validation cost + a margin): the worst batch's cost under the slowdown attack without and
   with the guard, accuracy, and the share of rows it forced out.

The tables go to stdout and, with the schedule, the wall time and the machine, to
``<out>/robust.md`` (and every number to ``<out>/robust.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import budget as budget_mod
from .. import data, models
from ..demo import fit_policy
from ..nn import MultiExitNetwork
from ..policies import EENet, ExitPolicy, MaxProb, collect_exit_logits
from ..runtime import BudgetGuard
from ..threads import intra_op_threads
from ..train import multi_exit
from .attacks import AttackConfig, attack_defaults, slowdown
from .evaluate import (
    Estimate,
    all_correct,
    attack_inputs,
    backbone_flops,
    exit_predictions,
    form_names,
    paired_difference,
    pixel_range,
    serve,
    summed_losses,
)
from .policy import uniform_entropy_policy_logits
from .train import SingleExit, adversarial_train, rdi_train, single_exit

__all__ = ["AccuracyRow", "GuardRow", "Report", "Schedule", "SlowdownRow", "run"]

CLAIM_SAVING = 0.30
"""RDI-Nets' compute claim: at least 30% fewer FLOPs than the defended backbone."""


@dataclass(frozen=True)
class Schedule:
    """What :func:`run` trains and evaluates. Defaults: the reproduction's schedule.

    The training attack has the test attack's eps and travel (steps x step) in
    ``train_steps`` steps: PGD with fewer, proportionally larger steps. The test attack is
    the dataset's default (:func:`eenet.robust.attack_defaults`). ``budget``: EENet's and
    MaxProb's average cost per sample, as a fraction of the backbone's FLOPs.
    ``guard_margin``: the guard's limit above the policy's clean validation cost, same unit.
    ``train_samples`` / ``test_samples`` cap the splits (None: all of them).
    """

    dataset: str = "digits"
    widths: tuple[int, ...] = (16, 32, 64, 128)
    head_width: int = 8
    epochs: int = 60
    std_epochs: int = 60
    train_steps: int = 5
    optimizer: str = "adam"
    lr: float = 2e-3
    batch_size: int = 64
    budget: float = 0.5
    serve_batch: int = 32
    guard_margin: float = 0.05
    train_samples: int | None = None
    test_samples: int | None = None
    seed: int = 0
    eenet_options: dict[str, Any] = field(default_factory=dict)

    def test_attack(self) -> AttackConfig:
        """The evaluation attack, pixel units."""
        return attack_defaults(self.dataset, train=False)

    def train_attack(self) -> AttackConfig:
        """The training attack, pixel units: the test attack's eps and travel in
        ``train_steps`` steps."""
        if isinstance(self.train_steps, bool) or not isinstance(self.train_steps, int) or (
                self.train_steps < 1):
            raise ValueError(f"train_steps must be an int >= 1, got {self.train_steps!r}")
        test = self.test_attack()
        return AttackConfig(test.eps, test.step * test.steps / self.train_steps,
                            self.train_steps, seed=self.seed)

    def describe(self, sizes: Sequence[int], num_exits: int) -> str:
        """One paragraph: data, model, training and attacks."""
        tr, te = self.train_attack(), self.test_attack()
        return (f"{self.dataset} ({sizes[0]} train / {sizes[1]} val / {sizes[2]} test), "
                f"small_cnn widths {tuple(self.widths)}, head width {self.head_width} "
                f"({num_exits} exits); RDI-Nets and PGD-AT: {self.epochs} epochs, "
                f"{self.optimizer} lr {self.lr:g}, batch {self.batch_size}, training attack "
                f"L-inf eps {tr.eps:g}, {tr.steps} steps of {tr.step:g} (max-average for "
                f"RDI-Nets, main for PGD-AT); standard multi-exit: {self.std_epochs} "
                f"epochs of eenet.train.multi_exit; test attacks eps {te.eps:g}, {te.steps} "
                f"steps of {te.step:g} (the {self.dataset} default), one random start; "
                f"served in batches of {self.serve_batch}; seed {self.seed}")


@dataclass
class AccuracyRow:
    """A row of the accuracy table: ``attacks`` maps every form name to its accuracy (None
    where the form does not apply); ``worst``: correct under every form; ``cost``: average
    cost per sample on clean inputs, fraction of the backbone; ``attack_costs``: the
    average cost under each form, for a row served under a policy (else empty)."""

    name: str
    clean: Estimate
    attacks: dict[str, Estimate | None]
    worst: Estimate
    cost: Estimate
    attack_costs: dict[str, Estimate] = field(default_factory=dict)


@dataclass
class SlowdownRow:
    """A row of the slowdown table (costs: fractions of the backbone)."""

    model: str
    policy: str
    cost_clean: Estimate
    cost_slow: Estimate
    erased: float
    acc_clean: Estimate
    acc_slow: Estimate


@dataclass
class GuardRow:
    """A row of the guard table. Costs: fractions of the backbone; ``bound``: the guard's
    bound on a batch's average cost, max(limit, cost of exit 0); ``batch_costs``: the
    guarded slowdown batches' average costs."""

    model: str
    policy: str
    limit: float
    bound: float
    worst_unguarded: float
    worst_guarded: float
    acc_slow_unguarded: Estimate
    acc_slow_guarded: Estimate
    forced_slow: Estimate
    acc_clean_guarded: Estimate
    forced_clean: Estimate
    batch_costs: list[float]


@dataclass
class Report:
    """Everything :func:`run` measured; :meth:`markdown` renders it."""

    schedule: Schedule
    description: str
    machine: str
    wall_s: float
    train_s: dict[str, float]
    exit_costs: list[float]        # cumulative, fraction of the backbone
    forms: list[str]
    accuracy: list[AccuracyRow]
    slowdown: list[SlowdownRow]
    guard: list[GuardRow]
    form_losses: dict[str, dict[str, float]]
    verdict: list[str]
    claim_clean: bool
    claim_attacked: bool

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, Estimate):
                return value.to_dict()
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, dict):
                return {str(k): plain(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [plain(v) for v in value]
            return value

        return plain(self)

    def markdown(self) -> str:
        return "\n".join(_markdown(self)) + "\n"


# -- training ------------------------------------------------------------------------------


@dataclass
class _Models:
    rdi: MultiExitNetwork
    baseline: SingleExit
    standard: MultiExitNetwork
    train_s: dict[str, float]


def _build(splits: data.Splits, schedule: Schedule) -> _Models:
    """The three untrained models: RDI-Nets and the standard model start from the same
    weights, the baseline is the backbone re-initialised with the seed."""
    torch.manual_seed(schedule.seed)
    config = {"in_channels": 1, "num_classes": splits.num_classes,
              "image_size": splits.image_size, "widths": tuple(schedule.widths),
              "head_width": schedule.head_width}
    rdi = models.small_cnn(**config)
    standard = models.small_cnn(**config)
    standard.load_state_dict(rdi.state_dict())
    return _Models(rdi, single_exit(rdi, reinit=True, seed=schedule.seed), standard, {})


def _train(trained: _Models, splits: data.Splits, schedule: Schedule,
           train_attack: AttackConfig, progress: bool) -> None:
    """Train the three models in place, timing each."""

    def loader() -> Any:
        return splits.loader("train", batch_size=schedule.batch_size, shuffle=True,
                             seed=schedule.seed)

    common = {"lr": schedule.lr, "optimizer": schedule.optimizer, "progress": progress,
              "seed": schedule.seed}
    start = time.perf_counter()
    rdi_train(trained.rdi, loader(), schedule.epochs, train_attack, **common)
    trained.train_s["rdi"] = time.perf_counter() - start
    start = time.perf_counter()
    adversarial_train(trained.baseline, loader(), schedule.epochs, train_attack, **common)
    trained.train_s["baseline"] = time.perf_counter() - start
    start = time.perf_counter()
    multi_exit(trained.standard, loader(), epochs=schedule.std_epochs, lr=schedule.lr,
               progress=progress, seed=schedule.seed)
    trained.train_s["standard"] = time.perf_counter() - start


# -- evaluation ----------------------------------------------------------------------------


@dataclass
class _Context:
    """The test set, the costs and the attack shared by every evaluation."""

    x: torch.Tensor
    y: torch.Tensor
    costs: budget_mod.Costs
    backbone: float
    attack: AttackConfig
    serve_batch: int

    def fraction(self, flops: torch.Tensor | float) -> torch.Tensor | float:
        return flops / self.backbone


def _accuracy_rows(name: str, net: MultiExitNetwork, policies: dict[str, ExitPolicy],
                   inputs: dict[str, torch.Tensor], ctx: _Context, forms: list[str],
                   per_exit: bool) -> tuple[list[AccuracyRow], dict[str, torch.Tensor]]:
    """The rows of a multi-exit model: one per policy (served), and one per exit alone when
    ``per_exit``; also each policy row's per-sample correctness (``<policy>/<input>``, the
    inputs ``clean``, every form and ``worst``)."""
    rows, correct = [], {}
    for label, policy in policies.items():
        served = {key: serve(net, policy, x, ctx.costs, ctx.serve_batch)
                  for key, x in inputs.items()}
        right = {key: s.correct(ctx.y) for key, s in served.items()}
        worst = all_correct([right[f] for f in forms])
        cost = {key: Estimate.of(ctx.fraction(s.sample_costs(ctx.costs)))
                for key, s in served.items()}
        rows.append(AccuracyRow(
            f"{name}, {label}", Estimate.of(right["clean"]),
            {f: Estimate.of(right[f]) for f in forms}, Estimate.of(worst), cost["clean"],
            {f: cost[f] for f in forms}))
        correct.update({f"{label}/{key}": value for key, value in right.items()})
        correct[f"{label}/worst"] = worst
    if per_exit:
        preds = {key: exit_predictions(net, x) for key, x in inputs.items()}
        for k in range(net.num_exits):
            right = {key: p[k] == ctx.y for key, p in preds.items()}
            cost = float(ctx.fraction(ctx.costs.values[k]))
            rows.append(AccuracyRow(
                f"{name}, exit {k} alone", Estimate.of(right["clean"]),
                {f: Estimate.of(right[f]) for f in forms},
                Estimate.of(all_correct([right[f] for f in forms])),
                Estimate(cost, cost, cost)))
    return rows, correct


def _baseline_row(model: SingleExit, ctx: _Context, forms: list[str]
                  ) -> tuple[AccuracyRow, dict[str, torch.Tensor]]:
    inputs = {"clean": ctx.x, **attack_inputs(model, ctx.x, ctx.y, ctx.attack)}
    right = {key: exit_predictions(model, x)[0] == ctx.y for key, x in inputs.items()}
    pgd_acc = Estimate.of(right["main"])
    row = AccuracyRow("PGD-AT single-exit baseline", Estimate.of(right["clean"]),
                      {f: pgd_acc if f == "main" else None for f in forms}, pgd_acc,
                      Estimate(1.0, 1.0, 1.0))
    return row, right


def _slowdown_and_guard(name: str, net: MultiExitNetwork, policies: dict[str, ExitPolicy],
                        val_costs: dict[str, float], ctx: _Context, x_slow: torch.Tensor,
                        margin: float) -> tuple[list[SlowdownRow], list[GuardRow]]:
    slow_rows, guard_rows = [], []
    full = ctx.costs.full
    for label, policy in policies.items():
        clean = serve(net, policy, ctx.x, ctx.costs, ctx.serve_batch)
        slow = serve(net, policy, x_slow, ctx.costs, ctx.serve_batch)
        c_clean = clean.sample_costs(ctx.costs)
        c_slow = slow.sample_costs(ctx.costs)
        mean_clean, mean_slow = float(c_clean.mean()), float(c_slow.mean())
        erased = ((mean_slow - mean_clean) / (full - mean_clean) if full > mean_clean
                  else math.nan)
        slow_rows.append(SlowdownRow(
            name, label, Estimate.of(ctx.fraction(c_clean)), Estimate.of(ctx.fraction(c_slow)),
            erased, Estimate.of(clean.correct(ctx.y)), Estimate.of(slow.correct(ctx.y))))

        limit = min(val_costs[label] + margin * ctx.backbone, full)
        guard = BudgetGuard(ctx.costs, budget_mod.Budget(limit, ctx.costs.unit))
        g_slow = serve(net, policy, x_slow, ctx.costs, ctx.serve_batch, guard)
        g_clean = serve(net, policy, ctx.x, ctx.costs, ctx.serve_batch, guard)
        guard_rows.append(GuardRow(
            name, label, float(ctx.fraction(limit)),
            float(ctx.fraction(max(limit, ctx.costs.values[0]))),
            float(ctx.fraction(max(slow.batch_costs))),
            float(ctx.fraction(max(g_slow.batch_costs))),
            Estimate.of(slow.correct(ctx.y)), Estimate.of(g_slow.correct(ctx.y)),
            Estimate.of(g_slow.forced), Estimate.of(g_clean.correct(ctx.y)),
            Estimate.of(g_clean.forced),
            [float(ctx.fraction(c)) for c in g_slow.batch_costs]))
    return slow_rows, guard_rows


def _policies(net: MultiExitNetwork, splits: data.Splits, ctx: _Context, schedule: Schedule
              ) -> tuple[dict[str, ExitPolicy], dict[str, float]]:
    """The uniform entropy, EENet and MaxProb policies fitted on clean validation data,
    and each one's average cost there (FLOPs)."""
    logits, labels = collect_exit_logits(net, splits.loader("val", 256))
    budget = budget_mod.Budget(schedule.budget * ctx.backbone, ctx.costs.unit)
    at = f"@ {schedule.budget:.0%}"
    policies: dict[str, ExitPolicy] = {
        "uniform entropy": uniform_entropy_policy_logits(logits),
        f"EENet {at}": fit_policy(EENet, logits, labels, ctx.costs, budget,
                                  {"seed": schedule.seed, **schedule.eenet_options}),
        f"MaxProb {at}": fit_policy(MaxProb, logits, labels, ctx.costs, budget),
    }
    val_costs = {label: ctx.costs.expected(p.decide(logits)[0]) for label, p in policies.items()}
    return policies, val_costs


def machine() -> str:
    """The CPU model, its core count and torch's version (and the GPU, if one is used)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            model = names[0]
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, CPU only, one intra-op thread, torch "
            f"{torch.__version__}")


def run(schedule: Schedule | None = None, out_dir: str | None = None, progress: bool = True
        ) -> Report:
    """Train, attack and serve (module docstring) on one intra-op thread; print the tables
    and, with ``out_dir``, write ``robust.md`` and ``robust.json`` there. Returns the
    :class:`Report`."""
    with intra_op_threads(1):
        return _run(schedule or Schedule(), out_dir, progress)


def _run(schedule: Schedule, out_dir: str | None, progress: bool) -> Report:
    start = time.perf_counter()
    data.require_dataset(schedule.dataset)
    splits = data.load(schedule.dataset, seed=schedule.seed)
    if schedule.train_samples is not None:
        splits.train = tuple(t[:schedule.train_samples] for t in splits.train)  # type: ignore[assignment]
    if schedule.test_samples is not None:
        splits.test = tuple(t[:schedule.test_samples] for t in splits.test)  # type: ignore[assignment]
    low, high = pixel_range(splits.train[0])
    test_attack = schedule.test_attack().to_range(low, high)
    trained = _build(splits, schedule)
    example = splits.val[0][:64]
    costs = budget_mod.count_flops(trained.rdi, example)
    backbone = backbone_flops(trained.rdi, example)
    if schedule.budget * backbone < costs.values[0]:
        raise ValueError(f"budget {schedule.budget:g} of the backbone is below the cost of "
                         f"the first exit ({costs.values[0] / backbone:.3f} of the backbone): "
                         "no policy can meet it")
    _train(trained, splits, schedule, schedule.train_attack().to_range(low, high), progress)

    x, y = splits.test
    ctx = _Context(x, y, costs, backbone, test_attack, schedule.serve_batch)
    forms = form_names(trained.rdi.num_exits)
    accuracy: list[AccuracyRow] = []
    slow_rows: list[SlowdownRow] = []
    guard_rows: list[GuardRow] = []
    losses: dict[str, dict[str, float]] = {}
    correct: dict[str, torch.Tensor] = {}
    for name, net, per_exit in (("RDI-Nets", trained.rdi, True),
                                ("standard multi-exit", trained.standard, False)):
        policies, val_costs = _policies(net, splits, ctx, schedule)
        inputs = {"clean": x, **attack_inputs(net, x, y, test_attack)}
        losses[name] = {f: float(summed_losses(net, inputs[f], y).mean()) for f in forms}
        # the accuracy table: RDI-Nets with its own policy and with EENet, the standard
        # model with RDI-Nets' policy
        shown = {label: p for label, p in policies.items()
                 if label == "uniform entropy" or (per_exit and label.startswith("EENet"))}
        rows, right = _accuracy_rows(name, net, shown, inputs, ctx, forms, per_exit)
        accuracy.extend(rows)
        correct.update({f"{name}/{key}": value for key, value in right.items()})
        x_slow = slowdown(net, x, test_attack)
        s_rows, g_rows = _slowdown_and_guard(name, net, policies, val_costs, ctx, x_slow,
                                             schedule.guard_margin)
        slow_rows.extend(s_rows)
        guard_rows.extend(g_rows)
    base_row, base_right = _baseline_row(trained.baseline, ctx, forms)
    accuracy.insert(-1, base_row)
    verdict, claim = _verdict(accuracy, correct, base_right, splits.num_classes)
    sizes = [len(splits.train[1]), len(splits.val[1]), len(splits.test[1])]
    report = Report(schedule, schedule.describe(sizes, trained.rdi.num_exits), machine(),
                    time.perf_counter() - start, trained.train_s,
                    [c / ctx.backbone for c in costs.values], forms, accuracy, slow_rows,
                    guard_rows, losses, verdict, *claim)
    text = report.markdown()
    print(text)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "robust.md"), "w") as f:
            f.write(text)
        with open(os.path.join(out_dir, "robust.json"), "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    return report


# -- the verdict and the markdown ----------------------------------------------------------


def _compare(diff: Estimate) -> str:
    if diff.low > 0:
        return "beats"
    if diff.high < 0:
        return "is below"
    return "matches"


def _less(cost: float) -> str:
    """The saving against the backbone, in words."""
    return f"{1.0 - cost:.0%} less" if cost <= 1.0 else f"{cost - 1.0:.0%} more"


def _verdict(rows: list[AccuracyRow], correct: dict[str, torch.Tensor],
             base: dict[str, torch.Tensor], num_classes: int
             ) -> tuple[list[str], tuple[bool, bool]]:
    """Per RDI-Nets policy row, against the baseline (paired bootstrap of the difference on
    the same test samples): clean accuracy; robust accuracy as the paper reports it, under
    the strongest attack form (the lowest accuracy of the row's forms) against PGD on the
    baseline; and the per-sample worst case over the forms, a stronger adversary than the
    paper's. The claim holds on clean inputs when neither clean nor robust accuracy is
    below the baseline's, the robust accuracy is above chance even in the worst case, and
    the clean cost is at least :data:`CLAIM_SAVING` below the backbone's (upper end of its
    interval); the saving holds under attack when the cost under every form is at least
    as far below. Returns the lines and the two for the uniform entropy policy."""
    lines, uniform = [], (False, False)
    chance = 1.0 / num_classes
    for row in rows:
        if not row.name.startswith("RDI-Nets, ") or " alone" in row.name:
            continue
        label = row.name.removeprefix("RDI-Nets, ")
        forms = {f: a for f, a in row.attacks.items() if a is not None}
        strongest = min(forms, key=lambda f: forms[f].value)
        d_clean = paired_difference(correct[f"RDI-Nets/{label}/clean"], base["clean"])
        d_robust = paired_difference(correct[f"RDI-Nets/{label}/{strongest}"], base["main"])
        d_worst = paired_difference(correct[f"RDI-Nets/{label}/worst"], base["main"])
        dearest = max(row.attack_costs, key=lambda f: row.attack_costs[f].value)
        limit = 1.0 - CLAIM_SAVING
        clean_ok = (_compare(d_clean) != "is below" and _compare(d_robust) != "is below"
                    and row.worst.low > chance and row.cost.high <= limit)
        attacked_ok = row.attack_costs[dearest].high <= limit
        lines.append(
            f"RDI-Nets with the {label} policy {_compare(d_clean)} the PGD-AT baseline in "
            f"clean accuracy (difference {d_clean.text()}) and {_compare(d_robust)} it in "
            f"robust accuracy under its strongest attack form, {_form_title(strongest)} "
            f"(difference {d_robust.text()} against PGD on the baseline); in the per-sample "
            f"worst case over every form it {_compare(d_worst)} it (difference "
            f"{d_worst.text()}; chance is {chance:.2f}). Its cost is {row.cost.text()} of "
            f"the backbone's FLOPs on clean inputs ({_less(row.cost.value)}) and up to "
            f"{row.attack_costs[dearest].text()} under attack ({_form_title(dearest)}: "
            f"{_less(row.attack_costs[dearest].value)}). The claim "
            f"{'holds' if clean_ok else 'does not hold'} on clean inputs; the "
            f"{CLAIM_SAVING:.0%} saving {'holds' if attacked_ok else 'does not hold'} "
            "under attack.")
        if label == "uniform entropy":
            uniform = (clean_ok, attacked_ok)
    return lines, uniform


_FORM_TITLES = {"main": "main", "average": "average", "max_average": "max-average"}


def _form_title(form: str) -> str:
    return _FORM_TITLES.get(form, form.replace("single_", "single "))


def _markdown(r: Report) -> list[str]:
    minutes = r.wall_s / 60
    costs = ", ".join(f"{c:.3f}" for c in r.exit_costs)
    out = [
        "# RDI-Nets and DeepSloth on the demo data",
        "",
        f"Schedule: {r.description}. Wall time {r.wall_s:.0f} s ({minutes:.1f} min; training "
        f"RDI-Nets {r.train_s['rdi']:.0f} s, PGD-AT {r.train_s['baseline']:.0f} s, standard "
        f"{r.train_s['standard']:.0f} s) on {r.machine}. Every value is a mean over the test "
        "split with its 95% bootstrap interval. Costs are FLOPs per sample (stages and every "
        "exit head a sample passed) as a fraction of the backbone without early exits (the "
        f"baseline's cost); cumulative cost of each exit: {costs}.",
        "",
        "## Accuracy and cost (attacks crafted on each network, served by the engine under "
        "the policy)",
        "",
        "| model | clean | " + " | ".join(_form_title(f) for f in r.forms)
        + " | worst case | cost |",
        "|---|" + "---|" * (len(r.forms) + 3),
    ]
    for row in r.accuracy:
        cells = [row.clean.text()]
        cells += [a.text() if a is not None else "n/a" for a in
                  (row.attacks.get(f) for f in r.forms)]
        cells += [row.worst.text(), row.cost.text()]
        out.append(f"| {row.name} | " + " | ".join(cells) + " |")
    out += [
        "",
        "worst case: correct under every attack form (for the baseline, whose one output makes "
        "every form the same attack: PGD). \"exit k alone\": that exit's own prediction on the "
        "same inputs, at its cumulative cost. The standard model is undefended (no adversarial "
        "training).",
        "",
        "## Cost per sample under each attack (fraction of the backbone)",
        "",
        "| model | clean | " + " | ".join(_form_title(f) for f in r.forms) + " |",
        "|---|" + "---|" * (len(r.forms) + 1),
        *(f"| {row.name} | {row.cost.text()} | "
          + " | ".join(row.attack_costs[f].text() for f in r.forms) + " |"
          for row in r.accuracy if row.attack_costs),
        "",
        "## Slowdown attack (DeepSloth, uniform objective on the early exits, the test "
        "attack's eps and steps)",
        "",
        "| model | policy | cost clean | cost under slowdown | saving erased | accuracy clean "
        "| accuracy under slowdown |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in r.slowdown:
        out.append(f"| {s.model} | {s.policy} | {s.cost_clean.text()} | {s.cost_slow.text()} "
                   f"| {s.erased:.0%} | {s.acc_clean.text()} | {s.acc_slow.text()} |")
    out += [
        "",
        "saving erased = (cost under slowdown - cost clean) / (full multi-exit cost - cost "
        "clean).",
        "",
        "## Budget guard under the slowdown attack",
        "",
        "| model | policy | limit | worst batch, no guard | worst batch, guard (bound) "
        "| accuracy under slowdown, no guard | with guard | forced rows | clean accuracy with "
        "guard | forced rows, clean |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in r.guard:
        out.append(f"| {g.model} | {g.policy} | {g.limit:.3f} | {g.worst_unguarded:.3f} | "
                   f"{g.worst_guarded:.3f} ({g.bound:.3f}) | {g.acc_slow_unguarded.text()} | "
                   f"{g.acc_slow_guarded.text()} | {g.forced_slow.text()} | "
                   f"{g.acc_clean_guarded.text()} | {g.forced_clean.text()} |")
    out += [
        "",
        f"limit: the policy's average cost on clean validation data + "
        f"{r.schedule.guard_margin:g} (fractions of the backbone), per batch of "
        f"{r.schedule.serve_batch}; worst batch: the largest average cost per sample of a "
        "test batch; bound: max(limit, cost of exit 0), what the guard guarantees.",
        "",
        "## Verdict",
        "",
        *(f"- {line}" for line in r.verdict),
        f"- The paper's claim (RDI-Nets match or beat the defended single-exit model in clean "
        f"and robust accuracy with >= {CLAIM_SAVING:.0%} less compute), with its own policy "
        f"(uniform entropy): {'holds' if r.claim_clean else 'does not hold'} on clean "
        f"inputs; the {CLAIM_SAVING:.0%} compute saving "
        f"{'holds' if r.claim_attacked else 'does not hold'} under attack.",
    ]
    return out


if __name__ == "__main__":
    from ..cli import main

    raise SystemExit(main(["robust", *sys.argv[1:]]))
