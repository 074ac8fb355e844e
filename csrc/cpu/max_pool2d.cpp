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
//   NHWC (channels_last) the channels of a pixel are one block: the forward runs parallel over
//                       (n, output row), and the innermost loop is over c, contiguous and vectorisable,
//                       for every tap. The backward scatter-adds as NCHW's does, for a block of
//                       channels at once, one thread per (n, block).
//
// float16 and bfloat16 run the float32 loops on pieces widened into scratch (a plane, or the input rows
// of an output row), and their results are narrowed once (cpu/reduced_float.h).
//
// Either way each output is the same scan (pool::takes over the taps in row-major order) as the CUDA
// kernel's pool::scan_window, so the two backends give the same values and indices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
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

// All planes, in parallel; each task has its own row of index scratch. float16 and bfloat16 are scanned in
// float32 (exact: widening is, and each maximum is one of the inputs, so narrowing it back is too): each
// plane is widened into scratch and its maxima narrowed, so the plane loop is the float32 one.
template <int kStride, int kK, typename scalar_t, typename index_t>
void forward_nchw(const scalar_t* x, scalar_t* y, int64_t* ind, const MaxPool2dGeometry& g) {
  const AxisPlan rows = plan_axis(g.height, g.out_h, g.kh, g.sh, g.ph, g.dh);
  const AxisPlan cols = plan_axis(g.width, g.out_w, g.kw, g.sw, g.pw, g.dw);
  const int64_t in_plane = g.height * g.width, out_plane = g.out_h * g.out_w;
  at::parallel_for(0, g.planes(), grain_for(in_plane), [&](int64_t begin, int64_t end) {
    std::vector<index_t> arg(g.out_w);
    std::vector<float> wide(cpu::kNarrow<scalar_t> ? in_plane + out_plane : 0);  // the plane, then its maxima
    for (int64_t p = begin; p < end; ++p) {
      if constexpr (cpu::kNarrow<scalar_t>) {
        cpu::to_float(x + p * in_plane, in_plane, wide.data());
        forward_plane_nchw<kStride, kK>(wide.data(), &wide[in_plane], ind + p * out_plane, arg.data(), g, rows, cols);
        cpu::from_float(&wide[in_plane], out_plane, y + p * out_plane);
      } else {
        forward_plane_nchw<kStride, kK>(x + p * in_plane, y + p * out_plane, ind + p * out_plane, arg.data(), g, rows,
                                        cols);
      }
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
// One output pixel of a channels_last tensor: the same scan for all C channels at once (they share the
// taps, so a tap's index is one number). The pixel's existing taps come as a list in scan order: the
// pointer to each one's channels and its flat index.
//
// Any dtype: channels [c0, C), tap by tap, the running maxima in y and the indices in `arg` (scratch of C
// values of index_t, widened to int64 when stored), both in L1.
template <typename scalar_t, typename index_t>
CS231N_INLINE void scan_pixel(const scalar_t* const* tap, const index_t* tap_index, int64_t taps, index_t first,
                              int64_t c0, int64_t C, scalar_t* __restrict__ y, int64_t* __restrict__ ind,
                              index_t* __restrict__ arg) {
  for (int64_t c = c0; c < C; ++c) {
    y[c] = pool::scan_start<scalar_t>();
    arg[c] = first;
  }
  for (int64_t t = 0; t < taps; ++t) {
    const scalar_t* __restrict__ p = tap[t];
    const index_t i = tap_index[t];
    for (int64_t c = c0; c < C; ++c) {
      const bool take = pool::takes(p[c], y[c]);
      y[c] = take ? p[c] : y[c];
      arg[c] = take ? i : arg[c];
    }
  }
  for (int64_t c = c0; c < C; ++c) ind[c] = arg[c];
}

#if CS231N_X86
// float32 with int32 indices, in vector registers that hold the running maxima and indices across all the
// taps and are stored once: 4 vectors of channels at a time, then 1, then a masked (AVX-512) or scalar
// (AVX2) tail. The compare is pool::takes lane by lane: v > best (ordered), or v is NaN.
CS231N_AVX512 inline void take_avx512(__m512 v, int32_t index, __m512& best, __m512i& arg) {
  const __mmask16 take = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  best = _mm512_mask_mov_ps(best, take, v);
  arg = _mm512_mask_set1_epi32(arg, take, index);
}

CS231N_AVX512 inline void store_avx512(__m512 best, __m512i arg, __mmask16 m, float* y, int64_t* ind) {
  _mm512_mask_storeu_ps(y, m, best);
  _mm512_mask_storeu_epi64(ind, static_cast<__mmask8>(m), _mm512_cvtepi32_epi64(_mm512_castsi512_si256(arg)));
  _mm512_mask_storeu_epi64(ind + 8, static_cast<__mmask8>(m >> 8),
                           _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(arg, 1)));
}

CS231N_AVX512 inline void scan_pixel_avx512(const float* const* tap, const int32_t* tap_index, int64_t taps,
                                            int32_t first, int64_t C, float* y, int64_t* ind) {
  const __m512 start = _mm512_set1_ps(pool::scan_start<float>());
  const __m512i first_v = _mm512_set1_epi32(first);
  int64_t c = 0;
  for (; c + 64 <= C; c += 64) {
    __m512 best[4] = {start, start, start, start};
    __m512i arg[4] = {first_v, first_v, first_v, first_v};
    for (int64_t t = 0; t < taps; ++t) {
      for (int q = 0; q < 4; ++q) take_avx512(_mm512_loadu_ps(tap[t] + c + 16 * q), tap_index[t], best[q], arg[q]);
    }
    for (int q = 0; q < 4; ++q) store_avx512(best[q], arg[q], 0xffff, y + c + 16 * q, ind + c + 16 * q);
  }
  for (; c < C; c += 16) {
    const __mmask16 m = C - c >= 16 ? 0xffff : static_cast<__mmask16>((1u << (C - c)) - 1);
    __m512 best = start;
    __m512i arg = first_v;
    for (int64_t t = 0; t < taps; ++t) take_avx512(_mm512_maskz_loadu_ps(m, tap[t] + c), tap_index[t], best, arg);
    store_avx512(best, arg, m, y + c, ind + c);
  }
}

// AVX2 has no masks: the int32 indices ride in float registers (blendv moves bits, whatever they mean).
CS231N_AVX2 inline void take_avx2(__m256 v, __m256 index, __m256& best, __m256& arg) {
  const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  best = _mm256_blendv_ps(best, v, take);
  arg = _mm256_blendv_ps(arg, index, take);
}

CS231N_AVX2 inline void store_avx2(__m256 best, __m256 arg, float* y, int64_t* ind) {
  _mm256_storeu_ps(y, best);
  const __m256i a = _mm256_castps_si256(arg);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(ind), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(a)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(ind + 4), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a, 1)));
}

