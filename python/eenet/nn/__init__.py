"""Multi-exit networks: exit heads, the K-stage network, and adapters adding exits to models."""

from __future__ import annotations

from .heads import ExitHead, FirstToken
from .hf import HFEncoderStage, hf_encoder_exits
from .multi_exit import (
    ChainStage,
    ExitFlops,
    FirstTokenIfSequence,
    MultiExitNetwork,
    architecture_of,
    attach_exits,
    conv_head_shape,
    record_architecture,
)

__all__ = [
    "ChainStage",
    "ExitFlops",
    "ExitHead",
    "FirstToken",
    "FirstTokenIfSequence",
    "HFEncoderStage",
    "MultiExitNetwork",
    "architecture_of",
    "attach_exits",
    "conv_head_shape",
    "hf_encoder_exits",
    "record_architecture",
]
