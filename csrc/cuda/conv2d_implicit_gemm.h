// The convolution's implicit-GEMM route on CUDA, as cuda/conv2d.cu calls it: the default for float32 since it
// passed `make gpu-check` on an H200 (TORCH_CS231N_CUDA_CONV chooses; docs/conv2d.md). Its kernels are in
// cuda/conv2d_implicit_gemm.cuh; these wrappers and their many instantiations (three dtypes, two kinds of
// arithmetic for float32, three tile shapes) are compiled in cuda/conv2d_implicit_gemm.cu, beside conv2d.cu rather than
// inside it, so that the two build in parallel.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/conv2d_index.h"

namespace torch_cs231n {
namespace cuda {

// The route TORCH_CS231N_CUDA_CONV names: unset, the default (Winograd's forward and d_input where they fit,
// cuda/conv2d_winograd.h; the implicit GEMM for the rest of float32 but 1x1 layers; cuBLAS for the others);
// `winograd`, the same and Winograd with TF32 too, on 128+ channels (a candidate); `implicit`, the implicit
// GEMM wherever it can (no Winograd); `cublas`, im2col and cuBLAS. Any other value is an error that names
// these.
enum class ConvRoute { kDefault, kImplicit, kCublas, kWinograd };
ConvRoute conv_route_named();

// Whether the implicit GEMM does this convolution (not depthwise; within the grid's limits). By default,
// float32 layers other than 1x1 ones; TORCH_CS231N_CUDA_CONV=implicit: every layer it can do, float16 and
// bfloat16 too on a GPU with TF32 tensor cores (sm_80+); TORCH_CS231N_CUDA_CONV=cublas: none.
bool implicit_gemm_chosen(const Conv2dGeometry& g, const at::Tensor& x);

// A product's columns fill tiles 64 or 128 wide: forward has Fg of them, d_input Cg (d_weight Cg*kh*kw).
// Below 32 most of a tile would be idle (an RGB stem's d_input has 3), and the cuBLAS route does that product.
constexpr int64_t kImplicitMinColumns = 32;

// y = conv(x, w) + bias; x, w, bias (if defined) and y contiguous NCHW of x's dtype.
void implicit_gemm_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                           at::Tensor& y, const Conv2dGeometry& g, cudaStream_t stream);

// d_input (need_dx) and d_weight (need_dw), into dx and dw, contiguous NCHW of x's dtype.
void implicit_gemm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, at::Tensor& dx,
                            at::Tensor& dw, const Conv2dGeometry& g, bool need_dx, bool need_dw, cudaStream_t stream);

}  // namespace cuda
}  // namespace torch_cs231n
