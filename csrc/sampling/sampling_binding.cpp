// Torch binding of the CFG sampling kernel (csrc/sampling/sampling.cu):
// torch.ops.janus_fast_C.cfg_sample, the arguments of kernels/sampling.py's cfg_sample (splits and
// the merge slots of janus_fast.ops.sampling.merge_slots included).
// janus_fast.ops validates inputs; the checks here only guard the kernel's assumptions. Only
// device-generic c10 headers are used, so this file syntax-checks against a CPU build of torch.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "sampling/sampling.h"

namespace janus_fast {
namespace sampling {
namespace {

std::tuple<at::Tensor, at::Tensor> cfg_sample_cuda(const at::Tensor& logits, double cfg_weight,
                                                   double temperature, int64_t top_k, double top_p,
                                                   at::Tensor& seed, c10::string_view layout,
                                                   bool advance, bool return_ids, int64_t splits,
                                                   at::Tensor& slots) {
  const bool host_seed = seed.device().is_cpu();  // passed by value: an eager draw launches nothing else
  TORCH_CHECK(logits.is_cuda() && (host_seed || seed.device() == logits.device()),
              "cfg_sample: seed must be on the logits' CUDA device, or on the CPU");
  TORCH_CHECK(!(host_seed && advance), "cfg_sample: a CPU seed cannot be advanced by the kernel");
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) % 2 == 0 && logits.size(1) >= 1,
              "cfg_sample: logits must be [2B, V] with V >= 1");
  TORCH_CHECK(logits.size(1) == 1 || logits.stride(1) == 1, "cfg_sample: logits rows must be contiguous");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.is_contiguous() && seed.numel() >= (advance ? 3 : 2),
              "cfg_sample: seed must be a contiguous int64 tensor (seed, offset) plus the arrival counter when advance");
  TORCH_CHECK(layout == "interleaved" || layout == "halves", "cfg_sample: layout must be interleaved or halves");
  TORCH_CHECK(splits >= 1 && splits <= 65535, "cfg_sample: splits must be in [1, 65535], got ", splits);
  TORCH_CHECK(splits == 1 || (slots.device() == logits.device() && slots.scalar_type() == at::kLong &&
                              slots.is_contiguous() && slots.dim() == 2 && slots.size(1) >= kSlotWidth &&
                              slots.size(0) >= logits.size(0) / 2),
              "cfg_sample: split rows need int64 [>= B, ", kSlotWidth, "] merge slots on the logits' device");
  DType dtype;
  switch (logits.scalar_type()) {
    case at::kFloat: dtype = DType::kFloat32; break;
    case at::kHalf: dtype = DType::kFloat16; break;
    case at::kBFloat16: dtype = DType::kBFloat16; break;
    default: TORCH_CHECK(false, "cfg_sample: logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
  const c10::DeviceGuard guard(logits.device());
  const int64_t batch = logits.size(0) / 2;
  at::Tensor tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  at::Tensor ids = at::empty({return_ids ? 2 * batch : 0}, logits.options().dtype(at::kLong));
  if (batch == 0) {
    if (advance) seed.select(0, 1).add_(1);  // (advance implies a device seed)
    return {tokens, ids};
  }
  CfgSampleParams params;
  params.logits = logits.data_ptr();
  params.dtype = dtype;
  params.row_stride = logits.stride(0);
  params.batch = batch;
  params.vocab = logits.size(1);
  params.cfg_weight = static_cast<float>(cfg_weight);
  params.temperature = static_cast<float>(temperature);
  params.top_k = top_k;
  params.top_p = static_cast<float>(top_p);
  params.interleaved = layout == "interleaved";
  params.seed = host_seed ? nullptr : seed.data_ptr<int64_t>();
  params.seed_value = host_seed ? seed.data_ptr<int64_t>()[0] : 0;
  params.offset_value = host_seed ? seed.data_ptr<int64_t>()[1] : 0;
  params.advance = advance;
  params.tokens = tokens.data_ptr<int64_t>();
  params.ids = return_ids ? ids.data_ptr<int64_t>() : nullptr;
  params.splits = splits;
  params.slots = splits > 1 ? slots.data_ptr<int64_t>() : nullptr;
  params.slot_stride = splits > 1 ? slots.stride(0) : 0;
  const auto stream = static_cast<cudaStream_t>(
      c10::impl::getDeviceGuardImpl(logits.device().type())->getStream(logits.device()).native_handle());
  const cudaError_t err = launch_cfg_sample(params, stream);
  TORCH_CHECK(err == cudaSuccess, "cfg_sample: CUDA launch failed: ", cudaGetErrorString(err));
  return {tokens, ids};
}

// Shapes only (FakeTensor / torch.compile / opcheck); symbolic sizes pass through.
std::tuple<at::Tensor, at::Tensor> cfg_sample_meta(const at::Tensor& logits, double cfg_weight,
                                                   double temperature, int64_t top_k, double top_p,
                                                   at::Tensor& seed, c10::string_view layout,
                                                   bool advance, bool return_ids, int64_t splits,
                                                   at::Tensor& slots) {
  const c10::SymInt batch = logits.sym_size(0) / 2;
  const auto options = logits.options().dtype(at::kLong);
  return {at::empty_symint({batch}, options),
          at::empty_symint({return_ids ? batch * 2 : c10::SymInt(0)}, options)};
}

}  // namespace
}  // namespace sampling
}  // namespace janus_fast

TORCH_LIBRARY_FRAGMENT(janus_fast_C, m) {
  m.def(
      "cfg_sample(Tensor logits, float cfg_weight, float temperature, int top_k, float top_p, "
      "Tensor(a!) seed, str layout, bool advance, bool return_ids, int splits, Tensor(b!) slots) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(janus_fast_C, CUDA, m) {
  m.impl("cfg_sample", &janus_fast::sampling::cfg_sample_cuda);
}

TORCH_LIBRARY_IMPL(janus_fast_C, Meta, m) {
  m.impl("cfg_sample", &janus_fast::sampling::cfg_sample_meta);
}
