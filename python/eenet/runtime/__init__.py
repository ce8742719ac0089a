"""The batched early-exit runtime: :class:`Engine` (modes full / mask / compact, and
compiled: the compact loop as one ``torch.compile`` graph, :mod:`.compiled`), its
ahead-of-time export :func:`export_engine` (:mod:`.export`), the offline
oracle :func:`simulate`, the budget guard (:mod:`.guard`), the per-batch telemetry
(:mod:`.telemetry`), the stage loop they share with the benchmark's peer methods
(:mod:`.loop`) and the timing loop of every measurement (:mod:`.timing`)."""

from . import compiled, export, guard, loop, telemetry, timing
from .engine import (
    ALL_MODES,
    CACHE_BYTES,
    MODES,
    Engine,
    EngineOutput,
    bucket_rows,
    check_network,
    simulate,
)
from .export import export_engine, package_engine
from .guard import BudgetGuard
from .loop import RowState, Step, run_stages
from .telemetry import Telemetry

__all__ = [
    "ALL_MODES",
    "CACHE_BYTES",
    "MODES",
    "BudgetGuard",
    "Engine",
    "EngineOutput",
    "RowState",
    "Step",
    "Telemetry",
    "bucket_rows",
    "check_network",
    "compiled",
    "export",
    "export_engine",
    "guard",
    "loop",
    "package_engine",
    "run_stages",
    "simulate",
    "telemetry",
    "timing",
]
