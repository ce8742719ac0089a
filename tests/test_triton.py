"""Triton-specific tests of the Triton backend (``eenet_kernels.triton``).

The Triton backend is one of conftest's ``PARITY_BACKENDS``: the sampled parity grids and the
known-answer tests of ``test_exit_score``, ``test_compact`` and ``test_bad_inputs`` run it
(on CPU tensors under ``TRITON_INTERPRET=1``, which must be set before triton is imported;
``make test`` sets it; without it those rows skip). This module adds what only the Triton
kernels have, at interpreter-friendly sizes:

- forced small blocks (several row, C and D tiles at small shapes) and the class split
  (chunk programs plus a merge launch), on pairwise-sampled grids of policy configurations,
  dtypes, pooling, bias, thresholds and the write variant's output kinds;
- argmax edge cases across C tiles, compaction with forced program / tile / scan sizes and
  more tensors than one launch's slots, the word views, the CUDA dispatch key's kernel and
  the backend resolution;
- ahead-of-time compilation for sm_80 / sm_90 (no GPU needed): one variant by default, every
  variant and the spill check under ``slow``.

GPU section (marker ``gpu``): the compiled kernels on CUDA tensors at full sizes, plus
opcheck, torch.compile and CUDA-graph capture. Run it with TRITON_INTERPRET unset
(``pytest -m gpu tests/test_triton.py``): under the interpreter those tests skip.

Tolerances: ``conftest.exit_tolerance``; on CUDA with fp16/bf16 inputs (a tensor-core dot)
with ``low_precision_dot=True``. Compaction is bit-exact.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("triton")

import torch
from conftest import (
    DTYPES,
    INTERPRET,
    Background,
    assert_covers,
    assert_logits_close,
    exit_tolerance,
    item_names,
    pairwise_cases,
    product_seeds,
)
from test_compact import make_mask, mixed_tensors
from test_exit_score import (  # noqa: F401  (_single_thread: one intra-op thread here too)
    FEATS_FOR_OUT,
    INDEX_DTYPE_PAIRS,
    POLICY_CASES,
    THRESHOLD_KINDS,
    WRITE_CASES,
    Case,
    _single_thread,
    check_parity,
    choose_threshold,
    dtype_id,
    make_head,
    policy_kwargs,
    reference_result,
    row_id,
    run_parity_row,
    run_write_row,
)

import eenet_kernels as ek
from eenet_kernels import ops
from eenet_kernels import reference as ref
from eenet_kernels import triton as etriton

NEEDS_INTERPRETER = "needs TRITON_INTERPRET=1 (set before triton is imported; make test does)"


def _modules() -> tuple[Any, Any]:
    mods = etriton.load()
    assert mods is not None, "triton imports (importorskip) but the backend does not load"
    return mods


@pytest.fixture
def backend() -> str:
    """Triton, on CPU tensors under the interpreter."""
    if not INTERPRET:
        pytest.skip(NEEDS_INTERPRETER)
    return "triton"


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks: N = 64 takes two programs, C = 37 three tiles and D = 33 two tiles."""
    es, _ = _modules()

    def tiny(n: int, d: int, c: int, dtype: torch.dtype, pooled: bool
             ) -> tuple[int, int, int, int]:
        return 32, 16, 32, 1

    monkeypatch.setattr(es, "block_sizes", tiny)


@pytest.fixture
def split_classes(monkeypatch: pytest.MonkeyPatch, small_blocks: None) -> None:
    """Small blocks, and the classes split into chunks of one 16-class tile: C = 37 takes
    three chunk programs per row tile and the second (merge) launch."""
    es, _ = _modules()
    monkeypatch.setattr(es, "class_chunk", lambda row_tiles, c, block_c, num_sms: block_c)


# ---------------------------------------------------------------------------------------
# CPU (interpreter): exit_score.


TILES = ("small_blocks", "split_classes")
TILE_AXES: dict[str, tuple[Any, ...]] = {
    "tiles": TILES,
    "case": POLICY_CASES,
    "dtype": DTYPES,
    "pooled": (None, 3),
    "bias": (False, True),
    "threshold": THRESHOLD_KINDS,
    "is_last": (False, True),
    "nonfinite": (False, True),
}
# every policy configuration on both tilings; the other axes pairwise among themselves
TILE_PAIRS = [(a, b) for a in TILE_AXES for b in TILE_AXES if a < b and "case" not in (a, b)]
TILE_GRID = pairwise_cases(TILE_AXES, product_seeds(TILE_AXES, ("tiles", "case")),
                           pairs=TILE_PAIRS)


def test_tile_grids_cover_every_value_and_pair() -> None:
    assert_covers(TILE_GRID, TILE_AXES, ("tiles", "case"), pairs=TILE_PAIRS)
    assert_covers(WRITE_TILE_GRID, WRITE_TILE_AXES, ("tiles", "out_kind"),
                  lambda r: not (r.get("nonfinite") and r.get("n", 7) < 7), WRITE_TILE_PAIRS)
    assert_covers(COMPACT_TILE_GRID, COMPACT_TILE_AXES, ("tiles", "form"))


