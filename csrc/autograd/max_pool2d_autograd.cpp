// Max-pool's derivative, registered under the Autograd dispatch key, in C++ as the other ops' (relu_autograd.cpp):
// through the Python autograd.Function and the op's Python-registered autograd, a pooling of a 4 x 4 plane
// took 44 us a call where torch's takes 3, all of it bookkeeping.
//
//   y, index = max_pool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode)
//   dx       = max_pool2d_backward(dy, x, index, kernel_size, stride, padding, dilation, ceil_mode)
//
// The indices are not differentiable. max_pool2d_backward is differentiable by itself (functional.py
// registers _MaxPool2dBackward's derivative as its autograd), so with create_graph=True the call below
// records it, and double backward stays exact. Under torch.func transforms and forward-mode AD,
// functional.py applies its Python _MaxPool2d instead, which carries the jvp and the batching rule.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "autograd/tracking.h"

namespace torch_cs231n {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& input, c10::IntArrayRef kernel_size,
                                                c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                c10::IntArrayRef dilation, bool ceil_mode) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_cs231n::max_pool2d_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                                                    c10::IntArrayRef, c10::IntArrayRef, bool)>();
  return op.call(input, kernel_size, stride, padding, dilation, ceil_mode);
}

at::Tensor call_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                         c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                         c10::IntArrayRef dilation, bool ceil_mode) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_cs231n::max_pool2d_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                            c10::IntArrayRef, c10::IntArrayRef, bool)>();
  return op.call(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode);
}

class MaxPool2dFn : public torch::autograd::Function<MaxPool2dFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, c10::IntArrayRef kernel_size,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               bool ceil_mode) {
    at::Tensor output, indices;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, indices) = call_forward(input, kernel_size, stride, padding, dilation, ceil_mode);
    }
    ctx->save_for_backward({input, indices});
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->mark_non_differentiable({indices});
    // Otherwise autograd fills a tensor of zeros for the indices' (never used) gradient on every backward.
    ctx->set_materialize_grads(false);
    return {output, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list none(6);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return none;
    const auto saved = ctx->get_saved_variables();
    at::Tensor dx = call_backward(grads[0], saved[0], saved[1], ctx->saved_data["kernel_size"].toIntVector(),
                                  ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
                                  ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["ceil_mode"].toBool());
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_autograd(const at::Tensor& input, c10::IntArrayRef kernel_size,
                                                               c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                               c10::IntArrayRef dilation, bool ceil_mode) {
  if (!needs_graph({input})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(input, kernel_size, stride, padding, dilation, ceil_mode);
  }
  const variable_list out = MaxPool2dFn::apply(input, kernel_size, stride, padding, dilation, ceil_mode);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, Autograd, m) { m.impl("max_pool2d_forward", &max_pool2d_forward_autograd); }

}  // namespace torch_cs231n
