"""The one runner every benchmark uses: timing, statistics, cache flush, host-sync counting
and the results writer.

Timing: on the project's one timing loop, :mod:`eenet.runtime.timing` (``time_fn``,
``time_entries``, the timers and :class:`~eenet.runtime.timing.Stats`): ``warmup`` untimed
runs, then ``repeats`` timed runs (default 20; benchmarks that take fewer say so in their
results); the statistics are the median with p10 / p90 (and p99, the mean, min and max).
CPU: ``time.perf_counter`` around the call. CUDA: a pair of ``torch.cuda.Event`` around the
call, synchronised on the end event (so the time is the device time of the work the call
queued, plus any host wait inside it). Here: :func:`time_many`, which interleaves several
functions run by run so that their ratios are measured under the same load, and
:func:`time_segments` / :class:`Segmented`, a run timed as the sum of separately timed
parts. An optional :class:`CacheFlusher` runs before every call, untimed.

Host syncs (:func:`count_syncs`): one call under ``torch.profiler``, minus the events of an
empty call (the profiler's own).
- CPU: the number of ``aten::_local_scalar_dense`` events (every ``.item()``, ``bool(t)``,
  ``int(t)``, ``if t:`` on a tensor ends there; ``aten::item`` / ``aten::is_nonzero`` are its
  callers and are not counted again) plus ``aten::nonzero`` events (``torch.nonzero`` and
  every boolean-mask index or index-put: its output size depends on the data, which on a GPU
  costs a device-to-host copy and a wait). ``aten::nonzero_static`` is not counted. On a CPU
  these are not real waits; they are the points where a GPU run of the same code would stop.
- CUDA (code path untested here): the number of ``cudaStreamSynchronize``,
  ``cudaDeviceSynchronize`` and ``cudaEventSynchronize`` runtime calls (a ``.item()`` or a
  ``nonzero`` is one device-to-host copy followed by one such wait); device-to-host copies
  (``Memcpy DtoH`` activities) are reported beside it, not added.

Results (:func:`write_results`): ``bench/results/<device>/<name>.md`` (tables),
``<name>.csv`` (all rows; the stamp as leading ``# key: value`` lines) and ``<name>.png``,
each stamped (:func:`environment`) with the device (CPU model from /proc/cpuinfo or the GPU
name), driver, torch, triton and CUDA versions, and the git commit (``-dirty`` when the
working tree differs from it).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eenet.runtime.timing import Entry, Stats, Timer, synchronize, time_entries, timed

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
MIN_REPEATS = 20

CPU_SYNC_OPS: tuple[str, ...] = ("aten::_local_scalar_dense", "aten::nonzero")
CPU_SYNC_INFO: tuple[str, ...] = ("aten::item", "aten::is_nonzero")
CUDA_SYNC_CALLS: tuple[str, ...] = ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                    "cudaEventSynchronize")
CUDA_DTOH_PREFIX = "Memcpy DtoH"


# ---------------------------------------------------------------------------------------
# Device helpers.


def cuda_missing(program: str, device: str) -> bool:
    """True (after printing why to stderr) when ``device`` is cuda but none is usable."""
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{program}: --device cuda needs a CUDA device and a CUDA build of torch; none "
              "here (torch.cuda.is_available() is False)", file=sys.stderr)
        return True
    return False


def set_cpu_threads(threads: int, device: str | torch.device) -> int:
    """Intra-op threads for a CPU benchmark: ``threads`` (0 = leave torch's default).

    Default 1 in the CLIs: on a small host shared with other work, OpenMP threads wait at
    barriers whenever another process holds a core, which turns microsecond ops into
    scheduler-quantum (4-8 ms) steps; one thread gives stable medians. Returns the count set.
    """
    if torch.device(device).type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------
# Cache flush.


def last_level_cache_bytes(device: str | torch.device = "cpu") -> int:
    """Size of the last-level cache: the GPU's L2, or the CPU's highest cache level from
    /sys (64 MiB if it cannot be read)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return int(getattr(props, "L2_cache_size", 0) or 64 << 20)
    best_level, best_size = 0, 0
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")) if root.exists() else []:
        try:
            level = int((index / "level").read_text().strip())
            size = _parse_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if level >= best_level:
            best_level, best_size = level, size
    return best_size or 64 << 20


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMG]?)B?", text.strip(), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse cache size {text!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def copy_bandwidth_bytes(device: str | torch.device = "cpu") -> int:
    """The size :func:`copy_bandwidth` copies by default: 8 x the last-level cache, at least
    64 MiB, so that the copy streams from memory."""
    return max(8 * last_level_cache_bytes(device), 64 << 20)


