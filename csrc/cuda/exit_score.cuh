// CUDA kernels of eenet::exit_score / eenet::exit_score_write: everything after the
// classifier GEMM, fused into one kernel, plus the mean pooling of (N, D, S) features that
// comes before it.
//
// Pipeline of one call (csrc/cuda/exit_score.cu):
//   1. (N, D, S) feats: mean_pool_kernel reduces over S into an (N, D) fp32 buffer, reading
//      along S (the contiguous dimension of a (N, D, S) tensor): a group of L = pool_lanes(S)
//      lanes per (n, d) output, coalesced reads, fp32 accumulation. 2-D fp16/bf16 feats are
//      upcast by ATen. The GEMM then never re-reads the S positions.
//   2. logits = x @ weight^T + bias in fp32 by ATen (at::addmm: cuBLAS), on upcast operands:
//      the semantics of the reference and the CPU kernel (fp32 products and sums), so the CUDA
//      results get the fp32 tolerance, not a low-precision-dot one.
//   3. exit_epilogue_kernel: one group of G threads per row (G = exit_group_size(N, C, SMs),
//      a power of two from 1 to 256; groups above a warp combine through shared memory).
//      Pass 1 over the row's C logits: the argmax (first maximum; the first NaN wins, as
//      torch.argmax) and finiteness; pass 2 (finite rows, re-read from L1/L2): the softmax
//      sums relative to the row max (sum e, sum e (z - m), sum e w_c for EENet), all fp32.
//      Then the policy score from those statistics and the history (prev_scores /
//      prev_preds), the decision score >= threshold (NaN never exits; is_last takes every
//      row), the row's score / exit / pred / keep, and for exit_score_write the scatter of
//      an exiting row's logits (cast to out_logits' dtype) or argmax, score and exit index to
//      position row_index[i]. Out-of-range row_index values are skipped (checking them would
//      cost a host sync).
//
// The per-row arithmetic (argmax_push / argmax_merge, sums_push / sums_merge, decide_row,
// the result writes) is __host__ __device__: tests/test_cuda_host.py runs it on the CPU,
// lane by lane in the kernel's reduction order, against the reference.
#pragma once

#include "common.cuh"

