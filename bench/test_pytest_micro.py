"""The CPU microbenchmarks in pytest-benchmark form, for tracking across commits
(``--benchmark-autosave`` / ``--benchmark-compare``): the same functions as
:mod:`bench.micro`, a few sizes each, one intra-op thread. Not part of ``make test``.

    make bench-pytest        # = pytest bench/test_pytest_micro.py --benchmark-only

pytest-benchmark times one function at a time; the interleaved ratios (ours vs eager vs
compile vs the copy roofline, measured under the same load) are ``python -m bench.micro``'s
job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

import eenet_kernels as ek

from .micro import compact_fns, compact_inputs, eager_exit, exit_inputs

pytest.importorskip("pytest_benchmark")

COMPACT_SIZES = ((256, 512), (65536, 64), (8192, 4096))  # (N, row bytes)
EXIT_SIZES = ((512, 768, 100), (4096, 256, 1000))       # (N, D, C), float32


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", ("compact", "bool_index", "nonzero_static", "copy"))
@pytest.mark.parametrize(("n", "row_bytes"), COMPACT_SIZES, ids=lambda v: str(v))
def test_compact(benchmark: Callable, n: int, row_bytes: int, method: str) -> None:
    benchmark.group = f"compact N={n} row={row_bytes}B"
    src, keep = compact_inputs(n, row_bytes, "cpu", torch.Generator().manual_seed(0))
    dst, pad = torch.empty_like(src), torch.empty_like(src)
    fn = compact_fns(src, keep, dst, pad, n // 2)[method]
    benchmark(fn)
    if method == "compact":
        assert torch.equal(dst[: n // 2], src[keep])


@pytest.mark.parametrize("method", ("ours_write", "eager"))
@pytest.mark.parametrize(("n", "d", "c"), EXIT_SIZES, ids=lambda v: str(v))
def test_exit_score(benchmark: Callable, n: int, d: int, c: int, method: str) -> None:
    benchmark.group = f"exit_score {n}x{d}x{c}"
    feats, weight, bias, rows = exit_inputs(n, d, c, torch.float32, "cpu",
                                            torch.Generator().manual_seed(0))
    bufs = (torch.zeros(n, c), torch.zeros(n), torch.full((n,), -1, dtype=torch.int64))
    if method == "ours_write":
        benchmark(lambda: ek.exit_score_write(
            feats, weight, bias, row_index=rows, exit_index=1, out_logits=bufs[0],
            out_score=bufs[1], out_exit=bufs[2], policy="max_prob", threshold=0.5,
            check_finite=False))
    else:
        benchmark(lambda: eager_exit(feats, weight, bias, rows, *bufs, 0.5, 1))
    assert bool((bufs[2] == 1).any())
