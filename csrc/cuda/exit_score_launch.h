// The launch functions of the exit_score kernels (exit_score.cu), as the torch-facing
// launcher exit_score_op.cpp calls them: plain pointers, sizes and a stream, no torch type
// (compact_launch.h says why the kernels and the launchers are apart). Each queues work on
// `stream`, returns the launch's cudaError_t and does not synchronise.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "exit_score.cuh"

namespace eenet {
namespace cuda {

// The (N, D, S) mean over S into p.out; dtype: kF32, kF16 or kBF16 (p.x's element type).
cudaError_t launch_mean_pool(const PoolParams& p, int32_t dtype, cudaStream_t stream);

// The fused exit epilogue over p.n rows, with exit_group_size(p.n, p.c, num_sms) threads per
// row.
cudaError_t launch_exit_epilogue(const ExitParams& p, int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace eenet
