// The CPU convolution, grouped layers of few channels a group (ResNeXt's 32 groups of 4 and 8): each
// group's channels rotated into depthwise taps. Part of the CPU convolution (cpu/conv2d.cpp routes each
// layer; docs/conv2d.md derives it).
//
// A group of k input channels and k filters is a k x k product per pixel and tap, too narrow for the
// GEMM's tiles (a 4-filter group fills a quarter of a 16-lane vector) and for its packing. Rotating the
// group's channels turns it into k depthwise convolutions: with o an output channel, j = o mod k its
// place in its group and base(o) = o - j the group's first channel,
//     x_r[q, o] = x[q, base(o) + (j + r) mod k]          W_r[o, t] = W[o, (j + r) mod k, t]
//     y[p, o]   = b[o] + Σ_t Σ_{r < k} W_r[o, t] · x_r[p·s + t·d, o]
// since (j + r) mod k runs over the group's k channels as r does. Each (t, r) is then a tap of a
// depthwise layer over an input of k·C channels a pixel: every vector lane useful, blocks of outputs
// keeping their sums in registers over the taps as the depthwise kernels do (conv2d_depthwise.h). The
// rotations are vector shuffles within groups of k lanes, so k divides the vector's lanes and C is a
// whole number of vectors. Likewise
//     d_W_r[o, t] = Σ_p dY[p, o] · x_r[p·s + t·d, o],   then d_W[o, (j + r) mod k, t] = d_W_r[o, t]
// and d_x (stride 1) is the same form on dY: the transposed convolution, grouped alike (cpu/conv2d_gemm.h's
// transposed_filters).
//
// Each sample is padded and rotated into x_e [Hp][Wp][C/L][k][L] (L: a vector's lanes; a pixel's vector of
// channels in its k rotations side by side) a row at a time, as the output rows need them (RotatedRing,
// below); channels_last x is read as it lies, an NCHW sample's rows transposed as they are taken. The
// filters likewise: W_e [C/L][taps][k][L]. One vector of
// channels of a block of outputs then reads k·L contiguous values a pixel and tap, and its weights in
// sequence; with x_e as [k][C] a pixel, the block's loads fell on k·3·10 lines apart for each vector and
// waited on L2 (7% of the FMA peak).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/conv2d.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/conv2d_depthwise.h"
#include "cpu/conv2d_shifted.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"

namespace torch_cs231n {
namespace conv2d_cpu {

// Groups of 2, 4 or 8 channels and as many filters, the channels whole vectors (of the dtype's lanes).
// element_size: the dtype's bytes (64-byte vectors).
inline bool grouped_by_rotations(const Conv2dGeometry& g, int64_t element_size) {
  const int64_t lanes = 64 / element_size, k = g.c_per_group();
  return g.groups > 1 && k >= 2 && k <= 8 && lanes % k == 0 && g.f_per_group() == k && g.c % lanes == 0;
}

// The taps (t, r) of the rotated layer, for output row o_h (set): at[t·k + r] = where tap t of rotation r
// lies from the row's first output's first tap, in elements of the ring of x_e rows (below).
struct RotatedTaps {
  const Conv2dGeometry& g;
  int64_t lanes, rows;  // the vectors' lanes; the ring's rows (those one output row's taps span)
  std::vector<int64_t> at;
  RotatedTaps(const Conv2dGeometry& geometry, int64_t vector_lanes)
      : g(geometry), lanes(vector_lanes), rows((g.kh - 1) * g.dh + 1), at(g.taps() * g.c_per_group()) {}
  int n() const { return static_cast<int>(at.size()); }
  // Elements from one x_e pixel to the next: k·C and a vector unused, so that a block's pixels (2 or 8
  // KB apart in ResNeXt, where L1's sets repeat every 4 KB) do not all fall in the same few sets.
  static int64_t pixel(const Conv2dGeometry& g, int64_t lanes) { return g.c_per_group() * g.c + lanes; }
  int64_t pixel() const { return pixel(g, lanes); }
  // x_e's padded row i lies in the ring's row i mod rows, of Wp pixels.
  void set(int64_t o_h, int64_t wp) {
    const int64_t k = g.c_per_group();
    for (int64_t t = 0; t < g.taps(); ++t) {
      const int64_t i = o_h * g.sh + (t / g.kw) * g.dh;
      for (int64_t r = 0; r < k; ++r) at[t * k + r] = ((i % rows) * wp + (t % g.kw) * g.dw) * pixel() + r * lanes;
    }
  }
};

// Row i of x_e [Hp][Wp][C/L][k][L] (the sample padded, each pixel's channels in their k rotations) into
// `dst`, from src_row (input row i - pH as [W][C]; null in the padding's rows): zeros in the padding,
// pixel after pixel.
template <typename T>
CS231N_INLINE void pad_rotated_row(const T* src_row, const Conv2dGeometry& g, int64_t wp, T* dst) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> Lane;  // __builtin_shuffle's mask: lanes of T's size
  typedef Lane LaneMask __attribute__((vector_size(64)));
  const int64_t k = g.c_per_group(), C = g.c, kc = RotatedTaps::pixel(g, ChannelVectors<T>::kLanes);
  if (!src_row) {
    std::fill(dst, dst + wp * kc, T(0));
    return;
  }
  LaneMask mask[8];  // mask[r][l] = the lane rotation r puts into lane l: l - l mod k + (l mod k + r) mod k
  for (int64_t r = 0; r < k; ++r) {
    for (int l = 0; l < V::kLanes; ++l) mask[r][l] = static_cast<Lane>(l - l % k + (l % k + r) % k);
  }
  std::fill(dst, dst + g.pw * kc, T(0));
  for (int64_t j = 0; j < g.w; ++j) {
    const T* src = src_row + j * C;
    T* out = dst + (g.pw + j) * kc;
    for (int64_t c = 0; c < C; c += V::kLanes) {
      const Vec v = V::at(src + c);
      V::at(out + c * k) = v;
      for (int64_t r = 1; r < k; ++r) V::at(out + c * k + r * V::kLanes) = __builtin_shuffle(v, mask[r]);
    }
  }
  std::fill(dst + (g.pw + g.w) * kc, dst + wp * kc, T(0));
}

// x_e is built a row at a time into a ring of the rows one output row's taps span (padded row i in the
// ring's row i mod rows), each row when an output row first needs it: the whole of it is k times the
// sample (27 MB for ResNeXt's (256, 56, 56), k = 8), and built whole it went to memory and back (8 times
// oneDNN's time); the ring stays in L2 (3 rows of 475 KB there). g is the ring's input (H x W pixels of
// C channels, padded by pH and pW, rows Wp pixels wide). An NCHW sample's rows are transposed to [W][C]
// first, into `row_t` (null for NHWC samples).
template <typename T>
struct RotatedRing {
  const Conv2dGeometry& g;
  int64_t wp;
  T *ring, *row_t;
  std::vector<int64_t> held;  // the x_e row each ring row holds (-1: none yet)
  RotatedRing(const Conv2dGeometry& input, int64_t width, int64_t rows, T* storage, T* transposed_row)
      : g(input), wp(width), ring(storage), row_t(transposed_row), held(rows, -1) {}
  static int64_t size(const Conv2dGeometry& g, int64_t width, int64_t rows) {
    return rows * width * RotatedTaps::pixel(g, ChannelVectors<T>::kLanes);
  }
  // Padded row i of sample x, in the ring.
  CS231N_INLINE void hold(const T* x, int64_t i) {
    const int64_t slot = i % static_cast<int64_t>(held.size());
    if (held[slot] == i) return;
    const int64_t row = i - g.ph;  // of the input
    const T* src_row = nullptr;
    if (row >= 0 && row < g.h && row_t) {  // x[:, row, :] is [C][W], W apart in planes H·W apart
      cpu::transpose_matrix(x + row * g.w, g.h * g.w, g.c, g.w, row_t, g.c);
      src_row = row_t;
    } else if (row >= 0 && row < g.h) {
      src_row = x + row * g.w * g.c;
    }
    pad_rotated_row(src_row, g, wp, ring + slot * wp * RotatedTaps::pixel(g, ChannelVectors<T>::kLanes));
    held[slot] = i;
  }
};

// P outputs side by side (`first` = the first one's first tap in the ring, `step` apart; y_step apart in
// y), every vector of channels c: y[p, c] = b[c] + Σ_{(t, r)} W_e[c][t, r] · x_e[first + p·step + at[(t, r)]][c].
template <int P, typename T>
CS231N_INLINE void rotated_outputs(const T* first, int64_t step, const T* w_e, const int64_t* at, int n, const T* b,
                                   T* y, int64_t y_step, int64_t C, int64_t k) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  for (int64_t c = 0; c < C; c += V::kLanes) {
    const T* x_c = first + c * k;  // the vector's k rotations, pixel after pixel
    const T* w_c = w_e + c * n;    // its n weight vectors, in sequence
    Vec acc[P];
    const Vec init = b ? V::at(b + c) : Vec{};
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) acc[p] = init;
    for (int j = 0; j < n; ++j) {
      const Vec w = V::at(w_c + j * V::kLanes);
      const T* src = x_c + at[j];
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) acc[p] += w * V::at(src + p * step);
    }
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) V::at(y + p * y_step + c) = acc[p];
  }
}

