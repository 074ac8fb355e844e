// The CPU convolution's forward for few output pixels: a small image's last layers at a small batch (ResNet's
// 7x7 and 4x4 planes at batch 1), where every other route packs the filters first. Part of the CPU
// convolution (cpu/conv2d.cpp, which routes each layer; docs/conv2d.md has the table).
//
// The GEMM routes copy W (F x K, K = C*kH*kW) into their slivers once per call, which is worth it when each
// filter value then meets many pixels; with few, the copy costs as much as the products (512 x 4608 floats,
// 9.4 MB read and written, for 49 pixels a filter value: 98 flops). Here each output is a dot product,
//     y[n, f, o] = b[f] + Σ_k W[f, k] · colT[p, k],     p = (n, o_h, o_w), k = (c, t_h, t_w) or (t_h, t_w, c)
// of a filter's row, read in place (in W's own order of k: NCHW or channels_last), with a pixel's row of the
// im2col, colT[p, k] = x[n, c, o_h*s_h - p_h + t_h*d_h, o_w*s_w - p_w + t_w*d_w] (0 in the padding),
// built once per call in W's order. A tile is 8 filters x 3 pixels (kF x kP, below): 24 vectors of partial
// sums along k, 8 + 3 loads to 24 FMAs a step of 16 k; each filter's row is read from memory once, and the
// sums are reduced across their lanes at the end. AVX-512 and float32 only; the other routes run elsewhere.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/conv2d.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"

