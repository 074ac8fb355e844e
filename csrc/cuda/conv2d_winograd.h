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
// kImplicitMinColumns channels and filters (kWinogradTf32MinChannels with TF32 on), and buffers within
// kWinogradBufferLimit. The other layers, and d_weight, take the implicit GEMM or cuBLAS as
// implicit_gemm_chosen says.
bool winograd_chosen(const Conv2dGeometry& g, const at::Tensor& x);

// Whether Winograd does this layer's d_weight: TORCH_CS231N_CUDA_CONV_DW=winograd (a candidate, not yet run
// on a GPU; unset or `gemm`: the implicit GEMM or cuBLAS, as implicit_gemm_chosen says), and the layers that
// winograd_chosen would take with `winograd`, whatever TORCH_CS231N_CUDA_CONV says; its GEMMs in TF32 where
// torch.backends.cudnn.allow_tf32 allows.
bool winograd_grad_weight_chosen(const Conv2dGeometry& g, const at::Tensor& x);

// With TF32, the fewest channels and filters for Winograd. A pass moves about 9 (C + F) floats a pixel
// (x or dY in, its 4× larger transform out and back in, the same for the output), 36 (C + F) bytes, and
// the direct TF32 GEMM does 18 C·F flops a pixel; at the H200's ~3.4 TB/s and our implicit GEMM's 72
// TFLOP/s (the 256-channel layer's TF32 forward), Winograd is the faster where C·F / (C + F) > ~42: above
// 85 channels when C = F. So the 256-channel layers (whose TF32 step took 2.7 times cuDNN's) and not the
// 64-channel ones (1.5 times); in float32, with 67 TFLOP/s of FMA for 2.25 times the work, Winograd won at 64.
constexpr int64_t kWinogradTf32MinChannels = 128;

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
