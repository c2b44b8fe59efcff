// Pieces the two nearest-code searches share (vq.cu: the FMA kernel; vq_mma.cu: the tensor-core
// kernel): input conversion, the normalisation, the (distance, index) key of the split merge,
// the split rule. CUDA headers only.
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

// Code splits per latent block of the search (a whole-wave rule; see vq.cu).
int64_t codebook_splits(int64_t blocks_n, int64_t k, int tk, int64_t slots);

// Packed keys (all-ones: no finite latent) -> indices (-1), in place.
cudaError_t launch_unpack(int64_t* out, int64_t n, cudaStream_t stream);

// Whether launch_quantize_mma serves codes of dimension d: d a multiple of 8, at most 64.
inline bool quantize_mma_supported(int64_t d) { return d >= 8 && d <= 64 && d % 8 == 0; }

// vq_quantize's search on tensor cores (3xTF32 mma.sync, re-checked in fp32): the same
// arguments and the same result as launch_vq_quantize's FMA kernel. Defined in vq_mma.cu.
cudaError_t launch_quantize_mma(const void* z, int64_t stride_z, const float* work, const float* sq, int64_t* out,
                                DType dtype, int64_t n, int64_t k, int64_t d, bool l2_norm, int num_sms,
                                cudaStream_t stream);

}  // namespace vq
}  // namespace janus_fast
