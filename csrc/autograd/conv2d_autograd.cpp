// The convolution's derivative, registered under the Autograd dispatch key, in C++ for ReLU's reason
// (relu_autograd.cpp): a Python autograd.Function's bookkeeping (a Python forward, and a Python backward
// called from the engine) cost some 75 us per forward+backward, four times the kernels of a small layer
// (MobileNetV2 has 52 convolutions a step).
//
//   y = conv2d_forward(x, W, b, stride, padding, dilation, groups)
//   dx, dW, db = conv2d_backward(dy, x, W, stride, padding, dilation, groups, mask)
//
// conv2d_backward is differentiable by itself (functional.py registers _Conv2dBackward's derivative as its
// autograd), so with create_graph=True the call below records it, and double backward stays exact. Under
// torch.func transforms and forward-mode AD, functional.py applies its Python _Conv2d instead, which
// carries the jvp and the batching rule.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "autograd/tracking.h"

namespace torch_cs231n {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Grads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

at::Tensor call_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_cs231n::conv2d_forward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t)>();
  return op.call(input, weight, bias, stride, padding, dilation, groups);
}

Grads call_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                    std::array<bool, 3> mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_cs231n::conv2d_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                                          c10::IntArrayRef, c10::IntArrayRef, int64_t, std::array<bool, 3>)>();
  return op.call(grad_output, input, weight, stride, padding, dilation, groups, mask);
}

class Conv2dFn : public torch::autograd::Function<Conv2dFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
                            c10::IntArrayRef dilation, int64_t groups) {
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      output = call_forward(input, weight, bias, stride, padding, dilation, groups);
    }
    ctx->save_for_backward({input, weight});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->set_materialize_grads(false);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list none(7);
    if (!grads[0].defined()) return none;
    // needs_input_grad counts the tensor inputs only: a bias of None takes no place.
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    if (!mask[0] && !mask[1] && !mask[2]) return none;  // a first layer of frozen weights pays for nothing
    const auto saved = ctx->get_saved_variables();
    const auto stride = ctx->saved_data["stride"].toIntVector(), padding = ctx->saved_data["padding"].toIntVector(),
               dilation = ctx->saved_data["dilation"].toIntVector();
    auto [dx, dw, db] =
        call_backward(grads[0], saved[0], saved[1], stride, padding, dilation, ctx->saved_data["groups"].toInt(), mask);
    return {dx.value_or(at::Tensor()),
            dw.value_or(at::Tensor()),
            db.value_or(at::Tensor()),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor conv2d_forward_autograd(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                   c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  if (!needs_graph({input, weight, bias.value_or(at::Tensor())})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(input, weight, bias, stride, padding, dilation, groups);
  }
  return Conv2dFn::apply(input, weight, bias, stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, Autograd, m) { m.impl("conv2d_forward", &conv2d_forward_autograd); }

}  // namespace torch_cs231n
