// Conv2d on the CPU: the ops, and which kernels each layer takes. Every dense layer is a GEMM (our own,
// cpu/gemm.h), fed in the way that copies least for its shape; depthwise layers have direct kernels.
// docs/conv2d.md derives the formulas and has the table of routes. The kernels, by header:
//
//   conv2d_blocks.h     how the batch is cut among threads and into GEMMs
//   conv2d_im2col.h     im2col written straight into the GEMM's panels; col2im (a gather)
//   conv2d_shifted.h    shifted planes: each row of col(x) a run of the padded input (or of one phase of
//                       it, for strided layers), read in place by the GEMM; the phases of a strided d_x
//   conv2d_gemm.h       the NCHW forward and backward: d_W, d_col + col2im, d_x as the transposed conv
//   conv2d_pixels.h     pixels as GEMM rows: channels_last layers (taps as segments), NCHW layers with
//                       short rows or strides transposed in cache, small images as the pixel rows of all
//                       samples, d_x of strided layers by phases
//   conv2d_pointwise.h  1 x 1 channels_last layers: products over the whole batch's pixels
//   conv2d_windows.h    layers of few channels (a stem): a window's rows of taps as runs read in place
//   conv2d_bf16.h       bfloat16 on AVX512-BF16 (vdpbf16ps), in the same forms
//   conv2d_amx.h        bfloat16 on AMX tiles where the CPU has them: the forward, d_x and d_W
//   conv2d_depthwise.h  plane kernels for large planes, channels innermost for small ones
//   conv2d_grouped.h    groups of 2 to 16 channels (ResNeXt's): whole groups side by side in a vector's
//                       lanes, each input channel of them one broadcast
//   conv2d_grouped_bf16.h  the same in bfloat16 by pairs of channels (vdpbf16ps), channels_last
//   conv2d_winograd.h   3 x 3 layers of stride 1 by Winograd's F(2x2, 3x3): 16 GEMMs between transforms
//   conv2d_dots.h       few output pixels: the forward by dot products of W's rows, read in place; d_x by
//                       the product with W's rows in place as B, then col2im
//   conv2d_integer.h    integer dtypes (forward only): im2col of pixel chunks and a product, sums wrapping
//                       around as torch's
//   layout_copy.h       channels_last <-> NCHW copies, for the layers that run NCHW kernels on copies
//
// The index maps (which input pixel an output position and a filter tap read, and back) are those of
// common/conv2d.h, shared with the CUDA kernels.
//
// Work split. The batch is cut into one chunk per thread; each thread runs single-threaded GEMMs on its
// own samples. With one chunk (N = 1, tiny layers, small images), each GEMM splits its rows or columns
// among the threads instead. Buffers are per thread and bounded: they do not grow with N.
//
// Memory format: torch's rule (conv2d_memory_format): channels_last results when the input or the weight
// is channels_last, contiguous NCHW otherwise.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/conv2d.h"
#include "common/grads.h"
#include "cpu/conv2d_amx.h"
#include "cpu/conv2d_bf16.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/conv2d_depthwise.h"
#include "cpu/conv2d_dots.h"
#include "cpu/conv2d_gemm.h"
#include "cpu/conv2d_grouped.h"
#include "cpu/conv2d_grouped_bf16.h"
#include "cpu/conv2d_im2col.h"
#include "cpu/conv2d_integer.h"
#include "cpu/conv2d_pixels.h"
#include "cpu/conv2d_pointwise.h"
#include "cpu/conv2d_shifted.h"
#include "cpu/conv2d_windows.h"
#include "cpu/conv2d_winograd.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"
#include "cpu/layout_copy.h"
#include "cpu/reduced_float.h"

