"""Evaluation of (robust) multi-exit networks as deployed: every PGD form of
:func:`eenet.robust.pgd` crafted on the network, the inputs then served by the runtime
engine (:class:`eenet.runtime.Engine`, compact mode) under an exit policy, with or without a
budget guard; accuracy and cost per sample, each a mean over the test samples with a 95%
percentile bootstrap interval (:func:`eenet.demo.bootstrap_interval`).

Costs are FLOPs counted the project's way (:func:`eenet.budget.count_flops`: a sample that
leaves at exit k has run stages 0..k and every exit head 0..k) and reported as fractions of
the backbone without early exits (:func:`backbone_flops`: the stages and the last head),
the cost of the single-exit baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import budget as budget_mod
from ..demo import bootstrap_interval
from ..modes import eval_mode
from ..nn import MultiExitNetwork
from ..policies import ExitPolicy
from ..runtime import BudgetGuard, Engine
from .attacks import (
    AttackConfig,
    _num_exits,
    exit_logits,
    pgd,
    summed_exit_loss,
)
from .train import SingleExit

__all__ = ["Estimate", "Served", "all_correct", "attack_inputs", "backbone_flops",
           "exit_predictions", "form_names", "paired_difference", "pixel_range", "serve",
           "summed_losses"]


@dataclass(frozen=True)
class Estimate:
    """A mean over the test samples, ``value``, with its 95% percentile bootstrap interval
    ``[low, high]``."""

    value: float
    low: float
    high: float

    @classmethod
    def of(cls, per_sample: torch.Tensor) -> Estimate:
        """The mean of a (N,) bool or float tensor and its bootstrap interval."""
        per_sample = per_sample.detach().float().cpu()
        low, high = bootstrap_interval(per_sample)
        return cls(float(per_sample.mean()), low, high)

    def text(self, digits: int = 3) -> str:
        """``value [low, high]``."""
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> Estimate:
    """The mean of ``a - b`` over the same N samples (two (N,) bool or float tensors, e.g.
    two models' correctness on one test set), with its bootstrap interval: the samples are
    resampled together, so the interval is that of the difference, not of either mean."""
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"paired_difference needs two (N,) tensors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return Estimate.of(a.float() - b.float())


def pixel_range(x: torch.Tensor) -> tuple[float, float]:
    """The input range of standardised images ``(pixel - mean) / std`` whose pixels span
    [0, 1], as the smallest and largest value of x: the images of pixel 0 and pixel 1. For
    the splits of :mod:`eenet.data` take x = the training images, in which both black and
    white pixels occur; :meth:`AttackConfig.to_range` maps a pixel-unit attack onto it."""
    if x.numel() == 0:
        raise ValueError("pixel_range needs at least one image")
    low, high = float(x.min()), float(x.max())
    if not low < high:
        raise ValueError(f"the images are constant ({low}); no pixel range to infer")
    return low, high


def backbone_flops(net: MultiExitNetwork | SingleExit, example_batch: torch.Tensor) -> float:
    """FLOPs per sample of the backbone without early exits: every stage, then the last
    exit head (:func:`eenet.budget.count_flops` of that one-exit network)."""
    head = net.head if isinstance(net, SingleExit) else net.heads[-1]
    one_exit = MultiExitNetwork([nn.Sequential(*net.stages)], [head])
    return budget_mod.count_flops(one_exit, example_batch).full


def form_names(num_exits: int) -> list[str]:
    """The PGD forms :func:`attack_inputs` crafts for a network with ``num_exits`` exits:
    ``main``, then ``single_k`` for every exit k, ``average`` and ``max_average`` (only
    ``main`` for a single-output model, where every form is the same attack)."""
    if num_exits == 1:
        return ["main"]
    return ["main", *(f"single_{k}" for k in range(num_exits)), "average", "max_average"]


def attack_inputs(net: nn.Module, x: torch.Tensor, y: torch.Tensor, config: AttackConfig
                  ) -> dict[str, torch.Tensor]:
    """Adversarial inputs of every form in :func:`form_names` against ``net``, crafted on
    the network (its exits' losses; the policy is not in the loop), all with ``config``:
    one random start shared by every form, so the max-average inputs are, per sample, one
    of the single-exit attacks' inputs."""
    k_exits = _num_exits(net, x)
    if k_exits is None:
        raise ValueError("attack_inputs needs at least one sample (or a network with "
                         "num_exits)")
    inputs: dict[str, torch.Tensor] = {}
    for name in form_names(k_exits):
        if name.startswith("single_"):
            inputs[name] = pgd(net, x, y, "single", config, exit_index=int(name[7:]))
        else:
            inputs[name] = pgd(net, x, y, name, config)
    return inputs


@torch.no_grad()
def exit_predictions(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every exit's prediction on x: K tensors (N,) int64 (one for a single-output model);
    in eval mode, every submodule's mode restored afterwards."""
    with eval_mode(net):
        return [z.argmax(dim=1) for z in exit_logits(net, x)]


@torch.no_grad()
def summed_losses(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) cross-entropy summed over the exits (:func:`summed_exit_loss`), eval mode."""
    with eval_mode(net):
        return summed_exit_loss(exit_logits(net, x), y)


@dataclass
class Served:
    """What the engine returned for a test set served in batches: ``pred`` and
    ``exit_index`` (N,) int64, ``forced`` (N,) bool (the guard sent the row out early), and
    ``batch_costs``: each batch's average cost per sample, from the engine's telemetry, in
    the costs' unit."""

    pred: torch.Tensor
    exit_index: torch.Tensor
    forced: torch.Tensor
    batch_costs: list[float]

    def correct(self, y: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the served prediction is y."""
        return self.pred == y

    def sample_costs(self, costs: budget_mod.Costs) -> torch.Tensor:
        """(N,) float64: each sample's cumulative cost at the exit it took."""
        return costs.tensor(self.exit_index.device)[self.exit_index]


def serve(net: MultiExitNetwork, policy: ExitPolicy, x: torch.Tensor,
          costs: budget_mod.Costs, batch_size: int, guard: BudgetGuard | None = None
          ) -> Served:
    """Serve x (N, ...) in batches of ``batch_size`` with the runtime engine in compact
    mode under ``policy`` (and ``guard``, if any), as deployed; ``costs`` price the exits
    for the telemetry. The engine runs the network in eval mode; every submodule's mode is
    restored afterwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with eval_mode(net):
        return _serve(Engine(net, policy, mode="compact", guard=guard, costs=costs), x,
                      batch_size)


def _serve(engine: Engine, x: torch.Tensor, batch_size: int) -> Served:
    preds: list[torch.Tensor] = []
    exits: list[torch.Tensor] = []
    forced: list[torch.Tensor] = []
    batch_costs: list[float] = []
    for start in range(0, x.shape[0], batch_size):
        out = engine(x[start:start + batch_size])
        preds.append(out.logits.argmax(dim=1))
        exits.append(out.exit_index)
        forced.append(out.forced)
        telemetry = engine.last_telemetry
        assert telemetry is not None and telemetry.cost_per_sample is not None
        batch_costs.append(telemetry.cost_per_sample)
    if not preds:
        raise ValueError("serve needs at least one sample")
    return Served(torch.cat(preds), torch.cat(exits), torch.cat(forced), batch_costs)


def all_correct(correct: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N,) bool: correct under every one of the given (N,) bool tensors (the per-sample
    worst case over attacks)."""
    if not correct:
        raise ValueError("all_correct needs at least one tensor")
    return torch.stack(list(correct)).all(dim=0)
