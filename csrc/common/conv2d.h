// Conv2d's index maps and argument checks, shared by the CPU loops (cpu/conv2d.cpp) and the CUDA kernels
// (cuda/conv2d.cu). The derivation is in docs/conv2d.md.
//
// Convolution here is cross-correlation, as in torch. Along one spatial axis, with stride s, padding p and
// dilation d, output position o and filter tap t read the input position
//
//     i = o*s - p + t*d                                        (forward index map)
//
// and the output size is  O = floor((I + 2p - d*(K-1) - 1) / s) + 1.
//
// Forward (im2col + GEMM), per sample n and group g:
//     col[(c,t_h,t_w), (o_h,o_w)] = x[n, c, i_h, i_w]   (0 where i falls in the padding)
//     y[n, f, :] = W[f, (c,t_h,t_w)] · col + b[f]
// Backward:
//     d_col = Wᵀ · dY[n]                                 then col2im: the transposed convolution
//     d_x[n, c, i_h, i_w] = Σ_{t_h,t_w} d_col[(c,t_h,t_w), (o_h,o_w)]   over the taps whose inverse map
//                                                        o = (i + p - t*d) / s is an integer in [0, O)
//     d_W = Σ_n dY[n] · colᵀ,   d_b[f] = Σ_{n,o_h,o_w} dY[n, f, o_h, o_w]
//
// col2im is written as a gather over the inverse map (each d_x element sums its own taps): no two threads
// write the same element, so the result is deterministic and needs no atomics. This is the answer to the
// note's question of how to lose the i and j loops: d_x is the convolution of dY with the flipped filter
// (the transposed convolution), i.e. a GEMM followed by the gather.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/conv2d_index.h"

namespace torch_cs231n {

// One element of d_x for one sample, gathered from the column gradient d_col [(c,t_h,t_w), (o_h,o_w)]:
//     d_x[c, i_h, i_w] = Σ_{t_h,t_w : inverse maps exist} d_col[(c,t_h,t_w), (o_h,o_w)]
// Row r of d_col starts at dcol + r * row_stride (o_h * o_w when the sample's d_col is dense).
template <typename T, typename Acc>
C10_HOST_DEVICE inline Acc col2im_value(const T* dcol, const Conv2dGeometry& g, int64_t c, int64_t i_h, int64_t i_w,
                                        int64_t row_stride) {
  Acc acc = Acc(0);
  for (int64_t th = 0; th < g.kh; ++th) {
    int64_t o_h;
    if (!conv_out_index(i_h, th, g.sh, g.ph, g.dh, g.oh, &o_h)) continue;
    for (int64_t tw = 0; tw < g.kw; ++tw) {
      int64_t o_w;
      if (!conv_out_index(i_w, tw, g.sw, g.pw, g.dw, g.ow, &o_w)) continue;
      const int64_t r = (c * g.kh + th) * g.kw + tw;
      acc += static_cast<Acc>(dcol[r * row_stride + o_h * g.ow + o_w]);
    }
  }
  return acc;
}

// Depthwise (groups == in_channels, `m` = out_channels / in_channels filters per input channel).
// Output element (f, o_h, o_w) of one sample reads only input plane c = f / m:
//     y[f, o_h, o_w] = b[f] + Σ_{t_h,t_w} W[f, 0, t_h, t_w] · x[f/m, i_h, i_w]
template <typename T, typename Acc>
C10_HOST_DEVICE inline Acc depthwise_value(const T* x_plane, const T* w_filter, const Conv2dGeometry& g, int64_t o_h,
                                           int64_t o_w) {
  Acc acc = Acc(0);
  for (int64_t th = 0; th < g.kh; ++th) {
    const int64_t i_h = conv_in_index(o_h, th, g.sh, g.ph, g.dh);
    if (i_h < 0 || i_h >= g.h) continue;
    for (int64_t tw = 0; tw < g.kw; ++tw) {
      const int64_t i_w = conv_in_index(o_w, tw, g.sw, g.pw, g.dw);
      if (i_w < 0 || i_w >= g.w) continue;
      acc += static_cast<Acc>(w_filter[th * g.kw + tw]) * static_cast<Acc>(x_plane[i_h * g.w + i_w]);
    }
  }
  return acc;
}

// Depthwise d_x, as a gather: input element (i_h, i_w) of plane c receives, from each of its filter's
// taps that reach it, W[f, t] · dY[f, o_h, o_w]  (the transposed convolution of one plane).
template <typename T, typename Acc>
C10_HOST_DEVICE inline Acc depthwise_grad_input_value(const T* dy_plane, const T* w_filter, const Conv2dGeometry& g,
                                                      int64_t i_h, int64_t i_w) {
  Acc acc = Acc(0);
  for (int64_t th = 0; th < g.kh; ++th) {
    int64_t o_h;
    if (!conv_out_index(i_h, th, g.sh, g.ph, g.dh, g.oh, &o_h)) continue;
    for (int64_t tw = 0; tw < g.kw; ++tw) {
      int64_t o_w;
      if (!conv_out_index(i_w, tw, g.sw, g.pw, g.dw, g.ow, &o_w)) continue;
      acc += static_cast<Acc>(w_filter[th * g.kw + tw]) * static_cast<Acc>(dy_plane[o_h * g.ow + o_w]);
    }
  }
  return acc;
}

}  // namespace torch_cs231n

