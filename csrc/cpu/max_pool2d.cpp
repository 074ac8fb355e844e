// Max pooling on the CPU: loops over the shared window math of common/max_pool2d.h.
//
// Layouts. The output, the indices and the input's gradient take torch's memory format (the input's
// suggested one; see max_pool2d_geometry). An input in any other layout (a transposed or sliced view)
// is first copied into that format, so the loops below see one of two dense layouts:
//
//   NCHW (contiguous)   each (n, c) plane is one block: parallel over planes, and within a plane the
//                       forward runs the window scan for a whole output row at once, tap by tap, so
//                       the innermost loop is over ow, free of bounds tests and vectorisable (2x2
//                       windows inside the input: all four taps in one pass per output).
//                       The backward scatter-adds dy into the plane's gradient, one thread per plane.
//   NHWC (channels_last) the channels of a pixel are one block: parallel over (n, output row), and the
//                       innermost loop is over c, contiguous and vectorisable, for every tap. The
//                       backward gathers, per input pixel, from the outputs whose window can hold it.
//
// Either way each output is the same scan (pool::takes over the taps in row-major order) as the CUDA
// kernel's pool::scan_window, so the two backends give the same values and indices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/max_pool2d.h"
#include "cpu/reduced_float.h"

namespace torch_cs231n {
namespace {

// Work per task of at::parallel_for, in elements: enough to hide the hand-off to another thread.
constexpr int64_t kGrain = 1 << 14;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, elements_per_item));
}

// Per tap of one dimension: the outputs for which it exists ([begin, end) of pool::outputs_with_tap)
// and its input offset for output 0 (t*d - p); per output: the first existing tap's position, where the
// index starts (torch's index for an all -inf window).
struct AxisPlan {
  std::vector<int64_t> begin, end, offset, first;
};

AxisPlan plan_axis(int64_t in, int64_t out, int64_t k, int64_t s, int64_t p, int64_t d) {
  AxisPlan a;
  for (int64_t t = 0; t < k; ++t) {
    int64_t b, e;
    pool::outputs_with_tap(t, in, out, s, p, d, &b, &e);
    a.begin.push_back(b);
    a.end.push_back(e);
    a.offset.push_back(t * d - p);
  }
  for (int64_t o = 0; o < out; ++o) {
    int64_t t0, t1;
    pool::valid_taps(o, in, k, s, p, d, &t0, &t1);
    a.first.push_back(o * s - p + t0 * d);
  }
  return a;
}

// ------------------------------------------------------------------------------------- forward, NCHW
// The innermost loop: one tap, at input offset `off` of row `xrow`, against every output ow in [b, e)
// of an output row, which meets it at column ow*sw + off (pool::outputs_with_tap gives [b, e), so no
// bounds tests). `best` and `arg` hold the running maximum and its flat index per output.
//
// Written for the vectoriser: compares and selects only, the index kept in `index_t` = int32 when the
// plane has fewer than 2^31 elements (the same lane width as float, which SSE2 needs to vectorise the
// select; it is widened to int64 when the row is stored), and the column stride a compile-time constant
// for the common strides 1 and 2 (contiguous or stride-2 loads).
template <int kStride, typename scalar_t, typename index_t>
inline void scan_tap(const scalar_t* __restrict__ xrow, scalar_t* __restrict__ best, index_t* __restrict__ arg,
                     int64_t b, int64_t e, int64_t off, index_t base) {
  constexpr int64_t sw = kStride;
  for (int64_t ow = b; ow < e; ++ow) {
    const scalar_t v = xrow[ow * sw + off];
    const bool take = pool::takes(v, best[ow]);
    best[ow] = take ? v : best[ow];
    arg[ow] = take ? static_cast<index_t>(base + static_cast<index_t>(ow) * static_cast<index_t>(sw)) : arg[ow];
  }
}

// Outputs [from, to) of output row oh, tap by tap: start each at (-inf, first existing tap), then run
// the taps in row-major order (kh outer, kw inner: torch's scan order) over the whole range. Per output
// this is exactly pool::scan_window, the order of the compares included, so ties and NaN come out alike.
template <int kStride, typename scalar_t, typename index_t>
void scan_row_by_tap(const scalar_t* x, scalar_t* yrow, index_t* arg, int64_t oh, int64_t from, int64_t to,
                     const MaxPool2dGeometry& g, const AxisPlan& rows, const AxisPlan& cols) {
  const int64_t W = g.width;
  const int64_t first_row = rows.first[oh] * W;
  for (int64_t ow = from; ow < to; ++ow) {
    yrow[ow] = pool::scan_start<scalar_t>();
    arg[ow] = static_cast<index_t>(first_row + cols.first[ow]);
  }
  int64_t th0, th1;
  pool::valid_taps(oh, g.height, g.kh, g.sh, g.ph, g.dh, &th0, &th1);
  for (int64_t th = th0; th < th1; ++th) {
    const int64_t ih = oh * g.sh - g.ph + th * g.dh;
    for (int64_t tw = 0; tw < g.kw; ++tw) {
      const int64_t off = cols.offset[tw];
      scan_tap<kStride>(x + ih * W, yrow, arg, std::max(cols.begin[tw], from), std::min(cols.end[tw], to), off,
                        static_cast<index_t>(ih * W + off));  // the flat index of this tap at ow = 0
    }
  }
}

// Outputs [lo, hi) of an output row whose whole kK x kK window lies inside the input (no padding
// reached): all taps in one pass per output, in scan order, the maximum and index kept in registers
// and stored once. The same scan as above with the bookkeeping gone; it is most of the work for
// small rows such as 32x32 planes, where the per-tap passes cost more in loop overhead than in compares.
template <int kStride, int kK, typename scalar_t, typename index_t>
void scan_row_fused(const scalar_t* __restrict__ x, scalar_t* __restrict__ yrow, index_t* __restrict__ arg, int64_t lo,
                    int64_t hi, int64_t ih0, const MaxPool2dGeometry& g) {
  const int64_t W = g.width, dh = g.dh, dw = g.dw, pw = g.pw;
  for (int64_t ow = lo; ow < hi; ++ow) {
    scalar_t best = pool::scan_start<scalar_t>();
    const index_t col0 = static_cast<index_t>(ow) * kStride - static_cast<index_t>(pw);
    index_t index = static_cast<index_t>(ih0 * W) + col0;  // tap (0, 0), the first existing one
#pragma GCC unroll 4
    for (int th = 0; th < kK; ++th) {
      const index_t row = static_cast<index_t>((ih0 + th * dh) * W);
#pragma GCC unroll 4
      for (int tw = 0; tw < kK; ++tw) {
        const index_t i = row + col0 + static_cast<index_t>(tw * dw);
        const scalar_t v = x[i];
        const bool take = pool::takes(v, best);
        best = take ? v : best;
        index = take ? i : index;
      }
    }
    yrow[ow] = best;
    arg[ow] = index;
  }
}

// One plane, row by row. `arg` is scratch for one row of indices. kK > 0 is a square kernel known
// at compile time: the rows whose window lies inside the input vertically use scan_row_fused
// for the columns whose window does too; everything else (kK = 0, edges) goes tap by tap.
template <int kStride, int kK, typename scalar_t, typename index_t>
void forward_plane_nchw(const scalar_t* x, scalar_t* y, int64_t* ind, index_t* arg, const MaxPool2dGeometry& g,
                        const AxisPlan& rows, const AxisPlan& cols) {
  const int64_t OW = g.out_w;
  // Columns whose taps all exist: the first tap binds on the left, the last one on the right.
  const int64_t lo = cols.begin[0], hi = std::max(lo, cols.end[g.kw - 1]);
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    scalar_t* __restrict__ yrow = y + oh * OW;
    int64_t th0, th1;
    pool::valid_taps(oh, g.height, g.kh, g.sh, g.ph, g.dh, &th0, &th1);
    if (kK > 0 && th0 == 0 && th1 == g.kh) {
      scan_row_by_tap<kStride>(x, yrow, arg, oh, 0, lo, g, rows, cols);
      scan_row_fused<kStride, kK>(x, yrow, arg, lo, hi, oh * g.sh - g.ph, g);
      scan_row_by_tap<kStride>(x, yrow, arg, oh, hi, OW, g, rows, cols);
    } else {
      scan_row_by_tap<kStride>(x, yrow, arg, oh, 0, OW, g, rows, cols);
    }
    int64_t* __restrict__ irow = ind + oh * OW;
    for (int64_t ow = 0; ow < OW; ++ow) irow[ow] = arg[ow];
  }
}

