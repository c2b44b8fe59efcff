// vq_quantize's nearest-code search on tensor cores, for codes of dimension d = 8, 16, .., 64.
//
// Maths. The prepared codebook holds w_k = -2 c_k (fp32, zero-padded to DP) and sq_k = ||c_k||^2;
// the distance of latent z (normalised as in vq.cu) to code k is
//     d_k = sq_k + sum_j z_j w_kj,
// and vq.cu's FMA kernel evaluates it as the fp32 chain fmaf(z_j, w_kj, .) over j = 0..DP-1
// from sq_k. Here every d_k is first estimated with 3xTF32 mma.sync (m16n8k8, fp32 accumulate):
// x = hi + lo with hi = tf32(x), lo = tf32(x - hi) (cvt.rna: round to nearest, 10 mantissa
// bits), and z.w ~ lo_z hi_w + hi_z lo_w + hi_z hi_w (the small products first). The estimate
// differs from the fp32 chain by at most
//     e_k = kRelErr(DP) * (2 sq_k + ||z||^2)      (>= kRelErr * (sq_k + sum_j |z_j w_kj|))
// (the dropped lo*lo and the tf32 residues: 3 x 2^-22 per product; fp32 rounding of the chain
// and of the tensor-core sum, which may truncate: 2^-23 per addition; tests/test_vq_mma.py
// emulates the split and checks the bound). A thread sees its codes in increasing index order;
// it keeps U = min over seen codes of (estimate + e), an upper bound of the smallest chain
// distance, and evaluates the fp32 chain only for a code whose estimate - e <= U: any other
// code's chain distance exceeds a seen code's, so it cannot be the argmin nor a tie of it. The
// chain decides (strict <: the earlier, lower index wins ties), so the result is bit for bit
// the FMA kernel's, only the arithmetic moves to the tensor cores. Near the minimum a few codes
// per latent are re-checked (~1e-5 of a distance: rare for random data, all for exact ties).
// (The relative bound assumes no operand is subnormal: under --use_fast_math the tf32 residue
// of a value below ~1e-34 flushes to zero. Normalised latents and codes are far from that.)
//
// Layout: a block of kWarps warps takes 16 latents per warp (staged, normalised, in shared
// memory) against a TK-code shared-memory tile of the prepared codebook; each warp walks the
// tile 8 codes at a time. The codes are split across blocks (vq.cu's whole-wave rule) and the
// split winners merge by the same 64-bit atomicMin as the FMA kernel (vq.cu launches both).
// Included by vq.cu (one translation unit: the two searches share its launcher).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "vq/vq_internal.cuh"

