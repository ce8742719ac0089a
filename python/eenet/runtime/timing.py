"""Timing: the one measurement loop of the project. ``eenet.budget.measure`` and every
benchmark in ``bench/`` time through :func:`time_entries`.

A measurement is ``warmup`` untimed runs, then ``repeats`` timed runs. A run calls every
entry once, in turn, so entries measured together are interleaved run by run and a change in
the machine's load hits them alike. ``setup(i)`` runs (untimed) before run i, warm-up runs
included, and ``flush()`` (untimed, e.g. a cache flush) before every call.

Clocks (:func:`make_timer`): on CPU ``time.perf_counter`` around the call; on CUDA a pair
of ``torch.cuda.Event`` on the current stream, synchronised on the end event, so a time is
the device time of the work the call queued plus any host wait inside it.

Statistics (:class:`Stats`): the median with p10 / p90 / p99 (linear interpolation, as
numpy), the mean, min and max, in seconds.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class Stats:
    """Summary of timed runs, in seconds: median, p10, p90, p99, mean, min, max and the raw
    samples in run order."""

    median: float
    p10: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    runs: int
    samples: tuple[float, ...] = field(repr=False)

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Stats:
        """Statistics of ``samples`` (percentiles by linear interpolation, as numpy)."""
        if len(samples) == 0:
            raise ValueError("Stats needs at least one sample")
        a = np.asarray(samples, dtype=np.float64)
        p10, p50, p90, p99 = np.percentile(a, [10, 50, 90, 99])
        return cls(float(p50), float(p10), float(p90), float(p99), float(a.mean()),
                   float(a.min()), float(a.max()), len(a), tuple(float(s) for s in a))

    def ms(self) -> str:
        """``median [p10, p90] ms``."""
        return f"{self.median * 1e3:.3f} [{self.p10 * 1e3:.3f}, {self.p90 * 1e3:.3f}] ms"


class Timer(Protocol):
    """Measures one call: ``token = start()`` before it, ``seconds = stop(token)`` after."""

    def start(self) -> Any: ...

    def stop(self, token: Any) -> float: ...


class CpuTimer:
    """``time.perf_counter`` (the CPU does the work synchronously)."""

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, token: float) -> float:
        return time.perf_counter() - token


class CudaTimer:
    """A pair of CUDA events on the current stream; ``stop`` waits for the end event."""

    def start(self) -> Any:
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
        return begin

    def stop(self, token: Any) -> float:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return token.elapsed_time(end) / 1e3


def make_timer(device: str | torch.device) -> Timer:
    """The timer for a device: CUDA events on ``cuda``, ``perf_counter`` otherwise."""
    return CudaTimer() if torch.device(device).type == "cuda" else CpuTimer()


def synchronize(device: str | torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


Entry = Callable[[Timer], float]
"""One timed call of a measurement: given the timer, runs once and returns its seconds."""


def timed(fn: Callable[[], object]) -> Entry:
    """The entry that times one call of ``fn()``."""

    def entry(timer: Timer) -> float:
        token = timer.start()
        fn()
        return timer.stop(token)

    return entry


def time_entries(entries: Mapping[str, Entry], *, warmup: int = 3, repeats: int = 20,
                 device: str | torch.device = "cpu", flush: Callable[[], None] | None = None,
                 setup: Callable[[int], None] | None = None,
                 timer: Timer | None = None) -> dict[str, Stats]:
    """Time several entries interleaved (module docstring): ``warmup`` untimed runs, then
    ``repeats`` timed ones; returns each entry's :class:`Stats` over the timed runs.

    ``timer`` defaults to :func:`make_timer` of ``device``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    t = timer or make_timer(device)
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in entries}
    for i in range(warmup + repeats):
        if setup is not None:
            setup(i)
        for name, entry in entries.items():
            if flush is not None:
                flush()
            dt = entry(t)
            if i >= warmup:
                samples[name].append(dt)
    return {name: Stats.from_samples(s) for name, s in samples.items()}


def time_fn(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20,
            device: str | torch.device = "cpu", flush: Callable[[], None] | None = None,
            setup: Callable[[int], None] | None = None, timer: Timer | None = None) -> Stats:
    """Time ``fn()`` alone: :func:`time_entries` with the one entry ``timed(fn)``."""
    return time_entries({"fn": timed(fn)}, warmup=warmup, repeats=repeats, device=device,
                        flush=flush, setup=setup, timer=timer)["fn"]


def cpu_name() -> str:
    """The CPU's ``model name`` from /proc/cpuinfo (``platform.processor()`` elsewhere), to
    name the machine a measurement was taken on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
