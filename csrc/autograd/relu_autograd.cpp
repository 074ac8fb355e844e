// ReLU's derivatives, registered under the Autograd dispatch key, so that they run in C++ for every
// backend (the CPU and CUDA kernels sit below this key):
//
//   y, m = relu_forward_with_mask(x)        dL/dx  = relu_backward_with_mask(dL/dy, y, m) = dL/dy * [x > 0]
//   dx = relu_backward_with_mask(dy, y, m)  dL/ddy = relu_backward_with_mask(dL/ddx, y, m) (the same mask)
//   dx = relu_backward(dy, y)               dL/ddy = relu_backward(dL/ddx, y)
//                                           dL/dy  = 0 for both (the mask is a step)
//
// relu_forward under autograd runs relu_forward_with_mask, whose mask m holds [x > 0] as one bit per
// element. The backward reads those bits, not y's values: 1 bit where it would read 32 (float32), a
// third fewer bytes in all. y is still saved, as torch saves it, for its shape and strides and so that
// an in-place change to y raises torch's error; its memory is not read.
//
// Why C++ and not a Python autograd.Function, as the other layers use: ReLU's kernels are so cheap that
// the Python Function's bookkeeping (a Python forward and a Python backward called from the engine, some
// 25-75 us per step) is a visible share of its time. This is the pattern torch uses for its own
// ops and torchvision for its custom ones. The in-place op relu_forward_ stays in Python
// (functional.py): it returns nothing, so a C++ Function has no output to mark dirty.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "autograd/tracking.h"

namespace torch_cs231n {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ops, called through the dispatcher: below the Autograd key they reach the CPU or CUDA kernel;
// from inside a backward run with create_graph=True they come back here and record themselves.
at::Tensor call_relu_forward(const at::Tensor& input) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_cs231n::relu_forward", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op.call(input);
}

at::Tensor call_relu_backward(const at::Tensor& grad_output, const at::Tensor& output) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_cs231n::relu_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_output, output);
}

std::tuple<at::Tensor, at::Tensor> call_relu_forward_with_mask(const at::Tensor& input) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_cs231n::relu_forward_with_mask", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(input);
}

at::Tensor call_relu_backward_with_mask(const at::Tensor& grad_output, const at::Tensor& output,
                                        const at::Tensor& mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_cs231n::relu_backward_with_mask", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_output, output, mask);
}

// The gradient with respect to y of a backward op: zero (the mask is a step), as a tensor of zeros
// where it is asked for, as torch's threshold_backward gives it, so that x receives zeros, not None.
at::Tensor zero_grad_for(AutogradContext* ctx, size_t input_index, const at::Tensor& output) {
  return ctx->needs_input_grad(input_index) ? at::zeros_like(output) : at::Tensor();
}

// dx = relu_backward(dy, y) as a differentiable function of dy, so that double backward is exact.
// (The in-place ReLU's backward, in functional.py, calls it.)
class ReLUBackward : public torch::autograd::Function<ReLUBackward> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& output) {
    ctx->save_for_backward({output});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_relu_backward(grad_output, output);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor output = ctx->get_saved_variables()[0];
    // d/d(grad_output) is the same mask; d/d(output) is zero almost everywhere.
    return {call_relu_backward(grads[0], output), zero_grad_for(ctx, 1, output)};
  }
};

// dx = relu_backward_with_mask(dy, y, m): differentiable in dy, by the same mask. y, whose values are
// not read, carries the dependence on x that torch records (dL/dy = 0), so that with create_graph=True
// the gradient requires grad exactly when torch's does.
class ReLUBackwardWithMask : public torch::autograd::Function<ReLUBackwardWithMask> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& output,
                            const at::Tensor& mask) {
    ctx->save_for_backward({output, mask});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_relu_backward_with_mask(grad_output, output, mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {call_relu_backward_with_mask(grads[0], saved[0], saved[1]), zero_grad_for(ctx, 1, saved[0]), at::Tensor()};
  }
};

// y, m = relu_forward_with_mask(x); m is not differentiable. Saves y, as torch does (the next layer
// usually keeps it alive anyway), but the backward reads only its shape and strides, and the mask.
class ReLUForward : public torch::autograd::Function<ReLUForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input) {
    at::Tensor output, mask;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, mask) = call_relu_forward_with_mask(input);
    }
    ctx->save_for_backward({output, mask});
    ctx->mark_non_differentiable({mask});
    // No zero-filled gradient for the mask (int32) or for an unused output: backward sees undefined.
    ctx->set_materialize_grads(false);
    return {output, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor()};  // y was not used: no gradient flows
    const auto saved = ctx->get_saved_variables();
    // With create_graph=True grad mode is on here, and the dispatcher routes this call to
    // relu_backward_with_mask_autograd below, which records it for the next derivative.
    return {call_relu_backward_with_mask(grads[0], saved[0], saved[1])};
  }
};

at::Tensor relu_forward_autograd(const at::Tensor& input) {
  if (!needs_graph({input})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_relu_forward(input);  // no backward to come: no mask
  }
  return ReLUForward::apply(input)[0];
}

std::tuple<at::Tensor, at::Tensor> relu_forward_with_mask_autograd(const at::Tensor& input) {
  if (!needs_graph({input})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_relu_forward_with_mask(input);
  }
  const variable_list out = ReLUForward::apply(input);
  return {out[0], out[1]};
}

at::Tensor relu_backward_autograd(const at::Tensor& grad_output, const at::Tensor& output) {
  if (!needs_graph({grad_output, output})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_relu_backward(grad_output, output);
  }
  return ReLUBackward::apply(grad_output, output);
}

at::Tensor relu_backward_with_mask_autograd(const at::Tensor& grad_output, const at::Tensor& output,
                                            const at::Tensor& mask) {
  if (!needs_graph({grad_output, output})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_relu_backward_with_mask(grad_output, output, mask);
  }
  return ReLUBackwardWithMask::apply(grad_output, output, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, Autograd, m) {
  m.impl("relu_forward", &relu_forward_autograd);
  m.impl("relu_backward", &relu_backward_autograd);
  m.impl("relu_forward_with_mask", &relu_forward_with_mask_autograd);
  m.impl("relu_backward_with_mask", &relu_backward_with_mask_autograd);
}

}  // namespace torch_cs231n
