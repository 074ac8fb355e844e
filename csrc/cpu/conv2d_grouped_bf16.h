// The CPU convolution, grouped layers of few channels a group in bfloat16 (ResNeXt under autocast): the
// lanes of conv2d_grouped.h by pairs of input channels, on AVX512-BF16. Part of the CPU convolution
// (cpu/conv2d.cpp routes each layer; docs/conv2d.md derives it).
//
// vdpbf16ps adds a[2l]·b[2l] + a[2l+1]·b[2l+1] into float32 lane l. With the lanes ordered as in
// conv2d_grouped.h (lane l = j·G + gi: filter j of group gi), input channels 2m and 2m + 1 of the G groups
// are G pairs side by side in a pixel's interleaved bfloat16 (4G bytes: one broadcast), and the weights of
// lane l's filter for them a pair:
//     y_b[p][l] = b + Σ_t Σ_{m < k/2} Σ_{e < 2} W_b[t][m][l][e] · x_b[p·s + t·d][m][gi(l)][e]
//     W_b[t][m][j·G + gi][e] = W[gi·k + j, 2m + e, t]
// half the instructions of the float32 kernel's products, and no float32 copy of x or rounding pass over
// y. channels_last, the forward and d_x (the transposed convolution, or the stride's phases); d_W stays on
// the float32 route, whose products sum over the pixels, not over pairs of channels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/conv2d.h"
#include "cpu/conv2d_gemm.h"
#include "cpu/conv2d_grouped.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"
#include "cpu/reduced_float.h"

#if CS231N_X86
#include <immintrin.h>

namespace torch_cs231n {
namespace conv2d_cpu {

// Groups of 2 to 16 channels (16 float32 lanes of sums), channels_last bfloat16, where AVX512-BF16 runs;
// groups of 16 only strided. Against the float32 kernels on converted copies (one vdpbf16ps is as fast as
// two FMAs here, the copies are what it saves), (16, 128, 32, 32) in groups of 4 forward 1.93 -> 1.18 ms,
// d_x 4.81 -> 2.60; (16, 256, 32, 32) stride 2 in groups of 8 2.18 -> 1.36, 7.47 -> 3.06; but groups of 16
// on (16, 512, 8, 8) at stride 1 0.94 -> 1.31 (the Xeon of the eleventh session).
inline bool grouped_bf16_applies(const Conv2dGeometry& g) {
  return cpu::cpu_isa() == cpu::Isa::kAvx512 && cpu::has_avx512_bf16() && grouped_by_broadcasts(g, 4) &&
         (g.c_per_group() <= 8 || g.sh > 1 || g.sw > 1);
}

// The 16 channels of a vector, in a pixel's interleaved order: place m·2G + gi·2 + e holds channel
// gi·k + 2m + e (the pair of input channels 2m, 2m + 1 of group gi).
inline std::vector<int16_t> bf16_pair_order(const GroupLanes<float>& lanes) {
  std::vector<int16_t> order(16);
  for (int64_t m = 0; m < lanes.k / 2; ++m)
    for (int64_t gi = 0; gi < lanes.G; ++gi)
      for (int64_t e = 0; e < 2; ++e) order[m * 2 * lanes.G + gi * 2 + e] = gi * lanes.k + 2 * m + e;
  return order;
}

// The G pairs at p (4G bytes) in every 4G bytes of a vector.
template <int G>
CS231N_AVX512_BF16 inline __m512i broadcast_pairs(const uint16_t* p) {
  if constexpr (G == 1) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  } else if constexpr (G == 2) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return _mm512_set1_epi64(v);
  } else if constexpr (G == 4) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// P outputs from virtual output q0 of one vector (xv: its plane of 16 bfloat16 a pixel), as
// interleaved_block: tap t reads place q + off[t].
template <int P, int G>
CS231N_AVX512_BF16 inline void bf16_pairs_block(const uint16_t* xv, int64_t q0, const int64_t* off, int n,
                                                const uint16_t* wv, __m512 init, __m512 (&acc)[P]) {
  constexpr int pairs = 8 / G;  // k / 2
#pragma GCC unroll 24
  for (int p = 0; p < P; ++p) acc[p] = init;
  for (int t = 0; t < n; ++t) {
    const uint16_t* src = xv + (q0 + off[t]) * 16;
    const uint16_t* w_t = wv + t * pairs * 32;
#pragma GCC unroll 8
    for (int m = 0; m < pairs; ++m) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(w_t + m * 32);
#pragma GCC unroll 24
      for (int p = 0; p < P; ++p) {
        acc[p] = _mm512_dpbf16_ps(acc[p], (__m512bh)broadcast_pairs<G>(src + p * 16 + m * 2 * G), w);
      }
    }
  }
}

