// The CPU convolution in bfloat16 on AVX512-BF16: vdpbf16ps multiplies pairs of bfloat16 values and adds
// both products into a float32 lane, 32 products per instruction, twice the float32 FMA's rate. Products
// are exact in float32 and summed there, and the result is rounded to bfloat16 once: the numbers of the
// float32 route on the same bfloat16 operands, up to the order of the float32 additions.
// Part of the CPU convolution (cpu/conv2d.cpp, which routes each layer; docs/conv2d.md has the table).
//
// The form is the channels_last one (conv2d_pixels.h): per sample, Y'[pixel, f] = Σ_taps Σ_c
// x_pad[pixel + offset(t), c] · W[f, c, t], where x_pad is the padded sample split into the stride's phases
// (conv2d_shifted.h: with stride s, the input under tap t of output o is element o + floor(t*d/s) of phase
// t*d mod s, so each tap is again one shift, in the outputs' row pitch Wq; stride 1 has one phase). vdpbf16ps takes its
// k in pairs: here pairs of channels, which lie side by side in a padded pixel (x_pad keeps an even channel pitch, the
// odd one zero), so A is read in place, one 32-bit broadcast per pixel and pair. The filters are packed once per call
// into slivers of 64 filters: for each tap and channel pair, 64 words of (W[f, 2q, t], W[f, 2q+1, t]).
//
//   micro-kernel   6 pixels x 64 filters: 24 zmm accumulators, 4 B vectors, 1 broadcast (bf16_step)
//                  per (tap, pair) step: 4 loads, 6 broadcasts, 24 vdpbf16ps (768 products)
//
// One group, any stride and dilation: the forward and d_W (a product over pixel pairs, below). d_x of a
// stride-1 layer is the same form (the transposed convolution); d_x of a strided one, and grouped layers,
// run the float32 kernels (cpu/reduced_float.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/conv2d.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/conv2d_pixels.h"
#include "cpu/conv2d_shifted.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"
#include "cpu/reduced_float.h"

