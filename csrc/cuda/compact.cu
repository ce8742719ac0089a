// CUDA launchers of eenet::compact and eenet::compact_out (the kernel and the design:
// csrc/cuda/compact.cuh). Semantics: csrc/cpu/compact.cpp and eenet_kernels/reference.py.
//
// On the current stream, no host sync (CUDA-graph capturable): the select writes the count
// into the op's 0-dim int64 result on the device; scratch memory (CUB's temporary storage and
// the kept-row list) comes from the caching allocator.

// CUB in a namespace of its own, so that its kernels cannot clash with the copy inside
// libtorch (which wraps its own the same way). Thrust (only its counting iterator is used
// here) stays as it is: c10's headers name ::thrust.
#ifndef CUB_WRAPPED_NAMESPACE
#define CUB_WRAPPED_NAMESPACE eenet_cub
#endif

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/device/device_select.cuh>
#include <thrust/iterator/counting_iterator.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "compact.cuh"

namespace eenet {
namespace {

// The select predicate over row indices: keep[i] != 0 (any non-zero byte), keep any stride.
struct KeepRow {
  const uint8_t* keep;
  int64_t stride;
  __host__ __device__ bool operator()(int64_t i) const { return cuda::keep_flag(keep, stride, i); }
};

// src viewed as (N, row_bytes) rows that are contiguous inside (a copy only when a row
// itself is not contiguous, e.g. a transposed view).
at::Tensor byte_rows(const at::Tensor& src, int64_t n) {
  at::Tensor r = src.reshape({n, -1});
  if (r.size(1) > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

void compact_rows(const at::Tensor& keep, at::TensorList src, const std::vector<at::Tensor>& dst,
                  const at::Tensor& count, bool zero_tail) {
  const c10::cuda::CUDAGuard guard(keep.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = keep.size(0);
  if (n == 0) {
    count.zero_();
    return;
  }
  // 1. the kept rows' indices and their number (CUB single-pass select, decoupled look-back)
  const at::Tensor keep_u8 = keep.view(at::kByte);  // bytes, whatever the bool holds
  const KeepRow pred{static_cast<const uint8_t*>(keep_u8.const_data_ptr()), keep_u8.stride(0)};
  at::Tensor rows = at::empty({n}, keep.options().dtype(at::kLong));
  int64_t* rows_ptr = rows.mutable_data_ptr<int64_t>();
  int64_t* count_ptr = count.mutable_data_ptr<int64_t>();
  const thrust::counting_iterator<int64_t> first(0);
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(CUB_NS_QUALIFIER::DeviceSelect::If(nullptr, temp_bytes, first, rows_ptr,
                                                  count_ptr, n, pred, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, keep.options().dtype(at::kByte));
  C10_CUDA_CHECK(CUB_NS_QUALIFIER::DeviceSelect::If(temp.mutable_data_ptr(), temp_bytes, first,
                                                  rows_ptr, count_ptr, n, pred, stream));

  // 2. the rows of every tensor, kMaxSlots tensors per launch
  std::vector<at::Tensor> views;  // alive until the launches are queued
  cuda::CompactTable table{};
  auto flush = [&] {
    if (table.num_slots == 0) return;
    cuda::plan_table(table);
    int64_t gx = 0, gy = 0;
    cuda::compact_grid(table, n, &gx, &gy);
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    cuda::compact_gather_kernel<<<grid, cuda::kCompactThreads, 0, stream>>>(
        table, rows_ptr, count_ptr, n, zero_tail);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table = cuda::CompactTable{};
  };
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i].numel() == 0) continue;  // rows of zero bytes
    const at::Tensor s = byte_rows(src[i], n);
    views.push_back(s);
    const int64_t row_bytes = s.size(1) * s.element_size();
    table.slot[table.num_slots++] =
        cuda::make_slot(s.const_data_ptr(), dst[i].mutable_data_ptr(),
                        s.stride(0) * s.element_size(), row_bytes);
    if (table.num_slots == cuda::kMaxSlots) flush();
  }
  flush();
}

at::Tensor count_tensor(const at::Tensor& keep) {
  return at::empty({}, keep.options().dtype(at::kLong));
}

at::Tensor compact_out_cuda(const at::Tensor& keep, at::TensorList src, at::TensorList dst) {
  check_compact_args("compact_out", keep, src, dst);
  at::Tensor count = count_tensor(keep);
  compact_rows(keep, src, dst.vec(), count, /*zero_tail=*/false);
  return count;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> compact_cuda(const at::Tensor& keep,
                                                             at::TensorList src) {
  check_compact_args("compact", keep, src, std::nullopt);
  std::vector<at::Tensor> kept;
  kept.reserve(src.size());
  for (const auto& s : src)
    kept.push_back(at::empty(s.sizes(), s.options().memory_format(at::MemoryFormat::Contiguous)));
  at::Tensor count = count_tensor(keep);
  compact_rows(keep, src, kept, count, /*zero_tail=*/true);  // rows >= count zeroed
  return {kept, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(eenet, CUDA, m) {
  m.impl("compact", &compact_cuda);
  m.impl("compact_out", &compact_out_cuda);
}

}  // namespace eenet