// `count` outputs of a row, `step` apart from `first` in the ring and y_step apart from y: blocks of 8, 4
// and 1.
template <typename T>
CS231N_INLINE void rotated_row(const T* first, int64_t step, const T* w_e, const int64_t* at, int n, const T* b, T* y,
                               int64_t y_step, int64_t count, int64_t C, int64_t k) {
  int64_t o = 0;
  for (; o + 8 <= count; o += 8)
    rotated_outputs<8>(first + o * step, step, w_e, at, n, b, y + o * y_step, y_step, C, k);
  for (; o + 4 <= count; o += 4)
    rotated_outputs<4>(first + o * step, step, w_e, at, n, b, y + o * y_step, y_step, C, k);
  for (; o < count; ++o) rotated_outputs<1>(first + o * step, step, w_e, at, n, b, y + o * y_step, y_step, C, k);
}

// The same over P outputs for d_W: dw_e[c][t, r] += Σ_p dY[p, c] · x_e[first + p·step + at[(t, r)]][c], the
// P vectors of dY loaded once for all the taps.
template <int P, typename T>
CS231N_INLINE void rotated_weight_grad_outputs(const T* first, int64_t step, const T* dy, const int64_t* at, int n,
                                               T* dw_e, int64_t C, int64_t k) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  for (int64_t c = 0; c < C; c += V::kLanes) {
    const T* x_c = first + c * k;
    T* dw_c = dw_e + c * n;
    Vec d[P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) d[p] = V::at(dy + p * C + c);
    for (int j = 0; j < n; ++j) {
      const T* src = x_c + at[j];
      Vec sum = d[0] * V::at(src);
#pragma GCC unroll 8
      for (int p = 1; p < P; ++p) sum += d[p] * V::at(src + p * step);
      V::at(dw_c + j * V::kLanes) += sum;
    }
  }
}

// Walks one sample's output rows [r0, r1): each row's input rows into the ring, the taps' places set, then
// row(o_h, step, at, n) with the ring's step between outputs and the taps' n offsets `at`.
template <typename T, typename Row>
CS231N_INLINE void rotated_rows(const T* x, int64_t r0, int64_t r1, RotatedTaps& taps, const Conv2dGeometry& g,
                                const ShiftedPlanes& sp, T* ring, T* row_t, Row&& row) {
  RotatedRing<T> rows(g, sp.wp, taps.rows, ring, row_t);
  const int64_t step = g.sw * taps.pixel();
  for (int64_t o_h = r0; o_h < r1; ++o_h) {
    for (int64_t t_h = 0; t_h < g.kh; ++t_h) rows.hold(x, o_h * g.sh + t_h * g.dh);
    taps.set(o_h, sp.wp);
    row(o_h, step, taps.at.data(), taps.n());
  }
}

// Output rows [r0, r1) of one sample's y ([oH·oW][F]; y points at row r0): per row, blocks of 8, 4 and 1
// outputs.
template <typename T>
CS231N_INLINE void rotated_forward_sample(const T* x, int64_t r0, int64_t r1, const T* w_e, RotatedTaps& taps,
                                          const T* b, T* y, const Conv2dGeometry& g, const ShiftedPlanes& sp, T* ring,
                                          T* row_t) {
  const int64_t C = g.c, k = g.c_per_group();
  rotated_rows(x, r0, r1, taps, g, sp, ring, row_t, [&](int64_t o_h, int64_t step, const int64_t* at, int n) {
    rotated_row(ring, step, w_e, at, n, b, y + (o_h - r0) * g.ow * C, C, g.ow, C, k);
  });
}

// One sample's d_W over its output rows [r0, r1) (dY as [oH·oW][F]), added into dw_e [C/L][taps][k][L].
template <typename T>
CS231N_INLINE void rotated_weight_grad_sample(const T* dy, const T* x, int64_t r0, int64_t r1, RotatedTaps& taps,
                                              T* dw_e, const Conv2dGeometry& g, const ShiftedPlanes& sp, T* ring,
                                              T* row_t) {
  const int64_t C = g.c, k = g.c_per_group();
  rotated_rows(x, r0, r1, taps, g, sp, ring, row_t, [&](int64_t o_h, int64_t step, const int64_t* at, int n) {
    const T* d = dy + o_h * g.ow * C;
    int64_t o = 0;
    for (; o + 8 <= g.ow; o += 8) rotated_weight_grad_outputs<8>(ring + o * step, step, d + o * C, at, n, dw_e, C, k);
    for (; o + 4 <= g.ow; o += 4) rotated_weight_grad_outputs<4>(ring + o * step, step, d + o * C, at, n, dw_e, C, k);
    for (; o < g.ow; ++o) rotated_weight_grad_outputs<1>(ring + o * step, step, d + o * C, at, n, dw_e, C, k);
  });
}