namespace torch_cs231n {
namespace {

using namespace conv2d_cpu;  // the kernels of the cpu/conv2d_*.h headers

// ---------------------------------------------------------------------------------------------- routing
// An NCHW layer of many channels whose shifted planes would throw away a tenth or more of the GEMM (short
// rows: 14 of 16 columns), or that is strided, runs the NHWC kernel instead, transposing each sample in
// and out while it is in cache: its kernel packs nothing, computes only the real outputs and runs at
// nearly the FMA peak (docs/conv2d.md), where the shifted phases' GEMM is one of 14 x 15 columns.
bool nchw_through_pixels(const Conv2dGeometry& g) {
  if (!channels_last_direct(g) || g.c_per_group() < 16) return false;
  return g.sh > 1 || g.sw > 1 || 10 * g.col_cols() < 9 * shifted_planes(g).cols;
}

// The NCHW choices of a dense layer: y = conv(x, W) + b, with W the filters of w, or when `transposed`
// those of its transposed convolution (d_x; g is then that convolution). The pixel kernels read them
// through w's strides (filter_segments); the GEMM of shifted planes or im2col wants them as a tensor.
template <typename T>
void forward_nchw_dense(const T* x, const at::Tensor& w, bool transposed, const T* b, T* y, const Conv2dGeometry& g,
                        const Conv2dGeometry& layer) {
  if constexpr (std::is_same_v<T, float>) {
    if (winograd_forward_applies(g)) return winograd_forward(x, w, transposed, b, y, g, /*planes=*/true);
  }
  if (use_pixel_rows(g)) {
    conv_forward_pixel_rows<T>(x, w, transposed, b, y, g);
  } else if (nchw_through_pixels(g)) {
    conv_forward_nhwc<T>(x, w, transposed, b, y, g, /*planes=*/true);
  } else {
    const at::Tensor filters = transposed ? transposed_filters(w, layer) : w.contiguous();
    conv_forward_gemm<T>(x, filters.const_data_ptr<T>(), b, y, g);
  }
}

// The NCHW kernels, on contiguous tensors.
template <typename T>
void forward_nchw(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, at::Tensor& y,
                  const Conv2dGeometry& g) {
  if (grouped_by_broadcasts(g, sizeof(T))) {  // few channels a group (conv2d_grouped.h)
    grouped_forward<T>(x.const_data_ptr<T>(), w, b ? b->const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(), g,
                       /*planes=*/true);
  } else if (depthwise_by_pixels(g)) {
    depthwise_forward_pixels<T>(x.const_data_ptr<T>(), w.const_data_ptr<T>(), b ? b->const_data_ptr<T>() : nullptr,
                                y.mutable_data_ptr<T>(), g);
  } else if (conv2d_is_depthwise(g)) {
    depthwise_forward<T>(x, w, b, y, g);
  } else if (nchw_by_windows<T>(g)) {
    conv_forward_row_segments<T>(x.const_data_ptr<T>(), w, b ? b->const_data_ptr<T>() : nullptr,
                                 y.mutable_data_ptr<T>(), g, /*planes=*/true);
  } else {
    forward_nchw_dense<T>(x.const_data_ptr<T>(), w, /*transposed=*/false, b ? b->const_data_ptr<T>() : nullptr,
                          y.mutable_data_ptr<T>(), g, g);
  }
}

template <typename T>
void backward_nchw(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, at::Tensor& dx, at::Tensor& dw,
                   at::Tensor& db, const Conv2dGeometry& g, bool need_dx, bool need_dw, bool need_db) {
  if (depthwise_by_pixels(g)) {  // d_b too, in its own pass over dY
    depthwise_backward_pixels<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                 need_dx ? dx.mutable_data_ptr<T>() : nullptr,
                                 need_dw ? dw.mutable_data_ptr<T>() : nullptr,
                                 need_db ? db.mutable_data_ptr<T>() : nullptr, g);
    return;
  }
  if (conv2d_is_depthwise(g)) {
    // d_x of a stride-1 layer with one filter per channel is the depthwise convolution of dY with the
    // flipped filters (as for the dense layers): the forward's kernel, measured 7.7 against 11.8 ms for
    // the gather at (32, 128, 56, 56). d_W and d_b (in the same pass over dY) by the backward kernel.
    Conv2dGeometry t;
    const bool dx_by_conv = need_dx && g.f == g.c && transposed_geometry(g, &t);
    if (dx_by_conv) depthwise_forward<T>(dy, transposed_filters(w, g), c10::nullopt, dx, t);
    if (need_dw || need_db || (need_dx && !dx_by_conv)) {
      depthwise_backward<T>(dy, x, w, dx, dw, db, g, need_dx && !dx_by_conv, need_dw, need_db);
    }
    return;
  }
  // Groups of few channels (conv2d_grouped.h), NCHW planes transposed a vector's at a time: d_W, and d_x as
  // the transposed convolution (stride 1) or by the stride's phases.
  if (grouped_by_broadcasts(g, sizeof(T))) {
    Conv2dGeometry u;
    if (need_dx && transposed_geometry(g, &u)) {
      grouped_forward<T>(dy.const_data_ptr<T>(), transposed_filters(w, g), nullptr, dx.mutable_data_ptr<T>(), u,
                         /*planes=*/true);
    } else if (need_dx) {
      grouped_input_grad_phases<T>(dy.const_data_ptr<T>(), w, dx.mutable_data_ptr<T>(), g, /*planes=*/true);
    }
    if (need_dw) grouped_weight_grad<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), dw, g, /*planes=*/true);
    need_dx = need_dw = false;
  }
  if (need_db) db.copy_(dy.sum({0, 2, 3}));  // d_b[f] = Σ_{n, o_h, o_w} dY[n, f, o_h, o_w]
  if constexpr (std::is_same_v<T, float>) {  // 3 x 3, stride 1: d_W by Winograd's 2 x 2 blocks
    if (need_dw && winograd_weight_grad_applies(g)) {
      winograd_weight_grad(dy.const_data_ptr<float>(), x.const_data_ptr<float>(), dw, g, /*planes=*/true);
      need_dw = false;
    }
  }
  // d_x: stride 1 as the convolution of dY with the transposed filters, when its out channels (our in
  // channels) fill the micro-kernel's rows; otherwise d_col and col2im.
  // Strided (dilation 1), when the layer goes by pixels: that of each of the stride's phases.
  Conv2dGeometry t;
  const bool dx_by_conv = need_dx && g.c_per_group() >= 16 && transposed_geometry(g, &t);
  const bool dx_by_phases = need_dx && !dx_by_conv && (nchw_through_pixels(g) || use_pixel_rows(g)) &&
                            (g.sh > 1 || g.sw > 1) && g.dh == 1 && g.dw == 1;
  const bool dx_by_col2im = need_dx && !dx_by_conv && !dx_by_phases;
  // d_W: by pixel rows or shifted planes where the forward uses them, otherwise from im2col panels; a
  // stem's (few channels) on AVX-512 by its windows' rows of taps read in place (conv2d_windows.h).
  const bool dw_by_rows = need_dw && use_pixel_rows(g);
  const bool dw_by_pixels = need_dw && !dw_by_rows && nchw_through_pixels(g);
  const bool dw_by_windows = need_dw && !dw_by_rows && !dw_by_pixels && std::is_same_v<T, float> &&
                             cpu::gather_a_available() && few_channels_by_windows(g);
  const bool dw_by_shift = need_dw && !dw_by_rows && !dw_by_pixels && !dw_by_windows && use_shifted_planes(g);
  T* dxp = dx_by_col2im ? dx.mutable_data_ptr<T>() : nullptr;
  T* dwp =
      need_dw && !dw_by_shift && !dw_by_rows && !dw_by_pixels && !dw_by_windows ? dw.mutable_data_ptr<T>() : nullptr;
  if (dw_by_rows) {
    conv_weight_grad_pixel_rows<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), dw.mutable_data_ptr<T>(), g);
  }
  if (dw_by_pixels) {
    conv_weight_grad_nhwc<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), dw.mutable_data_ptr<T>(), g,
                             /*planes=*/true);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (dw_by_windows) {
      conv_weight_grad_row_segments(dy.const_data_ptr<float>(), x.const_data_ptr<float>(), dw.mutable_data_ptr<float>(),
                                    g, /*planes=*/true);
    }
  }
  if (dxp || dwp) {
    conv_backward_gemm<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<T>(), dxp, dwp, g,
                          dx_by_col2im);
  }
  if (dw_by_shift) {
    conv_weight_grad_shifted<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), dw.mutable_data_ptr<T>(), g);
  }
  if (dx_by_conv) {
    forward_nchw_dense<T>(dy.const_data_ptr<T>(), w, /*transposed=*/true, nullptr, dx.mutable_data_ptr<T>(), t, g);
  }
  if (dx_by_phases) {
    conv_input_grad_phases<T>(dy.const_data_ptr<T>(), w, dx.mutable_data_ptr<T>(), g, /*planes=*/true);
  }
}