// ------------------------------------------------------------------------- host-side argument checks
// One set of checks for both backends, so that the CPU and the CUDA kernels refuse the same inputs with
// the same words. Each message names the op, the argument, what was expected and what came.
namespace torch_cs231n {

inline void check_conv2d_params(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, const char* op) {
  TORCH_CHECK(stride.size() == 2, op, ": expected stride to have 2 values (sH, sW), but got stride=", stride);
  TORCH_CHECK(padding.size() == 2, op, ": expected padding to have 2 values (pH, pW), but got padding=", padding);
  TORCH_CHECK(dilation.size() == 2, op, ": expected dilation to have 2 values (dH, dW), but got dilation=", dilation);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": expected stride to be positive, but got stride=", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op,
              ": expected dilation to be positive, but got dilation=", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op,
              ": expected padding to be non-negative, but got padding=", padding);
  TORCH_CHECK(groups > 0, op, ": expected groups to be positive, but got groups=", groups);
}

// Checks input (N, C, H, W), weight (F, C/groups, kH, kW), bias (F) and the arguments, and returns the
// geometry of the convolution. The output has (N, F, oH, oW). The dtypes are the floating ones, and the
// integer ones too where `integer_dtypes` (the CPU forward: torch's CUDA convolution takes no integers).
inline Conv2dGeometry conv2d_geometry(const at::Tensor& input, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const char* op,
                                      bool integer_dtypes = false) {
  TORCH_CHECK(input.dim() == 4, op,
              ": expected input to be 4-D (N, C, H, W) (conv2d() also takes a 3-D "
              "unbatched (C, H, W) input), but got a ",
              input.dim(), "-D tensor of shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, op,
              ": expected weight to be 4-D (out_channels, in_channels/groups, kH, kW), "
              "but got a ",
              weight.dim(), "-D tensor of shape ", weight.sizes());
  if (integer_dtypes) {
    check_float_or_integer_dtype(input, op, "input");
  } else {
    check_float_dtype(input, op, "input");
  }
  check_same_device(input, "input", weight, "weight", op);
  check_same_dtype(input, "input", weight, "weight", op);
  check_conv2d_params(stride, padding, dilation, groups, op);
  const int64_t f = weight.size(0);
  TORCH_CHECK(f % groups == 0, op, ": expected weight.size(0) (out_channels) to be divisible by groups=", groups,
              ", but got weight of size ", weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(1) * groups, op, ": given groups=", groups, " and weight of size ",
              weight.sizes(), ", expected input to have weight.size(1) * groups = ", weight.size(1) * groups,
              " channels, but got input of size ", input.sizes(), " with ", input.size(1), " channels");
  TORCH_CHECK(weight.size(2) > 0 && weight.size(3) > 0, op,
              ": expected a kernel of at least 1 x 1, but got weight of size ", weight.sizes());
  if (bias.has_value() && bias->defined()) {
    check_same_device(input, "input", *bias, "bias", op);
    check_same_dtype(input, "input", *bias, "bias", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == f, op, ": given weight of size ", weight.sizes(),
                ", expected bias to be 1-D with ", f, " elements, but got bias of size ", bias->sizes());
  }
  Conv2dGeometry g{};
  g.n = input.size(0);
  g.c = input.size(1);
  g.h = input.size(2);
  g.w = input.size(3);
  g.f = f;
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.groups = groups;
  const int64_t pad_h = g.h + 2 * g.ph, pad_w = g.w + 2 * g.pw;
  const int64_t ker_h = g.dh * (g.kh - 1) + 1, ker_w = g.dw * (g.kw - 1) + 1;
  TORCH_CHECK(pad_h >= ker_h && pad_w >= ker_w, op, ": the padded input (", pad_h, " x ", pad_w, " from input ", g.h,
              " x ", g.w, " and padding ", padding, ") is smaller than the dilated kernel (", ker_h, " x ", ker_w,
              " from kernel ", g.kh, " x ", g.kw, " and dilation ", dilation,
              "); the kernel can't be larger than the padded input");
  g.oh = conv_out_size(g.h, g.kh, g.sh, g.ph, g.dh);
  g.ow = conv_out_size(g.w, g.kw, g.sw, g.pw, g.dw);
  return g;
}