// ------------------------------------------------------------------ d_x of strided layers by phases
// d_x[i, c] = Σ_{f in c's group} Σ_t W[f, c mod k, t] · dY[o, f] over the taps t and outputs o with
// o·s = i + p - t·d (per axis). Along an axis the input indices i = a + s·m of phase a (0 <= a < s) take
// the taps with (a + p - t·d) mod s = 0, at o = m + off(t), off(t) = (a + p - t·d) / s: each phase is a
// stride-1 correlation of dY with its own taps, and all of them together compute each d_x pixel once (the
// forward's count of products). Rotated as the forward, with dY as the input:
//     d_x[a + s·m, c] = Σ_{t of the phase} Σ_r V_r[c, t] · dY_r[m + off(t), c],
//     dY_r[o, c] = dY[o, base(c) + (c mod k + r) mod k],   V_r[c, t] = W[base(c) + (c mod k + r) mod k, c mod k, t]
// dY is padded by P = ceil((kH - 1)·dH / sH) + 1 rows (and columns alike), enough for every off(t).
// (conv2d_shifted.h's input_phases covers dilation 1 only, each phase a transposed convolution of its own
// padding; a dilated layer's taps fall into the phases unevenly, so here each phase lists its taps and their
// offsets into one padded dY.)
struct InputGradPhases {
  struct Phase {
    int64_t a_h, a_w, outputs_h, outputs_w;   // its first input row and column; how many of each
    std::vector<int64_t> taps, off_h, off_w;  // its taps (t_h·kW + t_w), and where each reads in padded dY
  };
  Conv2dGeometry dy;                        // dY as the ring's input: oH x oW pixels of F channels, padded by P
  int64_t wp = 0, rows = 0, min_off_h = 0;  // the ring's width and rows; the least row offset
  std::vector<Phase> phases;

  explicit InputGradPhases(const Conv2dGeometry& g) : dy(g) {
    dy.h = g.oh, dy.w = g.ow, dy.c = g.f, dy.f = g.c;
    dy.ph = (g.kh - 1) * g.dh / g.sh + 2, dy.pw = (g.kw - 1) * g.dw / g.sw + 2;
    int64_t max_off_h = INT64_MIN, max_col = dy.pw + g.ow;
    min_off_h = INT64_MAX;
    for (int64_t a_h = 0; a_h < std::min(g.sh, g.h); ++a_h) {
      for (int64_t a_w = 0; a_w < std::min(g.sw, g.w); ++a_w) {
        Phase q{a_h, a_w, (g.h - a_h + g.sh - 1) / g.sh, (g.w - a_w + g.sw - 1) / g.sw, {}, {}, {}};
        for (int64_t t = 0; t < g.taps(); ++t) {
          const int64_t rh = a_h + g.ph - (t / g.kw) * g.dh, rw = a_w + g.pw - (t % g.kw) * g.dw;
          if (floor_mod(rh, g.sh) != 0 || floor_mod(rw, g.sw) != 0) continue;
          q.taps.push_back(t);
          q.off_h.push_back(rh / g.sh + dy.ph);  // exact divisions
          q.off_w.push_back(rw / g.sw + dy.pw);
          min_off_h = std::min(min_off_h, q.off_h.back());
          max_off_h = std::max(max_off_h, q.off_h.back());
          max_col = std::max(max_col, q.outputs_w + q.off_w.back());
        }
        phases.push_back(std::move(q));
      }
    }
    if (max_off_h == INT64_MIN) min_off_h = max_off_h = 0;  // no phase has a tap: d_x is zero
    rows = max_off_h - min_off_h + 1;
    wp = max_col;
  }
  static int64_t floor_mod(int64_t a, int64_t b) { return ((a % b) + b) % b; }
  // The rows m of the phases' outputs: those of the first phase, which has the most.
  static int64_t rows_m(const Conv2dGeometry& g) { return (g.h + g.sh - 1) / g.sh; }
};

// One NHWC sample's d_x ([H·W][C]) from its dY ([oH·oW][F]): output rows m in [m0, m1) (InputGradPhases::rows_m
// counts them) of every phase in turn, the ring holding the dY rows that row m of any phase reads.
template <typename T>
CS231N_INLINE void rotated_input_grad_sample(const T* dy, int64_t m0, int64_t m1,
                                             const std::vector<std::vector<T>>& w_e, const InputGradPhases& ph, T* dx,
                                             const Conv2dGeometry& g, T* ring) {
  RotatedRing<T> rows(ph.dy, ph.wp, ph.rows, ring, /*transposed_row=*/nullptr);
  const int64_t k = g.c_per_group(), C = g.c, lanes = ChannelVectors<T>::kLanes;
  const int64_t pixel = RotatedTaps::pixel(ph.dy, lanes);
  std::vector<int64_t> at;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t i = m + ph.min_off_h; i < m + ph.min_off_h + ph.rows; ++i) rows.hold(dy, i);
    for (size_t p = 0; p < ph.phases.size(); ++p) {
      const InputGradPhases::Phase& q = ph.phases[p];
      if (m >= q.outputs_h) continue;
      at.clear();
      for (size_t j = 0; j < q.taps.size(); ++j) {
        const int64_t slot = (m + q.off_h[j]) % ph.rows;
        for (int64_t r = 0; r < k; ++r) at.push_back((slot * ph.wp + q.off_w[j]) * pixel + r * lanes);
      }
      T* out = dx + ((q.a_h + m * g.sh) * g.w + q.a_w) * C;
      rotated_row(ring, pixel, w_e[p].data(), at.data(), static_cast<int>(at.size()), static_cast<const T*>(nullptr),
                  out, g.sw * C, q.outputs_w, C, k);
    }
  }
}

// The three loops compiled for each instruction set (their bodies inline into each).
#define CS231N_ROTATED_KERNELS(SUFFIX, ATTR)                                                                          \
  template <typename T>                                                                                               \
  ATTR void rotated_forward_##SUFFIX(const T* x, int64_t r0, int64_t r1, const T* w_e, RotatedTaps& taps, const T* b, \
                                     T* y, const Conv2dGeometry& g, const ShiftedPlanes& sp, T* ring, T* row_t) {     \
    rotated_forward_sample(x, r0, r1, w_e, taps, b, y, g, sp, ring, row_t);                                           \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  ATTR void rotated_weight_grad_##SUFFIX(const T* dy, const T* x, int64_t r0, int64_t r1, RotatedTaps& taps, T* dw_e, \
                                         const Conv2dGeometry& g, const ShiftedPlanes& sp, T* ring, T* row_t) {       \
    rotated_weight_grad_sample(dy, x, r0, r1, taps, dw_e, g, sp, ring, row_t);                                        \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  ATTR void rotated_input_grad_##SUFFIX(const T* dy, int64_t m0, int64_t m1, const std::vector<std::vector<T>>& w_e,  \
                                        const InputGradPhases& ph, T* dx, const Conv2dGeometry& g, T* ring) {         \
    rotated_input_grad_sample(dy, m0, m1, w_e, ph, dx, g, ring);                                                      \
  }
CS231N_ROTATED_KERNELS(baseline, )
CS231N_ROTATED_KERNELS(avx2, CS231N_AVX2)
CS231N_ROTATED_KERNELS(avx512, CS231N_AVX512)
#undef CS231N_ROTATED_KERNELS

// W_e [C/L][taps][k][L] from W [F, k, kH, kW] (any strides): the weight of tap t, rotation r, output
// channel o is W[o, (o mod k + r) mod k, t]. Its index, shared with d_W's:
inline int64_t rotated_index(int64_t o, int64_t t, int64_t r, int64_t k, int64_t taps, int64_t lanes) {
  return ((o / lanes * taps + t) * k + r) * lanes + o % lanes;
}

template <typename T>
std::vector<T> rotated_filters(const at::Tensor& w, const Conv2dGeometry& g) {
  const int64_t k = g.c_per_group(), taps = g.taps(), lanes = ChannelVectors<T>::kLanes;
  const auto a = w.accessor<T, 4>();
  std::vector<T> w_e(taps * k * g.f);
  for (int64_t o = 0; o < g.f; ++o) {
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t r = 0; r < k; ++r)
        w_e[rotated_index(o, t, r, k, taps, lanes)] = a[o][(o % k + r) % k][t / g.kw][t % g.kw];
    }
  }
  return w_e;
}

