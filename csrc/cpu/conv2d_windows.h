// The CPU convolution of layers with few input channels (a stem: RGB), by the rows of taps of each output
// pixel's window: runs of kW·C values in NHWC. Part of the CPU convolution (cpu/conv2d.cpp, which routes
// each layer; docs/conv2d.md has the table).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/conv2d.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/conv2d_pixels.h"
#include "cpu/gemm.h"

namespace torch_cs231n {
namespace conv2d_cpu {

// With C = 3 channels a tap is a run of 3 floats: as the k of the NHWC kernels (taps as segments) it
// makes 3 steps a segment, and d_W's packing copies runs of 3. A pixel's whole window is long, though:
// taps x C = 27 (3 x 3) or 147 (7 x 7) values, and in NHWC each of its rows of taps lies in memory as
// one run of kW·C floats (dilation 1). So
//   - the forward takes those runs as its segments, read in place from the padded sample
//     (conv_forward_row_segments below): kH segments of kW·C steps instead of kH·kW of C;
//   - d_W reads them in place too on AVX-512 (conv_weight_grad_row_segments, channels_last or NCHW);
//     elsewhere (other instruction sets, float64; channels_last) it multiplies the window rows of a
//     block of output pixels,
//       A[j, (t_h, t_w, c)] = x[n, o_h·sH - pH + t_h·dH, o_w·sW - pW + t_w, c]    (0 in the padding)
//     (kH runs a row, the im2col of NHWC, built in L2 by the thread that uses it) at once:
//       d_W[F, K] += dY_blockᵀ · A    summed over the blocks of a thread, then over the threads
//     with no padded copy of the input and no layout change: d_W comes out in channels_last order.
inline bool few_channels_by_windows(const Conv2dGeometry& g) {
  return g.groups == 1 && g.c < 16 && g.dw == 1 && !conv2d_is_pointwise(g);
}

// Strided NCHW layers (a stem) take the windows too where gemm_segments reads A in place (AVX-512,
// float32), with both layout changes, when their NCHW route wastes taps and the windows are long:
// shifted planes of the stride's phases run ceil(kH/sH)·sH x ceil(kW/sW)·sW taps (64 for a 7 x 7
// stride-2 stem's 49), and this route's transposes pay off only over windows of 64 values or more.
// Measured, ours through the windows / through the phases (docs/benchmarks.md, 2026-12-01, fourth
// session): 7 x 7 stride 2 on 3 channels 0.76-0.96, 3 x 3 stride 2 on 12 channels 0.84-0.90; 3 x 3
// stride 2 on 3 channels (27 values) 1.05-1.08, and 4 x 4 stride 4 (no tap wasted) 0.94-1.25.
template <typename T>
bool nchw_by_windows(const Conv2dGeometry& g) {
  const bool strided = g.sh > 1 || g.sw > 1, wasted_taps = g.kh % g.sh != 0 || g.kw % g.sw != 0;
  return std::is_same_v<T, float> && cpu::gather_a_available() && few_channels_by_windows(g) && strided &&
         wasted_taps && g.taps() * g.c >= 64;
}

// Output pixels a block: its window rows about 32 Ki floats (128 KiB, in L2), a multiple of 24 rows
// (gemm_segments' tiles).
inline int64_t window_rows_block(const Conv2dGeometry& g) {
  const int64_t rows = (int64_t(1) << 15) / (g.taps() * g.c);
  return std::max<int64_t>(24, rows / 24 * 24);
}

// The window rows of output pixels [j0, j1) of sample x (NHWC) into a (row stride taps·C): kH runs of
// kW·C values a row, cut where they cross the padding (zeros there).
template <typename T>
void build_window_rows(const T* x, int64_t j0, int64_t j1, const Conv2dGeometry& g, T* a) {
  const int64_t run = g.kw * g.c, k = g.taps() * g.c;
  int64_t o_h = j0 / g.ow, o_w = j0 % g.ow;  // pixel j, stepped along (no division a row)
  for (T* row = a; row < a + (j1 - j0) * k; row += k) {
    const int64_t w0 = conv_in_index<int64_t>(o_w, 0, g.sw, g.pw, 1);  // the window's first column
    // columns [w0, w0 + kW) of which [lo, hi) lie in the image: runs of `head` zeros, `body` values, zeros
    const int64_t lo = std::max<int64_t>(0, w0), hi = std::max(lo, std::min<int64_t>(g.w, w0 + g.kw));
    const int64_t head = (lo - w0) * g.c, body = (hi - lo) * g.c;
    const T* src = x + lo * g.c;
    int64_t i_h = conv_in_index<int64_t>(o_h, 0, g.sh, g.ph, g.dh);
    for (T* out = row; out < row + k; out += run, i_h += g.dh) {
      if (i_h < 0 || i_h >= g.h || body == 0) {
        std::fill(out, out + run, T(0));
        continue;
      }
      std::fill(out, out + head, T(0));
      std::copy(src + i_h * g.w * g.c, src + i_h * g.w * g.c + body, out + head);
      std::fill(out + head + body, out + run, T(0));
    }
    if (++o_w == g.ow) {
      o_w = 0;
      ++o_h;
    }
  }
}

// Where output j's window starts in the padded sample (pad_pixels: not split into phases), in elements:
// its first tap's pixel (dw_in_pixel). Tap t then lies dw_in_pixel(g, sp, 0, 0, t) pixels further on.
inline std::vector<int64_t> window_places(const Conv2dGeometry& g, const ShiftedPlanes& sp) {
  std::vector<int64_t> places(g.col_cols());
  for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
    for (int64_t o_w = 0; o_w < g.ow; ++o_w) places[o_h * g.ow + o_w] = dw_in_pixel(g, sp, o_h, o_w, 0) * g.c;
  }
  return places;
}

// The forward with the windows' rows of taps read in place instead of built: each sample padded once
// (not split into phases), segment t_h of a GEMM over all its output pixels is
//     A_th[j, (t_w, c)] = x_pad[(o_h·sH + t_h·dH)·Wp + o_w·sW, t_w·C + c]    (a run of kW·C values)
//     B_th[(t_w, c), f] = W[f, c, t_h, t_w]                                   (W in channels_last order)
// kH segments of kW·C steps, where the NHWC kernel's taps were kH·kW segments of C (3) steps each.
// With `planes`, x and y are NCHW (nchw_by_windows): each sample's pixels gathered while padding, and y
// computed a block of output pixels at a time into [pixels x F] in L2, then transposed into its planes.
template <typename T>
void conv_forward_row_segments(const T* x, const at::Tensor& w, const T* b, T* y, const Conv2dGeometry& g,
                               bool planes = false) {
  const ShiftedPlanes sp = shifted_planes(g);  // its padded plane hp x wp (pad_pixels)
  const int64_t run = g.kw * g.c, k = g.taps() * g.c, p = g.col_cols(), in_sample = g.h * g.w * g.c;
  const at::Tensor w_cl = w.contiguous(at::MemoryFormat::ChannelsLast);  // [F][kH][kW][C]
  T* storage = cpu::thread_scratch<T>(cpu::Scratch::kFilters, cpu::segments_b_size<T>(k, g.f));
  const cpu::SegmentsB<T> filters =
      cpu::prepare_segments_b<T>(g.kh, run, g.f, cpu::SegmentedView<T>{w_cl.const_data_ptr<T>(), run, 1, k}, storage);
  const std::vector<int64_t> rows = window_places(g, sp);
  cpu::GemmEpilogue<T> ep;
  ep.col_bias = b;
  if (planes) {
    // blocks of about 64 Ki outputs (256 KiB in float32, in L2; a block's run of each plane 4 KiB: with
    // 16 Ki the stem's forward took 27 % longer), a multiple of 24 pixels (the tiles' rows); every block of
    // every sample is an item, so that one image keeps all threads busy (a small layer: one)
    const int64_t block = std::max<int64_t>(24, (int64_t(1) << 16) / std::max<int64_t>(1, g.f) / 24 * 24);
    const int64_t blocks = (p + block - 1) / block, items = g.n * blocks;
    const bool small = g.n * p * g.f * k < kMinParallelMacs;
    at::parallel_for(0, items, small ? items : 1, [&](int64_t begin, int64_t end) {
      T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.hp * sp.wp * g.c);
      T* out = cpu::thread_scratch<T>(cpu::Scratch::kOut, block * g.f);
      std::vector<const T*> segments(g.kh);
      for (int64_t th = 0; th < g.kh; ++th) segments[th] = x_pad + dw_in_pixel(g, sp, 0, 0, th * g.kw) * g.c;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / blocks, j0 = item % blocks * block, j1 = std::min(p, j0 + block);
        if (item == begin || j0 == 0) pad_pixels_from_planes(x + n * in_sample, g, sp, x_pad);
        cpu::gemm_segments<T>(j1 - j0, segments.data(), run, filters, out, g.f, ep, rows.data() + j0);
        cpu::transpose_matrix(out, g.f, j1 - j0, g.f, y + n * g.f * p + j0, p);
      }
    });
    return;
  }
  const int64_t chunks = chunk_count(g);
  for_chunks(chunks, [&](int64_t cb, int64_t ce) {
    T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.hp * sp.wp * g.c);
    std::vector<const T*> segments(g.kh);
    for (int64_t th = 0; th < g.kh; ++th) segments[th] = x_pad + dw_in_pixel(g, sp, 0, 0, th * g.kw) * g.c;
    for (int64_t n = chunk_begin(cb, chunks, g.n); n < chunk_begin(ce, chunks, g.n); ++n) {
      pad_pixels(x + n * in_sample, g, sp, x_pad);
      cpu::gemm_segments<T>(p, segments.data(), run, filters, y + n * p * g.f, g.f, ep, rows.data());
    }
  });
}

