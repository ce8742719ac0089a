"""The batched early-exit runtime: :class:`Engine` (modes full / mask / compact) and the
offline oracle :func:`simulate`."""

from .engine import MODES, Engine, EngineOutput, check_network, simulate

__all__ = ["MODES", "Engine", "EngineOutput", "check_network", "simulate"]