CS231N_AVX2 inline __m256 index_avx2(int32_t index) { return _mm256_castsi256_ps(_mm256_set1_epi32(index)); }

CS231N_AVX2 inline void scan_pixel_avx2(const float* const* tap, const int32_t* tap_index, int64_t taps, int32_t first,
                                        int64_t C, float* y, int64_t* ind, int32_t* arg_scratch) {
  const __m256 start = _mm256_set1_ps(pool::scan_start<float>()), first_v = index_avx2(first);
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    __m256 best[4] = {start, start, start, start}, arg[4] = {first_v, first_v, first_v, first_v};
    for (int64_t t = 0; t < taps; ++t) {
      const __m256 index = index_avx2(tap_index[t]);
      for (int q = 0; q < 4; ++q) take_avx2(_mm256_loadu_ps(tap[t] + c + 8 * q), index, best[q], arg[q]);
    }
    for (int q = 0; q < 4; ++q) store_avx2(best[q], arg[q], y + c + 8 * q, ind + c + 8 * q);
  }
  for (; c + 8 <= C; c += 8) {
    __m256 best = start, arg = first_v;
    for (int64_t t = 0; t < taps; ++t) take_avx2(_mm256_loadu_ps(tap[t] + c), index_avx2(tap_index[t]), best, arg);
    store_avx2(best, arg, y + c, ind + c);
  }
  if (c < C) scan_pixel(tap, tap_index, taps, first, c, C, y, ind, arg_scratch);
}
#endif

// The input the next output row reads first, [data, data + size): prefetched while this row runs.
struct Ahead {
  const void* data = nullptr;
  int64_t size = 0;  // bytes
};