namespace torch_cs231n {
namespace conv2d_cpu {

// Output pixels (over the whole batch) up to which the dot products beat packing the filters, as measured on
// the 2-core Intel Xeon (AVX-512) of 2026-12-01: ResNet-18's 512-channel 7x7 layer 3.1 ms against 6.0 at
// batch 1 (49 pixels), 5.9 against 8.2 at batch 2, about even at 196 pixels, and the 256-channel 14x14
// layer at batch 1 (196) 3.2 against 2.6 (docs/benchmarks.md).
constexpr int64_t kDotsMaxPixels = 128;

// How W's row of a filter orders k: (c, t_h, t_w) (NCHW weights) or (t_h, t_w, c) (channels_last); either
// way a row is K floats in a run, and rows lie w.stride(0) apart.
enum class DotsOrder { kChannelMajor, kTapMajor, kNone };

inline DotsOrder dots_order(const at::Tensor& w) {
  const int64_t c = w.size(1), kh = w.size(2), kw = w.size(3);
  auto dense = [&](int64_t sc, int64_t sh, int64_t sw) {
    return (c == 1 || w.stride(1) == sc) && (kh == 1 || w.stride(2) == sh) && (kw == 1 || w.stride(3) == sw);
  };
  if (dense(kh * kw, kw, 1)) return DotsOrder::kChannelMajor;
  if (dense(1, kw * c, c)) return DotsOrder::kTapMajor;
  return DotsOrder::kNone;
}

// Output pixel p of the whole batch, p = (n·oH + o_h)·oW + o_w: its sample and place (the rows of colT
// and of d_colᵀ below).
struct BatchPixel {
  int64_t n, o_h, o_w;
  BatchPixel(int64_t p, const Conv2dGeometry& g) : n(p / g.col_cols()), o_h(p % g.col_cols() / g.ow), o_w(p % g.ow) {}
};

// Whether a float32 layer takes the dot products: AVX-512, one group, few output pixels, W's rows in a run.
inline bool use_dots(const Conv2dGeometry& g, const at::Tensor& w) {
  return cpu::cpu_isa() >= cpu::Isa::kAvx512 && w.scalar_type() == at::kFloat && g.groups == 1 &&
         g.n * g.col_cols() <= kDotsMaxPixels && g.c * g.taps() % 16 == 0 && dots_order(w) != DotsOrder::kNone;
}

#if CS231N_X86
// colT's rows [p0, p1) (K floats each): for output pixel p = (n, o_h, o_w), x's values under the filter in
// W's order of k. x is read through its strides (NCHW or channels_last alike).
inline void build_dots_rows(const float* x, const int64_t (&xs)[4], const Conv2dGeometry& g, DotsOrder order,
                            int64_t p0, int64_t p1, float* col) {
  const int64_t k = g.c * g.taps();
  std::vector<int64_t> offsets(g.taps());
  for (int64_t p = p0; p < p1; ++p) {
    const auto [n, o_h, o_w] = BatchPixel(p, g);
    float* row = col + p * k;
    const float* sample = x + n * xs[0];
    for (int64_t t = 0; t < g.taps(); ++t) {  // where each tap reads in a channel's plane, -1 in the padding
      const int64_t i_h = conv_in_index(o_h, t / g.kw, g.sh, g.ph, g.dh);
      const int64_t i_w = conv_in_index(o_w, t % g.kw, g.sw, g.pw, g.dw);
      offsets[t] = i_h >= 0 && i_h < g.h && i_w >= 0 && i_w < g.w ? i_h * xs[2] + i_w * xs[3] : -1;
    }
    if (order == DotsOrder::kTapMajor) {  // k = t * C + c: each tap's run of the pixel's channels
      for (int64_t t = 0; t < g.taps(); ++t) {
        float* out = row + t * g.c;
        for (int64_t c = 0; c < g.c; ++c) out[c] = offsets[t] < 0 ? 0.f : sample[offsets[t] + c * xs[1]];
      }
    } else {  // k = c * taps + t: each channel's taps side by side, written in order (one plane at a time)
      for (int64_t c = 0; c < g.c; ++c) {
        const float* plane = sample + c * xs[1];
        float* out = row + c * g.taps();
        for (int64_t t = 0; t < g.taps(); ++t) out[t] = offsets[t] < 0 ? 0.f : plane[offsets[t]];
      }
    }
  }
}

// The tile: kF filters x kP pixels, 24 vectors of partial sums. Many filters to few pixels, as the filters'
// rows are what stays in the first-level cache (a chunk of kChunk k of 8 rows: 16 KiB), while each
// pixel's row comes from the second level (3 of the 11 loads a step).
constexpr int kF = 8, kP = 3;
constexpr int64_t kChunk = 512;

// One step of 16 k: kF rows of W times kP rows of colT, one W row at a time (24 sums, 3 pixels' and 1
// filter's vectors: 28 of the 32 registers).
CS231N_AVX512 CS231N_INLINE void dots_step(int64_t k, const float* const (&w_rows)[kF],
                                           const float* const (&col_rows)[kP], __m512 (&acc)[kF][kP]) {
  __m512 cv[kP];
#pragma GCC unroll 3
  for (int j = 0; j < kP; ++j) cv[j] = _mm512_loadu_ps(col_rows[j] + k);
#pragma GCC unroll 8
  for (int i = 0; i < kF; ++i) {
    const __m512 wv = _mm512_loadu_ps(w_rows[i] + k);
#pragma GCC unroll 3
    for (int j = 0; j < kP; ++j) acc[i][j] = _mm512_fmadd_ps(wv, cv[j], acc[i][j]);
  }
}

// The sum of v's 16 lanes, by halves (GCC 12's _mm512_reduce_add_ps warns of an uninitialised value).
CS231N_AVX512 CS231N_INLINE float sum_lanes(__m512 v) {
  const __m256 half = _mm512_castps512_ps256(_mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4e)));
  const __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  const __m128 pairs = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}

// One tile's sums over k in [k0, k1) (multiples of 16: use_dots asks K to be one), added to the kF x kP
// vectors of 16 floats at partial (zeroed first when `first`).
CS231N_AVX512 inline void dots_tile(int64_t k0, int64_t k1, bool first, const float* const (&w_rows)[kF],
                                    const float* const (&col_rows)[kP], float* partial) {
  __m512 acc[kF][kP];
  for (int i = 0; i < kF; ++i) {
    for (int j = 0; j < kP; ++j) acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + (i * kP + j) * 16);
  }
