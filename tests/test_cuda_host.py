"""The CUDA kernels' device-independent parts, on the CPU: no GPU or CUDA toolkit needed.

``csrc/cuda/*.cuh`` keep everything that is not a kernel ``__host__ __device__`` (plain C++
when ``__CUDACC__`` is not defined). This module compiles a small driver program with g++
against those headers and runs the helpers the way the kernels do (every lane of a row's
group, every block and thread of a grid, in turn), then compares the results with the
reference (``eenet_kernels.reference``) and with plain-torch / Python computations:

- the exit epilogue: argmax / softmax statistics per lane, their all-reduce in the kernel's
  butterfly order for every group size (1 .. 256 threads per row), the policy score and the
  decision, the row outputs and the write variant's scatter (logits cast to fp32 / fp16 /
  bf16, or predictions; out-of-range row_index values skipped), on random and edge rows (N =
  0, 1, odd; NaN / inf rows, ties, logits of huge magnitude), for every policy;
- the pooling over S (lanes per output, strided layouts, fp32 / fp16 / bf16);
- compaction: the select predicate (any non-zero byte is True), word size choice, chunk and
  tile arithmetic, slot lookup, grid sizing and the per-block copy, with small tiles and
  grids smaller than the work so that every loop runs, against ``t[keep]`` (N = 0, 1, odd;
  all / none / random / single rows kept; non-canonical bool bytes);
- the fp16 / bf16 conversions against torch's, bit for bit;
- the launch geometry's invariants.

Skipped cleanly where g++ is missing. The kernels themselves run in tests/test_cuda_kernels.py
(GPU hosts).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_decisions_agree, assert_scores_close

from eenet_kernels import reference as ref

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"

# the driver program (its C++ source below)
PROGRAM = r'''
// Host driver of the CUDA kernels' device-independent parts (csrc/cuda/*.cuh compiled by a
// host compiler): reads one command from stdin, runs the helpers the way the kernels do
// (every lane / block / thread in turn) and prints the results for the test to compare.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "compact.cuh"
#include "exit_score.cuh"

using namespace eenet::cuda;

static double read_num() {
  char buf[64];
  if (std::scanf("%63s", buf) != 1) {
    std::fprintf(stderr, "unexpected end of input\n");
    std::exit(2);
  }
  return std::strtod(buf, nullptr);
}
static int64_t read_int() { return static_cast<int64_t>(read_num()); }
static float read_float() {
  char buf[64];
  if (std::scanf("%63s", buf) != 1) std::exit(2);
  return std::strtof(buf, nullptr);
}

static void print_float(float v) {
  if (std::isnan(v)) std::printf("nan ");
  else std::printf("%.9g ", v);
}

// The kernel's all-reduce over a group of G lanes, lane by lane: a butterfly inside each
// warp (offsets W/2 .. 1), then for G > 32 the warps' results merged in warp order.
template <typename T, typename Merge>
static void group_allreduce(std::vector<T>& v, int g, Merge merge) {
  const int width = g < 32 ? g : 32;
  for (int off = width / 2; off > 0; off >>= 1) {
    std::vector<T> old = v;
    for (int l = 0; l < g; ++l) v[l] = merge(old[l], old[l ^ off]);
  }
  if (g > 32) {
    T acc = v[0];
    for (int w = 1; w < g / 32; ++w) acc = merge(acc, v[w * 32]);
    for (int l = 0; l < g; ++l) v[l] = acc;
  }
}

static bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

static int run_exit() {
  const int64_t n = read_int(), c = read_int();
  const int g = static_cast<int>(read_int());
  ExitParams p{};
  p.n = n;
  p.c = static_cast<int32_t>(c);
  p.log_c = std::log(static_cast<float>(c));
  p.policy = static_cast<int32_t>(read_int());
  p.threshold = read_float();
  p.is_last = read_int() != 0;
  p.k = read_int();
  p.sched_bias = read_float();
  p.use_vote = read_int() != 0;
  p.write = static_cast<int32_t>(read_int());
  p.n0 = read_int();
  p.out_logits_dtype = static_cast<int32_t>(read_int());
  p.exit_index = read_int();
  p.out_exit_64 = read_int() != 0;
  std::vector<float> logits(n * c), prev_scores(n * p.k), sched_w;
  std::vector<int64_t> prev_preds(n * p.k), row_index(n);
  for (auto& v : logits) v = read_float();
  for (auto& v : prev_scores) v = read_float();
  for (auto& v : prev_preds) v = read_int();
  const int64_t nw = read_int();
  sched_w.resize(nw);
  for (auto& v : sched_w) v = read_float();
  for (auto& v : row_index) v = read_int();
  // prev_scores given transposed in memory (k, N) to exercise the strides
  std::vector<float> ps_t(p.k * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < p.k; ++j) ps_t[j * n + i] = prev_scores[i * p.k + j];
  p.logits = logits.data();
  p.prev_scores = ps_t.data();
  p.ps_stride0 = 1;
  p.ps_stride1 = n;
  std::vector<int32_t> pp32(prev_preds.begin(), prev_preds.end());
  p.prev_preds_64 = (n % 2) == 0;  // both widths across the cases
  p.prev_preds = p.prev_preds_64 ? static_cast<const void*>(prev_preds.data())
                                 : static_cast<const void*>(pp32.data());
  p.pp_stride0 = p.k;
  p.pp_stride1 = 1;
  p.sched_w = sched_w.data();
  std::vector<float> score(n);
  std::vector<uint8_t> exit_mask(n), keep(n);
  std::vector<int64_t> pred(n);
  p.score = score.data();
  p.exit_mask = exit_mask.data();
  p.pred = pred.data();
  p.keep = keep.data();
  std::vector<int32_t> ri32(row_index.begin(), row_index.end());
  p.row_index_64 = (n % 3) != 0;
  p.row_index = p.row_index_64 ? static_cast<const void*>(row_index.data())
                               : static_cast<const void*>(ri32.data());
  p.row_index_stride = 1;
  const int64_t per_row = p.write == kWriteLogits ? c : 1;
  std::vector<float> out_f(p.n0 * per_row, -1000.f);
  std::vector<uint16_t> out_h(p.n0 * per_row, 0xffff);
  std::vector<int64_t> out_i64(p.n0, -1);
  std::vector<int32_t> out_i32(p.n0, -1);
  if (p.write == kWriteLogits) {
    p.out_logits = p.out_logits_dtype == kF32 ? static_cast<void*>(out_f.data())
                                              : static_cast<void*>(out_h.data());
  } else {
    p.out_logits = p.out_logits_dtype == kI64 ? static_cast<void*>(out_i64.data())
                                              : static_cast<void*>(out_i32.data());
  }
  std::vector<float> out_score(p.n0, -5.f);
  std::vector<int64_t> out_exit64(p.n0, -1);
  std::vector<int32_t> out_exit32(p.n0, -1);
  p.out_score = out_score.data();
  p.out_exit = p.out_exit_64 ? static_cast<void*>(out_exit64.data())
                             : static_cast<void*>(out_exit32.data());

  // the kernel, one row (group of g lanes) at a time
  for (int64_t i = 0; i < n; ++i) {
    const float* z = p.logits + i * c;
    std::vector<ArgmaxState> a(g, argmax_init());
    for (int l = 0; l < g; ++l)
      for (int32_t j = l; j < c; j += g) argmax_push(a[l], z[j], j);
    group_allreduce(a, g, argmax_merge);
    std::vector<SoftmaxSums> s(g, sums_init());
    if (!a[0].nonfinite)
      for (int l = 0; l < g; ++l)
        for (int32_t j = l; j < c; j += g)
          sums_push(s[l], z[j], a[l].best, p.policy == kEENet ? p.sched_w[j] : 0.f);
    group_allreduce(s, g, sums_merge);
    for (int l = 1; l < g; ++l) {
      if (!same_bits(a[l].best, a[0].best) || a[l].idx != a[0].idx ||
          a[l].nan_idx != a[0].nan_idx || a[l].nonfinite != a[0].nonfinite ||
          !same_bits(s[l].e, s[0].e) || !same_bits(s[l].et, s[0].et) ||
          !same_bits(s[l].ew, s[0].ew)) {
        std::printf("lanes-differ %" PRId64 " %d\n", i, l);
        return 1;
      }
    }
    const RowDecision r = decide_row(p, i, a[0], s[0]);
    store_row(p, i, r);
    const int64_t at = write_target(p, i, r);
    if (at >= 0) {
      write_scalars(p, at, r);
      if (p.write == kWriteLogits)
        for (int l = 0; l < g; ++l)
          for (int32_t j = l; j < c; j += g) write_logit(p, at, j, z[j]);
    }
  }
  std::printf("score ");
  for (auto v : score) print_float(v);
  std::printf("\nexit ");
  for (auto v : exit_mask) std::printf("%d ", int(v));
  std::printf("\npred ");
  for (auto v : pred) std::printf("%" PRId64 " ", v);
  std::printf("\nkeep ");
  for (auto v : keep) std::printf("%d ", int(v));
  std::printf("\nout_logits ");
  for (int64_t q = 0; q < p.n0 * per_row; ++q) {
    if (p.write == kWriteLogits && p.out_logits_dtype == kF32) print_float(out_f[q]);
    else if (p.write == kWriteLogits) std::printf("%d ", int(out_h[q]));
    else if (p.out_logits_dtype == kI64) std::printf("%" PRId64 " ", out_i64[q]);
    else std::printf("%d ", out_i32[q]);
  }
  std::printf("\nout_score ");
  for (auto v : out_score) print_float(v);
  std::printf("\nout_exit ");
  for (int64_t q = 0; q < p.n0; ++q)
    std::printf("%" PRId64 " ", p.out_exit_64 ? out_exit64[q] : int64_t(out_exit32[q]));
  std::printf("\n");
  return 0;
}

static int hex_nibble(char ch) {
  return ch <= '9' ? ch - '0' : (ch | 0x20) - 'a' + 10;
}

static int run_compact() {
  const int64_t n = read_int();
  const bool zero_tail = read_int() != 0;
  const int nthreads = static_cast<int>(read_int());
  const int64_t gx_cap = read_int(), gy_cap = read_int();
  const int64_t chunk_words = read_int(), tile_words = read_int(), max_rows = read_int();
  const int32_t slots = static_cast<int32_t>(read_int());
  std::vector<uint8_t> keep_store(2 * n + 1);
  for (int64_t i = 0; i < n; ++i) keep_store[2 * i] = static_cast<uint8_t>(read_int());
  const uint8_t* keep = keep_store.data();
  const int64_t keep_stride = 2;  // a strided mask: every other byte

  struct Buf {
    std::vector<uint64_t> store;  // 8-byte aligned storage, 64 bytes of slack
    char* base() {  // 64-byte aligned: the offsets alone set the alignment
      const uintptr_t at = reinterpret_cast<uintptr_t>(store.data());
      return reinterpret_cast<char*>(store.data()) + (64 - at % 64) % 64;
    }
  };
  std::vector<Buf> src(slots), dst(slots);
  std::vector<int64_t> row_bytes(slots), stride(slots), src_off(slots), dst_off(slots),
      dst_rows(slots);
  CompactTable t{};
  for (int32_t k = 0; k < slots; ++k) {
    row_bytes[k] = read_int();
    stride[k] = read_int();
    src_off[k] = read_int();
    dst_off[k] = read_int();
    dst_rows[k] = read_int();
    char hex[3] = {0, 0, 0};
    const int64_t src_bytes = n ? (n - 1) * stride[k] + row_bytes[k] : 0;
    src[k].store.assign((src_off[k] + src_bytes) / 8 + 16, 0);
    dst[k].store.assign((dst_off[k] + dst_rows[k] * row_bytes[k]) / 8 + 16, 0);
    char* s = src[k].base() + src_off[k];
    for (int64_t b = 0; b < src_bytes; ++b) {
      if (std::scanf(" %c%c", &hex[0], &hex[1]) != 2) return 2;
      s[b] = static_cast<char>(hex_nibble(hex[0]) * 16 + hex_nibble(hex[1]));
    }
    std::memset(dst[k].base() + dst_off[k], 0xab, dst_rows[k] * row_bytes[k]);
    t.slot[t.num_slots++] = make_slot(s, dst[k].base() + dst_off[k], stride[k], row_bytes[k]);
  }
  // the select: kept row indices in order and their number (CUB on the device)
  std::vector<int64_t> rows(n, -7);
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i)
    if (keep_flag(keep, keep_stride, i)) rows[m++] = i;
  plan_table(t, chunk_words, tile_words, max_rows);
  int64_t gx = 0, gy = 0;
  compact_grid(t, n, &gx, &gy);
  const int64_t full_gx = gx, full_gy = gy;
  if (gx_cap > 0 && gx > gx_cap) gx = gx_cap;
  if (gy_cap > 0 && gy > gy_cap) gy = gy_cap;
  for (int64_t bx = 0; bx < gx; ++bx)
    for (int64_t by = 0; by < gy; ++by)
      for (int tid = 0; tid < nthreads; ++tid)
        gather_block(t, rows.data(), m, n, zero_tail, bx, by, gx, gy, tid, nthreads);
  std::printf("count %" PRId64 "\n", m);
  std::printf("plan %" PRId64 " %" PRId64 " %" PRId64 " %" PRId64 "\n", t.total_chunks,
              t.rows_per_tile, full_gx, full_gy);
  for (int32_t k = 0; k < slots; ++k) {
    std::printf("slot %d %" PRId64 " %" PRId64 " %d %d ", k, t.slot[k].words,
                t.slot[k].chunk_begin, t.slot[k].word_log2,
                find_slot(t, t.slot[k].chunk_begin));
    const unsigned char* d = reinterpret_cast<unsigned char*>(dst[k].base() + dst_off[k]);
    for (int64_t b = 0; b < dst_rows[k] * row_bytes[k]; ++b) std::printf("%02x", d[b]);
    std::printf("\n");
  }
  return 0;
}

static int run_geometry() {
  const int64_t cases = read_int();
  for (int64_t q = 0; q < cases; ++q) {
    const int64_t n = read_int(), c = read_int(), sms = read_int(), s = read_int();
    const int g = exit_group_size(n, c, static_cast<int>(sms));
    std::printf("%d %" PRId64 " %d %" PRId64 "\n", g, exit_blocks(n, g), pool_lanes(s),
                pool_blocks(n * 3, pool_lanes(s)));
  }
  return 0;
}

static int run_words() {
  const int64_t cases = read_int();
  for (int64_t q = 0; q < cases; ++q) {
    const int64_t rb = read_int(), st = read_int(), sa = read_int(), da = read_int();
    std::printf("%d\n", pick_word_log2(rb, st, uint64_t(sa), uint64_t(da)));
  }
  return 0;
}

static int run_convert() {
  const int64_t cases = read_int();
  for (int64_t q = 0; q < cases; ++q) {
    const float f = read_float();
    std::printf("%d %d\n", int(float_to_half_bits(f)), int(float_to_bf16_bits(f)));
  }
  for (uint32_t h = 0; h < 65536; ++h) {
    print_float(half_bits_to_float(uint16_t(h)));
    print_float(bf16_bits_to_float(uint16_t(h)));
    std::printf("\n");
  }
  return 0;
}

static int run_pool() {
  const int64_t n = read_int(), d = read_int(), s = read_int();
  const int32_t dt = static_cast<int32_t>(read_int());
  const bool transposed = read_int() != 0;  // memory (S, D, N) instead of (N, D, S)
  std::vector<float> f(n * d * s);
  std::vector<uint16_t> h(n * d * s);
  PoolParams p{};
  p.n = n;
  p.d = d;
  p.s = s;
  p.stride_n = transposed ? 1 : d * s;
  p.stride_d = transposed ? n : s;
  p.stride_s = transposed ? n * d : 1;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j)
      for (int64_t k = 0; k < s; ++k) {
        const int64_t at = i * p.stride_n + j * p.stride_d + k * p.stride_s;
        if (dt == kF32) f[at] = read_float();
        else h[at] = static_cast<uint16_t>(read_int());
      }
  p.x = dt == kF32 ? static_cast<const void*>(f.data()) : static_cast<const void*>(h.data());
  const int lanes = pool_lanes(s);
  for (int64_t r = 0; r < n * d; ++r) {
    std::vector<float> part(lanes);
    for (int l = 0; l < lanes; ++l)
      part[l] = dt == kF32   ? pool_partial<kF32>(p, r, l, lanes)
                : dt == kF16 ? pool_partial<kF16>(p, r, l, lanes)
                             : pool_partial<kBF16>(p, r, l, lanes);
    group_allreduce(part, lanes, [](float a, float b) { return a + b; });
    print_float(part[0] / static_cast<float>(s));
  }
  std::printf("\n");
  return 0;
}

int main() {
  char mode[32];
  if (std::scanf("%31s", mode) != 1) return 2;
  const std::string m(mode);
  if (m == "exit") return run_exit();
  if (m == "compact") return run_compact();
  if (m == "geometry") return run_geometry();
  if (m == "words") return run_words();
  if (m == "convert") return run_convert();
  if (m == "pool") return run_pool();
  return 2;
}
'''

POLICY_CODES = {"max_prob": 0, "entropy": 1, "patience": 2, "eenet": 3}
WRITE_NONE, WRITE_LOGITS, WRITE_PREDS = 0, 1, 2
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3,
               torch.int64: 4}
GROUPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
U32 = 2.0**-24


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The driver program, compiled once per session run of this module."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: the host checks of csrc/cuda/*.cuh need a C++ compiler")
    out = tmp_path_factory.mktemp("cuda_host")
    src = out / "cuda_host_driver.cpp"
    src.write_text(PROGRAM)
    exe = out / "cuda_host_driver"
    res = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror",
                          f"-I{CUDA_SRC}", str(src), "-o", str(exe)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"the headers do not compile as host C++:\n{res.stderr}"
    return exe


def run(exe: Path, words: list[Any]) -> str:
    text = " ".join(fmt(w) for w in words) + "\n"
    res = subprocess.run([str(exe)], input=text, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"driver failed ({res.returncode}): {res.stdout[-2000:]}" \
        f"{res.stderr[-2000:]}"
    return res.stdout


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def parse_lines(out: str) -> dict[str, list[str]]:
    lines = {}
    for line in out.splitlines():
        key, *rest = line.split()
        lines[key] = rest
    return lines


def floats(tokens: list[str]) -> torch.Tensor:
    return torch.tensor([float(t) for t in tokens], dtype=torch.float32)


def ints(tokens: list[str]) -> torch.Tensor:
    return torch.tensor([int(t) for t in tokens], dtype=torch.int64)


def f32(x: float) -> float:
    """x rounded to float32 (thresholds the kernel and torch compare alike)."""
    return struct.unpack("f", struct.pack("f", x))[0]


# ---------------------------------------------------------------------------------------
# The exit epilogue.

POLICY_CASES = (  # (policy, k, use_vote)
    ("max_prob", 0, False),
    ("entropy", 0, False),
    ("patience", 0, False),
    ("patience", 3, False),
    ("eenet", 0, False),
    ("eenet", 2, False),
    ("eenet", 0, True),
    ("eenet", 3, True),
)
SHAPES = ((0, 5), (1, 2), (7, 37), (9, 3), (33, 300), (12, 101))


def edge_logits(n: int, c: int, gen: torch.Generator) -> torch.Tensor:
    """Random logits with edge rows (N >= 9): NaN first / in the middle with an inf, +inf,
    all -inf, one -inf, a tie for the maximum, huge magnitudes."""
    z = torch.randn(n, c, generator=gen) * 3
    if n >= 9:
        z[1, 0] = math.nan
        z[2, c // 2] = math.nan
        z[2, c - 1] = math.inf
        z[3, c - 1] = math.inf
        z[4] = -math.inf
        z[5, 0] = -math.inf
        z[6, c - 1] = z[6].max() + 1
        z[6, max(0, c - 2)] = z[6, c - 1]  # tie: the first maximum wins
        z[7] = z[7] * 1e4 + 1e30
        z[7, 0] = -3e38
        z[8] = 0.25  # uniform
    return z


def history(n: int, c: int, k: int, logits: torch.Tensor, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    pred = logits.argmax(dim=1) if n else torch.zeros(0, dtype=torch.int64)
    rand = torch.randint(0, c, (n, k), generator=gen)
    agree = torch.rand(n, k, generator=gen) < 0.6
    prev_preds = torch.where(agree, pred[:, None], rand)
    return torch.rand(n, k, generator=gen), prev_preds


def choose_threshold(policy: str, k: int, score: torch.Tensor, gen: torch.Generator,
                     kind: int) -> float:
    finite = score[torch.isfinite(score)]
    if policy == "patience":
        return float([0, 1, 2, k + 1][kind % 4])
    if kind % 4 == 1:
        return 0.0
    if kind % 4 == 2:
        return 1.0
    if finite.numel() == 0:
        return 0.5
    at = finite[int(torch.randint(0, finite.numel(), (), generator=gen))]
    return f32(min(max(float(at), 0.0), 1.0))  # exactly a score: that row exits


def exit_rows() -> list[Any]:
    rows = []
    for gi, g in enumerate(GROUPS):
        for pi, case in enumerate(POLICY_CASES):
            n, c = SHAPES[(gi + pi) % len(SHAPES)]
            write = (WRITE_NONE, WRITE_LOGITS, WRITE_PREDS)[(gi + 2 * pi) % 3]
            if write == WRITE_LOGITS:
                out = (torch.float32, torch.float16, torch.bfloat16)[(gi + pi) % 3]
            else:
                out = (torch.int32, torch.int64)[(gi + pi) % 2]
            is_last = (gi * 8 + pi) % 5 == 0
            rows.append(pytest.param(g, case, n, c, write, out, is_last, gi * 8 + pi,
                                     id=f"G{g}-{case[0]}-k{case[1]}{'-vote' if case[2] else ''}"
                                     f"-N{n}-C{c}-w{write}-{str(out)[6:]}"
                                     f"{'-last' if is_last else ''}"))
    return rows


@pytest.mark.parametrize(("g", "case", "n", "c", "write", "out_kind", "is_last", "seed"),
                         exit_rows())
def test_exit_epilogue_matches_reference(driver: Path, g: int, case: tuple[str, int, bool],
                                         n: int, c: int, write: int, out_kind: torch.dtype,
                                         is_last: bool, seed: int) -> None:
    """Every group size (threads per row) and policy: score, decision, argmax, keep and the
    write variant's buffers against the reference on the same fp32 logits."""
    policy, k, use_vote = case
    gen = torch.Generator().manual_seed(seed)
    logits = edge_logits(n, c, gen)
    prev_scores, prev_preds = history(n, c, k, logits, gen)
    sched_w = torch.randn(c + 2 + k + int(use_vote), generator=gen) if policy == "eenet" \
        else torch.zeros(0)
    sched_bias = 0.3 if policy == "eenet" else 0.0
    kw = {"prev_scores": prev_scores if policy == "eenet" else None,
          "prev_preds": prev_preds if policy == "patience" or use_vote else None,
          "sched_weight": sched_w if policy == "eenet" else None,
          "sched_bias": sched_bias, "use_vote": use_vote}
    want_score = ref.policy_score(logits, policy, **kw)
    threshold = choose_threshold(policy, k, want_score, gen, seed)
    n0 = 2 * n + 3
    row_index = torch.randperm(n0, generator=gen)[:n]
    if n >= 9:  # out of range: never written (the CUDA kernel cannot raise)
        row_index[0], row_index[3] = -1, n0 + 2
    exit_index = 5
    words: list[Any] = ["exit", n, c, g, POLICY_CODES[policy], threshold, is_last, k,
                        sched_bias, use_vote, write, n0, DTYPE_CODES[out_kind], exit_index,
                        (seed % 2) == 0]
    words += logits.flatten().tolist() + prev_scores.flatten().tolist()
    words += [*prev_preds.flatten().tolist(), sched_w.numel(), *sched_w.tolist()]
    words += row_index.tolist()
    got = parse_lines(run(driver, words))

    score = floats(got["score"])
    exit_mask = ints(got["exit"]).bool()
    pred = ints(got["pred"])
    keep = ints(got["keep"]).bool()
    want_mask = torch.ones(n, dtype=torch.bool) if is_last else want_score >= threshold
    tol = 0.0 if policy == "patience" else 1e-6 + 2 * c * U32
    assert_scores_close(score, want_score, torch.full((n,), tol, dtype=torch.float64))
    assert_decisions_agree(exit_mask, want_mask, want_score, threshold, tol, is_last)
    assert torch.equal(exit_mask, torch.ones(n, dtype=torch.bool) if is_last
                       else score >= threshold)
    assert torch.equal(pred, logits.argmax(dim=1) if n else pred)
    assert torch.equal(keep, ~exit_mask)
    if n >= 9:
        assert not bool(torch.isfinite(score[1:6]).any()), "NaN/inf rows: NaN score"
        assert exit_mask[1:6].tolist() == [is_last] * 5

    # the write: exiting rows with an in-range index, at that index; nothing else
    out_score = floats(got["out_score"])
    out_exit = ints(got["out_exit"])
    out_logits = got["out_logits"]
    writes = exit_mask & (row_index >= 0) & (row_index < n0) & (write != WRITE_NONE)
    at = row_index[writes]
    written = torch.zeros(n0, dtype=torch.bool)
    written[at] = True
    assert torch.equal(out_exit[written], torch.full((int(written.sum()),), exit_index))
    assert bool((out_exit[~written] == -1).all())
    assert torch.equal(out_score[at].isnan(), score[writes].isnan())
    assert torch.equal(out_score[at].nan_to_num(), score[writes].nan_to_num())
    assert bool((out_score[~written] == -5.0).all())
    if write == WRITE_LOGITS:
        if out_kind == torch.float32:
            buf = floats(out_logits).reshape(n0, c)
            want = logits[writes]
            assert torch.equal(buf[at].isnan(), want.isnan())
            assert torch.equal(buf[at].nan_to_num(), want.nan_to_num())
            assert bool((buf[~written] == -1000.0).all())
        else:
            buf = ints(out_logits).reshape(n0, c)
            want = logits[writes].to(out_kind)
            bits = want.view(torch.int16).long() & 0xFFFF
            nan = want.isnan()
            assert torch.equal(buf[at][~nan], bits[~nan]), "fp16/bf16 casts differ from torch"
            assert bool(nan_bits(buf[at][nan], out_kind).all())
            assert bool((buf[~written] == 0xFFFF).all())
    elif write == WRITE_PREDS:
        buf = ints(out_logits)
        assert torch.equal(buf[at], pred[writes])
        assert bool((buf[~written] == -1).all())


