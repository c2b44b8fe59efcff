// Plain C++ launcher for the CFG sampling kernel (sampling.cu); no torch types.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace janus_fast {
namespace sampling {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// A split row's merge slots (kernels/sampling.py's SLOT_* layout): a header of 16 entries, then
// one 256-bin histogram per radix pass (up to 4 for top-k and 4 for top-p).
constexpr int64_t kSlotHeader = 16;
constexpr int64_t kSlotBins = 256;
constexpr int64_t kSlotWidth = kSlotHeader + 8 * kSlotBins;

struct CfgSampleParams {
  const void* logits;  // [2B, V], rows `row_stride` elements apart, unit stride within a row
  DType dtype;
  int64_t row_stride;
  int64_t batch;  // B (output rows)
  int64_t vocab;  // V, 1 .. 2^31 - 1
  float cfg_weight;
  float temperature;  // 0: argmax
  int64_t top_k;      // 0 or >= V: off
  float top_p;        // 1: off
  bool interleaved;   // cond rows 2b / uncond 2b+1; else cond b / uncond B+b
  int64_t* seed;      // device (seed, offset[, arrival counter]), or nullptr: then the values below
  int64_t seed_value;    // the seed and offset passed by value (an eager draw: nothing else to launch)
  int64_t offset_value;
  bool advance;       // add 1 to seed[1] in this launch (seed[2] must be 0; it is reset)
  int64_t* tokens;    // [B]
  int64_t* ids;       // [2B] pair-duplicated tokens in the input layout, or nullptr
  int64_t splits;     // > 1: blocks per row, merged in `slots`
  int64_t* slots;     // [>= B, >= kSlotWidth], rows slot_stride apart, as kernels/sampling.py's
  int64_t slot_stride;  // SLOT_* layout starts them; left so by the launch
};

// One block per output row, or `splits` blocks per row (a filtered split row takes one launch per
// radix pass plus two, on `stream`; any other one launch); the stream of
// random numbers is the one kernels/sampling.py documents (Philox4x32-10, counter
// (j / 4, b, offset_lo, offset_hi), key = seed), and so are the split rows' merge slots.
cudaError_t launch_cfg_sample(const CfgSampleParams& params, cudaStream_t stream);

}  // namespace sampling
}  // namespace janus_fast
