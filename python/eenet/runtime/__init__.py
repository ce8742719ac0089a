"""The batched early-exit runtime: :class:`Engine` (modes full / mask / compact), the
offline oracle :func:`simulate`, the stage loop they share with the benchmark's peer methods
(:mod:`.loop`) and the timing loop of every measurement (:mod:`.timing`)."""

from . import loop, timing
from .engine import CACHE_BYTES, MODES, Engine, EngineOutput, bucket_rows, check_network, simulate
from .loop import RowState, Step, run_stages

__all__ = ["CACHE_BYTES", "MODES", "Engine", "EngineOutput", "RowState", "Step", "bucket_rows",
           "check_network", "loop", "run_stages", "simulate", "timing"]
