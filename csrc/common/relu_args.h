// Host-side argument handling of ReLU's ops, shared by the CPU and CUDA kernels: the backward's checks,
// and for the masked pair (relu_forward_with_mask, relu_backward_with_mask) the mask tensor and the
// backward's layout.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "common/checks.h"
#include "common/layout.h"
#include "common/relu.h"

namespace torch_cs231n {

// What both backward ops (relu_backward, relu_backward_with_mask) check of grad_output and output.
inline void check_relu_backward(const at::Tensor& grad_output, const at::Tensor& output, const char* op) {
  check_float_dtype(output, op, "output");
  check_same_device(output, "output", grad_output, "grad_output", op);
  check_same_dtype(output, "output", grad_output, "grad_output", op);
  check_same_shape(output, "output", grad_output, "grad_output", op);
}

// The mask of an output: one int32 word per 32 elements, in the output's memory order.
inline at::Tensor relu_empty_mask(const at::Tensor& output) {
  return at::empty({relu_mask_words(output.numel())}, output.options().dtype(at::kInt));
}

// Checks the backward's arguments and returns {grad_input, dy}: grad_input laid out as the forward's
// output is, which is the order the mask bits follow, and grad_output in that layout. The output gives
// only its shape, strides and dtype; its values are not read.
inline std::pair<at::Tensor, at::Tensor> check_relu_backward_with_mask(const at::Tensor& grad_output,
                                                                       const at::Tensor& output,
                                                                       const at::Tensor& mask) {
  constexpr const char* op = "relu_backward_with_mask";
  check_relu_backward(grad_output, output, op);
  check_same_device(output, "output", mask, "mask", op);
  TORCH_CHECK(output.is_non_overlapping_and_dense(), op, ": expected output to be the output of ",
              "relu_forward_with_mask, which is dense (no gaps or overlaps), but got strides ", output.strides(),
              " for shape ", output.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kInt, op, ": expected mask to have dtype int32 (from ",
              "relu_forward_with_mask), but got ", mask.scalar_type());
  const int64_t words = relu_mask_words(output.numel());
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == words && mask.is_contiguous(), op,
              ": expected mask to be a contiguous 1-D tensor of ", words, " words (one per 32 elements of ",
              "output, shape ", output.sizes(), "), but got shape ", mask.sizes(), " and strides ", mask.strides());
  at::Tensor grad_input = at::empty_like(output);
  return {grad_input, dense_like(grad_output, grad_input)};
}

}  // namespace torch_cs231n