namespace eenet {
namespace cuda {

enum Policy : int32_t { kMaxProb = 0, kEntropy = 1, kPatience = 2, kEENet = 3 };
enum WriteKind : int32_t { kWriteNone = 0, kWriteLogits = 1, kWritePreds = 2 };

constexpr int kExitThreads = 256;  // threads per block of exit_epilogue_kernel
constexpr int kMaxGroup = 256;     // threads per row, at most one block
constexpr int kPoolThreads = 256;  // threads per block of mean_pool_kernel
constexpr int32_t kNoIndex = 0x7fffffff;

// Everything the epilogue reads and writes, as raw pointers (the launcher's tensors).
struct ExitParams {
  const float* logits;  // (N, C) fp32, contiguous
  int64_t n;
  int32_t c;
  float log_c;  // logf(C), computed once on the host as the CPU kernel does
  int32_t policy;
  float threshold;
  bool is_last;
  int64_t k;                 // history length (earlier exits)
  const float* prev_scores;  // (N, k) fp32, strided; eenet only
  int64_t ps_stride0, ps_stride1;
  const void* prev_preds;  // (N, k) int32 / int64, strided; patience / vote only
  int64_t pp_stride0, pp_stride1;
  bool prev_preds_64;
  const float* sched_w;  // (C + 2 + k [+ 1],) contiguous; eenet only
  float sched_bias;
  bool use_vote;
  // per-row outputs
  float* score;
  uint8_t* exit_mask;
  int64_t* pred;
  uint8_t* keep;
  // exit_score_write
  int32_t write;  // WriteKind
  const void* row_index;
  int64_t row_index_stride;
  bool row_index_64;
  void* out_logits;  // (N0, C) float of out_logits_dtype, or (N0,) int32 / int64 (preds)
  int32_t out_logits_dtype;
  float* out_score;
  void* out_exit;
  bool out_exit_64;
  int64_t exit_index;
  int64_t n0;
};

// ---------------------------------------------------------------------------------------
// Per-row statistics, accumulated lane by lane and merged across lanes.

// Pass 1: the argmax with torch.argmax semantics and the row's finiteness. `best` / `idx`:
// the largest non-NaN value and its first index; `nan_idx`: the first NaN's index.
struct ArgmaxState {
  float best;
  int32_t idx;
  int32_t nan_idx;
  int32_t nonfinite;  // 1 once a NaN or +-inf was seen
};

EENET_HD ArgmaxState argmax_init() { return ArgmaxState{-inf_f(), kNoIndex, kNoIndex, 0}; }

// Ordered merge key: a larger value wins, equal values go to the smaller index. Indices
// start at kNoIndex, so the first value pushed (even -inf) always wins over "none".
EENET_HD bool argmax_takes(float best, int32_t idx, float v, int32_t j) {
  return v > best || (v == best && j < idx);
}

// Push logit z of class j (any order of j within a lane; the merge is order independent).
EENET_HD void argmax_push(ArgmaxState& s, float z, int32_t j) {
  if (is_nan(z)) {
    s.nonfinite = 1;
    if (j < s.nan_idx) s.nan_idx = j;
    return;
  }
  if (!is_finite(z)) s.nonfinite = 1;
  if (argmax_takes(s.best, s.idx, z, j)) {
    s.best = z;
    s.idx = j;
  }
}

// Commutative and associative: every lane of a butterfly ends with the same state.
EENET_HD ArgmaxState argmax_merge(ArgmaxState a, const ArgmaxState& b) {
  if (argmax_takes(a.best, a.idx, b.best, b.idx)) {
    a.best = b.best;
    a.idx = b.idx;
  }
  if (b.nan_idx < a.nan_idx) a.nan_idx = b.nan_idx;
  a.nonfinite |= b.nonfinite;
  return a;
}

// The row's argmax: the first NaN if there is one, else the first maximum.
EENET_HD int32_t argmax_index(const ArgmaxState& a) {
  if (a.nan_idx != kNoIndex) return a.nan_idx;
  return a.idx == kNoIndex ? 0 : a.idx;
}

// Pass 2 (finite rows): sums over t = z - m with m the row max. H = log(sum e) - sum e t /
// sum e stays exact for logits of any magnitude; a class whose e underflowed adds nothing,
// also where t is -inf (finite logits whose spread exceeds the float range).
struct SoftmaxSums {
  float e;   // sum exp(t)
  float et;  // sum exp(t) t
  float ew;  // sum exp(t) sched_w[c] (eenet)
};

EENET_HD SoftmaxSums sums_init() { return SoftmaxSums{0.f, 0.f, 0.f}; }

EENET_HD void sums_push(SoftmaxSums& s, float z, float m, float w) {
  const float t = z - m;
  const float e = expf(t);
  s.e += e;
  s.et += e > 0.f ? e * t : 0.f;
  s.ew += e * w;
}

EENET_HD SoftmaxSums sums_merge(SoftmaxSums a, const SoftmaxSums& b) {
  a.e += b.e;
  a.et += b.et;
  a.ew += b.ew;
  return a;
}

struct RowDecision {
  float score;
  int32_t pred;
  bool exit;
};

// The policy score and the decision of row i from its merged statistics (as score_row in
// csrc/cpu/exit_score.cpp). Rows with a NaN/inf logit: NaN score, exit only at the last exit.
EENET_HD RowDecision decide_row(const ExitParams& p, int64_t i, const ArgmaxState& a,
                                const SoftmaxSums& s) {
  RowDecision r;
  r.pred = argmax_index(a);
  if (a.nonfinite) {
    r.score = nan_f();
    r.exit = p.is_last;
    return r;
  }
  const float max_p = 1.f / s.e;
  const float entropy = logf(s.e) - s.et / s.e;
  const float conf_raw = 1.f - entropy / p.log_c;
  const float conf = conf_raw < 0.f ? 0.f : conf_raw;  // the reference's clamp at 0
  float score = 0.f;
  if (p.policy == kMaxProb) {
    score = max_p;
  } else if (p.policy == kEntropy) {
    score = conf;
  } else if (p.policy == kPatience) {
    int64_t streak = 0;
    for (int64_t j = p.k - 1; j >= 0; --j) {
      const int64_t q = load_index(p.prev_preds, i * p.pp_stride0 + j * p.pp_stride1,
                                   p.prev_preds_64);
      if (q != r.pred) break;
      ++streak;
    }
    score = static_cast<float>(streak);
  } else {
    const float* w = p.sched_w;
    const int64_t c = p.c;
    float acc = p.sched_bias + s.ew / s.e + max_p * w[c] + conf * w[c + 1];
    for (int64_t j = 0; j < p.k; ++j)
      acc += p.prev_scores[i * p.ps_stride0 + j * p.ps_stride1] * w[c + 2 + j];
    if (p.use_vote && p.k > 0) {
      int64_t agree = 0;
      for (int64_t j = 0; j < p.k; ++j)
        agree += load_index(p.prev_preds, i * p.pp_stride0 + j * p.pp_stride1,
                            p.prev_preds_64) == r.pred;
      acc += static_cast<float>(agree) / static_cast<float>(p.k) * w[c + 2 + p.k];
    }
    score = 1.f / (1.f + expf(-acc));
  }
  r.score = score;
  r.exit = p.is_last || score >= p.threshold;  // NaN compares false
  return r;
}

// The row's own outputs (one thread per row writes them).
EENET_HD void store_row(const ExitParams& p, int64_t i, const RowDecision& r) {
  p.score[i] = r.score;
  p.exit_mask[i] = r.exit ? 1 : 0;
  p.pred[i] = r.pred;
  p.keep[i] = r.exit ? 0 : 1;
}

// exit_score_write: the position row i is written to, or -1 (no write: not exiting, not the
// write variant, or a row_index value outside [0, N0)).
EENET_HD int64_t write_target(const ExitParams& p, int64_t i, const RowDecision& r) {
  if (p.write == kWriteNone || !r.exit) return -1;
  const int64_t at = load_index(p.row_index, i * p.row_index_stride, p.row_index_64);
  return at >= 0 && at < p.n0 ? at : -1;
}

// out_score, out_exit and (preds form) out_logits at position `at` (one thread).
EENET_HD void write_scalars(const ExitParams& p, int64_t at, const RowDecision& r) {
  p.out_score[at] = r.score;
  store_index(p.out_exit, at, p.out_exit_64, p.exit_index);
  if (p.write == kWritePreds) store_index(p.out_logits, at, p.out_logits_dtype == kI64, r.pred);
}

// Logit j of a row written at position `at` (logits form; every lane writes its classes).
EENET_HD void write_logit(const ExitParams& p, int64_t at, int64_t j, float z) {
  store_float(p.out_logits, at * p.c + j, p.out_logits_dtype, z);
}

// ---------------------------------------------------------------------------------------
// Launch geometry (host side; pure functions so that the host test covers them).

// Threads per row of the epilogue: about 8 classes per thread, a power of two in [1, 256];
// doubled (up to one class per thread) while the rows alone would leave SMs idle.
EENET_HD int exit_group_size(int64_t n, int64_t c, int num_sms) {
  int64_t g = min64(kMaxGroup, next_pow2(ceil_div(c, 8)));
  const int64_t cap = min64(kMaxGroup, next_pow2(c));
  while (g < cap && ceil_div(n * g, kExitThreads) < num_sms) g *= 2;
  return static_cast<int>(g);
}

EENET_HD int64_t exit_blocks(int64_t n, int group) {
  return min64(kMaxBlocks, max64(1, ceil_div(n, kExitThreads / group)));
}

// Lanes per pooled output: S positions read by up to 32 lanes (a power of two).
EENET_HD int pool_lanes(int64_t s) { return static_cast<int>(min64(32, next_pow2(s))); }

EENET_HD int64_t pool_blocks(int64_t outputs, int lanes) {
  return min64(kMaxBlocks, max64(1, ceil_div(outputs, kPoolThreads / lanes)));
}

struct PoolParams {
  const void* x;  // (N, D, S) of dtype DT, strided
  int64_t n, d, s;
  int64_t stride_n, stride_d, stride_s;
  float* out;  // (N, D) fp32 contiguous
};

// Mean over S of output r = n * D + d, lane `lane` of `lanes` summing s = lane, lane + lanes,
// ... (the kernel then adds the lanes' partial sums).
template <int32_t DT>
EENET_HD float pool_partial(const PoolParams& p, int64_t r, int lane, int lanes) {
  const int64_t base = (r / p.d) * p.stride_n + (r % p.d) * p.stride_d;
  float acc = 0.f;
  for (int64_t s = lane; s < p.s; s += lanes) acc += load_float_t<DT>(p.x, base + s * p.stride_s);
  return acc;
}

#if defined(__CUDACC__)
// ---------------------------------------------------------------------------------------
// Device code.

EENET_DEVICE ArgmaxState shfl_xor(const ArgmaxState& s, int offset) {
  ArgmaxState o;
  o.best = __shfl_xor_sync(0xffffffffu, s.best, offset);
  o.idx = __shfl_xor_sync(0xffffffffu, s.idx, offset);
  o.nan_idx = __shfl_xor_sync(0xffffffffu, s.nan_idx, offset);
  o.nonfinite = __shfl_xor_sync(0xffffffffu, s.nonfinite, offset);
  return o;
}

EENET_DEVICE SoftmaxSums shfl_xor(const SoftmaxSums& s, int offset) {
  return SoftmaxSums{__shfl_xor_sync(0xffffffffu, s.e, offset),
                     __shfl_xor_sync(0xffffffffu, s.et, offset),
                     __shfl_xor_sync(0xffffffffu, s.ew, offset)};
}

EENET_DEVICE float shfl_xor(float v, int offset) {
  return __shfl_xor_sync(0xffffffffu, v, offset);
}

EENET_DEVICE ArgmaxState merge(const ArgmaxState& a, const ArgmaxState& b) {
  return argmax_merge(a, b);
}
EENET_DEVICE SoftmaxSums merge(const SoftmaxSums& a, const SoftmaxSums& b) {
  return sums_merge(a, b);
}

// All-reduce over the G consecutive threads of a group (G a power of two, groups aligned):
// a butterfly inside the warp, then, for groups wider than a warp, the warps' results in
// shared memory merged in warp order by every thread. Every thread of the block must call
// it (G > 32 synchronises the block); every thread of a group gets the same result.
template <int G, typename T>
EENET_DEVICE T group_allreduce(T v, T* smem) {
  constexpr int kWidth = G < 32 ? G : 32;
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset >>= 1) v = merge(v, shfl_xor(v, offset));
  if constexpr (G > 32) {
    __syncthreads();  // the previous reduction's readers are done with smem
    if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
    __syncthreads();
    const int first = (threadIdx.x / G) * (G / 32);
    v = smem[first];
#pragma unroll
    for (int w = 1; w < G / 32; ++w) v = merge(v, smem[first + w]);
  }
  return v;
}

template <int G>
__global__ void __launch_bounds__(kExitThreads) exit_epilogue_kernel(const ExitParams p) {
  static_assert(G >= 1 && G <= kMaxGroup && (G & (G - 1)) == 0, "G: a power of two <= 256");
  constexpr int kRows = kExitThreads / G;
  constexpr int kWarps = kExitThreads / 32;
  __shared__ ArgmaxState smem_a[G > 32 ? kWarps : 1];
  __shared__ SoftmaxSums smem_s[G > 32 ? kWarps : 1];
  const int lane = threadIdx.x % G;
  const int group = threadIdx.x / G;
  const int32_t c = p.c;
  const bool eenet = p.policy == kEENet;
  // `base` is the same for the whole block: every thread runs the same iterations and
  // reaches every shuffle and barrier
  for (int64_t base = int64_t(blockIdx.x) * kRows; base < p.n;
       base += int64_t(gridDim.x) * kRows) {
    const int64_t i = base + group;
    const bool valid = i < p.n;
    const float* z = p.logits + (valid ? i : 0) * int64_t(c);

    ArgmaxState a = argmax_init();
    if (valid)
      for (int32_t j = lane; j < c; j += G) argmax_push(a, __ldg(z + j), j);
    a = group_allreduce<G>(a, smem_a);

    SoftmaxSums s = sums_init();
    if (valid && !a.nonfinite) {
      const float m = a.best;
      for (int32_t j = lane; j < c; j += G)
        sums_push(s, __ldg(z + j), m, eenet ? __ldg(p.sched_w + j) : 0.f);
    }
    s = group_allreduce<G>(s, smem_s);

    if (valid) {
      // every lane decides (same inputs, same result): no broadcast needed
      const RowDecision r = decide_row(p, i, a, s);
      if (lane == 0) store_row(p, i, r);
      const int64_t at = write_target(p, i, r);
      if (at >= 0) {
        if (lane == 0) write_scalars(p, at, r);
        if (p.write == kWriteLogits)
          for (int32_t j = lane; j < c; j += G) write_logit(p, at, j, __ldg(z + j));
      }
    }
  }
}

template <int32_t DT, int L>
__global__ void __launch_bounds__(kPoolThreads) mean_pool_kernel(const PoolParams p) {
  constexpr int kOutputs = kPoolThreads / L;
  const int lane = threadIdx.x % L;
  const int64_t total = p.n * p.d;
  for (int64_t base = int64_t(blockIdx.x) * kOutputs; base < total;
       base += int64_t(gridDim.x) * kOutputs) {
    const int64_t r = base + threadIdx.x / L;
    float acc = r < total ? pool_partial<DT>(p, r, lane, L) : 0.f;
#pragma unroll
    for (int offset = L / 2; offset > 0; offset >>= 1) acc += shfl_xor(acc, offset);
    if (lane == 0 && r < total) p.out[r] = acc / static_cast<float>(p.s);
  }
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace eenet
