// A CUDA graph conditional IF node appended to the capture running on a stream, from a
// device-side predicate: the zero-host-sync bucket choice of the engine's graph mode on a
// torch whose CUDAGraph has no conditional-node capture of its own. CUDA headers only (no
// torch type), so that any C++ caller can use it; the Python binding is
// csrc/python_module.cpp, the caller eenet/runtime/graphs.py.
//
// How: the body is captured beforehand as a graph of its own (by torch, on a side stream, so
// that its allocations go through torch's graph memory pools unchanged); this function then
// adds, at the current end of the capture running on `stream`, a one-thread kernel that copies
// the predicate byte into a conditional handle, and an IF node on that handle after it whose
// body is a child-graph node holding a copy of `body`. The capture's later work depends on
// the IF node. On replay the body runs exactly when the predicate byte (read at that point of
// the replay, any non-zero byte counting as true) is non-zero.
#pragma once

#include <cuda_runtime_api.h>

namespace eenet {
namespace cuda {

// `pred`: device pointer to one byte, alive and at the same address for as long as the
// graph being captured is replayed. `body`: a captured graph with no conditional node in it
// (CUDA's rule for child graphs), copied here, so the caller may destroy it afterwards but
// must keep the memory its nodes use. Returns cudaErrorIllegalState when `stream` is not
// capturing, the first failing call's error otherwise; `failed_call` (when not null) names
// that call. Needs CUDA 13 headers (conditional nodes came in 12.4; this uses the CUDA 13
// names of the capture-dependency calls) and returns cudaErrorNotSupported when built with
// older ones.
cudaError_t capture_if_node(const void* pred, cudaGraph_t body, cudaStream_t stream,
                            const char** failed_call);

}  // namespace cuda
}  // namespace eenet
