"""Seeded randomness for a block of work (a training run, a fit) that leaves the caller's
random state as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int | None, device: torch.device | None = None) -> Iterator[None]:
    """Torch's CPU generator and, for a CUDA ``device``, that device's generator seeded with
    ``seed`` for the block, both restored afterwards; no other device's generator is
    touched (``torch.manual_seed`` would reseed every GPU). ``seed=None``: the current
    random state, used and advanced as it is."""
    if seed is None:
        yield
        return
    cuda = []
    if device is not None and device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield
