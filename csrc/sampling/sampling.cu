// CFG sampling: one launch per decoding step, one block per output row (or several: a filtered
// row split across blocks takes one launch per radix pass plus two). Maths, random stream,
// keys, fixed-point masses and thresholds are those of kernels/sampling.py (its docstring is the
// specification); in short:
//   g = u + w (c - u) (u where c == u), fp32 rounded as torch does; contract 1: a row with a
//   NaN/+inf g or no finite g gets token -1; T == 0 (or g / T overflowing: to +inf
//   anywhere or -inf everywhere) is argmax g;
//   s = g / T (no division at T == 1), e = exp(s - max s) as the integer e 2^S;
//   the draw is Gumbel-max, argmax over kept j of s_j - log(-log U_j).
// Passes over the row: pass 1 reads the logits once (flags, argmax, max, the unfiltered Gumbel
// winner) and, when a filter is on and the row fits, keeps s in shared memory. The exact
// shortcut (one pass over shared memory) returns the winner when it survives both filters.
// Otherwise each threshold is a radix select on the 32-bit order-preserving key, 8 bits per pass
// (4 passes per filter): per-warp shared histograms of counts or fixed-point masses (integer
// atomics: exact in any order), summed over warps in a fixed order, and a one-warp suffix scan
// picks the digit; a last pass draws among the kept tokens. Rows too long for shared memory
// re-read the logits (from L2) on every pass instead.
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
  __device__ __forceinline__ void load(uint32_t q, bool scaled, float s[4]) const {
    float c[4], u[4];
    const int64_t j0 = 4 * static_cast<int64_t>(q);
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

  // The token `index`'s value as load gives it (bit-identical).
  __device__ __forceinline__ float at(int64_t index, bool scaled) const {
    float v[4];
    load(static_cast<uint32_t>(index / 4), scaled, v);
    const int lane = static_cast<int>(index & 3);  // no dynamic index: v stays in registers
    return lane == 0 ? v[0] : lane == 1 ? v[1] : lane == 2 ? v[2] : v[3];
  }
};

// Order-preserving fp32 -> [0, 2^32); -0.0 and +0.0 share a key (kernels/sampling.py's ukey).
__device__ __forceinline__ uint32_t ukey(float x) {
  uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7fffffffu) == 0) bits = 0;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
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

// -------------------------------------------------------------------------- the row

#define kInf __int_as_float(0x7f800000)
constexpr int kBins = 256;

// Where a pass reads s: shared memory (pass 1 stored it) or the logits again (rows too long).
template <typename T>
struct Source {
  Row<T> row;
  const float* chip;  // s in shared memory, or nullptr
  bool scaled;

  __device__ __forceinline__ void get(uint32_t q, float s[4]) const {
    if (chip != nullptr) {
      const float4 v = reinterpret_cast<const float4*>(chip)[q];
      s[0] = v.x; s[1] = v.y; s[2] = v.z; s[3] = v.w;
    } else {
      row.load(q, scaled, s);
    }
  }
};

// W: exp(s - m) on the tokens top-k keeps (ukey(s) >= floor), 0 elsewhere; and its fixed point.
__device__ __forceinline__ float mass_of(float s, float m, uint32_t floor) {
  const float e = __expf(s - m);
  return ukey(s) >= floor && e <= 1.f ? e : 0.f;
}
__device__ __forceinline__ unsigned long long fixed(float w, float scale) {
  return static_cast<unsigned long long>(static_cast<long long>(w * scale));
}

// One radix pass: per-warp histograms of the digit (key >> shift) & 255 over groups [first, end)
// of the tokens whose key shares `prefix` above bit shift + 8, summed over warps in warp order
// into bins. key = ukey(s) and weight 1 (mass == false), or key = ukey(W) and weight the fixed
// point of W (W = mass_of(s, m, floor)). Ends with a barrier: bins are complete.
template <typename T>
__device__ void digit_histogram(const Source<T>& src, uint32_t first, uint32_t end, int64_t vocab, bool mass,
                                float m, uint32_t floor, float scale, uint32_t prefix, int shift,
                                unsigned long long* hist, unsigned long long* bins) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = lane; i < kBins; i += 32) hist[warp * kBins + i] = 0;
  __syncwarp();
  for (uint32_t q = first + threadIdx.x; q < end; q += kThreads) {
    float s[4];
    src.get(q, s);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (4 * static_cast<int64_t>(q) + l >= vocab) continue;
      const float w = mass ? mass_of(s[l], m, floor) : 0.f;
      const uint32_t key = mass ? ukey(w) : ukey(s[l]);
      const unsigned long long weight = mass ? fixed(w, scale) : 1ull;
      const bool in_prefix = shift == 24 || (key >> (shift + 8)) == (prefix >> (shift + 8));
      if (in_prefix && weight != 0) atomicAdd(hist + warp * kBins + ((key >> shift) & 0xff), weight);
    }
  }
  __syncthreads();
  if (threadIdx.x < kBins) {
    unsigned long long sum = 0;
    for (int w = 0; w < kWarps; ++w) sum += hist[w * kBins + threadIdx.x];  // fixed order
    bins[threadIdx.x] = sum;
  }
  __syncthreads();
}

// One radix step, by warp 0: the largest digit d whose F(d) = above (the weight above the
// prefix) + the weight in bins at digits >= d still reaches the target (F never increases with
// d; digit 0 reaches it: the invariant), written to broadcast[0], and the weight above the
// prefix extended by d to broadcast[1]. bins may be shared or global memory.
__device__ __forceinline__ void choose_digit(const unsigned long long* bins, unsigned long long above, double target,
                                             unsigned long long* broadcast) {
  const int lane = threadIdx.x & 31;  // lane l owns digits 8l .. 8l+7
  unsigned long long local = 0;
  for (int j = 0; j < 8; ++j) local += bins[8 * lane + j];
  unsigned long long higher = local;  // inclusive suffix over lanes l .. 31
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long v = __shfl_down_sync(0xffffffffu, higher, o);
    if (lane + o < 32) higher += v;
  }
  unsigned long long run = above + higher - local;  // weight at digits >= 8l + 8
  int reaching = 0;
  for (int j = 7; j >= 0; --j) {
    run += bins[8 * lane + j];  // F(prefix | (8l + j) << shift)
    reaching += static_cast<double>(run) >= target;
  }
  for (int o = 16; o > 0; o >>= 1) reaching += __shfl_xor_sync(0xffffffffu, reaching, o);
  const int d = reaching - 1;
  if (lane == (d >> 3)) {
    unsigned long long next = above + higher - local;  // weight at digits > d
    for (int j = 7; j > (d & 7); --j) next += bins[8 * lane + j];
    broadcast[0] = static_cast<unsigned long long>(d);
    broadcast[1] = next;
  }
}

// The largest t in [0, 2^32) with F(t) >= target, F(t) = the count of tokens with ukey(s) >= t
// (mass == false) or the fixed-point mass of those with ukey(W) >= t (W with `floor`): four
// 8-bit radix passes over the whole row.
template <typename T>
__device__ uint32_t radix_select(const Source<T>& src, uint32_t groups, int64_t vocab, bool mass,
                                 float m, uint32_t floor, float scale, double target,
                                 unsigned long long* hist, unsigned long long* bins,
                                 unsigned long long* broadcast) {
  uint32_t prefix = 0;
  unsigned long long above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    digit_histogram(src, 0u, groups, vocab, mass, m, floor, scale, prefix, shift, hist, bins);
    if (threadIdx.x < 32) choose_digit(bins, above, target, broadcast);
    __syncthreads();
    prefix |= static_cast<uint32_t>(broadcast[0]) << shift;
    above = broadcast[1];
    __syncthreads();  // broadcast is read before the next pass writes it
  }
  return prefix;
}

// The exact shortcut's integer sums: the count of tokens above the winner's s_w, the fixed-point
// mass of the more probable ones, of those at or above s_w (a lower bound of what top-k keeps:
// the winner survives it), and the whole mass.
struct Shortcut {
  unsigned long long above, mass_above, mass_ge, total;

  // The sums a split row merged into its slots 6-9 (every block's, once the launch before ended).
  static __device__ __forceinline__ Shortcut merged(const long long* slot) {
    return {static_cast<unsigned long long>(slot[6]), static_cast<unsigned long long>(slot[7]),
            static_cast<unsigned long long>(slot[8]), static_cast<unsigned long long>(slot[9])};
  }

  // Whether the unfiltered winner survives both filters (exact: integer sums).
  __device__ __forceinline__ bool survives(const CfgSampleParams& p, bool use_k, bool use_p) const {
    bool ok = true;
    if (use_k) ok = ok && above < static_cast<unsigned long long>(p.top_k);
    if (use_p)
      ok = ok && static_cast<double>(mass_above) <
                     static_cast<double>(p.top_p) * static_cast<double>(use_k ? mass_ge : total);
    return ok;
  }
};

// The sums over groups [first, end), reduced over the block (every thread gets them).
template <typename T>
__device__ Shortcut shortcut_sums(const Source<T>& src, uint32_t first, uint32_t end, int64_t vocab, float mm,
                                  float s_w, float scale, unsigned long long* s_u64) {
  const float e_w = __expf(s_w - mm);
  Shortcut c{0, 0, 0, 0};
  for (uint32_t q = first + threadIdx.x; q < end; q += kThreads) {
    float s[4];
    src.get(q, s);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (4 * static_cast<int64_t>(q) + l >= vocab) continue;
      const float e = mass_of(s[l], mm, 0u);
      const unsigned long long f = fixed(e, scale);
      c.above += s[l] > s_w;
      c.mass_above += e > e_w ? f : 0ull;
      c.mass_ge += s[l] >= s_w ? f : 0ull;
      c.total += f;
    }
  }
  auto usum_op = [](unsigned long long a, unsigned long long b) { return a + b; };
  c.above = block_reduce(c.above, usum_op, s_u64);
  c.mass_above = block_reduce(c.mass_above, usum_op, s_u64);
  c.mass_ge = block_reduce(c.mass_ge, usum_op, s_u64);
  c.total = block_reduce(c.total, usum_op, s_u64);
  return c;
}

// The first pass's running state: contract 1's flags (bit 0: a NaN or +inf g; bit 1: a finite
// g), the argmax of g, max s, and the unfiltered Gumbel winner.
struct FirstPass {
  Best best, top;
  float m;
  int64_t flags;

  static __device__ __forceinline__ FirstPass start() { return {{-kInf, kNoIndex}, {-kInf, kNoIndex}, -kInf, 0}; }

  // Tokens 4q .. 4q+3 (those < vocab): guided logits g, s = g / T, noise r (unread when greedy).
  __device__ __forceinline__ void add(uint32_t q, int64_t vocab, const float g[4], const float s[4], bool greedy,
                                      uint4 r) {
    const unsigned int lanes[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (4 * static_cast<int64_t>(q) + l >= vocab) continue;
      top.offer(g[l], 4 * q + l);
      flags |= (g[l] != g[l] || g[l] == kInf) ? 1 : 0;
      flags |= fabsf(g[l]) < kInf ? 2 : 0;
      m = fmaxf(m, s[l]);
      if (!greedy) best.offer(s[l] + gumbel(lanes[l]), 4 * q + l);
    }
  }

  // Over the block: every thread gets the results (max s only `with_max`).
  __device__ __forceinline__ void reduce(float* s_float, int64_t* s_int, bool with_max) {
    flags = block_reduce(flags, [](int64_t a, int64_t b) { return a | b; }, s_int);
    if (with_max) m = block_reduce(m, [](float a, float b) { return fmaxf(a, b); }, s_float);
    best = block_argmax(best, s_float, s_int);
    top = block_argmax(top, s_float, s_int);
  }
};

// The Gumbel winner among the kept tokens of groups [first, end) (ukey(s) >= t_k and, with
// top-p, ukey(W) >= t_p), with the first pass's noise; over the block.
template <typename T, typename Noise>
__device__ Best kept_winner(const Source<T>& src, uint32_t first, uint32_t end, int64_t vocab, const Noise& noise,
                            float mm, uint32_t t_k, bool use_p, uint32_t t_p, float* s_float, int64_t* s_int) {
  Best kept{-kInf, kNoIndex};
  for (uint32_t q = first + threadIdx.x; q < end; q += kThreads) {
    float s[4];
    src.get(q, s);
    const uint4 r = noise(q);
    const unsigned int lanes[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (4 * static_cast<int64_t>(q) + l >= vocab) continue;
      const bool keep = ukey(s[l]) >= t_k && (!use_p || ukey(mass_of(s[l], mm, t_k)) >= t_p);
      if (keep) kept.offer(s[l] + gumbel(lanes[l]), 4 * q + l);
    }
  }
  return block_argmax(kept, s_float, s_int);
}

// -------------------------------------------------------------------------- the kernels

// Row b's token, and in the ids its pair in the input layout.
__device__ __forceinline__ void write_token(const CfgSampleParams& p, uint32_t b, int64_t c_row, int64_t u_row,
                                            int64_t token) {
  p.tokens[b] = token;
  if (p.ids != nullptr) {
    p.ids[c_row] = token;
    p.ids[u_row] = token;
  }
}