// d_W on AVX-512 (float32) the same way, with neither operand copied: d_Wᵀ = Aᵀ · dY summed over each
// sample's outputs (cpu::gemm_gather_a), row (t_h, t_w, c) of Aᵀ starting at its tap's place in the padded
// sample and column j adding output j's window_places; dY's rows as they lie. A chunk of samples a
// thread, its sum in its own buffer, the buffers added in chunk order; then into dw ([F][kH][kW][C]).
// With `planes`, x, dY and dw are NCHW: each sample's x transposed into the padded pixels and its dY
// into [pixels x F] while in cache, dw written in NCHW's order.
inline void conv_weight_grad_row_segments(const float* dy, const float* x, float* dw, const Conv2dGeometry& g,
                                          bool planes = false) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t k = g.taps() * g.c, p = g.col_cols(), in_sample = g.h * g.w * g.c;
  const std::vector<int64_t> places = window_places(g, sp);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.n, at::get_num_threads()));
  const ChunkPartials<float> partial(chunks, k * g.f);
  for_chunks(chunks, [&](int64_t cb, int64_t ce) {
    float* x_pad = cpu::thread_scratch<float>(cpu::Scratch::kPadded, sp.hp * sp.wp * g.c);
    float* dy_t = planes ? cpu::thread_scratch<float>(cpu::Scratch::kGrad, p * g.f) : nullptr;  // [pixels x F]
    std::vector<const float*> a_row(k);  // row (t, c) of Aᵀ: tap t's place in x_pad, plus c
    for (int64_t t = 0; t < g.taps(); ++t) {
      for (int64_t c = 0; c < g.c; ++c) a_row[t * g.c + c] = x_pad + dw_in_pixel(g, sp, 0, 0, t) * g.c + c;
    }
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      float* sum = partial.of(chunk);
      const int64_t n0 = chunk_begin(chunk, chunks, g.n), n1 = chunk_begin(chunk + 1, chunks, g.n);  // n0 < n1
      for (int64_t n = n0; n < n1; ++n) {
        const float* dy_n = dy + n * p * g.f;
        if (planes) {
          pad_pixels_from_planes(x + n * in_sample, g, sp, x_pad);
          cpu::transpose_matrix(dy_n, p, g.f, p, dy_t, g.f);
          dy_n = dy_t;
        } else {
          pad_pixels(x + n * in_sample, g, sp, x_pad);
        }
        cpu::GemmEpilogue<float> ep;
        ep.accumulate = n > n0;
        cpu::gemm_gather_a(k, g.f, p, a_row.data(), places.data(), dy_n, g.f, sum, g.f, ep);
      }
    }
  });
  partial.sum_into(chunks, partial.of(0));
  weight_grad_from_transposed(partial.of(0), dw, g, planes);
}

