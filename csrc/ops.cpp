// The eenet operator library: the schemas, and the one kernel every backend shares, the
// Autograd pass-through. Device kernels register themselves in csrc/cpu/*.cpp. Keep the
// schema strings identical to eenet_kernels/_schemas.py (tests/test_registration.py
// compares them).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

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

// The ops are inference ops: below autograd, so that no output requires grad and nothing is
// recorded, whatever the backend and whether the caller is Python or C++.
void run_below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(eenet, Autograd, m) {
  for (const char* name : {"exit_score", "exit_score_write", "compact", "compact_out"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_below_autograd>());
}
