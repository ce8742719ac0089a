"""Triton backend of the ``eenet`` ops (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

Importing this package does not import triton (it costs startup time): :func:`load` does, on
first use. The entry points have the signatures of :mod:`eenet_kernels.reference`; they are
the CUDA kernels of ``torch.ops.eenet.*`` (registered by :mod:`eenet_kernels.ops`), so there
is no second operator namespace:

- ``exit_score.exit_score`` / ``exit_score.exit_score_write``: the fused exit head, policy
  score, decision and result write (:mod:`eenet_kernels.triton.exit_score`);
- ``compact.compact`` / ``compact.compact_out``: single-launch stable multi-tensor
  compaction (:mod:`eenet_kernels.triton.compact`).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

_STATE: dict[str, tuple[ModuleType, ModuleType] | None] = {}


def interpreting() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load() -> tuple[ModuleType, ModuleType] | None:
    """(exit_score module, compact module), importing triton on the first call; None (with a
    one-time warning) when triton cannot be imported."""
    if "modules" not in _STATE:
        # import statements, not importlib: torch.compile (fullgraph) can trace through them
        try:
            from . import compact, exit_score
        except ImportError as exc:
            _STATE["modules"] = None
            warnings.warn(f"eenet_kernels: triton backend unavailable ({exc})", RuntimeWarning,
                          stacklevel=2)
        else:
            _STATE["modules"] = (exit_score, compact)
    return _STATE["modules"]


def is_available() -> bool:
    """Whether the triton backend can be imported (imports it on the first call)."""
    return load() is not None
