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
// depthwise layer over an input of k·C channels a pixel: every vector lane useful, and the depthwise
// kernels' blocks of outputs with their sums in registers (conv2d_depthwise.h) do the work. The
// rotations are vector shuffles within groups of k lanes, so k divides the vector's lanes and C is a
// whole number of vectors. Likewise
//     d_W_r[o, t] = Σ_p dY[p, o] · x_r[p·s + t·d, o],   then d_W[o, (j + r) mod k, t] = d_W_r[o, t]
// and d_x (stride 1) is the same form on dY: the transposed convolution, grouped alike (cpu/conv2d_gemm.h's
// transposed_filters).
//
// Each sample is padded and rotated into x_e [Hp][Wp][C/L][k][L] (L: a vector's lanes; a pixel's vector of
// channels in its k rotations side by side) a row at a time, as the output rows need them (RotatedRing,
// below); channels_last x is read as it lies. The filters likewise: W_e [C/L][taps][k][L]. One vector of
// channels of a block of outputs then reads k·L contiguous values a pixel and tap, and its weights in
// sequence; with x_e as [k][C] a pixel, the block's loads fell on k·3·10 lines apart for each vector and
// waited on L2 (7% of the FMA peak).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
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
  // Elements from one x_e pixel to the next: k·C and a vector unused, so that a block's pixels (k·C a
  // power of two: 2 or 8 KB) do not all fall in the same few sets of L1.
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

// Row i of x_e [Hp][Wp][C/L][k][L] (the NHWC sample x padded, each pixel's channels in their k rotations) into
// `dst`: zeros in the padding, pixel after pixel.
template <typename T>
CS231N_INLINE void pad_rotated_row(const T* x, int64_t i, const Conv2dGeometry& g, const ShiftedPlanes& sp, T* dst) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> Lane;  // __builtin_shuffle's mask: lanes of T's size
  typedef Lane LaneMask __attribute__((vector_size(64)));
  const int64_t k = g.c_per_group(), C = g.c, kc = RotatedTaps::pixel(g, ChannelVectors<T>::kLanes);
  if (i < g.ph || i >= g.ph + g.h) {
    std::fill(dst, dst + sp.wp * kc, T(0));
    return;
  }
  LaneMask mask[8];  // mask[r][l] = the lane rotation r puts into lane l: l - l mod k + (l mod k + r) mod k
  for (int64_t r = 0; r < k; ++r) {
    for (int l = 0; l < V::kLanes; ++l) mask[r][l] = static_cast<Lane>(l - l % k + (l % k + r) % k);
  }
  std::fill(dst, dst + g.pw * kc, T(0));
  const T* src_row = x + (i - g.ph) * g.w * C;
  for (int64_t j = 0; j < g.w; ++j) {
    const T* src = src_row + j * C;
    T* out = dst + (g.pw + j) * kc;
    for (int64_t c = 0; c < C; c += V::kLanes) {
      const Vec v = V::at(src + c);
      V::at(out + c * k) = v;
      for (int64_t r = 1; r < k; ++r) V::at(out + c * k + r * V::kLanes) = __builtin_shuffle(v, mask[r]);
    }
  }
  std::fill(dst + (g.pw + g.w) * kc, dst + sp.wp * kc, T(0));
}

