// VQ codebook kernels: lookup (gather + normalise, optionally channels-first) and the
// nearest-code search. Maths and conventions match kernels/vq.py:
//   normalise(x) = x / max(||x||, 1e-12) in fp32 with IEEE sqrt/division (__fsqrt_rn,
//   __fdiv_rn: exact rounding even under --use_fast_math), so a zero row stays zero;
//   quantize: idx_i = argmin_k ||c_k||^2 - 2 z_i . c_k, fp32, ties to the lowest k.
// The search never stores an N x K matrix: a prepare kernel writes -2 x the normalised codebook
// (fp32, zero-padded to DP columns) and the squared norms, once per codebook (janus_fast.ops
// caches them); the main kernel stages codebook tiles in shared memory, keeps a running argmin
// per latent in registers (each distance one FMA chain from ||c||^2), and, when the codes are
// split across blocks to fill whole waves of the GPU, merges the per-split winners with a 64-bit
// atomicMin on (order-preserving distance bits << 32 | index), which also sends ties to the
// lowest index; a last pass keeps the index bits. A latent with a non-finite entry gets -1.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "vq/vq.h"
#include "vq/vq_internal.cuh"
#include "vq/vq_mma.cuh"

namespace janus_fast {
namespace vq {
namespace {

constexpr int kThreads = 256;

// ------------------------------------------------------------------------------- lookup

// One thread per looked-up row: for channels-first output, neighbouring threads write
// neighbouring addresses of each channel plane.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    lookup_kernel(const I* __restrict__ indices, const T* __restrict__ codebook, T* __restrict__ out,
                  int64_t n, int64_t k, int64_t d, int64_t hw, bool l2_norm, bool channels_first) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t code = static_cast<int64_t>(indices[i]);
    const bool valid = code >= 0 && code < k;
    const T* row = codebook + (valid ? code : 0) * d;
    float denom = 1.f;
    if (l2_norm && valid) {
      float sum_sq = 0.f;
      for (int64_t j = 0; j < d; ++j) {
        const float x = Cvt<T>::to(row[j]);
        sum_sq = fmaf(x, x, sum_sq);
      }
      denom = norm_denominator(sum_sq);
    }
    T* dst = out + i * d;
    int64_t step = 1;
    if (channels_first) {
      const int64_t b = i / hw;
      dst = out + b * d * hw + (i - b * hw);
      step = hw;
    }
    for (int64_t j = 0; j < d; ++j) {
      float x = valid ? Cvt<T>::to(row[j]) : __int_as_float(0x7fc00000);  // NaN
      if (l2_norm) x = __fdiv_rn(x, denom);
      dst[j * step] = Cvt<T>::from(x);
    }
  }
}

int grid_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < (1 << 20) ? (blocks > 0 ? blocks : 1) : (1 << 20));
}

template <typename T>
cudaError_t lookup_dispatch(const void* indices, bool index_is_int64, const void* codebook, void* out,
                            int64_t n, int64_t k, int64_t d, int64_t hw, bool l2_norm,
                            bool channels_first, cudaStream_t stream) {
  const T* cb = static_cast<const T*>(codebook);
  T* o = static_cast<T*>(out);
  if (index_is_int64) {
    lookup_kernel<T, int64_t><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const int64_t*>(indices), cb, o, n, k, d, hw, l2_norm, channels_first);
  } else {
    lookup_kernel<T, int32_t><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const int32_t*>(indices), cb, o, n, k, d, hw, l2_norm, channels_first);
  }
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------- quantize