@pytest.mark.parametrize("row", TILE_GRID, ids=row_id)
def test_exit_score_small_blocks(backend: str, request: pytest.FixtureRequest,
                                 row: dict[str, Any]) -> None:
    """N = 64, D = 33, C = 37 in several programs, C tiles and D tiles (online softmax
    statistics and argmax across C tiles, the EENet sum across C tiles, fp32 accumulation
    across D tiles); split: the same statistics merged across the chunk programs by the
    second launch. Every policy configuration on each."""
    request.getfixturevalue(row["tiles"])
    run_parity_row(backend, {**{k: v for k, v in row.items() if k != "tiles"},
                             "n": 64, "d": 33, "c": 37})


WRITE_TILE_AXES: dict[str, tuple[Any, ...]] = {
    "tiles": TILES,
    "out_kind": tuple(FEATS_FOR_OUT),
    "case": WRITE_CASES,
    "n": (1, 7, 64),
    "shape": ((37, None), (37, 3)),
    "index_dtypes": INDEX_DTYPE_PAIRS,
    "threshold": THRESHOLD_KINDS,
    "is_last": (False, True),
    "nonfinite": (False, True),
}
# every output kind and write policy on both tilings; the rest pairwise among themselves
WRITE_TILE_PAIRS = [("tiles", "case")] + [
    (a, b) for a in WRITE_TILE_AXES for b in WRITE_TILE_AXES
    if a < b and not {a, b} & {"tiles", "case", "out_kind"}]
WRITE_TILE_GRID = pairwise_cases(
    WRITE_TILE_AXES, product_seeds(WRITE_TILE_AXES, ("tiles", "out_kind")),
    lambda r: not (r.get("nonfinite") and r.get("n", 7) < 7), WRITE_TILE_PAIRS)


@pytest.mark.parametrize("row", WRITE_TILE_GRID, ids=row_id)
def test_exit_score_write_small_blocks(backend: str, request: pytest.FixtureRequest,
                                       row: dict[str, Any]) -> None:
    """The write variant when the logits of the write come back from several C tiles
    (small blocks) or from the first launch's chunk programs (split)."""
    request.getfixturevalue(row["tiles"])
    run_write_row(backend, {k: v for k, v in row.items() if k != "tiles"})


def argmax_rows(c: int) -> torch.Tensor:
    """(10, c) logits with ties, NaNs and infinities placed across several C tiles of 16."""
    nan, inf = math.nan, math.inf
    z = torch.linspace(-3.0, 3.0, c).repeat(10, 1)
    z[0, :] = 1.0                          # all tied: 0
    z[1, [3, 20, c - 1]] = 9.0             # tie across tiles: 3
    z[2, [c - 1, 17]] = 9.0                # tie, later tile first in storage order: 17
    z[3, 25] = nan                         # NaN in the second tile beats the maximum
    z[3, c - 1] = 99.0
    z[4, [30, 5]] = nan                    # first NaN: 5
    z[5, 18] = inf                         # +inf: 18
    z[5, 33] = inf
    z[6, :] = -inf                         # all -inf: 0
    z[7, 16:] = -inf                       # -inf tail
    z[8, [2, 19]] = inf                    # +inf then NaN later: the NaN
    z[8, 34] = nan
    z[9, c - 1] = 3.5                      # plain maximum in the last (partial) tile
    return z


@pytest.mark.parametrize(("tiles", "out_kind"),
                         [("default", torch.int64), ("small", torch.int32),
                          ("split", torch.int64)],
                         ids=("blocks-default-int64", "blocks-small-int32",
                              "classes-split-int64"))
def test_argmax_semantics_across_tiles(backend: str, request: pytest.FixtureRequest,
                                       tiles: str, out_kind: torch.dtype) -> None:
    """Written predictions equal torch.argmax (first maximum, NaN wins) on every row, finite
    or not, also when the maxima sit in different C tiles or chunks; non-finite rows score
    NaN."""
    if tiles != "default":
        request.getfixturevalue({"small": "small_blocks", "split": "split_classes"}[tiles])
    c = 37
    z = argmax_rows(c)
    n = z.shape[0]
    weight = torch.eye(c)  # logits = feats (inf * 0 would give NaN: inf rows use the bias)
    feats = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    bias = torch.where(torch.isfinite(z), torch.zeros_like(z), z)
    out_logits = torch.full((n,), -1, dtype=out_kind)
    out_score, out_exit = torch.zeros(n), torch.zeros(n, dtype=torch.int64)
    outs = []
    for r in range(n):  # bias is per class, not per row: one row per call
        outs.append(ek.exit_score_write(
            feats[r:r + 1], weight, bias[r], row_index=torch.tensor([r]), exit_index=0,
            out_logits=out_logits, out_score=out_score, out_exit=out_exit,
            policy="max_prob", threshold=1.0, is_last=True, check_finite=False,
            backend=backend))
    logits = torch.cat([o.logits for o in outs])
    assert torch.equal(logits.isnan(), z.isnan())
    assert out_logits.tolist() == z.argmax(dim=1).tolist()
    assert torch.cat([o.pred for o in outs]).tolist() == z.argmax(dim=1).tolist()
    finite = torch.isfinite(z).all(dim=1)
    assert bool(out_score[~finite].isnan().all()) and bool(out_score[finite].isfinite().all())


