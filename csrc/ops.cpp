// The eenet operator library: schemas only. Kernels register themselves per backend in
// csrc/cpu/*.cpp (and csrc/cuda/*.cu). Keep the strings identical to
// eenet_kernels/_schemas.py (tests/test_registration.py compares them).
#include <Python.h>
#include <torch/library.h>

// A loadable Python module so that `import eenet_kernels._C` runs the registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

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
