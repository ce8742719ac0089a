"""eenet: multi-exit networks, exit policies, budget calibration and the batched runtime."""

from __future__ import annotations

from . import budget, models, nn, policies, robust, runtime, saving, train

__all__ = ["budget", "models", "nn", "policies", "robust", "runtime", "saving", "train"]
__version__ = "0.1.0"
