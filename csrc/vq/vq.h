// Plain C++ launchers for the VQ kernels (vq.cu); no torch types, so the kernels compile
// with nvcc alone. Pointers are device pointers; every launch goes on `stream`.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace janus_fast {
namespace vq {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// out = the codebook rows picked by `indices` (int64 when index_is_int64, else int32), scaled to
// unit L2 norm (x / max(||x||, 1e-12)) when l2_norm, in the codebook's dtype: row-major [n, d],
// or channels-first [B, d, H, W] with hw = H*W (row i lands at [i / hw, :, (i % hw)]) when
// channels_first. Out-of-range indices give NaN rows.
cudaError_t launch_vq_lookup(const void* indices, bool index_is_int64, const void* codebook,
                             void* out, DType dtype, int64_t n, int64_t k, int64_t d, int64_t hw,
                             bool l2_norm, bool channels_first, cudaStream_t stream);

// Width of the padded, fp32, prepared codebook vq_quantize works on (1 <= d <= 64; else 0).
int vq_padded_dim(int64_t d);

// The prepared codebook for vq_quantize: codebook_work fp32 [k, vq_padded_dim(d)] = -2 x the
// (normalised when l2_norm) rows, zero-padded; sq_work fp32 [k] = their squared norms.
cudaError_t launch_vq_prepare(const void* codebook, float* codebook_work, float* sq_work, DType dtype, int64_t k,
                              int64_t d, bool l2_norm, cudaStream_t stream);

// out[i] = argmin_k ||c_k||^2 - 2 z_i . c_k (z normalised when l2_norm; c from the prepared
// codebook), ties to the lowest k; -1 where z_i has a non-finite entry. z [n, d] with row stride
// stride_z, `dtype`. num_sms sizes the split of the codes across blocks.
cudaError_t launch_vq_quantize(const void* z, int64_t stride_z, const float* codebook_work, const float* sq_work,
                               int64_t* out, DType dtype, int64_t n, int64_t k, int64_t d, bool l2_norm,
                               int num_sms, cudaStream_t stream);

}  // namespace vq
}  // namespace janus_fast