// Output row oh of one sample into yrow and irow: `in_rows[th]` is the input row (W pixels of C channels)
// that tap row th meets, for the existing ones (pool::valid_taps). `tap` and `tap_index` hold kh * kw
// taps, `arg` C indices. The next row's new input (`ahead`) is prefetched a slice per output pixel: the
// scan walks its rows side by side, and waited on memory there (the channels_last forward at 21 GB/s).
template <cpu::Isa kIsa, typename scalar_t, typename index_t>
CS231N_INLINE void forward_row_nhwc_body(const scalar_t* const* in_rows, scalar_t* yrow, int64_t* irow,
                                         const scalar_t** tap, index_t* tap_index, index_t* arg, int64_t oh,
                                         const MaxPool2dGeometry& g, Ahead ahead) {
  const int64_t C = g.channels, W = g.width;
  int64_t th0, th1;
  pool::valid_taps(oh, g.height, g.kh, g.sh, g.ph, g.dh, &th0, &th1);
  const int64_t h0 = oh * g.sh - g.ph;
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    for (int64_t b = ow * ahead.size / g.out_w; b < (ow + 1) * ahead.size / g.out_w; b += 64) {
      __builtin_prefetch(static_cast<const char*>(ahead.data) + b);
    }
    int64_t tw0, tw1;
    pool::valid_taps(ow, W, g.kw, g.sw, g.pw, g.dw, &tw0, &tw1);
    const int64_t w0 = ow * g.sw - g.pw;
    int64_t taps = 0;
    for (int64_t th = th0; th < th1; ++th) {
      for (int64_t tw = tw0; tw < tw1; ++tw) {
        const int64_t iw = w0 + tw * g.dw;
        tap[taps] = in_rows[th] + iw * C;
        tap_index[taps] = static_cast<index_t>((h0 + th * g.dh) * W + iw);
        ++taps;
      }
    }
    // The first existing tap's index, where pool::scan_window starts: torch's index for an all -inf window.
    const index_t first = static_cast<index_t>((h0 + th0 * g.dh) * W + (w0 + tw0 * g.dw));
    scalar_t* y = yrow + ow * C;
    int64_t* ind = irow + ow * C;
    constexpr bool kFloat32 = std::is_same_v<scalar_t, float> && std::is_same_v<index_t, int32_t>;
#if CS231N_X86
    if constexpr (kFloat32 && kIsa == cpu::Isa::kAvx512) {
      scan_pixel_avx512(tap, tap_index, taps, first, C, y, ind);
      continue;
    } else if constexpr (kFloat32 && kIsa == cpu::Isa::kAvx2) {
      scan_pixel_avx2(tap, tap_index, taps, first, C, y, ind, arg);
      continue;
    }
#endif
    scan_pixel(tap, tap_index, taps, first, int64_t{0}, C, y, ind, arg);
  }
}

// The row in the baseline ISA, for AVX2 and for AVX-512, chosen at run time.
template <typename scalar_t, typename index_t>
void forward_row_nhwc_baseline(const scalar_t* const* in_rows, scalar_t* yrow, int64_t* irow, const scalar_t** tap,
                               index_t* tap_index, index_t* arg, int64_t oh, const MaxPool2dGeometry& g, Ahead ahead) {
  forward_row_nhwc_body<cpu::Isa::kBaseline>(in_rows, yrow, irow, tap, tap_index, arg, oh, g, ahead);
}

template <typename scalar_t, typename index_t>
CS231N_AVX2 void forward_row_nhwc_avx2(const scalar_t* const* in_rows, scalar_t* yrow, int64_t* irow,
                                       const scalar_t** tap, index_t* tap_index, index_t* arg, int64_t oh,
                                       const MaxPool2dGeometry& g, Ahead ahead) {
  forward_row_nhwc_body<cpu::Isa::kAvx2>(in_rows, yrow, irow, tap, tap_index, arg, oh, g, ahead);
}

template <typename scalar_t, typename index_t>
CS231N_AVX512 void forward_row_nhwc_avx512(const scalar_t* const* in_rows, scalar_t* yrow, int64_t* irow,
                                           const scalar_t** tap, index_t* tap_index, index_t* arg, int64_t oh,
                                           const MaxPool2dGeometry& g, Ahead ahead) {
  forward_row_nhwc_body<cpu::Isa::kAvx512>(in_rows, yrow, irow, tap, tap_index, arg, oh, g, ahead);
}

template <typename scalar_t, typename index_t>
void forward_row_nhwc(const scalar_t* const* in_rows, scalar_t* yrow, int64_t* irow, const scalar_t** tap,
                      index_t* tap_index, index_t* arg, int64_t oh, const MaxPool2dGeometry& g, Ahead ahead) {
  switch (cpu::cpu_isa()) {
    case cpu::Isa::kAvx512:
      return forward_row_nhwc_avx512(in_rows, yrow, irow, tap, tap_index, arg, oh, g, ahead);
    case cpu::Isa::kAvx2:
      return forward_row_nhwc_avx2(in_rows, yrow, irow, tap, tap_index, arg, oh, g, ahead);
    default:
      return forward_row_nhwc_baseline(in_rows, yrow, irow, tap, tap_index, arg, oh, g, ahead);
  }
}

