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

// Width of the padded, fp32, normalised codebook copy vq_quantize works on (d <= 64).
int vq_padded_dim(int64_t d);

// out[i] = argmin_k ||c_k||^2 - 2 z_i . c_k (z, c normalised when l2_norm), ties to the lowest k;
// -1 where z_i has a non-finite entry.
// z [n, d] with row stride stride_z, codebook [k, d] contiguous, both `dtype`; 1 <= d <= 64.
// Workspace: codebook_work fp32 [k, vq_padded_dim(d)] and sq_work fp32 [k]. num_sms sizes the
// split of the codebook across blocks.
cudaError_t launch_vq_quantize(const void* z, int64_t stride_z, const void* codebook, int64_t* out,
                               float* codebook_work, float* sq_work, DType dtype, int64_t n,
                               int64_t k, int64_t d, bool l2_norm, int num_sms,
                               cudaStream_t stream);

}  // namespace vq
}  // namespace janus_fast
