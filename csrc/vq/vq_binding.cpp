// Torch bindings of the VQ kernels (csrc/vq/vq.cu): torch.ops.janus_fast_C.vq_lookup,
// .vq_prepare_codebook (made once per codebook; janus_fast.ops caches it) and .vq_quantize on
// the prepared codebook; results as janus_fast/ops/reference.py's. janus_fast.ops
// validates inputs (index ranges included); the checks here only guard the kernels' assumptions.
// Only device-generic c10 headers are used (no c10/cuda), so this file syntax-checks against a
// CPU build of torch; launches go on torch's current stream of the tensors' device.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "vq/vq.h"

namespace janus_fast {
namespace vq {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

cudaStream_t current_stream(const at::Device& device) {
  return static_cast<cudaStream_t>(
      c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor vq_lookup_cuda(const at::Tensor& indices, const at::Tensor& codebook, bool l2_norm,
                          at::OptionalIntArrayRef shape) {
  TORCH_CHECK(indices.is_cuda() && indices.device() == codebook.device(),
              "vq_lookup: indices and codebook must be on the same CUDA device");
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "vq_lookup: indices must be int32 or int64");
  TORCH_CHECK(codebook.dim() == 2 && codebook.is_contiguous(), "vq_lookup: codebook must be a contiguous [K, D] tensor");
  const DType dtype = dtype_of(codebook, "codebook");
  const c10::DeviceGuard guard(codebook.device());
  const at::Tensor idx = indices.contiguous();
  const int64_t n = idx.numel(), k = codebook.size(0), d = codebook.size(1);
  std::vector<int64_t> size(idx.sizes().begin(), idx.sizes().end());
  size.push_back(d);
  int64_t hw = 1;
  if (shape.has_value()) {
    const auto s = *shape;
    TORCH_CHECK(s.size() == 4 && s[1] == d && s[0] * s[2] * s[3] == n,
                "vq_lookup: shape must be (B, D, H, W) with B*H*W == indices.numel() and D == codebook.size(1)");
    size.assign(s.begin(), s.end());
    hw = s[2] * s[3];
  }
  at::Tensor out = at::empty(size, codebook.options());
  check_launch(launch_vq_lookup(idx.data_ptr(), idx.scalar_type() == at::kLong, codebook.data_ptr(),
                                out.data_ptr(), dtype, n, k, d, hw, l2_norm, shape.has_value(),
                                current_stream(codebook.device())),
               "vq_lookup");
  return out;
}

std::tuple<at::Tensor, at::Tensor> vq_prepare_codebook_cuda(const at::Tensor& codebook, bool l2_norm) {
  TORCH_CHECK(codebook.is_cuda() && codebook.dim() == 2 && codebook.is_contiguous(),
              "vq_prepare_codebook: codebook must be a contiguous CUDA [K, D] tensor");
  const int64_t k = codebook.size(0), d = codebook.size(1);
  const int dp = vq_padded_dim(d);
  TORCH_CHECK(dp > 0, "vq_prepare_codebook: the CUDA kernel supports 1 <= D <= 64, got ", d);
  TORCH_CHECK(k >= 1 && k <= 0xffffffffll, "vq_prepare_codebook: codebook must have 1 .. 2^32-1 rows");
  const DType dtype = dtype_of(codebook, "codebook");
  const c10::DeviceGuard guard(codebook.device());
  at::Tensor work = at::empty({k, dp}, codebook.options().dtype(at::kFloat));
  at::Tensor sq = at::empty({k}, codebook.options().dtype(at::kFloat));
  check_launch(launch_vq_prepare(codebook.data_ptr(), work.data_ptr<float>(), sq.data_ptr<float>(), dtype, k, d,
                                 l2_norm, current_stream(codebook.device())),
               "vq_prepare_codebook");
  return {work, sq};
}

at::Tensor vq_quantize_cuda(const at::Tensor& z, const at::Tensor& work, const at::Tensor& sq, bool l2_norm) {
  TORCH_CHECK(z.is_cuda() && z.device() == work.device() && z.device() == sq.device(),
              "vq_quantize: z and the prepared codebook must be on the same CUDA device");
  TORCH_CHECK(z.dim() == 2 && work.dim() == 2 && sq.dim() == 1 && work.size(0) == sq.size(0),
              "vq_quantize: z [N, D], work [K, DP], sq [K]");
  const int64_t n = z.size(0), k = work.size(0), d = z.size(1);
  const int dp = vq_padded_dim(d);
  TORCH_CHECK(dp > 0 && work.size(1) == dp, "vq_quantize: work must be vq_prepare_codebook's [K, ", dp,
              "] for D = ", d);
  TORCH_CHECK(work.scalar_type() == at::kFloat && sq.scalar_type() == at::kFloat && work.is_contiguous() &&
                  sq.is_contiguous(),
              "vq_quantize: the prepared codebook is contiguous float32");
  TORCH_CHECK(k >= 1 && k <= 0xffffffffll, "vq_quantize: codebook must have 1 .. 2^32-1 rows");
  const DType dtype = dtype_of(z, "z");
  const c10::DeviceGuard guard(z.device());
  const at::Tensor zc = (n > 0 && d > 1 && z.stride(1) != 1) ? z.contiguous() : z;
  at::Tensor out = at::empty({n}, z.options().dtype(at::kLong));
  if (n == 0) return out;
  int num_sms = 0;
  check_launch(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, z.device().index()),
               "vq_quantize");
  check_launch(launch_vq_quantize(zc.data_ptr(), zc.stride(0), work.data_ptr<float>(), sq.data_ptr<float>(),
                                  out.data_ptr<int64_t>(), dtype, n, k, d, l2_norm, num_sms,
                                  current_stream(z.device())),
               "vq_quantize");
  return out;
}

// Shapes only (FakeTensor / torch.compile / opcheck); symbolic sizes pass through.
at::Tensor vq_lookup_meta(const at::Tensor& indices, const at::Tensor& codebook, bool l2_norm,
                          at::OptionalIntArrayRef shape) {
  if (shape.has_value()) return at::empty(*shape, codebook.options());
  std::vector<c10::SymInt> size(indices.sym_sizes().begin(), indices.sym_sizes().end());
  size.push_back(codebook.sym_size(1));
  return at::empty_symint(size, codebook.options());
}

std::tuple<at::Tensor, at::Tensor> vq_prepare_codebook_meta(const at::Tensor& codebook, bool l2_norm) {
  const int64_t dp = vq_padded_dim(codebook.size(1));
  const auto options = codebook.options().dtype(at::kFloat);
  return {at::empty_symint({codebook.sym_size(0), c10::SymInt(dp)}, options),
          at::empty_symint({codebook.sym_size(0)}, options)};
}

at::Tensor vq_quantize_meta(const at::Tensor& z, const at::Tensor& work, const at::Tensor& sq, bool l2_norm) {
  return at::empty_symint({z.sym_size(0)}, z.options().dtype(at::kLong));
}

}  // namespace
}  // namespace vq
}  // namespace janus_fast

TORCH_LIBRARY_FRAGMENT(janus_fast_C, m) {
  m.def("vq_lookup(Tensor indices, Tensor codebook, bool l2_norm, int[]? shape) -> Tensor");
  m.def("vq_prepare_codebook(Tensor codebook, bool l2_norm) -> (Tensor, Tensor)");
  m.def("vq_quantize(Tensor z, Tensor work, Tensor sq, bool l2_norm) -> Tensor");
}

TORCH_LIBRARY_IMPL(janus_fast_C, CUDA, m) {
  m.impl("vq_lookup", &janus_fast::vq::vq_lookup_cuda);
  m.impl("vq_prepare_codebook", &janus_fast::vq::vq_prepare_codebook_cuda);
  m.impl("vq_quantize", &janus_fast::vq::vq_quantize_cuda);
}

TORCH_LIBRARY_IMPL(janus_fast_C, Meta, m) {
  m.impl("vq_lookup", &janus_fast::vq::vq_lookup_meta);
  m.impl("vq_prepare_codebook", &janus_fast::vq::vq_prepare_codebook_meta);
  m.impl("vq_quantize", &janus_fast::vq::vq_quantize_meta);
}
