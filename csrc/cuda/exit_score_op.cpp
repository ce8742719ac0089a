// CUDA launchers of eenet::exit_score and eenet::exit_score_write (the kernels: exit_score.cu
// and the design: exit_score.cuh). Semantics: csrc/cpu/exit_score.cpp and
// eenet_kernels/reference.py.
//
// On the current stream, no host sync (CUDA-graph capturable): the metadata checks of
// csrc/checks.h run as on CPU; the value checks (row_index range and distinctness, a finite
// sched_weight) would read device memory and are skipped, as in the Triton launcher: a
// row_index value outside [0, N0) is not written, distinct values are the caller's contract.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "../checks.h"
#include "exit_score_launch.h"

namespace eenet {
namespace {

using ExitResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

int32_t float_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::kF16;
    case at::kBFloat16: return cuda::kBF16;
    default: return cuda::kF32;
  }
}

int32_t policy_code(const std::string& p) {
  if (p == "max_prob") return cuda::kMaxProb;
  if (p == "entropy") return cuda::kEntropy;
  if (p == "patience") return cuda::kPatience;
  return cuda::kEENet;  // checked beforehand
}

int sm_count(const at::Device& device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  return sms;
}

// (N, D, S) feats -> (N, D) fp32 means over S (any strides; coalesced when S is contiguous).
at::Tensor mean_pool(const at::Tensor& feats, cudaStream_t stream) {
  const int64_t n = feats.size(0), d = feats.size(1), s = feats.size(2);
  at::Tensor out = at::empty({n, d}, feats.options().dtype(at::kFloat));
  if (n * d == 0) return out;
  const cuda::PoolParams p{feats.const_data_ptr(), n,  d, s, feats.stride(0), feats.stride(1),
                           feats.stride(2),        out.mutable_data_ptr<float>()};
  C10_CUDA_CHECK(cuda::launch_mean_pool(p, float_dtype_code(feats.scalar_type()), stream));
  return out;
}

struct WriteArgs {
  const at::Tensor& row_index;
  int64_t exit_index;
  const at::Tensor& out_logits;
  const at::Tensor& out_score;
  const at::Tensor& out_exit;
};