namespace torch_cs231n {
namespace conv2d_cpu {

constexpr int kBf16Mr = 6, kBf16Nr = 64;

// Whether the bfloat16 route takes the layer: the CPU has AVX512-BF16 (and AVX-512 is the ISA in force,
// so that the ISA cap of the tests reaches it), one group.
inline bool bf16_direct(const Conv2dGeometry& g) {
  return cpu::cpu_isa() == cpu::Isa::kAvx512 && cpu::has_avx512_bf16() && g.groups == 1 && g.f > 0 && g.c > 0;
}

// d_W's tiles are kBf16Nr = 64 channels wide: with fewer than 32 channels most of each tile is padding, and
// the float32 kernels on converted copies are faster (the 7x7 stem on 3 channels: 194 against 33 ms).
inline bool bf16_weight_grad_direct(const Conv2dGeometry& g) { return bf16_direct(g) && 2 * g.c >= kBf16Nr; }

// x_pad's channel pairs are read as 32-bit words through this type, which may alias its uint16_t storage.
typedef uint32_t bf16_word __attribute__((__may_alias__));

// Two bfloat16 values (their bits) as the 32-bit word vdpbf16ps reads: lo in the low half.
inline uint32_t bf16_pair(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
}

inline uint16_t bf16_bits(const c10::BFloat16& v) { return v.x; }

// The filters, packed: sliver s (filters 64s .. 64s+63), tap t, channel pair q at
// packed[((s * taps + t) * pairs + q) * 64 + j] = (W[64s+j, 2q, t], W[64s+j, 2q+1, t]), 0 past F or C.
inline std::vector<uint32_t> pack_bf16_filters(const at::Tensor& w, const Conv2dGeometry& g, int64_t pairs) {
  const int64_t taps = g.taps(), slivers = (g.f + kBf16Nr - 1) / kBf16Nr;
  std::vector<uint32_t> packed(slivers * taps * pairs * kBf16Nr, 0);
  const auto* wp = w.const_data_ptr<c10::BFloat16>();
  const int64_t sf = w.stride(0), sc = w.stride(1), sh = w.stride(2), sw = w.stride(3);
  for (int64_t f = 0; f < g.f; ++f) {
    for (int64_t t = 0; t < taps; ++t) {
      const c10::BFloat16* base = wp + f * sf + (t / g.kw) * sh + (t % g.kw) * sw;
      uint32_t* out = packed.data() + ((f / kBf16Nr) * taps + t) * pairs * kBf16Nr + f % kBf16Nr;
      for (int64_t q = 0; q < pairs; ++q) {
        const uint16_t lo = bf16_bits(base[2 * q * sc]);
        const uint16_t hi = 2 * q + 1 < g.c ? bf16_bits(base[(2 * q + 1) * sc]) : uint16_t(0);
        out[q * kBf16Nr] = bf16_pair(lo, hi);
      }
    }
  }
  return packed;
}

// x_pad: the sample with its zero border, split into the stride's phases, pixel-major: padded pixel
// (pi, pj) is pixel (pi / sH, pj / sW) of phase (pi % sH, pj % sW), at ((phase * Hq + pi / sH) * Wq + pj / sW)
// (the layout of conv2d_shifted.h's pad_planes, with the channels innermost). Channel pitch cp = C rounded
// up to even (the odd channel zero). From NHWC (`planes` false) or NCHW (`planes` true) memory. Only the
// phases some tap reads are filled in (`used`, from bf16_used_phases): a 1x1 stride-2 layer reads one of 4.
inline void pad_bf16_pixels(const c10::BFloat16* x, const Conv2dGeometry& g, const ShiftedPlanes& sp, int64_t cp,
                            bool planes, const std::vector<uint8_t>& used, uint16_t* x_pad) {
  const auto* xb = reinterpret_cast<const uint16_t*>(x);
  std::fill(x_pad, x_pad + sp.plane() * cp, uint16_t(0));
  for (int64_t i = 0; i < g.h; ++i) {
    const int64_t pi = g.ph + i;
    for (int64_t j = 0; j < g.w; ++j) {
      const int64_t pj = g.pw + j, phase = (pi % sp.sh) * sp.sw + pj % sp.sw;
      if (!used[phase]) continue;
      uint16_t* pixel = x_pad + ((phase * sp.hq + pi / sp.sh) * sp.wq + pj / sp.sw) * cp;
      if (planes) {
        for (int64_t c = 0; c < g.c; ++c) pixel[c] = xb[(c * g.h + i) * g.w + j];
      } else {
        std::memcpy(pixel, xb + (i * g.w + j) * g.c, g.c * sizeof(uint16_t));
      }
    }
  }
}

// Which phases the taps read: tap (t_h, t_w) reads phase ((t_h*dH) % sH, (t_w*dW) % sW).
inline std::vector<uint8_t> bf16_used_phases(const Conv2dGeometry& g, const ShiftedPlanes& sp) {
  std::vector<uint8_t> used(sp.sh * sp.sw, 0);
  for (int64_t th = 0; th < g.kh; ++th) {
    for (int64_t tw = 0; tw < g.kw; ++tw) used[(th * g.dh % sp.sh) * sp.sw + tw * g.dw % sp.sw] = 1;
  }
  return used;
}

#if CS231N_X86
// The two tiles below share their register block (kBf16Mr rows x kBf16Nr columns of float32
// accumulators) and these parts of it, always inlined so that the accumulators stay in registers.
#define CS231N_BF16_INLINE CS231N_AVX512_BF16 inline __attribute__((always_inline))
constexpr int kBf16Nv = kBf16Nr / 16;  // zmm vectors per row
using Bf16Tile = __m512[kBf16Mr][kBf16Nv];

CS231N_BF16_INLINE void bf16_zero(Bf16Tile& acc) {
#pragma GCC unroll 8
  for (int r = 0; r < kBf16Mr; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kBf16Nv; ++v) acc[r][v] = _mm512_setzero_ps();
  }
}

// One k pair: acc[r] += (the pair a(r), broadcast) · (the kBf16Nr pairs at b), for every row r.
template <typename AWord>
CS231N_BF16_INLINE void bf16_step(Bf16Tile& acc, const bf16_word* b, const AWord& a) {
  __m512i bv[kBf16Nv];
#pragma GCC unroll 4
  for (int v = 0; v < kBf16Nv; ++v) bv[v] = _mm512_loadu_si512(b + 16 * v);
#pragma GCC unroll 8
  for (int r = 0; r < kBf16Mr; ++r) {
    const __m512i av = _mm512_set1_epi32(static_cast<int>(a(r)));
#pragma GCC unroll 4
    for (int v = 0; v < kBf16Nv; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
  }
}

// The tile's first m rows and n columns into c (row stride ldc): plus the bias (a row of kBf16Nr values)
// when there is one, plus c's own values when `accumulate`.
CS231N_BF16_INLINE void bf16_store(const Bf16Tile& acc, float* c, int64_t ldc, int m, int n, const float* bias,
                                   bool accumulate) {
  __mmask16 mask[kBf16Nv];
#pragma GCC unroll 4
  for (int v = 0; v < kBf16Nv; ++v) mask[v] = static_cast<__mmask16>((1u << std::clamp(n - 16 * v, 0, 16)) - 1u);
#pragma GCC unroll 8
  for (int r = 0; r < kBf16Mr; ++r) {
    if (r >= m) break;
#pragma GCC unroll 4
    for (int v = 0; v < kBf16Nv; ++v) {
      float* out = c + r * ldc + 16 * v;
      __m512 x = acc[r][v];
      if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask[v], bias + 16 * v));
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask[v], out));
      _mm512_mask_storeu_ps(out, mask[v], x);
    }
  }
}