def test_nan_rows_never_exit_early_patience_int32(backend: str) -> None:
    """A NaN row with a matching streak still scores NaN and stays (patience, int32 preds)."""
    feats = torch.tensor([[0.0, 5.0], [math.nan, 1.0]])
    prev = torch.tensor([[1, 1], [0, 0]], dtype=torch.int32)  # NaN row's argmax is 0
    out = ek.exit_score(feats, torch.eye(2), policy="patience", threshold=1.0, prev_preds=prev,
                        check_finite=False, backend=backend)
    assert out.score[0].item() == 2.0 and math.isnan(out.score[1].item())
    assert out.exit_mask.tolist() == [True, False]


# ---------------------------------------------------------------------------------------
# CPU (interpreter): compact.


COMPACT_TILE_AXES: dict[str, tuple[Any, ...]] = {
    "tiles": ((4, 4, 8), (2, 8, 2), (8, 2, 24)),  # (block_r, block_scan, rows_per_prog)
    "form": ("functional", "out"),
    "kind": ("all_true", "random", "single"),
    "n": (7, 40),
}
COMPACT_TILE_GRID = pairwise_cases(COMPACT_TILE_AXES,
                                   product_seeds(COMPACT_TILE_AXES, ("tiles", "form")))


def _compact_tile_id(row: dict[str, Any]) -> str:
    r, sc, p = row["tiles"]
    return f"r{r}-s{sc}-p{p}-{row['form']}-{row['kind']}-N{row['n']}"


@pytest.mark.parametrize("row", COMPACT_TILE_GRID, ids=_compact_tile_id)
def test_compact_programs_and_tiles(backend: str, row: dict[str, Any]) -> None:
    """Forced small tiles: several programs, several row tiles per program and several scan
    steps per prefix, so every path of the in-kernel prefix sum runs at small N; the result
    is t[keep], then zeros (functional) or the untouched tail (out)."""
    _, cp = _modules()
    n, form = row["n"], row["form"]
    block_r, block_scan, rows_per_prog = row["tiles"]
    src = mixed_tensors(n, seed=n + 5)
    keep = make_mask(n, kind=row["kind"], seed=n)
    m = int(keep.sum())
    rows = n if form == "functional" else n + 2
    dst = [torch.full((rows, *s.shape[1:]), 5 if form == "functional" else 3, dtype=s.dtype)
           for s in src]
    count = torch.full((), -1, dtype=torch.int64)
    cp.launch(keep, src, dst, count, zero_tail=form == "functional", block_r=block_r,
              block_scan=block_scan, rows_per_prog=rows_per_prog)
    assert int(count) == m
    for i, (got, s) in enumerate(zip(dst, src, strict=True)):
        tail = torch.zeros if form == "functional" else lambda shape, dtype: torch.full(
            shape, 3, dtype=dtype)
        want = torch.cat([s[keep], tail((rows - m, *s.shape[1:]), dtype=s.dtype)])
        assert torch.equal(got, want), f"tensor {i} ({got.dtype}, {tuple(got.shape)})"


@pytest.mark.parametrize("count", (1, 8, 9, 19))
def test_compact_many_tensors(backend: str, count: int) -> None:
    """More tensors than one launch's slots (8): several launches, same results, one count."""
    gen = torch.Generator().manual_seed(count)
    n = 23
    keep = torch.rand(n, generator=gen) < 0.4
    dtypes = (torch.float32, torch.int64, torch.bfloat16, torch.bool, torch.int32)
    src = [torch.randn(n, i % 4 + 1, generator=gen).mul(100).to(dtypes[i % len(dtypes)])
           for i in range(count)]
    kept, n_kept = ek.compact(keep, src, backend=backend)
    m = int(keep.sum())
    assert int(n_kept) == m
    for got, s in zip(kept, src, strict=True):
        assert torch.equal(got[:m], s[keep]) and not bool(got[m:].any())


