// C++ CPU kernels of eenet::compact and eenet::compact_out: stable multi-tensor stream
// compaction. One prefix sum over `keep`, then every kept row of every tensor is copied as
// raw bytes, so any dtype and any trailing shape is handled by the same loop.
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace eenet {
namespace {

// Copies `rb` bytes: short rows (whole 8-byte words) through an inlined word loop, which
// beats a memcpy call per row there; longer rows through memcpy.
inline void copy_row(char* to, const char* from, int64_t rb) {
  if (rb <= 128 && rb % 8 == 0) {
    for (int64_t w = 0; w < rb; w += 8) {
      uint64_t word;
      std::memcpy(&word, from + w, 8);
      std::memcpy(to + w, &word, 8);
    }
  } else {
    std::memcpy(to, from, rb);
  }
}

// Copies kept rows; returns n. `dst` must be contiguous (checked by the callers).
int64_t compact_rows(const at::Tensor& keep, at::TensorList src,
                     const std::vector<at::Tensor>& dst) {
  const int64_t n = keep.size(0);
  const at::Tensor keep_c = keep.contiguous();
  // read as bytes: a bool tensor may hold any non-zero byte for True (a uint8 tensor viewed
  // as bool), and only 0 and 1 are valid values of a C++ bool
  const uint8_t* k = static_cast<const uint8_t*>(keep_c.const_data_ptr());
  // the kept rows' indices, gathered without a branch: the copy loop below then has no
  // data-dependent branch to mispredict (half the rows would, at a 50% keep rate)
  std::vector<int64_t> kept_rows(n);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    kept_rows[count] = i;
    count += k[i] != 0;
  }
  if (count == 0) return 0;

  std::vector<at::Tensor> src_c;
  std::vector<int64_t> row_bytes;
  for (const auto& s : src) {
    src_c.push_back(s.contiguous());
    row_bytes.push_back(n ? s.numel() / n * s.element_size() : 0);
  }
  const int64_t total_row_bytes = std::max<int64_t>(
      1, std::accumulate(row_bytes.begin(), row_bytes.end(), int64_t{0}));
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / total_row_bytes);
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (size_t t = 0; t < src_c.size(); ++t) {
      const int64_t rb = row_bytes[t];
      if (rb == 0) continue;
      const char* from = static_cast<const char*>(src_c[t].const_data_ptr());
      char* to = static_cast<char*>(dst[t].data_ptr());
      for (int64_t j = begin; j < end; ++j) copy_row(to + j * rb, from + kept_rows[j] * rb, rb);
    }
  });
  return count;
}

at::Tensor count_tensor(int64_t count, const at::Tensor& keep) {
  return at::scalar_tensor(count, keep.options().dtype(at::kLong));
}

at::Tensor compact_out_cpu(const at::Tensor& keep, at::TensorList src, at::TensorList dst) {
  check_compact_args("compact_out", keep, src, dst);
  return count_tensor(compact_rows(keep, src, dst.vec()), keep);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> compact_cpu(const at::Tensor& keep,
                                                            at::TensorList src) {
  check_compact_args("compact", keep, src, std::nullopt);
  std::vector<at::Tensor> kept;
  for (const auto& s : src) kept.push_back(at::zeros_like(s, at::MemoryFormat::Contiguous));
  const int64_t count = compact_rows(keep, src, kept);
  return {kept, count_tensor(count, keep)};
}

}  // namespace

TORCH_LIBRARY_IMPL(eenet, CPU, m) {
  m.impl("compact", &compact_cpu);
  m.impl("compact_out", &compact_out_cpu);
}

}  // namespace eenet