// y = conv(x, W) + b, x and y NHWC, or NCHW when `planes` (x's rows transposed as the ring takes them, y a
// sample at a time from [oH·oW][F]). W: the layer's filters, or when g is a transposed convolution those
// of transposed_filters.
template <typename T>
void grouped_forward_rotated(const T* x, const at::Tensor& w, const T* b, T* y, const Conv2dGeometry& g,
                             bool planes = false) {
  const ShiftedPlanes sp = shifted_planes(g);
  const std::vector<T> w_e = rotated_filters<T>(w, g);
  const int64_t in_sample = g.h * g.w * g.c, out_sample = g.col_cols() * g.f;
  const cpu::Isa isa = cpu::cpu_isa();
  const SampleBands split(g.n, g.oh);
  at::parallel_for(0, split.chunks, 1, [&](int64_t cb, int64_t ce) {
    T* x_e = cpu::thread_scratch<T>(cpu::Scratch::kPadded, RotatedRing<T>::size(g, sp.wp, (g.kh - 1) * g.dh + 1));
    T* row_t = planes ? cpu::thread_scratch<T>(cpu::Scratch::kTransposed, g.w * g.c) : nullptr;
    T* out = planes ? cpu::thread_scratch<T>(cpu::Scratch::kOut, out_sample) : nullptr;
    RotatedTaps taps(g, ChannelVectors<T>::kLanes);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      int64_t n0, n1, r0, r1;
      split.of(chunk, &n0, &n1, &r0, &r1);
      const int64_t p0 = r0 * g.ow, pixels = (r1 - r0) * g.ow;  // the band's outputs
      for (int64_t n = n0; n < n1; ++n) {
        const T* x_n = x + n * in_sample;
        T* y_n = planes ? out : y + n * out_sample + p0 * g.f;
        if (isa == cpu::Isa::kAvx512) {
          rotated_forward_avx512(x_n, r0, r1, w_e.data(), taps, b, y_n, g, sp, x_e, row_t);
        } else if (isa == cpu::Isa::kAvx2) {
          rotated_forward_avx2(x_n, r0, r1, w_e.data(), taps, b, y_n, g, sp, x_e, row_t);
        } else {
          rotated_forward_baseline(x_n, r0, r1, w_e.data(), taps, b, y_n, g, sp, x_e, row_t);
        }
        if (planes) cpu::transpose_matrix(out, g.f, pixels, g.f, y + n * out_sample + p0, g.col_cols());
      }
    }
  });
}

// d_W into dw (W's shape, any strides) from dY and x, NHWC or (`planes`) NCHW. Each chunk of samples sums
// into its own d_W_r, the chunks added in order (deterministic for a thread count).
template <typename T>
void grouped_weight_grad_rotated(const T* dy, const T* x, at::Tensor& dw, const Conv2dGeometry& g,
                                 bool planes = false) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t k = g.c_per_group(), C = g.f, size = g.taps() * k * C;
  const int64_t in_sample = g.h * g.w * g.c, out_sample = g.col_cols() * g.f;
  const SampleBands split(g.n, g.oh);
  const int64_t chunks = split.chunks;
  const ChunkPartials<T> partial(chunks, size);
  const cpu::Isa isa = cpu::cpu_isa();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    T* x_e = cpu::thread_scratch<T>(cpu::Scratch::kPadded, RotatedRing<T>::size(g, sp.wp, (g.kh - 1) * g.dh + 1));
    T* row_t = planes ? cpu::thread_scratch<T>(cpu::Scratch::kTransposed, g.w * g.c) : nullptr;
    T* dy_t = planes ? cpu::thread_scratch<T>(cpu::Scratch::kGrad, out_sample) : nullptr;  // [oH·oW][F]
    RotatedTaps taps(g, ChannelVectors<T>::kLanes);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      T* dw_e = partial.of(chunk);
      std::fill(dw_e, dw_e + size, T(0));
      int64_t n0, n1, r0, r1;
      split.of(chunk, &n0, &n1, &r0, &r1);
      for (int64_t n = n0; n < n1; ++n) {
        const T *dy_n = dy + n * out_sample, *x_n = x + n * in_sample;
        if (planes) {  // the band's rows of dY, transposed where the whole sample's would lie
          const int64_t p0 = r0 * g.ow;
          cpu::transpose_matrix(dy_n + p0, g.col_cols(), g.f, (r1 - r0) * g.ow, dy_t + p0 * g.f, g.f);
          dy_n = dy_t;
        }
        if (isa == cpu::Isa::kAvx512) {
          rotated_weight_grad_avx512(dy_n, x_n, r0, r1, taps, dw_e, g, sp, x_e, row_t);
        } else if (isa == cpu::Isa::kAvx2) {
          rotated_weight_grad_avx2(dy_n, x_n, r0, r1, taps, dw_e, g, sp, x_e, row_t);
        } else {
          rotated_weight_grad_baseline(dy_n, x_n, r0, r1, taps, dw_e, g, sp, x_e, row_t);
        }
      }
    }
  });
  partial.sum_into(chunks, partial.of(0));
  const T* dw_e = partial.of(0);
  auto out = dw.accessor<T, 4>();
  for (int64_t o = 0; o < C; ++o) {  // d_W[o, (o mod k + r) mod k, t] = d_W_r[o, t]
    for (int64_t r = 0; r < k; ++r) {
      for (int64_t t = 0; t < g.taps(); ++t) {
        out[o][(o % k + r) % k][t / g.kw][t % g.kw] =
            dw_e[rotated_index(o, t, r, k, g.taps(), ChannelVectors<T>::kLanes)];
      }
    }
  }
}

// d_x of a strided layer from dY, both NHWC, by phases (InputGradPhases, above). (NCHW layers keep their
// own kernels: transposing their large d_x cost more than the phases saved.)
template <typename T>
void grouped_input_grad_rotated(const T* dy, const at::Tensor& w, T* dx, const Conv2dGeometry& g) {
  const InputGradPhases ph(g);
  const int64_t k = g.c_per_group(), lanes = ChannelVectors<T>::kLanes, in_sample = g.h * g.w * g.c,
                out_sample = g.col_cols() * g.f;
  const auto a = w.accessor<T, 4>();
  std::vector<std::vector<T>> w_e;  // each phase's V_r, [C/L][its taps][k][L]
  for (const InputGradPhases::Phase& q : ph.phases) {
    const int64_t n = q.taps.size();
    std::vector<T> v(n * k * g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t t = q.taps[j];
        for (int64_t r = 0; r < k; ++r) {
          v[rotated_index(c, j, r, k, n, lanes)] = a[c - c % k + (c % k + r) % k][c % k][t / g.kw][t % g.kw];
        }
      }
    }
    w_e.push_back(std::move(v));
  }
  const cpu::Isa isa = cpu::cpu_isa();
  const SampleBands split(g.n, InputGradPhases::rows_m(g));
  at::parallel_for(0, split.chunks, 1, [&](int64_t cb, int64_t ce) {
    T* ring = cpu::thread_scratch<T>(cpu::Scratch::kPadded, RotatedRing<T>::size(ph.dy, ph.wp, ph.rows));
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      int64_t n0, n1, m0, m1;
      split.of(chunk, &n0, &n1, &m0, &m1);
      for (int64_t n = n0; n < n1; ++n) {
        const T* dy_n = dy + n * out_sample;
        T* dx_n = dx + n * in_sample;
        if (isa == cpu::Isa::kAvx512) {
          rotated_input_grad_avx512(dy_n, m0, m1, w_e, ph, dx_n, g, ring);
        } else if (isa == cpu::Isa::kAvx2) {
          rotated_input_grad_avx2(dy_n, m0, m1, w_e, ph, dx_n, g, ring);
        } else {
          rotated_input_grad_baseline(dy_n, m0, m1, w_e, ph, dx_n, g, ring);
        }
      }
    }
  });
}