def test_compact_word_views() -> None:
    """Rows are copied as the widest word that divides row size, row stride and offset."""
    _, cp = _modules()
    x = torch.zeros(6, 4)                        # 16-byte rows, aligned: int64 words
    s, d = cp.as_words(x, torch.empty_like(x))
    assert s.dtype == torch.int64 and s.shape == (6, 2) and d.shape == (6, 2)
    y = torch.zeros(6, 3, dtype=torch.float16)   # 6-byte rows: int16
    assert cp.as_words(y, torch.empty_like(y))[0].dtype == torch.int16
    z = torch.zeros(12, 2)[1::2]                 # strided rows, 8-byte: int64 view, stride 2
    s, _ = cp.as_words(z, torch.empty_like(z))
    assert s.dtype == torch.int64 and s.stride(0) == 2
    b = torch.zeros(7, 5, dtype=torch.bool)      # 5-byte rows: bytes
    assert cp.as_words(b, torch.empty_like(b))[0].dtype == torch.uint8
    t = torch.zeros(3, 6).t()                    # rows not contiguous: a contiguous copy
    s, _ = cp.as_words(t, torch.empty(6, 3))
    assert s.is_contiguous()


# ---------------------------------------------------------------------------------------
# CPU (interpreter): custom ops, dispatcher routing and backend choice.


