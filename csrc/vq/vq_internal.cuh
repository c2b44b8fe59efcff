// Pieces the two nearest-code searches share (vq.cu: the FMA kernel; vq_mma.cuh: the
// tensor-core kernel): input conversion, the normalisation, the (distance, index) key of the
// split merge. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "vq/vq.h"

namespace janus_fast {
namespace vq {

constexpr float kEps = 1e-12f;
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float norm_denominator(float sum_sq) {
  return fmaxf(__fsqrt_rn(sum_sq), kEps);
}

// Distance bits that order like the floats (NaN aside), above them the index: the minimum of
// two keys is the smaller distance, then the lower index.
__device__ __forceinline__ unsigned long long pack(float dist, int64_t idx) {
  unsigned int bits = __float_as_uint(dist == 0.f ? 0.f : dist);
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<unsigned long long>(bits) << 32) | static_cast<unsigned int>(idx);
}

// Stage `count` codes from `tile` on of the prepared codebook (rows of DP fp32) and their
// squared norms in shared memory, once every thread is done with the previous tile.
template <int DP, int THREADS>
__device__ __forceinline__ void stage_code_tile(float4* s_code, float* s_sq, const float* work, const float* sq,
                                                int64_t tile, int count) {
  __syncthreads();  // the previous tile is no longer read
  const float4* src = reinterpret_cast<const float4*>(work + tile * DP);
  for (int v = threadIdx.x; v < count * (DP / 4); v += THREADS) s_code[v] = src[v];
  for (int c = threadIdx.x; c < count; c += THREADS) s_sq[c] = sq[tile + c];
  __syncthreads();
}

// Whether the tensor-core search (vq_mma.cuh) serves codes of dimension d: a multiple of 8, <= 64.
inline bool quantize_mma_supported(int64_t d) { return d >= 8 && d <= 64 && d % 8 == 0; }

}  // namespace vq
}  // namespace janus_fast
