// ReLU on CUDA: grid-stride loops over memory, calling the per-element math of common/relu.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/layout.h"
#include "common/relu.h"
#include "common/relu_args.h"
#include "cuda/launch.cuh"

namespace torch_cs231n {
namespace {

template <typename scalar_t>
__global__ void relu_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    y[i] = relu_value_cuda(x[i]);
  }
}

// In place: x and y alias, so no __restrict__.
template <typename scalar_t>
__global__ void relu_inplace_kernel(scalar_t* x, int64_t n) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    x[i] = relu_value_cuda(x[i]);
  }
}

template <typename scalar_t>
__global__ void relu_backward_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                                     scalar_t* __restrict__ dx, int64_t n) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    dx[i] = relu_grad(dy[i], y[i]);
  }
}

// y = relu(x) and the bit mask. The loop runs warp by warp (every lane of a warp takes the same trip
// count, because blockDim and the stride are multiples of 32), so that __ballot_sync gathers the 32
// lanes' [x > 0] into the warp's mask word, which lane 0 writes.
template <typename scalar_t>
__global__ void relu_forward_with_mask_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                              int32_t* __restrict__ mask, int64_t n) {
  const int lane = threadIdx.x % kReluMaskBits;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x - lane; base < n; base += step) {
    const int64_t i = base + lane;
    bool keep = false;
    if (i < n) {
      const scalar_t v = x[i];
      y[i] = relu_value_cuda(v);
      keep = relu_keeps(v);
    }
    const uint32_t bits = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) mask[base / kReluMaskBits] = static_cast<int32_t>(bits);
  }
}

template <typename scalar_t>
__global__ void relu_backward_with_mask_kernel(const scalar_t* __restrict__ dy, const int32_t* __restrict__ mask,
                                               scalar_t* __restrict__ dx, int64_t n) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    dx[i] =
        relu_grad_from_mask(dy[i], static_cast<uint32_t>(mask[i / kReluMaskBits]), static_cast<int>(i % kReluMaskBits));
  }
}

at::Tensor relu_forward_cuda(const at::Tensor& input) {
  check_float_or_integer_dtype(input, "relu_forward", "input");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = at::empty_like(input);
  const int64_t n = output.numel();
  if (n == 0) return output;
  const at::Tensor x = dense_like(input, output);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_forward_cuda", [&] {
    relu_forward_kernel<scalar_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

void relu_forward_inplace_cuda(at::Tensor& self) {
  check_float_or_integer_dtype(self, "relu_forward_", "self");
  at::assert_no_internal_overlap(self);
  const c10::cuda::CUDAGuard guard(self.device());
  const int64_t n = self.numel();
  if (n == 0) return;
  if (!self.is_non_overlapping_and_dense()) {
    self.copy_(relu_forward_cuda(self));  // a view with gaps: compute densely, write back through the view
    return;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, self.scalar_type(), "relu_inplace_cuda", [&] {
    relu_inplace_kernel<scalar_t>
        <<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(self.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor relu_backward_cuda(const at::Tensor& grad_output, const at::Tensor& output) {
  constexpr const char* op = "relu_backward";
  check_relu_backward(grad_output, output, op);
  const c10::cuda::CUDAGuard guard(output.device());
  at::Tensor grad_input = at::empty_like(output);
  const int64_t n = grad_input.numel();
  if (n == 0) return grad_input;
  const at::Tensor y = dense_like(output, grad_input);
  const at::Tensor dy = dense_like(grad_output, grad_input);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "relu_backward_cuda", [&] {
    relu_backward_kernel<scalar_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

std::tuple<at::Tensor, at::Tensor> relu_forward_with_mask_cuda(const at::Tensor& input) {
  check_float_dtype(input, "relu_forward_with_mask", "input");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = at::empty_like(input);
  at::Tensor mask = relu_empty_mask(output);
  const int64_t n = output.numel();
  if (n == 0) return {output, mask};
  const at::Tensor x = dense_like(input, output);
  auto stream = at::cuda::getCurrentCUDAStream();
  static_assert(cuda::kThreads % kReluMaskBits == 0, "whole warps per block, for the mask's ballot");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_forward_with_mask_cuda", [&] {
    relu_forward_with_mask_kernel<scalar_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<int32_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {output, mask};
}

at::Tensor relu_backward_with_mask_cuda(const at::Tensor& grad_output, const at::Tensor& output,
                                        const at::Tensor& mask) {
  const c10::cuda::CUDAGuard guard(output.device());
  auto [grad_input, dy] = check_relu_backward_with_mask(grad_output, output, mask);
  const int64_t n = grad_input.numel();
  if (n == 0) return grad_input;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "relu_backward_with_mask_cuda", [&] {
    relu_backward_with_mask_kernel<scalar_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), mask.const_data_ptr<int32_t>(), grad_input.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CUDA, m) {
  m.impl("relu_forward", &relu_forward_cuda);
  m.impl("relu_forward_", &relu_forward_inplace_cuda);
  m.impl("relu_backward", &relu_backward_cuda);
  m.impl("relu_forward_with_mask", &relu_forward_with_mask_cuda);
  m.impl("relu_backward_with_mask", &relu_backward_with_mask_cuda);
}

}  // namespace torch_cs231n
