// The launch functions of the compact kernels (compact.cu), as the torch-facing launcher
// compact_op.cpp calls them: plain pointers, sizes and a stream, no torch type.
//
// Why the split: a translation unit that includes torch's headers costs nvcc a full pass
// over them per architecture (cudafe++ once, cicc once per sm_XX) on top of the host
// compile: torch's headers were about three quarters of the CUDA build time. The .cu files
// therefore hold only the kernels, their instantiations and their launches, with CUDA
// headers alone, and the argument checks, allocations, stream lookup and operator
// registration are ordinary C++ compiled once by the host compiler.
//
// Every function queues work on `stream` and returns the launch's cudaError_t (the caller
// raises it as a torch error); none synchronises, so all are CUDA-graph capturable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "compact.cuh"

namespace eenet {
namespace cuda {

// Indices of the rows with keep[i * keep_stride] != 0, in order, into rows[0, count) and
// their number into *count (device memory), by CUB's single-pass DeviceSelect::If. Called
// first with temp == nullptr, it only sets temp_bytes to the scratch size it needs.
cudaError_t select_kept_rows(const uint8_t* keep, int64_t keep_stride, int64_t n,
                             int64_t* rows, int64_t* count, void* temp, size_t& temp_bytes,
                             cudaStream_t stream);

// One gather launch for the table's tensors (plan_table and compact_grid applied here): the
// kept rows rows[0, *count) of every slot's source to its destination, zeros into rows
// [*count, n) when zero_tail.
cudaError_t launch_compact_gather(CompactTable table, const int64_t* rows, const int64_t* count,
                                  int64_t n, bool zero_tail, cudaStream_t stream);

}  // namespace cuda
}  // namespace eenet