ExitResult run_exit(const at::Tensor& feats, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const std::string& policy,
                    double threshold, bool is_last, const std::optional<at::Tensor>& prev_scores,
                    const std::optional<at::Tensor>& prev_preds,
                    const std::optional<at::Tensor>& sched_weight, double sched_bias,
                    bool use_vote, const WriteArgs* write, const char* op) {
  const c10::cuda::CUDAGuard guard(feats.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = feats.size(0), c = weight.size(0);
  TORCH_CHECK_VALUE(c < std::numeric_limits<int32_t>::max(), "eenet.", op,
                    ": weight must have C < 2^31 - 1 classes on CUDA, got C = ", c);

  // 1-2. pooled / upcast features, then the fp32 GEMM (cuBLAS through ATen; autocast off,
  // which would run it in half precision)
  const c10::impl::ExcludeDispatchKeyGuard fp32_gemm(c10::autocast_dispatch_keyset);
  const at::Tensor x = feats.dim() == 3 ? mean_pool(feats, stream) : feats.to(at::kFloat);
  const at::Tensor w_t = weight.to(at::kFloat).t();
  at::Tensor logits = bias ? at::addmm(bias->to(at::kFloat), x, w_t) : at::mm(x, w_t);
  logits = logits.contiguous();

  const auto opts = feats.options();
  at::Tensor score = at::empty({n}, opts.dtype(at::kFloat));
  at::Tensor exit_mask = at::empty({n}, opts.dtype(at::kBool));
  at::Tensor pred = at::empty({n}, opts.dtype(at::kLong));
  at::Tensor keep = at::empty({n}, opts.dtype(at::kBool));
  if (n == 0) return {logits, score, exit_mask, pred, keep};

  // 3. the fused epilogue
  cuda::ExitParams p{};
  p.logits = logits.const_data_ptr<float>();
  p.n = n;
  p.c = static_cast<int32_t>(c);
  p.log_c = std::log(static_cast<float>(c));
  p.policy = policy_code(policy);
  p.threshold = threshold_as_float(threshold);
  p.is_last = is_last;
  at::Tensor sched_w;
  if (p.policy == cuda::kEENet) {
    p.k = prev_scores->size(1);
    p.prev_scores = prev_scores->const_data_ptr<float>();
    p.ps_stride0 = prev_scores->stride(0);
    p.ps_stride1 = prev_scores->stride(1);
    sched_w = sched_weight->contiguous();
    p.sched_w = sched_w.const_data_ptr<float>();
    p.sched_bias = static_cast<float>(sched_bias);
    p.use_vote = use_vote;
  }
  if (p.policy == cuda::kPatience || use_vote) {
    p.k = prev_preds->size(1);
    p.prev_preds = prev_preds->const_data_ptr();
    p.pp_stride0 = prev_preds->stride(0);
    p.pp_stride1 = prev_preds->stride(1);
    p.prev_preds_64 = prev_preds->scalar_type() == at::kLong;
  }
  p.score = score.mutable_data_ptr<float>();
  p.exit_mask = static_cast<uint8_t*>(exit_mask.mutable_data_ptr());
  p.pred = pred.mutable_data_ptr<int64_t>();
  p.keep = static_cast<uint8_t*>(keep.mutable_data_ptr());
  p.write = cuda::kWriteNone;
  if (write != nullptr) {
    const bool preds = write->out_logits.dim() == 1;
    p.write = preds ? cuda::kWritePreds : cuda::kWriteLogits;
    p.row_index = write->row_index.const_data_ptr();
    p.row_index_stride = write->row_index.stride(0);
    p.row_index_64 = write->row_index.scalar_type() == at::kLong;
    p.out_logits = write->out_logits.mutable_data_ptr();
    p.out_logits_dtype = preds ? (write->out_logits.scalar_type() == at::kLong ? cuda::kI64
                                                                                : cuda::kI32)
                               : float_dtype_code(write->out_logits.scalar_type());
    p.out_score = write->out_score.mutable_data_ptr<float>();
    p.out_exit = write->out_exit.mutable_data_ptr();
    p.out_exit_64 = write->out_exit.scalar_type() == at::kLong;
    p.exit_index = write->exit_index;
    p.n0 = write->out_score.size(0);
  }
  C10_CUDA_CHECK(cuda::launch_exit_epilogue(p, sm_count(feats.device()), stream));
  return {logits, score, exit_mask, pred, keep};
}

ExitResult exit_score_cuda(
    const at::Tensor& feats, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::string_view policy_sv, double threshold, bool is_last,
    const std::optional<at::Tensor>& prev_scores, const std::optional<at::Tensor>& prev_preds,
    const std::optional<at::Tensor>& sched_weight, double sched_bias, bool use_vote) {
  const std::string policy(policy_sv);
  check_exit_score_args("exit_score", feats, weight, bias, policy, threshold, prev_scores,
                        prev_preds, sched_weight, use_vote, sched_bias);
  return run_exit(feats, weight, bias, policy, threshold, is_last, prev_scores, prev_preds,
                  sched_weight, sched_bias, use_vote, nullptr, "exit_score");
}

ExitResult exit_score_write_cuda(
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
  const WriteArgs write{row_index, exit_index, out_logits, out_score, out_exit};
  return run_exit(feats, weight, bias, policy, threshold, is_last, prev_scores, prev_preds,
                  sched_weight, sched_bias, use_vote, &write, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(eenet, CUDA, m) {
  m.impl("exit_score", &exit_score_cuda);
  m.impl("exit_score_write", &exit_score_write_cuda);
}

}  // namespace eenet
