// The kernels of eenet::compact and eenet::compact_out instantiated and launched (the design:
// csrc/cuda/compact.cuh; the op around them: compact_op.cpp). CUDA headers only, no torch
// header (compact_launch.h says why).

// CUB in a namespace of its own, so that its kernels cannot clash with the copy inside
// libtorch (which wraps its own the same way). Thrust stays as it is: only its counting
// iterator is used, a header-only type with no kernel of its own.
#ifndef CUB_WRAPPED_NAMESPACE
#define CUB_WRAPPED_NAMESPACE eenet_cub
#endif

#include <cub/device/device_select.cuh>
#include <thrust/iterator/counting_iterator.h>

#include "compact_launch.h"

namespace eenet::cuda {
namespace {

// The select predicate over row indices: keep[i] != 0 (any non-zero byte), keep any stride.
struct KeepRow {
  const uint8_t* keep;
  int64_t stride;
  __host__ __device__ bool operator()(int64_t i) const { return keep_flag(keep, stride, i); }
};

}  // namespace
}  // namespace eenet::cuda

// Qualified definitions: a signature that differs from the header's declaration is an error.
cudaError_t eenet::cuda::select_kept_rows(const uint8_t* keep, int64_t keep_stride, int64_t n,
                                          int64_t* rows, int64_t* count, void* temp,
                                          size_t& temp_bytes, cudaStream_t stream) {
  const thrust::counting_iterator<int64_t> first(0);
  return CUB_NS_QUALIFIER::DeviceSelect::If(temp, temp_bytes, first, rows, count, n,
                                            KeepRow{keep, keep_stride}, stream);
}

cudaError_t eenet::cuda::launch_compact_gather(CompactTable table, const int64_t* rows,
                                               const int64_t* count, int64_t n, bool zero_tail,
                                               cudaStream_t stream) {
  plan_table(table);
  int64_t gx = 0, gy = 0;
  compact_grid(table, n, &gx, &gy);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  compact_gather_kernel<<<grid, kCompactThreads, 0, stream>>>(table, rows, count, n, zero_tail);
  return cudaGetLastError();
}