// ======================================================================= groups interleaved in the lanes
// NEW ROUTE (draft): each vector of L channels holds G = L / k whole groups; lane l = j·G + gi stands for
// channel gi·k + j of the vector (group gi, place j in it). Then for input channel i of the groups,
// x[q, gi·k + i] over gi is G values side by side (in the interleaved input), and one broadcast of those G
// values against the weights W[gi·k + j, i, t] in lane j·G + gi adds every lane's product:
//     acc[q][j·G + gi] += W_b[t][i][j·G + gi] · x_b[q + off(t)][i·G + gi]
inline bool grouped_by_broadcasts(const Conv2dGeometry& g, int64_t element_size) {
  const int64_t lanes = 64 / element_size, k = g.c_per_group();
  return g.groups > 1 && k >= 2 && k <= lanes && lanes % k == 0 && g.f_per_group() == k && g.c % lanes == 0;
}

template <typename T>
struct GroupLanes {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  static constexpr int L = V::kLanes;
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> Lane;
  typedef Lane Mask __attribute__((vector_size(64)));
  int64_t k, G;
  Mask in, out;  // in[l]: the channel lane l holds; out[c]: the lane channel c is in
  explicit GroupLanes(int64_t k_) : k(k_), G(L / k_) {
    for (int l = 0; l < L; ++l) {
      in[l] = static_cast<Lane>(channel(l));
      out[l] = static_cast<Lane>(lane(l));
    }
  }
  int64_t channel(int64_t l) const { return l % G * k + l / G; }
  int64_t lane(int64_t c) const { return c % k * G + c / k; }
};

// v = the G values at p in every G lanes (lane l = p[l mod G]): G·sizeof(T) bytes broadcast, one load
// instruction on AVX-512 (vbroadcastss/sd, vbroadcastf32x4, vbroadcastf64x4). kIsa: the caller's
// (cpu::Isa), which these bodies inline into.
template <int kIsa, int G, typename T>
CS231N_INLINE void broadcast_lanes(const T* p, typename ChannelVectors<T>::Vec& v) {
  using Vec = typename ChannelVectors<T>::Vec;
  constexpr int bytes = G * sizeof(T);
  if constexpr (bytes == 4 || bytes == 8) {  // a scalar of that size, broadcast
    using U = std::conditional_t<bytes == 4, uint32_t, uint64_t>;
    typedef U UVec __attribute__((vector_size(64)));
    U u;
    std::memcpy(&u, p, bytes);
    v = (Vec)(UVec{} + u);
  } else {
    typedef float F4 __attribute__((vector_size(16), aligned(4), may_alias));
    typedef double D4 __attribute__((vector_size(32), aligned(8), may_alias));
#if CS231N_X86
    if constexpr (kIsa >= static_cast<int>(cpu::Isa::kAvx512)) {
      // the builtins themselves: their intrinsic wrappers carry a target this shared body lacks
      typedef float F16 __attribute__((vector_size(64)));
      typedef double D8 __attribute__((vector_size(64)));
      if constexpr (bytes == 16) {
        v = (Vec)__builtin_ia32_broadcastf32x4_512(*reinterpret_cast<const F4*>(p), F16{}, 0xffff);
      } else {
        v = (Vec)__builtin_ia32_broadcastf64x4_512(*reinterpret_cast<const D4*>(p), D8{}, 0xff);
      }
      return;
    }
#endif
    T lanes[G];
    std::memcpy(lanes, p, bytes);
    for (int l = 0; l < ChannelVectors<T>::kLanes; ++l) v[l] = lanes[l % G];
  }
}

// P outputs from virtual output q0 (the input's pixel q0 + off[t] for tap t), one vector of channels.
template <int kIsa, int P, int G, typename T>
CS231N_INLINE void interleaved_block(const T* xv, int64_t q0, const int64_t* off, int n, const T* wv,
                                     const typename ChannelVectors<T>::Vec& init,
                                     typename ChannelVectors<T>::Vec (&acc)[P]) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  constexpr int L = V::kLanes, k = L / G;
#pragma GCC unroll 24
  for (int p = 0; p < P; ++p) acc[p] = init;
  for (int t = 0; t < n; ++t) {
    const T* src = xv + (q0 + off[t]) * L;
    const T* w_t = wv + t * k * L;
#pragma GCC unroll 16
    for (int i = 0; i < k; ++i) {
      const Vec w = V::at(w_t + i * L);
#pragma GCC unroll 24
      for (int p = 0; p < P; ++p) {
        Vec x;
        broadcast_lanes<kIsa, G>(src + p * L + i * G, x);
        acc[p] += w * x;
      }
    }
  }
}

// Where one vector's outputs go: output (m, c) of rows x cols at y + m·row_step + c·col_step.
template <typename T>
struct OutputRows {
  T* y;
  int64_t rows, cols, row_step, col_step;
};

template <int kIsa, int P, int G, typename T>
CS231N_INLINE void interleaved_blocks(const T* xv, const int64_t* off, int n, const T* wv, const T* bias,
                                      int64_t pitch, const OutputRows<T>& out, const GroupLanes<T>& lanes,
                                      int64_t total) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  const Vec init = bias ? V::at(bias) : Vec{};
  const typename GroupLanes<T>::Mask to_channels = lanes.out;
  Vec acc[P];
  for (int64_t b0 = 0; b0 < total; b0 += P) {
    const int64_t q0 = std::min(b0, total - P);  // the last block overlaps the one before
    interleaved_block<kIsa, P, G>(xv, q0, off, n, wv, init, acc);
    int64_t m = q0 / pitch, c = q0 % pitch;
#pragma GCC unroll 24
    for (int p = 0; p < P; ++p) {
      if (c < out.cols) V::at(out.y + m * out.row_step + c * out.col_step) = __builtin_shuffle(acc[p], to_channels);
      if (++c == pitch) c = 0, ++m;
    }
  }
}

// Blocks of P outputs, P the size (of those the ISA's registers hold) that computes the fewest outputs
// in all, the larger on a tie: at 8 x 8 (78 virtual outputs) 80 by 16 where 24 computed 96.
template <int kIsa, int P1, int P2, int P3, int G, typename T>
CS231N_INLINE void interleaved_vector(const T* xv, const int64_t* off, int n, const T* wv, const T* bias,
                                      int64_t pitch, const OutputRows<T>& out, const GroupLanes<T>& lanes) {
  if (out.rows <= 0 || out.cols <= 0) return;
  const int64_t total = (out.rows - 1) * pitch + out.cols;
  const auto computed = [&](int64_t p) { return total >= p ? (total + p - 1) / p * p : INT64_MAX; };
  if (total < P3) {
    interleaved_blocks<kIsa, 1, G>(xv, off, n, wv, bias, pitch, out, lanes, total);
  } else if (computed(P1) <= std::min(computed(P2), computed(P3))) {
    interleaved_blocks<kIsa, P1, G>(xv, off, n, wv, bias, pitch, out, lanes, total);
  } else if (computed(P2) <= computed(P3)) {
    interleaved_blocks<kIsa, P2, G>(xv, off, n, wv, bias, pitch, out, lanes, total);
  } else {
    interleaved_blocks<kIsa, P3, G>(xv, off, n, wv, bias, pitch, out, lanes, total);
  }
}

