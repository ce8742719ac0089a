"""Serving under load: a Poisson stream of single-sample requests into the serving engine
(:class:`eenet.serving.ServingEngine`), in four configurations measured in the same run:

- ``full``: the full model (a policy under which no row leaves before the last exit), every
  admitted batch on its own (``rebatch="never"``);
- ``compact``: the early-exit policy, every admitted batch on its own through the stages:
  the per-batch compact loop of the runtime engine, fed with the batches that form in the
  admission queue;
- ``rebatch``: the early-exit policy, survivors of different batches merged at each stage
  where the profiled stage time says a bigger batch pays (``rebatch="auto"``), a stage's
  oldest row waiting at most ``--max-wait-ms`` for more;
- ``rebatch_wait``: the same with a longer wait (``--long-wait-ms``): on a CPU a stage run
  at batch 64 takes milliseconds, so rows reach a short wait before a second run can join
  them.

The policy is the suite's forced-rate MaxProb (:class:`bench.e2e.ForcedRate`, 50% of the rows
still present leave at each exit). Offered loads are fractions of the full model's capacity,
measured first in the same run (a closed-loop pass: all samples submitted at once). Per
(load, configuration): a bounded stream (at most ``--requests`` requests and ``--seconds``
seconds of arrivals), the achieved throughput, p50 / p99 latency from each request's
scheduled arrival to its answer (so the generator's own lag counts against the server), the
mean batch size per stage, and whether every answer took the offline oracle's exit
(:func:`eenet.runtime.simulate`). In-process (the requests are submitted from a generator
thread, no HTTP): the server's own queueing and batching, not a network stack, is what is
measured. Run ``python -m bench.serve [--workload mnist]``.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from eenet.policies import ExitPolicy
from eenet.runtime import simulate
from eenet.serving import ServingConfig, ServingEngine

from .e2e import WORKLOADS, ForcedRate, pool_pass
from .runner import (
    Column,
    Section,
    TimeLimit,
    add_time_limit_argument,
    environment,
    load_note,
    set_cpu_threads,
    write_results,
)

CONFIGS: tuple[str, ...] = ("full", "compact", "rebatch", "rebatch_wait")
LOADS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5)
EXIT_RATE = 0.5


def _engine(net: torch.nn.Module, policy: ExitPolicy, rebatch: str, max_batch: int,
            max_wait_ms: float) -> ServingEngine:
    cfg = ServingConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=1 << 16,
                        rebatch=rebatch)
    return ServingEngine(net, policy, cfg).start()


def _warm(engine: ServingEngine, pool: torch.Tensor) -> None:
    """Profiles (``rebatch="auto"``) and warms every stage at a few batch sizes."""
    for n in (1, 8, pool.shape[0]):
        for f in engine.submit_many(pool[:n]):
            f.result()


def capacity(engine: ServingEngine, pool: torch.Tensor, repeats: int = 3) -> float:
    """Samples per second in a closed loop: the whole pool submitted at once, best of
    ``repeats``."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in engine.submit_many(pool):
            f.result()
        best = min(best, time.perf_counter() - t0)
    return pool.shape[0] / best


def poisson_stream(engine: ServingEngine, pool: torch.Tensor, rate: float, requests: int,
                   seconds: float, seed: int) -> dict[str, Any]:
    """Submit requests at Poisson arrival times of ``rate`` per second (sample i is pool row
    i mod len(pool)) until ``requests`` were sent or ``seconds`` of arrivals passed; wait
    for every answer. Returns latencies (s, arrival to answer), answers by sample index,
    the send window and the count of rejected submits."""
    rng = np.random.default_rng(seed)
    n = max(1, min(requests, math.ceil(rate * seconds)))
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    done_at = [math.nan] * n
    answers: list[Any] = [None] * n
    left = threading.Semaphore(0)
    rejected = 0

    def on_done(i: int, due: float):
        def callback(fut: Any) -> None:
            done_at[i] = time.perf_counter() - due
            if not fut.cancelled() and fut.exception() is None:
                answers[i] = fut.result()
            left.release()
        return callback

    t0 = time.perf_counter()
    sent = 0
    for i, at in enumerate(arrivals):
        due = t0 + float(at)
        wait = due - time.perf_counter()
        if wait > 0:  # sleep, never spin: a spinning generator would hold the GIL
            time.sleep(wait)
        try:
            engine.submit(pool[i % pool.shape[0]], callback=on_done(i, due))
            sent += 1
        except Exception:  # QueueFull: counted, never silently dropped
            rejected += 1
    for _ in range(sent):
        left.acquire()
    end = time.perf_counter()
    lat = np.array([d for d in done_at if not math.isnan(d)])
    return {"latencies": lat, "answers": answers, "sent": sent, "rejected": rejected,
            "window_s": end - t0}


