"""Work that runs a network in eval mode (logit collection, cost measurement, FLOP counting,
serving for evaluation, attacks) gives every submodule its own mode back afterwards, also
when it fails: a training network with a frozen (eval) submodule keeps it frozen."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from eenet.budget import Costs, count_flops, measure
from eenet.modes import eval_mode
from eenet.nn import ExitHead, MultiExitNetwork
from eenet.policies import MaxProb, collect_exit_logits
from eenet.robust import AttackConfig, pgd
from eenet.robust.evaluate import serve

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> MultiExitNetwork:
    """Two stages with batch norm (train mode changes their output and statistics), a head
    left in eval mode as a user freezes one."""
    torch.manual_seed(0)
    stages = [torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6))
              for _ in range(2)]
    net = MultiExitNetwork(stages, [ExitHead.linear(6, 3) for _ in range(2)]).train()
    net.heads[0].eval()
    return net


def _modes(net: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in net.named_modules()}


def _x() -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(1))


WORK: dict[str, Callable[[MultiExitNetwork], object]] = {
    "collect_exit_logits": lambda net: collect_exit_logits(net, [(_x(), torch.zeros(8).long())]),
    "measure": lambda net: measure(net, _x(), repeats=1, warmup=0),
    "count_flops": lambda net: count_flops(net, _x()),
    "flops": lambda net: net.flops(_x()),
    "serve": lambda net: serve(net, MaxProb([0.5, 0.0]), _x(), Costs([1.0, 2.0], "flops"), 4),
    "pgd": lambda net: pgd(net, _x(), torch.zeros(8).long(), "average",
                           AttackConfig(eps=0.1, step=0.05, steps=1, clip=None)),
}


@pytest.mark.parametrize("name", list(WORK))
def test_every_submodule_gets_its_mode_back(name: str) -> None:
    net = _net()
    before = _modes(net)
    assert before["heads.0"] is False and before["stages.0.1"] is True
    stats = net.stages[0][1].running_mean.clone()
    WORK[name](net)
    assert _modes(net) == before, name
    assert torch.equal(net.stages[0][1].running_mean, stats), f"{name} ran in train mode"


def test_modes_come_back_when_the_work_fails() -> None:
    net = _net()
    before = _modes(net)

    def failing() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield _x(), torch.zeros(8).long()
        raise OSError("the loader's file went away")

    with pytest.raises(OSError, match="went away"):
        collect_exit_logits(net, failing())
    assert _modes(net) == before
    with pytest.raises(RuntimeError, match="inside"), eval_mode(net):
        assert not any(_modes(net).values())
        raise RuntimeError("inside")
    assert _modes(net) == before
