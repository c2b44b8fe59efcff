// CFG sampling: one launch per decoding step, one block per output row. Maths and the random
// stream are those of kernels/sampling.py:
//   g = u + w (c - u) (fp32, each step rounded as torch does), s = g / T;
//   T == 0: argmax g, lowest index on ties;
//   top-k / top-p: thresholds on the order-preserving int32 key of s found by bisection over the
//   key range with block-wide counts / probability masses (no sort), so ties are kept or dropped
//   together; the draw is Gumbel-max, argmax over kept j of s_j - log(-log U_j), an exact sample
//   of softmax(s) on the kept set that needs neither a normaliser nor a second read of the row.
// The unfiltered path streams the row once with 4-wide vector loads (one Philox call per 4
// tokens); each filter adds up to 32 counting passes, which re-read the row from L1/L2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sampling/sampling.h"

namespace janus_fast {
namespace sampling {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kNoIndex = INT64_MAX;
constexpr int64_t kInt32Min = -2147483648LL;

// -------------------------------------------------------------------------- element access

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// Four consecutive elements from an address aligned to 4 elements.
template <typename T>
__device__ __forceinline__ void load4_aligned(const T* p, float x[4]);
template <>
__device__ __forceinline__ void load4_aligned<float>(const float* p, float x[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
}
template <>
__device__ __forceinline__ void load4_aligned<__half>(const __half* p, float x[4]) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&v.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&v.y));
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y;
}
template <>
__device__ __forceinline__ void load4_aligned<__nv_bfloat16>(const __nv_bfloat16* p, float x[4]) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.y));
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y;
}

// The (cond, uncond) row pair of one output row.
template <typename T>
struct Row {
  const T* cond;
  const T* uncond;
  int64_t vocab;
  float weight;
  float temperature;
  bool vec;

  // Tokens 4q .. 4q+3 (those < vocab): guided logits, divided by T when `scaled`. The _rn
  // intrinsics keep torch's rounding (no FMA contraction, IEEE division) under fast-math.
  __device__ __forceinline__ void load(int64_t q, bool scaled, float s[4]) const {
    float c[4], u[4];
    const int64_t j0 = 4 * q;
    if (vec && j0 + 3 < vocab) {
      load4_aligned(cond + j0, c);
      load4_aligned(uncond + j0, u);
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        c[l] = j0 + l < vocab ? to_float(cond[j0 + l]) : 0.f;
        u[l] = j0 + l < vocab ? to_float(uncond[j0 + l]) : 0.f;
      }
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      // u where c == u: a token masked to -inf in both rows stays -inf instead of NaN
      const float g = c[l] == u[l] ? u[l] : __fadd_rn(u[l], __fmul_rn(weight, __fsub_rn(c[l], u[l])));
      s[l] = scaled ? __fdiv_rn(g, temperature) : g;
    }
  }
};

// Order-preserving fp32 -> int32; -0.0 and +0.0 share a key.
__device__ __forceinline__ int32_t order_key(float x) {
  int32_t bits = __float_as_int(x);
  if ((bits & 0x7fffffff) == 0) bits = 0;
  return bits < 0 ? bits ^ 0x7fffffff : bits;
}

// -------------------------------------------------------------------------- random numbers

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 key) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const unsigned int hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const unsigned int hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ key.x, lo1, hi0 ^ c.w ^ key.y, lo0);
    key.x += 0x9E3779B9u;
    key.y += 0xBB67AE85u;
  }
  return c;
}

// -log(-log U), U = ((r >> 9) + 0.5) 2^-23 strictly inside (0, 1). E = -log U comes from the
// exact complement W = 1 - U by its series where U is near 1 (the small E that win the argmax,
// where log U would cancel), elsewhere from the fast hardware log; both stay within ~1e-5
// relative error, far below what any frequency test can see, with or without --use_fast_math.
__device__ __forceinline__ float gumbel(unsigned int r) {
  const unsigned int k = r >> 9;
  const float u = (static_cast<float>(k) + 0.5f) * 1.1920928955078125e-07f;
  const float w = (static_cast<float>(0x7fffffu - k) + 0.5f) * 1.1920928955078125e-07f;
  const float e = w < 0.0625f ? w * (1.f + w * (0.5f + w * (0.33333333f + w * (0.25f + w * 0.2f))))
                              : -__logf(u);
  return -__logf(e);
}