// All planes, in parallel; each task has its own row of index scratch.
template <int kStride, int kK, typename scalar_t, typename index_t>
void forward_nchw(const scalar_t* x, scalar_t* y, int64_t* ind, const MaxPool2dGeometry& g) {
  const AxisPlan rows = plan_axis(g.height, g.out_h, g.kh, g.sh, g.ph, g.dh);
  const AxisPlan cols = plan_axis(g.width, g.out_w, g.kw, g.sw, g.pw, g.dw);
  const int64_t in_plane = g.height * g.width, out_plane = g.out_h * g.out_w;
  at::parallel_for(0, g.planes(), grain_for(in_plane), [&](int64_t begin, int64_t end) {
    std::vector<index_t> arg(g.out_w);
    for (int64_t p = begin; p < end; ++p) {
      forward_plane_nchw<kStride, kK>(x + p * in_plane, y + p * out_plane, ind + p * out_plane, arg.data(), g, rows,
                                      cols);
    }
  });
}

// The 2x2 kernel (the CS231n pool) gets the fused interior: measured here, it is about 25% faster on
// (50, 32, 32, 32). A fused 3x3 was slower than tap by tap on (32, 64, 56, 56) (nine stride-2 loads
// in flight exhaust SSE's 16 registers), so 3x3 and the rest go tap by tap.
template <int kStride, typename scalar_t, typename index_t>
void forward_nchw_kernel_dispatch(const scalar_t* x, scalar_t* y, int64_t* ind, const MaxPool2dGeometry& g) {
  if (g.kh == 2 && g.kw == 2) {
    forward_nchw<kStride, 2, scalar_t, index_t>(x, y, ind, g);
  } else {
    forward_nchw<kStride, 0, scalar_t, index_t>(x, y, ind, g);
  }
}

// Column strides other than 1 and 2 (rare, and poor for vector loads anyway): one output at a time,
// by pool::scan_window itself, the very function each CUDA thread runs.
template <typename scalar_t>
void forward_nchw_per_output(const scalar_t* x, scalar_t* y, int64_t* ind, const MaxPool2dGeometry& g) {
  const int64_t in_plane = g.height * g.width, out_plane = g.out_h * g.out_w;
  at::parallel_for(0, g.planes(), grain_for(in_plane), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* plane = x + p * in_plane;
      const auto load = [plane, &g](int64_t ih, int64_t iw) { return plane[ih * g.width + iw]; };
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const int64_t o = p * out_plane + oh * g.out_w + ow;
          pool::scan_window<scalar_t>(oh, ow, g.height, g.width, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, load,
                                      &y[o], &ind[o]);
        }
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void forward_nchw_dispatch(const scalar_t* x, scalar_t* y, int64_t* ind, const MaxPool2dGeometry& g) {
  if (g.sw == 1) {
    forward_nchw_kernel_dispatch<1, scalar_t, index_t>(x, y, ind, g);
  } else if (g.sw == 2) {
    forward_nchw_kernel_dispatch<2, scalar_t, index_t>(x, y, ind, g);
  } else {
    forward_nchw_per_output(x, y, ind, g);
  }
}

// ------------------------------------------------------------------------------------- forward, NHWC
// One output row (n, oh) of a channels_last tensor: for each output pixel, the same scan, with all C
// channels carried along in the innermost loop (they share the taps, so the index is one number per
// tap). As above, the running index is kept in `arg` (C values of index_t) and widened when stored.
template <typename scalar_t, typename index_t>
void forward_row_nhwc(const scalar_t* x, scalar_t* y, int64_t* ind, index_t* __restrict__ arg, int64_t n, int64_t oh,
                      const MaxPool2dGeometry& g) {
  const int64_t C = g.channels, W = g.width;
  int64_t th0, th1;
  pool::valid_taps(oh, g.height, g.kh, g.sh, g.ph, g.dh, &th0, &th1);
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    int64_t tw0, tw1;
    pool::valid_taps(ow, W, g.kw, g.sw, g.pw, g.dw, &tw0, &tw1);
    const int64_t h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
    const int64_t o = ((n * g.out_h + oh) * g.out_w + ow) * C;
    scalar_t* __restrict__ yp = y + o;
    const index_t first = static_cast<index_t>((h0 + th0 * g.dh) * W + (w0 + tw0 * g.dw));
    for (int64_t c = 0; c < C; ++c) {
      yp[c] = pool::scan_start<scalar_t>();
      arg[c] = first;
    }
    for (int64_t th = th0; th < th1; ++th) {
      const int64_t ih = h0 + th * g.dh;
      for (int64_t tw = tw0; tw < tw1; ++tw) {
        const int64_t iw = w0 + tw * g.dw;
        const index_t index = static_cast<index_t>(ih * W + iw);
        const scalar_t* __restrict__ xp = x + ((n * g.height + ih) * W + iw) * C;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t v = xp[c];
          const bool take = pool::takes(v, yp[c]);
          yp[c] = take ? v : yp[c];
          arg[c] = take ? index : arg[c];
        }
      }
    }
    int64_t* __restrict__ ip = ind + o;
    for (int64_t c = 0; c < C; ++c) ip[c] = arg[c];
  }
}

