"""Serving: :class:`ServingEngine`, a re-batching early-exit server core (one worker thread,
a queue of pending rows per stage, survivors of different batches merged at the deeper
stages), its :class:`ServingConfig`, the :class:`Answer` of each request, the telemetry
snapshot :class:`ServingStats` and the errors a request or a submit can raise."""

from .engine import (
    Answer,
    DeadlineExceeded,
    EngineClosed,
    QueueFull,
    RebatchPlan,
    RequestCancelled,
    ServingConfig,
    ServingEngine,
    ServingError,
    StageFailed,
    plan_from_profile,
)
from .stats import ServingStats

__all__ = ["Answer", "DeadlineExceeded", "EngineClosed", "QueueFull", "RebatchPlan",
           "RequestCancelled", "ServingConfig", "ServingEngine", "ServingError",
           "ServingStats", "StageFailed", "plan_from_profile"]
