"""Cost model of a multi-exit network and the budget it is served under.

Costs c_k are cumulative: what it costs a sample to leave at exit k, i.e. to run stages
0..k and evaluate exit heads 0..k (every earlier exit was evaluated and declined). They are
either measured (latency in ms per sample at the serving batch size, on the model's
device) or counted (FLOPs per sample via ``torch.utils.flop_counter``). A budget is an
average cost per sample, given in the costs' unit or as a fraction of the full model.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .modes import eval_mode
from .runtime.timing import time_fn

if TYPE_CHECKING:
    from .nn import MultiExitNetwork
    from .nn.flops import FlopFormula


def is_number(v: object) -> bool:
    """A real number: an int or float (NumPy's included) or a 0-dim real tensor, not a bool
    (which ``float()`` would read as 0 or 1) nor a string (which it would parse)."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not (v.dtype == torch.bool or v.is_complex())
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass
class Costs:
    """Cumulative per-exit costs (K values, increasing) and their unit (``ms`` or ``flops``)."""

    values: list[float]
    unit: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.values, str | bytes) or not all(is_number(v) for v in self.values):
            raise TypeError(f"costs must be a list of numbers, got {self.values!r}")
        if not isinstance(self.unit, str) or not self.unit:
            raise TypeError(f"a cost unit must be a non-empty string, got {self.unit!r}")
        self.values = [float(v) for v in self.values]
        if not self.values:
            raise ValueError("Costs needs one value per exit, got none")
        if not all(math.isfinite(v) and v > 0 for v in self.values):
            raise ValueError(f"costs must be positive and finite, got {self.values}")
        if any(b < a for a, b in zip(self.values, self.values[1:], strict=False)):
            raise ValueError(f"cumulative costs must not decrease along the exits, got "
                             f"{self.values}")

    @property
    def full(self) -> float:
        """Cost of the whole network (the last exit)."""
        return self.values[-1]

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.values, dtype=torch.float64, device=device)

    def expected(self, exit_index: torch.Tensor) -> float:
        """Average cost per sample of the given exit assignment (N,) int, each in [0, K)."""
        if exit_index.dtype.is_floating_point or exit_index.dtype == torch.bool:
            raise ValueError(f"exit indices must be integers, got dtype {exit_index.dtype}")
        if exit_index.numel() == 0:
            return 0.0
        low, top = (int(v) for v in torch.aminmax(exit_index))
        if low < 0 or top >= len(self.values):
            raise ValueError(f"exit indices must lie in [0, {len(self.values)}) for these "
                             f"costs, got {low if low < 0 else top}")
        return float(self.tensor(exit_index.device)[exit_index.long()].mean())

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values, "unit": self.unit, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Costs:
        return cls(list(data["values"]), data["unit"], dict(data.get("meta", {})))


@dataclass(frozen=True)
class Budget:
    """An average cost per sample: ``value`` in ``unit`` (``fraction`` of the full model,
    or the costs' own unit, ``ms`` / ``flops``)."""

    value: float
    unit: str = "fraction"

    def __post_init__(self) -> None:
        if not math.isfinite(self.value):
            raise ValueError(f"a budget must be a finite number, got {self.value}")

    def absolute(self, costs: Costs) -> float:
        """The budget in the costs' unit; errors when it cannot be met or is meaningless."""
        if self.unit == "fraction":
            if not 0.0 < self.value <= 1.0:
                raise ValueError(f"a fractional budget must lie in (0, 1], got {self.value}")
            b = self.value * costs.full
        elif self.unit == costs.unit:
            b = self.value
        else:
            raise ValueError(f"budget is in {self.unit!r} but the costs are in {costs.unit!r}")
        if b < costs.values[0] * (1 - 1e-9):
            raise ValueError(
                f"budget {b:.4g} {costs.unit} is below the cost of the first exit "
                f"({costs.values[0]:.4g} {costs.unit}): no policy can meet it")
        return min(b, costs.full)


def as_budget(budget: float | Budget) -> Budget:
    """A bare number is a fraction of the full model's cost."""
    return budget if isinstance(budget, Budget) else Budget(float(budget), "fraction")


def budget_to_json(budget: float | Budget) -> float | dict[str, Any]:
    """The JSON form of a budget: a fraction as a bare number, any other unit as
    ``{"value": v, "unit": u}`` (read back by :func:`budget_from_json`)."""
    b = as_budget(budget)
    return b.value if b.unit == "fraction" else {"value": b.value, "unit": b.unit}