// With p.advance, the last block of the launch moves the random stream on: every block read the
// offset before its own arrival (the reductions' barriers order the other threads' reads first).
__device__ __forceinline__ void advance_stream(const CfgSampleParams& p, int64_t offset) {
  if (!p.advance) return;
  __threadfence();
  const unsigned long long arrived = atomicAdd(reinterpret_cast<unsigned long long*>(p.seed + 2), 1ull);
  if (arrived == static_cast<unsigned long long>(gridDim.x) * gridDim.y - 1) {
    __threadfence();  // pairs with the others' fence: their reads happen before this write
    p.seed[1] = offset + 1;
    p.seed[2] = 0;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) cfg_sample_kernel(CfgSampleParams p, bool vec, bool on_chip) {
  __shared__ float s_float[kWarps];
  __shared__ int64_t s_int[kWarps];
  __shared__ unsigned long long s_u64[kWarps];
  __shared__ unsigned long long s_bins[kBins];
  __shared__ unsigned long long s_broadcast[2];
  extern __shared__ __align__(16) unsigned char s_dynamic[];  // [hist | s], when filtering
  auto* hist = reinterpret_cast<unsigned long long*>(s_dynamic);
  float* chip = on_chip ? reinterpret_cast<float*>(s_dynamic + kWarps * kBins * sizeof(unsigned long long)) : nullptr;

  const uint32_t b = blockIdx.x;
  const int64_t c_row = p.interleaved ? 2 * static_cast<int64_t>(b) : b;
  const int64_t u_row = p.interleaved ? 2 * static_cast<int64_t>(b) + 1 : b + p.batch;
  const T* logits = static_cast<const T*>(p.logits);
  const bool greedy = p.temperature == 0.f;
  const bool scaled = p.temperature != 1.f;  // no division at T == 1
  const Row<T> row{logits + c_row * p.row_stride, logits + u_row * p.row_stride, p.vocab,
                   p.cfg_weight, p.temperature, vec};
  const uint32_t groups = static_cast<uint32_t>((p.vocab + 3) / 4);  // vocab < 2^31: 32-bit counters
  const int64_t seed = p.seed != nullptr ? p.seed[0] : p.seed_value;
  const int64_t offset = p.seed != nullptr ? p.seed[1] : p.offset_value;
  const bool use_k = !greedy && p.top_k > 0 && p.top_k < p.vocab;
  const bool use_p = !greedy && p.top_p < 1.f;
  const uint2 key = make_uint2(static_cast<unsigned int>(seed), static_cast<unsigned int>(static_cast<uint64_t>(seed) >> 32));
  const auto noise = [&](uint32_t q) {
    return philox4x32_10(make_uint4(q, b, static_cast<unsigned int>(offset),
                                    static_cast<unsigned int>(static_cast<uint64_t>(offset) >> 32)), key);
  };
  auto usum_op = [](unsigned long long a, unsigned long long c) { return a + c; };
  // 2^S for the fixed-point masses, S = 62 - bits(V): V masses <= 1 sum below 2^62
  const float mass_scale = ldexpf(1.f, 62 - (64 - __clzll(static_cast<long long>(p.vocab))));

  // Pass 1: the only read of the logits when the row fits on the chip.
  FirstPass pass = FirstPass::start();
  for (uint32_t q = threadIdx.x; q < groups; q += kThreads) {
    float g[4], s[4];
    row.load(q, false, g);
#pragma unroll
    for (int l = 0; l < 4; ++l) s[l] = scaled ? __fdiv_rn(g[l], p.temperature) : g[l];
    if (chip != nullptr) reinterpret_cast<float4*>(chip)[q] = make_float4(s[0], s[1], s[2], s[3]);
    pass.add(q, p.vocab, g, s, greedy, greedy ? make_uint4(0, 0, 0, 0) : noise(q));
  }
  pass.reduce(s_float, s_int, true);
  const float m = pass.m;
  int64_t token = pass.best.index;

  if (use_k || use_p) {
    const Source<T> src{row, chip, scaled};
    const float mm = m > -kInf ? m : 0.f;  // rows with no finite s are marked -1 below
    // s of the winner: recomputed from its own logits (bit-identical to pass 1)
    const float s_w = pass.best.index != kNoIndex ? row.at(pass.best.index, scaled) : -kInf;
    const bool survives = shortcut_sums(src, 0u, groups, p.vocab, mm, s_w, mass_scale, s_u64).survives(p, use_k, use_p);
    if (!survives) {
      uint32_t t_k = 0, t_p = 0;
      if (use_k)
        t_k = radix_select(src, groups, p.vocab, false, mm, 0u, mass_scale, static_cast<double>(p.top_k),
                           hist, s_bins, s_broadcast);
      if (use_p) {
        unsigned long long kept = 0;
        for (uint32_t q = threadIdx.x; q < groups; q += kThreads) {
          float s[4];
          src.get(q, s);
#pragma unroll
          for (int l = 0; l < 4; ++l)
            if (4 * static_cast<int64_t>(q) + l < p.vocab) kept += fixed(mass_of(s[l], mm, t_k), mass_scale);
        }
        kept = block_reduce(kept, usum_op, s_u64);
        t_p = radix_select(src, groups, p.vocab, true, mm, t_k, mass_scale,
                           static_cast<double>(p.top_p) * static_cast<double>(kept), hist, s_bins, s_broadcast);
        t_p = min(t_p, ukey(1.f));  // W = 1 (the maximum) is always kept
      }
      token = kept_winner(src, 0u, groups, p.vocab, noise, mm, t_k, use_p, t_p, s_float, s_int).index;
    }
  }

  if (threadIdx.x == 0) {
    // g / T overflowing (to +inf anywhere, or to -inf everywhere) is a temperature too small
    // for fp32: the argmax (reference)
    if (greedy || fabsf(m) == kInf) token = pass.top.index;
    if (pass.flags != 2 || token == kNoIndex) token = -1;
    write_token(p, b, c_row, u_row, token);
    advance_stream(p, offset);
  }
}

constexpr long long kEmptySlot = static_cast<long long>(0x8000000000000000ull);  // below every packed value

// (key << 32) | (2^32 - 1 - index) as a signed 64-bit value, kernels/sampling.py's packing: the
// larger key wins, then the lower index, in any order of arrival.
__device__ __forceinline__ long long pack(float value, int64_t index) {
  const long long key = static_cast<long long>(ukey(value)) - 2147483648LL;
  return static_cast<long long>(static_cast<unsigned long long>(key) << 32) |
         static_cast<long long>(0xffffffffLL - index);
}
__device__ __forceinline__ int64_t unpack_index(long long packed) { return 0xffffffffLL - (packed & 0xffffffffLL); }

// The fp32 value whose ukey is k (the inverse of ukey; +0.0 for the shared key of the zeros).
__device__ __forceinline__ float from_ukey(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Rows split across gridDim.y blocks each (`chunk_groups` groups of 4 tokens per block), merged
// in the row's slots (kernels/sampling.py's SLOT_* layout: winner, argmax, flags, arrivals, max
// key, kept winner, the shortcut's sums, then one 256-bin histogram per radix pass) with 64-bit
// atomicMax on packed (key, index) and integer atomicAdd: exact in any order of arrival.
// Launched once per phase; each launch boundary is the barrier between phases:
//   0: the first pass (flags, argmax of g, max s, Gumbel winner); unfiltered and greedy rows
//      end here (`passes` == 0): the row's last block writes the token and resets the slots.
//   1 .. passes: radix pass phase - 1 (8 bits of t_k over ukey(s) for the first k_passes, then
//      of t_p over ukey(W)), phase 1 with the shortcut's sums; every block replays the digits of
//      the earlier passes from their merged histograms. Rows whose winner survives skip them.
//   passes + 1: the Gumbel winner among the kept tokens, then as phase 0's end.
// Thresholds, masses and noise are those of cfg_sample_kernel: the tokens are the same.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) cfg_sample_split_kernel(CfgSampleParams p, bool vec,
                                                                      uint32_t chunk_groups, int phase,
                                                                      int k_passes, int p_passes) {
  __shared__ float s_float[kWarps];
  __shared__ int64_t s_int[kWarps];
  __shared__ unsigned long long s_u64[kWarps];
  __shared__ unsigned long long s_hist[kWarps * kBins];
  __shared__ unsigned long long s_bins[kBins];
  __shared__ unsigned long long s_broadcast[2];
  __shared__ bool s_last;
  const uint32_t b = blockIdx.x;
  const int64_t c_row = p.interleaved ? 2 * static_cast<int64_t>(b) : b;
  const int64_t u_row = p.interleaved ? 2 * static_cast<int64_t>(b) + 1 : b + p.batch;
  const T* logits = static_cast<const T*>(p.logits);
  const bool greedy = p.temperature == 0.f;
  const bool scaled = p.temperature != 1.f;
  const Row<T> row{logits + c_row * p.row_stride, logits + u_row * p.row_stride, p.vocab,
                   p.cfg_weight, p.temperature, vec};
  const Source<T> src{row, nullptr, scaled};
  const uint32_t groups = static_cast<uint32_t>((p.vocab + 3) / 4);
  const uint32_t first = blockIdx.y * chunk_groups;
  const uint32_t end = min(groups, first + chunk_groups);
  const int64_t seed = p.seed != nullptr ? p.seed[0] : p.seed_value;
  const int64_t offset = p.seed != nullptr ? p.seed[1] : p.offset_value;
  const uint2 key = make_uint2(static_cast<unsigned int>(seed), static_cast<unsigned int>(static_cast<uint64_t>(seed) >> 32));
  const auto noise = [&](uint32_t q) {
    return philox4x32_10(make_uint4(q, b, static_cast<unsigned int>(offset),
                                    static_cast<unsigned int>(static_cast<uint64_t>(offset) >> 32)), key);
  };
  const int passes = k_passes + p_passes;
  const int final_phase = passes > 0 ? passes + 1 : 0;
  long long* slot = reinterpret_cast<long long*>(p.slots + p.slot_stride * static_cast<int64_t>(b));
  auto* slot_u = reinterpret_cast<unsigned long long*>(slot);
  const float mass_scale = ldexpf(1.f, 62 - (64 - __clzll(static_cast<long long>(p.vocab))));
  const bool use_k = k_passes > 0, use_p = p_passes > 0;

  if (phase == 0) {
    FirstPass pass = FirstPass::start();
    for (uint32_t q = first + threadIdx.x; q < end; q += kThreads) {
      float g[4], s[4];
      row.load(q, false, g);
#pragma unroll
      for (int l = 0; l < 4; ++l) s[l] = scaled ? __fdiv_rn(g[l], p.temperature) : g[l];
      pass.add(q, p.vocab, g, s, greedy, greedy ? make_uint4(0, 0, 0, 0) : noise(q));
    }
    pass.reduce(s_float, s_int, passes > 0);  // (the unfiltered split reads no max)
    if (threadIdx.x == 0) {
      if (pass.best.index != kNoIndex) atomicMax(slot, pack(pass.best.value, pass.best.index));
      if (pass.top.index != kNoIndex) atomicMax(slot + 1, pack(pass.top.value, pass.top.index));
      atomicOr(slot_u + 2, static_cast<unsigned long long>(pass.flags));
      if (passes > 0) atomicMax(slot + 4, static_cast<long long>(ukey(pass.m)) - 2147483648LL);
    }
  } else {
    const float m = from_ukey(static_cast<uint32_t>(slot[4] + 2147483648LL));
    const float mm = m > -kInf ? m : 0.f;  // rows with no finite s are marked -1 below
    bool survives = false;
    if (phase == 1) {
      // s of the winner, recomputed from its own logits (bit-identical)
      const float s_w = slot[0] != kEmptySlot ? row.at(unpack_index(slot[0]), scaled) : -kInf;
      const Shortcut c = shortcut_sums(src, first, end, p.vocab, mm, s_w, mass_scale, s_u64);
      if (threadIdx.x == 0) {
        atomicAdd(slot_u + 6, c.above);
        atomicAdd(slot_u + 7, c.mass_above);
        atomicAdd(slot_u + 8, c.mass_ge);
        atomicAdd(slot_u + 9, c.total);
      }
    } else {
      survives = Shortcut::merged(slot).survives(p, use_k, use_p);
    }
    if (!survives) {
      // Replay the digits of passes 0 .. done-1 from their merged histograms.
      const int done = phase < final_phase ? phase - 1 : passes;
      uint32_t t_k = 0, prefix = 0;
      unsigned long long above = 0;
      double target = static_cast<double>(p.top_k);
      for (int j = 0; j <= done && j <= passes; ++j) {
        if (j == k_passes) {  // top-k's threshold is complete; the top-p select starts
          t_k = prefix;
          prefix = 0;
          above = 0;
        }
        if (j == done) break;
        const unsigned long long* bins = slot_u + kSlotHeader + kSlotBins * j;
        if (j == k_passes) {  // top_p times the kept mass: the first top-p histogram's total
          unsigned long long kept = 0;
          for (int i = 0; i < kBins; ++i) kept += bins[i];
          target = static_cast<double>(p.top_p) * static_cast<double>(kept);
        }
        if (threadIdx.x < 32) choose_digit(bins, above, target, s_broadcast);
        __syncthreads();
        prefix |= static_cast<uint32_t>(s_broadcast[0]) << (24 - 8 * (j % 4));
        above = s_broadcast[1];
        __syncthreads();  // s_broadcast is read before the next replay writes it
      }
      if (phase < final_phase) {  // one more radix pass over this block's columns
        const int j = phase - 1;
        digit_histogram(src, first, end, p.vocab, j >= k_passes, mm, t_k, mass_scale, prefix, 24 - 8 * (j % 4),
                        s_hist, s_bins);
        if (threadIdx.x < kBins && s_bins[threadIdx.x] != 0)
          atomicAdd(slot_u + kSlotHeader + kSlotBins * j + threadIdx.x, s_bins[threadIdx.x]);
      } else {  // the Gumbel winner among the kept tokens, with the noise of phase 0
        const uint32_t t_p = use_p ? min(prefix, ukey(1.f)) : 0u;  // W = 1 (the maximum) is always kept
        const Best kept = kept_winner(src, first, end, p.vocab, noise, mm, t_k, use_p, t_p, s_float, s_int);
        if (threadIdx.x == 0 && kept.index != kNoIndex) atomicMax(slot + 5, pack(kept.value, kept.index));
      }
    }
  }

  if (phase != final_phase) return;
  __syncthreads();  // every thread has read the slots (m, the sums) before the last block resets them
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(slot_u + 3, 1ull) == gridDim.y - 1;  // the row's last block
  }
  __syncthreads();
  if (s_last) {
    if (threadIdx.x == 0) {
      __threadfence();
      const auto empty = static_cast<unsigned long long>(kEmptySlot);
      const long long merged = atomicExch(slot_u, empty);
      const long long merged_top = atomicExch(slot_u + 1, empty);
      const unsigned long long all_flags = atomicExch(slot_u + 2, 0ull);
      atomicExch(slot_u + 3, 0ull);
      int64_t winner = unpack_index(merged);
      if (passes > 0) {
        atomicExch(slot_u + 4, empty);
        const long long kept = atomicExch(slot_u + 5, empty);
        if (!Shortcut::merged(slot).survives(p, use_k, use_p)) winner = unpack_index(kept);
      }
      // a +-inf winner means max s is +-inf (the noise is finite): g / T overflowed, the argmax
      const long long top_key = (merged >> 32) + 2147483648LL;
      const bool overflow = top_key == ukey(kInf) || top_key == ukey(-kInf);
      int64_t token = greedy || overflow ? unpack_index(merged_top) : winner;
      if (all_flags != 2) token = -1;
      write_token(p, b, c_row, u_row, token);
    }
    __syncthreads();  // the sums are read before they are reset
    if (passes > 0)  // the sums and histograms (every block has read them by now)
      for (int64_t i = 6 + threadIdx.x; i < kSlotHeader + kSlotBins * passes; i += kThreads) slot[i] = 0;
  }
  if (threadIdx.x == 0) advance_stream(p, offset);
}