// The prepared codebook: -2 * normalised row, zero-padded to DP (fp32), and ||normalised row||^2,
// so a distance is one FMA chain ||c||^2 + sum_j z_j (-2 c_j). Made once per codebook (the ops
// layer caches it).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads)
    prepare_kernel(const T* __restrict__ codebook, float* __restrict__ work, float* __restrict__ sq,
                   int64_t k, int d, bool l2_norm) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < k; i += stride) {
    float x[DP];
    float sum_sq = 0.f;
#pragma unroll
    for (int j = 0; j < DP; ++j) {
      x[j] = j < d ? Cvt<T>::to(codebook[i * d + j]) : 0.f;
      sum_sq = fmaf(x[j], x[j], sum_sq);
    }
    if (l2_norm) {
      const float denom = norm_denominator(sum_sq);
      sum_sq = 0.f;
#pragma unroll
      for (int j = 0; j < DP; ++j) {
        x[j] = __fdiv_rn(x[j], denom);
        sum_sq = fmaf(x[j], x[j], sum_sq);
      }
    }
#pragma unroll
    for (int j = 0; j < DP; ++j) work[i * DP + j] = -2.f * x[j];  // exact: a power of two
    sq[i] = sum_sq;
  }
}

// Block (x, y): LAT * kThreads latents against codes [y * codes_per_split, ...), in TK-code
// shared-memory tiles. With one split the winner is written directly; otherwise it is merged.
template <typename T, int DP, int LAT, int TK>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const T* __restrict__ z, int64_t stride_z, const float* __restrict__ work,
                    const float* __restrict__ sq, unsigned long long* __restrict__ packed, int64_t n,
                    int64_t k, int d, bool l2_norm, int64_t codes_per_split) {
  __shared__ float4 s_code[TK * DP / 4];
  __shared__ float s_sq[TK];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * LAT) + threadIdx.x;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t k_end = k_begin + codes_per_split < k ? k_begin + codes_per_split : k;

  float zr[LAT][DP];
  float best[LAT];
  int64_t best_idx[LAT];
  bool finite[LAT];
#pragma unroll
  for (int l = 0; l < LAT; ++l) {
    const int64_t row = base + l * kThreads;
    float sum_sq = 0.f;
    finite[l] = true;
#pragma unroll
    for (int j = 0; j < DP; ++j) {
      zr[l][j] = (row < n && j < d) ? Cvt<T>::to(z[row * stride_z + j]) : 0.f;
      finite[l] = finite[l] && fabsf(zr[l][j]) < __int_as_float(0x7f800000);  // NaN fails too
      sum_sq = fmaf(zr[l][j], zr[l][j], sum_sq);
    }
    if (l2_norm) {
      const float denom = norm_denominator(sum_sq);
#pragma unroll
      for (int j = 0; j < DP; ++j) zr[l][j] = __fdiv_rn(zr[l][j], denom);
    }
    best[l] = __int_as_float(0x7f800000);  // +inf
    best_idx[l] = k_begin;
  }

  for (int64_t tile = k_begin; tile < k_end; tile += TK) {
    const int count = static_cast<int>(k_end - tile < TK ? k_end - tile : TK);
    stage_code_tile<DP, kThreads>(s_code, s_sq, work, sq, tile, count);
    for (int c = 0; c < count; ++c) {
      float e[DP];
#pragma unroll
      for (int v = 0; v < DP / 4; ++v) {
        const float4 q = s_code[c * (DP / 4) + v];
        e[4 * v] = q.x;
        e[4 * v + 1] = q.y;
        e[4 * v + 2] = q.z;
        e[4 * v + 3] = q.w;
      }
      const float code_sq = s_sq[c];
#pragma unroll
      for (int l = 0; l < LAT; ++l) {
        float dist = code_sq;  // ||c||^2 - 2 z.c as one FMA chain (e holds -2c)
#pragma unroll
        for (int j = 0; j < DP; ++j) dist = fmaf(zr[l][j], e[j], dist);
        if (dist < best[l]) {  // strict: the earlier (lower) index wins a tie
          best[l] = dist;
          best_idx[l] = tile + c;
        }
      }
    }
  }
#pragma unroll
  for (int l = 0; l < LAT; ++l) {
    const int64_t row = base + l * kThreads;
    // a non-finite latent is never offered: its key stays all-ones, which unpacks to -1
    if (row >= n) continue;
    if (gridDim.y == 1) {
      reinterpret_cast<int64_t*>(packed)[row] = finite[l] ? best_idx[l] : -1;
    } else if (finite[l]) {
      atomicMin(packed + row, pack(best[l], best_idx[l]));
    }
  }
}

