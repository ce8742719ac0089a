"""Torch's intra-op thread count, set for a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, then restore the previous count.

    For tiny models (the EENet scheduler's N x ~C matrices, the digits CNNs) one thread is
    the fast choice: OpenMP threads only add barrier waits (20 ms per op instead of 80 us on
    a loaded host), and one thread also fixes the order of every float reduction.
    """
    if count < 1:
        raise ValueError(f"intra_op_threads needs a count >= 1, got {count}")
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
