// The Python module `eenet_kernels._C`: its import loads this shared object and with it the
// op registrations of csrc/ops.cpp, csrc/cpu/*.cpp and, in a CUDA build, csrc/cuda/*.cpp
// (static initialisers). Compiled only into the Python extension (setup.py); the CMake
// library `eenet_ops` leaves it out, so that C++ consumers need libtorch and nothing of
// Python.
//
// In a CUDA build (EENET_WITH_CUDA) the module has one function, the binding of
// eenet::cuda::capture_if_node (csrc/cuda/graph_if_launch.h), taking raw addresses as ints:
// eenet_kernels/cuda_graphs.py checks the tensor, the device and the capture first.
#include <Python.h>

#ifdef EENET_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/graph_if_launch.h"

namespace {

// capture_if_node(pred_ptr: int, body_graph: int, stream: int) -> None
PyObject* capture_if_node(PyObject* /*self*/, PyObject* args) {
  unsigned long long pred = 0, body = 0, stream = 0;
  if (!PyArg_ParseTuple(args, "KKK:capture_if_node", &pred, &body, &stream)) return nullptr;
  if (pred == 0 || body == 0) {
    PyErr_SetString(PyExc_ValueError, "capture_if_node: null predicate or body graph");
    return nullptr;
  }
  const char* call = nullptr;
  const cudaError_t error = eenet::cuda::capture_if_node(
      reinterpret_cast<const void*>(pred), reinterpret_cast<cudaGraph_t>(body),
      reinterpret_cast<cudaStream_t>(stream), &call);
  if (error != cudaSuccess) {
    PyErr_Format(PyExc_RuntimeError, "capture_if_node: %s failed: %s (%s)",
                 call != nullptr ? call : "a CUDA call", cudaGetErrorName(error),
                 cudaGetErrorString(error));
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef module_methods[] = {
    {"capture_if_node", capture_if_node, METH_VARARGS,
     "capture_if_node(pred_ptr, body_graph, stream): a CUDA graph IF node on the byte at "
     "pred_ptr, whose body is a copy of the cudaGraph_t body_graph, at the end of the capture "
     "running on stream (csrc/cuda/graph_if_launch.h)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
#define EENET_MODULE_METHODS module_methods
#else
#define EENET_MODULE_METHODS nullptr
#endif

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          EENET_MODULE_METHODS};
  return PyModule_Create(&module_def);
}
}
