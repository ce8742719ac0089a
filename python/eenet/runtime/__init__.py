"""The batched early-exit runtime: :class:`Engine` (modes full / mask / compact) and the
offline oracle :func:`simulate`."""

from .engine import MODES, Engine, EngineOutput, simulate

__all__ = ["MODES", "Engine", "EngineOutput", "simulate"]
