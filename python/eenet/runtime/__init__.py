"""The batched early-exit runtime: :class:`Engine` (modes full / mask / compact, and
compiled: the compact loop as one ``torch.compile`` graph, :mod:`.compiled`), its
ahead-of-time export :func:`export_engine` and AOTInductor packages :func:`package_engine` /
:func:`load_package` (:mod:`.export`), the offline
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
from .export import PackagedEngine, export_engine, load_package, package_engine
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
    "PackagedEngine",
    "RowState",
    "Step",
    "Telemetry",
    "bucket_rows",
    "check_network",
    "compiled",
    "export",
    "export_engine",
    "guard",
    "load_package",
    "loop",
    "package_engine",
    "run_stages",
    "simulate",
    "telemetry",
    "timing",
]
