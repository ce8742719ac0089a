"""The compiled CUDA kernels (``csrc/cuda``, backend ``cuda``) on a GPU.

Every test here is ``gpu``-marked (conftest skips them without a CUDA device) and also skips
when the extension was built without the CUDA kernels (``eenet_kernels.ops.HAVE_CUDA_KERNELS``;
``setup.py`` builds them where a CUDA toolkit and a CUDA torch are present, or with
``EENET_CUDA=1``). Run them on a GPU host with ``pytest -m gpu tests/test_cuda_kernels.py``.
The kernels' device-independent parts are checked without a GPU in
``tests/test_cuda_host.py``; ``make nvcc-check`` compiles them for sm_80 / sm_90.

- ``exit_score`` / ``exit_score_write`` against the reference with the shared parametrisation
  of ``test_exit_score`` (pairwise grids over dtypes, every policy configuration, N = 0, 1,
  odd, 1000; D, C, pooling, bias, thresholds: random, all exit, none exit, exactly at a
  score; is_last; NaN/inf rows; the write variant's output kinds and index dtypes), plus
  shapes that select every threads-per-row variant of the epilogue and serving sizes, and
  strided inputs. Inputs are made on the CPU exactly as there, moved to the GPU; the
  reference runs on the CPU copies; the comparison is conftest's rule. The GEMM runs in
  fp32 (upcast operands, TF32 off in these tests), so fp16/bf16 inputs get the fp32
  tolerance (``low_precision_dot=False``);
- ``compact`` / ``compact_out`` bit-exact against ``t[keep]`` (the ``test_compact`` grid:
  sizes, mask kinds with non-canonical bytes, both forms, many dtypes and layouts), more
  tensors than one launch's pointer table, wide rows (many column chunks), misaligned views,
  strided masks;
- the dispatcher: ``torch.ops.eenet.*`` on CUDA run these kernels, ``backend="triton"`` stays
  available; ``torch.library.opcheck``; torch.compile (fullgraph);
- no host sync (``torch.cuda.set_sync_debug_mode("error")``) and CUDA-graph capture and
  replay of both ops, functional and out forms;
- the runtime engine in compact mode with ``backend="cuda"`` against the fp32 oracle of
  ``test_gpu_runtime``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import (
    DTYPES,
    INTERPRET,
    assert_logits_close,
    assert_scores_close,
    exit_tolerance,
    pairwise_cases,
    product_seeds,
)
from test_compact import (
    MASK_KINDS,
    assert_count,
    assert_same,
    expected_functional,
    make_mask,
    mixed_tensors,
    random_values,
    sentinel_like,
    truth,
)
from test_exit_score import (  # noqa: F401  (_single_thread: one intra-op thread here too)
    INDEX_DTYPE_PAIRS,
    OUT_KINDS,
    POLICY_CASES,
    SHAPE_AXES,
    THRESHOLD_KINDS,
    WRITE_CASES,
    Case,
    _single_thread,
    _write_feasible,
    check_parity,
    check_write_against_reference,
    make_head,
    policy_kwargs,
    prepare_row,
    reference_result,
    row_id,
    row_seed,
    write_inputs,
)
from test_gpu_runtime import _net, _policy, assert_matches_oracle, fp32_oracle

import eenet_kernels as ek
from eenet.policies import Entropy, MaxProb, Patience
from eenet.runtime import Engine
from eenet_kernels import ops
from eenet_kernels import reference as ref

pytestmark = pytest.mark.gpu

BACKEND = "cuda"
OPS = ("exit_score", "exit_score_write", "compact", "compact_out")


@pytest.fixture(autouse=True)
def _cuda_kernels_built() -> Iterator[None]:
    """Skip where the extension has no CUDA kernels; the fp32 reference on CUDA without TF32
    (the kernels' GEMM runs in fp32 and is compared at the fp32 tolerance)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not ops.HAVE_CUDA_KERNELS:
        pytest.skip("the extension was built without the CUDA kernels (EENET_CUDA=1 builds "
                    "them)")
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def cuda(t: Any) -> Any:
    return t.cuda() if isinstance(t, torch.Tensor) else t


def cuda_kw(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: cuda(v) for k, v in kw.items()}


def cpu_result(out: ek.ExitScore) -> ek.ExitScore:
    return ek.ExitScore(*(t.cpu() for t in out))


# ---------------------------------------------------------------------------------------
# exit_score: the shared grid.

PARITY_AXES: dict[str, tuple[Any, ...]] = {
    "dtype": DTYPES,
    "case": POLICY_CASES,
    "n": (0, 1, 7, 64, 1000),
    "c": (2, 5, 37, 101, 1000),
    **SHAPE_AXES,
}


def _feasible(row: dict[str, Any]) -> bool:
    return not (row.get("nonfinite") and row.get("n", 7) < 7)


PARITY_GRID = pairwise_cases(PARITY_AXES, product_seeds(PARITY_AXES, ("dtype", "case")),
                             _feasible)


def run_exit_row(row: dict[str, Any]) -> None:
    """One exit_score call on CUDA, checked against the reference on the CPU inputs."""
    case: Case = row["case"]
    is_last = row["is_last"]
    feats, weight, bias, kw, threshold = prepare_row(row, ref.exit_logits)
    ctx = f"[cuda] {row_id(row)} threshold={threshold!r}"
    expect = reference_result(feats, weight, bias, case, threshold, is_last, kw)
    out = ek.exit_score(cuda(feats), cuda(weight), cuda(bias), policy=case.policy,
                        threshold=threshold, is_last=is_last,
                        check_finite=not row["nonfinite"], backend=BACKEND, **cuda_kw(kw))
    assert out.logits.is_cuda and out.keep.is_cuda, ctx
    check_parity(cpu_result(out), expect, feats, weight, bias, case, kw, threshold, is_last,
                 ctx)


@pytest.mark.parametrize("row", [pytest.param(r, id=row_id(r)) for r in PARITY_GRID])
def test_exit_score_matches_reference(row: dict[str, Any]) -> None:
    run_exit_row(row)


# (N, C) pairs that select each threads-per-row variant (1 .. 256) of the epilogue, rows
# spanning several blocks and, at small N, the widening for idle SMs
GROUP_SHAPES = ((40_000, 2), (40_000, 9), (20_000, 17), (9000, 40), (8000, 100), (5000, 129),
                (2000, 300), (1000, 700), (300, 2049), (64, 5000), (1, 1000), (3, 30_000),
                (513, 3))


@pytest.mark.parametrize(("n", "c"), GROUP_SHAPES, ids=lambda v: str(v))
def test_every_group_size(n: int, c: int) -> None:
    """Every policy at shapes that pick each group size; NaN/inf rows included."""
    for i, case in enumerate(POLICY_CASES):
        row = {"dtype": DTYPES[i % 3], "case": case, "n": n, "c": c, "d": 33,
               "pooled": None if i % 2 else 3, "bias": True, "threshold": THRESHOLD_KINDS[i % 4],
               "is_last": i == 3, "nonfinite": n >= 7 and i % 3 == 0}
        run_exit_row(row)


GPU_SHAPES = ((1, 768, 1000), (64, 256, 10), (512, 2048, 100), (4096, 768, 1000))


@pytest.mark.parametrize("pooled", (None, 4), ids=("2d", "3d"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(("n", "d", "c"), GPU_SHAPES, ids=lambda v: str(v))
def test_serving_sizes(n: int, d: int, c: int, dtype: torch.dtype, pooled: int | None) -> None:
    """Every policy at serving sizes; the reference on the GPU (a CPU one takes minutes)."""
    torch.manual_seed(n + d + c)
    feats, weight, bias = (t.cuda() for t in make_head(n, d, c, dtype, pooled, True))
    for case in POLICY_CASES:
        kw = cuda_kw(policy_kwargs(case, ref.exit_logits(feats, weight, bias).cpu()))
        probe = reference_result(feats, weight, bias, case, 0.0, False, kw)
        finite = probe.score[torch.isfinite(probe.score)]
        threshold = float(finite.median()) if case.policy != "patience" else 1.0
        threshold = min(max(threshold, 0.0), 1.0) if case.policy != "patience" else threshold
        expect = reference_result(feats, weight, bias, case, threshold, False, kw)
        out = ek.exit_score(feats, weight, bias, policy=case.policy, threshold=threshold,
                            backend=BACKEND, **kw)
        # the comparison on the GPU too (check_parity is device-agnostic)
        check_parity(out, expect, feats, weight, bias, case, kw, threshold, False,
                     f"[cuda] {case} {n, d, c}")


def test_strided_inputs() -> None:
    """Views: pooled feats laid out (N, S, D) transposed to (N, D, S), a transposed weight, a
    strided bias, prev_scores / prev_preds columns of wider tensors, a strided row_index."""
    torch.manual_seed(7)
    n, d, s, c, k = 50, 24, 5, 11, 3
    feats = torch.randn(n, s, d, device="cuda").transpose(1, 2)
    weight = torch.randn(d, c, device="cuda").t()
    bias = torch.randn(2 * c, device="cuda")[::2]
    prev_scores = torch.rand(n, 2 * k, device="cuda")[:, ::2]
    prev_preds = torch.randint(0, c, (k, n), device="cuda").t()
    sched_weight = torch.randn(c + 2 + k + 1, device="cuda")
    kw = {"prev_scores": prev_scores, "prev_preds": prev_preds, "sched_weight": sched_weight,
          "sched_bias": 0.1, "use_vote": True}
    assert not feats.is_contiguous() and not weight.is_contiguous()
    expect = ek.ExitScore(*ref.exit_score(feats.contiguous(), weight.contiguous(),
                                          bias.contiguous(), "eenet", 0.5,
                                          **{k_: v.contiguous() if isinstance(v, torch.Tensor)
                                             else v for k_, v in kw.items()}))
    out = ek.exit_score(feats, weight, bias, policy="eenet", threshold=0.5, backend=BACKEND,
                        **kw)
    tol = exit_tolerance(feats, weight, bias, "eenet", sched_weight)
    assert_logits_close(out.logits, expect.logits, tol, "strided logits")
    assert_scores_close(out.score, expect.score, tol.score_given(out.logits, expect.logits))
    n0 = 2 * n
    row_index = torch.randperm(n0, device="cuda").repeat_interleave(2)[: 2 * n][::2]
    bufs = (torch.full((n0, c), -1000.0, device="cuda"), torch.full((n0,), -5.0, device="cuda"),
            torch.full((n0,), -1, dtype=torch.int64, device="cuda"))
    res = ek.exit_score_write(feats, weight, bias, row_index=row_index, exit_index=2,
                              out_logits=bufs[0], out_score=bufs[1], out_exit=bufs[2],
                              policy="eenet", threshold=0.5, backend=BACKEND, **kw)
    rows = row_index[res.exit_mask]
    assert torch.equal(bufs[0][rows], res.logits[res.exit_mask])
    assert bool((bufs[2][rows] == 2).all())


@pytest.mark.parametrize("policy", ("entropy", "max_prob"))
def test_scores_exact_for_logits_of_any_magnitude(policy: str) -> None:
    """Huge offsets and spreads of finite logits: scores equal a float64 computation."""
    z = torch.tensor([[0.0, -3e38, 1.0, 2.0, -1e30, 0.5],
                      [1e30, 1e30 - 5e23, 3e29, -3e38, 1e30, 0.0],
                      [1e4, 1e4 - 3, 1e4 - 80, 1e4 - 90, 1e4 - 200, 1e4 - 1],
                      [-1e6, -1e6 + 0.5, -1e6 - 2, -1e6 + 1, -1e6, -1e6 - 0.25],
                      [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    out = ek.exit_score(z.cuda(), torch.eye(6, device="cuda"), None, policy=policy,
                        threshold=0.5, backend=BACKEND)
    p = torch.softmax(z.double(), dim=1)
    if policy == "max_prob":
        truth_ = p.amax(dim=1)
    else:
        truth_ = 1 + (p * p.log().nan_to_num(neginf=0.0)).sum(dim=1) / math.log(6)
    torch.testing.assert_close(out.score.cpu().double(), truth_, rtol=0, atol=2e-6)
    assert out.pred.tolist() == [3, 0, 0, 3, 0]


def test_nonfinite_rows_and_ties() -> None:
    """argmax as torch.argmax (first maximum; the first NaN wins); NaN/inf rows: NaN score,
    exit only at the last exit. Each pattern is the bias of a zero weight, so that every row's
    logits are exactly the pattern."""
    patterns = ([1.0, 3.0, 3.0, 0.0], [0.5, 1.0, math.nan, 2.0, math.nan],
                [0.0, math.inf, 1.0, math.inf], [-math.inf] * 4, [0.0, -math.inf, 1.0, 0.5],
                [2.0, -math.inf, math.nan, math.inf])
    for pattern in patterns:
        bias = torch.tensor(pattern, device="cuda")
        c = bias.numel()
        feats = torch.randn(3, 4, device="cuda")
        weight = torch.zeros(c, 4, device="cuda")
        finite = all(math.isfinite(v) for v in pattern)
        for is_last in (False, True):
            out = ek.exit_score(feats, weight, bias, policy="max_prob", threshold=0.0,
                                is_last=is_last, backend=BACKEND)
            assert torch.equal(out.logits.isnan(), bias.expand(3, c).isnan())
            assert out.pred.tolist() == [int(bias.argmax())] * 3, pattern
            assert torch.isfinite(out.score).tolist() == [finite] * 3, pattern
            assert out.exit_mask.tolist() == [finite or is_last] * 3, pattern
            assert torch.equal(out.keep, ~out.exit_mask)


# ---------------------------------------------------------------------------------------
# exit_score_write.

WRITE_AXES: dict[str, tuple[Any, ...]] = {
    "out_kind": OUT_KINDS,
    "case": WRITE_CASES,
    "n": (0, 1, 7, 64, 1000),
    "shape": ((2, None), (37, 3), (101, 3), (1000, None)),  # (C, S)
    "index_dtypes": INDEX_DTYPE_PAIRS,
    "threshold": THRESHOLD_KINDS,
    "is_last": (False, True),
    "nonfinite": (False, True),
}
WRITE_GRID = pairwise_cases(WRITE_AXES, product_seeds(WRITE_AXES, ("out_kind", "case")),
                            _write_feasible)


@pytest.mark.parametrize("row", [pytest.param(r, id=row_id(r)) for r in WRITE_GRID])
def test_exit_score_write_matches_reference(row: dict[str, Any]) -> None:
    """As test_exit_score.run_write_row: the op's own result against the reference, exactly
    the exiting rows written at row_index (cast / argmax), the reference write's buffers
    wherever the decision and argmax agree (test_exit_score.check_write_against_reference)."""
    torch.manual_seed(row_seed(row_id(row)))
    case: Case = row["case"]
    feats, weight, bias, kw, threshold, row_index, bufs = write_inputs(row)
    ref_bufs = tuple(b.clone() for b in bufs)
    gpu_bufs = [b.cuda() for b in bufs]
    ctx = f"[cuda] {row_id(row)} threshold={threshold!r}"
    out = ek.exit_score_write(cuda(feats), cuda(weight), cuda(bias), row_index=row_index.cuda(),
                              exit_index=3, out_logits=gpu_bufs[0], out_score=gpu_bufs[1],
                              out_exit=gpu_bufs[2], policy=case.policy, threshold=threshold,
                              is_last=row["is_last"], check_finite=not row["nonfinite"],
                              backend=BACKEND, **cuda_kw(kw))
    check_write_against_reference(cpu_result(out), tuple(b.cpu() for b in gpu_bufs), ref_bufs,
                                  row, feats, weight, bias, kw, threshold, row_index, ctx)


def test_write_skips_out_of_range_row_index() -> None:
    """row_index values outside [0, N0) are not written (the CUDA kernel cannot raise
    without a host sync); the in-range rows are."""
    feats = torch.randn(6, 4, device="cuda")
    weight = torch.randn(3, 4, device="cuda")
    row_index = torch.tensor([0, -1, 4, 9, 2, 100], device="cuda")
    bufs = (torch.full((5, 3), -7.0, device="cuda"), torch.full((5,), -5.0, device="cuda"),
            torch.full((5,), -1, dtype=torch.int32, device="cuda"))
    out = ek.exit_score_write(feats, weight, row_index=row_index, exit_index=4,
                              out_logits=bufs[0], out_score=bufs[1], out_exit=bufs[2],
                              policy="max_prob", threshold=0.0, backend=BACKEND)
    assert bool(out.exit_mask.all())
    assert bufs[2].tolist() == [4, -1, 4, -1, 4]
    assert torch.equal(bufs[0][[0, 4, 2]], out.logits[[0, 2, 4]])
    assert bool((bufs[0][[1, 3]] == -7.0).all())


# ---------------------------------------------------------------------------------------
# compact.

COMPACT_SIZES = (0, 1, 7, 64, 1000, 100_003)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("n", COMPACT_SIZES, ids=lambda v: f"N{v}")
def test_compact_matches_boolean_index(n: int, kind: str) -> None:
    """Both forms, many dtypes / ranks / layouts in one call, bit-exact; inputs untouched."""
    src = mixed_tensors(n, seed=n)
    keep = make_mask(n, kind, seed=n + 3)
    gpu_src = [s.cuda() for s in src]
    gkeep = keep.cuda()
    kept, count = ek.compact(gkeep, gpu_src, backend=BACKEND)
    assert_count(count, gkeep)
    for i, (k, s) in enumerate(zip(kept, src, strict=True)):
        assert k.is_cuda and k.is_contiguous()
        assert_same(k.cpu(), expected_functional(keep, s), f"kept[{i}]")
    dst = [sentinel_like(s, n + 3).cuda() for s in src]
    result, count = ek.compact(gkeep, gpu_src, out=dst, backend=BACKEND)
    assert_count(count, gkeep)
    m = int(count)
    for i, (r, d, s) in enumerate(zip(result, dst, src, strict=True)):
        assert r is d
        assert_same(d[:m].cpu(), s[truth(keep)], f"dst[{i}][:n]")
        assert_same(d[m:].cpu(), sentinel_like(s, n + 3 - m), f"dst[{i}][n:]")
    for i, (g, s) in enumerate(zip(gpu_src, src, strict=True)):
        assert_same(g.cpu(), s, f"src[{i}] modified")


def test_compact_many_tensors_wide_rows_and_views() -> None:
    """More tensors than one launch's pointer table (32), rows of many column chunks, views
    at odd byte offsets (1-byte words), zero-byte rows, a strided non-canonical mask."""
    n = 37
    gen = torch.Generator().manual_seed(5)
    src = [random_values((n, 3), torch.float32, gen) for _ in range(40)]
    src += [random_values((n, 300_000), torch.float16, gen),          # ~590 KB rows
            random_values((n, 17), torch.uint8, gen)[:, 1:],          # odd offset
            random_values((n, 9), torch.int16, gen)[:, 1:6],          # 2-byte aligned
            torch.empty(n, 0), random_values((n, 4, 3), torch.bfloat16, gen).transpose(1, 2)]
    raw = torch.randint(0, 2, (2 * n,), generator=gen, dtype=torch.uint8) * \
        torch.tensor([1, 2, 127, 255], dtype=torch.uint8).repeat(n)[: 2 * n]
    keep = raw.view(torch.bool)[::2]
    kept, count = ek.compact(keep.cuda(), [s.cuda() for s in src], backend=BACKEND)
    assert int(count) == int(truth(keep).sum())
    for i, (k, s) in enumerate(zip(kept, src, strict=True)):
        assert_same(k.cpu(), expected_functional(keep.contiguous(), s), f"kept[{i}]")


def test_compact_empty_list_and_empty_batch() -> None:
    keep = make_mask(9, "random").cuda()
    kept, count = ek.compact(keep, [], backend=BACKEND)
    assert kept == [] and int(count) == int(keep.sum())
    keep0 = torch.zeros(0, dtype=torch.bool, device="cuda")
    kept, count = ek.compact(keep0, [torch.zeros(0, 3, device="cuda")], backend=BACKEND)
    assert int(count) == 0 and kept[0].shape == (0, 3)


# ---------------------------------------------------------------------------------------
# Dispatcher, opcheck, torch.compile, argument checks.


def test_dispatcher_runs_the_cuda_kernels() -> None:
    """The CUDA key of every op is the compiled kernel; backend 'triton' stays reachable."""
    for name in OPS:
        assert "CUDA" in ek.compiled_backends(name)
        assert ops.op_target(name, torch.device("cuda")) is getattr(torch.ops.eenet, name)
        assert ops.op_target(name, torch.device("cuda"), "cuda") is getattr(torch.ops.eenet,
                                                                             name)
    assert ops.dispatcher_backend(torch.device("cuda")) == "cuda"
    assert ops.resolve_backend(torch.device("cuda")) == "cuda"
    with pytest.raises(RuntimeError, match="backend 'cuda' was requested but it runs on CUDA"):
        ops.resolve_backend(torch.device("cpu"), "cuda")
    keep = (torch.arange(1000) % 3 == 0).cuda()
    kept, count = torch.ops.eenet.compact(keep, [torch.arange(1000).cuda()])
    assert int(count) == 334 and torch.equal(kept[0][:334].cpu(), torch.arange(0, 1000, 3))


@pytest.mark.skipif(INTERPRET, reason="compiled Triton kernels needed: TRITON_INTERPRET unset")
def test_triton_backend_still_available() -> None:
    pytest.importorskip("triton")
    target = ops.op_target("compact", torch.device("cuda"), "triton")
    assert target is not torch.ops.eenet.compact
    keep = make_mask(500, "bytes").cuda()
    src = [torch.arange(500).cuda()]
    a, ca = ek.compact(keep, src, backend="triton")
    b, cb = ek.compact(keep, src, backend=BACKEND)
    assert int(ca) == int(cb) and torch.equal(a[0], b[0])
    feats, weight, bias = (t.cuda() for t in make_head(64, 33, 10, torch.float32, None, True))
    ra = ek.exit_score(feats, weight, bias, policy="entropy", threshold=0.3, backend="triton")
    rb = ek.exit_score(feats, weight, bias, policy="entropy", threshold=0.3, backend=BACKEND)
    torch.testing.assert_close(ra.logits, rb.logits, rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph() -> None:
    """A stage (exit_score + compact) compiles with fullgraph=True and matches eager."""
    torch.manual_seed(0)
    feats, weight, bias = (t.cuda() for t in make_head(256, 768, 100, torch.bfloat16, None,
                                                       True))

    def stage(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = ek.exit_score(x, weight, bias, policy="entropy", threshold=0.2)
        kept, count = ek.compact(out.keep, [x, out.logits])
        return out.score, kept[0], kept[1], count

    eager = stage(feats)
    compiled = torch.compile(stage, fullgraph=True)(feats)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)


BAD_CASES = (
    ("exit_score", {"policy": "bogus"}),
    ("exit_score", {"feats": lambda: torch.randn(4, device="cuda")}),
    ("exit_score", {"weight": lambda: torch.randn(5, 3, device="cuda").half()}),
    ("exit_score", {"weight": lambda: torch.randn(5, 3)}),  # another device
    ("exit_score", {"threshold": 1.5}),
    ("exit_score_write", {"out_exit": lambda: torch.zeros(6, device="cuda")}),
    ("exit_score_write", {"row_index": lambda: torch.arange(3, device="cuda")}),
    ("compact", {"keep": lambda: torch.ones(4, dtype=torch.uint8, device="cuda")}),
    ("compact_out", {"dst": lambda: [torch.zeros(3, 2, device="cuda")]}),
)


@pytest.mark.parametrize(("op", "over"), BAD_CASES, ids=[f"{o}-{next(iter(v))}" for o, v in
                                                           BAD_CASES])
def test_bad_inputs_raise_like_reference(op: str, over: dict[str, Any]) -> None:
    """The shared checks of csrc/checks.h: the reference's exception type and message."""

    def call(backend: str) -> tuple[type[BaseException], str]:
        args: dict[str, Any] = {
            "feats": torch.randn(4, 3, device="cuda"), "weight": torch.randn(5, 3, device="cuda"),
            "policy": "max_prob", "threshold": 0.5,
            "row_index": torch.tensor([5, 0, 3, 1], device="cuda"), "exit_index": 1,
            "out_logits": torch.zeros(6, 5, device="cuda"),
            "out_score": torch.zeros(6, device="cuda"),
            "out_exit": torch.zeros(6, dtype=torch.int64, device="cuda"),
            "keep": torch.tensor([True, False, True, True], device="cuda"),
            "src": [torch.zeros(4, 2, device="cuda")], "dst": [torch.zeros(4, 2, device="cuda")]}
        args.update({k: v() if callable(v) else v for k, v in over.items()})
        try:
            if op.startswith("exit_score"):
                feats, weight = args.pop("feats"), args.pop("weight")
                for key in ("keep", "src", "dst"):
                    args.pop(key)
                if op == "exit_score":
                    for key in ("row_index", "exit_index", "out_logits", "out_score",
                                "out_exit"):
                        args.pop(key)
                    ek.exit_score(feats, weight, backend=backend, **args)
                else:
                    ek.exit_score_write(feats, weight, backend=backend, **args)
            elif op == "compact":
                ek.compact(args["keep"], args["src"], backend=backend)
            else:
                ek.compact(args["keep"], args["src"], out=args["dst"], backend=backend)
        except Exception as exc:
            return type(exc), str(exc).splitlines()[0]
        raise AssertionError(f"{backend}: no error")

    assert call(BACKEND) == call("reference")


# ---------------------------------------------------------------------------------------
# No host sync; CUDA graphs.


def _stage_inputs(n: int = 512, d: int = 128, c: int = 10) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"weight": torch.randn(c, d, device="cuda") * 0.2,
            "bias": torch.randn(c, device="cuda"),
            "feats": torch.randn(n, d, device="cuda"),
            "row_index": torch.arange(n, device="cuda"),
            "out_logits": torch.zeros(n, c, device="cuda"),
            "out_score": torch.zeros(n, device="cuda"),
            "out_exit": torch.full((n,), -1, dtype=torch.int64, device="cuda"),
            "kept_h": torch.zeros(n, d, device="cuda"),
            "kept_idx": torch.zeros(n, dtype=torch.int64, device="cuda")}


def test_no_host_sync() -> None:
    """Neither op synchronises with the host (any sync raises in this mode)."""
    t = _stage_inputs()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for pooled in (False, True):
            x = t["feats"][:, :, None].expand(-1, -1, 3) if pooled else t["feats"]
            res = ek.exit_score(x, t["weight"], t["bias"], policy="entropy", threshold=0.3,
                                backend=BACKEND)
            ek.exit_score_write(x, t["weight"], t["bias"], row_index=t["row_index"],
                                exit_index=0, out_logits=t["out_logits"],
                                out_score=t["out_score"], out_exit=t["out_exit"],
                                policy="patience", threshold=1.0,
                                prev_preds=torch.zeros(512, 2, dtype=torch.int64, device="cuda"),
                                backend=BACKEND)
            ek.compact(res.keep, [t["feats"], t["row_index"]], backend=BACKEND)
            ek.compact(res.keep, [t["feats"], t["row_index"]],
                       out=[t["kept_h"], t["kept_idx"]], backend=BACKEND)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("functional", (False, True), ids=("out", "functional"))
def test_stage_replays_in_a_cuda_graph(functional: bool) -> None:
    """Scoring + result write + compaction captured once, replayed on new inputs; each replay
    equals the reference stage."""
    t = _stage_inputs()
    n, d = t["feats"].shape

    def stage() -> tuple[torch.Tensor, list[torch.Tensor]]:
        res = ek.exit_score_write(t["feats"], t["weight"], t["bias"], row_index=t["row_index"],
                                  exit_index=0, out_logits=t["out_logits"],
                                  out_score=t["out_score"], out_exit=t["out_exit"],
                                  policy="max_prob", threshold=0.6, backend=BACKEND)
        src = [t["feats"], t["row_index"]]
        if functional:
            kept, count = ek.compact(res.keep, src, backend=BACKEND)
        else:
            kept, count = ek.compact(res.keep, src, out=[t["kept_h"], t["kept_idx"]],
                                     backend=BACKEND)
        return count, kept

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        stage()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        count, kept = stage()

    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        t["feats"].copy_(torch.randn(n, d, device="cuda", generator=gen))
        for name in ("out_logits", "out_score", "kept_h", "kept_idx"):
            t[name].zero_()
        t["out_exit"].fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        want = ek.exit_score(t["feats"], t["weight"], t["bias"], policy="max_prob",
                             threshold=0.6, backend="reference")
        stay = ~want.exit_mask
        m = int(stay.sum())
        assert 0 < m < n, "the threshold should split the batch"
        assert int(count) == m
        assert torch.equal(kept[1][:m], stay.nonzero().flatten())
        assert torch.equal(kept[0][:m], t["feats"][stay])
        if functional:
            assert not bool(kept[0][m:].any()) and not bool(kept[1][m:].any())
        assert torch.equal(t["out_exit"] == 0, want.exit_mask)
        torch.testing.assert_close(t["out_logits"][want.exit_mask],
                                   want.logits[want.exit_mask], rtol=1e-4, atol=1e-4)


def test_pooled_exit_score_replays_in_a_cuda_graph() -> None:
    """The pooling kernel, the GEMM and the epilogue of (N, D, S) feats under capture."""
    feats = torch.randn(300, 64, 7, device="cuda").half()
    weight = torch.randn(20, 64, device="cuda").half()
    ek.exit_score(feats, weight, policy="entropy", threshold=0.4, backend=BACKEND)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ek.exit_score(feats, weight, policy="entropy", threshold=0.4, backend=BACKEND)
    for seed in range(2):
        feats.copy_(torch.randn(300, 64, 7, device="cuda",
                                generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        want = ref.exit_score(feats, weight, None, "entropy", 0.4)
        tol = exit_tolerance(feats, weight, None, "entropy")
        assert_logits_close(out.logits, want[0], tol, f"replay {seed}")
        assert_scores_close(out.score, want[1], tol.score_given(out.logits, want[0]))


# ---------------------------------------------------------------------------------------
# The runtime engine on the CUDA kernels.


@pytest.mark.parametrize("kind", [MaxProb, Entropy, Patience], ids=lambda p: p.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 300])
def test_engine_compact_mode_matches_fp32_oracle(kind: type, dtype: torch.dtype,
                                                 n: int) -> None:
    """Engine(mode='compact', backend='cuda') against the fp32 oracle of test_gpu_runtime."""
    net = _net("cuda", dtype)
    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, 64, device="cuda", generator=g).to(dtype)
    calibration = torch.randn(256, 64, device="cuda", generator=g).to(dtype)
    policy = _policy(kind, net, calibration)
    oracle = fp32_oracle(net, policy, x)
    out = Engine(net, policy, mode="compact", backend=BACKEND)(x)
    assert_matches_oracle(out, oracle, policy, dtype, "compact/cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device() -> None:
    """The launchers run on the inputs' device (device guard), not the current one."""
    feats = torch.randn(33, 8, device="cuda:1")
    weight = torch.randn(4, 8, device="cuda:1")
    out = ek.exit_score(feats, weight, policy="entropy", threshold=0.3, backend=BACKEND)
    assert all(t.device == feats.device for t in out)
    want = ref.exit_score(feats, weight, None, "entropy", 0.3)
    assert torch.equal(out.pred, want[3])
    kept, count = ek.compact(out.keep, [feats], backend=BACKEND)
    assert kept[0].device == feats.device and int(count) == int(out.keep.sum())
    assert_same(kept[0][: int(count)], feats[out.keep], "kept on cuda:1")
    assert count.device == feats.device
