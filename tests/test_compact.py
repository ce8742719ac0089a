"""Tests of ``eenet_kernels.compact``: stable multi-tensor stream compaction.

Every backend, the reference included, is checked against the plain-torch expectation, not
against another backend: ``t[keep]`` in the first n rows, then zeros (functional form, new
buffers) or the caller's untouched rows (out form). A pairwise-sampled grid
(``conftest.pairwise_cases``) of sizes (N = 0, 1, odd, 1000), mask kinds (all, none, random,
one row, non-zero bytes other than 1), forms and tail lengths runs many dtypes, ranks and
non-contiguous layouts in one call; fixed cases cover strided masks, chunked threads, empty
lists and zero-byte rows; hypothesis properties (derandomized, a fixed example budget per
backend) check stability, the count, idempotence, composition and ``t[keep]`` on random
masks, shapes and dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import (
    ALL_BACKENDS,
    assert_covers,
    backend_param,
    intra_op_threads,
    pairwise_cases,
    product_seeds,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eenet_kernels as ek

SIZES = (0, 1, 7, 64, 1000)
MASK_KINDS = ("all_true", "all_false", "random", "single", "bytes")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool,
          torch.uint8)
LAYOUTS = ("contiguous", "transposed", "strided")
TAILS: tuple[tuple[int, ...], ...] = ((), (3,), (5, 7))
SENTINEL = {torch.float32: -7.25, torch.float16: -7.25, torch.bfloat16: -7.25,
            torch.int32: -123456, torch.int64: -(2**40), torch.bool: True, torch.uint8: 0xAB}

# hypothesis examples per backend (the Triton interpreter costs ~50 ms a call)
PROPERTY_BUDGET = {"reference": 15, "cpp": 50, "triton": 15}


def property_settings(backend: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Derandomized hypothesis settings with the backend's example budget."""
    return settings(max_examples=PROPERTY_BUDGET[backend], derandomize=True, database=None,
                    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                          HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# Helpers.


def random_values(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator
                  ) -> torch.Tensor:
    """Random values of ``dtype``; floats are never zero, so zero-filling is observable."""
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=gen)
        return (x + torch.where(x >= 0, 0.5, -0.5)).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype == torch.uint8:
        return torch.randint(1, 256, shape, generator=gen).to(dtype)
    return torch.randint(1, 1000, shape, generator=gen).to(dtype)


def make_src(n: int, dtype: torch.dtype, tail: tuple[int, ...], layout: str,
             gen: torch.Generator) -> torch.Tensor:
    """A (n, *tail) tensor laid out as asked: contiguous, a transposed view or a strided slice."""
    if layout == "transposed" and tail:
        t = random_values((*tail, n), dtype, gen).movedim(-1, 0)
    elif layout in ("transposed", "strided"):
        t = random_values((2 * n, *tail), dtype, gen)[::2]
    else:
        t = random_values((n, *tail), dtype, gen)
    assert t.shape == (n, *tail)
    return t


