"""eenet_kernels: fused early-exit ops for PyTorch.

``import eenet_kernels`` registers ``torch.ops.eenet.{exit_score, exit_score_write, compact,
compact_out}`` (compiled C++ kernels when built, the plain-torch reference otherwise) and
exposes the front-end functions below.
"""

from __future__ import annotations

from . import reference
from .checks import NEVER_EXIT
from .ops import (
    BACKENDS,
    HAVE_EXTENSION,
    ExitScore,
    compact,
    compiled_backends,
    exit_score,
    exit_score_write,
    resolve_backend,
    take,
)

__all__ = [
    "BACKENDS",
    "HAVE_EXTENSION",
    "NEVER_EXIT",
    "ExitScore",
    "compact",
    "compiled_backends",
    "exit_score",
    "exit_score_write",
    "reference",
    "resolve_backend",
    "take",
]
__version__ = "0.1.0"
