// The eenet operator library: the schemas, and the one kernel every backend shares, the
// Autograd pass-through. Device kernels register themselves in csrc/cpu/*.cpp. Keep the
// schema strings identical to eenet_kernels/_schemas.py (tests/test_registration.py
// compares them).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <string>
#include <vector>

// No Python here: the module init of `eenet_kernels._C` is csrc/python_module.cpp, part of the
// Python extension only, so that the CMake library `eenet_ops` links libtorch alone.

#define EENET_EXIT_SCORE_ARGS                                                            \
  "Tensor feats, Tensor weight, Tensor? bias, str policy, float threshold, "              \
  "bool is_last=False, Tensor? prev_scores=None, Tensor? prev_preds=None, "               \
  "Tensor? sched_weight=None, float sched_bias=0., bool use_vote=False"
#define EENET_EXIT_SCORE_RETURNS \
  "(Tensor logits, Tensor score, Tensor exit_mask, Tensor pred, Tensor keep)"

TORCH_LIBRARY(eenet, m) {
  // Fake (meta) kernels for torch.compile / export live in Python.
  m.set_python_module("eenet_kernels.ops");
  m.def("exit_score(" EENET_EXIT_SCORE_ARGS ") -> " EENET_EXIT_SCORE_RETURNS);
  m.def("exit_score_write(" EENET_EXIT_SCORE_ARGS
        ", *, Tensor row_index, int exit_index, "
        "Tensor(a!) out_logits, Tensor(b!) out_score, Tensor(c!) out_exit) "
        "-> " EENET_EXIT_SCORE_RETURNS);
  m.def("compact(Tensor keep, Tensor[] src) -> (Tensor[] kept, Tensor count)");
  m.def("compact_out(Tensor keep, Tensor[] src, Tensor(a!)[] dst) -> Tensor count");
}

namespace {

bool writes(const c10::Argument& arg) {
  const c10::AliasInfo* alias = arg.alias_info();
  if (alias == nullptr) return false;
  if (alias->isWrite()) return true;
  for (const c10::AliasInfo& inner : alias->containedTypes())  // Tensor(a!)[]
    if (inner.isWrite()) return true;
  return false;
}

// The ops are inference ops: below autograd, so that no output requires grad and nothing is
// recorded, whatever the backend and whether the caller is Python or C++. The buffers an op
// writes (its Tensor(a!) arguments) have their version counters bumped, as an in-place torch
// op's are: autograd then refuses a backward through a value the op overwrote, and an
// inference tensor written outside inference mode is refused.
void run_below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    if (!writes(args[i])) continue;
    const c10::IValue& value = (*stack)[first + i];
    if (value.isTensor()) {
      written.push_back(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorList()) written.push_back(t);
    }
  }
  const std::string& full = op.schema().name();
  const std::string name = full.substr(full.find("::") + 2);
  for (const at::Tensor& t : written) {  // before the kernel runs: nothing written if refused
    TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), "eenet.", name,
                      ": an output buffer is an inference tensor (made under "
                      "torch.inference_mode) and the call runs outside inference mode, where "
                      "it cannot be written");
    TORCH_CHECK_VALUE(!(c10::GradMode::is_enabled() && t.requires_grad()), "eenet.", name,
                      ": an output buffer requires grad; the op writes it without recording "
                      "the write for autograd: pass a buffer that does not require grad, or "
                      "call under torch.no_grad()");
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(eenet, Autograd, m) {
  for (const char* name : {"exit_score", "exit_score_write", "compact", "compact_out"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_below_autograd>());
}