def mixed_tensors(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Many dtypes, ranks and layouts, including non-contiguous ones, for one call."""
    gen = torch.Generator().manual_seed(seed)
    ts = [
        make_src(n, torch.float32, (), "contiguous", gen),
        make_src(n, torch.float16, (3,), "contiguous", gen),
        make_src(n, torch.bfloat16, (5, 7), "contiguous", gen),
        make_src(n, torch.int32, (3,), "contiguous", gen),
        make_src(n, torch.int64, (), "contiguous", gen),
        make_src(n, torch.bool, (5, 7), "contiguous", gen),
        make_src(n, torch.uint8, (3,), "contiguous", gen),
        make_src(n, torch.float32, (3,), "transposed", gen),
        make_src(n, torch.int64, (5, 7), "transposed", gen),
        make_src(n, torch.bfloat16, (3,), "strided", gen),
        make_src(n, torch.uint8, (), "strided", gen),
    ]
    if n > 1:
        assert any(not t.is_contiguous() for t in ts)
    return ts


def make_mask(n: int, kind: str, seed: int = 1) -> torch.Tensor:
    """(n,) bool mask of the given kind; ``single`` keeps one row in the middle; ``bytes``: a
    random mask whose true bytes are 1, 2, 127 or 255 (any non-zero byte is true)."""
    if kind == "all_true":
        return torch.ones(n, dtype=torch.bool)
    if kind == "all_false":
        return torch.zeros(n, dtype=torch.bool)
    if kind in ("random", "bytes"):
        gen = torch.Generator().manual_seed(seed)
        keep = torch.rand(n, generator=gen) < 0.5
        if kind == "random":
            return keep
        values = torch.tensor([1, 2, 127, 255], dtype=torch.uint8)
        raw = values[torch.randint(0, 4, (n,), generator=gen)] * keep.to(torch.uint8)
        return raw.view(torch.bool)
    keep = torch.zeros(n, dtype=torch.bool)
    if n:
        keep[n // 2] = True
    return keep


def truth(keep: torch.Tensor) -> torch.Tensor:
    """The mask as plain torch reads it: every non-zero byte is true."""
    return keep.view(torch.uint8) != 0


def expected_functional(keep: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Plain-torch expectation of the functional form: kept rows first, then zeros."""
    out = torch.zeros(t.shape, dtype=t.dtype)
    kept = t[truth(keep)]
    out[: kept.shape[0]] = kept
    return out


def sentinel_like(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A contiguous (rows, ...) buffer of t's dtype filled with that dtype's sentinel."""
    return torch.full((rows, *t.shape[1:]), SENTINEL[t.dtype], dtype=t.dtype)


def assert_count(count: torch.Tensor, keep: torch.Tensor) -> None:
    """count is a 0-dim int64 tensor on keep's device equal to keep.sum()."""
    assert isinstance(count, torch.Tensor)
    assert count.dim() == 0
    assert count.dtype == torch.int64
    assert count.device == keep.device
    assert int(count) == int(truth(keep).sum())


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bitwise equality of dtype, shape and values."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got, want), f"{what}: values differ"


# ---------------------------------------------------------------------------------------
# The sampled grid: many tensors in one call, both forms.

GRID_AXES: dict[str, tuple[Any, ...]] = {
    "backend": ALL_BACKENDS,
    "form": ("functional", "out"),
    "n": SIZES,
    "kind": MASK_KINDS,
    "extra_rows": (0, 3),
}


def _feasible(row: dict[str, Any]) -> bool:
    """The Triton interpreter keeps to N <= 64 (~1 s at N = 1000 with these tensors)."""
    return not (row.get("backend") == "triton" and row.get("n", 0) > 64)


GRID = pairwise_cases(GRID_AXES, product_seeds(GRID_AXES, ("backend", "form", "kind")),
                      _feasible)


def _grid_id(row: dict[str, Any]) -> str:
    return f"{row['backend']}-{row['form']}-N{row['n']}-{row['kind']}-extra{row['extra_rows']}"


def test_grid_covers_every_value_and_pair() -> None:
    assert_covers(GRID, GRID_AXES, ("backend", "form", "kind"), _feasible)


@pytest.mark.parametrize("row", [pytest.param(r, id=_grid_id(r),
                                              marks=backend_param(r["backend"]).marks)
                                 for r in GRID])
def test_compact_matches_boolean_index(row: dict[str, Any]) -> None:
    """Functional form: new full-size contiguous buffers, kept rows first in order, rows >= n
    zero. Out form: the caller's buffers, returned as they are, first n rows the kept rows,
    rows >= n keep their sentinel. The inputs are never modified."""
    backend, n, form = row["backend"], row["n"], row["form"]
    src = mixed_tensors(n, seed=n + len(form))
    before = [t.clone() for t in src]
    keep = make_mask(n, row["kind"], seed=n + 3)
    m = int(truth(keep).sum())
    if form == "functional":
        kept, count = ek.compact(keep, src, backend=backend)
        assert isinstance(kept, list) and len(kept) == len(src)
        for i, (k, s) in enumerate(zip(kept, src, strict=True)):
            assert k.is_contiguous(), f"kept[{i}] is not contiguous"
            assert k.device == s.device
            assert_same(k, expected_functional(keep, s), f"kept[{i}] vs t[keep]")
            if s.numel():
                assert k.data_ptr() != s.data_ptr(), f"kept[{i}] aliases its input"
    else:
        rows = n + row["extra_rows"]
        dst = [sentinel_like(t, rows) for t in src]
        ptrs = [d.data_ptr() for d in dst]
        result, count = ek.compact(keep, src, out=dst, backend=backend)
        assert len(result) == len(dst)
        for i, (r, d, s) in enumerate(zip(result, dst, src, strict=True)):
            assert r is d, f"out[{i}] is not returned as is"
            assert d.data_ptr() == ptrs[i]
            assert_same(d[:m], s[truth(keep)], f"dst[{i}][:n] vs t[keep]")
            assert_same(d[m:], sentinel_like(s, rows - m), f"dst[{i}][n:] sentinel")
    assert_count(count, keep)
    for i, (s, b) in enumerate(zip(src, before, strict=True)):
        assert_same(s, b, f"src[{i}] was modified")


# ---------------------------------------------------------------------------------------
# Fixed cases.


def test_noncontiguous_keep(any_backend: str) -> None:
    """A strided keep mask is read by position, not by storage."""
    src = mixed_tensors(50, seed=4)
    big = make_mask(100, "random", seed=5)
    keep = big[::2]
    assert not keep.is_contiguous()
    kept, count = ek.compact(keep, src, backend=any_backend)
    assert_count(count, keep)
    for i, (k, s) in enumerate(zip(kept, src, strict=True)):
        assert_same(k, expected_functional(keep.contiguous(), s), f"kept[{i}]")


@pytest.mark.parametrize("backend", [backend_param("cpp")])
def test_many_chunks(backend: str) -> None:
    """Enough rows and row bytes that the C++ kernel splits the work into chunks, run on two
    threads."""
    gen = torch.Generator().manual_seed(6)
    n = 4096
    src = [random_values((n, 64), torch.float32, gen), torch.arange(n)]
    keep = torch.rand(n, generator=gen) < 0.3
    with intra_op_threads(2):
        kept, count = ek.compact(keep, src, backend=backend)
    assert_count(count, keep)
    assert_same(kept[0], expected_functional(keep, src[0]), "rows")
    assert_same(kept[1][: int(count)], keep.nonzero().flatten(), "indices")


def test_empty_tensor_list(any_backend: str) -> None:
    """No tensors at all: only the count comes back."""
    keep = make_mask(7, "random")
    kept, count = ek.compact(keep, [], backend=any_backend)
    assert kept == []
    assert_count(count, keep)
    dst, count = ek.compact(keep, [], out=[], backend=any_backend)
    assert dst == []
    assert_count(count, keep)


def test_zero_width_rows(any_backend: str) -> None:
    """Rows of zero bytes, e.g. shape (N, 0), compact to (N, 0) buffers."""
    keep = make_mask(9, "random")
    src = [torch.empty(9, 0), torch.arange(9)]
    kept, count = ek.compact(keep, src, backend=any_backend)
    assert_count(count, keep)
    assert kept[0].shape == (9, 0)
    assert_same(kept[1], expected_functional(keep, src[1]), "kept[1]")


def test_out_form_same_dst_reused(any_backend: str) -> None:
    """Compacting twice into the same buffers overwrites only the first n rows each time."""
    src = [torch.arange(10) * 10]
    dst = [torch.full((12,), -1, dtype=torch.int64)]
    keep_a = torch.tensor([True] * 6 + [False] * 4)
    keep_b = torch.tensor([False, True] + [False] * 8)
    ek.compact(keep_a, src, out=dst, backend=any_backend)
    _, count = ek.compact(keep_b, src, out=dst, backend=any_backend)
    assert int(count) == 1
    assert dst[0].tolist() == [10, 10, 20, 30, 40, 50, -1, -1, -1, -1, -1, -1]


# ---------------------------------------------------------------------------------------
# Property-based tests.


@st.composite
def masks(draw: st.DrawFn, max_size: int = 120) -> torch.Tensor:
    """(N,) bool masks, N in [0, max_size]."""
    bits = draw(st.lists(st.booleans(), max_size=max_size))
    return torch.tensor(bits, dtype=torch.bool).reshape(len(bits))


@st.composite
def tensor_specs(draw: st.DrawFn) -> list[tuple[torch.dtype, tuple[int, ...], str]]:
    """1 to 3 (dtype, trailing shape, layout) triples."""
    spec = st.tuples(st.sampled_from(DTYPES), st.sampled_from(TAILS), st.sampled_from(LAYOUTS))
    return draw(st.lists(spec, min_size=1, max_size=3))


def build(n: int, specs: list[tuple[torch.dtype, tuple[int, ...], str]], seed: int
          ) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [make_src(n, dtype, tail, layout, gen) for dtype, tail, layout in specs]


def test_property_stable_and_count(any_backend: str) -> None:
    """The kept rows of an arange are strictly increasing and equal keep.nonzero()."""

    @property_settings(any_backend)
    @given(keep=masks())
    def check(keep: torch.Tensor) -> None:
        n = keep.shape[0]
        kept, count = ek.compact(keep, [torch.arange(n), torch.arange(n, dtype=torch.int32)],
                                 backend=any_backend)
        assert_count(count, keep)
        m = int(count)
        idx = kept[0][:m]
        assert bool((idx[1:] > idx[:-1]).all())
        assert_same(idx, keep.nonzero().flatten(), "kept indices")
        assert_same(kept[1][:m], idx.int(), "int32 indices")
        assert not bool(kept[0][m:].any())

    check()


def test_property_idempotent(any_backend: str) -> None:
    """Compacting the result again with its first n rows kept changes nothing."""

    @property_settings(any_backend)
    @given(keep=masks(), specs=tensor_specs(), seed=st.integers(0, 2**31 - 1))
    def check(keep: torch.Tensor, specs: list[tuple[torch.dtype, tuple[int, ...], str]],
              seed: int) -> None:
        n = keep.shape[0]
        src = build(n, specs, seed)
        kept, count = ek.compact(keep, src, backend=any_backend)
        again_keep = torch.arange(n) < int(count)
        again, again_count = ek.compact(again_keep, kept, backend=any_backend)
        assert int(again_count) == int(count)
        for i, (a, k) in enumerate(zip(again, kept, strict=True)):
            assert_same(a, k, f"tensor {i}")

    check()


def test_property_composition(any_backend: str) -> None:
    """compact(b) after compact(a) on the survivors == compact(a & b lifted to all rows)."""

    @property_settings(any_backend)
    @given(keep_a=masks(), specs=tensor_specs(), seed=st.integers(0, 2**31 - 1),
           data=st.data())
    def check(keep_a: torch.Tensor, specs: list[tuple[torch.dtype, tuple[int, ...], str]],
              seed: int, data: st.DataObject) -> None:
        n = keep_a.shape[0]
        src = build(n, specs, seed)
        kept_a, count_a = ek.compact(keep_a, src, backend=any_backend)
        na = int(count_a)
        bits = data.draw(st.lists(st.booleans(), min_size=na, max_size=na), label="keep_b")
        keep_b = torch.tensor(bits, dtype=torch.bool).reshape(na)
        kept_ab, count_ab = ek.compact(keep_b, [t[:na] for t in kept_a], backend=any_backend)
        combined = keep_a.clone()
        combined[keep_a] = keep_b
        kept_c, count_c = ek.compact(combined, src, backend=any_backend)
        assert int(count_ab) == int(count_c) == int(combined.sum())
        m = int(count_c)
        for i, (ab, c) in enumerate(zip(kept_ab, kept_c, strict=True)):
            assert_same(ab[:m], c[:m], f"tensor {i}")

    check()


def test_property_matches_boolean_index(any_backend: str) -> None:
    """Both forms equal t[keep] (then zeros / the untouched tail) for random masks, shapes,
    dtypes and layouts."""

    @property_settings(any_backend)
    @given(keep=masks(), specs=tensor_specs(), seed=st.integers(0, 2**31 - 1),
           extra=st.integers(0, 4))
    def check(keep: torch.Tensor, specs: list[tuple[torch.dtype, tuple[int, ...], str]],
              seed: int, extra: int) -> None:
        n = keep.shape[0]
        src = build(n, specs, seed)
        kept, count = ek.compact(keep, src, backend=any_backend)
        assert_count(count, keep)
        m = int(count)
        for i, (k, s) in enumerate(zip(kept, src, strict=True)):
            assert_same(k, expected_functional(keep, s), f"functional tensor {i} vs t[keep]")
        dst = [sentinel_like(s, n + extra) for s in src]
        _, count = ek.compact(keep, src, out=dst, backend=any_backend)
        assert_count(count, keep)
        for i, (d, s) in enumerate(zip(dst, src, strict=True)):
            assert_same(d[:m], s[keep], f"out tensor {i} vs t[keep]")
            assert_same(d[m:], sentinel_like(s, n + extra - m), f"out tensor {i} tail")

    check()
