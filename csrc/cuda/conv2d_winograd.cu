// The Winograd route of the convolution on CUDA (cuda/conv2d_winograd.h): the wrappers that allocate its
// buffers with torch's allocator and multiply the transformed tiles with cuBLAS in float32.
#include "cuda/conv2d_winograd.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "cuda/blas.cuh"
#include "cuda/conv2d_implicit_gemm.h"
#include "cuda/conv2d_winograd.cuh"

namespace torch_cs231n {
namespace cuda {
namespace {

namespace wc = winograd_conv;

// The 16 products M[ξ] (m × n) = U[ξ] (m × k) · V[ξ] (k × n), row-major and packed: in float32, or in TF32
// where TF32 is allowed (winograd_chosen takes such layers only when TORCH_CS231N_CUDA_CONV=winograd).
auto cublas_gemm() {
  const bool tf32 = conv_allows_tf32();
  return [tf32](int64_t m, int64_t n, int64_t k, const float* u, const float* v, float* out) {
    gemm_batched<float>(m, n, k, Operand<float>{u, k, m * k, false}, Operand<float>{v, n, k * n, false}, 0.f, out, n,
                        m * n, wc::kPositions, tf32);
  };
}

// The three buffers of one call, on x's device.
struct Buffers {
  at::Tensor u, v, m;
  Buffers(const Conv2dGeometry& g, const at::Tensor& x)
      : u(at::empty({wc::filter_size(g)}, x.options())),
        v(at::empty({wc::input_size(g)}, x.options())),
        m(at::empty({wc::output_size(g)}, x.options())) {}
};

}  // namespace

bool winograd_chosen(const Conv2dGeometry& g, const at::Tensor& x) {
  const ConvRoute named = conv_route_named();
  if (named == ConvRoute::kImplicit || named == ConvRoute::kCublas) return false;  // (default or winograd: yes)
  // with TF32 allowed, only when asked for: a candidate, not yet run on a GPU
  if (x.scalar_type() != at::kFloat || (conv_allows_tf32() && named != ConvRoute::kWinograd)) return false;
  if (!wc::fits(g) || g.c < kImplicitMinColumns || g.f < kImplicitMinColumns) return false;
  const int64_t floats = wc::filter_size(g) + wc::input_size(g) + wc::output_size(g);
  return floats * static_cast<int64_t>(sizeof(float)) <= kWinogradBufferLimit;  // (and so within cuBLAS's ints)
}

void winograd_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, at::Tensor& y,
                      const Conv2dGeometry& g, cudaStream_t stream) {
  Buffers b(g, x);
  const float* bias_ptr = bias.has_value() && bias->defined() ? bias->const_data_ptr<float>() : nullptr;
  wc::forward(x.const_data_ptr<float>(), w.const_data_ptr<float>(), bias_ptr, y.mutable_data_ptr<float>(), g,
              b.u.mutable_data_ptr<float>(), b.v.mutable_data_ptr<float>(), b.m.mutable_data_ptr<float>(),
              cublas_gemm(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void winograd_grad_input(const at::Tensor& dy, const at::Tensor& w, at::Tensor& dx, const Conv2dGeometry& g,
                         cudaStream_t stream) {
  Buffers b(g, dy);
  wc::grad_input(dy.const_data_ptr<float>(), w.const_data_ptr<float>(), dx.mutable_data_ptr<float>(), g,
                 b.u.mutable_data_ptr<float>(), b.v.mutable_data_ptr<float>(), b.m.mutable_data_ptr<float>(),
                 cublas_gemm(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace torch_cs231n
