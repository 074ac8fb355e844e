// The Winograd route of the convolution on CUDA (cuda/conv2d_winograd.h): the wrappers that allocate its
// buffers with torch's allocator and multiply the transformed tiles with cuBLAS.
#include "cuda/conv2d_winograd.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cuda/blas.cuh"
#include "cuda/conv2d_implicit_gemm.h"
#include "cuda/conv2d_winograd.cuh"
#include "cuda/launch.cuh"

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

// d_weight's products, ∂U[j] (m × n) = Z[j] (m × k) · V[j]ᵀ for j < batch: as cublas_gemm's.
auto cublas_gemm_nt() {
  const bool tf32 = conv_allows_tf32();
  return [tf32](int64_t m, int64_t n, int64_t k, int64_t batch, const float* z, const float* v, float* out) {
    gemm_batched<float>(m, n, k, Operand<float>{z, k, m * k, false}, Operand<float>{v, k, n * k, true}, 0.f, out, n,
                        m * n, batch, tf32);
  };
}

// d_weight's chunks on this GPU: four waves of 128 × 128 tiles.
wc::Chunks grad_weight_chunks(const Conv2dGeometry& g) {
  return wc::grad_weight_chunks(g, 4 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// The three buffers of one call, on x's device.
struct Buffers {
  at::Tensor u, v, m;
  Buffers(const Conv2dGeometry& g, const at::Tensor& x)
      : u(at::empty({wc::filter_size(g)}, x.options())),
        v(at::empty({wc::input_size(g)}, x.options())),
        m(at::empty({wc::output_size(g)}, x.options())) {}
};

// The layers Winograd may do, in float32 or with TF32 on (the buffers aside).
bool layer_fits(const Conv2dGeometry& g, const at::Tensor& x) {
  const int64_t fewest = conv_allows_tf32() ? kWinogradTf32MinChannels : kImplicitMinColumns;
  return x.scalar_type() == at::kFloat && wc::fits(g) && g.c >= fewest && g.f >= fewest;
}

bool within_limit(int64_t floats) {  // (and so within cuBLAS's ints)
  return floats * static_cast<int64_t>(sizeof(float)) <= kWinogradBufferLimit;
}

}  // namespace

bool winograd_chosen(const Conv2dGeometry& g, const at::Tensor& x) {
  const ConvRoute named = conv_route_named();
  if (named == ConvRoute::kImplicit || named == ConvRoute::kCublas) return false;  // (default or winograd: yes)
  // with TF32 allowed, only when asked for: a candidate, not yet run on a GPU
  if (conv_allows_tf32() && named != ConvRoute::kWinograd) return false;
  return layer_fits(g, x) && within_limit(wc::filter_size(g) + wc::input_size(g) + wc::output_size(g));
}

bool winograd_grad_weight_chosen(const Conv2dGeometry& g, const at::Tensor& x) {
  if (kernel_named("TORCH_CS231N_CUDA_CONV_DW", {"winograd", "gemm"}) != 0 || !layer_fits(g, x)) return false;
  const wc::Chunks chunks = grad_weight_chunks(g);
  return within_limit(wc::grad_weight_input_size(g, chunks) + wc::grad_weight_output_size(g, chunks) +
                      wc::grad_weight_partial_size(g, chunks));
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

void winograd_grad_weight(const at::Tensor& dy, const at::Tensor& x, at::Tensor& dw, const Conv2dGeometry& g,
                          cudaStream_t stream) {
  const wc::Chunks chunks = grad_weight_chunks(g);
  const at::Tensor v = at::empty({wc::grad_weight_input_size(g, chunks)}, x.options());
  const at::Tensor z = at::empty({wc::grad_weight_output_size(g, chunks)}, x.options());
  const at::Tensor partial = at::empty({wc::grad_weight_partial_size(g, chunks)}, x.options());
  wc::grad_weight(dy.const_data_ptr<float>(), x.const_data_ptr<float>(), dw.mutable_data_ptr<float>(), g, chunks,
                  v.mutable_data_ptr<float>(), z.mutable_data_ptr<float>(), partial.mutable_data_ptr<float>(),
                  cublas_gemm_nt(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace torch_cs231n
