// Autocast (torch.autocast): which dtype each op runs in when autocast is on, by torch's own policy for the
// layer it computes (the "lower_precision_fp" and "promote" lists of ATen's autocast_mode.cpp):
//
//   conv2d_forward     the autocast dtype (float16 or bfloat16, as the user chose): its floating inputs
//                      are cast, as for torch's conv2d
//   everything else    the input's own dtype (batch norm of a half input runs mixed, with float32
//                      statistics and parameters; ReLU and max-pool have nothing to gain from a cast), so
//                      no kernel is registered and the Autocast keys fall through, as for torch's ops
//
// The kernel below excludes its own key and calls the op again with the cast inputs. The backward ops
// need none: autograd calls them with what the forward saved, already cast.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>

namespace torch_cs231n {
namespace {

template <c10::DeviceType device>
at::Tensor conv2d_forward_autocast(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_cs231n::conv2d_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>();
  const at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  return op.call(at::autocast::cached_cast(dtype, input, device), at::autocast::cached_cast(dtype, weight, device),
                 at::autocast::cached_cast(dtype, bias, device), stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, AutocastCPU, m) {
  m.impl("conv2d_forward", &conv2d_forward_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(torch_cs231n, AutocastCUDA, m) {
  m.impl("conv2d_forward", &conv2d_forward_autocast<c10::DeviceType::CUDA>);
}

}  // namespace torch_cs231n