template <typename scalar_t, typename index_t>
void forward_nhwc(const scalar_t* x, scalar_t* y, int64_t* ind, const MaxPool2dGeometry& g) {
  const int64_t rows = g.batch * g.out_h;
  at::parallel_for(0, rows, grain_for(g.out_w * g.channels * g.kh * g.kw), [&](int64_t begin, int64_t end) {
    std::vector<index_t> arg(g.channels);
    for (int64_t r = begin; r < end; ++r) forward_row_nhwc(x, y, ind, arg.data(), r / g.out_h, r % g.out_h, g);
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPool2dGeometry g =
      max_pool2d_geometry(input, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d_forward");
  const auto opts = input.options().memory_format(g.format);
  at::Tensor output = at::empty(g.output_sizes(), opts);
  at::Tensor indices = at::empty(g.output_sizes(), opts.dtype(at::kLong));
  if (output.numel() == 0) return {output, indices};
  const at::Tensor x = input.contiguous(g.format);  // a no-op unless the input is in another layout
  const bool nhwc = g.format == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_forward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = output.mutable_data_ptr<scalar_t>();
    int64_t* ip = indices.mutable_data_ptr<int64_t>();
    // int32 indices while they fit (they are widened to int64 when stored), int64 beyond.
    const bool small = g.height * g.width <= std::numeric_limits<int32_t>::max();
    if (nhwc) {
      small ? forward_nhwc<scalar_t, int32_t>(xp, yp, ip, g) : forward_nhwc<scalar_t, int64_t>(xp, yp, ip, g);
    } else {
      small ? forward_nchw_dispatch<scalar_t, int32_t>(xp, yp, ip, g)
            : forward_nchw_dispatch<scalar_t, int64_t>(xp, yp, ip, g);
    }
  });
  return {output, indices};
}

// ------------------------------------------------------------------------------------ backward, NCHW
// One plane, one thread: dx = 0, then dx[index[o]] += dy[o] for every output o in order, rule (3).
// Overlapping windows (3x3 stride 2) send several gradients to one input; they are summed in output
// order, as torch does. An index outside the plane (only possible if the caller passes made-up
// indices to the op) is reported instead of written through.
template <typename scalar_t>
bool backward_plane_nchw(const scalar_t* dy, const int64_t* ind, scalar_t* dx, int64_t in_plane, int64_t out_plane) {
  for (int64_t i = 0; i < in_plane; ++i) dx[i] = scalar_t(0);
  bool ok = true;
  for (int64_t o = 0; o < out_plane; ++o) {
    const int64_t i = ind[o];
    if (i < 0 || i >= in_plane) {
      ok = false;
      continue;
    }
    dx[i] += dy[o];
  }
  return ok;
}

// ------------------------------------------------------------------------------------ backward, NHWC
// One input row (n, ih) of a channels_last tensor. Each input pixel gathers from the outputs whose
// window can hold it (pool::candidate_outputs, in output order, the order in which torch sums) those
// channels whose saved index is this pixel: the innermost loop runs over c, contiguous, without
// branches. Every gradient is written once, so rows run in parallel without races. Made-up indices
// out of range simply match nothing.
template <typename scalar_t>
void backward_row_nhwc(const scalar_t* dy, const int64_t* ind, scalar_t* dx, int64_t n, int64_t ih,
                       const MaxPool2dGeometry& g) {
  const int64_t C = g.channels;
  int64_t oh0, oh1;
  pool::candidate_outputs(ih, g.out_h, g.kh, g.sh, g.ph, g.dh, &oh0, &oh1);
  for (int64_t iw = 0; iw < g.width; ++iw) {
    scalar_t* __restrict__ gp = dx + ((n * g.height + ih) * g.width + iw) * C;
    for (int64_t c = 0; c < C; ++c) gp[c] = scalar_t(0);
    int64_t ow0, ow1;
    pool::candidate_outputs(iw, g.out_w, g.kw, g.sw, g.pw, g.dw, &ow0, &ow1);
    const int64_t target = ih * g.width + iw;
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      for (int64_t ow = ow0; ow < ow1; ++ow) {
        const int64_t o = ((n * g.out_h + oh) * g.out_w + ow) * C;
        const scalar_t* __restrict__ dyp = dy + o;
        const int64_t* __restrict__ ip = ind + o;
        for (int64_t c = 0; c < C; ++c) gp[c] += ip[c] == target ? dyp[c] : scalar_t(0);
      }
    }
  }
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPool2dGeometry g =
      check_max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode);
  if (cpu::is_reduced_float(grad_output)) {
    // Overlapping windows add several gradients into one input: in float32, rounded once (reduced_float.h).
    // The input gives only its shape and layout: an uninitialised float32 stand-in with its strides does.
    const at::Tensor shape_of_input = at::empty_like(input, input.options().dtype(at::kFloat));
    const at::Tensor dx = max_pool2d_backward_cpu(cpu::to_float(grad_output), shape_of_input, indices, kernel_size,
                                                  stride, padding, dilation, ceil_mode);
    return cpu::round_to(dx, grad_output.scalar_type());
  }
  at::Tensor grad_input = at::empty(g.input_sizes(), input.options().memory_format(g.format));
  if (grad_input.numel() == 0) return grad_input;
  // grad_output and indices in the output's layout (autograd may hand over dy in another one).
  const at::Tensor dy = grad_output.contiguous(g.format);
  const at::Tensor ind = indices.contiguous(g.format);
  const bool nhwc = g.format == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "max_pool2d_backward_cpu", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const int64_t* ip = ind.const_data_ptr<int64_t>();
    scalar_t* dxp = grad_input.mutable_data_ptr<scalar_t>();
    if (nhwc) {
      const int64_t rows = g.batch * g.height;
      at::parallel_for(0, rows, grain_for(g.width * g.channels * 4), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) backward_row_nhwc(dyp, ip, dxp, r / g.height, r % g.height, g);
      });
    } else {
      const int64_t in_plane = g.height * g.width, out_plane = g.out_h * g.out_w;
      std::atomic<bool> ok{true};
      at::parallel_for(0, g.planes(), grain_for(in_plane), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          if (!backward_plane_nchw(dyp + p * out_plane, ip + p * out_plane, dxp + p * in_plane, in_plane, out_plane)) {
            ok = false;
          }
        }
      });
      TORCH_CHECK(ok.load(), "max_pool2d_backward: expected indices in [0, H*W) = [0, ", in_plane,
                  ") (flat positions within a plane, as the forward returns them), but found one outside");
    }
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CPU, m) {
  m.impl("max_pool2d_forward", &max_pool2d_forward_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
}

}  // namespace torch_cs231n