// d_W of one vector: dwv[t][i] += Σ_{(m, c)} dyv[m·cols + c] · broadcast(xv[m·pitch + c + off[t]], i), the
// sums of U outputs at a time apart (16 accumulators).
template <int kIsa, int G, typename T>
CS231N_INLINE void interleaved_weight_grad_vector(const T* xv, const T* dyv, const int64_t* off, int n,
                                                  int64_t rows, int64_t cols, int64_t pitch, T* dwv) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  constexpr int L = V::kLanes, k = L / G, U = k >= 16 ? 1 : 16 / k;
  for (int t = 0; t < n; ++t) {
    Vec acc[U][k];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
      for (int i = 0; i < k; ++i) acc[u][i] = Vec{};
    for (int64_t m = 0; m < rows; ++m) {
      const T* d = dyv + m * cols * L;
      const T* src = xv + (m * pitch + off[t]) * L;
      int64_t c = 0;
      for (; c + U <= cols; c += U) {
#pragma GCC unroll 16
        for (int u = 0; u < U; ++u) {
          const Vec dv = V::at(d + (c + u) * L);
#pragma GCC unroll 16
          for (int i = 0; i < k; ++i) {
            Vec x;
            broadcast_lanes<kIsa, G>(src + (c + u) * L + i * G, x);
            acc[u][i] += dv * x;
          }
        }
      }
      for (; c < cols; ++c) {
        const Vec dv = V::at(d + c * L);
#pragma GCC unroll 16
        for (int i = 0; i < k; ++i) {
          Vec x;
          broadcast_lanes<kIsa, G>(src + c * L + i * G, x);
          acc[0][i] += dv * x;
        }
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < k; ++i) {
      Vec sum = acc[0][i];
#pragma GCC unroll 16
      for (int u = 1; u < U; ++u) sum += acc[u][i];
      V::at(dwv + (t * k + i) * L) += sum;
    }
  }
}

// count pixels, `pixel` apart from src (null: zeros), of `vectors` vectors of channels each, interleaved into
// dst: vector v of pixel w at dst + v·plane + w·L.
template <typename T>
CS231N_INLINE void interleave_run(const T* src, int64_t pixel, int64_t count, int64_t vectors, T* dst, int64_t plane,
                                  const GroupLanes<T>& lanes) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  constexpr int L = V::kLanes;
  const typename GroupLanes<T>::Mask to_lanes = lanes.in;
  for (int64_t w = 0; w < count; ++w) {
    for (int64_t v = 0; v < vectors; ++v) {
      V::at(dst + v * plane + w * L) = src ? __builtin_shuffle(V::at(src + w * pixel + v * L), to_lanes) : Vec{};
    }
  }
}

#define CS231N_INTERLEAVED_KERNELS(SUFFIX, ATTR, ISA, P1, P2, P3)                                                \
  template <int G, typename T>                                                                                     \
  ATTR void interleaved_vector_##SUFFIX(const T* xv, const int64_t* off, int n, const T* wv, const T* bias,        \
                                        int64_t pitch, const OutputRows<T>& out, const GroupLanes<T>& lanes) {     \
    interleaved_vector<static_cast<int>(ISA), P1, P2, P3, G>(xv, off, n, wv, bias, pitch, out, lanes);           \
  }                                                                                                                \
  template <int G, typename T>                                                                                     \
  ATTR void interleaved_weight_grad_##SUFFIX(const T* xv, const T* dyv, const int64_t* off, int n, int64_t rows,   \
                                             int64_t cols, int64_t pitch, T* dwv) {                                \
    interleaved_weight_grad_vector<static_cast<int>(ISA), G>(xv, dyv, off, n, rows, cols, pitch, dwv);             \
  }                                                                                                                \
  template <typename T>                                                                                            \
  ATTR void interleave_run_##SUFFIX(const T* src, int64_t pixel, int64_t count, int64_t vectors, T* dst,           \
                                    int64_t plane, const GroupLanes<T>& lanes) {                                   \
    interleave_run(src, pixel, count, vectors, dst, plane, lanes);                                                 \
  }
CS231N_INTERLEAVED_KERNELS(baseline, , cpu::Isa::kBaseline, 2, 2, 2)
CS231N_INTERLEAVED_KERNELS(avx2, CS231N_AVX2, cpu::Isa::kAvx2, 6, 4, 2)
CS231N_INTERLEAVED_KERNELS(avx512, CS231N_AVX512, cpu::Isa::kAvx512, 24, 16, 8)
#undef CS231N_INTERLEAVED_KERNELS

