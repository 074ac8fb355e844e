// The CPU convolution: im2col into the GEMM's panels, and col2im.
// Part of the CPU convolution (cpu/conv2d.cpp, which routes each layer; docs/conv2d.md has the table).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/conv2d.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"

namespace torch_cs231n {
namespace conv2d_cpu {

// ---------------------------------------------------------------------------------- im2col, col2im
// The column matrix of a block of nb samples is [C*kH*kW, nb*oH*oW]: sample s fills the columns
// s*oH*oW .. (s+1)*oH*oW - 1, so one GEMM covers the whole block. It is never stored whole: the GEMM's
// packing (cpu/gemm.h, PackB) asks for pieces of it, which im2col_segment writes.
//
// Row r = (c, t_h, t_w), column q = (s, o_h, o_w):
//     col[r, q] = x[s, c, o_h*sH - pH + t_h*dH, o_w*sW - pW + t_w*dW]   (0 in the padding)
// Within an output row the valid o_w of the tap are one interval [lo, hi): copy it, zero the rest, with
// no test per element. `in_sample` is the distance between samples in x. The values are written as Out
// (T itself, but for the integer convolution's wider sums: conv2d_integer.h).
template <typename T, typename Out = T>
void im2col_segment(const T* __restrict__ x, int64_t in_sample, const Conv2dGeometry& g, int64_t r, int64_t q0,
                    int64_t q1, Out* __restrict__ dst) {
  const int64_t tw = r % g.kw, th = (r / g.kw) % g.kh, c = r / g.taps(), cols = g.col_cols();
  int64_t lo, hi;
  conv_valid_out_range(tw, g.sw, g.pw, g.dw, g.w, g.ow, &lo, &hi);
  const int64_t off = tw * g.dw - g.pw;  // i_w = o_w*sW + off
  // (s, o_h, o_w) of q0, then stepped along: no division per output row (they cost more than a
  // 14-wide row's copy).
  int64_t s = q0 / cols, o_h = (q0 % cols) / g.ow, w0 = q0 % g.ow;
  const T* x_plane = x + s * in_sample + c * g.h * g.w;
  for (int64_t q = q0; q < q1;) {
    const int64_t w1 = std::min(g.ow, w0 + (q1 - q));
    Out* out = dst + (q - q0) - w0;  // out[o_w] is column (s, o_h, o_w)
    const int64_t i_h = conv_in_index(o_h, th, g.sh, g.ph, g.dh);
    const int64_t a = std::max(w0, lo), b = std::min(w1, hi);
    if (i_h < 0 || i_h >= g.h || a >= b) {
      std::fill(out + w0, out + w1, Out(0));
    } else {
      const T* x_row = x_plane + i_h * g.w;
      std::fill(out + w0, out + a, Out(0));
      if (g.sw == 1) {
        for (int64_t o_w = a; o_w < b; ++o_w) out[o_w] = static_cast<Out>(x_row[o_w + off]);
      } else {
        for (int64_t o_w = a; o_w < b; ++o_w) out[o_w] = static_cast<Out>(x_row[o_w * g.sw + off]);
      }
      std::fill(out + b, out + w1, Out(0));
    }
    q += w1 - w0;
    w0 = 0;
    if (++o_h == g.oh) {
      o_h = 0;
      x_plane += in_sample;
    }
  }
}

// A scratch row of the calling thread, at least `size` elements (the segments above, before they are
// scattered into the GEMM's panels; at most a GEMM block long).
template <typename T>
T* scratch_row(int64_t size) {
  thread_local std::vector<T> row;
  if (static_cast<int64_t>(row.size()) < size) row.resize(size);
  return row.data();
}

// The forward's B = col_g (rows r0 .. of group g's columns, columns = the block's pixels), packed.
template <typename T>
cpu::PackB<T> pack_columns(const T* x, int64_t in_sample, const Conv2dGeometry& g, int64_t r0) {
  return [=, &g](int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, T* dst) {
    T* row = scratch_row<T>(nc);
    for (int64_t p = 0; p < kc; ++p) {
      im2col_segment(x, in_sample, g, r0 + p0 + p, j0, j0 + nc, row);
      cpu::scatter_row_to_slivers(row, p, kc, nc, nr, dst);
    }
  };
}

// d_W's B = col_gᵀ (rows = the block's pixels, columns = rows r0 .. of group g's columns), packed: each
// column of the block is one segment of a row of col, written down its sliver.
template <typename T>
cpu::PackB<T> pack_columns_transposed(const T* x, int64_t in_sample, const Conv2dGeometry& g, int64_t r0) {
  return [=, &g](int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, T* dst) {
    T* row = scratch_row<T>(kc);
    for (int64_t j = 0; j < nc; ++j) {
      im2col_segment(x, in_sample, g, r0 + j0 + j, p0, p0 + kc, row);
      T* out = dst + (j / nr) * kc * nr + j % nr;
      for (int64_t p = 0; p < kc; ++p) out[p * nr] = row[p];
    }
    cpu::zero_last_sliver_tail(dst, kc, nc, nr);
  };
}

// col2im as a gather, one input row (c, i_h) of one sample at a time: the transposed convolution.
//     d_x[c, i_h, i_w] = Σ_{t_h, t_w} d_col[(c, t_h, t_w), (o_h, o_w)]
// over the taps for which o_h = (i_h + pH - t_h*dH)/sH and o_w = (i_w + pW - t_w*dW)/sW are integers
// in range. For a fixed tap, the inputs i_w = i0, i0+sW, ... take the outputs o_w = o0, o0+1, ... .
// `dcol` points at the sample's first column; rows are `ld` apart.
template <typename T>
void col2im_row(const T* __restrict__ dcol, int64_t ld, T* __restrict__ dx_row, const Conv2dGeometry& g, int64_t c,
                int64_t i_h) {
  std::fill(dx_row, dx_row + g.w, T(0));
  for (int64_t th = 0; th < g.kh; ++th) {
    int64_t o_h;
    if (!conv_out_index(i_h, th, g.sh, g.ph, g.dh, g.oh, &o_h)) continue;
    for (int64_t tw = 0; tw < g.kw; ++tw) {
      const T* src = dcol + ((c * g.kh + th) * g.kw + tw) * ld + o_h * g.ow;
      int64_t i0, o0;
      conv_tap_first(tw, g.sw, g.pw, g.dw, &i0, &o0);
      if (i0 >= g.w || o0 >= g.ow) continue;
      const int64_t count = std::min((g.w - i0 + g.sw - 1) / g.sw, g.ow - o0);
      if (g.sw == 1) {
        for (int64_t k = 0; k < count; ++k) dx_row[i0 + k] += src[o0 + k];
      } else {
        for (int64_t k = 0; k < count; ++k) dx_row[i0 + k * g.sw] += src[o0 + k];
      }
    }
  }
}

// d_x of samples 0 .. nb-1 of a block (dx points at the first), rows in parallel.
template <typename T>
void col2im(const T* dcol, int64_t nb, T* dx, const Conv2dGeometry& g) {
  const int64_t rows = g.c * g.h, cols = g.col_cols(), ld = nb * cols;
  at::parallel_for(0, rows * nb, std::max<int64_t>(1, kGrain / (g.w * g.taps())), [&](int64_t begin, int64_t end) {
    for (int64_t rs = begin; rs < end; ++rs) {
      const int64_t s = rs / rows, row = rs % rows;
      col2im_row(dcol + s * cols, ld, dx + (s * rows + row) * g.w, g, row / g.h, row % g.h);
    }
  });
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