// x_e is built a row at a time into a ring of the rows one output row's taps span, each row when an
// output row first needs it: the whole of it is k times the sample (27 MB for ResNeXt's (256, 56, 56),
// k = 8), and built whole it went to memory and back (8 times oneDNN's time); the ring stays in L2
// (3 rows of 475 KB there).
template <typename T>
struct RotatedRing {
  const Conv2dGeometry& g;
  const ShiftedPlanes& sp;
  T* ring;
  std::vector<int64_t> held;  // the x_e row each ring row holds (-1: none yet)
  RotatedRing(const Conv2dGeometry& geometry, const ShiftedPlanes& planes, const RotatedTaps& taps, T* storage)
      : g(geometry), sp(planes), ring(storage), held(taps.rows, -1) {}
  static int64_t size(const Conv2dGeometry& g, const ShiftedPlanes& sp) {
    return ((g.kh - 1) * g.dh + 1) * sp.wp * RotatedTaps::pixel(g, ChannelVectors<T>::kLanes);
  }
  // The rows output row o_h reads, from sample x.
  CS231N_INLINE void fill(const T* x, int64_t o_h, const RotatedTaps& taps) {
    for (int64_t t_h = 0; t_h < g.kh; ++t_h) {
      const int64_t i = o_h * g.sh + t_h * g.dh, slot = i % taps.rows;
      if (held[slot] == i) continue;
      pad_rotated_row(x, i, g, sp, ring + slot * sp.wp * taps.pixel());
      held[slot] = i;
    }
  }
};

// P outputs side by side (`first` = the first one's first tap in the ring, `step` apart), every vector of
// channels c: y[p, c] = b[c] + Σ_{(t, r)} W_e[c][t, r] · x_e[first + p·step + at[(t, r)]][c].
template <int P, typename T>
CS231N_INLINE void rotated_outputs(const T* first, int64_t step, const T* w_e, const int64_t* at, int n, const T* b,
                                   T* y, int64_t C, int64_t k) {
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
    for (int p = 0; p < P; ++p) V::at(y + p * C + c) = acc[p];
  }
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

// One NHWC sample's y: per output row, its x_e rows, then blocks of 8, 4 and 1 outputs.
template <typename T>
CS231N_INLINE void rotated_forward_sample(const T* x, const T* w_e, RotatedTaps& taps, const T* b, T* y,
                                          const Conv2dGeometry& g, const ShiftedPlanes& sp, T* ring) {
  RotatedRing<T> rows(g, sp, taps, ring);
  const int64_t step = g.sw * taps.pixel(), C = g.c, k = g.c_per_group();
  const int64_t* at = taps.at.data();
  const int n = taps.n();
  for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
    rows.fill(x, o_h, taps);
    taps.set(o_h, sp.wp);
    T* y_row = y + o_h * g.ow * C;
    int64_t o = 0;
    for (; o + 8 <= g.ow; o += 8) rotated_outputs<8>(ring + o * step, step, w_e, at, n, b, y_row + o * C, C, k);
    for (; o + 4 <= g.ow; o += 4) rotated_outputs<4>(ring + o * step, step, w_e, at, n, b, y_row + o * C, C, k);
    for (; o < g.ow; ++o) rotated_outputs<1>(ring + o * step, step, w_e, at, n, b, y_row + o * C, C, k);
  }
}

// One NHWC sample's d_W, added into dw_e [C/L][taps][k][L].
template <typename T>
CS231N_INLINE void rotated_weight_grad_sample(const T* dy, const T* x, RotatedTaps& taps, T* dw_e,
                                              const Conv2dGeometry& g, const ShiftedPlanes& sp, T* ring) {
  RotatedRing<T> rows(g, sp, taps, ring);
  const int64_t step = g.sw * taps.pixel(), C = g.c, k = g.c_per_group();
  const int64_t* at = taps.at.data();
  const int n = taps.n();
  for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
    rows.fill(x, o_h, taps);
    taps.set(o_h, sp.wp);
    const T* d = dy + o_h * g.ow * C;
    int64_t o = 0;
    for (; o + 8 <= g.ow; o += 8) rotated_weight_grad_outputs<8>(ring + o * step, step, d + o * C, at, n, dw_e, C, k);
    for (; o + 4 <= g.ow; o += 4) rotated_weight_grad_outputs<4>(ring + o * step, step, d + o * C, at, n, dw_e, C, k);
    for (; o < g.ow; ++o) rotated_weight_grad_outputs<1>(ring + o * step, step, d + o * C, at, n, dw_e, C, k);
  }
}