// f(std::integral_constant<int, G>) for the layer's G (1, 2, 4 or 8 groups a vector).
template <typename F>
void with_groups_per_vector(int64_t G, const F& f) {
  switch (G) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

template <typename T>
void interleaved_vector_for(cpu::Isa isa, int64_t G, const T* xv, const int64_t* off, int n, const T* wv,
                            const T* bias, int64_t pitch, const OutputRows<T>& out, const GroupLanes<T>& lanes) {
  with_groups_per_vector(G, [&](auto g_) {
    constexpr int Gc = decltype(g_)::value;
    if (isa >= cpu::Isa::kAvx512) {
      interleaved_vector_avx512<Gc>(xv, off, n, wv, bias, pitch, out, lanes);
    } else if (isa == cpu::Isa::kAvx2) {
      interleaved_vector_avx2<Gc>(xv, off, n, wv, bias, pitch, out, lanes);
    } else {
      interleaved_vector_baseline<Gc>(xv, off, n, wv, bias, pitch, out, lanes);
    }
  });
}

template <typename T>
void interleaved_weight_grad_for(cpu::Isa isa, int64_t G, const T* xv, const T* dyv, const int64_t* off, int n,
                                 int64_t rows, int64_t cols, int64_t pitch, T* dwv) {
  with_groups_per_vector(G, [&](auto g_) {
    constexpr int Gc = decltype(g_)::value;
    if (isa >= cpu::Isa::kAvx512) {
      interleaved_weight_grad_avx512<Gc>(xv, dyv, off, n, rows, cols, pitch, dwv);
    } else if (isa == cpu::Isa::kAvx2) {
      interleaved_weight_grad_avx2<Gc>(xv, dyv, off, n, rows, cols, pitch, dwv);
    } else {
      interleaved_weight_grad_baseline<Gc>(xv, dyv, off, n, rows, cols, pitch, dwv);
    }
  });
}

template <typename T>
void interleave_run_for(cpu::Isa isa, const T* src, int64_t pixel, int64_t count, int64_t vectors, T* dst,
                        int64_t plane, const GroupLanes<T>& lanes) {
  if (isa >= cpu::Isa::kAvx512) {
    interleave_run_avx512(src, pixel, count, vectors, dst, plane, lanes);
  } else if (isa == cpu::Isa::kAvx2) {
    interleave_run_avx2(src, pixel, count, vectors, dst, plane, lanes);
  } else {
    interleave_run_baseline(src, pixel, count, vectors, dst, plane, lanes);
  }
}

// Vectors [v0, v1) of one sample's x (NHWC [H][W][C], or NCHW when `planes`) into xb, vector after vector
// sp.plane() pixels of L interleaved channels, in the stride's phases (conv2d_shifted.h's layout), zeros in
// the padding: every pixel of the phases written.
template <typename T>
void interleaved_input(cpu::Isa isa, const T* x, bool planes, const Conv2dGeometry& g, const ShiftedPlanes& sp,
                       int64_t v0, int64_t v1, const GroupLanes<T>& lanes, T* xb, T* row_t) {
  constexpr int L = ChannelVectors<T>::kLanes;
  const int64_t plane = sp.plane() * L, vectors = v1 - v0, cs = vectors * L;
  for (int64_t a = 0; a < sp.sh; ++a) {
    for (int64_t u = 0; u < sp.hq; ++u) {
      const int64_t i = a + u * sp.sh - g.ph;  // the input row of the phases' row u
      const bool row_in = i >= 0 && i < g.h;
      const T* src = nullptr;
      int64_t pixel = g.c;
      if (row_in && planes) {
        cpu::transpose_matrix(x + v0 * L * g.h * g.w + i * g.w, g.h * g.w, cs, g.w, row_t, cs);
        src = row_t, pixel = cs;
      } else if (row_in) {
        src = x + i * g.w * g.c + v0 * L;
      }
      for (int64_t b = 0; b < sp.sw; ++b) {
        T* dst = xb + ((a * sp.sw + b) * sp.hq + u) * sp.wq * L;
        // phase column w is input column b + w·sW - pW: those in [0, W) from w0 to w1
        const int64_t w0 = row_in ? std::min(sp.wq, std::max<int64_t>(0, (g.pw - b + sp.sw - 1) / sp.sw)) : sp.wq;
        const int64_t w1 = row_in ? std::max(w0, std::min(sp.wq, (g.w + g.pw - b + sp.sw - 1) / sp.sw)) : sp.wq;
        interleave_run_for<T>(isa, nullptr, 0, w0, vectors, dst, plane, lanes);
        if (w1 > w0) {
          interleave_run_for(isa, src + (b + w0 * sp.sw - g.pw) * pixel, sp.sw * pixel, w1 - w0, vectors,
                             dst + w0 * L, plane, lanes);
        }
        interleave_run_for<T>(isa, nullptr, 0, sp.wq - w1, vectors, dst + w1 * L, plane, lanes);
      }
    }
  }
}

// Vectors [v0, v1) of one sample's dY (NHWC, or NCHW when `planes`) into dyb, vector after vector the
// outputs' L interleaved channels.
template <typename T>
void interleaved_grad(cpu::Isa isa, const T* dy, bool planes, const Conv2dGeometry& g, int64_t v0, int64_t v1,
                      const GroupLanes<T>& lanes, T* dyb, T* dy_t) {
  constexpr int L = ChannelVectors<T>::kLanes;
  const int64_t outputs = g.col_cols(), cs = (v1 - v0) * L;
  const T* src = dy + v0 * L;
  int64_t pixel = g.f;
  if (planes) {
    cpu::transpose_matrix(dy + v0 * L * outputs, outputs, cs, outputs, dy_t, cs);
    src = dy_t, pixel = cs;
  }
  interleave_run_for(isa, src, pixel, outputs, v1 - v0, dyb, outputs * L, lanes);
}

// W_b [C/L][n][k][L]: lane l of vector v (its channel o = v·L + lanes.channel(l)) holds value(o, i, j) for
// input channel i of the group and tap j.
template <typename T, typename F>
std::vector<T> interleaved_filters(int64_t channels, int64_t n, const GroupLanes<T>& lanes, const F& value) {
  constexpr int L = ChannelVectors<T>::kLanes;
  const int64_t k = lanes.k;
  std::vector<T> w(channels * n * k);
  for (int64_t v = 0; v < channels / L; ++v)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < k; ++i)
        for (int64_t l = 0; l < L; ++l) w[((v * n + j) * k + i) * L + l] = value(v * L + lanes.channel(l), i, j);
  return w;
}

// Items: samples, and at fewer samples than threads each sample's vectors in slices among the threads.
struct VectorSlices {
  int64_t n, vectors, slices, items;
  VectorSlices(int64_t samples, int64_t vectors_) : n(samples), vectors(vectors_) {
    const int64_t threads = at::get_num_threads();
    slices = n >= threads ? 1 : std::max<int64_t>(1, std::min<int64_t>(vectors, (threads + n - 1) / n));
    items = n * slices;
  }
  void of(int64_t item, int64_t* sample, int64_t* v0, int64_t* v1) const {
    *sample = item / slices;
    const int64_t s = item % slices;
    *v0 = chunk_begin(s, slices, vectors), *v1 = chunk_begin(s + 1, slices, vectors);
  }
};

template <typename T>
void grouped_forward_interleaved(const T* x, const at::Tensor& w, const T* b, T* y, const Conv2dGeometry& g,
                                 bool planes = false) {
  constexpr int L = ChannelVectors<T>::kLanes;
  const GroupLanes<T> lanes(g.c_per_group());
  const ShiftedPlanes sp = shifted_planes(g);
  const auto a = w.accessor<T, 4>();
  const std::vector<T> w_b = interleaved_filters<T>(g.f, g.taps(), lanes, [&](int64_t o, int64_t i, int64_t t) {
    return a[o][i][t / g.kw][t % g.kw];
  });
  std::vector<T> b_b(b ? g.f : 0);
  for (int64_t o = 0; o < static_cast<int64_t>(b_b.size()); ++o) b_b[o] = b[o - o % L + lanes.channel(o % L)];
  std::vector<int64_t> off(g.taps());
  for (int64_t t = 0; t < g.taps(); ++t) off[t] = shifted_offset(g, sp, t);
  const int64_t in_sample = g.h * g.w * g.c, outputs = g.col_cols(), out_sample = outputs * g.f;
  const cpu::Isa isa = cpu::cpu_isa();
  const VectorSlices split(g.n, g.c / L);
  at::parallel_for(0, split.items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      int64_t n, v0, v1;
      split.of(item, &n, &v0, &v1);
      const int64_t cs = (v1 - v0) * L;
      T* xb = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.plane() * cs);
      T* row_t = planes ? cpu::thread_scratch<T>(cpu::Scratch::kTransposed, g.w * cs) : nullptr;
      T* out = planes ? cpu::thread_scratch<T>(cpu::Scratch::kOut, outputs * cs) : nullptr;
      interleaved_input(isa, x + n * in_sample, planes, g, sp, v0, v1, lanes, xb, row_t);
      T* y_n = y + n * out_sample;
      for (int64_t v = v0; v < v1; ++v) {
        const OutputRows<T> rows = planes ? OutputRows<T>{out + (v - v0) * L, g.oh, g.ow, g.ow * cs, cs}
                                          : OutputRows<T>{y_n + v * L, g.oh, g.ow, g.ow * g.f, g.f};
        interleaved_vector_for<T>(isa, lanes.G, xb + (v - v0) * sp.plane() * L, off.data(), g.taps(),
                                  w_b.data() + v * g.taps() * lanes.k * L, b ? b_b.data() + v * L : nullptr, sp.wq,
                                  rows, lanes);
      }
      if (planes) cpu::transpose_matrix(out, cs, outputs, cs, y_n + v0 * L * outputs, outputs);
    }
  });
}

