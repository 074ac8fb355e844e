// When the C++ autograd kernels (relu_autograd.cpp, conv2d_autograd.cpp, batch_norm_autograd.cpp) build a graph
// node.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <initializer_list>

namespace torch_cs231n {

// Whether autograd has anything to do with `t`: record it for backward, or carry its forward-mode
// tangent (which Function::apply refuses with a clear error, rather than drop it silently).
inline bool is_tracked(const at::Tensor& t) {
  return t.defined() && ((at::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(/*level=*/0).defined());
}

// Nothing to track (no_grad, or no input that requires grad): go straight to the kernel, as torch's own
// autograd kernels do, rather than build a graph node that would be thrown away.
inline bool needs_graph(std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    if (is_tracked(t)) return true;
  }
  return false;
}

}  // namespace torch_cs231n
