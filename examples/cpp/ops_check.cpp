// ops_check: calls the eenet ops from C++ exactly as a C++ server does - by name, through the
// dispatcher, with no header of the library and no Python - and checks them against an
// independent computation in plain libtorch ops (softmax, max, the threshold decision,
// stable compaction by `keep`). The checks run on CPU tensors, then again on CUDA tensors when
// the library has CUDA kernels (a -DEENET_CUDA=ON build) and a CUDA device is present, the
// reference computed on the same device. Prints one line per check and returns non-zero on
// any mismatch (1) or error (2). `ops_check --require-cuda` is an error without the CUDA pass.
//
// How the ops get registered: libeenet_ops.so registers them from static initialisers
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL) when it is loaded. This program references no symbol
// of it, so it is linked through the CMake target eenet::ops, which wraps the library in
// -Wl,--no-as-needed: the library stays a DT_NEEDED entry of the executable and is loaded
// before main() (a linker that drops unreferenced libraries would otherwise leave it out,
// and findSchemaOrThrow below would fail). Linking is chosen over dlopen() because it needs
// no library path at run time (the build tree's RPATH, or the install's, finds it) and a
// missing library fails at start-up, not at the first request; a server that loads op
// libraries as plugins would dlopen("libeenet_ops.so", RTLD_NOW | RTLD_GLOBAL) instead, once,
// before it looks any op up.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

// The C++ signatures of the schemas in csrc/ops.cpp ("Tensor?" is an optional tensor, "str"
// a string_view, "float" a double, "Tensor[]" a TensorList / vector). typed<>() checks them
// against the registered schema and throws on any difference.
using ExitResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ExitScoreFn = ExitResult(const at::Tensor& feats, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, c10::string_view policy,
                               double threshold, bool is_last,
                               const std::optional<at::Tensor>& prev_scores,
                               const std::optional<at::Tensor>& prev_preds,
                               const std::optional<at::Tensor>& sched_weight, double sched_bias,
                               bool use_vote);
using CompactFn = std::tuple<std::vector<at::Tensor>, at::Tensor>(const at::Tensor& keep,
                                                                  at::TensorList src);
using ExitScoreOp = c10::TypedOperatorHandle<ExitScoreFn>;
using CompactOp = c10::TypedOperatorHandle<CompactFn>;

int failures = 0;

void report(const std::string& what, bool ok, const std::string& detail = "") {
  std::cout << (ok ? "  ok        " : "  MISMATCH  ") << what;
  if (!ok && !detail.empty()) std::cout << ": " << detail;
  std::cout << "\n";
  if (!ok) ++failures;
}

std::string max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  std::ostringstream o;
  if (a.sizes() != b.sizes()) {
    o << "shape " << a.sizes() << " vs " << b.sizes();
  } else if (a.numel() > 0) {
    o << "max |diff| " << (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
  }
  return o.str();
}

void check_close(const std::string& what, const at::Tensor& got, const at::Tensor& want,
                 double atol) {
  const bool ok = got.sizes() == want.sizes() && got.scalar_type() == want.scalar_type() &&
                  at::allclose(got, want, /*rtol=*/1e-5, atol);
  report(what, ok, max_abs_diff(got, want));
}

void check_equal(const std::string& what, const at::Tensor& got, const at::Tensor& want) {
  const bool ok = got.sizes() == want.sizes() && got.scalar_type() == want.scalar_type() &&
                  at::equal(got, want);
  std::ostringstream o;
  o << "got " << got.scalar_type() << got.sizes() << ", want " << want.scalar_type()
    << want.sizes();
  report(what, ok, o.str());
}

// The independent computation: the policy score of fp32 logits with plain libtorch ops.
at::Tensor reference_score(const at::Tensor& logits, const std::string& policy) {
  const at::Tensor p = at::softmax(logits, 1);
  if (policy == "max_prob") return std::get<0>(p.max(1));
  // entropy: 1 - H(p) / log C
  const at::Tensor h = -(p * at::log_softmax(logits, 1)).sum(1);
  return 1.0 - h / std::log(static_cast<double>(logits.size(1)));
}

// exit_score on N rows, feats (N, D) or (N, D, S) (mean-pooled over S), against the reference.
// Returns the op's keep mask for the compaction check.
at::Tensor check_exit_score(const ExitScoreOp& exit_score, const std::string& policy,
                            const at::Tensor& feats, const at::Tensor& weight,
                            const at::Tensor& bias) {
  const int64_t n = feats.size(0);
  const at::Tensor x = feats.dim() == 3 ? feats.mean(2) : feats;
  const at::Tensor ref_logits = at::addmm(bias, x, weight.t());
  const at::Tensor ref_score = reference_score(ref_logits, policy);
  // threshold between the two middle scores: about half of the rows exit
  double threshold = 0.5;
  if (n >= 2) {
    const at::Tensor s = std::get<0>(ref_score.sort());
    threshold = 0.5 * (s[n / 2 - 1].item<double>() + s[n / 2].item<double>());
  }
  const at::Tensor ref_exit = ref_score >= threshold;

  const auto [logits, score, exit_mask, pred, keep] =
      exit_score.call(feats, weight, bias, policy, threshold, /*is_last=*/false, std::nullopt,
                      std::nullopt, std::nullopt, /*sched_bias=*/0.0, /*use_vote=*/false);

  std::ostringstream name;
  name << "exit_score(" << policy << ") feats" << feats.sizes() << " threshold " << threshold;
  std::cout << name.str() << ", " << (n ? exit_mask.sum().item<int64_t>() : 0) << "/" << n
            << " rows exit\n";
  check_close("logits = feats @ weight.T + bias", logits, ref_logits, 1e-5);
  check_close("score = " + std::string(policy == "max_prob" ? "max softmax" : "1 - H/log C"),
              score, ref_score, 1e-5);
  check_equal("pred = argmax logits", pred, ref_logits.argmax(1));
  // rows whose score is within rounding of the threshold may fall either way
  const at::Tensor decided = (ref_score - threshold).abs() > 1e-5;
  check_equal("exit_mask = score >= threshold", exit_mask.masked_select(decided),
              ref_exit.masked_select(decided));
  check_equal("keep = ~exit_mask", keep, exit_mask.logical_not());
  return keep;
}

