// The Python module `eenet_kernels._C`: an empty module whose import loads this shared object
// and with it the op registrations of csrc/ops.cpp and csrc/cpu/*.cpp (static initialisers).
// Compiled only into the Python extension (setup.py); the CMake library `eenet_ops` leaves it
// out, so that C++ consumers need libtorch and nothing of Python.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