namespace janus_fast {
namespace vq {
namespace {

constexpr int kWarps = 8;
constexpr int kMmaThreads = kWarps * 32;
constexpr int kMmaRows = 16 * kWarps;  // latents per block

// The margin's relative factor: 3 x 2^-22 (split residues) plus 2^-23 per fp32 addition, of
// which the chain makes DP and the three MMAs 3 DP + 1 (rounded up generously).
__host__ __device__ constexpr float rel_err(int dp) { return (4.f * dp + 16.f) * 1.1920928955078125e-07f; }

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(x);
  lo = to_tf32(x - __uint_as_float(hi));
}

// d += a (16x8, row) * b (8x8, col), tf32 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <typename T, int DP, int TK>
__global__ void __launch_bounds__(kMmaThreads)
    quantize_mma_kernel(const T* __restrict__ z, int64_t stride_z, const float* __restrict__ work,
                        const float* __restrict__ sq, unsigned long long* __restrict__ packed, int64_t n,
                        int64_t k, int d, bool l2_norm, int64_t codes_per_split) {
  __shared__ float4 s_code4[TK * DP / 4];
  __shared__ float s_sq[TK];
  __shared__ float s_z[kMmaRows * DP];
  __shared__ float s_zsq[kMmaRows];
  __shared__ bool s_finite[kMmaRows];
  const float* s_code = reinterpret_cast<const float*>(s_code4);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kMmaRows;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t k_end = k_begin + codes_per_split < k ? k_begin + codes_per_split : k;

  // Stage the block's latents, normalised exactly as vq.cu does (a non-finite row searches as
  // zero and is written -1).
  for (int r = threadIdx.x; r < kMmaRows; r += kMmaThreads) {
    const int64_t row = row0 + r;
    float x[DP];
    float sum_sq = 0.f;
    bool finite = true;
#pragma unroll
    for (int j = 0; j < DP; ++j) {
      x[j] = (row < n && j < d) ? Cvt<T>::to(z[row * stride_z + j]) : 0.f;
      finite = finite && fabsf(x[j]) < __int_as_float(0x7f800000);
      sum_sq = fmaf(x[j], x[j], sum_sq);
    }
    float zsq = 0.f;
#pragma unroll
    for (int j = 0; j < DP; ++j) {
      if (l2_norm) x[j] = __fdiv_rn(x[j], norm_denominator(sum_sq));
      if (!finite) x[j] = 0.f;
      s_z[r * DP + j] = x[j];
      zsq = fmaf(x[j], x[j], zsq);
    }
    s_zsq[r] = zsq;
    s_finite[r] = finite;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // the mma fragment coordinates
  const int r_lo = warp * 16 + g;       // this thread's two latents: r_lo and r_lo + 8
  // A fragments (latents x dimensions), split once and kept in registers up to DP = 32 (at 64
  // they would spill: split again per step from shared memory)
  constexpr int kHeldSteps = DP <= 32 ? DP / 8 : 1;
  uint32_t a_hi[kHeldSteps][4], a_lo[kHeldSteps][4];
  const auto load_a = [&](int s, uint32_t (&hi)[4], uint32_t (&lo)[4]) {
    // a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
    split_tf32(s_z[r_lo * DP + 8 * s + t], hi[0], lo[0]);
    split_tf32(s_z[(r_lo + 8) * DP + 8 * s + t], hi[1], lo[1]);
    split_tf32(s_z[r_lo * DP + 8 * s + t + 4], hi[2], lo[2]);
    split_tf32(s_z[(r_lo + 8) * DP + 8 * s + t + 4], hi[3], lo[3]);
  };
  if (DP <= 32) {
#pragma unroll
    for (int s = 0; s < kHeldSteps; ++s) load_a(s, a_hi[s], a_lo[s]);
  }
  const float zsq[2] = {s_zsq[r_lo], s_zsq[r_lo + 8]};
  float best[2] = {__int_as_float(0x7f800000), __int_as_float(0x7f800000)};  // chain distances
  int64_t best_idx[2] = {k_end, k_end};                                       // none yet
  float upper[2] = {__int_as_float(0x7f800000), __int_as_float(0x7f800000)};  // U of the header

  for (int64_t tile = k_begin; tile < k_end; tile += TK) {
    const int count = static_cast<int>(k_end - tile < TK ? k_end - tile : TK);
    stage_code_tile<DP, kMmaThreads>(s_code4, s_sq, work, sq, tile, count);
    for (int n0 = 0; n0 < count; n0 += 8) {
      // B fragments (dimensions x codes): b0 (k = t, code g), b1 (k = t + 4, code g)
      const int cb = n0 + g < count ? n0 + g : count - 1;  // past the tile: any code, never kept
      const int c0 = n0 + 2 * t;
      const float sq0 = c0 < count ? s_sq[c0] : 0.f, sq1 = c0 + 1 < count ? s_sq[c0 + 1] : 0.f;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int s = 0; s < DP / 8; ++s) {
        uint32_t b0_hi, b0_lo, b1_hi, b1_lo;
        split_tf32(s_code[cb * DP + 8 * s + t], b0_hi, b0_lo);
        split_tf32(s_code[cb * DP + 8 * s + t + 4], b1_hi, b1_lo);
        const int held = DP <= 32 ? s : 0;
        if (DP > 32) load_a(s, a_hi[0], a_lo[0]);
        mma_tf32(acc, a_lo[held], b0_hi, b1_hi);
        mma_tf32(acc, a_hi[held], b0_lo, b1_lo);
        mma_tf32(acc, a_hi[held], b0_hi, b1_hi);
      }
      // acc: (latent g, code c0), (g, c0 + 1), (g + 8, c0), (g + 8, c0 + 1): codes in order
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i / 2, c = c0 + (i & 1);
        if (c >= count) continue;
        const float code_sq = (i & 1) ? sq1 : sq0;
        const float estimate = code_sq + acc[i];
        const float margin = rel_err(DP) * (2.f * code_sq + zsq[h]);
        if (estimate - margin <= upper[h]) {  // may be the argmin: the fp32 chain decides
          const float* zr = s_z + (r_lo + 8 * h) * DP;
          const float* wc = s_code + c * DP;
          float dist = code_sq;
#pragma unroll
          for (int j = 0; j < DP; ++j) dist = fmaf(zr[j], wc[j], dist);
          if (dist < best[h]) {  // strict: codes come in increasing order, the first tie stays
            best[h] = dist;
            best_idx[h] = tile + c;
          }
        }
        upper[h] = fminf(upper[h], estimate + margin);
      }
    }
  }
  // the four threads of a quad hold disjoint codes of the same two latents: (distance, index) min
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int step = 1; step < 4; step <<= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, best[h], step);
      const int64_t other_idx = __shfl_xor_sync(0xffffffffu, best_idx[h], step);
      if (other < best[h] || (other == best[h] && other_idx < best_idx[h])) {
        best[h] = other;
        best_idx[h] = other_idx;
      }
    }
    const int r = r_lo + 8 * h;
    const int64_t row = row0 + r;
    if (t != 0 || row >= n) continue;
    if (best_idx[h] == k_end) best_idx[h] = k_begin;  // every chain distance NaN: as vq.cu
    if (gridDim.y == 1) {
      reinterpret_cast<int64_t*>(packed)[row] = s_finite[r] ? best_idx[h] : -1;
    } else if (s_finite[r]) {  // a non-finite latent is never offered: it unpacks to -1
      atomicMin(packed + row, pack(best[h], best_idx[h]));
    }
  }
}

}  // namespace
}  // namespace vq
}  // namespace janus_fast
