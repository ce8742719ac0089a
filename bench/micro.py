"""Kernel microbenchmarks: ``compact`` and ``exit_score`` against what plain torch offers.

compact (50% of the rows kept, caches flushed before every run):
- ours: ``eenet_kernels.compact(keep, [x], out=[dst])`` + ``eenet_kernels.take`` (the count
  read: the engine's one host sync per stage);
- ``x[keep]``: boolean indexing (a ``nonzero``: one host sync);
- ``nonzero_static`` + ``index_select``: sync-free, but with a static size of N it gathers all
  N rows (the tail padded with row 0), twice the kept bytes at 50% keep;
- roofline: ``dst[:n].copy_(src[:n])``, a plain copy of the kept bytes.
GB/s = 2 x kept bytes (read + write) / median time, the same formula for every method.

exit_score (no cache flush: in the engine the features were just written by the stage):
- ours: ``eenet_kernels.exit_score_write`` (``check_finite=False``, backend ``auto``: the C++
  kernel on CPU) and ``exit_score`` (no result write);
- torch eager: linear + softmax + max-prob score + threshold + scatter of the results into
  the (N0, C) / (N0,) output buffers at the rows' original positions (sync-free form:
  ``out[rows] = where(exit, new, out[rows])``);
- ``torch.compile`` (mode default) of the same eager function (a failure is recorded).
GB/s = (feats + weight + bias read, logits + score + exit written) / time; GFLOP/s = 2NDC/t.

All methods of one size are timed interleaved (``bench.runner.time_many``), so the ratios are
measured under the same load. Run ``python -m bench.micro [--device cuda]``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import eenet_kernels as ek

from .runner import (
    CacheFlusher,
    Column,
    Section,
    TimeLimit,
    add_time_limit_argument,
    copy_bandwidth,
    copy_bandwidth_bytes,
    count_syncs,
    cuda_missing,
    environment,
    graph_replay_seconds,
    host_seconds,
    load_note,
    set_cpu_threads,
    time_many,
    write_results,
)

COMPACT_N: tuple[int, ...] = (256, 8192, 65536)
ROW_BYTES: tuple[int, ...] = (64, 512, 4096)
EXIT_N: tuple[int, ...] = (64, 512, 4096)
EXIT_D: tuple[int, ...] = (256, 768)
EXIT_C: tuple[int, ...] = (10, 100, 1000)
BF16_SIZE: tuple[int, int, int] = (512, 768, 100)
# the GPU set (the project's kernel targets): every N x D x C in half and bfloat16
GPU_EXIT_D: tuple[int, ...] = (768, 256, 2048)  # BERT's hidden size first: see exit_sizes
GPU_EXIT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
COMPACT_METHODS: tuple[str, ...] = ("compact", "bool_index", "nonzero_static", "copy")
# timed with them, for the small-N target (compact <= 1.5x one trivial launch)
LAUNCH_METHODS: tuple[str, ...] = ("compact_nosync", "trivial")
EXIT_METHODS: tuple[str, ...] = ("ours_write", "ours_score", "eager", "compile")


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------
# compact


def compact_fns(src: torch.Tensor, keep: torch.Tensor, dst: torch.Tensor, pad: torch.Tensor,
                kept: int, backend: str | None = None) -> dict[str, Callable[[], object]]:
    """The four ways of moving the kept rows of ``src`` (see the module docstring), and the
    two small-N yardsticks: ours without the count read, one trivial kernel launch."""
    n = src.shape[0]
    one = torch.zeros(1, device=src.device)
    return {
        "compact": lambda: ek.take(*ek.compact(keep, [src], out=[dst], backend=backend)),
        "bool_index": lambda: src[keep],
        "nonzero_static": lambda: torch.index_select(
            src, 0, torch.nonzero_static(keep, size=n, fill_value=0).squeeze(1), out=pad),
        "copy": lambda: dst[:kept].copy_(src[:kept]),
        "compact_nosync": lambda: ek.compact(keep, [src], out=[dst], backend=backend),
        "trivial": lambda: one.add_(1),
    }


def compact_inputs(n: int, row_bytes: int, device: torch.device | str,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """src (N, row_bytes / 4) float32 and keep (N,) bool with exactly N // 2 rows kept, at
    scattered positions."""
    src = torch.randn(n, row_bytes // 4, generator=g).to(device)
    keep = (torch.randperm(n, generator=g) < n // 2).to(device)
    return src, keep


def bench_compact(device: torch.device, repeats: int, warmup: int,
                  backend: str | None = None, limit: TimeLimit | None = None
                  ) -> list[dict[str, Any]]:
    flush = CacheFlusher(device)
    resolved = ek.resolve_backend(device, backend)
    limit = TimeLimit() if limit is None else limit
    rows: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    with limit.interruptible():  # a SIGINT ends the loop; the sizes done are kept
        for n, row_bytes in limit.each(list(itertools.product(COMPACT_N, ROW_BYTES)),
                                       "compact sizes"):
            src, keep = compact_inputs(n, row_bytes, device, g)
            kept = n // 2
            dst, pad = torch.empty_like(src), torch.empty_like(src)
            fns = compact_fns(src, keep, dst, pad, kept, backend)
            out = ek.take(*ek.compact(keep, [src], out=[dst], backend=backend))[0]
            assert torch.equal(out, src[keep]), "compact disagrees with x[keep]"
            syncs = {m: count_syncs(fn, device)[0].total for m, fn in fns.items()}
            stats = time_many(fns, warmup=warmup, repeats=repeats, device=device, flush=flush)
            moved = 2.0 * kept * row_bytes
            base = {"n": n, "row_bytes": row_bytes, "kept": kept, "backend": resolved,
                    "runs": repeats}
            t_ours, t_trivial = stats["compact"].median, stats["trivial"].median
            rows += [{**base, "method": m, "p50_us": stats[m].median * 1e6,
                      "p10_us": stats[m].p10 * 1e6, "p90_us": stats[m].p90 * 1e6,
                      "gbps": moved / stats[m].median / 1e9 if m in COMPACT_METHODS else None,
                      "syncs": syncs[m], "ours_over_this": stats[m].median / t_ours,
                      "over_trivial": stats[m].median / t_trivial}
                     for m in (*COMPACT_METHODS, *LAUNCH_METHODS)]
            _log(f"compact N={n:>6} row={row_bytes:>4} B: " + ", ".join(
                f"{m} {stats[m].median * 1e6:.1f} us"
                for m in (*COMPACT_METHODS, *LAUNCH_METHODS)))
    return rows


# ---------------------------------------------------------------------------------------
# exit_score


def eager_exit(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               row_index: torch.Tensor, out_logits: torch.Tensor, out_score: torch.Tensor,
               out_exit: torch.Tensor, threshold: float, k: int) -> torch.Tensor:
    """Plain torch exit: linear, softmax, max-prob score, threshold, and the write of the
    exiting rows' logits / score / exit index at their original positions (no host sync)."""
    logits = F.linear(feats, weight, bias).float()
    p = torch.softmax(logits, dim=1)
    score = p.amax(dim=1)
    leave = score >= threshold
    out_logits[row_index] = torch.where(leave[:, None], logits, out_logits[row_index])
    out_score[row_index] = torch.where(leave, score, out_score[row_index])
    out_exit[row_index] = torch.where(leave, torch.full_like(out_exit[row_index], k),
                                      out_exit[row_index])
    return leave