// One vector's outputs over the pitch (as interleaved_blocks), un-interleaved by `to_channels` and rounded
// to bfloat16 as they are stored.
template <int P, int G>
CS231N_AVX512_BF16 inline void bf16_pairs_blocks(const uint16_t* xv, const int64_t* off, int n, const uint16_t* wv,
                                                 __m512 init, __m512i to_channels, int64_t pitch,
                                                 const OutputRows<uint16_t>& out, int64_t total) {
  __m512 acc[P];
  for (int64_t b0 = 0; b0 < total; b0 += P) {
    const int64_t q0 = std::min(b0, total - P);  // the last block overlaps the one before
    bf16_pairs_block<P, G>(xv, q0, off, n, wv, init, acc);
    int64_t m = q0 / pitch, c = q0 % pitch;
    for (int p = 0; p < P; ++p) {
      if (c < out.cols) {
        const __m256i y = cpu::bf16_bits_avx512(_mm512_permutexvar_ps(to_channels, acc[p]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.y + m * out.row_step + c * out.col_step), y);
      }
      if (++c == pitch) c = 0, ++m;
    }
  }
}

template <int G>
CS231N_AVX512_BF16 void bf16_pairs_vector(const uint16_t* xv, const int64_t* off, int n, const uint16_t* wv,
                                          const float* bias, const GroupLanes<float>& lanes, int64_t pitch,
                                          const OutputRows<uint16_t>& out) {
  if (out.rows <= 0 || out.cols <= 0) return;
  const int64_t total = (out.rows - 1) * pitch + out.cols;
  const __m512 init = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  int32_t order[16];
  for (int c = 0; c < 16; ++c) order[c] = static_cast<int32_t>(lanes.lane(c));
  const __m512i to_channels = _mm512_loadu_si512(order);
  switch (lanes_block(total, 24, 16, 8)) {
    case 24:
      return bf16_pairs_blocks<24, G>(xv, off, n, wv, init, to_channels, pitch, out, total);
    case 16:
      return bf16_pairs_blocks<16, G>(xv, off, n, wv, init, to_channels, pitch, out, total);
    case 8:
      return bf16_pairs_blocks<8, G>(xv, off, n, wv, init, to_channels, pitch, out, total);
    default:
      return bf16_pairs_blocks<1, G>(xv, off, n, wv, init, to_channels, pitch, out, total);
  }
}

// `count` pixels `pixel` apart from src (null: zeros), `vectors` vectors of 16 channels each, into dst in
// the pairs' order: vector v of pixel w at dst + v·plane + w·16.
CS231N_AVX512_BF16 inline void bf16_pairs_run(const uint16_t* src, int64_t pixel, int64_t count, int64_t vectors,
                                              uint16_t* dst, int64_t plane, const int16_t* order16) {
  const __m256i order = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(order16));
  for (int64_t w = 0; w < count; ++w) {
    for (int64_t v = 0; v < vectors; ++v) {
      const __m256i x = src ? _mm256_permutexvar_epi16(
                                  order, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + w * pixel + v * 16)))
                            : _mm256_setzero_si256();
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + v * plane + w * 16), x);
    }
  }
}

// Vectors [v0, v1) of one NHWC sample into xb (as interleaved_input: the stride's phases, zeros in the
// padding, every pixel written).
inline void bf16_pairs_input(const uint16_t* x, const Conv2dGeometry& g, const ShiftedPlanes& sp, int64_t v0,
                             int64_t v1, const int16_t* order, uint16_t* xb) {
  const int64_t plane = sp.plane() * 16, vectors = v1 - v0;
  for_phase_rows(g, sp, 16, x + v0 * 16, g.w * g.c, g.c, xb,
                 [&](const uint16_t* src, int64_t w0, int64_t w1, uint16_t* dst) {
                   bf16_pairs_run(nullptr, 0, w0, vectors, dst, plane, order);
                   bf16_pairs_run(src, sp.sw * g.c, w1 - w0, vectors, dst + w0 * 16, plane, order);
                   bf16_pairs_run(nullptr, 0, sp.wq - w1, vectors, dst + w1 * 16, plane, order);
                 });
}

// W_b [C/16][n][k/2][16][2] (bfloat16 bits): value(o, i, j) for lane l's filter o = v·16 + lanes.channel(l),
// input channel i = 2m + e of its group, tap j.
template <typename F>
std::vector<uint16_t> bf16_pair_filters(int64_t channels, int64_t n, const GroupLanes<float>& lanes, const F& value) {
  const int64_t pairs = lanes.k / 2;
  std::vector<uint16_t> w(channels * n * lanes.k);
  for (int64_t v = 0; v < channels / 16; ++v)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t m = 0; m < pairs; ++m)
        for (int64_t l = 0; l < 16; ++l)
          for (int64_t e = 0; e < 2; ++e)
            w[(((v * n + j) * pairs + m) * 16 + l) * 2 + e] = value(v * 16 + lanes.channel(l), 2 * m + e, j);
  return w;
}

inline void bf16_pairs_vector_for(int64_t G, const uint16_t* xv, const int64_t* off, int n, const uint16_t* wv,
                                  const float* bias, const GroupLanes<float>& lanes, int64_t pitch,
                                  const OutputRows<uint16_t>& out) {
  switch (G) {
    case 1:
      return bf16_pairs_vector<1>(xv, off, n, wv, bias, lanes, pitch, out);
    case 2:
      return bf16_pairs_vector<2>(xv, off, n, wv, bias, lanes, pitch, out);
    case 4:
      return bf16_pairs_vector<4>(xv, off, n, wv, bias, lanes, pitch, out);
    default:
      return bf16_pairs_vector<8>(xv, off, n, wv, bias, lanes, pitch, out);
  }
}

