"""Reference multi-exit architectures, buildable by name (used by the demo, the CLI and
saved model files)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .nn import ExitHead, MultiExitNetwork


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True))


def small_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
              widths: tuple[int, ...] = (16, 32, 64, 128), head_width: int = 16,
              head_stride_from: int = 7) -> MultiExitNetwork:
    """A small CNN for (N, in_channels, image_size, image_size) inputs, one exit per stage.

    Stage k: conv3x3 stride 2 + conv3x3, each with BN + ReLU, so every stage halves the
    resolution. Exit k: the paper's conv head (3 x conv3x3 + BN + ReLU, pooled, Linear) of
    width ``head_width``; its first conv has stride 2 where the stage's output is at least
    ``head_stride_from`` pixels wide, which keeps the early exits cheap.
    """
    stages, heads, c_in, size = [], [], in_channels, image_size
    for w in widths:
        size = math.ceil(size / 2)
        stages.append(_block(c_in, w, stride=2))
        heads.append(ExitHead.conv(w, num_classes, width=head_width,
                                   stride=2 if size >= head_stride_from else 1))
        c_in = w
    return MultiExitNetwork(stages, heads)


ARCHITECTURES = {"small_cnn": small_cnn}


def build(arch: str, config: dict[str, Any]) -> MultiExitNetwork:
    """Build a registered architecture from its JSON-able config."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**config)