def test_cuda_key_runs_triton_else_reference(backend: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """What the CUDA key of torch.ops.eenet.* runs without a compiled CUDA kernel: the
    Triton entry point, or the reference when triton does not load."""
    calls: list[str] = []
    _, cp = _modules()
    real = cp.compact

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append("triton")
        return real(*args, **kwargs)

    monkeypatch.setattr(cp, "compact", spy)
    keep = torch.tensor([True, False, True])
    kept, count = ops.cuda_kernel("compact")(keep, [torch.arange(3)])
    assert calls == ["triton"] and int(count) == 2 and kept[0].tolist() == [0, 2, 0]
    monkeypatch.setattr(etriton, "load", lambda: None)
    assert ops.cuda_kernel("compact") is ref.compact
    kept, count = ops.cuda_kernel("compact")(keep, [torch.arange(3)])
    assert calls == ["triton"] and int(count) == 2 and kept[0].tolist() == [0, 2, 0]


def test_backend_resolution(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert "triton" in ek.BACKENDS
    assert ek.resolve_backend(cpu, "triton") == "triton"
    monkeypatch.setenv("EENET_BACKEND", "triton")
    assert ek.resolve_backend(cpu) == "triton"
    monkeypatch.setenv("EENET_BACKEND", "auto")
    assert ek.resolve_backend(cpu) == ("cpp" if ek.HAVE_EXTENSION else "reference")
    with pytest.raises(RuntimeError, match="backend 'triton' was requested but it runs on CUDA"):
        ek.resolve_backend(torch.device("meta"), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"CPU tensors need the Triton interpreter"):
        ek.resolve_backend(cpu, "triton")
    with pytest.raises(RuntimeError, match=r"CPU tensors need the Triton interpreter"):
        ek.compact(torch.ones(2, dtype=torch.bool), [], backend="triton")


def _lazy_import_check(background: dict[Any, Background]) -> Background:
    if "lazy import" not in background:
        code = ("import sys, eenet_kernels\n"
                "assert 'triton' not in sys.modules, 'triton imported eagerly'\n")
        background["lazy import"] = Background(code, timeout=120)
    return background["lazy import"]


def test_triton_import_is_lazy(background: dict[Any, Background]) -> None:
    """``import eenet_kernels`` does not import triton (it costs startup time)."""
    result = _lazy_import_check(background).result()
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------
# Compiled kernels without a GPU: ahead-of-time compilation for NVIDIA targets.

_FLOAT_ARGS = {"sched_bias", "threshold", "inv_s", "inv_log_c"}


def _signature(kernel: Any, pointers: dict[str, str | None], constexprs: dict[str, Any]
               ) -> tuple[dict[str, str], dict[str, Any]]:
    """Triton signature of ``kernel``: pointer element types by name (None: a None argument),
    fp32 for the float scalars, i32 for the other scalars, the given constexprs."""
    sig: dict[str, str] = {}
    consts = dict(constexprs)
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            elt = pointers[name]
            sig[name] = "constexpr" if elt is None else f"*{elt}"
            if elt is None:
                consts[name] = None
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig, consts


def nvidia_resource_usage(arch: int, quick: bool = False) -> list[tuple[str, int, int]]:
    """Compile both kernels for ``sm_<arch>`` with the block sizes the launchers pick, over
    policies, dtypes, pooling and write kinds; (config, registers, stack bytes) for each.
    ``quick``: one exit_score variant (EENet with the vote, bf16, predictions written, one
    launch) and one compact variant only. Needs triton's bundled ptxas / cuobjdump, no GPU;
    run without TRITON_INTERPRET."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    es, cp = _modules()
    target = GPUTarget("cuda", arch, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    results = []

    def build(kernel: Any, pointers: dict[str, str | None], constexprs: dict[str, Any],
              warps: int, label: str) -> None:
        sig, consts = _signature(kernel, pointers, constexprs)
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
        compiled = triton.compile(src, target=target, options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                 capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", out)
        assert m is not None, out
        results.append((label, int(m.group(1)), int(m.group(2))))

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    variants = [(0, torch.float16, False, 0, False), (1, torch.bfloat16, True, 1, False),
                (2, torch.float32, True, 2, False), (3, torch.bfloat16, False, 1, True),
                (3, torch.float32, False, 1, True)]
    shapes = ((8, 10), (64, 100), (4096, 1000))
    if quick:
        variants, shapes = variants[3:4], ((64, 100),)
    for n, c in shapes:
        for policy, dtype, pooled, write, vote in variants:
            block_n, block_c, block_d, warps = es.block_sizes(n, 768, c, dtype, pooled)
            dt = names[dtype]
            pointers = {
                "feats_ptr": dt, "w_ptr": dt, "bias_ptr": dt, "logits_ptr": "fp32",
                "score_ptr": "fp32", "exit_ptr": "u8", "pred_ptr": "i64", "keep_ptr": "u8",
                "prev_scores_ptr": "fp32" if policy == 3 else None,
                "prev_preds_ptr": "i64" if policy == 2 or vote else None,
                "sched_w_ptr": "fp32" if policy == 3 else None,
                "row_index_ptr": "i64" if write else None,
                "out_logits_ptr": ({1: dt, 2: "i32"}.get(write)),
                "out_score_ptr": "fp32" if write else None,
                "out_exit_ptr": "i64" if write else None}
            constexprs = {"POLICY": policy, "IS_LAST": False, "HAS_BIAS": True, "POOL": pooled,
                          "USE_VOTE": vote, "WRITE": write, "UPCAST": False,
                          "ROUND_BF16": False, "ONE_TILE": c <= block_c, "BLOCK_N": block_n,
                          "BLOCK_C": block_c, "BLOCK_D": block_d}
            label = f"exit_score N{n} C{c} policy{policy} {dt} pooled={pooled} write={write}"
            # one launch; at C = 1000 also the two launches of the class split
            phases = (0, 1, 2) if c == 1000 else (0,)
            for phase in phases:
                split = {"stats_ptr": "fp32" if phase else None,
                         "istats_ptr": "i32" if phase else None}
                build(es._exit_score_kernel, {**pointers, **split},
                      {**constexprs, "PHASE": phase}, warps, f"{label} phase={phase}")
    compacts = (([192] * 8, ["i64"] * 8), ([96, 1, 3, 5], ["i64", "i64", "i32", "u8"]),
                ([1], ["i32"]), ([], []))
    for widths, words in compacts[1:2] if quick else compacts:
        block_r, block_scan, _, bws, warps = cp.launch_config(8192, widths, 132)
        pointers = {"keep_ptr": "u8", "count_ptr": "i64"}
        constexprs = {"NUM_T": len(widths), "ZERO_TAIL": True, "WRITE_COUNT": True,
                      "BLOCK_R": block_r, "BLOCK_SCAN": block_scan, "SCAN_WORDS": True}
        for i in range(cp.MAX_SLOTS):
            used = i < len(widths)
            pointers[f"s{i}"] = pointers[f"d{i}"] = words[i] if used else None
            constexprs[f"BW{i}"] = bws[i] if used else 1
            if not used:
                constexprs[f"ss{i}"] = constexprs[f"w{i}"] = 0
        build(cp._compact_kernel, pointers, constexprs, warps, f"compact widths={widths}")
    return results


def _nvidia_toolchain_missing() -> bool:
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    return not all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "cuobjdump"))


def _nvidia_compile(background: dict[Any, Background], arch: int, quick: bool) -> Background:
    """:func:`nvidia_resource_usage` in a subprocess without TRITON_INTERPRET (started once
    per (arch, quick) and module)."""
    key = ("nvidia", arch, quick)
    if key not in background:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = ("import test_triton as t\n"
                f"for label, regs, stack in t.nvidia_resource_usage({arch}, quick={quick}):\n"
                "    print(f'{label}|{regs}|{stack}')\n")
        background[key] = Background(code, timeout=300, env=env,
                                     cwd=os.path.dirname(__file__))
    return background[key]


def start_subprocesses(items: list[pytest.Item], jobs: dict[Any, Background]) -> None:
    """The subprocess tests of this module start with its first test (conftest's
    ``background``): the ahead-of-time compilations (one compiler thread each, an arch a
    process) and the fresh interpreter of the lazy-import check run on the other core while
    the interpreted kernels (one thread) run here; each test then reads its own output."""
    names = item_names(items)
    if "test_triton_import_is_lazy" in names:
        _lazy_import_check(jobs)
    if _nvidia_toolchain_missing():
        return
    for item in items:
        if getattr(item, "originalname", "") == "test_kernels_compile_for_nvidia_without_spills":
            _nvidia_compile(jobs, item.callspec.params["arch"], quick=False)
    if "test_kernels_compile_for_nvidia_one_variant" in names and ("nvidia", 90, False) not in jobs:
        _nvidia_compile(jobs, 90, quick=True)  # else read off the full sm_90 sweep


def _compile_for_nvidia(background: dict[Any, Background], arch: int, quick: bool
                        ) -> list[tuple[str, int, int]]:
    """The (config, registers, stack bytes) rows of :func:`_nvidia_compile`; skips when
    triton's NVIDIA toolchain is not bundled."""
    if _nvidia_toolchain_missing():
        pytest.skip("triton's NVIDIA toolchain (ptxas, cuobjdump) is not bundled here")
    result = _nvidia_compile(background, arch, quick).result()
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.count("|") == 2]
    return [(label, int(regs), int(stack)) for label, regs, stack in rows]


# the configurations of nvidia_resource_usage(quick=True)
QUICK_LABELS = ["exit_score N64 C100 policy3 bf16 pooled=False write=1 phase=0",
                "compact widths=[96, 1, 3, 5]"]


def test_kernels_compile_for_nvidia_one_variant(background: dict[Any, Background]) -> None:
    """Without a GPU, the real compiler still checks the kernels: the heaviest exit_score
    variant and a mixed-width compact lower to cubins for sm_90 (the fast version of the
    full sweep below; where that sweep runs too, these two rows are read off its sm_90
    output, the same compilations)."""
    if ("nvidia", 90, False) in background:
        rows = [r for r in _compile_for_nvidia(background, 90, quick=False)
                if r[0] in QUICK_LABELS]
    else:
        rows = _compile_for_nvidia(background, 90, quick=True)
    assert [label for label, _, _ in rows] == QUICK_LABELS, rows
    assert all(regs > 0 for _, regs, _ in rows), rows


@pytest.mark.slow
@pytest.mark.parametrize("arch", (80, 90))
def test_kernels_compile_for_nvidia_without_spills(background: dict[Any, Background],
                                                   arch: int) -> None:
    """Every variant (and both launches of the class split) lowers to a cubin for sm_80 /
    sm_90 at the launchers' block sizes, without register spills (a few bytes of stack are
    tolerated)."""
    rows = _compile_for_nvidia(background, arch, quick=False)
    assert len(rows) == 29, rows
    spills = [(label, stack) for label, _, stack in rows if stack > 16]
    assert not spills, spills


# ---------------------------------------------------------------------------------------
# GPU: compiled kernels on CUDA tensors at full sizes.


@pytest.fixture
def cuda_backend() -> str:
    if INTERPRET:
        pytest.skip("GPU tests need compiled kernels: run them with TRITON_INTERPRET unset")
    return "triton"


def _to_cuda(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@pytest.fixture
def _deterministic_matmul() -> Iterator[None]:
    """The fp32 reference on CUDA must not use TF32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


GPU_SHAPES = ((1, 768, 1000), (64, 256, 10), (512, 2048, 100), (4096, 768, 1000))


def gpu_case(case: Case, feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
             ) -> tuple[dict[str, Any], float]:
    """History inputs and a random threshold, computed on the GPU (CUDA inputs; a CPU
    reference at these sizes takes minutes)."""
    kw = _to_cuda(policy_kwargs(case, ref.exit_logits(feats, weight, bias).cpu()))
    probe = reference_result(feats, weight, bias, case, 0.0, False, kw)
    return kw, choose_threshold("random", case, probe.score)


def low_precision_dot(dtype: torch.dtype) -> bool:
    """The CUDA kernel multiplies fp16/bf16 operands on tensor cores (conftest's rule)."""
    return dtype != torch.float32


@pytest.mark.gpu
@pytest.mark.usefixtures("_deterministic_matmul")
@pytest.mark.parametrize("pooled", (None, 4), ids=("2d", "3d"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("n", "d", "c"), GPU_SHAPES, ids=lambda v: str(v))
def test_gpu_exit_score_matches_reference(cuda_backend: str, n: int, d: int, c: int,
                                          dtype: torch.dtype, pooled: int | None) -> None:
    """Every policy on CUDA at serving sizes, against the fp32 reference."""
    torch.manual_seed(n + d + c)
    feats, weight, bias = (t.cuda() for t in make_head(n, d, c, dtype, pooled, True))
    for case in POLICY_CASES:
        kw, threshold = gpu_case(case, feats, weight, bias)
        expect = reference_result(feats, weight, bias, case, threshold, False, kw)
        out = ek.exit_score(feats, weight, bias, policy=case.policy, threshold=threshold,
                            backend=cuda_backend, **kw)
        check_parity(out, expect, feats, weight, bias, case, kw, threshold, False,
                     f"[cuda] {case} threshold={threshold:.6g}", low_precision_dot(dtype))


@pytest.mark.gpu
@pytest.mark.usefixtures("_deterministic_matmul")
@pytest.mark.parametrize("out_kind", tuple(FEATS_FOR_OUT), ids=dtype_id)
@pytest.mark.parametrize("n", (64, 4096), ids=lambda v: f"N{v}")
def test_gpu_exit_score_write(cuda_backend: str, n: int, out_kind: torch.dtype) -> None:
    """The write variant on CUDA: the reference write's buffers, the kernel's own logits."""
    torch.manual_seed(n)
    dtype = FEATS_FOR_OUT[out_kind]
    feats, weight, bias = (t.cuda() for t in make_head(n, 768, 1000, dtype, None, True))
    n0 = 2 * n
    rows = torch.randperm(n0)[:n].cuda()
    case = WRITE_CASES[-1]
    kw, threshold = gpu_case(case, feats, weight, bias)
    bufs = [torch.full((n0, 1000), -7.0, dtype=out_kind) if out_kind.is_floating_point
            else torch.full((n0,), -1, dtype=out_kind), torch.full((n0,), -5.0),
            torch.full((n0,), -1, dtype=torch.int64)]
    bufs = [b.cuda() for b in bufs]
    ref_bufs = [b.clone() for b in bufs]
    out = ek.exit_score_write(feats, weight, bias, row_index=rows, exit_index=1,
                              out_logits=bufs[0], out_score=bufs[1], out_exit=bufs[2],
                              policy=case.policy, threshold=threshold, backend=cuda_backend,
                              **kw)
    expect = ek.ExitScore(*ref.exit_score_write(
        feats, weight, bias, case.policy, threshold, **kw, row_index=rows, exit_index=1,
        out_logits=ref_bufs[0], out_score=ref_bufs[1], out_exit=ref_bufs[2]))
    alike = check_parity(out, expect, feats, weight, bias, case, kw, threshold, False,
                         f"[cuda write] {out_kind}", low_precision_dot(dtype))
    # buffers agree at the rows decided alike with the same argmax
    agree = rows[alike]
    assert torch.equal(bufs[2][agree], ref_bufs[2][agree])
    torch.testing.assert_close(bufs[1][agree], ref_bufs[1][agree], atol=1e-3, rtol=0)
    # the written logits / predictions are the kernel's own, at every exiting row
    written = rows[out.exit_mask]
    own = out.logits[out.exit_mask]
    want = own.to(out_kind) if out_kind.is_floating_point else out.pred[out.exit_mask].to(
        out_kind)
    assert torch.equal(bufs[0][written], want)
    assert torch.equal(bufs[1][written], out.score[out.exit_mask])
    untouched = torch.ones(n0, dtype=torch.bool, device="cuda")
    untouched[written] = False
    assert bool((bufs[2][untouched] == -1).all()) and bool((bufs[1][untouched] == -5.0).all())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ("all_true", "all_false", "random", "single"))
@pytest.mark.parametrize("n", (1, 256, 8192, 100_003), ids=lambda v: f"N{v}")
def test_gpu_compact_matches_reference(cuda_backend: str, n: int, kind: str) -> None:
    """Both forms on CUDA, wide and narrow rows of several dtypes, bit-exact."""
    keep = make_mask(n, kind, seed=n).cuda()
    gen = torch.Generator().manual_seed(n)
    src = [torch.randn(n, 256, generator=gen).half().cuda(), torch.arange(n).cuda(),
           torch.randn(n, 3, generator=gen).cuda(), torch.randint(0, 2, (n, 5)).bool().cuda(),
           torch.randn(n, 2, 7, generator=gen).bfloat16().cuda()]
    kept, count = ek.compact(keep, src, backend=cuda_backend)
    ref_kept, ref_count = ref.compact(keep, src)
    assert int(count) == int(ref_count)
    for got, want in zip(kept, ref_kept, strict=True):
        assert torch.equal(got, want)
    dst = [torch.full((n + 5, *s.shape[1:]), 3, dtype=s.dtype, device="cuda") for s in src]
    ref_dst = [d.clone() for d in dst]
    _, count = ek.compact(keep, src, out=dst, backend=cuda_backend)
    ref.compact_out(keep, src, ref_dst)
    assert int(count) == int(ref_count)
    for got, want in zip(dst, ref_dst, strict=True):
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_dispatcher_routes_to_triton(cuda_backend: str) -> None:
    """torch.ops.eenet.* on CUDA tensors (no compiled CUDA kernel) match the reference."""
    keep = (torch.arange(1000) % 3 == 0).cuda()
    src = [torch.arange(1000).cuda()]
    kept, count = torch.ops.eenet.compact(keep, src)
    assert int(count) == 334 and torch.equal(kept[0][:334].cpu(), torch.arange(0, 1000, 3))
    feats, weight, bias = make_head(64, 768, 1000, torch.float16, None, True)
    logits = torch.ops.eenet.exit_score(feats.cuda(), weight.cuda(), bias.cuda(), "max_prob",
                                        0.5)[0]
    want = ref.exit_logits(feats, weight, bias)
    tol = exit_tolerance(feats, weight, bias, "max_prob", low_precision_dot=True)
    assert_logits_close(logits.cpu(), want, tol, "[cuda dispatcher]")


@pytest.mark.gpu
def test_gpu_opcheck_cuda_ops(cuda_backend: str) -> None:
    """Schema, fake kernel and functionalization of torch.ops.eenet.* on CUDA tensors: the
    kernels that hold the CUDA key (the Triton launchers, or the CUDA C++ kernels in an
    EENET_CUDA=1 build)."""
    feats, weight, bias = make_head(7, 33, 5, torch.float16, 3, True)
    args = (feats.cuda(), weight.cuda(), bias.cuda(), "entropy", 0.3)
    torch.library.opcheck(torch.ops.eenet.exit_score.default, args)
    outs = {"row_index": torch.tensor([8, 0, 3, 1, 2, 7, 5], device="cuda"), "exit_index": 1,
            "out_logits": torch.zeros(9, 5, device="cuda"),
            "out_score": torch.zeros(9, device="cuda"),
            "out_exit": torch.zeros(9, dtype=torch.int64, device="cuda")}
    torch.library.opcheck(torch.ops.eenet.exit_score_write.default, args, outs)
    keep = (torch.arange(9) % 2 == 0).cuda()
    src = [torch.arange(9).cuda(), torch.randn(9, 4).cuda()]
    torch.library.opcheck(torch.ops.eenet.compact.default, (keep, src))
    dst = [torch.zeros_like(s) for s in src]
    torch.library.opcheck(torch.ops.eenet.compact_out.default, (keep, src, dst))


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph(cuda_backend: str) -> None:
    """A stage (exit_score + compact) compiles with fullgraph=True and matches eager, through
    the dispatcher's kernels: the Triton ones in a build without the CUDA kernels, which is
    where backend='triton' names the dispatcher's choice (with CUDA kernels it cannot be
    traced: a clear error, tested on CPU in test_triton_override_under_compile_is_refused)."""
    torch.manual_seed(0)
    feats, weight, bias = (t.cuda() for t in make_head(256, 768, 100, torch.bfloat16, None,
                                                       True))
    backend = "auto" if ops.HAVE_CUDA_KERNELS else "triton"

    def stage(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = ek.exit_score(x, weight, bias, policy="entropy", threshold=0.2,
                            check_finite=False, backend=backend)
        kept, count = ek.compact(~out.exit_mask, [x, out.logits], backend=backend)
        return out.score, kept[0], kept[1], count

    eager = stage(feats)
    compiled = torch.compile(stage, fullgraph=True)(feats)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)


def test_triton_override_under_compile_is_refused() -> None:
    """backend='triton' where the dispatcher's kernels are another backend's (here the C++
    CPU kernels under the interpreter) calls the launcher directly, which torch.compile cannot
    trace: the error says so and what to do, instead of failing inside the launcher."""
    if not INTERPRET or not ops.HAVE_EXTENSION:
        pytest.skip("needs the Triton interpreter and the C++ CPU kernels")
    keep = torch.tensor([True, False, True])
    x = torch.randn(3, 4)

    def stage(x: torch.Tensor) -> torch.Tensor:
        return ek.compact(keep, [x], backend="triton")[0][0]

    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(stage, fullgraph=True)(x)
    assert ("backend 'triton' cannot be traced by torch.compile on cpu tensors, where the "
            "dispatcher's kernels are 'cpp'") in str(info.value)
    # eager, the override works
    assert torch.equal(ek.take(*ek.compact(keep, [x], backend="triton"))[0], x[keep])


@pytest.mark.gpu
def test_gpu_compact_cuda_graph_replay(cuda_backend: str) -> None:
    """compact_out needs no scratch state: a captured launch replays correctly with new masks."""
    n = 4096
    src = [torch.randn(n, 128, device="cuda"), torch.arange(n, device="cuda")]
    dst = [torch.empty_like(s) for s in src]
    keep = torch.zeros(n, dtype=torch.bool, device="cuda")
    ek.compact(keep, src, out=dst, backend=cuda_backend)  # warm-up: compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, count = ek.compact(keep, src, out=dst, backend=cuda_backend)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        keep.copy_(torch.rand(n, generator=gen) < 0.5)
        graph.replay()
        m = int(keep.sum())
        assert int(count) == m
        assert torch.equal(dst[1][:m], keep.nonzero().flatten())
        assert torch.equal(dst[0][:m], src[0][keep])
