// CUDA launchers of eenet::compact and eenet::compact_out (the kernels: compact.cu and
// compact.cuh). Semantics: csrc/cpu/compact.cpp and eenet_kernels/reference.py.
//
// On the current stream, no host sync (CUDA-graph capturable): the select writes the count
// into the op's 0-dim int64 result on the device; scratch memory (CUB's temporary storage and
// the kept-row list) comes from the caching allocator.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "compact_launch.h"

namespace eenet {
namespace {

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
  const auto* keep_ptr = static_cast<const uint8_t*>(keep_u8.const_data_ptr());
  at::Tensor rows = at::empty({n}, keep.options().dtype(at::kLong));
  int64_t* rows_ptr = rows.mutable_data_ptr<int64_t>();
  int64_t* count_ptr = count.mutable_data_ptr<int64_t>();
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cuda::select_kept_rows(keep_ptr, keep_u8.stride(0), n, rows_ptr, count_ptr,
                                        nullptr, temp_bytes, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, keep.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::select_kept_rows(keep_ptr, keep_u8.stride(0), n, rows_ptr, count_ptr,
                                        temp.mutable_data_ptr(), temp_bytes, stream));

  // 2. the rows of every tensor, kMaxSlots tensors per launch
  std::vector<at::Tensor> views;  // alive until the launches are queued
  cuda::CompactTable table{};
  auto flush = [&] {
    if (table.num_slots == 0) return;
    C10_CUDA_CHECK(cuda::launch_compact_gather(table, rows_ptr, count_ptr, n, zero_tail, stream));
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
