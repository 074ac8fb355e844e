// Max pooling's per-element math, called by the CPU loops (cpu/max_pool2d.cpp) and the CUDA kernels
// (cuda/max_pool2d.cu). Everything here works on one spatial dimension at a time: a 2-D window is the
// product of a row window and a column window, and torch scans it row by row.
//
// One dimension of size `in`, kernel k, stride s, padding p, dilation d. Output o looks at the taps
//
//     i(o, t) = o*s - p + t*d,    t = 0 .. k-1                                   (1)
//
// of which those with 0 <= i < in exist; the others are padding, which counts as -inf (it never wins).
// The effective kernel is d*(k-1) + 1 input elements wide. The number of outputs is torch's rule
//
//     out = floor((in + 2p - d*(k-1) - 1 + (ceil_mode ? s-1 : 0)) / s) + 1        (2)
//
// and in ceil_mode the last window must start inside the input or its left padding:
// if (out-1)*s >= in + p, drop it.
//
// The forward is, per output, y = max over the existing taps, scanned in row-major order (kh outer, kw
// inner) starting from -inf, and its index is h*W + w of the winner within the plane. A later tap
// replaces the running maximum when it is strictly greater, so ties keep the first maximum, or when it
// is NaN, so NaN propagates; torch does exactly this, and so its index is that of the last NaN.
// An all -inf window keeps the index of its first existing tap.
//
// The backward is dL/dx[i] = sum over the outputs o with index[o] == i of dL/dy[o]          (3)
// (the note's derivation, with the argmax taken per window). The CPU sends each dy[o] to index[o]
// (scatter-add within a plane); the GPU gathers, for each input i, over the outputs whose window can
// contain i (`candidate_outputs` below), so that every gradient is written once, without atomics.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/max_pool2d_index.h"

namespace torch_cs231n {
namespace pool {

// The outputs o for which tap t of the window exists: 0 <= o*s - p + t*d < in, as [*o_begin, *o_end)
// clipped to [0, out). The CPU forward walks a whole output row per tap with it, without bounds tests.
C10_HOST_DEVICE inline void outputs_with_tap(int64_t t, int64_t in, int64_t out, int64_t s, int64_t p, int64_t d,
                                             int64_t* o_begin, int64_t* o_end) {
  const int64_t offset = t * d - p;                      // input position of this tap for o = 0
  const int64_t lo = ceil_div(-offset, s);               // o*s + offset >= 0
  const int64_t hi = floor_div(in - 1 - offset, s) + 1;  // o*s + offset <= in - 1
  *o_begin = lo > 0 ? lo : 0;
  *o_end = hi < out ? hi : out;
  if (*o_end < *o_begin) *o_end = *o_begin;
}

// The value a window's scan starts from: -inf for the floating types; for the integer types, which have
// no infinity (numeric_limits<int>::infinity() is 0), the smallest value.
template <typename T>
C10_HOST_DEVICE inline T scan_start() {
  if constexpr (std::numeric_limits<T>::has_infinity) {
    return -std::numeric_limits<T>::infinity();
  } else {
    return std::numeric_limits<T>::lowest();
  }
}

// One step of the window scan: does value v replace the running maximum `best`? Strictly greater
// (ties keep the first maximum in scan order) or NaN (NaN propagates, the last NaN's index is kept, as
// in torch). Written with compares only, so that the CPU loops vectorise; `v != v` is the NaN test.
template <typename acc_t>
C10_HOST_DEVICE inline bool takes(acc_t v, acc_t best) {
  return v > best || v != v;
}

// The forward for one output (oh, ow) of one plane: the maximum over the existing taps of its window
// (valid_taps in each dimension), read through `load(ih, iw)`, and the flat index ih*width + iw of the
// winner. `best` starts at -inf and the index at the first existing
// tap, torch's choice for an all -inf window. The CUDA kernel runs this per thread; the CPU loops
// run the same scan over whole rows (or channel vectors) at once, using `takes` and `valid_taps`.
template <typename acc_t, typename Load>
C10_HOST_DEVICE inline void scan_window(int64_t oh, int64_t ow, int64_t height, int64_t width, int64_t kh, int64_t kw,
                                        int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                                        const Load& load, acc_t* best_out, int64_t* index_out) {
  int64_t th0, th1, tw0, tw1;
  valid_taps(oh, height, kh, sh, ph, dh, &th0, &th1);
  valid_taps(ow, width, kw, sw, pw, dw, &tw0, &tw1);
  const int64_t h0 = oh * sh - ph, w0 = ow * sw - pw;  // the input position of tap (0, 0)
  acc_t best = scan_start<acc_t>();
  int64_t index = (h0 + th0 * dh) * width + (w0 + tw0 * dw);
  for (int64_t th = th0; th < th1; ++th) {
    const int64_t ih = h0 + th * dh;
    for (int64_t tw = tw0; tw < tw1; ++tw) {
      const int64_t iw = w0 + tw * dw;
      const acc_t v = static_cast<acc_t>(load(ih, iw));
      if (takes(v, best)) {
        best = v;
        index = ih * width + iw;
      }
    }
  }
  *best_out = best;
  *index_out = index;
}

}  // namespace pool

// ------------------------------------------------------------------------------------------ host side
// The argument checks and the shape of the problem, shared by the CPU and CUDA entry points. Messages
// name the argument, what was expected and what came (docs/architecture.md, Errors).
struct MaxPool2dGeometry {
  bool batched;  // a 4-D input; a 3-D (C, H, W) one is pooled as a batch of one
  int64_t batch, channels, height, width, out_h, out_w;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  bool ceil_mode;
  at::MemoryFormat format;  // of the output, the indices and the input's gradient, as torch chooses

