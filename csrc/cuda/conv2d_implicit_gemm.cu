// The implicit-GEMM route of the convolution on CUDA (cuda/conv2d_implicit_gemm.h): the
// wrappers that allocate its tap tables and partial sums with torch's allocator, choose the arithmetic the
// way cuDNN would, and call the kernels of cuda/conv2d_implicit_gemm.cuh.
#include "cuda/conv2d_implicit_gemm.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "common/conv2d.h"
#include "cuda/blas.cuh"
#include "cuda/conv2d_implicit_gemm.cuh"
#include "cuda/conv2d_implicit_gemm_nhwc.cuh"
#include "cuda/launch.cuh"

namespace torch_cs231n {
namespace cuda {
namespace {

// f(T{}, Math{}) for the input's dtype and the arithmetic, as cuDNN would choose it: float32 in TF32 on the
// tensor cores when torch.backends.cudnn.allow_tf32 is on (and the GPU has them: sm_80 and later), in
// float32 FMAs otherwise; float16 and bfloat16 always on the tensor cores (implicit_gemm_chosen leaves
// them to the cuBLAS route below sm_80), as their values are exact in TF32 (10 and 7 mantissa bits, within
// TF32's 10 and 8 exponent bits): exact products and float32 sums, the precision of cuDNN's half
// convolutions.
bool has_tensor_cores() { return at::cuda::getCurrentDeviceProperties()->major >= 8; }

template <typename F>
void with_implicit_gemm_math(const at::Tensor& x, F&& f) {
  namespace ig = implicit_gemm;
  const auto dtype = x.scalar_type();
  if (dtype == at::kHalf) {
    f(at::Half{}, ig::MmaTf32{});
  } else if (dtype == at::kBFloat16) {
    f(at::BFloat16{}, ig::MmaTf32{});
  } else if (has_tensor_cores() && conv_allows_tf32()) {
    f(float{}, ig::MmaTf32{});
  } else {
    f(float{}, ig::SimtFma{});
  }
}

// Whether the products copy their float32 operands with cp.async, kAsyncStages deep (the async kernel of
// cuda/conv2d_implicit_gemm.cuh), rather than through registers one stage ahead (the default, proven on an
// H200): TORCH_CS231N_CUDA_CONV_LOADS=async, a candidate (it passed the tests on an H200 but was faster
// only for some layers: docs/conv2d.md); =registers, the default. cp.async needs sm_80; float16 and
// bfloat16 keep the registers (cp.async moves 4 bytes or more).
bool async_copies() {
  return kernel_named("TORCH_CS231N_CUDA_CONV_LOADS", {"async", "registers"}) == 0 && has_tensor_cores();
}

// Whether the float32 products gather from channels-last copies of x and dY, runs of 4 channels at a time
// (cuda/conv2d_implicit_gemm_nhwc.cuh): TORCH_CS231N_CUDA_CONV_LAYOUT=nhwc, a candidate that has not run on a
// GPU; =nchw, the default. Layers whose channels or filters per group are no multiple of 4 keep NCHW.
bool nhwc_chosen(const Conv2dGeometry& g) {
  return kernel_named("TORCH_CS231N_CUDA_CONV_LAYOUT", {"nhwc", "nchw"}) == 0 && implicit_gemm::nhwc_fits(g);
}

// The channels-last copy of t, a contiguous NCHW float32 tensor of `channels` channels, as Math takes it.
template <typename Math>
at::Tensor channels_last_copy(const at::Tensor& t, int64_t samples, int64_t channels, int64_t plane,
                              cudaStream_t stream) {
  at::Tensor copy = at::empty({t.numel()}, t.options());
  implicit_gemm::to_nhwc<Math>(t.const_data_ptr<float>(), copy.mutable_data_ptr<float>(), samples, channels, plane,
                               stream);
  return copy;
}

// A tap table of `count` entries (16 bytes each), on x's device.
at::Tensor tap_table(int64_t count, const at::Tensor& x) {
  static_assert(sizeof(implicit_gemm::Tap) == 4 * sizeof(int32_t), "a Tap is four 32-bit words");
  return at::empty({4 * std::max<int64_t>(count, 1)}, x.options().dtype(at::kInt));
}
implicit_gemm::Tap* taps_of(at::Tensor& table) {
  return reinterpret_cast<implicit_gemm::Tap*>(table.mutable_data_ptr<int32_t>());
}

template <typename T, typename Math>
void implicit_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, at::Tensor& y,
                      const Conv2dGeometry& g, cudaStream_t stream) {
  at::Tensor taps = tap_table(implicit_gemm::forward_taps(g), x);
  at::Tensor wt = at::empty({implicit_gemm::forward_weight_size(g)}, w.options());
  const T* b = bias.has_value() && bias->defined() ? bias->const_data_ptr<T>() : nullptr;
  if constexpr (std::is_same<T, float>::value) {
    if (nhwc_chosen(g)) {
      const at::Tensor x_nhwc = channels_last_copy<Math>(x, g.n, g.c, g.h * g.w, stream);
      implicit_gemm::forward_nhwc<Math>(x_nhwc.const_data_ptr<float>(), w.const_data_ptr<float>(), b,
                                        y.mutable_data_ptr<float>(), g, taps_of(taps), wt.mutable_data_ptr<float>(),
                                        stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  implicit_gemm::forward<T, Math>(x.const_data_ptr<T>(), w.const_data_ptr<T>(), b, y.mutable_data_ptr<T>(), g,
                                  taps_of(taps), wt.mutable_data_ptr<T>(), stream, async_copies());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The backward over channels-last copies: dY's (for both products) and x's (for d_weight).
template <typename Math>
void implicit_backward_nhwc(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, at::Tensor& dx,
                            at::Tensor& dw, const Conv2dGeometry& g, bool need_dx, bool need_dw, cudaStream_t stream) {
  namespace ig = implicit_gemm;
  if (!need_dx && !need_dw) return;  // (d_x by another route, d_W by Winograd: no copy to make)
  const at::Tensor dy_nhwc = channels_last_copy<Math>(dy, g.n, g.f, g.oh * g.ow, stream);
  if (need_dx) {
    at::Tensor taps = tap_table(ig::grad_input_taps(g), x);
    at::Tensor wt = at::empty({ig::grad_input_weight_size(g)}, w.options());
    ig::grad_input_nhwc<Math>(dy_nhwc.const_data_ptr<float>(), w.const_data_ptr<float>(), dx.mutable_data_ptr<float>(),
                              g, taps_of(taps), wt.mutable_data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (need_dw) {
    const at::Tensor x_nhwc = channels_last_copy<Math>(x, g.n, g.c, g.h * g.w, stream);
    const ig::WeightSplit split =
        ig::grad_weight_split(g, 2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    at::Tensor taps = tap_table(ig::grad_weight_taps(g), x);
    at::Tensor partials = at::empty({ig::grad_weight_partials(g, split)}, x.options().dtype(at::kFloat));
    ig::grad_weight_nhwc<Math>(dy_nhwc.const_data_ptr<float>(), x_nhwc.const_data_ptr<float>(),
                               dw.mutable_data_ptr<float>(), g, split, taps_of(taps),
                               partials.mutable_data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, typename Math>
void implicit_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, at::Tensor& dx, at::Tensor& dw,
                       const Conv2dGeometry& g, bool need_dx, bool need_dw, cudaStream_t stream) {
  namespace ig = implicit_gemm;
  if constexpr (std::is_same<T, float>::value) {
    if (nhwc_chosen(g)) {
      implicit_backward_nhwc<Math>(dy, x, w, dx, dw, g, need_dx, need_dw, stream);
      return;
    }
  }
  if (need_dx) {
    at::Tensor taps = tap_table(ig::grad_input_taps(g), x);
    at::Tensor wt = at::empty({ig::grad_input_weight_size(g)}, w.options());
    ig::grad_input<T, Math>(dy.const_data_ptr<T>(), w.const_data_ptr<T>(), dx.mutable_data_ptr<T>(), g, taps_of(taps),
                            wt.mutable_data_ptr<T>(), stream, async_copies());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (need_dw) {
    // about two blocks per multiprocessor, each with a chunk of the N*oH*oW sum; partial sums in float
    const ig::WeightSplit split =
        ig::grad_weight_split(g, 2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    at::Tensor taps = tap_table(ig::grad_weight_taps(g), x);
    at::Tensor partials = at::empty({ig::grad_weight_partials(g, split)}, x.options().dtype(at::kFloat));
    ig::grad_weight<T, Math>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), dw.mutable_data_ptr<T>(), g, split,
                             taps_of(taps), partials.mutable_data_ptr<float>(), stream, async_copies());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

ConvRoute conv_route_named() {
  switch (kernel_named("TORCH_CS231N_CUDA_CONV", {"implicit", "cublas", "winograd"})) {
    case 0:
      return ConvRoute::kImplicit;
    case 1:
      return ConvRoute::kCublas;
    case 2:
      return ConvRoute::kWinograd;
    default:
      return ConvRoute::kDefault;
  }
}

bool implicit_gemm_chosen(const Conv2dGeometry& g, const at::Tensor& x) {
  const ConvRoute named = conv_route_named();
  if (named == ConvRoute::kCublas || conv2d_is_depthwise(g) || !implicit_gemm::fits(g)) return false;
  const auto dtype = x.scalar_type();
  if (named == ConvRoute::kImplicit) {  // every layer it can do
    return dtype == at::kFloat || ((dtype == at::kHalf || dtype == at::kBFloat16) && has_tensor_cores());
  }
  // The default, as measured on the H200: float32 layers, but not 1x1 ones, where there is no column buffer
  // to save and cuBLAS was faster (forward+backward 0.79 ms against 0.95).
  return dtype == at::kFloat && !conv2d_is_pointwise(g);
}

void implicit_gemm_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                           at::Tensor& y, const Conv2dGeometry& g, cudaStream_t stream) {
  with_implicit_gemm_math(
      x, [&](auto t, auto math) { implicit_forward<decltype(t), decltype(math)>(x, w, bias, y, g, stream); });
}

void implicit_gemm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, at::Tensor& dx,
                            at::Tensor& dw, const Conv2dGeometry& g, bool need_dx, bool need_dw, cudaStream_t stream) {
  with_implicit_gemm_math(x, [&](auto t, auto math) {
    implicit_backward<decltype(t), decltype(math)>(dy, x, w, dx, dw, g, need_dx, need_dw, stream);
  });
}

}  // namespace cuda
}  // namespace torch_cs231n