constexpr size_t kHistBytes = kWarps * kBins * sizeof(unsigned long long);

template <typename T>
cudaError_t launch_typed(const CfgSampleParams& p, cudaStream_t stream) {
  const bool vec = reinterpret_cast<uintptr_t>(p.logits) % (4 * sizeof(T)) == 0 && p.row_stride % 4 == 0;
  const bool greedy = p.temperature == 0.f;
  const bool filtered = !greedy && ((p.top_k > 0 && p.top_k < p.vocab) || p.top_p < 1.f);
  if (p.splits > 1) {
    const uint32_t groups = static_cast<uint32_t>((p.vocab + 3) / 4);
    const uint32_t splits = static_cast<uint32_t>(min(p.splits, static_cast<int64_t>(groups)));
    const uint32_t chunk_groups = (groups + splits - 1) / splits;
    const dim3 grid(static_cast<unsigned int>(p.batch), (groups + chunk_groups - 1) / chunk_groups);
    const int k_passes = !greedy && p.top_k > 0 && p.top_k < p.vocab ? 4 : 0;
    const int p_passes = !greedy && p.top_p < 1.f ? 4 : 0;
    const int last = k_passes + p_passes > 0 ? k_passes + p_passes + 1 : 0;
    for (int phase = 0; phase <= last; ++phase) {
      CfgSampleParams q = p;
      q.advance = p.advance && phase == last;  // every launch has read the offset by then
      cfg_sample_split_kernel<T><<<grid, kThreads, 0, stream>>>(q, vec, chunk_groups, phase, k_passes, p_passes);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  size_t smem = 0;
  bool on_chip = false;
  if (filtered) {
    int device = 0, optin = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    const size_t row_bytes = static_cast<size_t>((p.vocab + 3) / 4) * 4 * sizeof(float);
    const size_t static_bytes = 4096;  // the kernel's own __shared__ arrays, rounded up
    on_chip = kHistBytes + row_bytes + static_bytes <= static_cast<size_t>(optin);
    smem = kHistBytes + (on_chip ? row_bytes : 0);
    err = cudaFuncSetAttribute(cfg_sample_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  cfg_sample_kernel<T><<<static_cast<unsigned int>(p.batch), kThreads, smem, stream>>>(p, vec, on_chip);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_cfg_sample(const CfgSampleParams& params, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  if (params.batch > 0x7fffffffLL || params.vocab < 1 || params.vocab > 0x7fffffffLL || params.splits < 1 ||
      params.splits > 65535)  // (splits is gridDim.y)
    return cudaErrorInvalidValue;
  switch (params.dtype) {
    case DType::kFloat32: return launch_typed<float>(params, stream);
    case DType::kFloat16: return launch_typed<__half>(params, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sampling
}  // namespace janus_fast