// The bfloat16 route (conv2d_bf16.h; conv2d_amx.h where the CPU has AMX) into y, which has the results'
// memory format.
void bf16_forward(const at::Tensor& input, const Bf16Filters& weight, const c10::optional<at::Tensor>& bias,
                  at::Tensor& y, const Conv2dGeometry& g, at::MemoryFormat format) {
  if (y.numel() == 0) return;
  const at::Tensor x = input.contiguous(format);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const auto forward = amx_forward(g) ? conv_forward_bf16_amx : conv_forward_bf16;
  forward(x.const_data_ptr<c10::BFloat16>(), weight, b.defined() ? b.const_data_ptr<float>() : nullptr,
          y.mutable_data_ptr<c10::BFloat16>(), g, format != at::MemoryFormat::ChannelsLast);
}

// ---------------------------------------------------------------------------------------------- the ops
at::Tensor conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  const Conv2dGeometry g = conv2d_geometry(input, weight, bias, stride, padding, dilation, groups, "conv2d_forward",
                                           /*integer_dtypes=*/true);
  const at::MemoryFormat format = conv2d_memory_format(input, weight);
  if (is_supported_integer(input)) {  // sums wrapping around in the dtype, as torch's (conv2d_integer.h)
    const at::Tensor x = input.contiguous(), w = weight.contiguous();
    const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    at::Tensor y_nchw = at::empty({g.n, g.f, g.oh, g.ow}, input.options());
    if (y_nchw.numel() > 0) {
      AT_DISPATCH_INTEGRAL_TYPES(x.scalar_type(), "conv2d_forward_cpu", [&] {
        conv_forward_integer<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                       b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                       y_nchw.mutable_data_ptr<scalar_t>(), g);
      });
    }
    return y_nchw.contiguous(format);
  }