// The two loops compiled for each instruction set (their bodies inline into each).
#define CS231N_ROTATED_KERNELS(SUFFIX, ATTR)                                                                           \
  template <typename T>                                                                                                \
  ATTR void rotated_forward_##SUFFIX(const T* x, const T* w_e, RotatedTaps& taps, const T* b, T* y,                    \
                                     const Conv2dGeometry& g, const ShiftedPlanes& sp, T* ring) {                      \
    rotated_forward_sample(x, w_e, taps, b, y, g, sp, ring);                                                           \
  }                                                                                                                    \
  template <typename T>                                                                                                \
  ATTR void rotated_weight_grad_##SUFFIX(const T* dy, const T* x, RotatedTaps& taps, T* dw_e, const Conv2dGeometry& g, \
                                         const ShiftedPlanes& sp, T* ring) {                                           \
    rotated_weight_grad_sample(dy, x, taps, dw_e, g, sp, ring);                                                        \
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

// y = conv(x, W) + b, x and y NHWC (W: the layer's filters, or when g is a transposed convolution those
// of transposed_filters).
template <typename T>
void grouped_forward_rotated(const T* x, const at::Tensor& w, const T* b, T* y, const Conv2dGeometry& g) {
  const ShiftedPlanes sp = shifted_planes(g);
  const std::vector<T> w_e = rotated_filters<T>(w, g);
  const int64_t in_sample = g.h * g.w * g.c, out_sample = g.col_cols() * g.f;
  const cpu::Isa isa = cpu::cpu_isa();
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    T* x_e = cpu::thread_scratch<T>(cpu::Scratch::kPadded, RotatedRing<T>::size(g, sp));
    RotatedTaps taps(g, ChannelVectors<T>::kLanes);
    for (int64_t n = n0; n < n1; ++n) {
      const T* x_n = x + n * in_sample;
      T* y_n = y + n * out_sample;
      if (isa == cpu::Isa::kAvx512) {
        rotated_forward_avx512(x_n, w_e.data(), taps, b, y_n, g, sp, x_e);
      } else if (isa == cpu::Isa::kAvx2) {
        rotated_forward_avx2(x_n, w_e.data(), taps, b, y_n, g, sp, x_e);
      } else {
        rotated_forward_baseline(x_n, w_e.data(), taps, b, y_n, g, sp, x_e);
      }
    }
  });
}

// d_W into dw (W's shape, any strides) from NHWC dY and x. Each chunk of samples sums into its own d_W_r,
// the chunks added in order (deterministic for a thread count).
template <typename T>
void grouped_weight_grad_rotated(const T* dy, const T* x, at::Tensor& dw, const Conv2dGeometry& g) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t k = g.c_per_group(), C = g.f, size = g.taps() * k * C;
  const int64_t in_sample = g.h * g.w * g.c, out_sample = g.col_cols() * g.f;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.n, at::get_num_threads()));
  const ChunkPartials<T> partial(chunks, size);
  const cpu::Isa isa = cpu::cpu_isa();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    T* x_e = cpu::thread_scratch<T>(cpu::Scratch::kPadded, RotatedRing<T>::size(g, sp));
    RotatedTaps taps(g, ChannelVectors<T>::kLanes);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      T* dw_e = partial.of(chunk);
      std::fill(dw_e, dw_e + size, T(0));
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        const T *dy_n = dy + n * out_sample, *x_n = x + n * in_sample;
        if (isa == cpu::Isa::kAvx512) {
          rotated_weight_grad_avx512(dy_n, x_n, taps, dw_e, g, sp, x_e);
        } else if (isa == cpu::Isa::kAvx2) {
          rotated_weight_grad_avx2(dy_n, x_n, taps, dw_e, g, sp, x_e);
        } else {
          rotated_weight_grad_baseline(dy_n, x_n, taps, dw_e, g, sp, x_e);
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

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