// d_W = Σ dYᵀ · A into dw ([F][kH][kW][C]: W's shape in channels_last memory), from NHWC dy and x, where
// conv_weight_grad_row_segments does not run (other instruction sets, float64). The blocks are cut into
// one chunk per thread, each summed into its own buffer, then the buffers in chunk order (deterministic
// for a given thread count).
template <typename T>
void conv_weight_grad_windows(const T* dy, const T* x, T* dw, const Conv2dGeometry& g) {
  const int64_t k = g.taps() * g.c, p = g.col_cols(), block = window_rows_block(g);
  const int64_t blocks = (p + block - 1) / block, in_sample = g.h * g.w * g.c, items = g.n * blocks;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads()));
  const ChunkPartials<T> partial(chunks, g.f * k);
  if (items == 0) {  // no output pixels: nothing flows
    std::fill(dw, dw + g.f * k, T(0));
    return;
  }
  for_chunks(chunks, [&](int64_t cb, int64_t ce) {
    T* a = cpu::thread_scratch<T>(cpu::Scratch::kRows, block * k);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t first = chunk_begin(chunk, chunks, items);
      for (int64_t item = first; item < chunk_begin(chunk + 1, chunks, items); ++item) {
        const int64_t n = item / blocks, j0 = item % blocks * block, j1 = std::min(p, j0 + block);
        build_window_rows(x + n * in_sample, j0, j1, g, a);
        cpu::GemmEpilogue<T> ep;
        ep.accumulate = item > first;
        const T* dy_block = dy + (n * p + j0) * g.f;
        cpu::gemm<T>(g.f, k, j1 - j0, {dy_block, 1, g.f}, cpu::MatrixView<T>{a, k, 1}, partial.of(chunk), k, ep);
      }
    }
  });
  partial.sum_into(chunks, dw);
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
