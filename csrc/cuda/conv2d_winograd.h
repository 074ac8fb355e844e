// The convolution's Winograd route on CUDA, as cuda/conv2d.cu calls it: the default for the layers it does
// since it passed its tests on an H200 and took the 3x3 layers' float32 forward+backward from 1.6-1.7 times
// cuDNN's time to 1.2 (docs/benchmarks.md). Its kernels are in cuda/conv2d_winograd.cuh; the buffers come
// from torch's allocator and the 16 GEMMs from cuBLAS here.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "common/conv2d_index.h"

namespace torch_cs231n {
namespace cuda {

// Whether Winograd does this layer's forward and d_input: TORCH_CS231N_CUDA_CONV unset or `winograd` (not
// `implicit` or `cublas`), float32 with TF32 off (torch.backends.cudnn.allow_tf32) or, only with `winograd`,
// on (its GEMMs then in TF32: a candidate, not yet run on a GPU; by default the implicit GEMM's tensor cores
// take TF32 layers), a 3×3 layer of stride 1, dilation 1, one group and padding at most 2, at least
// kImplicitMinColumns channels and filters, and buffers within kWinogradBufferLimit. The other layers, and
// d_weight, take the implicit GEMM or cuBLAS as implicit_gemm_chosen says.
bool winograd_chosen(const Conv2dGeometry& g, const at::Tensor& x);

// Whether Winograd does this layer's d_weight: TORCH_CS231N_CUDA_CONV_DW=winograd (a candidate, not yet run
// on a GPU; unset or `gemm`: the implicit GEMM or cuBLAS, as implicit_gemm_chosen says), float32 (its GEMMs
// in TF32 where torch.backends.cudnn.allow_tf32 allows), and the layers that winograd_chosen takes, whatever
// TORCH_CS231N_CUDA_CONV says.
bool winograd_grad_weight_chosen(const Conv2dGeometry& g, const at::Tensor& x);

// The buffers hold 16 floats per 2×2 output block and channel (four times the input and the output); above
// this many bytes a layer takes the implicit GEMM instead.
constexpr int64_t kWinogradBufferLimit = int64_t(4) << 30;

// y = conv(x, w) + bias; x, w, bias (if defined) and y contiguous NCHW float32.
void winograd_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, at::Tensor& y,
                      const Conv2dGeometry& g, cudaStream_t stream);

// dx = d_input of conv(x, w) for dY; all contiguous NCHW float32.
void winograd_grad_input(const at::Tensor& dy, const at::Tensor& w, at::Tensor& dx, const Conv2dGeometry& g,
                         cudaStream_t stream);

// dw = d_weight of conv(x, w) for dY; dy, x and dw contiguous NCHW float32.
void winograd_grad_weight(const at::Tensor& dy, const at::Tensor& x, at::Tensor& dw, const Conv2dGeometry& g,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace torch_cs231n