def budget_from_json(entry: Any) -> Budget:
    """The budget of :func:`budget_to_json`'s form; ValueError for anything else."""
    if isinstance(entry, dict) and set(entry) == {"value", "unit"}:
        value, unit = entry["value"], entry["unit"]
    else:
        value, unit = entry, "fraction"
    if isinstance(value, bool) or not isinstance(value, int | float) or not isinstance(unit, str):
        raise ValueError(f"a budget is a number (a fraction of the full model) or "
                         f"{{'value': number, 'unit': str}}, got {entry!r}")
    return Budget(float(value), unit)


@torch.no_grad()
def measure(net: MultiExitNetwork, example_batch: torch.Tensor, repeats: int = 10,
            warmup: int = 3, **row_inputs: torch.Tensor) -> Costs:
    """Measured cumulative latency per exit, in ms per sample, at the example batch's size.

    Every stage and every exit head is timed on its own, on the activation it receives in
    the network at this batch size, on the batch's device: the median of ``repeats`` timed
    calls after ``warmup`` untimed ones (:func:`eenet.runtime.timing.time_fn`), divided by
    the batch size. Exit k's cost is the sum of stages 0..k and heads 0..k. Each term is a
    measured, positive time, so the costs increase along the exits as measured, with no
    adjustment. ``meta`` keeps the terms: ``stage_ms`` and ``head_ms`` (K values each, ms per
    sample), with ``batch_size``, ``device`` and ``repeats``. ``row_inputs`` (each (N, ...),
    e.g. a padded batch's ``attention_mask``) go to every stage and head, as in the network's
    forward.
    """
    for name, value, least in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if example_batch.dim() == 0 or example_batch.shape[0] == 0:
        raise ValueError("measure needs an example_batch with at least one row (costs are "
                         f"per sample), got shape {tuple(example_batch.shape)}")
    device = example_batch.device
    n = example_batch.shape[0]

    def per_sample_ms(fn: Callable[[], object]) -> float:
        return time_fn(fn, warmup=warmup, repeats=repeats, device=device).median * 1e3 / n

    stage_ms, head_ms = [], []
    h = example_batch
    with eval_mode(net):
        for stage, head in zip(net.stages, net.heads, strict=True):
            stage_ms.append(per_sample_ms(lambda stage=stage, h=h: stage(h, **row_inputs)))
            h = stage(h, **row_inputs)
            head_ms.append(per_sample_ms(lambda head=head, h=h: head(h, **row_inputs)))
    values = list(itertools.accumulate(s + t for s, t in zip(stage_ms, head_ms, strict=True)))
    return Costs(values, "ms", {"batch_size": n, "device": str(device), "repeats": repeats,
                                "stage_ms": stage_ms, "head_ms": head_ms})


def count_flops(net: MultiExitNetwork, example_batch: torch.Tensor,
                formulas: Mapping[Any, FlopFormula] | None = None,
                **row_inputs: torch.Tensor) -> Costs:
    """Counted cumulative FLOPs per sample per exit: exit k's cost is the FLOPs of stages
    0..k and heads 0..k, each counted once by :meth:`eenet.nn.MultiExitNetwork.flops`
    (``torch.utils.flop_counter`` with the attention and recurrent-layer formulas of
    :mod:`eenet.nn.flops`, and ``formulas`` for ops of your own). A stage or head holding
    weight matrices that counts 0 FLOPs raises ValueError. ``meta`` keeps the terms,
    ``stage_flops`` and ``head_flops`` (K values each, per sample), and ``batch_size``;
    ``row_inputs`` as in :func:`measure`."""
    counted = net.flops(example_batch, formulas, **row_inputs)
    values = list(itertools.accumulate(s + h for s, h in zip(counted.stages, counted.heads,
                                                             strict=True)))
    return Costs(values, "flops", {"batch_size": example_batch.shape[0],
                                   "stage_flops": counted.stages,
                                   "head_flops": counted.heads})


def report(costs: Costs, exit_index: torch.Tensor, budget: float | Budget) -> dict[str, float]:
    """Achieved vs asked cost of an exit assignment, in the costs' unit: ``asked`` (the
    budget as given), ``effective`` (what a policy can spend: asked, capped at the full
    model's cost), ``achieved``, ``ratio`` (achieved / asked) and ``fraction_of_full``."""
    b = as_budget(budget)
    effective = b.absolute(costs)  # also refuses a budget no policy can meet
    asked = b.value * costs.full if b.unit == "fraction" else b.value
    achieved = costs.expected(exit_index)
    return {"asked": asked, "effective": effective, "achieved": achieved,
            "ratio": achieved / asked, "fraction_of_full": achieved / costs.full}