#pragma GCC unroll 2
  for (int64_t k = k0; k < k1; k += 16) dots_step(k, w_rows, col_rows, acc);
  for (int i = 0; i < kF; ++i) {
    for (int j = 0; j < kP; ++j) _mm512_storeu_ps(partial + (i * kP + j) * 16, acc[i][j]);
  }
}

// The outputs of filters [f0, f0 + kF) for every pixel of colT, into y: k in chunks of kChunk, and within
// a chunk every block of kP pixels, whose partial sums wait in `partial` between chunks.
struct DotsProblem {
  const float* w;
  int64_t ldw;
  const float* col;
  int64_t k, total;  // the sum's length (colT's rows' too), and the pixels of the batch
  const float* b;
  float* y;
  int64_t ys[4];
};

CS231N_AVX512 inline void dots_filter_block(const DotsProblem& d, const Conv2dGeometry& g, int64_t f0,
                                            std::vector<float>& partial) {
  const int64_t pixel_blocks = (d.total + kP - 1) / kP;
  partial.resize(pixel_blocks * kF * kP * 16);
  const float* w_rows[kF];
  for (int64_t i = 0; i < kF; ++i) w_rows[i] = d.w + std::min(f0 + i, g.f - 1) * d.ldw;  // past F: the last again
  for (int64_t k0 = 0; k0 < d.k; k0 += kChunk) {
    for (int64_t pb = 0; pb < pixel_blocks; ++pb) {
      const float* col_rows[kP];
      for (int64_t j = 0; j < kP; ++j) col_rows[j] = d.col + std::min(pb * kP + j, d.total - 1) * d.k;
      dots_tile(k0, std::min(d.k, k0 + kChunk), k0 == 0, w_rows, col_rows, &partial[pb * kF * kP * 16]);
    }
  }
  for (int64_t p = 0; p < d.total; ++p) {
    const auto [n, o_h, o_w] = BatchPixel(p, g);
    float* out = d.y + n * d.ys[0] + o_h * d.ys[2] + o_w * d.ys[3];
    for (int64_t i = 0; i < kF && f0 + i < g.f; ++i) {
      const float* sums = &partial[((p / kP * kF + i) * kP + p % kP) * 16];
      out[(f0 + i) * d.ys[1]] = sum_lanes(_mm512_loadu_ps(sums)) + (d.b ? d.b[f0 + i] : 0.f);
    }
  }
}

// y (through its strides) = conv(x, w) + b for the whole batch, its output pixels few (use_dots): colT built
// in parallel over pixels, then the threads take blocks of kF filters.
inline void conv_forward_dots(const at::Tensor& x, const at::Tensor& w, const float* b, at::Tensor& y,
                              const Conv2dGeometry& g) {
  const DotsOrder order = dots_order(w);
  const int64_t total = g.n * g.col_cols(), k = g.c * g.taps();
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  at::Tensor col_t = at::empty({total * k}, x.options());
  float* col = col_t.mutable_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  at::parallel_for(0, total, 8, [&](int64_t p0, int64_t p1) { build_dots_rows(xp, xs, g, order, p0, p1, col); });
  const DotsProblem d{w.const_data_ptr<float>(),
                      w.stride(0),
                      col,
                      k,
                      total,
                      b,
                      y.mutable_data_ptr<float>(),
                      {y.stride(0), y.stride(1), y.stride(2), y.stride(3)}};
  at::parallel_for(0, (g.f + kF - 1) / kF, 1, [&](int64_t fb0, int64_t fb1) {
    std::vector<float> partial;  // (floats: a vector of __m512 is not allocated 64-byte aligned)
    for (int64_t fb = fb0; fb < fb1; ++fb) dots_filter_block(d, g, fb * kF, partial);
  });
}
#else
inline void conv_forward_dots(const at::Tensor&, const at::Tensor&, const float*, at::Tensor&, const Conv2dGeometry&) {
  TORCH_CHECK(false, "conv_forward_dots: an AVX-512 kernel, and this build is not for x86");
}
#endif

