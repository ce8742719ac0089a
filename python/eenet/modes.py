"""Train / eval mode around work that must run in eval mode (calibration, costs, attacks)
without changing the caller's modes afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[None]:
    """Every submodule of ``net`` in eval mode for the block; afterwards (also when the block
    raises) each one back in its own previous mode, so a submodule the caller keeps in eval
    inside a training network (a frozen batch norm) stays so."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