// The backward's extra check: grad_output must have the forward output's shape, dtype and device.
inline void check_conv2d_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeometry& g,
                                     const char* op) {
  check_same_device(input, "input", grad_output, "grad_output", op);
  check_same_dtype(input, "input", grad_output, "grad_output", op);
  const std::vector<int64_t> expected{g.n, g.f, g.oh, g.ow};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), op,
              ": expected grad_output to have the output's shape ", at::IntArrayRef(expected), ", but got ",
              grad_output.sizes());
}

// torch's rule for the memory format of the output and of d_input and d_W: channels_last when the input
// or the weight suggests it (a channels_last tensor, not an ambiguous one), contiguous NCHW otherwise.
// On CUDA, float64 stays NCHW whatever the layouts: cuDNN has no NHWC double kernels, so torch's
// cudnn_conv_suggest_memory_format says contiguous for it (the depthwise kernels too).
inline at::MemoryFormat conv2d_memory_format(const at::Tensor& input, const at::Tensor& weight) {
  if (input.is_cuda() && (input.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble)) {
    return at::MemoryFormat::Contiguous;
  }
  const bool channels_last = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                             weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The backward's outputs, (d_x, d_W, d_b): allocated where output_mask asks for them, in `format`, and
// empty tensors of shape [0] where it does not (the schema returns three Tensors either way).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_grad_buffers(
    const at::Tensor& input, const at::Tensor& weight, const Conv2dGeometry& g, std::array<bool, 3> output_mask,
    at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  return {output_mask[0] ? at::empty({g.n, g.c, g.h, g.w}, input.options().memory_format(format))
                         : at::empty({0}, input.options()),
          output_mask[1] ? at::empty(weight.sizes(), weight.options().memory_format(format))
                         : at::empty({0}, weight.options()),
          output_mask[2] ? at::empty({g.f}, weight.options()) : at::empty({0}, weight.options())};
}

// Depthwise: every group has exactly one input channel. The direct kernels handle it.
inline bool conv2d_is_depthwise(const Conv2dGeometry& g) { return g.groups > 1 && g.groups == g.c; }

// 1x1, stride 1, no padding: the columns are the input itself, so im2col and col2im are skipped.
inline bool conv2d_is_pointwise(const Conv2dGeometry& g) {
  return g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
}

}  // namespace torch_cs231n