// ---------------------------------------------------------------------------------------------- d_x
// d_x of a strided layer with few output pixels is d_col and col2im, the product turned so that W is the
// operand read in place:
//     d_colᵀ[p, k] = Σ_f dY[n, f, o_h, o_w] · W[f, k]         p = (n, o_h, o_w), k in W's own order
//     d_x[n, c, i_h, i_w] = Σ d_colᵀ[p, (c, t)] over the outputs p and taps t that read (i_h, i_w)
// cpu::gemm_rows_b takes W's rows as B where they lie, so each filter value is read from memory once; dYᵀ
// (P x F, through dY's strides) is its packed A. The route by the stride's phases copies W into each
// phase's filters and packs them, for a few products a value. Ours by this route / by the phases, one
// process alternating (Xeon, 2 threads): (1, 512, 14, 14) 3x3 stride 2 0.54, at batch 4 0.77, (1, 1024, 14,
// 14) -> 2048 1x1 stride 2 0.37, (1, 256, 28, 28) 3x3 stride 2 (196 outputs) 0.72; even at 392 outputs
// (1.0-1.09). Stride-1 layers gain nothing over their transposed convolution (0.97 at 49 outputs, 1.12 at 98).
constexpr int64_t kInputGradDotsMaxPixels = 256;

inline bool use_input_grad_dots(const Conv2dGeometry& g, const at::Tensor& w) {
  return cpu::cpu_isa() >= cpu::Isa::kAvx512 && w.scalar_type() == at::kFloat && g.groups == 1 &&
         (g.sh > 1 || g.sw > 1) && g.n * g.col_cols() <= kInputGradDotsMaxPixels && dots_order(w) != DotsOrder::kNone;
}

// dx (through its strides) from dy (through its) and w, float32, use_input_grad_dots: the product with its
// columns among the threads (gemm_rows_b), then col2im with the channels among them, each d_x value summed
// by one thread in the order of p and t.
inline void conv_input_grad_dots(const at::Tensor& dy, const at::Tensor& w, at::Tensor& dx, const Conv2dGeometry& g) {
  const int64_t total = g.n * g.col_cols(), k = g.c * g.taps();
  std::vector<int64_t> dy_rows(total), w_rows(g.f);
  for (int64_t p = 0; p < total; ++p) {
    const auto [n, o_h, o_w] = BatchPixel(p, g);
    dy_rows[p] = n * dy.stride(0) + o_h * dy.stride(2) + o_w * dy.stride(3);  // row p of dYᵀ, along f
  }
  for (int64_t f = 0; f < g.f; ++f) w_rows[f] = f * w.stride(0);
  float* d_col = cpu::thread_scratch<float>(cpu::Scratch::kOut, total * k);
  cpu::gemm_rows_b<float>(total, k, g.f, {dy.const_data_ptr<float>(), 0, dy.stride(1), dy_rows.data()},
                          w.const_data_ptr<float>(), w_rows.data(), d_col, k);
  // k = c * c_step + t * t_step in W's order
  const bool tap_major = dots_order(w) == DotsOrder::kTapMajor;
  const int64_t c_step = tap_major ? 1 : g.taps(), t_step = tap_major ? g.c : 1;
  const int64_t xs[4] = {dx.stride(0), dx.stride(1), dx.stride(2), dx.stride(3)};
  dx.zero_();
  float* out = dx.mutable_data_ptr<float>();
  at::parallel_for(0, g.c, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t p = 0; p < total; ++p) {
      const auto [n, o_h, o_w] = BatchPixel(p, g);
      for (int64_t t = 0; t < g.taps(); ++t) {
        const int64_t i_h = conv_in_index(o_h, t / g.kw, g.sh, g.ph, g.dh);
        const int64_t i_w = conv_in_index(o_w, t % g.kw, g.sw, g.pw, g.dw);
        if (i_h < 0 || i_h >= g.h || i_w < 0 || i_w >= g.w) continue;  // a tap in the padding
        float* to = out + n * xs[0] + i_h * xs[2] + i_w * xs[3];
        const float* from = d_col + p * k + t * t_step;
        for (int64_t c = c0; c < c1; ++c) to[c * xs[1]] += from[c * c_step];
      }
    }
  });
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