def copy_bandwidth(device: str | torch.device = "cpu", nbytes: int | None = None,
                   repeats: int = 10) -> float:
    """The memory bandwidth the device reaches on a plain copy, GB/s: ``dst.copy_(src)`` of
    ``nbytes`` (default :func:`copy_bandwidth_bytes`), counted as read + write (2 x nbytes),
    median of ``repeats`` runs. The reference the benchmarks' "% of copy bandwidth" columns
    divide by: what this machine delivers, rather than a datasheet peak it does not reach."""
    dev = torch.device(device)
    size = int(nbytes or copy_bandwidth_bytes(dev))
    src = torch.ones(size // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    stats = time_many({"copy": lambda: dst.copy_(src)}, warmup=2, repeats=repeats, device=dev)
    return 2.0 * src.numel() * 4 / stats["copy"].median / 1e9


class CacheFlusher:
    """Evicts the last-level cache between runs by a read-modify-write pass over a buffer of
    ``2 x LLC`` bytes (at least 32 MiB) on the device. Call it (untimed) before a run."""

    def __init__(self, device: str | torch.device = "cpu", nbytes: int | None = None) -> None:
        self.device = torch.device(device)
        self.nbytes = int(nbytes or max(2 * last_level_cache_bytes(self.device), 32 << 20))
        self._buf = torch.zeros(self.nbytes // 4, dtype=torch.float32, device=self.device)

    def __call__(self) -> None:
        self._buf.add_(1.0)
        synchronize(self.device)


# ---------------------------------------------------------------------------------------
# Timing: segments and interleaving, on the project's one timing loop.


Segment = Callable[[], object]


@dataclass(frozen=True)
class Segmented:
    """A timed entry made of separately timed parts: ``make()`` (untimed, once per run)
    returns items, each a callable or a sequence of callables (a group). An item's time is
    the sum of its callables' standalone times; a run's time is the sum of its items'."""

    make: Callable[[], Sequence[Segment | Sequence[Segment]]]


def _segmented_entry(entry: Segmented, calls: list[list[float]] | None = None) -> Entry:
    """The timing entry of a :class:`Segmented`; each call's item times are appended to
    ``calls`` (warm-up calls included)."""

    def run(t: Timer) -> float:
        items: list[float] = []
        for item in entry.make():
            parts = [item] if callable(item) else list(item)
            items.append(sum(timed(part)(t) for part in parts))
        if calls is not None:
            calls.append(items)
        return sum(items)

    return run


def time_segments(make_segments: Callable[[], Sequence[Segment | Sequence[Segment]]], *,
                  warmup: int = 3, repeats: int = MIN_REPEATS,
                  device: str | torch.device = "cpu", flush: Callable[[], None] | None = None,
                  setup: Callable[[int], None] | None = None,
                  timer: Timer | None = None) -> Stats:
    """Like :func:`eenet.runtime.timing.time_fn`, but a run is the *sum* of the separately
    timed segments that ``make_segments()`` (untimed) returns (see :class:`Segmented`): each
    segment's standalone time, without the gaps between them (the engine's "ideal": every
    stage at its survivor batch size)."""
    return time_entries({"run": _segmented_entry(Segmented(make_segments))}, warmup=warmup,
                        repeats=repeats, device=device, flush=flush, setup=setup,
                        timer=timer)["run"]


def time_many(fns: dict[str, Callable[[], object] | Segmented], *, warmup: int = 3,
              repeats: int = MIN_REPEATS, device: str | torch.device = "cpu",
              flush: Callable[[], None] | None = None,
              setup: Callable[[int], None] | None = None,
              timer: Timer | None = None,
              item_samples: dict[str, list[float]] | None = None) -> dict[str, Stats]:
    """Time several functions interleaved (:func:`eenet.runtime.timing.time_entries`): run i
    calls ``setup(i)`` once, then each function in turn (``flush()`` before each), so that a
    change in the machine's load during the measurement hits all of them alike and their
    ratios stay fair.

    :class:`Segmented` entries are timed part by part; with ``item_samples``, the times of
    their items in the timed runs are appended to ``item_samples[name]`` (e.g. the latency of
    every batch of a stream, when a run is a stream of batches).
    """
    calls: dict[str, list[list[float]]] = {}
    entries: dict[str, Entry] = {}
    for name, fn in fns.items():
        if isinstance(fn, Segmented):
            entries[name] = _segmented_entry(fn, calls.setdefault(name, []))
        else:
            entries[name] = timed(fn)
    stats = time_entries(entries, warmup=warmup, repeats=repeats, device=device, flush=flush,
                         setup=setup, timer=timer)
    if item_samples is not None:
        for name, per_call in calls.items():
            item_samples.setdefault(name, []).extend(
                dt for items in per_call[warmup:] for dt in items)
    return stats


# ---------------------------------------------------------------------------------------
# Host-sync counting.


def host_seconds(fn: Callable[[], object], device: str | torch.device, repeats: int = 50
                 ) -> float:
    """Median seconds the host spends inside one call of ``fn`` with the device not awaited
    (a CPU-side timer around the call only; the device is synchronised before and after
    the series): the launch overhead a caller pays per call. On a CPU, where the work runs
    in the call, it is the call's time."""
    synchronize(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    synchronize(device)
    return float(np.median(samples))


def graph_replay_seconds(fn: Callable[[], object], device: str | torch.device,
                         calls: int = 20, repeats: int = 10) -> float | None:
    """CUDA only: seconds per call of ``fn`` when ``calls`` calls are captured into one CUDA
    graph and the graph is replayed (median of ``repeats`` replays, CUDA events around each):
    the device time without the host's launch overhead. None on other devices, or when
    ``fn`` cannot be captured (a host sync inside it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError:
        return None
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return float(np.median(times))


class TimeLimit:
    """A wall-clock allowance for a benchmark run, so that a run cut short still reports what
    it measured. Loops take their items through :meth:`each`, which stops handing them out
    once ``seconds`` (None: no limit) have passed since construction or after the run was
    interrupted inside :meth:`interruptible` (SIGINT, e.g. from ``timeout --signal=INT``);
    :meth:`notes` then say which loops stopped where and why.

    Usage::

        limit = TimeLimit(args.time_limit)
        with limit.interruptible():
            for size in limit.each(sizes, "exit_score sizes"):
                rows += measure(size)  # one statement: a size's rows land whole or not
    """

    def __init__(self, seconds: float | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if seconds is not None and not seconds > 0:
            raise ValueError(f"TimeLimit: seconds must be > 0 or None, got {seconds!r}")
        self.seconds = seconds
        self.clock = clock
        self.start = clock()
        self.stopped: str | None = None  # why items stopped being handed out
        self._progress: dict[str, list[int]] = {}  # loop -> [done, total]

    def allows(self) -> bool:
        """Whether a new measurement may start (records the reason once it may not)."""
        if (self.stopped is None and self.seconds is not None
                and self.clock() - self.start >= self.seconds):
            self.stopped = f"the time limit of {self.seconds:g} s was reached"
        return self.stopped is None

    def each(self, items: Sequence[Any], what: str) -> Iterator[Any]:
        """The items while :meth:`allows`; an item counts as done when the loop asks for the
        next one (or ends), so one cut off by an interruption does not."""
        progress = self._progress.setdefault(what, [0, 0])
        progress[1] += len(items)
        for item in items:
            if not self.allows():
                return
            yield item
            progress[0] += 1

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Ends the block at a KeyboardInterrupt, recorded as the reason to stop."""
        try:
            yield
        except KeyboardInterrupt:
            self.stopped = "the run was interrupted (SIGINT)"

    def notes(self) -> list[str]:
        """One line per loop that did not get through its items: how far it got, and why."""
        return [f"{what}: {done} of {total} measured, then stopped: {self.stopped}"
                for what, (done, total) in self._progress.items()
                if done < total and self.stopped is not None]


def _time_limit_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {value:g}")
    return value


def add_time_limit_argument(ap: argparse.ArgumentParser, unit: str) -> None:
    """``--time-limit S`` (default None: no limit) for :class:`TimeLimit`; ``unit``: what a
    run starts no more of after S seconds (for the help text)."""
    ap.add_argument("--time-limit", type=_time_limit_seconds, default=None, metavar="S",
                    help=f"start no new {unit} after S seconds; the report holds what was "
                         "measured and says where the run stopped (also after a SIGINT)")


@dataclass(frozen=True)
class SyncCount:
    """Host syncs of one call (see the module docstring for what counts) and the counted
    events by name (the informational ones included)."""

    total: int
    by_name: dict[str, int]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence fd 2 (the profiler's native start/stop log lines) for the block."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profile_counts(fn: Callable[[], object], device: torch.device
                    ) -> tuple[Counter[str], object]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    with _quiet_stderr(), profile(activities=activities) as prof:
        result = fn()
    return Counter(e.name for e in prof.events()), result


def sync_total(counts: Counter[str] | dict[str, int], device: str | torch.device) -> int:
    """The host-sync count in a profile's event-name counts (module docstring)."""
    names = CUDA_SYNC_CALLS if torch.device(device).type == "cuda" else CPU_SYNC_OPS
    return int(sum(counts.get(n, 0) for n in names))


def count_syncs(fn: Callable[[], object], device: str | torch.device = "cpu"
                ) -> tuple[SyncCount, object]:
    """Host syncs of one call of ``fn`` (minus those of an empty call); returns the count and
    ``fn()``'s result."""
    dev = torch.device(device)
    base, _ = _profile_counts(lambda: None, dev)
    counts, result = _profile_counts(fn, dev)
    counts.subtract(base)
    shown = (*CPU_SYNC_OPS, *CPU_SYNC_INFO, *CUDA_SYNC_CALLS)
    by_name = {n: max(0, counts.get(n, 0)) for n in shown if counts.get(n, 0) > 0}
    dtoh = sum(v for k, v in counts.items() if k.startswith(CUDA_DTOH_PREFIX))
    if dtoh > 0:
        by_name[CUDA_DTOH_PREFIX] = dtoh
    return SyncCount(sync_total({k: max(0, v) for k, v in counts.items()}, dev), by_name), result


# ---------------------------------------------------------------------------------------
# Environment stamp.


def _run(cmd: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20,
                             cwd=REPO_ROOT, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """``git rev-parse --short HEAD``, with ``-dirty`` if ``git status --porcelain`` lists
    anything (modified or untracked files); ``unknown`` outside a git checkout."""
    head = _run(["git", "rev-parse", "--short", "HEAD"])
    if not head:
        return "unknown"
    status = _run(["git", "status", "--porcelain"])
    return head + ("-dirty" if status else "")


def cpu_model() -> str:
    """The CPU's ``model name`` from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_slug(device: str | torch.device) -> str:
    """Results folder name: ``cpu``, or the GPU's name in lower case with dashes."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


def environment(device: str | torch.device = "cpu") -> dict[str, str]:
    """The stamp of a result: device, driver, torch, triton, CUDA, commit and context."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = (driver or "unknown").splitlines()[0] if driver else "unknown"
    else:
        name = f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)"
        driver = "n/a (CPU)"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {
        "device": name,
        "driver": driver,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "none (CPU build of torch)",
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch threads": str(torch.get_num_threads()),
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "load average (1/5/15 min) at start": load,
    }


def load_note() -> str:
    """A line about the host's load right now (1-minute average vs core count)."""
    if not hasattr(os, "getloadavg"):
        return ""
    one, five, _ = os.getloadavg()
    cores = os.cpu_count() or 1
    own = min(torch.get_num_threads(), cores)  # the benchmark's own runnable threads
    busy = ("other work was running" if max(one, five) > own + 0.5
            else "no other significant load")
    return (f"load average at the end: {one:.2f} (1 min), {five:.2f} (5 min) on {cores} "
            f"cores, {own} of them used by the benchmark: {busy}")


# ---------------------------------------------------------------------------------------
# Results writer.


@dataclass
class Column:
    """A table column: the row key, its header, and a format (``str.format`` spec or a
    callable); missing values print as ``-``."""

    key: str
    header: str
    fmt: str | Callable[[Any], str] = "{}"

    def render(self, row: dict[str, Any]) -> str:
        v = row.get(self.key)
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "-"
        if callable(self.fmt):
            return self.fmt(v)
        return self.fmt.format(v)


@dataclass
class Section:
    """A part of the markdown report: a heading, text, and an optional table."""

    heading: str
    text: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: Sequence[Column] = ()


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub markdown table of ``rows`` in ``columns``."""
    head = "| " + " | ".join(c.header for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(c.render(r) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_results(name: str, device: str | torch.device, *, title: str,
                  sections: Sequence[Section], csv_rows: Sequence[dict[str, Any]],
                  notes: Sequence[str] = (),
                  plot: Callable[[Any], None] | None = None,
                  stamp: dict[str, str] | None = None,
                  root: Path | str | None = None) -> dict[str, Path]:
    """Write ``<root>/<device>/<name>.md``, ``.csv`` and (with ``plot``) ``.png``.

    ``plot(fig)`` draws on a matplotlib figure; the stamp is added at its foot. ``stamp``
    defaults to :func:`environment`. Returns the paths written by extension.
    """
    stamp = dict(stamp or environment(device))
    out_dir = Path(root or RESULTS_ROOT) / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    md = [f"# {title}", ""]
    md += [f"- **{k}**: {v}" for k, v in stamp.items()]
    md.append("")
    if notes:
        md += [f"- {n}" for n in notes if n]
        md.append("")
    for sec in sections:
        md += [f"## {sec.heading}", ""]
        if sec.text:
            md += [sec.text, ""]
        if sec.rows and sec.columns:
            md += [markdown_table(sec.rows, sec.columns), ""]
    if plot is not None:
        md += [f"![{name}]({name}.png)", ""]
    paths["md"] = out_dir / f"{name}.md"
    paths["md"].write_text("\n".join(md))

    paths["csv"] = out_dir / f"{name}.csv"
    keys: list[str] = []
    for r in csv_rows:
        keys += [k for k in r if k not in keys]
    with paths["csv"].open("w", newline="") as f:
        for k, v in stamp.items():
            f.write(f"# {k}: {v}\n")
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in csv_rows:
            writer.writerow({k: _csv_value(r.get(k)) for k in keys})

    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(12, 8))
        plot(fig)
        foot = (f"{stamp.get('device', '?')} | torch {stamp.get('torch', '?')} | triton "
                f"{stamp.get('triton', '?')} | CUDA {stamp.get('cuda', '?')} | driver "
                f"{stamp.get('driver', '?')} | commit {stamp.get('commit', '?')} | "
                f"{stamp.get('date (UTC)', '')}")
        fig.text(0.5, 0.005, foot, ha="center", va="bottom", fontsize=7, color="0.35")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        paths["png"] = out_dir / f"{name}.png"
        fig.savefig(paths["png"], dpi=110)
        plt.close(fig)
    return paths


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
