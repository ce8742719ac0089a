// C++ CPU kernels of eenet::exit_score and eenet::exit_score_write.
//
// The classifier GEMM goes to ATen's BLAS in fp32 (fp16/bf16 inputs are upcast, as in
// reference.py); everything after it is one fused pass per row: softmax statistics without
// materialising probabilities, the policy score, the threshold decision and, for the write
// variant, the scatter of exiting rows into the caller's output buffers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "../checks.h"

namespace eenet {
namespace {

enum class Policy { kMaxProb, kEntropy, kPatience, kEENet };

Policy parse_policy(const std::string& p) {
  if (p == "max_prob") return Policy::kMaxProb;
  if (p == "entropy") return Policy::kEntropy;
  if (p == "patience") return Policy::kPatience;
  return Policy::kEENet;  // checked beforehand
}

struct RowDecision {
  float score;
  int64_t pred;
  bool exit;
};

// Everything the per-row pass reads, as raw pointers into contiguous fp32/int64 tensors.
struct ScoringInputs {
  const float* logits;        // (N, C)
  int64_t classes;
  Policy policy;
  float threshold;
  bool is_last;
  const float* prev_scores;   // (N, k) or null
  const int64_t* prev_preds;  // (N, k) or null
  int64_t history;            // k
  const float* sched_weight;  // (C + 2 + k [+ 1]) or null
  float sched_bias;
  bool use_vote;
};

// exp(x) for x <= 0 (every argument here is z - max z), written branch-free so that the
// loops over it vectorise, which std::exp prevents. x = n ln2 + r with |r| <= ln2 / 2 (ln2
// split in two for an exact n ln2), exp(r) by its degree-6 Taylor polynomial (relative error
// below 2e-7), 2^n put straight into the exponent bits. Below -87, where exp(x) < 2^-125,
// the result is 0 (what fp32 exp gives from about -104 on): next to the 1 that every softmax
// sum holds it is nothing, and a zero keeps e * x terms exactly zero for x down to -inf.
inline float exp_nonpositive(float x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to int
  const float xc = x > -87.f ? x : -87.f;
  const float n = (xc * 1.44269504f + kRound) - kRound;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x > -87.f ? p * scale : 0.f;
}

// torch.argmax of a row with a NaN or inf: first maximum, a NaN counting as the maximum.
int64_t argmax_nonfinite(const float* z, int64_t c) {
  float m = z[0];
  int64_t pred = 0;
  for (int64_t j = 1; j < c; ++j) {
    if (!std::isnan(m) && (z[j] > m || std::isnan(z[j]))) {
      m = z[j];
      pred = j;
    }
  }
  return pred;
}

// The scoring loops are worth 3x more with AVX2 + FMA than with the SSE2 baseline of the build:
// GCC compiles this function twice and picks the version once, when the library loads.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define EENET_X86_64_V3_CLONE __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EENET_X86_64_V3_CLONE
#endif

EENET_X86_64_V3_CLONE RowDecision score_row(const ScoringInputs& in, int64_t i) {
  const int64_t c = in.classes;
  const float* z = in.logits + i * c;
  // z * 0 is NaN exactly for NaN and inf, so the sum is NaN iff the row is not finite
  float probe = 0.f, m = z[0];
#pragma omp simd reduction(+ : probe) reduction(max : m)
  for (int64_t j = 0; j < c; ++j) {
    probe += z[j] * 0.f;
    m = z[j] > m ? z[j] : m;
  }
  if (std::isnan(probe)) {
    return {std::numeric_limits<float>::quiet_NaN(), argmax_nonfinite(z, c), in.is_last};
  }
  int64_t pred = 0;
  while (z[pred] != m) ++pred;  // the first maximum, as torch.argmax

  // sums over the shifted logits z - m: H = log(sum e) - sum e (z - m) / sum e stays exact
  // however large |m| is (the unshifted form cancels catastrophically)
  float sum_e = 0.f, sum_et = 0.f;
#pragma omp simd reduction(+ : sum_e, sum_et)
  for (int64_t j = 0; j < c; ++j) {
    const float t = z[j] - m;
    const float e = exp_nonpositive(t);
    sum_e += e;
    // a class whose e underflowed adds nothing, also where t is -inf (finite logits whose
    // spread exceeds the float range: 0 * -inf would be NaN)
    sum_et += e > 0.f ? e * t : 0.f;
  }
  const float max_p = 1.f / sum_e;
  const float entropy = std::log(sum_e) - sum_et / sum_e;
  const float conf_raw = 1.f - entropy / std::log(static_cast<float>(c));
  // clamped at 0 as the reference does (a uniform row rounds a few ulp below); NaN stays NaN
  const float conf = conf_raw < 0.f ? 0.f : conf_raw;

  const int64_t* prev = in.prev_preds ? in.prev_preds + i * in.history : nullptr;
  float score = 0.f;
  switch (in.policy) {
    case Policy::kMaxProb: score = max_p; break;
    case Policy::kEntropy: score = conf; break;
    case Policy::kPatience: {
      int64_t streak = 0;
      for (int64_t j = in.history - 1; j >= 0 && prev[j] == pred; --j) ++streak;
      score = static_cast<float>(streak);
      break;
    }
    case Policy::kEENet: {
      const float* w = in.sched_weight;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < c; ++j) dot += exp_nonpositive(z[j] - m) * w[j];
      float acc = in.sched_bias + dot / sum_e + max_p * w[c] + conf * w[c + 1];
      const float* q = in.prev_scores + i * in.history;
      for (int64_t j = 0; j < in.history; ++j) acc += q[j] * w[c + 2 + j];
      if (in.use_vote && in.history > 0) {
        int64_t agree = 0;
        for (int64_t j = 0; j < in.history; ++j) agree += prev[j] == pred;
        acc += static_cast<float>(agree) / static_cast<float>(in.history) * w[c + 2 + in.history];
      }
      score = 1.f / (1.f + std::exp(-acc));
      break;
    }
  }
  return {score, pred, in.is_last || score >= in.threshold};
}

using ExitResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct Prepared {
  at::Tensor logits, score, exit_mask, pred, keep;
  at::Tensor prev_scores, prev_preds, sched_weight;  // kept alive for the raw pointers
  ScoringInputs in;
};

Prepared prepare(const at::Tensor& feats, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, const std::string& policy,
                 double threshold, bool is_last, const std::optional<at::Tensor>& prev_scores,
                 const std::optional<at::Tensor>& prev_preds,
                 const std::optional<at::Tensor>& sched_weight, double sched_bias,
                 bool use_vote) {
  // under torch.autocast the dispatcher would run the GEMM below in half precision
  const c10::impl::ExcludeDispatchKeyGuard fp32_gemm(c10::autocast_dispatch_keyset);
  Prepared p;
  at::Tensor x = feats.to(at::kFloat);
  if (x.dim() == 3) x = x.mean(2);
  const at::Tensor w_t = weight.to(at::kFloat).t();
  p.logits = (bias ? at::addmm(bias->to(at::kFloat), x, w_t) : at::mm(x, w_t)).contiguous();
  const int64_t n = feats.size(0);
  p.score = at::empty({n}, feats.options().dtype(at::kFloat));
  p.exit_mask = at::empty({n}, feats.options().dtype(at::kBool));
  p.pred = at::empty({n}, feats.options().dtype(at::kLong));
  p.keep = at::empty({n}, feats.options().dtype(at::kBool));
  const Policy pol = parse_policy(policy);
  const bool needs_preds = pol == Policy::kPatience || use_vote;
  if (pol == Policy::kEENet) {
    p.prev_scores = prev_scores->contiguous();
    p.sched_weight = sched_weight->contiguous();
  }
  if (needs_preds) p.prev_preds = prev_preds->to(at::kLong).contiguous();
  p.in = ScoringInputs{
      p.logits.data_ptr<float>(),
      weight.size(0),
      pol,
      threshold_as_float(threshold),
      is_last,
      pol == Policy::kEENet ? p.prev_scores.data_ptr<float>() : nullptr,
      needs_preds ? p.prev_preds.data_ptr<int64_t>() : nullptr,
      pol == Policy::kEENet ? p.prev_scores.size(1)
                            : (needs_preds ? p.prev_preds.size(1) : 0),
      pol == Policy::kEENet ? p.sched_weight.data_ptr<float>() : nullptr,
      static_cast<float>(sched_bias),
      use_vote,
  };
  return p;
}

// One fused pass: decide each row, then hand the row to `on_row` (the result writer).
template <typename OnRow>
void decide_rows(Prepared& p, const OnRow& on_row) {
  float* score = p.score.data_ptr<float>();
  bool* exit_mask = p.exit_mask.data_ptr<bool>();
  int64_t* pred = p.pred.data_ptr<int64_t>();
  bool* keep = p.keep.data_ptr<bool>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.in.classes));
  at::parallel_for(0, p.logits.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const RowDecision r = score_row(p.in, i);
      score[i] = r.score;
      exit_mask[i] = r.exit;
      pred[i] = r.pred;
      keep[i] = !r.exit;
      on_row(i, r);
    }
  });
}