__global__ void unpack_kernel(int64_t* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const unsigned long long key = static_cast<unsigned long long>(out[i]);
    out[i] = key == ~0ull ? -1 : static_cast<int64_t>(key & 0xffffffffull);
  }
}

// Codebook splits per latent block: the grid runs in whole waves of `slots` resident blocks
// (SMs x blocks per SM), and the time goes as waves / splits (each split does 1/splits of the
// codes), so take the split count with the fewest waves per unit of work, at most one split per
// TK codes; more splits must win by 10% (each adds atomics and re-reads the latents). The same
// rule as kernels/vq.py's codebook_splits.
int64_t codebook_splits(int64_t blocks_n, int64_t k, int tk, int64_t slots) {
  const int64_t most = (k + tk - 1) / tk;
  int64_t best = 1;
  double best_cost = 0.0;
  for (int64_t s = 1; s <= most && s <= 256; ++s) {
    const double cost = static_cast<double>((blocks_n * s + slots - 1) / slots) / static_cast<double>(s);
    if (s == 1 || cost < 0.9 * best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  return best;
}

template <typename T, int DP>
cudaError_t prepare_dispatch(const void* codebook, float* work, float* sq, int64_t k, int d, bool l2_norm,
                             cudaStream_t stream) {
  prepare_kernel<T, DP><<<grid_for(k), kThreads, 0, stream>>>(static_cast<const T*>(codebook), work, sq, k, d, l2_norm);
  return cudaGetLastError();
}

// Launch a search kernel (either kernel: the same arguments) over latent blocks of `rows` and
// code splits by the whole-wave rule; split winners merge in `out` and are unpacked after.
template <typename T>
cudaError_t launch_search(void (*kernel)(const T*, int64_t, const float*, const float*, unsigned long long*, int64_t,
                                         int64_t, int, bool, int64_t),
                          int threads, int64_t rows, int tk, const void* z, int64_t stride_z, const float* work,
                          const float* sq, int64_t* out, int64_t n, int64_t k, int d, bool l2_norm, int num_sms,
                          cudaStream_t stream) {
  int per_sm = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  if (err != cudaSuccess) return err;
  const int64_t blocks_n = (n + rows - 1) / rows;
  const int64_t slots = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * (per_sm > 0 ? per_sm : 1);
  int64_t splits = codebook_splits(blocks_n, k, tk, slots);
  const int64_t codes_per_split = (k + splits - 1) / splits;
  splits = (k + codes_per_split - 1) / codes_per_split;
  auto* packed = reinterpret_cast<unsigned long long*>(out);
  if (splits > 1) {  // all-ones: above every packed (distance, index); unpacks to -1
    err = cudaMemsetAsync(out, 0xff, static_cast<size_t>(n) * sizeof(int64_t), stream);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned int>(blocks_n), static_cast<unsigned int>(splits));
  kernel<<<grid, threads, 0, stream>>>(static_cast<const T*>(z), stride_z, work, sq, packed, n, k, d, l2_norm,
                                       codes_per_split);
  if (splits > 1) unpack_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, n);
  return cudaGetLastError();
}

// The tensor-core search (vq_mma.cuh: the same indices) for d a multiple of 8, else the FMA one.
template <typename T, int DP>
cudaError_t quantize_dispatch(const void* z, int64_t stride_z, const float* work, const float* sq, int64_t* out,
                              int64_t n, int64_t k, int d, bool l2_norm, int num_sms, cudaStream_t stream) {
  if (quantize_mma_supported(d)) {
    constexpr int TK = 2048 / DP;  // 8 KiB codebook tile (beside kMmaRows x DP latents)
    return launch_search<T>(quantize_mma_kernel<T, DP, TK>, kMmaThreads, kMmaRows, TK, z, stride_z, work, sq, out, n,
                            k, d, l2_norm, num_sms, stream);
  }
  constexpr int LAT = DP <= 8 ? 4 : (DP <= 16 ? 2 : 1);  // latents per thread: reuse each smem read
  constexpr int TK = 4096 / DP;                           // 16 KiB codebook tile
  return launch_search<T>(quantize_kernel<T, DP, LAT, TK>, kThreads, kThreads * LAT, TK, z, stride_z, work, sq, out,
                          n, k, d, l2_norm, num_sms, stream);
}

template <typename T>
cudaError_t prepare_by_width(const void* codebook, float* work, float* sq, int64_t k, int64_t d, bool l2_norm,
                             cudaStream_t stream) {
  const int di = static_cast<int>(d);
  switch (vq_padded_dim(d)) {
    case 8: return prepare_dispatch<T, 8>(codebook, work, sq, k, di, l2_norm, stream);
    case 16: return prepare_dispatch<T, 16>(codebook, work, sq, k, di, l2_norm, stream);
    case 32: return prepare_dispatch<T, 32>(codebook, work, sq, k, di, l2_norm, stream);
    case 64: return prepare_dispatch<T, 64>(codebook, work, sq, k, di, l2_norm, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t quantize_by_width(const void* z, int64_t stride_z, const float* work, const float* sq, int64_t* out,
                              int64_t n, int64_t k, int64_t d, bool l2_norm, int num_sms, cudaStream_t stream) {
  const int di = static_cast<int>(d);
  switch (vq_padded_dim(d)) {
    case 8: return quantize_dispatch<T, 8>(z, stride_z, work, sq, out, n, k, di, l2_norm, num_sms, stream);
    case 16: return quantize_dispatch<T, 16>(z, stride_z, work, sq, out, n, k, di, l2_norm, num_sms, stream);
    case 32: return quantize_dispatch<T, 32>(z, stride_z, work, sq, out, n, k, di, l2_norm, num_sms, stream);
    case 64: return quantize_dispatch<T, 64>(z, stride_z, work, sq, out, n, k, di, l2_norm, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int vq_padded_dim(int64_t d) {
  if (d < 1 || d > 64) return 0;
  return d <= 8 ? 8 : (d <= 16 ? 16 : (d <= 32 ? 32 : 64));
}

cudaError_t launch_vq_lookup(const void* indices, bool index_is_int64, const void* codebook,
                             void* out, DType dtype, int64_t n, int64_t k, int64_t d, int64_t hw,
                             bool l2_norm, bool channels_first, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (channels_first && hw <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return lookup_dispatch<float>(indices, index_is_int64, codebook, out, n, k, d, hw, l2_norm, channels_first, stream);
    case DType::kFloat16:
      return lookup_dispatch<__half>(indices, index_is_int64, codebook, out, n, k, d, hw, l2_norm, channels_first, stream);
    case DType::kBFloat16:
      return lookup_dispatch<__nv_bfloat16>(indices, index_is_int64, codebook, out, n, k, d, hw, l2_norm, channels_first, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_vq_prepare(const void* codebook, float* codebook_work, float* sq_work, DType dtype, int64_t k,
                              int64_t d, bool l2_norm, cudaStream_t stream) {
  if (k < 1 || k > 0xffffffffll || vq_padded_dim(d) == 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return prepare_by_width<float>(codebook, codebook_work, sq_work, k, d, l2_norm, stream);
    case DType::kFloat16: return prepare_by_width<__half>(codebook, codebook_work, sq_work, k, d, l2_norm, stream);
    case DType::kBFloat16:
      return prepare_by_width<__nv_bfloat16>(codebook, codebook_work, sq_work, k, d, l2_norm, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_vq_quantize(const void* z, int64_t stride_z, const float* codebook_work, const float* sq_work,
                               int64_t* out, DType dtype, int64_t n, int64_t k, int64_t d, bool l2_norm,
                               int num_sms, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (k < 1 || k > 0xffffffffll || vq_padded_dim(d) == 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return quantize_by_width<float>(z, stride_z, codebook_work, sq_work, out, n, k, d, l2_norm, num_sms, stream);
    case DType::kFloat16:
      return quantize_by_width<__half>(z, stride_z, codebook_work, sq_work, out, n, k, d, l2_norm, num_sms, stream);
    case DType::kBFloat16:
      return quantize_by_width<__nv_bfloat16>(z, stride_z, codebook_work, sq_work, out, n, k, d, l2_norm, num_sms,
                                              stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vq
}  // namespace janus_fast