// -------------------------------------------------------------------------- block reductions

// Every thread gets the result, combined in the same order, so loops on it stay uniform.
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // smem may still be read by the previous reduction
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  v = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) v = op(v, smem[w]);
  return v;
}

struct Best {
  float value;
  int64_t index;
  // larger value wins; equal values: lower index (NaN never wins)
  __device__ __forceinline__ void offer(float v, int64_t i) {
    if (v > value || (v == value && i < index)) {
      value = v;
      index = i;
    }
  }
};

__device__ __forceinline__ Best block_argmax(Best best, float* sv, int64_t* si) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best.value, o);
    const int64_t i = __shfl_xor_sync(0xffffffffu, best.index, o);
    best.offer(v, i);
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    sv[threadIdx.x >> 5] = best.value;
    si[threadIdx.x >> 5] = best.index;
  }
  __syncthreads();
  best = Best{sv[0], si[0]};
  for (int w = 1; w < kWarps; ++w) best.offer(sv[w], si[w]);
  return best;
}

// -------------------------------------------------------------------------- the kernel

template <typename T>
__global__ void __launch_bounds__(kThreads) cfg_sample_kernel(CfgSampleParams p, bool vec) {
  __shared__ float s_float[kWarps];
  __shared__ int64_t s_int[kWarps];
  const int64_t b = blockIdx.x;
  const int64_t c_row = p.interleaved ? 2 * b : b;
  const int64_t u_row = p.interleaved ? 2 * b + 1 : b + p.batch;
  const T* logits = static_cast<const T*>(p.logits);
  const Row<T> row{logits + c_row * p.row_stride, logits + u_row * p.row_stride, p.vocab,
                   p.cfg_weight, p.temperature, vec};
  const int64_t groups = (p.vocab + 3) / 4;
  const int64_t seed = p.seed[0];
  const int64_t offset = p.seed[1];
  const bool greedy = p.temperature == 0.f;
  const bool use_k = !greedy && p.top_k > 0 && p.top_k < p.vocab;
  const bool use_p = !greedy && p.top_p < 1.f;
  auto fmax_op = [](float a, float c) { return fmaxf(a, c); };
  auto fsum_op = [](float a, float c) { return a + c; };
  auto isum_op = [](int64_t a, int64_t c) { return a + c; };

  int64_t threshold = kInt32Min;  // smallest kept key
  float row_max = 0.f;
  if (use_k || use_p) {
    float m = -__int_as_float(0x7f800000);
    for (int64_t q = threadIdx.x; q < groups; q += kThreads) {
      float s[4];
      row.load(q, true, s);
#pragma unroll
      for (int l = 0; l < 4; ++l)
        if (4 * q + l < p.vocab) m = fmaxf(m, s[l]);
    }
    row_max = block_reduce(m, fmax_op, s_float);
    const int64_t key_max = order_key(row_max);
    if (use_k) {  // the k-th largest key: count(key >= lo) >= k > count(key > hi)
      int64_t lo = kInt32Min, hi = key_max;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        int64_t count = 0;
        for (int64_t q = threadIdx.x; q < groups; q += kThreads) {
          float s[4];
          row.load(q, true, s);
#pragma unroll
          for (int l = 0; l < 4; ++l) count += (4 * q + l < p.vocab && order_key(s[l]) >= mid);
        }
        if (block_reduce(count, isum_op, s_int) >= p.top_k) {
          lo = mid;
        } else {
          hi = mid - 1;
        }
      }
      threshold = lo;
    }
    if (use_p) {  // smallest key t with mass(key > t) < top_p * total, over the top-k survivors
      float part = 0.f;
      for (int64_t q = threadIdx.x; q < groups; q += kThreads) {
        float s[4];
        row.load(q, true, s);
#pragma unroll
        for (int l = 0; l < 4; ++l)
          if (4 * q + l < p.vocab && order_key(s[l]) >= threshold) part += expf(s[l] - row_max);
      }
      const float target = p.top_p * block_reduce(part, fsum_op, s_float);
      int64_t lo = threshold - 1, hi = key_max;
      while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        float mass = 0.f;
        for (int64_t q = threadIdx.x; q < groups; q += kThreads) {
          float s[4];
          row.load(q, true, s);
#pragma unroll
          for (int l = 0; l < 4; ++l) {
            const int64_t key = order_key(s[l]);
            if (4 * q + l < p.vocab && key >= threshold && key > mid) mass += expf(s[l] - row_max);
          }
        }
        if (block_reduce(mass, fsum_op, s_float) < target) {
          hi = mid;
        } else {
          lo = mid;
        }
      }
      threshold = hi;
    }
  }

  const uint2 key = make_uint2(static_cast<unsigned int>(seed), static_cast<unsigned int>(static_cast<uint64_t>(seed) >> 32));
  Best best{-__int_as_float(0x7f800000), kNoIndex};
  Best top{-__int_as_float(0x7f800000), kNoIndex};  // the greedy argmax of g
  int64_t flags = 0;  // bit 0: a NaN or +inf in g; bit 1: a finite g (contract 1)
  for (int64_t q = threadIdx.x; q < groups; q += kThreads) {
    float g[4];
    row.load(q, false, g);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (4 * q + l >= p.vocab) continue;
      top.offer(g[l], 4 * q + l);
      flags |= (g[l] != g[l] || g[l] == __int_as_float(0x7f800000)) ? 1 : 0;
      flags |= fabsf(g[l]) < __int_as_float(0x7f800000) ? 2 : 0;
    }
    if (!greedy) {
      float s[4];
#pragma unroll
      for (int l = 0; l < 4; ++l) s[l] = __fdiv_rn(g[l], p.temperature);
      const uint4 r = philox4x32_10(
          make_uint4(static_cast<unsigned int>(q), static_cast<unsigned int>(b),
                     static_cast<unsigned int>(offset), static_cast<unsigned int>(static_cast<uint64_t>(offset) >> 32)),
          key);
      const unsigned int lanes[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        if (4 * q + l >= p.vocab) continue;
        const float score = order_key(s[l]) >= threshold ? s[l] + gumbel(lanes[l]) : -__int_as_float(0x7f800000);
        best.offer(score, 4 * q + l);
      }
    }
  }
  auto or_op = [](int64_t a, int64_t c) { return a | c; };
  flags = block_reduce(flags, or_op, s_int);
  best = block_argmax(best, s_float, s_int);
  top = block_argmax(top, s_float, s_int);
  if (threadIdx.x == 0) {
    // g / T overflowing to +inf is a temperature too small for fp32: the argmax (reference)
    int64_t token = greedy || best.value == __int_as_float(0x7f800000) ? top.index : best.index;
    if (flags != 2 || token == kNoIndex) token = -1;
    p.tokens[b] = token;
    if (p.ids != nullptr) {
      p.ids[c_row] = token;
      p.ids[u_row] = token;
    }
    if (p.advance) {
      // The last block to arrive moves the stream on: every block read the offset before its
      // own arrival (block_argmax's barriers order the other threads' reads before this).
      __threadfence();
      const unsigned long long arrived = atomicAdd(reinterpret_cast<unsigned long long*>(p.seed + 2), 1ull);
      if (arrived == gridDim.x - 1) {
        __threadfence();  // pairs with the others' fence: their reads happen before this write
        p.seed[1] = offset + 1;
        p.seed[2] = 0;
      }
    }
  }
}

template <typename T>
cudaError_t launch_typed(const CfgSampleParams& p, cudaStream_t stream) {
  const bool vec = reinterpret_cast<uintptr_t>(p.logits) % (4 * sizeof(T)) == 0 && p.row_stride % 4 == 0;
  cfg_sample_kernel<T><<<static_cast<unsigned int>(p.batch), kThreads, 0, stream>>>(p, vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_cfg_sample(const CfgSampleParams& params, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  if (params.batch > 0x7fffffffLL || params.vocab < 1 || params.vocab > 0x7fffffffLL) return cudaErrorInvalidValue;
  switch (params.dtype) {
    case DType::kFloat32: return launch_typed<float>(params, stream);
    case DType::kFloat16: return launch_typed<__half>(params, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sampling
}  // namespace janus_fast