ExitResult exit_score_cpu(
    const at::Tensor& feats, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::string_view policy_sv, double threshold, bool is_last,
    const std::optional<at::Tensor>& prev_scores, const std::optional<at::Tensor>& prev_preds,
    const std::optional<at::Tensor>& sched_weight, double sched_bias, bool use_vote) {
  const std::string policy(policy_sv);
  check_exit_score_args("exit_score", feats, weight, bias, policy, threshold, prev_scores,
                        prev_preds, sched_weight, use_vote, sched_bias);
  check_exit_values("exit_score", policy == "eenet" ? &sched_weight.value() : nullptr, nullptr,
                    0);
  Prepared p = prepare(feats, weight, bias, policy, threshold, is_last, prev_scores, prev_preds,
                       sched_weight, sched_bias, use_vote);
  decide_rows(p, [](int64_t, const RowDecision&) {});
  return {p.logits, p.score, p.exit_mask, p.pred, p.keep};
}

ExitResult exit_score_write_cpu(
    const at::Tensor& feats, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::string_view policy_sv, double threshold, bool is_last,
    const std::optional<at::Tensor>& prev_scores, const std::optional<at::Tensor>& prev_preds,
    const std::optional<at::Tensor>& sched_weight, double sched_bias, bool use_vote,
    const at::Tensor& row_index, int64_t exit_index, const at::Tensor& out_logits,
    const at::Tensor& out_score, const at::Tensor& out_exit) {
  const std::string policy(policy_sv);
  const char* op = "exit_score_write";
  check_exit_score_write_call(feats, weight, bias, policy, threshold, prev_scores, prev_preds,
                              sched_weight, use_vote, sched_bias, row_index, exit_index,
                              out_logits, out_score, out_exit);
  // no copy needed: the indices are read again while the outputs are written, and
  // check_exit_write_args has ruled out every output overlapping them
  const at::Tensor rows_t = row_index.to(at::kLong).contiguous();
  check_exit_values(op, policy == "eenet" ? &sched_weight.value() : nullptr, &rows_t,
                    out_score.size(0));

  Prepared p = prepare(feats, weight, bias, policy, threshold, is_last, prev_scores, prev_preds,
                       sched_weight, sched_bias, use_vote);
  const int64_t* rows = rows_t.data_ptr<int64_t>();
  const int64_t c = weight.size(0);
  const float* logits = p.logits.data_ptr<float>();
  float* o_score = out_score.data_ptr<float>();

  AT_DISPATCH_INDEX_TYPES(out_exit.scalar_type(), "exit_score_write_exit", [&] {
    using exit_t = index_t;
    exit_t* o_exit = out_exit.data_ptr<exit_t>();
    if (out_logits.dim() == 1) {
      AT_DISPATCH_INDEX_TYPES(out_logits.scalar_type(), "exit_score_write_pred", [&] {
        index_t* o_pred = out_logits.data_ptr<index_t>();
        decide_rows(p, [&](int64_t i, const RowDecision& r) {
          if (!r.exit) return;
          o_pred[rows[i]] = static_cast<index_t>(r.pred);
          o_score[rows[i]] = r.score;
          o_exit[rows[i]] = static_cast<exit_t>(exit_index);
        });
      });
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_logits.scalar_type(),
                                      "exit_score_write_logits", [&] {
        scalar_t* o_logits = out_logits.data_ptr<scalar_t>();
        decide_rows(p, [&](int64_t i, const RowDecision& r) {
          if (!r.exit) return;
          scalar_t* dst = o_logits + rows[i] * c;
          for (int64_t j = 0; j < c; ++j) dst[j] = static_cast<scalar_t>(logits[i * c + j]);
          o_score[rows[i]] = r.score;
          o_exit[rows[i]] = static_cast<exit_t>(exit_index);
        });
      });
    }
  });
  return {p.logits, p.score, p.exit_mask, p.pred, p.keep};
}

}  // namespace

TORCH_LIBRARY_IMPL(eenet, CPU, m) {
  m.impl("exit_score", &exit_score_cpu);
  m.impl("exit_score_write", &exit_score_write_cpu);
}

}  // namespace eenet