// The passes (conv2d_grouped.h's LanesPass, W_b by bf16_pair_filters) over every sample of x (NHWC, geometry
// `in`, laid out as sp with `tail` places of zeros after) into y (NHWC, in.f channels, `pixels` a sample),
// plus b (float32, or null).
inline void bf16_pairs_passes(const uint16_t* x, const Conv2dGeometry& in, const ShiftedPlanes& sp, int64_t tail,
                              const std::vector<LanesPass<uint16_t>>& passes, const float* b,
                              const GroupLanes<float>& lanes, uint16_t* y, int64_t pixels) {
  const std::vector<int16_t> order = bf16_pair_order(lanes);
  const std::vector<float> b_b = lanes.in_lanes(b, in.f);
  const int64_t in_sample = in.h * in.w * in.c, out_sample = pixels * in.f, plane = sp.plane() * 16;
  const VectorSlices split(in.n, in.c / 16);
  at::parallel_for(0, split.items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      int64_t n, v0, v1;
      split.of(item, &n, &v0, &v1);
      uint16_t* xb = cpu::thread_scratch<uint16_t>(cpu::Scratch::kPadded, (v1 - v0) * plane + tail * 16);
      bf16_pairs_input(x + n * in_sample, in, sp, v0, v1, order.data(), xb);
      std::fill(xb + (v1 - v0) * plane, xb + (v1 - v0) * plane + tail * 16, uint16_t(0));
      for (int64_t v = v0; v < v1; ++v) {
        for (const LanesPass<uint16_t>& q : passes) {
          const int taps = static_cast<int>(q.off.size());
          const OutputRows<uint16_t> rows{y + n * out_sample + q.first * in.f + v * 16, q.rows, q.cols,
                                          q.row_step * in.f, q.col_step * in.f};
          bf16_pairs_vector_for(lanes.G, xb + (v - v0) * plane, q.off.data(), taps,
                                q.w_b.data() + v * taps * lanes.k * 16, b ? b_b.data() + v * 16 : nullptr, lanes, sp.wq,
                                rows);
        }
      }
    }
  });
}

// y = conv(x, W) + b, channels_last bfloat16 (b float32 or null). W: the layer's filters (bfloat16, any
// strides), or when g is a transposed convolution those of transposed_filters.
inline void grouped_forward_bf16(const c10::BFloat16* x, const at::Tensor& w, const float* b, c10::BFloat16* y,
                                 const Conv2dGeometry& g) {
  const GroupLanes<float> lanes(g.c_per_group());
  const LanesPlanes lp = lanes_planes(g);
  const ShiftedPlanes& sp = lp.sp;
  const auto a = w.accessor<c10::BFloat16, 4>();
  LanesPass<uint16_t> all{{}, {}, 0, g.oh, g.ow, g.ow, 1};
  for (int64_t t = 0; t < g.taps(); ++t) all.off.push_back(shifted_offset(g, sp, t));
  all.w_b = bf16_pair_filters(g.f, g.taps(), lanes,
                              [&](int64_t o, int64_t i, int64_t t) { return a[o][i][t / g.kw][t % g.kw].x; });
  bf16_pairs_passes(reinterpret_cast<const uint16_t*>(x), g, sp, lp.tail, {all}, b, lanes,
                    reinterpret_cast<uint16_t*>(y), g.col_cols());
}

// d_x of a strided layer by the stride's phases (InputGradPhases), channels_last bfloat16.
inline void grouped_input_grad_phases_bf16(const c10::BFloat16* dy, const at::Tensor& w, c10::BFloat16* dx,
                                           const Conv2dGeometry& g) {
  const GroupLanes<float> lanes(g.c_per_group());
  const InputGradPhases ph(g);
  const int64_t k = lanes.k;
  const auto a = w.accessor<c10::BFloat16, 4>();
  std::vector<LanesPass<uint16_t>> passes;
  for (const InputGradPhases::Phase& q : ph.phases) {
    LanesPass<uint16_t> p{{}, {}, q.a_h * g.w + q.a_w, q.outputs_h, q.outputs_w, g.sh * g.w, g.sw};
    for (size_t j = 0; j < q.taps.size(); ++j) p.off.push_back(q.off_h[j] * ph.plane.wq + q.off_w[j]);
    p.w_b = bf16_pair_filters(g.c, q.taps.size(), lanes, [&](int64_t c, int64_t i, int64_t j) {
      const int64_t t = q.taps[j];
      return a[c - c % k + i][c % k][t / g.kw][t % g.kw].x;
    });
    passes.push_back(std::move(p));
  }
  bf16_pairs_passes(reinterpret_cast<const uint16_t*>(dy), ph.dy, ph.plane, /*tail=*/0, passes, nullptr, lanes,
                    reinterpret_cast<uint16_t*>(dx), g.h * g.w);
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
#endif  // CS231N_X86