def measure(workload: str, device: torch.device, loads: Sequence[float], requests: int,
            seconds: float, max_batch: int, max_wait_ms: float, quick: bool,
            long_wait_ms: float = 10.0, limit: TimeLimit | None = None
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of (load, configuration) and the run's facts (capacity, plans, workload).
    ``limit``: no new offered load starts once it is spent or after a SIGINT."""
    limit = TimeLimit() if limit is None else limit
    w = WORKLOADS[workload](device, device.type == "cuda", quick)
    net = w.net
    pool = torch.cat([x for x, _ in w.streams[max(w.streams)]])[:max(64, max_batch)]
    _, logits = pool_pass(net, [(pool, {})])
    policies = {"early": ForcedRate.calibrate(logits, EXIT_RATE),
                "none": ForcedRate.calibrate(logits, 0.0)}
    oracle = {name: simulate(net, p, pool).exit_index for name, p in policies.items()}
    info = {"workload": w.description, "pool": pool.shape[0],
            "exit_fractions": "/".join(f"{float((oracle['early'] == k).float().mean()):.0%}"
                                       for k in range(len(net.heads)))}
    settings = {"full": ("none", "never", max_wait_ms),
                "compact": ("early", "never", max_wait_ms),
                "rebatch": ("early", "auto", max_wait_ms),
                "rebatch_wait": ("early", "auto", long_wait_ms)}
    engines = {c: _engine(net, policies[p], r, max_batch, wait)
               for c, (p, r, wait) in settings.items()}
    rows: list[dict[str, Any]] = []
    try:
        for e in engines.values():
            _warm(e, pool)
        caps = {c: capacity(e, pool) for c, e in engines.items()}
        info["capacity"] = caps
        info["plans"] = engines["rebatch"].describe_plans()
        base = caps["full"]
        print("[serve] capacity (samples/s, closed loop): " + ", ".join(
            f"{c} {v:.0f}" for c, v in caps.items()), flush=True)
        with limit.interruptible():  # a SIGINT ends the loop; the rows measured are kept
            for load in limit.each(loads, "offered loads"):
                rate = load * base
                for j, (c, e) in enumerate(engines.items()):
                    before = e.snapshot()
                    res = poisson_stream(e, pool, rate, requests, seconds, seed=j)
                    after = e.snapshot()
                    expected = oracle[settings[c][0]]
                    agree = [a.exit_index == int(expected[i % pool.shape[0]])
                             for i, a in enumerate(res["answers"]) if a is not None]
                    runs = [b - a for a, b in zip(before.stage_runs, after.stage_runs, strict=True)]
                    rws = [b - a for a, b in zip(before.stage_rows, after.stage_rows, strict=True)]
                    lat = res["latencies"]
                    rows.append({
                        "workload": workload, "load": load, "offered": rate, "config": c,
                        "sent": res["sent"], "rejected": res["rejected"],
                        "throughput": len(lat) / res["window_s"],
                        "p50_ms": float(np.percentile(lat, 50)) * 1e3 if len(lat) else None,
                        "p99_ms": float(np.percentile(lat, 99)) * 1e3 if len(lat) else None,
                        "batch_per_stage": "/".join(f"{r / n:.1f}" if n else "-"
                                                    for r, n in zip(rws, runs, strict=True)),
                        "agree": float(np.mean(agree)) if agree else None})
                    r = rows[-1]
                    print(f"[serve] load {load:.2f} ({rate:.0f}/s) {c}: {r['throughput']:.0f}/s "
                          f"p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms batches "
                          f"{r['batch_per_stage']}", flush=True)
    finally:
        for e in engines.values():
            e.close(drain=False)
    return rows, info


def _plot(rows: list[dict[str, Any]]):
    def draw(fig: Any) -> None:
        axes = fig.subplots(1, 2)
        for c in CONFIGS:
            pts = sorted((r["offered"], r["p50_ms"], r["p99_ms"], r["throughput"])
                         for r in rows if r["config"] == c and r["p50_ms"] is not None)
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[2] for p in pts], marker="o", label=f"{c} p99")
            axes[0].plot(xs, [p[1] for p in pts], marker=".", linestyle="--",
                         label=f"{c} p50")
            axes[1].plot(xs, [p[3] for p in pts], marker="o", label=c)
        axes[0].set_yscale("log")
        axes[0].set_xlabel("offered load (requests/s)")
        axes[0].set_ylabel("latency (ms, arrival to answer)")
        axes[1].set_xlabel("offered load (requests/s)")
        axes[1].set_ylabel("throughput (answers/s)")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("Serving a Poisson stream: full model vs per-batch compact vs re-batching")
    return draw


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--workload", default="mnist", choices=("mnist", "resnet56"))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--requests", type=int, default=3000, help="at most this many per stream")
    ap.add_argument("--seconds", type=float, default=4.0,
                    help="at most this many seconds of arrivals per stream")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--long-wait-ms", type=float, default=10.0,
                    help="the rebatch_wait configuration's wait")
    ap.add_argument("--quick", action="store_true", help="two loads, short streams")
    ap.add_argument("--name", default=None, help="results name (default serve)")
    add_time_limit_argument(ap, "offered load")
    args = ap.parse_args(argv)
    limit = TimeLimit(args.time_limit)
    device = torch.device(args.device)
    set_cpu_threads(args.threads, device)
    loads = (0.5, 1.0) if args.quick else LOADS
    requests, seconds = (200, 0.5) if args.quick else (args.requests, args.seconds)
    stamp = environment(device)
    rows, info = measure(args.workload, device, loads, requests, seconds, args.max_batch,
                         args.max_wait_ms, args.quick, args.long_wait_ms, limit)
    for note in limit.notes():
        print(f"bench.serve: {note}", flush=True)
    if not rows:
        print("bench.serve: no load was measured; nothing written", flush=True)
        return 2
    notes = [load_note(), f"workload: {info['workload']}; {info['pool']} distinct samples; "
             f"exit mix of the early-exit policy {info['exit_fractions']}",
             "closed-loop capacity (samples/s): " + ", ".join(
                 f"{c} {v:.0f}" for c, v in info["capacity"].items()),
             "re-batching plan (auto): " + "; ".join(info["plans"]),
             f"max_batch {args.max_batch}, max_wait_ms {args.max_wait_ms} (rebatch_wait: "
             f"{args.long_wait_ms}), "
             f"{args.threads} torch thread(s); streams of at most {requests} requests / "
             f"{seconds:g} s of arrivals", *limit.notes()]
    columns = [Column("load", "load (x full capacity)", "{:.2f}"),
               Column("offered", "offered /s", "{:.0f}"), Column("config", "config"),
               Column("throughput", "answers /s", "{:.0f}"), Column("p50_ms", "p50 ms", "{:.1f}"),
               Column("p99_ms", "p99 ms", "{:.1f}"),
               Column("batch_per_stage", "mean batch per stage"),
               Column("rejected", "rejected"), Column("agree", "oracle exit", "{:.1%}")]
    sections = [Section("Poisson stream", "Latency from each request's scheduled arrival to "
                        "its answer; batch sizes are the mean rows per stage run.", rows,
                        columns)]
    name = args.name or ("serve_quick" if args.quick else "serve")
    paths = write_results(name, device, title=f"Serving under load ({stamp['device']})",
                          sections=sections, csv_rows=rows, notes=notes, plot=_plot(rows),
                          stamp=stamp)
    print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