// compact(keep, src): the kept rows of every src, in order, then zeros; count = #kept.
void check_compact(const CompactOp& compact, const at::Tensor& keep,
                   const std::vector<at::Tensor>& src) {
  const int64_t n = keep.size(0);
  const auto [kept, count] = compact.call(keep, src);
  const at::Tensor rows = keep.nonzero().flatten();
  const int64_t m = rows.size(0);
  std::cout << "compact(keep, " << src.size() << " tensors) N=" << n << ", " << m
            << " rows kept\n";
  check_equal("count", count, at::scalar_tensor(m, keep.options().dtype(at::kLong)));
  report("one output per input", kept.size() == src.size());
  for (size_t t = 0; t < src.size() && t < kept.size(); ++t) {
    const std::string tag = "src[" + std::to_string(t) + "] " +
                            std::string(c10::toString(src[t].scalar_type()));
    check_equal(tag + ": kept rows in order", kept[t].narrow(0, 0, m),
                src[t].index_select(0, rows));
    check_equal(tag + ": rows >= count zero", kept[t].narrow(0, m, n - m),
                at::zeros_like(src[t].narrow(0, m, n - m)));
  }
}

// Every check on one device: the inputs made there and the reference computed there.
void check_device(const ExitScoreOp& exit_score, const CompactOp& compact, at::Device device) {
  std::cout << "-- on " << device << "\n";
  const at::TensorOptions on = at::TensorOptions().device(device);
  const int64_t n = 64, d = 32, c = 10, s = 4;
  const at::Tensor feats = at::randn({n, d}, on);
  const at::Tensor weight = at::randn({c, d}, on) * 0.3;
  const at::Tensor bias = at::randn({c}, on) * 0.1;

  // the policies of eenet_kernels/reference.py that need no history of earlier exits
  const at::Tensor keep = check_exit_score(exit_score, "max_prob", feats, weight, bias);
  check_exit_score(exit_score, "entropy", at::randn({n, d, s}, on), weight, bias);

  // the survivors' tensors as a serving loop carries them: features (a non-contiguous
  // view), per-row ids and a row input of another dtype and shape
  const at::Tensor ids = at::arange(n, on.dtype(at::kLong)) * 7;
  const at::Tensor mask = at::randint(0, 100, {n, 2, 3}, on.dtype(at::kInt));
  check_compact(compact, keep, {feats.t().contiguous().t(), ids, mask});

  // inference ops: no output requires grad, even from weights that do
  const at::Tensor w_grad = weight.detach().requires_grad_(true);
  const auto graded = exit_score.call(feats, w_grad, bias, "max_prob", 0.5, false,
                                      std::nullopt, std::nullopt, std::nullopt, 0.0, false);
  std::cout << "exit_score with weight.requires_grad\n";
  report("no output requires grad", !std::get<0>(graded).requires_grad() &&
                                        !std::get<1>(graded).requires_grad());

  // an empty batch (every row exited at an earlier stage)
  const at::Tensor feats0 = at::empty({0, d}, on);
  const at::Tensor keep0 = check_exit_score(exit_score, "max_prob", feats0, weight, bias);
  check_compact(compact, keep0, {feats0, at::empty({0}, on.dtype(at::kLong))});
}

}  // namespace

int main(int argc, char** argv) {
  const bool require_cuda = argc > 1 && std::string(argv[1]) == "--require-cuda";
  try {
    at::manual_seed(0);
    // the handles a server looks up once, at start-up: this throws when the library is not
    // loaded, and typed<>() when the C++ signature does not match the registered schema
    const auto exit_score = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("eenet::exit_score", "")
                                .typed<ExitScoreFn>();
    const auto compact =
        c10::Dispatcher::singleton().findSchemaOrThrow("eenet::compact", "").typed<CompactFn>();
    std::cout << "ops_check: found eenet::exit_score and eenet::compact\n";
    check_device(exit_score, compact, at::kCPU);

    const bool cuda_kernels = exit_score.hasKernelForDispatchKey(c10::DispatchKey::CUDA) &&
                              compact.hasKernelForDispatchKey(c10::DispatchKey::CUDA);
    if (cuda_kernels && at::hasCUDA()) {
      check_device(exit_score, compact, at::Device(at::kCUDA, 0));
    } else {
      const char* why = cuda_kernels ? "no CUDA device" : "the library has no CUDA kernels";
      std::cout << "ops_check: no CUDA pass (" << why << ")\n";
      if (require_cuda) {
        std::cerr << "ops_check: ERROR: --require-cuda, but " << why << "\n";
        return 2;
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "ops_check: ERROR: " << e.what() << "\n";
    return 2;
  }
  if (failures) {
    std::cout << "ops_check: " << failures << " mismatches\n";
    return 1;
  }
  std::cout << "ops_check: OK\n";
  return 0;
}
