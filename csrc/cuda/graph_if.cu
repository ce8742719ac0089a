// eenet::cuda::capture_if_node (graph_if_launch.h says what and why). CUDA headers only.
#include <cuda_runtime.h>

#include <cstdint>

#include "graph_if_launch.h"

namespace eenet::cuda {
namespace {

#if CUDART_VERSION >= 13000
// One thread: the predicate byte into the IF node's condition, on every replay.
__global__ void set_if_condition(cudaGraphConditionalHandle handle, const uint8_t* pred) {
  cudaGraphSetConditional(handle, *pred != 0 ? 1u : 0u);
}
#endif

cudaError_t failed(cudaError_t error, const char* call, const char** failed_call) {
  if (failed_call != nullptr) *failed_call = call;
  return error;
}

}  // namespace
}  // namespace eenet::cuda

cudaError_t eenet::cuda::capture_if_node(const void* pred, cudaGraph_t body,
                                         cudaStream_t stream, const char** failed_call) {
#if CUDART_VERSION >= 13000
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
  if (cudaError_t e = cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph); e != cudaSuccess)
    return failed(e, "cudaStreamGetCaptureInfo", failed_call);
  if (status != cudaStreamCaptureStatusActive)
    return failed(cudaErrorIllegalState, "cudaStreamGetCaptureInfo (the stream is not capturing)",
                  failed_call);
  cudaGraphConditionalHandle handle{};
  if (cudaError_t e = cudaGraphConditionalHandleCreate(&handle, graph, 0, 0); e != cudaSuccess)
    return failed(e, "cudaGraphConditionalHandleCreate", failed_call);
  set_if_condition<<<1, 1, 0, stream>>>(handle, static_cast<const uint8_t*>(pred));
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess)
    return failed(e, "set_if_condition<<<1, 1>>>", failed_call);
  // the IF node goes where the capture stands now: after the kernel just captured
  const cudaGraphNode_t* deps = nullptr;
  const cudaGraphEdgeData* edges = nullptr;
  size_t num_deps = 0;
  if (cudaError_t e = cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph, &deps, &edges,
                                               &num_deps);
      e != cudaSuccess)
    return failed(e, "cudaStreamGetCaptureInfo", failed_call);
  cudaGraphNodeParams params{};
  params.type = cudaGraphNodeTypeConditional;
  params.conditional.handle = handle;
  params.conditional.type = cudaGraphCondTypeIf;
  params.conditional.size = 1;
  cudaGraphNode_t if_node = nullptr;
  if (cudaError_t e = cudaGraphAddNode(&if_node, graph, deps, edges, num_deps, &params);
      e != cudaSuccess)
    return failed(e, "cudaGraphAddNode (conditional IF)", failed_call);
  cudaGraphNode_t body_node = nullptr;
  if (cudaError_t e = cudaGraphAddChildGraphNode(&body_node, params.conditional.phGraph_out[0],
                                                 nullptr, 0, body);
      e != cudaSuccess)
    return failed(e, "cudaGraphAddChildGraphNode (the IF node's body)", failed_call);
  if (cudaError_t e = cudaStreamUpdateCaptureDependencies(stream, &if_node, nullptr, 1,
                                                          cudaStreamSetCaptureDependencies);
      e != cudaSuccess)
    return failed(e, "cudaStreamUpdateCaptureDependencies", failed_call);
  if (failed_call != nullptr) *failed_call = nullptr;
  return cudaSuccess;
#else
  (void)pred, (void)body, (void)stream;
  return failed(cudaErrorNotSupported, "capture_if_node (built with CUDA headers before 13.0)",
                failed_call);
#endif
}
