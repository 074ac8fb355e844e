// ReLU's derivatives, registered under the Autograd dispatch key, so that they run in C++ for every
// backend (the CPU and CUDA kernels sit below this key):
//
//   y  = relu_forward(x)          dL/dx  = relu_backward(dL/dy, y)            = dL/dy * [y > 0]
//   dx = relu_backward(dy, y)     dL/ddy = relu_backward(dL/ddx, y)           (the same mask)
//                                 dL/dy  = 0                                  (the mask is a step)
//
// Why C++ and not a Python autograd.Function, as the other layers use: ReLU's kernels are so cheap that
// the Python Function's bookkeeping (a Python forward and a Python backward called from the engine, some
// 25-75 us per step) is a visible share of its time. This is the pattern torch uses for its own
// ops and torchvision for its custom ones. The in-place op relu_forward_ stays in Python
// (functional.py): it returns nothing, so a C++ Function has no output to mark dirty.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

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

// dx = relu_backward(dy, y) as a differentiable function of dy, so that double backward is exact.
class ReLUBackward : public torch::autograd::Function<ReLUBackward> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& output) {
    ctx->save_for_backward({output});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_relu_backward(grad_output, output);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor output = ctx->get_saved_variables()[0];
    // d/d(grad_output) is the same mask; d/d(output) is zero almost everywhere (undefined = zero).
    return {call_relu_backward(grads[0], output), at::Tensor()};
  }
};

// y = max(x, 0). Saves y, not x: the mask [y > 0] equals [x > 0], and y is kept alive anyway by the
// next layer, so saving it costs no memory.
class ReLUForward : public torch::autograd::Function<ReLUForward> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input) {
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      output = call_relu_forward(input);
    }
    ctx->save_for_backward({output});
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor output = ctx->get_saved_variables()[0];
    // With create_graph=True grad mode is on here, and the dispatcher routes this call to
    // relu_backward_autograd below, which records it for the next derivative.
    return {call_relu_backward(grads[0], output)};
  }
};

// Whether autograd has anything to do with `t`: record it for backward, or carry its forward-mode
// tangent (which Function::apply refuses with a clear error, rather than drop it silently).
bool is_tracked(const at::Tensor& t) {
  return t.defined() && ((at::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(/*level=*/0).defined());
}

// Nothing to track (no_grad, or no input that requires grad): go straight to the kernel, as torch's own
// autograd kernels do, rather than build a graph node that would be thrown away.
bool needs_graph(const at::Tensor& a, const at::Tensor& b = at::Tensor()) {
  return is_tracked(a) || is_tracked(b);
}

at::Tensor relu_forward_autograd(const at::Tensor& input) {
  if (!needs_graph(input)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_relu_forward(input);
  }
  return ReLUForward::apply(input);
}

at::Tensor relu_backward_autograd(const at::Tensor& grad_output, const at::Tensor& output) {
  if (!needs_graph(grad_output, output)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_relu_backward(grad_output, output);
  }
  return ReLUBackward::apply(grad_output, output);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, Autograd, m) {
  m.impl("relu_forward", &relu_forward_autograd);
  m.impl("relu_backward", &relu_backward_autograd);
}

}  // namespace torch_cs231n
