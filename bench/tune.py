"""Launch-configuration sweep of the Triton kernels on a GPU: how far the built-in choices
(``eenet_kernels.triton.exit_score.block_sizes``, ``...compact.launch_config``) are from the
best of a grid of candidates, size by size, measured in one run.

exit_score: (BLOCK_N, BLOCK_C, BLOCK_D, num_warps, class-split chunk) over a grid, at the
micro benchmark's GPU sizes (or ``--quick``: a few of them), max-prob policy with the result
write, the dtype's feats. compact: BLOCK_R and rows per program for 50% kept rows of 64 /
512 / 4096 bytes.

Every candidate of one size is timed interleaved with the built-in choice
(``bench.runner.time_many``, CUDA events); results in ``bench/results/<gpu>/tune_*.md`` /
``.csv`` with the built-in time, the best candidate and ``builtin/best`` (1.0: the built-in
choice is the best found). Candidates that fail to compile or run (too many registers or
too much shared memory) are listed as errors. Run ``python -m bench.tune [--quick]``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from eenet.runtime.timing import synchronize
from eenet_kernels.triton import compact as triton_compact
from eenet_kernels.triton import exit_score as triton_exit
from eenet_kernels.triton import interpreting

from . import micro
from .runner import (
    Column,
    Section,
    cuda_missing,
    environment,
    load_note,
    time_many,
    write_results,
)

BLOCK_N = (16, 32, 64, 128)
BLOCK_C = (16, 32, 64, 128, 256)
BLOCK_D = (32, 64, 128)
WARPS = (4, 8)
CHUNK_TILES = (0, 1, 2, 4)
COMPACT_BLOCK_R = (16, 32, 64, 128, 256)
COMPACT_PROGRAMS_PER_SM = (1, 2, 4, 8)
QUICK_EXIT_SIZES = ((64, 768, 1000), (512, 768, 100), (4096, 2048, 1000), (4096, 256, 10))

Config = tuple[int, ...]


def exit_candidates(n: int, c: int) -> list[Config]:
    """(BLOCK_N, BLOCK_C, BLOCK_D, warps, chunk tiles) worth trying: no tile wider than the
    problem; chunk tiles 0 = all classes in one launch, k = the classes split into chunks of k
    BLOCK_C tiles (two launches), only where that makes more than one chunk."""
    cap_c = max(16, 1 << (c - 1).bit_length())
    cap_n = max(16, 1 << (n - 1).bit_length())
    return [(*cfg, k) for cfg in itertools.product(BLOCK_N, BLOCK_C, BLOCK_D, WARPS)
            if cfg[0] <= cap_n and cfg[1] <= cap_c and cfg[0] * cfg[1] <= 16384
            for k in CHUNK_TILES if k == 0 or k * cfg[1] < c]


def _exit_call(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               threshold: float, bufs: Sequence[torch.Tensor], rows: torch.Tensor,
               cfg: Config | None) -> Callable[[], object]:
    """One write-variant launch with ``cfg`` forced (None: the built-in choice)."""
    builtin_blocks, builtin_chunk = triton_exit.block_sizes, triton_exit.class_chunk

    def call() -> object:
        if cfg is not None:
            triton_exit.block_sizes = lambda *a, **k: cfg[:4]
            triton_exit.class_chunk = lambda row_tiles, c, block_c, sms: (
                cfg[4] * block_c if cfg[4] else c)
        try:
            return triton_exit.launch(feats, weight, bias, "max_prob", threshold,
                                      write=(rows, 0, *bufs))
        finally:
            triton_exit.block_sizes, triton_exit.class_chunk = builtin_blocks, builtin_chunk
    return call


def tune_exit_score(sizes: Sequence[tuple[int, int, int, torch.dtype]], repeats: int,
                    warmup: int, device: str = "cuda"
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per size: the built-in choice and the best candidate; and every candidate's time.
    (``device="cpu"`` runs the sweep under the Triton interpreter, for tests.)"""
    summary, every = [], []
    g = torch.Generator().manual_seed(0)
    for n, d, c, dtype in sizes:
        feats, weight, bias, rows = micro.exit_inputs(n, d, c, dtype, device, g)
        bufs = (torch.zeros(n, c, device=device), torch.zeros(n, device=device),
                torch.zeros(n, dtype=torch.int64, device=device))
        blocks = triton_exit.block_sizes(n, d, c, dtype, False)
        chunk = triton_exit.class_chunk(-(-n // blocks[0]), c, blocks[1],
                                        torch.cuda.get_device_properties(device)
                                        .multi_processor_count if device == "cuda" else None)
        builtin = (*blocks, 0 if chunk >= c else chunk // blocks[1])
        fns: dict[str, Callable[[], object]] = {"builtin": _exit_call(
            feats, weight, bias, 0.5, bufs, rows, None)}
        errors: dict[str, str] = {}
        for cfg in exit_candidates(n, c):
            name = "x".join(map(str, cfg))
            fn = _exit_call(feats, weight, bias, 0.5, bufs, rows, cfg)
            try:
                fn()
                synchronize(device)
            except Exception as exc:  # a candidate that cannot compile or run is a result
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                continue
            fns[name] = fn
        stats = time_many(fns, warmup=warmup, repeats=repeats, device=device)
        for name, st in stats.items():
            every.append({"n": n, "d": d, "c": c, "dtype": str(dtype).removeprefix("torch."),
                          "config": name, "us": st.median * 1e6})
        every += [{"n": n, "d": d, "c": c, "dtype": str(dtype).removeprefix("torch."),
                   "config": name, "error": err} for name, err in errors.items()]
        best = min((k for k in stats if k != "builtin"), key=lambda k: stats[k].median)
        summary.append({"n": n, "d": d, "c": c, "dtype": str(dtype).removeprefix("torch."),
                        "builtin": "x".join(map(str, builtin)),
                        "builtin_us": stats["builtin"].median * 1e6, "best": best,
                        "best_us": stats[best].median * 1e6,
                        "ratio": stats["builtin"].median / stats[best].median,
                        "failed": len(errors)})
        print(f"[exit_score] {n}x{d}x{c} {dtype}: builtin {summary[-1]['builtin']} "
              f"{summary[-1]['builtin_us']:.1f} us, best {best} {summary[-1]['best_us']:.1f} us",
              flush=True)
    return summary, every


def _compact_call(keep: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                  count: torch.Tensor, block_r: int | None, rows_per_prog: int | None
                  ) -> Callable[[], object]:
    """One compact_out launch with BLOCK_R and rows per program forced (None: built-in)."""
    return lambda: triton_compact.launch(keep, [src], [dst], count, False, block_r=block_r,
                                         rows_per_prog=rows_per_prog)


def tune_compact(ns: Sequence[int], row_bytes: Sequence[int], repeats: int, warmup: int,
                 device: str = "cuda") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per size: BLOCK_R x programs-per-SM candidates against the built-in launch config.
    (``device="cpu"`` runs the sweep under the Triton interpreter, for tests.)"""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device == "cuda" else 1)
    summary, every = [], []
    g = torch.Generator().manual_seed(1)
    for n, rb in itertools.product(ns, row_bytes):
        src, keep = micro.compact_inputs(n, rb, device, g)
        dst = torch.empty_like(src)
        count = torch.zeros((), dtype=torch.int64, device=device)
        fns: dict[str, Callable[[], object]] = {
            "builtin": _compact_call(keep, src, dst, count, None, None)}
        for br, per_sm in itertools.product(COMPACT_BLOCK_R, COMPACT_PROGRAMS_PER_SM):
            tiles = -(-n // br)
            rpp = -(-tiles // min(tiles, per_sm * sms)) * br
            fns.setdefault(f"{br}x{rpp}", _compact_call(keep, src, dst, count, br, rpp))
        stats = time_many(fns, warmup=warmup, repeats=repeats, device=device)
        kept_bytes = int(keep.sum()) * rb
        for name, st in stats.items():
            every.append({"n": n, "row_bytes": rb, "config": name, "us": st.median * 1e6,
                          "gbps": 2 * kept_bytes / st.median / 1e9})
        best = min((k for k in stats if k != "builtin"), key=lambda k: stats[k].median)
        summary.append({"n": n, "row_bytes": rb, "builtin_us": stats["builtin"].median * 1e6,
                        "best": best, "best_us": stats[best].median * 1e6,
                        "ratio": stats["builtin"].median / stats[best].median,
                        "best_gbps": 2 * kept_bytes / stats[best].median / 1e9})
        print(f"[compact] N={n} row {rb} B: builtin {summary[-1]['builtin_us']:.1f} us, best "
              f"{best} {summary[-1]['best_us']:.1f} us", flush=True)
    return summary, every


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few sizes only")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", choices=("compact", "exit_score"), default=None)
    args = ap.parse_args(argv)
    if cuda_missing("bench.tune", "cuda"):
        return 2
    if interpreting():
        print("bench.tune: unset TRITON_INTERPRET: the sweep times compiled kernels")
        return 2
    device = torch.device("cuda")
    stamp = environment(device)
    notes = [f"{args.repeats} timed runs after {args.warmup} warm-up runs, candidates "
             "interleaved with the built-in choice; median times."]
    if args.only in (None, "exit_score"):
        start = time.perf_counter()
        sizes = ([(n, d, c, dt) for (n, d, c), dt in itertools.product(
            QUICK_EXIT_SIZES, micro.GPU_EXIT_DTYPES)] if args.quick
            else micro.exit_sizes(device))
        summary, every = tune_exit_score(sizes, args.repeats, args.warmup)
        write_results("tune_exit_score", device, title="exit_score launch-config sweep",
                      sections=[Section("Built-in choice vs best candidate", "config = "
                                        "BLOCK_N x BLOCK_C x BLOCK_D x num_warps x chunk "
                                        "tiles (0: one launch, k: classes split in chunks "
                                        "of k BLOCK_C tiles, two launches).", summary, [
                          Column("n", "N"), Column("d", "D"), Column("c", "C"),
                          Column("dtype", "dtype"), Column("builtin", "built-in"),
                          Column("builtin_us", "built-in us", "{:.1f}"),
                          Column("best", "best"), Column("best_us", "best us", "{:.1f}"),
                          Column("ratio", "built-in/best", "{:.2f}x"),
                          Column("failed", "failed candidates")])],
                      csv_rows=every, stamp=stamp,
                      notes=[*notes, f"{load_note()}; wall time "
                             f"{time.perf_counter() - start:.0f} s."])
    if args.only in (None, "compact"):
        start = time.perf_counter()
        ns = (8192, 65536) if args.quick else micro.COMPACT_N
        summary, every = tune_compact(ns, micro.ROW_BYTES, args.repeats, args.warmup)
        write_results("tune_compact", device, title="compact launch-config sweep",
                      sections=[Section("Built-in choice vs best candidate", "config = BLOCK_R "
                                        "x rows per program.", summary, [
                          Column("n", "N"), Column("row_bytes", "row bytes"),
                          Column("builtin_us", "built-in us", "{:.1f}"),
                          Column("best", "best"), Column("best_us", "best us", "{:.1f}"),
                          Column("ratio", "built-in/best", "{:.2f}x"),
                          Column("best_gbps", "best GB/s", "{:.0f}")])],
                      csv_rows=every, stamp=stamp,
                      notes=[*notes, f"{load_note()}; wall time "
                             f"{time.perf_counter() - start:.0f} s."])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