// All output rows (n, oh), in parallel. float16 and bfloat16 are scanned in float32 (exact: widening is,
// and each maximum is one of the inputs, so narrowing it back is too): each output row widens the input
// rows it meets into scratch and narrows its maxima, so the row loop is the float32 one.
template <typename scalar_t, typename index_t>
void forward_nhwc(const scalar_t* x, scalar_t* y, int64_t* ind, const MaxPool2dGeometry& g) {
  using acc_t = cpu::opmath_t<scalar_t>;
  const int64_t C = g.channels, row = g.width * C, out_row = g.out_w * C;
  at::parallel_for(0, g.batch * g.out_h, grain_for(out_row * g.kh * g.kw), [&](int64_t begin, int64_t end) {
    std::vector<const acc_t*> in_rows(g.kh), tap(g.kh * g.kw);
    std::vector<index_t> tap_index(g.kh * g.kw), arg(C);
    std::vector<acc_t> wide(cpu::kNarrow<scalar_t> ? g.kh * row + out_row : 0);  // kh input rows, the output row
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.out_h, oh = r % g.out_h;
      int64_t th0, th1;
      pool::valid_taps(oh, g.height, g.kh, g.sh, g.ph, g.dh, &th0, &th1);
      for (int64_t th = th0; th < th1; ++th) {
        const scalar_t* in = x + (n * g.height + oh * g.sh - g.ph + th * g.dh) * row;
        if constexpr (cpu::kNarrow<scalar_t>) {
          cpu::to_float(in, row, &wide[th * row]);
          in_rows[th] = &wide[th * row];
        } else {
          in_rows[th] = in;
        }
      }
      acc_t* out;
      if constexpr (cpu::kNarrow<scalar_t>) {
        out = &wide[g.kh * row];
      } else {
        out = y + r * out_row;
      }
      // The input rows the next output row adds to this one's window (the next sample's first rows are
      // left to the prefetchers).
      Ahead ahead;
      const int64_t last = oh * g.sh - g.ph + (g.kh - 1) * g.dh, next = std::min(last + g.sh, g.height - 1);
      if (oh + 1 < g.out_h && next > last) {
        ahead.data = x + (n * g.height + std::max<int64_t>(last + 1, 0)) * row;
        ahead.size = (next - std::max<int64_t>(last, -1)) * row * static_cast<int64_t>(sizeof(scalar_t));
      }
      forward_row_nhwc(in_rows.data(), out, ind + r * out_row, tap.data(), tap_index.data(), arg.data(), oh, g, ahead);
      if constexpr (cpu::kNarrow<scalar_t>) cpu::from_float(out, out_row, y + r * out_row);
    }
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

// All planes, in parallel. float16 and bfloat16 sum in float32, rounded once (cpu/reduced_float.h): each
// plane's dy is widened into scratch and its sums narrowed.
template <typename scalar_t>
bool backward_nchw(const scalar_t* dy, const int64_t* ind, scalar_t* dx, const MaxPool2dGeometry& g) {
  const int64_t in_plane = g.height * g.width, out_plane = g.out_h * g.out_w;
  std::atomic<bool> ok{true};
  at::parallel_for(0, g.planes(), grain_for(in_plane), [&](int64_t begin, int64_t end) {
    std::vector<float> wide(cpu::kNarrow<scalar_t> ? in_plane + out_plane : 0);  // dx's sums, then dy
    for (int64_t p = begin; p < end; ++p) {
      bool plane_ok;
      if constexpr (cpu::kNarrow<scalar_t>) {
        cpu::to_float(dy + p * out_plane, out_plane, &wide[in_plane]);
        plane_ok = backward_plane_nchw(&wide[in_plane], ind + p * out_plane, wide.data(), in_plane, out_plane);
        cpu::from_float(wide.data(), in_plane, dx + p * in_plane);
      } else {
        plane_ok = backward_plane_nchw(dy + p * out_plane, ind + p * out_plane, dx + p * in_plane, in_plane, out_plane);
      }
      if (!plane_ok) ok = false;
    }
  });
  return ok.load();
}

// ------------------------------------------------------------------------------------ backward, NHWC
// Channels [c0, c0 + len) of sample n: the NCHW scatter for each channel, all of them in one pass over the
// outputs. `acc` holds the sums, `pitch` values apart from one input pixel to the next; it is zeroed, then
// every output o in order sends dy[o, c] to acc[index[o, c]][c], so each gradient sums in output order, as
// torch's does. An index outside the plane is reported instead of written through. A narrow dy is widened
// one output at a time into `wide` (len values).
template <typename scalar_t, typename acc_t>
bool backward_channels_nhwc(const scalar_t* dy, const int64_t* ind, acc_t* acc, int64_t pitch, int64_t n, int64_t c0,
                            int64_t len, acc_t* wide, const MaxPool2dGeometry& g) {
  const int64_t C = g.channels, in_plane = g.height * g.width, out_plane = g.out_h * g.out_w;
  for (int64_t i = 0; i < in_plane; ++i) {
    for (int64_t j = 0; j < len; ++j) acc[i * pitch + j] = acc_t(0);
  }
  bool ok = true;
  for (int64_t o = n * out_plane; o < (n + 1) * out_plane; ++o) {
    const int64_t* ip = ind + o * C + c0;
    const acc_t* d;
    if constexpr (cpu::kNarrow<scalar_t>) {
      cpu::to_float(dy + o * C + c0, len, wide);
      d = wide;
    } else {
      d = dy + o * C + c0;
    }
    for (int64_t j = 0; j < len; ++j) {
      const int64_t i = ip[j];
      if (i < 0 || i >= in_plane) {
        ok = false;
        continue;
      }
      acc[i * pitch + j] += d[j];
    }
  }
  return ok;
}

// Every (sample, block of channels), in parallel: the blocks write disjoint gradients. A block is all of a
// sample's channels (its gradient is then one dense run, zeroed and scattered into with the best locality:
// blocks of 16 channels were 2-5x slower at (32, 64, 56, 56)) unless there are fewer samples than threads;
// then the channels are split, in blocks of at least 16, until every thread has one. float16 and bfloat16 sum
// into float32 scratch, narrowed once at the end.
template <typename scalar_t>
bool backward_nhwc(const scalar_t* dy, const int64_t* ind, scalar_t* dx, const MaxPool2dGeometry& g) {
  using acc_t = cpu::opmath_t<scalar_t>;
  const int64_t C = g.channels, in_plane = g.height * g.width;
  const int64_t split = std::clamp<int64_t>(at::get_num_threads() / g.batch, 1, std::max<int64_t>(1, C / 16));
  const int64_t block = (C + split - 1) / split, blocks = (C + block - 1) / block;
  std::atomic<bool> ok{true};
  at::parallel_for(0, g.batch * blocks, grain_for(in_plane * block), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(cpu::kNarrow<scalar_t> ? (in_plane + 1) * block : 0);  // the sums, then one dy
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = task % blocks * block, len = std::min(block, C - c0);
      scalar_t* dxn = dx + n * in_plane * C + c0;
      bool block_ok;
      if constexpr (cpu::kNarrow<scalar_t>) {
        block_ok = backward_channels_nhwc(dy, ind, sums.data(), len, n, c0, len, &sums[in_plane * block], g);
        for (int64_t i = 0; i < in_plane; ++i) cpu::from_float(&sums[i * len], len, dxn + i * C);
      } else {
        block_ok = backward_channels_nhwc(dy, ind, dxn, C, n, c0, len, static_cast<acc_t*>(nullptr), g);
      }
      if (!block_ok) ok = false;
    }
  });
  return ok.load();
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPool2dGeometry g =
      check_max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode);
  at::Tensor grad_input = at::empty(g.input_sizes(), input.options().memory_format(g.format));
  if (grad_input.numel() == 0) return grad_input;
  // grad_output and indices in the output's layout (autograd may hand over dy in another one).
  const at::Tensor dy = grad_output.contiguous(g.format);
  const at::Tensor ind = indices.contiguous(g.format);
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "max_pool2d_backward_cpu", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const int64_t* ip = ind.const_data_ptr<int64_t>();
    scalar_t* dxp = grad_input.mutable_data_ptr<scalar_t>();
    ok = g.format == at::MemoryFormat::ChannelsLast ? backward_nhwc(dyp, ip, dxp, g) : backward_nchw(dyp, ip, dxp, g);
  });
  TORCH_CHECK(ok, "max_pool2d_backward: expected indices in [0, H*W) = [0, ", g.height * g.width,
              ") (flat positions within a plane, as the forward returns them), but found one outside");
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CPU, m) {
  m.impl("max_pool2d_forward", &max_pool2d_forward_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
}

}  // namespace torch_cs231n