// One tile of the forward: rows (pixels) i .. i+m-1 of Y' and the filters of one sliver, all taps and
// channel pairs in registers. a_tap[t] points at pixel i under tap t, as 32-bit words (pairs), `lda`
// words per pixel. Rows r >= m read pixel i (never stored); stored with the bias, its first n columns.
CS231N_AVX512_BF16 inline void bf16_tile(int64_t taps, int64_t pairs, const bf16_word* const* a_tap, int64_t lda,
                                         const uint32_t* b, float* c, int64_t ldc, int m, int n, const float* bias) {
  Bf16Tile acc;
  bf16_zero(acc);
  for (int64_t t = 0; t < taps; ++t) {
    const bf16_word* ar[kBf16Mr];
#pragma GCC unroll 8
    for (int r = 0; r < kBf16Mr; ++r) ar[r] = a_tap[t] + (r < m ? r : 0) * lda;
    const auto* bt = reinterpret_cast<const bf16_word*>(b + t * pairs * kBf16Nr);
#pragma GCC unroll 2
    for (int64_t q = 0; q < pairs; ++q) bf16_step(acc, bt + q * kBf16Nr, [&ar, q](int r) { return ar[r][q]; });
  }
  bf16_store(acc, c, ldc, m, n, bias, /*accumulate=*/false);
}
#endif

// y (bfloat16; NHWC, or NCHW when `planes`) = conv(x, w) + b for a one-group layer (bf16_direct).
// x and y are in the same layout; w is any (F, C, kH, kW) bfloat16 tensor; b a float32 copy of the bias.
inline void conv_forward_bf16(const c10::BFloat16* x, const at::Tensor& w, const float* b, c10::BFloat16* y,
                              const Conv2dGeometry& g, bool planes) {
#if CS231N_X86
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t cp = g.c + (g.c & 1), pairs = cp / 2, taps = g.taps();
  const std::vector<uint32_t> filters = pack_bf16_filters(w, g, pairs);
  const std::vector<uint8_t> used = bf16_used_phases(g, sp);
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * g.oh * g.ow;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.n, at::get_num_threads()));
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<uint16_t> x_pad(sp.plane() * cp);
    std::vector<float> out(sp.cols * g.f), rows(g.f * g.ow);
    std::vector<const bf16_word*> a_tap(taps);
    std::vector<int64_t> offsets(taps);
    for (int64_t t = 0; t < taps; ++t) offsets[t] = shifted_offset(g, sp, t);  // B's row (c = 0, t): the tap's pixel
    const auto* words = reinterpret_cast<const bf16_word*>(x_pad.data());
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        pad_bf16_pixels(x + n * in_sample, g, sp, cp, planes, used, x_pad.data());
        for (int64_t j = 0; j < g.f; j += kBf16Nr) {
          const int n_tile = static_cast<int>(std::min<int64_t>(kBf16Nr, g.f - j));
          const uint32_t* sliver = filters.data() + (j / kBf16Nr) * taps * pairs * kBf16Nr;
          for (int64_t i = 0; i < sp.cols; i += kBf16Mr) {
            const int m_tile = static_cast<int>(std::min<int64_t>(kBf16Mr, sp.cols - i));
            for (int64_t t = 0; t < taps; ++t) a_tap[t] = words + (i + offsets[t]) * pairs;
            bf16_tile(taps, pairs, a_tap.data(), pairs, sliver, out.data() + i * g.f + j, g.f, m_tile, n_tile,
                      b ? b + j : nullptr);
          }
        }
        // The oW real pixels of each output row, rounded to bfloat16 once.
        c10::BFloat16* y_n = y + n * out_sample;
        for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
          const float* src = out.data() + o_h * sp.wq * g.f;  // [oW x F]
          if (!planes) {
            cpu::from_float(src, g.ow * g.f, y_n + o_h * g.ow * g.f);
            continue;
          }
          cpu::transpose_matrix(src, g.f, g.ow, g.f, rows.data(), g.ow);  // [F x oW]
          for (int64_t f = 0; f < g.f; ++f) {
            cpu::from_float(rows.data() + f * g.ow, g.ow, y_n + (f * g.oh + o_h) * g.ow);
          }
        }
      }
    }
  });