#if CS231N_X86
  if (input.scalar_type() == at::kBFloat16 && format == at::MemoryFormat::ChannelsLast && grouped_bf16_applies(g)) {
    // few channels a group: the lanes by pairs of channels (conv2d_grouped_bf16.h)
    at::Tensor y = at::empty({g.n, g.f, g.oh, g.ow}, input.options().memory_format(format));
    const at::Tensor x = input.contiguous(format);
    const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    grouped_forward_bf16(x.const_data_ptr<c10::BFloat16>(), weight, b.defined() ? b.const_data_ptr<float>() : nullptr,
                         y.mutable_data_ptr<c10::BFloat16>(), g);
    return y;
  }
#endif
  if (input.scalar_type() == at::kBFloat16 && bf16_direct(g)) {
    at::Tensor y = at::empty({g.n, g.f, g.oh, g.ow}, input.options().memory_format(format));
    bf16_forward(input, Bf16Filters::of(weight), bias, y, g, format);
    return y;
  }
  if (input.scalar_type() == at::kBFloat16 && format == at::MemoryFormat::ChannelsLast &&
      depthwise_forward_in_place(g)) {
    // depthwise: x read and y written in bfloat16, the float32 kernel's sums (conv2d_depthwise.h: Bf16Pairs)
    at::Tensor y = at::empty({g.n, g.f, g.oh, g.ow}, input.options().memory_format(format));
    if (y.numel() == 0) return y;
    const at::Tensor x = input.contiguous(format), w = weight.to(at::kFloat).contiguous();
    const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    depthwise_forward_nhwc(x.const_data_ptr<c10::BFloat16>(), w.const_data_ptr<float>(),
                           b.defined() ? b.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<c10::BFloat16>(), g);
    return y;
  }
  if (cpu::is_reduced_float(input)) {  // float16/bfloat16: the float32 kernels, rounded once (reduced_float.h)
    const at::Tensor y = conv2d_forward_cpu(cpu::to_float(input), cpu::to_float(weight), cpu::to_float(bias), stride,
                                            padding, dilation, groups);
    return cpu::round_to(y, input.scalar_type());
  }
  at::Tensor y = at::empty({g.n, g.f, g.oh, g.ow}, input.options().memory_format(format));
  if (y.numel() == 0) return y;
  c10::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  if (use_dots(g, weight)) {  // few output pixels: W's rows read in place, x and y through their strides
    conv_forward_dots(input, weight, b ? b->const_data_ptr<float>() : nullptr, y, g);
    return y;
  }
  const bool cl = format == at::MemoryFormat::ChannelsLast;
  if (cl && pointwise_nhwc(g)) {  // one product over the batch's pixels
    const at::Tensor x = input.contiguous(format);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_cpu", [&] {
      pointwise_forward_nhwc<scalar_t>(x.const_data_ptr<scalar_t>(), weight, /*transposed=*/false,
                                       b ? b->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), g);
    });
    return y;
  }
  if (cl && few_channels_by_windows(g)) {  // a stem: the windows' rows of taps as segments
    const at::Tensor x = input.contiguous(format);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_cpu", [&] {
      conv_forward_row_segments<scalar_t>(x.const_data_ptr<scalar_t>(), weight,
                                          b ? b->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(),
                                          g);
    });
    return y;
  }
  if (cl && grouped_by_broadcasts(g, input.element_size())) {  // few channels a group: whole groups in lanes
    const at::Tensor x = input.contiguous(format);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_cpu", [&] {
      grouped_forward<scalar_t>(x.const_data_ptr<scalar_t>(), weight, b ? b->const_data_ptr<scalar_t>() : nullptr,
                                y.mutable_data_ptr<scalar_t>(), g);
    });
    return y;
  }
  if (cl && input.scalar_type() == at::kFloat && winograd_forward_applies(g)) {  // 3 x 3, stride 1: by 2 x 2 blocks
    const at::Tensor x = input.contiguous(format);
    winograd_forward(x.const_data_ptr<float>(), weight, /*transposed=*/false, b ? b->const_data_ptr<float>() : nullptr,
                     y.mutable_data_ptr<float>(), g, /*planes=*/false);
    return y;
  }
  if (cl && (channels_last_direct(g) || use_pixel_rows(g) || depthwise_channels_last_direct(g))) {
    const at::Tensor x = input.contiguous(format);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_cpu", [&] {
      const scalar_t* bp = b ? b->const_data_ptr<scalar_t>() : nullptr;
      if (depthwise_channels_last_direct(g)) {  // channels innermost as they lie
        depthwise_forward_pixels<scalar_t>(x.const_data_ptr<scalar_t>(), weight.contiguous().const_data_ptr<scalar_t>(),
                                           bp, y.mutable_data_ptr<scalar_t>(), g, /*planes=*/false);
      } else if (channels_last_direct(g)) {  // the filters read through the weight's strides, whatever its layout
        conv_forward_nhwc<scalar_t>(x.const_data_ptr<scalar_t>(), weight, /*transposed=*/false, bp,
                                    y.mutable_data_ptr<scalar_t>(), g);
      } else {  // small images, as pixel rows of NHWC
        conv_forward_pixel_rows<scalar_t>(x.const_data_ptr<scalar_t>(), weight, /*transposed=*/false, bp,
                                          y.mutable_data_ptr<scalar_t>(), g, /*planes=*/false);
      }
    });
    return y;
  }
  // NCHW kernels, on NCHW copies when the tensors are channels_last (cpu/layout_copy.h)
  const at::Tensor x = cpu::contiguous_nchw(input), w = weight.contiguous();
  at::Tensor y_nchw = format == at::MemoryFormat::Contiguous ? y : at::empty(y.sizes(), y.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_cpu",
                             [&] { forward_nchw<scalar_t>(x, w, b, y_nchw, g); });
  if (!y.is_same(y_nchw)) cpu::copy_nchw_into(y, y_nchw);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_buffers(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  constexpr const char* op = "conv2d_backward";
  const Conv2dGeometry g = conv2d_geometry(input, weight, c10::nullopt, stride, padding, dilation, groups, op);
  check_conv2d_grad_output(grad_output, input, g, op);
  if (cpu::is_reduced_float(input)) {
    // bfloat16 on the bfloat16 route (conv2d_bf16.h): d_x as the transposed convolution (of the stride's
    // phases when strided) and d_W, for layers of 32 channels or more; d_b and anything else in float32.
    Conv2dGeometry t;
    const bool bf16 = input.scalar_type() == at::kBFloat16 && bf16_direct(g);
    const bool dx_stride1 = output_mask[0] && bf16 && transposed_geometry(g, &t) && bf16_input_grad_direct(g);
    const bool dx_phases = output_mask[0] && bf16 && !dx_stride1 && bf16_input_grad_direct(g) && g.dh == 1 &&
                           g.dw == 1 && (g.sh > 1 || g.sw > 1);
    const bool dx_bf16 = dx_stride1 || dx_phases;
    const bool dw_bf16 = output_mask[1] && bf16 && bf16_weight_grad_direct(g);
#if CS231N_X86
    // few channels a group, channels_last: d_x by the lanes by pairs of channels (conv2d_grouped_bf16.h)
    const bool dx_grouped = output_mask[0] && input.scalar_type() == at::kBFloat16 &&
                            conv2d_memory_format(input, weight) == at::MemoryFormat::ChannelsLast &&
                            grouped_bf16_applies(g);
#else
    const bool dx_grouped = false;
#endif
    // depthwise, channels_last: read and written in bfloat16, the float32 kernels' sums (conv2d_depthwise.h:
    // Bf16Pairs); d_x of a stride-1 layer as the forward with the flipped filters, a strided one's a gather
    const bool depthwise = input.scalar_type() == at::kBFloat16 &&
                           conv2d_memory_format(input, weight) == at::MemoryFormat::ChannelsLast &&
                           depthwise_forward_in_place(g);
    const bool dx_depthwise = output_mask[0] && depthwise;
    std::array<bool, 3> mask_f32 = output_mask;
    if (dx_bf16 || dx_grouped || dx_depthwise) mask_f32[0] = false;
    if (dw_bf16 || depthwise) mask_f32[1] = false;
    if (depthwise) mask_f32[2] = false;
    // The rest in float32, rounded once (reduced_float.h).
    const auto dtype = input.scalar_type();
    at::Tensor dx, dw, db;
    if (mask_f32[0] || mask_f32[1] || mask_f32[2]) {
      std::tie(dx, dw, db) =
          conv2d_backward_buffers(cpu::to_float(grad_output), cpu::to_float(input), cpu::to_float(weight), stride,
                                  padding, dilation, groups, mask_f32);
    } else {
      std::tie(dx, dw, db) = conv2d_grad_buffers(input, weight, g, mask_f32, conv2d_memory_format(input, weight));
    }
    const at::MemoryFormat format = conv2d_memory_format(input, weight);
    if (dx_stride1) {
      dx = at::empty(input.sizes(), input.options().memory_format(format));
      bf16_forward(grad_output, Bf16Filters::transposed_of(weight), c10::nullopt, dx, t, format);
    }
    if (dx_phases) {
      dx = at::empty(input.sizes(), input.options().memory_format(format));
      const auto input_grad = cpu::cpu_amx() ? conv_input_grad_bf16_phases_amx : conv_input_grad_bf16_phases;
      input_grad(grad_output.contiguous(format), weight, dx, g, format != at::MemoryFormat::ChannelsLast);
    }
#if CS231N_X86
    if (dx_grouped) {
      dx = at::empty(input.sizes(), input.options().memory_format(format));
      const at::Tensor dy = grad_output.contiguous(format);
      if (transposed_geometry(g, &t)) {
        grouped_forward_bf16(dy.const_data_ptr<c10::BFloat16>(), transposed_filters(weight, g), nullptr,
                             dx.mutable_data_ptr<c10::BFloat16>(), t);
      } else {
        grouped_input_grad_phases_bf16(dy.const_data_ptr<c10::BFloat16>(), weight, dx.mutable_data_ptr<c10::BFloat16>(),
                                       g);
      }
    }
#endif
    if (dx_depthwise) {
      dx = at::empty(input.sizes(), input.options().memory_format(format));
      const at::Tensor dy = grad_output.contiguous(format), w = weight.to(at::kFloat).contiguous();
      const auto* dyp = dy.const_data_ptr<c10::BFloat16>();
      if (Conv2dGeometry u; transposed_geometry(g, &u)) {
        depthwise_forward_nhwc(dyp, transposed_filters(w, g).const_data_ptr<float>(),
                               static_cast<const float*>(nullptr), dx.mutable_data_ptr<c10::BFloat16>(), u);
      } else {
        depthwise_input_grad_nhwc(dyp, w.const_data_ptr<float>(), dx.mutable_data_ptr<c10::BFloat16>(), g);
      }
    }
    if (depthwise && (output_mask[1] || output_mask[2])) {
      const at::Tensor x = input.contiguous(format), dy = grad_output.contiguous(format);
      const at::TensorOptions f32 = weight.options().dtype(at::kFloat);
      if (output_mask[1]) dw = at::empty(weight.sizes(), f32.memory_format(format));  // (rounded below)
      if (output_mask[2]) db = at::empty({g.f}, f32);
      depthwise_backward_by_samples<c10::BFloat16, float>(
          dy.const_data_ptr<c10::BFloat16>(), x.const_data_ptr<c10::BFloat16>(), nullptr, nullptr,
          output_mask[1] ? dw.mutable_data_ptr<float>() : nullptr,
          output_mask[2] ? db.mutable_data_ptr<float>() : nullptr, g, /*planes=*/false);
    }
    if (dw_bf16) {
      const bool planes = format != at::MemoryFormat::ChannelsLast;
      const at::Tensor x = input.contiguous(format), dy = grad_output.contiguous(format);
      // [F][taps][C] is W's shape in channels_last memory; NCHW's order by our transposes (torch's
      // permuting copy was single-threaded); rounded once, keeping the layout.
      const auto weight_grad = amx_weight_grad(g) ? conv_weight_grad_bf16_amx : conv_weight_grad_bf16;
      const at::Tensor dw32 =
          weight_grad(dy.const_data_ptr<c10::BFloat16>(), x.const_data_ptr<c10::BFloat16>(), g, planes);
      at::Tensor dw_ordered = dw32.view({g.f, g.kh, g.kw, g.c}).permute({0, 3, 1, 2});
      if (planes) {
        dw_ordered = at::empty(weight.sizes(), dw32.options());
        taps_major_to_nchw(dw32.const_data_ptr<float>(), dw_ordered.mutable_data_ptr<float>(), g);
      }
      dw = dw_ordered.to(dtype);
    }
    return {dx_bf16 || dx_grouped || dx_depthwise ? dx : cpu::round_to(dx, dtype),
            dw_bf16 ? dw : cpu::round_to(dw, dtype), cpu::round_to(db, dtype)};
  }
  bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];  // cleared once computed
  const at::MemoryFormat format = conv2d_memory_format(input, weight);
  auto [dx, dw, db] = conv2d_grad_buffers(input, weight, g, output_mask, format);
  if (g.n == 0 || g.f == 0 || g.c == 0) {  // nothing flows: every gradient is zero
    dx.zero_();
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  if (!need_dx && !need_dw && !need_db) return {dx, dw, db};
  if (need_dx && use_input_grad_dots(g, weight)) {  // few output pixels: W's rows read in place, then col2im
    conv_input_grad_dots(grad_output, weight, dx, g);
    if (!need_dw && !need_db) return {dx, dw, db};
    need_dx = false;
  }
  // channels_last in NHWC kernels, and small images as pixel rows of NHWC. d_x: the transposed convolution
  // (stride 1; a small image's has its input's size, so it goes by pixel rows too), or for strided layers
  // that of each of the stride's phases (conv_input_grad_phases).
  // Both need 16 input channels a group: with 3 (a stem, the CS231n layer) d_W's runs are 3 long and d_x's
  // 3 output channels fill none of a vector; the NCHW kernels on NCHW copies were 3-8x faster there.
  Conv2dGeometry t;
  const bool nhwc = channels_last_direct(g) && g.c_per_group() >= 16;
  const bool rows = use_pixel_rows(g) && !channels_last_direct(g);
  const bool dx_transposed = need_dx && transposed_geometry(g, &t) && (!rows || use_pixel_rows(t));
  const bool dx_phases = need_dx && !dx_transposed && g.dh == 1 && g.dw == 1 && (g.sh > 1 || g.sw > 1);
  if (format == at::MemoryFormat::ChannelsLast && pointwise_nhwc(g)) {  // as the forward: whole-batch products
    const at::Tensor dy = grad_output.contiguous(format), x = input.contiguous(format);
    if (need_db) db.copy_(dy.sum({0, 2, 3}));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_backward_cpu", [&] {
      const scalar_t *dyp = dy.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
      if (need_dw) pointwise_weight_grad_nhwc<scalar_t>(dyp, xp, dw.mutable_data_ptr<scalar_t>(), g);
      Conv2dGeometry u;  // d_X = dY · W: the transposed convolution, 1 x 1 and of stride 1 as well
      if (need_dx && transposed_geometry(g, &u)) {
        pointwise_forward_nhwc<scalar_t>(dyp, weight, /*transposed=*/true, nullptr, dx.mutable_data_ptr<scalar_t>(), u);
      }
    });
    return {dx, dw, db};
  }
  if (format == at::MemoryFormat::ChannelsLast && few_channels_by_windows(g) && need_dw) {
    // d_W (and d_b) of a stem: on AVX-512 by the windows' rows of taps read in place, as the forward,
    // elsewhere by window rows; d_x, if asked for, by the NCHW kernels below
    const at::Tensor dy = grad_output.contiguous(format), x = input.contiguous(format);
    if (need_db) db.copy_(dy.sum({0, 2, 3}));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_backward_cpu", [&] {
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (cpu::gather_a_available()) {
          conv_weight_grad_row_segments(dy.const_data_ptr<float>(), x.const_data_ptr<float>(),
                                        dw.mutable_data_ptr<float>(), g);
          return;
        }
      }
      conv_weight_grad_windows<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                         dw.mutable_data_ptr<scalar_t>(), g);
    });
    if (!need_dx) return {dx, dw, db};
    need_dw = need_db = false;
  }
  if (format == at::MemoryFormat::ChannelsLast && grouped_by_broadcasts(g, input.element_size())) {  // as the forward
    // d_W; d_x of a stride-1 layer as the forward of the transposed convolution (grouped alike), of a
    // strided one by the stride's phases
    const at::Tensor dy = grad_output.contiguous(format), x = input.contiguous(format);
    Conv2dGeometry u;
    const bool dx_transposed = need_dx && transposed_geometry(g, &u);
    if (need_db) db.copy_(dy.sum({0, 2, 3}));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_backward_cpu", [&] {
      const scalar_t *dyp = dy.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
      if (need_dw) grouped_weight_grad<scalar_t>(dyp, xp, dw, g);
      if (dx_transposed) {
        grouped_forward<scalar_t>(dyp, transposed_filters(weight, g), nullptr, dx.mutable_data_ptr<scalar_t>(), u);
      } else if (need_dx) {
        grouped_input_grad_phases<scalar_t>(dyp, weight, dx.mutable_data_ptr<scalar_t>(), g);
      }
    });
    return {dx, dw, db};
  }
  if (format == at::MemoryFormat::ChannelsLast && depthwise_channels_last_direct(g)) {  // as the forward
    // d_x of a stride-1 layer as the forward on dY with the flipped filters (a gather: the scatter's
    // updates of one d_x pixel by neighbouring outputs queued behind each other, 4x slower than oneDNN).
    const at::Tensor dy = grad_output.contiguous(format), x = input.contiguous(format), w = weight.contiguous();
    Conv2dGeometry u;
    const bool dx_by_conv = need_dx && transposed_geometry(g, &u);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_backward_cpu", [&] {
      if (dx_by_conv) {
        depthwise_forward_pixels<scalar_t>(dy.const_data_ptr<scalar_t>(),
                                           transposed_filters(w, g).const_data_ptr<scalar_t>(), nullptr,
                                           dx.mutable_data_ptr<scalar_t>(), u, /*planes=*/false);
      }
      if (need_dx && !dx_by_conv) {  // strided: a gather of the taps that reach each input pixel
        depthwise_input_grad_nhwc<scalar_t>(dy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                            dx.mutable_data_ptr<scalar_t>(), g);
      }
      if (need_dw || need_db) {
        depthwise_backward_pixels<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                            w.const_data_ptr<scalar_t>(), nullptr,
                                            need_dw ? dw.mutable_data_ptr<scalar_t>() : nullptr,
                                            need_db ? db.mutable_data_ptr<scalar_t>() : nullptr, g, /*planes=*/false);
      }
    });
    return {dx, dw, db};
  }
  if (format == at::MemoryFormat::ChannelsLast && (nhwc || rows) && (!need_dx || dx_transposed || dx_phases)) {
    const at::Tensor dy = grad_output.contiguous(format), x = input.contiguous(format);
    if (need_db) db.copy_(dy.sum({0, 2, 3}));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_backward_cpu", [&] {
      const scalar_t *dyp = dy.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
      if (need_dw && std::is_same_v<scalar_t, float> && winograd_weight_grad_applies(g)) {
        winograd_weight_grad(reinterpret_cast<const float*>(dyp), reinterpret_cast<const float*>(xp), dw, g,
                             /*planes=*/false);
      } else if (need_dw && rows) {
        conv_weight_grad_pixel_rows<scalar_t>(dyp, xp, dw.mutable_data_ptr<scalar_t>(), g, /*planes=*/false);
      } else if (need_dw) {
        conv_weight_grad_nhwc<scalar_t>(dyp, xp, dw.mutable_data_ptr<scalar_t>(), g);
      }
      // d_x = the transposed convolution t of w's filters on dY, in NHWC: by pixel rows for small images;
      // the filters read through w's strides (filter_segments)
      if (dx_transposed && std::is_same_v<scalar_t, float> && winograd_forward_applies(t)) {  // as the forward
        winograd_forward(reinterpret_cast<const float*>(dyp), weight, /*transposed=*/true, nullptr,
                         reinterpret_cast<float*>(dx.mutable_data_ptr<scalar_t>()), t, /*planes=*/false);
      } else if (dx_transposed && use_pixel_rows(t) && !channels_last_direct(t)) {
        conv_forward_pixel_rows<scalar_t>(dyp, weight, /*transposed=*/true, nullptr, dx.mutable_data_ptr<scalar_t>(), t,
                                          /*planes=*/false);
      } else if (dx_transposed) {
        conv_forward_nhwc<scalar_t>(dyp, weight, /*transposed=*/true, nullptr, dx.mutable_data_ptr<scalar_t>(), t);
      }
      if (dx_phases) {
        conv_input_grad_phases<scalar_t>(dyp, weight, dx.mutable_data_ptr<scalar_t>(), g, /*planes=*/false);
      }
    });
    return {dx, dw, db};
  }
  // The NCHW kernels, into NCHW buffers when the results are channels_last.
  const at::Tensor dy = cpu::contiguous_nchw(grad_output), x = cpu::contiguous_nchw(input), w = weight.contiguous();
  const bool nchw = format == at::MemoryFormat::Contiguous;
  at::Tensor dx_nchw = nchw || !need_dx ? dx : at::empty(dx.sizes(), dx.options());
  at::Tensor dw_nchw = nchw || !need_dw ? dw : at::empty(dw.sizes(), dw.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_backward_cpu", [&] {
    backward_nchw<scalar_t>(dy, x, w, dx_nchw, dw_nchw, db, g, need_dx, need_dw, need_db);
  });
  if (!dx.is_same(dx_nchw)) cpu::copy_nchw_into(dx, dx_nchw);
  if (!dw.is_same(dw_nchw)) cpu::copy_nchw_into(dw, dw_nchw);
  return {dx, dw, db};
}

// The op: the gradients output_mask asks for, None for the others (common/grads.h).
MaskedGrads conv2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, std::array<bool, 3> output_mask) {
  auto [dx, dw, db] =
      conv2d_backward_buffers(grad_output, input, weight, stride, padding, dilation, groups, output_mask);
  return masked_grads(dx, dw, db, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CPU, m) {
  m.impl("conv2d_forward", &conv2d_forward_cpu);
  m.impl("conv2d_backward", &conv2d_backward_cpu);
}

}  // namespace torch_cs231n
