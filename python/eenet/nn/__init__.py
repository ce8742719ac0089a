"""Multi-exit networks: exit heads, the K-stage network, and adapters adding exits to models."""

from __future__ import annotations

from .heads import (
    TOKEN_POOLS,
    ExitHead,
    FirstToken,
    MaskedMeanPool,
    TokenPooler,
    classifier_operands,
    head_row_inputs,
)
from .hf import HF_HEADS, HFEncoderStage, hf_encoder_exits, pad_token_id
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
    "HF_HEADS",
    "TOKEN_POOLS",
    "ChainStage",
    "ExitFlops",
    "ExitHead",
    "FirstToken",
    "FirstTokenIfSequence",
    "HFEncoderStage",
    "MaskedMeanPool",
    "MultiExitNetwork",
    "TokenPooler",
    "architecture_of",
    "attach_exits",
    "classifier_operands",
    "conv_head_shape",
    "head_row_inputs",
    "hf_encoder_exits",
    "pad_token_id",
    "record_architecture",
]