#else
  (void)x, (void)w, (void)b, (void)y, (void)g, (void)planes;
  TORCH_CHECK(false, "conv_forward_bf16: AVX512-BF16 is an x86 instruction set");
#endif
}

// ------------------------------------------------------------------------------------------------ d_W
// d_W[f, t, c] = Σ_pixels dY'[p, f] · x_pad[p + offset(t), c], with dY' = dY in the pitch Wq (zeros in
// the thrown-away pixels, as conv_weight_grad_nhwc). k is the pixel here, taken in pairs (2q, 2q+1):
//   A: dy_pairs[q * F + f]   = (dY'[2q, f], dY'[2q+1, f])
//   B: x_pairs[p * cw + c]   = (x_pad[p, c], x_pad[p+1, c])          every pixel p, so that the pair of any
//      tap, (x_pad[2q + o, c], x_pad[2q + 1 + o, c]), is the word at p = 2q + o: read in place
// (cw: C rounded up to 16, whole vectors). A tile is 6 filters x 64 channels of one tap, summed over all
// pixel pairs, added into d_W.
//
// Small images go in blocks of samples, their padded planes one after the other: an output pixel's taps
// stay inside its own sample's plane, so the pixels of a block are one sum. ResNet's 4x4 stage has 22
// pixels a sample: summed per sample, each tile's store outweighed its products, and d_W (9 MiB at 512
// channels) was read and written 16 times a batch (14.9 ms; in blocks of 512 pixels, 6.7). Longer
// blocks cost more than they save: 8x8 planes took 2.4 ms per sample, 2.7 in blocks of 5, and strided
// 28x28 planes (900 pixels) 6.2 per sample, 14.7 in pairs.
constexpr int64_t kBf16WeightGradBlockPixels = 512;

#if CS231N_X86
CS231N_AVX512_BF16 inline void bf16_weight_grad_tile(int64_t pairs, const bf16_word* a, int64_t lda, const bf16_word* b,
                                                     int64_t ldb, float* c, int64_t ldc, int m, int n) {
  Bf16Tile acc;
  bf16_zero(acc);
#pragma GCC unroll 2
  for (int64_t q = 0; q < pairs; ++q) {
    const bf16_word* aq = a + q * lda;
    bf16_step(acc, b + q * ldb, [aq, m](int r) { return aq[r < m ? r : 0]; });
  }
  bf16_store(acc, c, ldc, m, n, /*bias=*/nullptr, /*accumulate=*/true);
}
#undef CS231N_BF16_INLINE
#endif