template <typename T>
void grouped_weight_grad_interleaved(const T* dy, const T* x, at::Tensor& dw, const Conv2dGeometry& g,
                                     bool planes = false) {
  constexpr int L = ChannelVectors<T>::kLanes;
  const GroupLanes<T> lanes(g.c_per_group());
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t k = lanes.k, taps = g.taps(), vectors = g.c / L, per_vector = taps * k * L;
  std::vector<int64_t> off(taps);
  for (int64_t t = 0; t < taps; ++t) off[t] = shifted_offset(g, sp, t);
  const int64_t in_sample = g.h * g.w * g.c, outputs = g.col_cols(), out_sample = outputs * g.f;
  const int64_t threads = at::get_num_threads(), chunks = std::max<int64_t>(1, std::min(g.n, threads));
  const VectorSlices slices(chunks, vectors);  // chunks of samples in place of samples
  const ChunkPartials<T> partial(chunks, vectors * per_vector);
  const cpu::Isa isa = cpu::cpu_isa();
  at::parallel_for(0, slices.items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      int64_t chunk, v0, v1;
      slices.of(item, &chunk, &v0, &v1);
      const int64_t cs = (v1 - v0) * L;
      T* dwb = partial.of(chunk);
      std::fill(dwb + v0 * per_vector, dwb + v1 * per_vector, T(0));
      T* xb = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.plane() * cs);
      T* row_t = planes ? cpu::thread_scratch<T>(cpu::Scratch::kTransposed, g.w * cs) : nullptr;
      T* dyb = cpu::thread_scratch<T>(cpu::Scratch::kGrad, outputs * cs);
      T* dy_t = planes ? cpu::thread_scratch<T>(cpu::Scratch::kRows, outputs * cs) : nullptr;
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        interleaved_input(isa, x + n * in_sample, planes, g, sp, v0, v1, lanes, xb, row_t);
        interleaved_grad(isa, dy + n * out_sample, planes, g, v0, v1, lanes, dyb, dy_t);
        for (int64_t v = v0; v < v1; ++v) {
          interleaved_weight_grad_for<T>(isa, lanes.G, xb + (v - v0) * sp.plane() * L, dyb + (v - v0) * outputs * L,
                                         off.data(), taps, g.oh, g.ow, sp.wq, dwb + v * per_vector);
        }
      }
    }
  });
  partial.sum_into(chunks, partial.of(0));
  const T* dwb = partial.of(0);
  auto out = dw.accessor<T, 4>();
  for (int64_t v = 0; v < vectors; ++v)
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t i = 0; i < k; ++i)
        for (int64_t l = 0; l < L; ++l)
          out[v * L + lanes.channel(l)][i][t / g.kw][t % g.kw] = dwb[v * per_vector + (t * k + i) * L + l];
}

// d_x of a strided layer by the phases of InputGradPhases, each a forward over dY padded.
template <typename T>
void grouped_input_grad_interleaved(const T* dy, const at::Tensor& w, T* dx, const Conv2dGeometry& g,
                                    bool planes = false) {
  constexpr int L = ChannelVectors<T>::kLanes;
  const InputGradPhases ph(g);
  const GroupLanes<T> lanes(g.c_per_group());
  const int64_t k = lanes.k;
  // dY padded (stride 1) into the rows and columns the phases read, from the least offset on: one
  // plane's pitch covers the reads of all phases (a plane padded by InputGradPhases' margins was a third
  // wider at 16 x 16)
  int64_t min_h = INT64_MAX, min_w = INT64_MAX, end_h = 0, end_w = 0;
  for (const InputGradPhases::Phase& q : ph.phases)
    for (size_t j = 0; j < q.taps.size(); ++j) {
      min_h = std::min(min_h, q.off_h[j]), min_w = std::min(min_w, q.off_w[j]);
      end_h = std::max(end_h, q.outputs_h + q.off_h[j]), end_w = std::max(end_w, q.outputs_w + q.off_w[j]);
    }
  if (min_h == INT64_MAX) min_h = min_w = 0;  // no phase has a tap: every d_x is zero, dY is not read
  int64_t hp = std::max<int64_t>(1, end_h - min_h), wp = std::max<int64_t>(1, end_w - min_w);
  for (const InputGradPhases::Phase& q : ph.phases) wp = std::max(wp, q.outputs_w);  // the outputs' pitch too
  const ShiftedPlanes sp{hp, wp, 1, 1, hp, wp, 0};
  Conv2dGeometry dyg = ph.dy;  // dY as the input: oH x oW pixels of F channels, its first read at (0, 0)
  dyg.sh = dyg.sw = 1, dyg.ph = ph.dy.ph - min_h, dyg.pw = ph.dy.pw - min_w;
  const auto a = w.accessor<T, 4>();
  std::vector<std::vector<T>> w_b;
  std::vector<std::vector<int64_t>> off;
  for (const InputGradPhases::Phase& q : ph.phases) {
    w_b.push_back(interleaved_filters<T>(g.c, q.taps.size(), lanes, [&](int64_t c, int64_t i, int64_t j) {
      const int64_t t = q.taps[j];
      return a[c - c % k + i][c % k][t / g.kw][t % g.kw];
    }));
    std::vector<int64_t> o;
    for (size_t j = 0; j < q.taps.size(); ++j) o.push_back((q.off_h[j] - min_h) * wp + q.off_w[j] - min_w);
    off.push_back(std::move(o));
  }
  const int64_t in_sample = g.h * g.w * g.c, out_sample = g.col_cols() * g.f, pixels = g.h * g.w;
  const cpu::Isa isa = cpu::cpu_isa();
  const VectorSlices split(g.n, g.c / L);
  at::parallel_for(0, split.items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      int64_t n, v0, v1;
      split.of(item, &n, &v0, &v1);
      const int64_t cs = (v1 - v0) * L;
      T* dyb = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.plane() * cs);
      T* row_t = planes ? cpu::thread_scratch<T>(cpu::Scratch::kTransposed, g.ow * cs) : nullptr;
      T* out = planes ? cpu::thread_scratch<T>(cpu::Scratch::kOut, pixels * cs) : nullptr;
      interleaved_input(isa, dy + n * out_sample, planes, dyg, sp, v0, v1, lanes, dyb, row_t);
      T* dx_n = dx + n * in_sample;
      for (int64_t v = v0; v < v1; ++v) {
        for (size_t p = 0; p < ph.phases.size(); ++p) {
          const InputGradPhases::Phase& q = ph.phases[p];
          const int64_t first = q.a_h * g.w + q.a_w;
          const OutputRows<T> rows =
              planes ? OutputRows<T>{out + first * cs + (v - v0) * L, q.outputs_h, q.outputs_w, g.sh * g.w * cs,
                                     g.sw * cs}
                     : OutputRows<T>{dx_n + first * g.c + v * L, q.outputs_h, q.outputs_w, g.sh * g.w * g.c,
                                     g.sw * g.c};
          interleaved_vector_for<T>(isa, lanes.G, dyb + (v - v0) * sp.plane() * L, off[p].data(),
                                    static_cast<int>(off[p].size()), w_b[p].data() + v * off[p].size() * k * L,
                                    nullptr, wp, rows, lanes);
        }
      }
      if (planes) cpu::transpose_matrix(out, cs, pixels, cs, dx_n + v0 * L * pixels, pixels);
    }
  });
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
