// Shared pieces of the CUDA kernels of the eenet ops: the host/device qualifiers, integer
// helpers, the dtype codes the launchers pass down, and fp16/bf16 conversions.
//
// No torch header is included anywhere under csrc/cuda/*.cuh: these headers are plain CUDA
// C++, and everything that is not a kernel also compiles with a host compiler alone (g++
// without __CUDACC__), so that tests/test_cuda_host.py can check it on a machine without a
// GPU or CUDA toolkit.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define EENET_HD __host__ __device__ __forceinline__
#define EENET_DEVICE __device__ __forceinline__
#else
#define EENET_HD inline
#endif

namespace eenet {
namespace cuda {

// Element types the kernels read or write, as the launchers map at::ScalarType onto them.
enum DType : int32_t {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
  kI32 = 3,
  kI64 = 4,
};

constexpr int64_t kMaxBlocks = (int64_t(1) << 31) - 1;  // grid.x limit; the kernels loop

EENET_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
EENET_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
EENET_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The smallest power of two >= x (1 for x <= 1).
EENET_HD int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

EENET_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
#endif
}

EENET_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return b;
#endif
}

EENET_HD float inf_f() { return bits_to_float(0x7f800000u); }
EENET_HD float nan_f() { return bits_to_float(0x7fc00000u); }
EENET_HD bool is_nan(float x) { return x != x; }
// finite: neither NaN nor +-inf
EENET_HD bool is_finite(float x) { return fabsf(x) < inf_f(); }

// bf16 is the top half of an fp32: widening is exact.
EENET_HD float bf16_bits_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

// fp32 -> bf16, round to nearest even (what torch's .to(torch.bfloat16) does); NaN stays a
// quiet NaN.
EENET_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t b = float_to_bits(f);
  if (is_nan(f)) return uint16_t((b >> 16) | 0x40u);
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

EENET_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  // subnormal half: normalise
  int e = -1;
  do {
    mant <<= 1;
    ++e;
  } while ((mant & 0x400u) == 0);
  return bits_to_float(sign | uint32_t(112 - e) << 23 | ((mant & 0x3ffu) << 13));
#endif
}

// fp32 -> fp16, round to nearest even, overflow to inf, subnormals kept (as torch does).
EENET_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t b = float_to_bits(f);
  const uint16_t sign = uint16_t((b >> 16) & 0x8000u);
  const uint32_t abs = b & 0x7fffffffu;
  if (abs >= 0x7f800000u) return uint16_t(sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds past 65504: inf
  if (abs < 0x38800000u) {                                  // below 2^-14: subnormal half
    if (abs < 0x33000000u) return sign;                     // below 2^-25: rounds to 0
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // in [14, 24]
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  uint32_t q = (abs - 0x38000000u) >> 13;  // rebias 127 -> 15
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;
  return uint16_t(sign | q);
#endif
}

// Element i of a buffer of dtype `dt` (float kinds) as fp32.
EENET_HD float load_float(const void* p, int64_t i, int32_t dt) {
  if (dt == kF16) return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  if (dt == kBF16) return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

template <int32_t DT>
EENET_HD float load_float_t(const void* p, int64_t i) {
  if (DT == kF16) return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  if (DT == kBF16) return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// Store fp32 v as element i of a float buffer of dtype `dt`.
EENET_HD void store_float(void* p, int64_t i, int32_t dt, float v) {
  if (dt == kF16) {
    static_cast<uint16_t*>(p)[i] = float_to_half_bits(v);
  } else if (dt == kBF16) {
    static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// Integer element (int32 or int64 buffer) read / write.
EENET_HD int64_t load_index(const void* p, int64_t i, bool is64) {
  return is64 ? static_cast<const int64_t*>(p)[i] : int64_t(static_cast<const int32_t*>(p)[i]);
}

EENET_HD void store_index(void* p, int64_t i, bool is64, int64_t v) {
  if (is64) {
    static_cast<int64_t*>(p)[i] = v;
  } else {
    static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v);
  }
}

}  // namespace cuda
}  // namespace eenet