def exit_inputs(n: int, d: int, c: int, dtype: torch.dtype, device: torch.device | str,
                g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """feats (N, D), weight (C, D) scaled so that max-prob scores spread, bias (C,), all in
    ``dtype``, and row_index (N,) int64, a permutation of the rows."""
    feats = torch.randn(n, d, generator=g).to(device, dtype)
    weight = (torch.randn(c, d, generator=g) * d ** -0.5 * 4).to(device, dtype)
    bias = (torch.randn(c, generator=g) * 0.1).to(device, dtype)
    return feats, weight, bias, torch.randperm(n, generator=g).to(device)


def exit_sizes(device: torch.device) -> list[tuple[int, int, int, torch.dtype]]:
    """(N, D, C, dtype) of the exit_score benchmark: on CUDA the full GPU set, D outermost
    (a run stopped by its time limit has covered whole D = 768 first), on CPU fp32 at D in
    EXIT_D plus one bfloat16 size (a CPU run of the GPU set would take an hour)."""
    if device.type == "cuda":
        return [(n, d, c, dtype) for d, n, c, dtype
                in itertools.product(GPU_EXIT_D, EXIT_N, EXIT_C, GPU_EXIT_DTYPES)]
    sizes = [(n, d, c, torch.float32) for n, d, c in itertools.product(EXIT_N, EXIT_D, EXIT_C)]
    return [*sizes, (*BF16_SIZE, torch.bfloat16)]


def bench_exit_score(device: torch.device, repeats: int, warmup: int,
                     sizes: Sequence[tuple[int, int, int, torch.dtype]] | None = None,
                     use_compile: bool = True, backend: str | None = None,
                     limit: TimeLimit | None = None) -> list[dict[str, Any]]:
    resolved = ek.resolve_backend(device, backend)
    if sizes is None:
        sizes = exit_sizes(device)
    limit = TimeLimit() if limit is None else limit
    rows: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    with limit.interruptible():  # a SIGINT ends the loop; the sizes done are kept
        for n, d, c, dtype in limit.each(list(sizes), "exit_score sizes"):
            feats, weight, bias, row_index = exit_inputs(n, d, c, dtype, device, g)
            ref_logits = ek.reference.exit_logits(feats, weight, bias)
            # ~50% exit; the midpoint of the two middle scores, so that no row sits on it
            mid = torch.softmax(ref_logits, 1).amax(1).sort().values[max(0, n // 2 - 1):n // 2 + 1]
            threshold = float(mid.mean())
            bufs = {m: (torch.zeros(n, c, device=device), torch.zeros(n, device=device),
                        torch.full((n,), -1, dtype=torch.int64, device=device))
                    for m in ("ours_write", "eager", "compile")}
            kw = {"policy": "max_prob", "threshold": threshold, "check_finite": False,
                  "backend": backend}

            def ours_write(b: tuple = bufs["ours_write"], f: torch.Tensor = feats,
                           w: torch.Tensor = weight, bb: torch.Tensor = bias,
                           r: torch.Tensor = row_index, kw: dict = kw) -> object:
                return ek.exit_score_write(f, w, bb, row_index=r, exit_index=1, out_logits=b[0],
                                           out_score=b[1], out_exit=b[2], **kw)

            fns: dict[str, Callable[[], object]] = {
                "ours_write": ours_write,
                "ours_score": (lambda f=feats, w=weight, bb=bias, kw=kw:
                               ek.exit_score(f, w, bb, **kw)),
                "eager": (lambda b=bufs["eager"], f=feats, w=weight, bb=bias, r=row_index,
                          t=threshold: eager_exit(f, w, bb, r, *b, t, 1)),
            }
            compile_s, compile_err = None, None
            if use_compile:
                torch._dynamo.reset()  # one static compile per size, no recompile limit
                compiled = torch.compile(eager_exit)
                cb = bufs["compile"]
                try:
                    t0 = time.perf_counter()
                    compiled(feats, weight, bias, row_index, *cb, threshold, 1)
                    compile_s = time.perf_counter() - t0
                    fns["compile"] = (lambda fn=compiled, b=cb, f=feats, w=weight, bb=bias,
                                      r=row_index, t=threshold: fn(f, w, bb, r, *b, t, 1))
                except Exception as exc:  # record, do not crash
                    compile_err = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            # agreement of ours with every peer that ran (the exits each wrote): the least of them
            for fn in fns.values():
                fn()
            exit_agree = min(float((bufs["ours_write"][2] == bufs[m][2]).float().mean())
                             for m in ("eager", "compile") if m in fns)
            ours_logits = ek.exit_score(feats, weight, bias, **kw).logits
            logit_err = float((ours_logits - F.linear(feats, weight, bias).float()).abs().max())
            syncs = {m: count_syncs(fn, device)[0].total for m, fn in fns.items()}
            stats = time_many(fns, warmup=warmup, repeats=repeats, device=device)
            # launch cost apart from the kernels: host time per call, and on CUDA the time per
            # call replayed from a CUDA graph (no launch overhead)
            host = {m: host_seconds(fns[m], device) for m in ("ours_write", "ours_score")}
            graph = {m: graph_replay_seconds(fns[m], device) for m in ("ours_write", "ours_score")}
            es = feats.element_size()
            moved = es * (n * d + c * d + c) + 4 * n * c + 4 * n + 8 * n
            flops = 2.0 * n * d * c
            base = {"n": n, "d": d, "c": c, "dtype": str(dtype).replace("torch.", ""),
                    "backend": resolved, "runs": repeats, "exit_agree": exit_agree,
                    "max_logit_diff": logit_err}
            t_ours = stats["ours_write"].median
            size_rows = []
            for m in EXIT_METHODS:
                if m not in stats:
                    size_rows.append({**base, "method": m, "error": compile_err or "not run"})
                    continue
                st = stats[m]
                size_rows.append({
                    **base, "method": m, "p50_us": st.median * 1e6, "p10_us": st.p10 * 1e6,
                    "p90_us": st.p90 * 1e6, "gbps": moved / st.median / 1e9,
                    "gflops": flops / st.median / 1e9, "syncs": syncs[m],
                    "ours_over_this": st.median / t_ours,
                    "compile_s": compile_s if m == "compile" else None,
                    "host_us": host[m] * 1e6 if m in host else None,
                    "graph_us": graph[m] * 1e6 if graph.get(m) is not None else None})
            rows += size_rows
            _log(f"exit_score N={n:>4} D={d:>3} C={c:>4} {base['dtype']}: " + ", ".join(
                f"{m} {stats[m].median * 1e6:.1f} us" for m in EXIT_METHODS if m in stats)
                + (f" (compile failed: {compile_err})" if compile_err else ""))
    return rows


# ---------------------------------------------------------------------------------------
# Report.


def _pivot(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = tuple(r[k] for k in keys)
        d = out.setdefault(key, {k: r[k] for k in keys})
        for f in ("p50_us", "p10_us", "p90_us", "gbps", "gflops", "syncs", "ours_over_this",
                  "over_trivial", "compile_s", "error", "exit_agree", "max_logit_diff",
                  "host_us", "graph_us", "bw_fraction"):
            if f in r:
                d[f"{r['method']}:{f}"] = r[f]
        d["backend"] = r["backend"]
    return list(out.values())


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _us(row_method: str) -> Column:
    return _TimeColumn(row_method)


class _TimeColumn(Column):
    """``p50 [p10, p90]`` in microseconds."""

    def __init__(self, method: str) -> None:
        super().__init__(f"{method}:p50_us", f"{method} us p50 [p10, p90]")
        self.method = method

    def render(self, row: dict[str, Any]) -> str:
        m = self.method
        if row.get(f"{m}:p50_us") is None:
            return row.get(f"{m}:error") or "-"
        return (f"{row[f'{m}:p50_us']:.1f} [{row[f'{m}:p10_us']:.1f}, "
                f"{row[f'{m}:p90_us']:.1f}]")


def compact_report(rows: list[dict[str, Any]], device: torch.device, stamp: dict[str, str],
                   suffix: str, notes: list[str]) -> None:
    piv = _pivot(rows, ("n", "row_bytes"))
    secs = [
        Section("Time per call", "Median [p10, p90] of the timed runs, caches flushed before "
                "every run. Host syncs per call are in the next table. compact_nosync = ours "
                "without the count read (take); trivial = one trivial kernel launch "
                "(x.add_(1) on one element).", piv,
                [Column("n", "N"), Column("row_bytes", "row bytes"),
                 *[_us(m) for m in (*COMPACT_METHODS, *LAUNCH_METHODS)]]),
        Section("Ratios and bandwidth",
                "ours/X = t(X) / t(ours) (> 1: ours faster); ours/roofline = t(copy) / t(ours) "
                "(1.0 = as fast as a plain copy of the kept bytes); t(ours) / t(trivial): "
                "ours against one trivial kernel launch (target: <= 1.5x at N <= 256 on a "
                "GPU). GB/s = 2 x kept bytes / median time; % of copy BW = GB/s over the plain "
                "device copy's measured bandwidth (notes).", piv,
                [Column("n", "N"), Column("row_bytes", "row bytes"),
                 Column("bool_index:ours_over_this", "ours/x[keep]", _x),
                 Column("nonzero_static:ours_over_this", "ours/nonzero_static", _x),
                 Column("copy:ours_over_this", "ours/roofline", _x),
                 Column("compact:over_trivial", "t(ours) / t(trivial)", _x),
                 Column("compact_nosync:over_trivial", "t(ours w/o count read) / t(trivial)",
                        _x),
                 *[Column(f"{m}:gbps", f"{m} GB/s", "{:.2f}") for m in COMPACT_METHODS],
                 Column("compact:bw_fraction", "ours % of copy BW", "{:.0%}"),
                 Column("compact:syncs", "syncs: ours"),
                 Column("bool_index:syncs", "x[keep]"),
                 Column("nonzero_static:syncs", "nonzero_static")]),
    ]

    def plot(fig: Any) -> None:
        import numpy as np

        ax = fig.add_subplot(1, 1, 1)
        labels = [f"N={p['n']}\n{p['row_bytes']} B" for p in piv]
        x = np.arange(len(piv))
        width = 0.2
        for i, m in enumerate(COMPACT_METHODS):
            ax.bar(x + (i - 1.5) * width, [p.get(f"{m}:gbps", 0) for p in piv], width,
                   label=m if m != "copy" else "copy (roofline)")
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("GB/s (2 x kept bytes / median time)")
        ax.set_title(f"compact, 50% keep, caches flushed: {stamp['device']}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()

    paths = write_results(f"micro_compact{suffix}", device, title=f"compact microbenchmark "
                          f"({stamp['device']})", sections=secs, csv_rows=rows,
                          notes=notes, plot=plot, stamp=stamp)
    _log("wrote " + ", ".join(str(p) for p in paths.values()))


def exit_report(rows: list[dict[str, Any]], device: torch.device, stamp: dict[str, str],
                suffix: str, notes: list[str]) -> None:
    piv = _pivot(rows, ("n", "d", "c", "dtype"))
    for p in piv:
        p["exit_agree"] = p.get("ours_write:exit_agree")
        p["max_logit_diff"] = p.get("ours_write:max_logit_diff")
    secs = [
        Section("Time per call", "Median [p10, p90] of the timed runs (no cache flush). "
                "ours_write = exit_score_write (the engine's op: score + result write), "
                "ours_score = exit_score (no write); eager and compile include the write.", piv,
                [Column("n", "N"), Column("d", "D"), Column("c", "C"), Column("dtype", "dtype"),
                 *[_us(m) for m in EXIT_METHODS], Column("compile:compile_s", "compile s",
                                                         "{:.1f}")]),
        Section("Ratios and throughput",
                "ours/X = t(X) / t(ours_write) (> 1: ours faster). GB/s = compulsory bytes "
                "(feats, weight, bias read; logits, score, exit written) / median time, "
                "% of copy BW the same over the measured device-copy bandwidth (notes); "
                "GFLOP/s = 2NDC / median time. 'agree' = fraction of rows whose written exit "
                "equals eager's and torch.compile's (the lower of the two); 'max diff' = "
                "max |logits(ours) - F.linear logits| (plain torch in the same dtype).", piv,
                [Column("n", "N"), Column("d", "D"), Column("c", "C"), Column("dtype", "dtype"),
                 Column("eager:ours_over_this", "ours/eager", _x),
                 Column("compile:ours_over_this", "ours/compile", _x),
                 Column("ours_write:gbps", "ours GB/s", "{:.2f}"),
                 Column("ours_write:bw_fraction", "ours % of copy BW", "{:.0%}"),
                 Column("ours_write:gflops", "ours GFLOP/s", "{:.1f}"),
                 Column("eager:gflops", "eager GFLOP/s", "{:.1f}"),
                 Column("compile:gflops", "compile GFLOP/s", "{:.1f}"),
                 Column("exit_agree", "agree", "{:.3f}"),
                 Column("max_logit_diff", "max diff", "{:.1e}")]),
        Section("Launch cost: host time per call and CUDA-graph replay",
                "host us = median time the host spends inside one call, the device not "
                "awaited (the front-end's checks, the dispatcher and the launches); on a CPU "
                "the kernels run inside the call, so it is the call's time. graph us = time "
                "per call of 20 calls captured in one CUDA graph and replayed (CUDA events): "
                "the device time without launch overhead (CUDA only). A host time above the "
                "call's device time means the GPU waits for the host at that size.", piv,
                [Column("n", "N"), Column("d", "D"), Column("c", "C"), Column("dtype", "dtype"),
                 Column("ours_write:p50_us", "ours_write us", "{:.1f}"),
                 Column("ours_write:host_us", "ours_write host us", "{:.1f}"),
                 Column("ours_write:graph_us", "ours_write graph us", "{:.1f}"),
                 Column("ours_score:host_us", "ours_score host us", "{:.1f}"),
                 Column("ours_score:graph_us", "ours_score graph us", "{:.1f}")]),
    ]

    def plot(fig: Any) -> None:
        import numpy as np

        ax = fig.add_subplot(1, 1, 1)
        labels = [f"{p['n']}x{p['d']}x{p['c']}\n{p['dtype']}" for p in piv]
        x = np.arange(len(piv))
        width = 0.4
        for i, m in enumerate(("eager", "compile")):
            ax.bar(x + (i - 0.5) * width, [p.get(f"{m}:ours_over_this") or 0 for p in piv],
                   width, label=f"ours/{m}")
        ax.axhline(1.0, color="0.3", lw=0.8)
        ax.set_xticks(x, labels, fontsize=6, rotation=60)
        ax.set_ylabel("t(X) / t(ours exit_score_write)")
        ax.set_title(f"exit_score (N x D x C): ours vs torch eager / torch.compile: "
                     f"{stamp['device']}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()

    paths = write_results(f"micro_exit_score{suffix}", device, title=f"exit_score microbenchmark "
                          f"({stamp['device']})", sections=secs, csv_rows=rows, notes=notes,
                          plot=plot, stamp=stamp)
    _log("wrote " + ", ".join(str(p) for p in paths.values()))


# ---------------------------------------------------------------------------------------
# Entry point.


def _with_bandwidth_fraction(rows: list[dict[str, Any]], peak_gbps: float
                             ) -> list[dict[str, Any]]:
    """Each timed row with ``bw_fraction``, its GB/s over the measured copy bandwidth."""
    for row in rows:
        if row.get("gbps") is not None:
            row["bw_fraction"] = row["gbps"] / peak_gbps
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (default 1: stable on a shared host; 0 = "
                         "torch's default)")
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", choices=("compact", "exit_score"), default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--backend", default="auto", choices=ek.BACKENDS,
                    help="backend of ours (results get a _<backend> suffix unless auto)")
    add_time_limit_argument(ap, "size")
    args = ap.parse_args(argv)
    limit = TimeLimit(args.time_limit)
    if cuda_missing("bench.micro", args.device):
        return 2
    device = torch.device(args.device)
    set_cpu_threads(args.threads, device)
    stamp = environment(device)
    suffix = "" if args.backend == "auto" else f"_{args.backend}"
    try:
        ek.resolve_backend(device, args.backend)
    except RuntimeError as exc:
        print(f"bench.micro: {exc}", file=sys.stderr)
        return 2
    common = [
        f"backend of ours: '{args.backend}' = '{ek.resolve_backend(device, args.backend)}' on "
        f"{device.type} (compiled kernels for compact: {ek.compiled_backends('compact_out')}, "
        f"exit_score: {ek.compiled_backends('exit_score_write')}).",
        f"{args.repeats} timed runs after {args.warmup} warm-up runs per method and size; "
        "methods interleaved run by run; median [p10, p90].",
        "host syncs = aten::_local_scalar_dense + aten::nonzero events of one profiled call "
        "(CPU; bench/README.md).",
        f"machine: {os.cpu_count()} logical cores, shared with other work at times; torch "
        f"intra-op threads: {torch.get_num_threads()} (--threads; bench/README.md).",
    ]
    peak = copy_bandwidth(device)
    common.append(f"copy bandwidth (the '% of copy BW' reference): a plain device copy of "
                  f"{copy_bandwidth_bytes(device) >> 20} MiB reaches "
                  f"{peak:.1f} GB/s (read + write), measured in this run.")
    if args.only in (None, "compact"):
        start = time.perf_counter()
        rows = _with_bandwidth_fraction(
            bench_compact(device, args.repeats, args.warmup, args.backend, limit), peak)
        if rows:
            compact_report(rows, device, stamp, suffix, [
                "N rows of `row bytes` float32 each, exactly 50% kept at scattered positions; "
                f"caches flushed before every run ({CacheFlusher(device).nbytes >> 20} MiB "
                "read-modify-write).",
                "nonzero_static uses size=N (sync-free without knowing the count), so it "
                "gathers N rows, twice the kept bytes.",
                *common, *limit.notes(),
                f"{load_note()}; wall time {time.perf_counter() - start:.0f} s."])
    if args.only in (None, "exit_score"):
        start = time.perf_counter()
        rows = _with_bandwidth_fraction(
            bench_exit_score(device, args.repeats, args.warmup, use_compile=not args.no_compile,
                             backend=args.backend, limit=limit), peak)
        errors = sorted({r["error"] for r in rows if r.get("error")})
        if rows:
            exit_report(rows, device, stamp, suffix, [
                "feats (N, D), weight (C, D) scaled so that max-prob scores spread; threshold "
                "= median score (about half the rows exit); row_index a permutation of the N "
                "rows.",
                "torch.compile: mode default, one static compile per size "
                "(torch._dynamo.reset() between sizes); 'compile s' = the first call's wall "
                "time." + (f" Failures: {errors}" if errors else ""),
                *common, *limit.notes(),
                f"{load_note()}; wall time {time.perf_counter() - start:.0f} s."])
    for note in limit.notes():
        _log(f"bench.micro: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
