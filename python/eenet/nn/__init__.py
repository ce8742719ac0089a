"""Multi-exit networks: exit heads, the K-stage network, and adapters adding exits to models."""

from __future__ import annotations

from .heads import ExitHead, FirstToken
from .hf import HFEncoderStage, hf_encoder_exits
from .multi_exit import ChainStage, FirstTokenIfSequence, MultiExitNetwork, attach_exits

__all__ = [
    "ChainStage",
    "ExitHead",
    "FirstToken",
    "FirstTokenIfSequence",
    "HFEncoderStage",
    "MultiExitNetwork",
    "attach_exits",
    "hf_encoder_exits",
]