  int64_t planes() const { return batch * channels; }
  std::vector<int64_t> input_sizes() const {
    return batched ? std::vector<int64_t>{batch, channels, height, width}
                   : std::vector<int64_t>{channels, height, width};
  }
  std::vector<int64_t> output_sizes() const {
    return batched ? std::vector<int64_t>{batch, channels, out_h, out_w} : std::vector<int64_t>{channels, out_h, out_w};
  }
};

inline void check_max_pool2d_pair(at::IntArrayRef v, const char* op, const char* arg) {
  TORCH_CHECK(v.size() == 2, op, ": expected ", arg, " to have 2 values (height, width), but got ", v.size(), ": ", v);
}

// Every check of torch's max_pool2d, then the output size by rule (2).
inline MaxPool2dGeometry max_pool2d_geometry(const at::Tensor& input, at::IntArrayRef kernel_size,
                                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                             bool ceil_mode, const char* op) {
  check_max_pool2d_pair(kernel_size, op, "kernel_size");
  check_max_pool2d_pair(stride, op, "stride");
  check_max_pool2d_pair(padding, op, "padding");
  check_max_pool2d_pair(dilation, op, "dilation");
  TORCH_CHECK(kernel_size[0] > 0 && kernel_size[1] > 0, op, ": expected kernel_size to be positive, but got ",
              "kernel_size=", kernel_size);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": expected stride to be positive, but got stride=", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op,
              ": expected dilation to be positive, but got dilation=", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op,
              ": expected padding to be non-negative, but got padding=", padding);
  // torch checks the padding twice, against half the effective kernel dilation*(kernel_size-1)+1 and
  // against half the kernel_size itself; the second is the binding one, so it is ours.
  TORCH_CHECK(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, op,
              ": expected padding to be at most half the kernel size, but got padding=", padding,
              " with kernel_size=", kernel_size);
  TORCH_CHECK(input.dim() == 3 || input.dim() == 4, op,
              ": expected input to be 3-D (C, H, W) or 4-D "
              "(N, C, H, W), but got a ",
              input.dim(), "-D tensor of shape ", input.sizes());
  const int64_t d = input.dim();
  TORCH_CHECK(input.size(d - 3) > 0 && input.size(d - 2) > 0 && input.size(d - 1) > 0, op,
              ": expected input to have non-zero channels, height and width (only the batch may be empty), "
              "but got shape ",
              input.sizes());
  check_float_or_integer_dtype(input, op, "input");  // integers: forward only, as torch (no gradients)

  MaxPool2dGeometry g;
  g.batched = d == 4;
  g.batch = g.batched ? input.size(0) : 1;
  g.channels = input.size(d - 3);
  g.height = input.size(d - 2);
  g.width = input.size(d - 1);
  g.kh = kernel_size[0];
  g.kw = kernel_size[1];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.ceil_mode = ceil_mode;
  g.out_h = pool::output_size(g.height, g.kh, g.sh, g.ph, g.dh, ceil_mode);
  g.out_w = pool::output_size(g.width, g.kw, g.sw, g.pw, g.dw, ceil_mode);
  TORCH_CHECK(g.out_h >= 1 && g.out_w >= 1, op, ": output size is too small: input of height ", g.height, " and width ",
              g.width, " with kernel_size=", kernel_size, ", stride=", stride, ", padding=", padding,
              ", dilation=", dilation, " and ceil_mode=", ceil_mode, " gives an output of ", g.out_h, "x", g.out_w);
  // With dilation a window may step over the whole input, all its taps in the padding (kernel_size=2,
  // dilation=3, padding=1 on a width of 2: taps at -1 and 2). Its maximum would be -inf with no
  // element to point to (torch then returns an index outside the plane); we refuse it.
  const int64_t dims[2][6] = {{g.height, g.out_h, g.kh, g.sh, g.ph, g.dh}, {g.width, g.out_w, g.kw, g.sw, g.pw, g.dw}};
  for (int i = 0; i < 2; ++i) {
    const int64_t* a = dims[i];
    for (int64_t o = 0; o < a[1]; ++o) {
      int64_t t0, t1;
      pool::valid_taps(o, a[0], a[2], a[3], a[4], a[5], &t0, &t1);
      TORCH_CHECK(t0 < t1, op, ": expected every pooling window to hold at least one input element, but window ", o,
                  " along the ", i == 0 ? "height" : "width", " falls entirely in the padding (input size ", a[0],
                  ", kernel_size=", kernel_size, ", stride=", stride, ", padding=", padding, ", dilation=", dilation,
                  ")");
    }
  }
  // torch's choice: a 4-D input's suggested format (channels_last stays channels_last), 3-D contiguous.
  g.format = g.batched ? input.suggest_memory_format() : at::MemoryFormat::Contiguous;
  return g;
}

// The shapes and types the backward needs to trust before it writes anything.
inline MaxPool2dGeometry check_max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                   const at::Tensor& indices, at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "max_pool2d_backward";
  const MaxPool2dGeometry g = max_pool2d_geometry(input, kernel_size, stride, padding, dilation, ceil_mode, op);
  check_same_device(input, "input", grad_output, "grad_output", op);
  check_same_device(input, "input", indices, "indices", op);
  check_same_dtype(input, "input", grad_output, "grad_output", op);
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": expected indices to have dtype int64, but got ",
              indices.scalar_type());
  const auto out = g.output_sizes();
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(out), op, ": expected grad_output to have the output's shape ",
              at::IntArrayRef(out), ", but got ", grad_output.sizes());
  TORCH_CHECK(indices.sizes() == at::IntArrayRef(out), op, ": expected indices to have the output's shape ",
              at::IntArrayRef(out), ", but got ", indices.sizes());
  return g;
}

}  // namespace torch_cs231n
