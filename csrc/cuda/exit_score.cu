// The kernels of eenet::exit_score and eenet::exit_score_write instantiated and launched (the
// design: csrc/cuda/exit_score.cuh; the op around them: exit_score_op.cpp). CUDA headers
// only, no torch header (compact_launch.h says why).
#include "exit_score_launch.h"

namespace eenet::cuda {
namespace {

template <int32_t DT>
void launch_pool(const PoolParams& p, int lanes, int64_t blocks, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (lanes) {
    case 1: mean_pool_kernel<DT, 1><<<grid, kPoolThreads, 0, stream>>>(p); break;
    case 2: mean_pool_kernel<DT, 2><<<grid, kPoolThreads, 0, stream>>>(p); break;
    case 4: mean_pool_kernel<DT, 4><<<grid, kPoolThreads, 0, stream>>>(p); break;
    case 8: mean_pool_kernel<DT, 8><<<grid, kPoolThreads, 0, stream>>>(p); break;
    case 16: mean_pool_kernel<DT, 16><<<grid, kPoolThreads, 0, stream>>>(p); break;
    default: mean_pool_kernel<DT, 32><<<grid, kPoolThreads, 0, stream>>>(p); break;
  }
}

}  // namespace
}  // namespace eenet::cuda

// Qualified definitions: a signature that differs from the header's declaration is an error.
cudaError_t eenet::cuda::launch_mean_pool(const PoolParams& p, int32_t dtype, cudaStream_t stream) {
  const int lanes = pool_lanes(p.s);
  const int64_t blocks = pool_blocks(p.n * p.d, lanes);
  switch (dtype) {
    case kF16: launch_pool<kF16>(p, lanes, blocks, stream); break;
    case kBF16: launch_pool<kBF16>(p, lanes, blocks, stream); break;
    default: launch_pool<kF32>(p, lanes, blocks, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t eenet::cuda::launch_exit_epilogue(const ExitParams& p, int num_sms,
                                              cudaStream_t stream) {
  const int group = exit_group_size(p.n, p.c, num_sms);
  const dim3 grid(static_cast<unsigned>(exit_blocks(p.n, group)));
  constexpr int kT = kExitThreads;
  switch (group) {
    case 1: exit_epilogue_kernel<1><<<grid, kT, 0, stream>>>(p); break;
    case 2: exit_epilogue_kernel<2><<<grid, kT, 0, stream>>>(p); break;
    case 4: exit_epilogue_kernel<4><<<grid, kT, 0, stream>>>(p); break;
    case 8: exit_epilogue_kernel<8><<<grid, kT, 0, stream>>>(p); break;
    case 16: exit_epilogue_kernel<16><<<grid, kT, 0, stream>>>(p); break;
    case 32: exit_epilogue_kernel<32><<<grid, kT, 0, stream>>>(p); break;
    case 64: exit_epilogue_kernel<64><<<grid, kT, 0, stream>>>(p); break;
    case 128: exit_epilogue_kernel<128><<<grid, kT, 0, stream>>>(p); break;
    default: exit_epilogue_kernel<256><<<grid, kT, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}