// d_W (float32, [F][taps][C]: W's shape in channels_last memory) of a bf16_direct layer, from bfloat16
// dy and x (NHWC, or NCHW when `planes`). Each chunk of samples sums into its own d_W; the chunks are then
// added in order, so the result does not depend on the thread count's timing.
inline at::Tensor conv_weight_grad_bf16(const c10::BFloat16* dy, const c10::BFloat16* x, const Conv2dGeometry& g,
                                        bool planes) {
  at::Tensor dw = at::zeros({g.f, g.taps() * g.c}, at::TensorOptions().dtype(at::kFloat));
#if CS231N_X86
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t cp = g.c + (g.c & 1), cw = (g.c + 15) / 16 * 16, taps = g.taps();
  const int64_t plane = sp.plane(), ldc = taps * g.c;
  const std::vector<uint8_t> used = bf16_used_phases(g, sp);
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * g.oh * g.ow;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.n, at::get_num_threads()));
  const int64_t block = std::clamp<int64_t>(kBf16WeightGradBlockPixels / plane, 1, (g.n + chunks - 1) / chunks);
  const int64_t max_pairs = ((block - 1) * plane + sp.cols + 1) / 2;
  std::vector<float> partial(chunks * g.f * ldc, 0.0f);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    // Two zero pixels past the block: the pair of the last pixel, and the word after it.
    std::vector<uint16_t> x_pad((block * plane + 2) * cp, 0);
    std::vector<uint32_t> x_pairs((block * plane + 1) * cw, 0), dy_pairs(max_pairs * g.f, 0);
    std::vector<uint16_t> dy_pitch(2 * max_pairs * g.f, 0);  // dY' (its gaps are never written: they stay 0)
    std::vector<int64_t> offsets(taps);
    for (int64_t t = 0; t < taps; ++t) offsets[t] = shifted_offset(g, sp, t);  // B's row (c = 0, t): the tap's pixel
    const auto* dyb = reinterpret_cast<const uint16_t*>(dy);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      float* dw_chunk = partial.data() + chunk * g.f * ldc;
      const int64_t n_end = chunk_begin(chunk + 1, chunks, g.n);
      for (int64_t n0 = chunk_begin(chunk, chunks, g.n); n0 < n_end; n0 += block) {
        const int64_t nb = std::min(block, n_end - n0);
        const int64_t pixels = nb * plane, pairs = ((nb - 1) * plane + sp.cols + 1) / 2;
        for (int64_t s = 0; s < nb; ++s) {
          pad_bf16_pixels(x + (n0 + s) * in_sample, g, sp, cp, planes, used, x_pad.data() + s * plane * cp);
        }
        std::fill(x_pad.data() + pixels * cp, x_pad.data() + (pixels + 2) * cp, uint16_t(0));
        for (int64_t p = 0; p <= pixels; ++p) {
          const uint16_t *here = x_pad.data() + p * cp, *next = here + cp;
          for (int64_t c = 0; c < g.c; ++c) x_pairs[p * cw + c] = bf16_pair(here[c], next[c]);
        }
        // dY' in the pitch Wq, sample after sample, then in pairs of pixels. A smaller block than the last
        // leaves that block's values past its own end: the pixels read beyond this block's outputs are zeroed.
        for (int64_t s = 0; s < nb; ++s) {
          const uint16_t* dy_n = dyb + (n0 + s) * out_sample;
          for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
            uint16_t* row = dy_pitch.data() + (s * plane + o_h * sp.wq) * g.f;
            if (!planes) {
              std::memcpy(row, dy_n + o_h * g.ow * g.f, g.ow * g.f * sizeof(uint16_t));
              continue;
            }
            for (int64_t f = 0; f < g.f; ++f) {
              const uint16_t* src = dy_n + (f * g.oh + o_h) * g.ow;
              for (int64_t o_w = 0; o_w < g.ow; ++o_w) row[o_w * g.f + f] = src[o_w];
            }
          }
        }
        std::fill(dy_pitch.data() + ((nb - 1) * plane + sp.cols) * g.f, dy_pitch.data() + 2 * pairs * g.f, uint16_t(0));
        for (int64_t q = 0; q < pairs; ++q) {
          const uint16_t *even = dy_pitch.data() + 2 * q * g.f, *odd = even + g.f;
          for (int64_t f = 0; f < g.f; ++f) dy_pairs[q * g.f + f] = bf16_pair(even[f], odd[f]);
        }
        const auto* a = reinterpret_cast<const bf16_word*>(dy_pairs.data());
        const auto* b = reinterpret_cast<const bf16_word*>(x_pairs.data());
        for (int64_t t = 0; t < taps; ++t) {
          for (int64_t c0 = 0; c0 < g.c; c0 += kBf16Nr) {
            const int n_tile = static_cast<int>(std::min<int64_t>(kBf16Nr, g.c - c0));
            for (int64_t f0 = 0; f0 < g.f; f0 += kBf16Mr) {
              const int m_tile = static_cast<int>(std::min<int64_t>(kBf16Mr, g.f - f0));
              bf16_weight_grad_tile(pairs, a + f0, g.f, b + offsets[t] * cw + c0, 2 * cw,
                                    dw_chunk + f0 * ldc + t * g.c + c0, ldc, m_tile, n_tile);
            }
          }
        }
      }
    }
  });
  float* out = dw.mutable_data_ptr<float>();
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const float* part = partial.data() + chunk * g.f * ldc;
    for (int64_t i = 0; i < g.f * ldc; ++i) out[i] += part[i];
  }
#else
  (void)dy, (void)x, (void)g, (void)planes;
  TORCH_CHECK(false, "conv_weight_grad_bf16: AVX512-BF16 is an x86 instruction set");
#endif
  return dw;
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