def nan_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whether 16-bit patterns are NaNs of ``dtype``."""
    if dtype == torch.float16:
        return ((bits & 0x7C00) == 0x7C00) & ((bits & 0x3FF) != 0)
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x7F) != 0)


def test_group_size_does_not_change_results(driver: Path) -> None:
    """The same rows decided with every group size: identical argmax and decisions, scores
    within fp32 rounding of each other (only the summation order differs)."""
    gen = torch.Generator().manual_seed(11)
    n, c = 9, 300
    logits = edge_logits(n, c, gen)
    results = []
    for g in GROUPS:
        words = ["exit", n, c, g, POLICY_CODES["entropy"], 0.1, False, 0, 0.0, False,
                 WRITE_NONE, 1, 0, 0, True] + logits.flatten().tolist() + [0] + [0] * n
        results.append(parse_lines(run(driver, words)))
    for r in results[1:]:
        assert r["pred"] == results[0]["pred"] and r["exit"] == results[0]["exit"]
        torch.testing.assert_close(floats(r["score"]), floats(results[0]["score"]),
                                   atol=2e-6, rtol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------
# Pooling over S.


@pytest.mark.parametrize("s", (1, 2, 3, 5, 31, 32, 33, 100))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=lambda d: str(d)[6:])
def test_mean_pool_matches_torch(driver: Path, dtype: torch.dtype, s: int) -> None:
    """Lanes per output (pool_lanes), their partial sums over S and the lanes' reduction,
    contiguous and transposed layouts, against feats.float().mean(2)."""
    gen = torch.Generator().manual_seed(s)
    n, d = 3, 5
    x = (torch.randn(n, d, s, generator=gen) * 4).to(dtype)
    for transposed in (False, True):
        vals = x.flatten().tolist() if dtype == torch.float32 else \
            (x.view(torch.int16).long() & 0xFFFF).flatten().tolist()
        got = floats(run(driver, ["pool", n, d, s, DTYPE_CODES[dtype], transposed, *vals])
                     .split()).reshape(n, d)
        want = x.float().mean(dim=2)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Compaction.

MASKS = ("all", "none", "random", "single", "bytes")
SLOT_SPECS = (  # (row_bytes, extra stride bytes, src offset, dst offset)
    (1, 0, 0, 0), (2, 2, 2, 0), (3, 1, 1, 5), (4, 0, 4, 4), (8, 8, 0, 8), (12, 4, 4, 0),
    (16, 0, 0, 16), (40, 24, 8, 0), (100, 0, 3, 0), (256, 16, 0, 0), (24, 0, 16, 16),
)


def keep_bytes(n: int, kind: str, rng: random.Random) -> list[int]:
    if kind == "all":
        return [1] * n
    if kind == "none":
        return [0] * n
    if kind == "single":
        return [int(i == n // 2) for i in range(n)]
    bits = [rng.random() < 0.5 for _ in range(n)]
    if kind == "random":
        return [int(b) for b in bits]
    return [rng.choice((1, 2, 127, 128, 255)) if b else 0 for b in bits]  # non-canonical


def word_log2(row_bytes: int, stride: int, src_off: int, dst_off: int) -> int:
    """Independent: the widest of 16/8/4/2/1 dividing the sizes and offsets (the driver's
    buffers start 64-byte aligned)."""
    for lg in (4, 3, 2, 1):
        w = 1 << lg
        if all(v % w == 0 for v in (row_bytes, stride, src_off, dst_off)):
            return lg
    return 0


def compact_rows() -> list[Any]:
    rows = []
    sizes = (0, 1, 7, 64, 1000)
    configs = (  # (nthreads, gx cap, gy cap, chunk words, tile words, max rows)
        (256, 0, 0, 1024, 4096, 4096),  # the kernel's own geometry
        (7, 2, 3, 3, 10, 5),            # small tiles and chunks; grids smaller than the work
        (33, 1, 1, 2, 4, 3),            # one block does everything
        (5, 3, 2, 16, 16, 1000),
    )
    i = 0
    for n in sizes:
        for kind in MASKS:
            for zero_tail in (False, True):
                cfg = configs[i % len(configs)]
                rows.append(pytest.param(n, kind, zero_tail, cfg, i,
                                         id=f"N{n}-{kind}-{'functional' if zero_tail else 'out'}"
                                         f"-cfg{i % len(configs)}"))
                i += 1
    return rows


@pytest.mark.parametrize(("n", "kind", "zero_tail", "cfg", "seed"), compact_rows())
def test_compact_blocks_match_boolean_index(driver: Path, n: int, kind: str, zero_tail: bool,
                                            cfg: tuple[int, ...], seed: int) -> None:
    """Select predicate, table plan, grid and every block's copy: dst[:m] = src[keep], then
    zeros up to N (functional form) or the untouched sentinel (out form)."""
    rng = random.Random(seed)
    nthreads, gx_cap, gy_cap, chunk_words, tile_words, max_rows = cfg
    keep = keep_bytes(n, kind, rng)
    specs = [SLOT_SPECS[(seed + j) % len(SLOT_SPECS)] for j in range(3 + seed % 3)]
    extra_rows = 0 if zero_tail else seed % 4
    words: list[Any] = ["compact", n, zero_tail, nthreads, gx_cap, gy_cap, chunk_words,
                        tile_words, max_rows, len(specs), *keep]
    srcs = []
    for row_bytes, pad, src_off, dst_off in specs:
        stride = row_bytes + pad
        data = bytes(rng.randrange(256) for _ in range((n - 1) * stride + row_bytes)) if n \
            else b""
        srcs.append(data)
        words += [row_bytes, stride, src_off, dst_off, n + extra_rows, data.hex() or ""]
    got = parse_lines_multi(run(driver, words))
    kept = [i for i in range(n) if keep[i] != 0]
    m = len(kept)
    assert int(got["count"][0][0]) == m
    total, rows_per_tile, gx, gy = (int(v) for v in got["plan"][0])
    widest = 1
    want_total = 0
    for j, (row_bytes, pad, src_off, dst_off) in enumerate(specs):
        slot = got["slot"][j]
        lg = word_log2(row_bytes, row_bytes + pad, src_off, dst_off)
        words_per_row = row_bytes >> lg
        assert int(slot[1]) == words_per_row and int(slot[3]) == lg, f"slot {j} words"
        assert int(slot[2]) == want_total, f"slot {j} first chunk"
        assert int(slot[4]) == j, f"find_slot of slot {j}'s first chunk"
        want_total += -(-words_per_row // chunk_words)
        widest = max(widest, min(words_per_row, chunk_words))
    assert total == want_total
    assert rows_per_tile == max(1, min(max_rows, tile_words // widest))
    assert gx == max(1, -(-n // rows_per_tile)) and gy == max(1, min(total, 65535))
    for j, (row_bytes, pad, _, _) in enumerate(specs):
        stride = row_bytes + pad
        src = srcs[j]
        want = b"".join(src[i * stride:i * stride + row_bytes] for i in kept)
        if zero_tail:
            want += bytes(row_bytes * (n - m))
        else:
            want += b"\xab" * (row_bytes * (n + extra_rows - m))
        assert got["slot"][j][5:] == [want.hex()] or (not want and len(got["slot"][j]) == 5), \
            f"slot {j} ({row_bytes} bytes per row): rows differ from src[keep]"


def parse_lines_multi(out: str) -> dict[str, list[list[str]]]:
    lines: dict[str, list[list[str]]] = {}
    for line in out.splitlines():
        key, *rest = line.split()
        lines.setdefault(key, []).append(rest)
    return lines


def test_word_choice(driver: Path) -> None:
    """pick_word_log2 on sizes, strides and addresses of every alignment."""
    cases = [(rb, st, sa, da) for rb in (1, 2, 3, 4, 6, 8, 12, 16, 32, 48)
             for st in (rb, rb + 1, rb + 4, 2 * rb, 0) for sa in (0, 2, 8, 16)
             for da in (0, 4, 16)]
    got = run(driver, ["words", len(cases), *[v for case in cases for v in case]]).split()
    assert [int(g) for g in got] == [word_log2(*case) for case in cases]


# ---------------------------------------------------------------------------------------
# Conversions and geometry.


def test_fp16_bf16_conversions_match_torch(driver: Path) -> None:
    """fp32 -> fp16 / bf16 (round to nearest even, overflow, subnormals, ties) and every
    16-bit pattern -> fp32, bit for bit as torch converts (NaNs: any NaN)."""
    gen = torch.Generator().manual_seed(3)
    special = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e-8, 2.0**-24,
               2.0**-25, 3 * 2.0**-26, 2.0**-14, 2.0**-15 * 1.5, 1.0 + 2.0**-11,
               1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.4e38, -3.4e38, 1e-40,
               math.inf, -math.inf, math.nan]
    rand = (torch.randn(2000, generator=gen) * torch.exp2(torch.randint(-30, 30, (2000,),
                                                                          generator=gen))).tolist()
    values = torch.tensor([f32(v) for v in special] + rand, dtype=torch.float32)
    out = run(driver, ["convert", values.numel(), *values.tolist()]).splitlines()
    pairs = torch.tensor([[int(t) for t in line.split()] for line in out[:values.numel()]])
    for col, dtype in ((0, torch.float16), (1, torch.bfloat16)):
        want = values.to(dtype).view(torch.int16).long() & 0xFFFF
        nan = values.isnan()
        assert torch.equal(pairs[~nan, col], want[~nan]), f"fp32 -> {dtype}"
        assert bool(nan_bits(pairs[nan, col], dtype).all())
    widened = torch.tensor([[float(t) for t in line.split()] for line in out[values.numel():]])
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for col, dtype in ((0, torch.float16), (1, torch.bfloat16)):
        want = patterns.view(dtype).float()
        assert torch.equal(widened[:, col].isnan(), want.isnan()), f"{dtype} -> fp32 NaNs"
        ok = ~want.isnan()
        assert torch.equal(widened[ok, col], want[ok]), f"{dtype} -> fp32"


def test_launch_geometry(driver: Path) -> None:
    """exit_group_size: a power of two in [1, 256], never more than one class per thread
    (above 1) and about 8 classes per thread unless the rows leave SMs idle; blocks cover
    the rows; pool_lanes: min(32, next power of two >= S)."""
    cases = [(n, c, sms, s) for n in (1, 7, 64, 4096, 10**6) for c in (2, 3, 10, 100, 1000, 50000)
             for sms in (1, 132) for s in (1, 3, 32, 100)]
    out = run(driver, ["geometry", len(cases), *[v for case in cases for v in case]])
    for (n, c, sms, s), line in zip(cases, out.splitlines(), strict=True):
        g, blocks, lanes, pool_blocks = (int(v) for v in line.split())
        assert g & (g - 1) == 0 and 1 <= g <= 256
        base = min(256, 1 << max(0, math.ceil(math.log2(math.ceil(c / 8)))))
        assert g >= base and (g == base or g <= 1 << math.ceil(math.log2(c)))
        if g > base:  # widened only while the rows alone left SMs idle
            assert math.ceil(n * (g // 2) / 256) < sms
        assert blocks == max(1, math.ceil(n / (256 // g)))
        assert lanes == min(32, 1 << math.ceil(math.log2(s)))
        assert pool_blocks == max(1, math.ceil(n * 3 / (256 // lanes)))


def test_kernel_sources_have_no_torch_includes() -> None:
    """The kernel headers and the kernels' translation units are plain CUDA C++: the host test
    and any build can include the headers, and nvcc never parses torch's headers (the
    launchers that need torch are the .cpp files, compiled once by the host compiler)."""
    sources = sorted([*CUDA_SRC.glob("*.cuh"), *CUDA_SRC.glob("*.cu"),
                      *CUDA_SRC.glob("*_launch.h")])
    assert len(sources) >= 6, sources
    for path in sources:
        text = path.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/", "checks.h"):
            assert banned not in text, f"{path.name} includes {banned}"
    assert os.path.isdir(CUDA_SRC)
