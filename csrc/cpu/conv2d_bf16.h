// The CPU convolution in bfloat16 on AVX512-BF16: vdpbf16ps multiplies pairs of bfloat16 values and adds
// both products into a float32 lane, 32 products per instruction, twice the float32 FMA's rate. Products
// are exact in float32 and summed there, and the result is rounded to bfloat16 once: the numbers of the
// float32 route on the same bfloat16 operands, up to the order of the float32 additions.
// Part of the CPU convolution (cpu/conv2d.cpp, which routes each layer; docs/conv2d.md has the table).
// Where the CPU has AMX, conv2d_amx.h runs these forms on tiles (cpu/amx_tiles.h), and so does the forward
// by windows below.
//
// The form is the channels_last one (conv2d_pixels.h): per sample, Y'[pixel, f] = Σ_taps Σ_c
// x_pad[pixel + offset(t), c] · W[f, c, t], where x_pad is the padded sample split into the stride's
// phases (conv2d_shifted.h: with stride s, the input under tap t of output o is element o + floor(t*d/s)
// of phase t*d mod s, so each tap is again one shift, in the outputs' row pitch Wq; stride 1 has one
// phase). vdpbf16ps takes its k in pairs: here pairs of channels, which lie side by side in a padded pixel
// (x_pad keeps an even channel pitch, the odd one zero), so A is read in place, one 32-bit broadcast per
// pixel and pair. The filters are packed at every call into slivers of 64 filters: for each tap and
// channel pair, 64 words of (W[f, 2q, t], W[f, 2q+1, t]).
//
//   micro-kernel   6 pixels x 64 filters: 24 zmm accumulators, 4 B vectors, 1 broadcast (bf16_step)
//                  per (tap, pair) step: 4 loads, 6 broadcasts, 24 vdpbf16ps (768 products)
//
// One group, any stride and dilation. d_x is the transposed convolution, the same form (of each of the
// stride's phases when strided, dilation 1); d_W a product over pixel pairs (below). Small images go by
// pixel rows. d_x and d_W of layers under 32 input channels, d_x of dilated strided layers, and grouped
// layers run the float32 kernels (cpu/reduced_float.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "common/conv2d.h"
#include "cpu/amx_tiles.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/conv2d_pixels.h"
#include "cpu/conv2d_shifted.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"
#include "cpu/reduced_float.h"
#include "cpu/transpose16.h"

namespace torch_cs231n {
namespace conv2d_cpu {

constexpr int kBf16Mr = 6, kBf16Nr = 64;

// Whether the bfloat16 route takes the layer: the CPU has AVX512-BF16 (and AVX-512 is the ISA in force,
// so that the ISA cap of the tests reaches it), one group.
inline bool bf16_direct(const Conv2dGeometry& g) {
  return cpu::cpu_isa() == cpu::Isa::kAvx512 && cpu::has_avx512_bf16() && g.groups == 1 && g.f > 0 && g.c > 0;
}

// d_W's tiles are kBf16Nr = 64 wide: along the channels, or for a layer of fewer than 32 channels (a stem:
// 3 of 64 would be used) along the filters, with (tap, channel) as the rows (bf16_weight_grad_by_taps; large
// images only). With both under 32, most of each tile is padding, and the float32 kernels on converted
// copies are faster.
inline bool bf16_pixel_rows(const Conv2dGeometry& g) { return g.col_cols() < kMinPixelsPerSample; }  // see below
inline bool bf16_weight_grad_by_taps(const Conv2dGeometry& g) {
  return bf16_direct(g) && 2 * g.c < kBf16Nr && 2 * g.f >= kBf16Nr && !bf16_pixel_rows(g);
}
inline bool bf16_weight_grad_direct(const Conv2dGeometry& g) {
  return bf16_direct(g) && (2 * g.c >= kBf16Nr || bf16_weight_grad_by_taps(g));
}

// x_pad's channel pairs are read as 32-bit words through this type, which may alias its uint16_t storage.
typedef uint32_t bf16_word __attribute__((__may_alias__));

// Two bfloat16 values (their bits) as the 32-bit word vdpbf16ps reads: lo in the low half.
inline uint32_t bf16_pair(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
}

// The filters of a layer as this route reads them, W[f, c, t_h, t_w] = base[f*sf + c*sc + t_h*sh + t_w*sw]:
// a bfloat16 tensor of any strides (`of`), or the filters of its transposed convolution, W_t[c, f, t] =
// W[f, c, flipped t] (`transposed_of`: the channels swapped and the taps reversed by the strides alone,
// where torch's flip would copy the weight: 1.4 ms for 512 x 512 x 3 x 3).
struct Bf16Filters {
  const c10::BFloat16* base;
  int64_t sf, sc, sh, sw;

  static Bf16Filters of(const at::Tensor& w) {
    return {w.const_data_ptr<c10::BFloat16>(), w.stride(0), w.stride(1), w.stride(2), w.stride(3)};
  }
  static Bf16Filters transposed_of(const at::Tensor& w) {
    const c10::BFloat16* last_tap =
        w.const_data_ptr<c10::BFloat16>() + (w.size(2) - 1) * w.stride(2) + (w.size(3) - 1) * w.stride(3);
    return {last_tap, w.stride(1), w.stride(0), -w.stride(2), -w.stride(3)};
  }
};

// The filters, packed: sliver s (filters 64s .. 64s+63), tap t, channel pair q at
// packed[((s * taps + t) * pairs + q) * 64 + j] = (W[64s+j, 2q, t], W[64s+j, 2q+1, t]), 0 past F or C.

// The step from one tap to the next, when each (filter, channel)'s taps lie in one run of memory, read
// forwards (+1: an NCHW weight) or backwards (-1: its transposed view); 0 otherwise.
inline int64_t bf16_tap_run_step(const Bf16Filters& w, const Conv2dGeometry& g) {
  const int64_t step = g.kw > 1 ? w.sw : w.sh;
  const bool even = g.kh == 1 || g.kw == 1 || w.sh == g.kw * w.sw;
  return even && (step == 1 || step == -1) ? step : 0;
}

#if CS231N_X86
// (GCC 12 bug 105593: intrinsics whose unused source is _mm512_undefined_*() warn once inlined here.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Pairs [q0, q1) of sliver s from tap runs: for 16 filters and one channel pair, the two channels' runs
// (up to 16 taps) widened into words, lo | hi << 16, then the 16 filters' words transposed in registers
// (cpu/transpose16.h) into one vector per tap. Filters outermost: 16 runs are read side by side.
CS231N_AVX512_BF16 inline void pack_bf16_tap_runs(const Bf16Filters& w, const Conv2dGeometry& g, int64_t pairs,
                                                  int64_t step, int64_t s, int64_t q0, int64_t q1, uint32_t* packed) {
  const int64_t taps = g.taps(), f0 = s * kBf16Nr, nf = std::min<int64_t>(kBf16Nr, g.f - f0);
  const auto* wb = reinterpret_cast<const uint16_t*>(w.base);
  for (int64_t jb = 0; jb < kBf16Nr; jb += 16) {
    for (int64_t q = q0; q < q1; ++q) {
      const bool hi_exists = 2 * q + 1 < g.c;
      for (int64_t t0 = 0; t0 < taps; t0 += 16) {
        const int valid = static_cast<int>(std::min<int64_t>(16, taps - t0));
        const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
        // the lowest address of the run of taps [t0, t0 + valid)
        const int64_t low = step > 0 ? t0 : -(t0 + valid - 1);
        __m512 r[16];
        for (int i = 0; i < 16; ++i) {
          if (jb + i >= nf) {
            r[i] = _mm512_setzero_ps();
            continue;
          }
          const uint16_t* lo = wb + (f0 + jb + i) * w.sf + 2 * q * w.sc + low;
          const __m512i l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, lo));
          const __m512i h =
              hi_exists ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, lo + w.sc)) : _mm512_setzero_si512();
          r[i] = _mm512_castsi512_ps(_mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
        }
        cpu::transpose16(r);  // r[m]: the 16 filters' words at position m of their runs
        for (int m = 0; m < valid; ++m) {
          const int64_t t = step > 0 ? t0 + m : t0 + valid - 1 - m;
          _mm512_storeu_ps(reinterpret_cast<float*>(packed + ((s * taps + t) * pairs + q) * kBf16Nr + jb), r[m]);
        }
      }
    }
  }
}
// Tap t of sliver s where the filters lie side by side (sf = 1: NCHW 1 × 1 and channels_last weights,
// turned for d_x): a pair's two channels are two runs of filters, 16 at a time widened into words and
// interleaved, lo | hi << 16.
CS231N_AVX512_BF16 inline void pack_bf16_filter_runs(const Bf16Filters& w, const Conv2dGeometry& g, int64_t pairs,
                                                     int64_t s, int64_t t, uint32_t* packed) {
  const int64_t taps = g.taps(), f0 = s * kBf16Nr, nf = std::min<int64_t>(kBf16Nr, g.f - f0);
  const auto* tap = reinterpret_cast<const uint16_t*>(w.base) + (t / g.kw) * w.sh + (t % g.kw) * w.sw + f0;
  uint32_t* out = packed + (s * taps + t) * pairs * kBf16Nr;
  for (int64_t q = 0; q < (g.c + 1) / 2; ++q) {
    for (int64_t j = 0; j < nf; j += 16) {
      const __mmask16 mask = cpu::lane_mask(static_cast<int>(std::min<int64_t>(16, nf - j)));
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, tap + 2 * q * w.sc + j));
      const __m512i hi = 2 * q + 1 < g.c
                             ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, tap + (2 * q + 1) * w.sc + j))
                             : _mm512_setzero_si512();
      _mm512_storeu_si512(out + q * kBf16Nr + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}
#pragma GCC diagnostic pop
#endif

// `pairs` is the pitch, at least C/2 rounded up (AMX's tiles want a multiple of 16; the pairs past C stay
// 0). In parallel: over (sliver, tap) where the channels lie side by side, as a transpose of the filters'
// 32-bit pairs (NCHW 1 × 1 and channels_last weights, forwards), or where the filters do (those turned
// for d_x), by pack_bf16_filter_runs; over (sliver, 16 pairs) from tap runs; otherwise over (sliver, tap),
// element by element. (A 1 × 1 layer's 1024 × 256 filters took 0.16 ms by its runs of one tap, a sixth
// of its forward at batch 16 on 8 × 8.)
inline std::vector<uint32_t> pack_bf16_filters(const Bf16Filters& w, const Conv2dGeometry& g, int64_t pairs) {
  const int64_t taps = g.taps(), slivers = (g.f + kBf16Nr - 1) / kBf16Nr, real = (g.c + 1) / 2;
  std::vector<uint32_t> packed(slivers * taps * pairs * kBf16Nr, 0);
  const auto* wb = reinterpret_cast<const uint16_t*>(w.base);
#if CS231N_X86
  const bool words = w.sc == 1 && g.c % 2 == 0 && w.sf % 2 == 0 && (g.kh == 1 || w.sh % 2 == 0) &&
                     (g.kw == 1 || w.sw % 2 == 0) && reinterpret_cast<uintptr_t>(wb) % sizeof(float) == 0;
  if (words || w.sf == 1) {
    at::parallel_for(0, slivers * taps, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / taps, t = task % taps, f0 = s * kBf16Nr;
        if (!words) {
          pack_bf16_filter_runs(w, g, pairs, s, t, packed.data());
          continue;
        }
        // packed[q * 64 + j] = the word of filter f0 + j at pair q: rows of sf / 2 words transposed
        const uint16_t* tap = wb + (t / g.kw) * w.sh + (t % g.kw) * w.sw + f0 * w.sf;
        cpu::transpose_matrix(reinterpret_cast<const float*>(tap), w.sf / 2, std::min<int64_t>(kBf16Nr, g.f - f0), real,
                              reinterpret_cast<float*>(packed.data() + task * pairs * kBf16Nr), kBf16Nr);
      }
    });
    return packed;
  }
  if (const int64_t step = bf16_tap_run_step(w, g)) {
    const int64_t blocks = (real + 15) / 16;
    at::parallel_for(0, slivers * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / blocks, q0 = task % blocks * 16;
        pack_bf16_tap_runs(w, g, pairs, step, s, q0, std::min<int64_t>(real, q0 + 16), packed.data());
      }
    });
    return packed;
  }
#endif
  at::parallel_for(0, slivers * taps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / taps, t = task % taps, f0 = s * kBf16Nr;
      const int64_t nf = std::min<int64_t>(kBf16Nr, g.f - f0);
      const uint16_t* tap = wb + (t / g.kw) * w.sh + (t % g.kw) * w.sw;
      uint32_t* out = packed.data() + task * pairs * kBf16Nr;
      const auto word = [&](int64_t j, int64_t q) {  // (W[f0+j, 2q, t], W[f0+j, 2q+1, t]), 0 past C
        const uint16_t* filter = tap + (f0 + j) * w.sf;
        return bf16_pair(filter[2 * q * w.sc], 2 * q + 1 < g.c ? filter[(2 * q + 1) * w.sc] : uint16_t(0));
      };
      // The inner loop along the smaller stride (the channels of a weight, its filters when transposed).
      if (std::abs(w.sc) <= std::abs(w.sf)) {
        for (int64_t j = 0; j < nf; ++j) {
          for (int64_t q = 0; q < real; ++q) out[q * kBf16Nr + j] = word(j, q);
        }
      } else {
        for (int64_t q = 0; q < real; ++q) {
          for (int64_t j = 0; j < nf; ++j) out[q * kBf16Nr + j] = word(j, q);
        }
      }
    }
  });
  return packed;
}

// dst[p * dst_stride + c] = src[c * src_stride + p] for c < channels, p < count: bfloat16 planes (NCHW) to
// pixels (channels innermost). Element by element, a transpose of 16-bit values strides through one side
// (the stem's dY took half of its d_W); on AVX-512 two channels' values make one 32-bit word, and 16 x 16
// blocks of words are transposed in registers (cpu/transpose16.h).
#if CS231N_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 bug 105593, as pack_bf16_tap_runs
CS231N_AVX512 inline void planes_to_pixels_avx512(const uint16_t* src, int64_t src_stride, int64_t channels,
                                                  int64_t count, uint16_t* dst, int64_t dst_stride) {
  const int64_t pairs = channels / 2;
  for (int64_t p0 = 0; p0 < count; p0 += 16) {
    const int valid = static_cast<int>(std::min<int64_t>(16, count - p0));
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    for (int64_t q0 = 0; q0 < pairs; q0 += 16) {
      const int nq = static_cast<int>(std::min<int64_t>(16, pairs - q0));
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {  // r[i]: pixels p0.. of channels 2(q0+i) (low halves) and 2(q0+i)+1
        if (i >= nq) {
          r[i] = _mm512_setzero_ps();
          continue;
        }
        const uint16_t* lo = src + 2 * (q0 + i) * src_stride + p0;
        const __m512i l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, lo));
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, lo + src_stride));
        r[i] = _mm512_castsi512_ps(_mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
      }
      cpu::transpose16(r);  // r[m]: pixel p0 + m's words of the pairs q0 ..
      const __mmask16 words = static_cast<__mmask16>((1u << nq) - 1u);
      for (int m = 0; m < valid; ++m) {
        _mm512_mask_storeu_epi32(dst + (p0 + m) * dst_stride + 2 * q0, words, _mm512_castps_si512(r[m]));
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

inline void planes_to_pixels(const uint16_t* src, int64_t src_stride, int64_t channels, int64_t count, uint16_t* dst,
                             int64_t dst_stride) {
  int64_t first = 0;  // the first channel left to do
#if CS231N_X86
  if (cpu::cpu_isa() == cpu::Isa::kAvx512) {
    planes_to_pixels_avx512(src, src_stride, channels, count, dst, dst_stride);
    first = channels / 2 * 2;  // an odd last channel below
  }
#endif
  for (int64_t c = first; c < channels; ++c) {
    for (int64_t p = 0; p < count; ++p) dst[p * dst_stride + c] = src[c * src_stride + p];
  }
}

// x_pad: the sample with its zero border, split into the stride's phases, pixel-major (conv2d_shifted.h:
// phase_pixel, the layout of its pad_planes with the channels innermost). Channel pitch cp = C rounded
// up to even (the odd channel zero). From NHWC (`planes` false) or NCHW (`planes` true) memory. Only the
// phases some tap reads are filled in (`used`, from bf16_used_phases): a 1x1 stride-2 layer reads one of 4.
// `zeroed`: x_pad already holds the zeros (a buffer zeroed once, then written only by this function with
// the same geometry, at the same place), so only the pixels are copied: the zeroing of the forward's x_pad
// had been a tenth of (32, 128, 28, 28) -> 256 3x3 stride 2 on AMX.
inline void pad_bf16_pixels(const c10::BFloat16* x, const Conv2dGeometry& g, const ShiftedPlanes& sp, int64_t cp,
                            bool planes, const std::vector<uint8_t>& used, uint16_t* x_pad, bool zeroed = false) {
  const auto* xb = reinterpret_cast<const uint16_t*>(x);
  const auto zero = [zeroed](uint16_t* begin, uint16_t* end) {
    if (!zeroed) std::fill(begin, end, uint16_t(0));
  };
  if (!planes && sp.sh == 1 && sp.sw == 1) {  // one phase from NHWC: rows copied, only what lies between zeroed
    uint16_t* next = x_pad;                   // the first value not yet written
    for (int64_t i = 0; i < g.h; ++i) {
      uint16_t* row = x_pad + phase_pixel(sp, g.ph + i, g.pw) * cp;
      zero(next, row);  // the row before's right border, this one's left (the top rows)
      if (cp == g.c) {
        std::memcpy(row, xb + i * g.w * g.c, g.w * g.c * sizeof(uint16_t));
      } else {
        for (int64_t j = 0; j < g.w; ++j) {
          std::memcpy(row + j * cp, xb + (i * g.w + j) * g.c, g.c * sizeof(uint16_t));
          zero(row + j * cp + g.c, row + (j + 1) * cp);
        }
      }
      next = row + g.w * cp;
    }
    zero(next, x_pad + sp.plane() * cp);
    return;
  }
  zero(x_pad, x_pad + sp.plane() * cp);
  if (planes && sp.sh == 1 && sp.sw == 1) {  // one phase: each input row is a run of pixels
    for (int64_t i = 0; i < g.h; ++i) {
      planes_to_pixels(xb + i * g.w, g.h * g.w, g.c, g.w, x_pad + phase_pixel(sp, g.ph + i, g.pw) * cp, cp);
    }
    return;
  }
  // Strided: the pixels of an input row (from NCHW, transposed into `row` first) to their phases, each
  // column phase's pixels (every sW-th) side by side in it. (A pixel a memcpy, its place found by
  // divisions, had been most of a 3-channel stem's d_W.)
  std::vector<uint16_t> row(planes ? g.w * g.c : 0);
  for (int64_t i = 0; i < g.h; ++i) {
    const int64_t pi = g.ph + i;
    const uint16_t* pixels = xb + i * g.w * g.c;
    if (planes) {
      planes_to_pixels(xb + i * g.w, g.h * g.w, g.c, g.w, row.data(), g.c);
      pixels = row.data();
    }
    for (int64_t r = 0; r < sp.sw; ++r) {                          // column phase r: columns j = j0 + q·sW
      const int64_t j0 = ((r - g.pw) % sp.sw + sp.sw) % sp.sw;     // the first with (pW + j) mod sW = r
      if (j0 >= g.w || !used[(pi % sp.sh) * sp.sw + r]) continue;  // (a phase no tap reads)
      uint16_t* dst = x_pad + phase_pixel(sp, pi, g.pw + j0) * cp;
      const uint16_t* src = pixels + j0 * g.c;
      const int64_t count = (g.w - j0 + sp.sw - 1) / sp.sw, step = sp.sw * g.c;
      for (int64_t q = 0; q < count; ++q) {
        if (g.c >= 16) {
          std::memcpy(dst + q * cp, src + q * step, g.c * sizeof(uint16_t));
        } else {  // a stem's few channels: no call a pixel
          for (int64_t c = 0; c < g.c; ++c) dst[q * cp + c] = src[q * step + c];
        }
      }
    }
  }
}

// The same phases as channel planes, xc[c * pitch + phase_pixel(pi, pj)], straight from an NHWC sample:
// only the image's pixels are written, the zeros around them (written once by the caller) staying. For
// d_W by taps (conv2d_amx.h), in place of pad_bf16_pixels and a transpose of its result.
inline void pad_bf16_channel_planes(const c10::BFloat16* x, const Conv2dGeometry& g, const ShiftedPlanes& sp,
                                    const std::vector<uint8_t>& used, uint16_t* xc, int64_t pitch) {
  const auto* xb = reinterpret_cast<const uint16_t*>(x);
  for (int64_t i = 0; i < g.h; ++i) {
    const int64_t pi = g.ph + i;
    for (int64_t r = 0; r < sp.sw; ++r) {  // column phase r, as in pad_bf16_pixels
      const int64_t j0 = ((r - g.pw) % sp.sw + sp.sw) % sp.sw;
      if (j0 >= g.w || !used[(pi % sp.sh) * sp.sw + r]) continue;
      const int64_t first = phase_pixel(sp, pi, g.pw + j0), count = (g.w - j0 + sp.sw - 1) / sp.sw;
      const int64_t step = sp.sw * g.c;
      const uint16_t* src = xb + (i * g.w + j0) * g.c;
      for (int64_t c = 0; c < g.c; ++c) {
        uint16_t* dst = xc + c * pitch + first;
        for (int64_t q = 0; q < count; ++q) dst[q] = src[q * step + c];
      }
    }
  }
}

// The pixel pairs d_W's tiles read: pairs[p * width + c] = (x_pad[p, c], x_pad[p + 1, c]) for each pixel p of
// the padded plane and channel c < C (x_pad, from pad_bf16_pixels, has one zero pixel more at its end).
inline void pair_pixels(const uint16_t* x_pad, int64_t plane, int64_t cp, int64_t channels, int64_t width,
                        uint32_t* pairs) {
  for (int64_t p = 0; p < plane; ++p) {
    const uint16_t *here = x_pad + p * cp, *next = here + cp;
    for (int64_t c = 0; c < channels; ++c) pairs[p * width + c] = bf16_pair(here[c], next[c]);
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
  for (int v = 0; v < kBf16Nv; ++v) mask[v] = cpu::lane_mask(n - 16 * v);
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

// One tile of the forward: rows (pixels) i .. i+m-1 of Y and the filters of one sliver, all taps and
// channel pairs in registers. Row r's pairs (32-bit words) under tap t are at a + a_tap[t] + a_rows[r]
// (the table's entries from row i on). Rows r >= m read row i (never stored); stored with the bias, its
// first n columns.
CS231N_AVX512_BF16 inline void bf16_tile(int64_t taps, int64_t pairs, const bf16_word* a, const int64_t* a_tap,
                                         const int64_t* a_rows, const uint32_t* b, float* c, int64_t ldc, int m, int n,
                                         const float* bias) {
  Bf16Tile acc;
  bf16_zero(acc);
  for (int64_t t = 0; t < taps; ++t) {
    const bf16_word* ar[kBf16Mr];
#pragma GCC unroll 8
    for (int r = 0; r < kBf16Mr; ++r) ar[r] = a + a_tap[t] + a_rows[r < m ? r : 0];
    const auto* bt = reinterpret_cast<const bf16_word*>(b + t * pairs * kBf16Nr);
#pragma GCC unroll 2
    for (int64_t q = 0; q < pairs; ++q) bf16_step(acc, bt + q * kBf16Nr, [&ar, q](int r) { return ar[r][q]; });
  }
  bf16_store(acc, c, ldc, m, n, bias, /*accumulate=*/false);
}
#endif

// Small images (fewer than kMinPixelsPerSample outputs a sample: ResNet's 8x8 and 4x4 stages) go by pixel
// rows instead: the padded planes would compute 22 pixels of a 4x4 sample to keep 16, in tiles that
// reload the filters for every 6 of them. Every output pixel of a block of samples becomes a row,
//     A[j][t][q] = x_pad's pair q under tap t of output j          (the im2col of the pairs, copied)
// so that for every tap the tile's rows are taps * pairs words apart; a block's A is at most
// kBf16RowsBytes, in whole samples (bf16_pixel_rows, above).
constexpr int64_t kBf16RowsBytes = int64_t{1} << 20;

// A sample's outputs, [outputs x F] in float32, into y_n rounded to bfloat16 once (NCHW: transposed first,
// through planes_out, outputs x F floats).
inline void store_bf16_sample(const float* out, const Conv2dGeometry& g, bool planes, float* planes_out,
                              c10::BFloat16* y_n) {
  const int64_t outputs = g.col_cols();
  if (planes) {
    cpu::transpose_matrix(out, g.f, outputs, g.f, planes_out, outputs);
    out = planes_out;
  }
  cpu::from_float(out, outputs * g.f, y_n);
}

// The same for the filters [j0, j1) alone (a thread's share of the filters: conv_forward_bf16 at batch 1).
inline void store_bf16_filters(const float* out, int64_t j0, int64_t j1, const Conv2dGeometry& g, bool planes,
                               float* planes_out, c10::BFloat16* y_n) {
  const int64_t outputs = g.col_cols(), nf = j1 - j0;
  if (!planes) {
    for (int64_t o = 0; o < outputs; ++o) cpu::from_float(out + o * g.f + j0, nf, y_n + o * g.f + j0);
    return;
  }
  cpu::transpose_matrix(out + j0, g.f, outputs, nf, planes_out, outputs);
  cpu::from_float(planes_out, nf * outputs, y_n + j0 * outputs);
}

// The same for outputs [o0, o0 + m) of a sample, [m x F] in float32 at `out` (NCHW: transposed through
// planes_out, m x F floats, then rounded plane by plane).
inline void store_bf16_outputs(const float* out, int64_t o0, int64_t m, const Conv2dGeometry& g, bool planes,
                               float* planes_out, c10::BFloat16* y_n) {
  if (!planes) return cpu::from_float(out, m * g.f, y_n + o0 * g.f);
  cpu::transpose_matrix(out, g.f, m, g.f, planes_out, m);
  for (int64_t f = 0; f < g.f; ++f) cpu::from_float(planes_out + f * m, m, y_n + f * g.col_cols() + o0);
}

// ------------------------------------------------------------------------------ the forward by windows
// Few channels (a stem: 3) waste the forward above: a tap's pairs are C rounded up to even (a quarter of
// the stem's products are by the zero fourth channel), and a tile runs 49 taps of two words each, its
// bookkeeping beside every 48 vdpbf16ps. By windows instead, as the float32 route does for channels_last
// stems (conv2d_windows.h): an output pixel's row is its window, tap row by tap row, each tap row one
// run of kW·C values in a padded NHWC copy of the sample (dilation 1 along the width), rounded up to
// whole words; the filters are packed in the same order, and the tile runs one segment of kH runs.
// Rows are built kBf16WindowRows at a time, in cache.
constexpr int64_t kBf16WindowRows = 768;
inline int64_t bf16_window_run(const Conv2dGeometry& g) { return g.kw * g.c; }  // values in a tap row's run
inline bool bf16_window_rows(const Conv2dGeometry& g) {
  return bf16_direct(g) && !bf16_pixel_rows(g) && g.c < 16 && g.dw == 1 && bf16_window_run(g) <= 32;
}

#if CS231N_X86
// The rows of output pixels [o0, o1) of the sample x_win (padded NHWC, Wp pixels a row): row o's tap row t_h
// at words t_h * run_words, the run of kW·C values and a zero to make it even.
CS231N_AVX512_BF16 inline void bf16_window_rows_of(const uint16_t* x_win, int64_t wp, const Conv2dGeometry& g,
                                                   int64_t run_words, int64_t o0, int64_t o1, uint32_t* rows) {
  const int64_t run = bf16_window_run(g);
  const __mmask32 values = static_cast<__mmask32>((uint64_t{1} << run) - 1u);
  const __mmask32 words = static_cast<__mmask32>((uint64_t{1} << (2 * run_words)) - 1u);
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t o_h = o / g.ow, o_w = o % g.ow;
    auto* row = reinterpret_cast<uint16_t*>(rows + (o - o0) * g.kh * run_words);
    for (int64_t t_h = 0; t_h < g.kh; ++t_h) {
      const uint16_t* src = x_win + ((o_h * g.sh + t_h * g.dh) * wp + o_w * g.sw) * g.c;
      _mm512_mask_storeu_epi16(row + t_h * 2 * run_words, words, _mm512_maskz_loadu_epi16(values, src));
    }
  }
}

// Whether the bfloat16 values v[0, n) are all finite (none has the exponent of all ones of an infinity or NaN).
CS231N_AVX512 inline bool bf16_all_finite(const uint16_t* v, int64_t n) {
  const __m512i exponent = _mm512_set1_epi16(0x7f80);
  __mmask32 odd = 0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    odd |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(_mm512_loadu_si512(v + i), exponent), exponent);
  }
  for (; i < n; ++i) odd |= (v[i] & 0x7f80) == 0x7f80;
  return odd == 0;
}
#endif

// y = conv(x, w) + b by windows (bf16_window_rows), in the layouts of conv_forward_bf16.
inline void conv_forward_bf16_windows(const c10::BFloat16* x, const Bf16Filters& w, const float* b, c10::BFloat16* y,
                                      const Conv2dGeometry& g, bool planes) {
#if CS231N_X86
  // On AMX (cpu/amx_tiles.h), each tap row a tap of 32 values (the run and zeros: one tile step), the
  // rows' blocks 32 outputs x 32 filters.
  const bool amx = cpu::cpu_amx();
  const int64_t run = bf16_window_run(g), run_words = amx ? kAmxK / 2 : (run + 1) / 2, row_words = g.kh * run_words;
  const int64_t hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw, outputs = g.col_cols();
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * outputs, slivers = (g.f + kBf16Nr - 1) / kBf16Nr;
  // filters[((s * kH + t_h) * run_words + q) * 64 + j]: filter 64 s + j's values 2q and 2q + 1 of tap row t_h's
  // run, value i being (t_w, c) = (i / C, i % C); 0 past the run and past F
  std::vector<uint32_t> filters(slivers * row_words * kBf16Nr, 0);
  const auto* wb = reinterpret_cast<const uint16_t*>(w.base);
  const auto value = [&](int64_t f, int64_t t_h, int64_t i) {
    return i < run ? wb[f * w.sf + (i % g.c) * w.sc + t_h * w.sh + (i / g.c) * w.sw] : uint16_t(0);
  };
  for (int64_t f = 0; f < g.f; ++f) {
    for (int64_t t_h = 0; t_h < g.kh; ++t_h) {
      for (int64_t q = 0; q < run_words; ++q) {
        filters[((f / kBf16Nr * g.kh + t_h) * run_words + q) * kBf16Nr + f % kBf16Nr] =
            bf16_pair(value(f, t_h, 2 * q), value(f, t_h, 2 * q + 1));
      }
    }
  }
  // with fewer samples than threads, a sample's blocks of outputs in bands, each thread padding it itself
  const SampleBands split(g.n, (outputs + kBf16WindowRows - 1) / kBf16WindowRows);
  const int64_t chunks = split.chunks;
  const int64_t tap0 = 0;                               // one segment: the whole row
  std::vector<int64_t> tap_rows(g.kh), win_taps(g.kh);  // on AMX: tap row t_h's values from a row's start,
  for (int64_t t_h = 0; t_h < g.kh; ++t_h) {            // in the rows built or in x_win
    tap_rows[t_h] = t_h * 2 * run_words;
    win_taps[t_h] = t_h * g.dh * wp * g.c;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::optional<AmxScope> tiles;
    if (amx) tiles.emplace();
    alignas(64) float c[kAmxBlock * kAmxBlock];
    // the sample padded, channels innermost; values more, read (not kept) by a run's masked load (32) or
    // by AMX's 32 rows read in place (up to 31 strides of sW·C and a row of 32 past the last output)
    std::vector<uint16_t> x_win(hp * wp * g.c + 32 * g.sw * g.c + 64, 0);
    TileBuffer<uint32_t> rows((kBf16WindowRows + kAmxBlock) * row_words);  // AMX's blocks read 32 rows past
    std::vector<int64_t> row_table(kBf16WindowRows);
    for (int64_t j = 0; j < kBf16WindowRows; ++j) row_table[j] = j * row_words;
    // a block's outputs in float32 (not on AMX: rounded as stored), rounded into y while in cache (a whole
    // sample's were 3.2 MB for a stem)
    std::vector<float> out(kBf16WindowRows * g.f), planes_out(planes ? kBf16WindowRows * g.f : 0);
    // AMX: output o0 + r's place in y from output o0's: NHWC its F values, NCHW filter 0's (planes_at)
    std::vector<int64_t> pixels_at(kBf16WindowRows), planes_at(kBf16WindowRows);
    for (int64_t r = 0; r < kBf16WindowRows; ++r) {
      pixels_at[r] = r * g.f;
      planes_at[r] = r;
    }
    const auto* a = reinterpret_cast<const bf16_word*>(rows.data());
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      int64_t n_begin, n_end, b0, b1;
      split.of(chunk, &n_begin, &n_end, &b0, &b1);
      for (int64_t n = n_begin; n < n_end; ++n) {
        const auto* xn = reinterpret_cast<const uint16_t*>(x) + n * in_sample;
        for (int64_t i = 0; i < g.h; ++i) {
          uint16_t* dst = x_win.data() + ((g.ph + i) * wp + g.pw) * g.c;
          if (planes) {
            planes_to_pixels(xn + i * g.w, g.h * g.w, g.c, g.w, dst, g.c);
          } else {
            std::memcpy(dst, xn + i * g.w * g.c, g.w * g.c * sizeof(uint16_t));
          }
        }
        // On AMX a tile row is 32 values, the run and what follows it in x_win, times zero weights past the
        // run: read in place unless the sample holds an infinity or NaN (times zero: NaN in an output whose
        // window does not hold it), when the rows are built with zeros past the runs instead.
        const bool in_place = amx && bf16_all_finite(x_win.data(), hp * wp * g.c);
        for (int64_t o0 = b0 * kBf16WindowRows; o0 < std::min(outputs, b1 * kBf16WindowRows); o0 += kBf16WindowRows) {
          const int64_t m = std::min(kBf16WindowRows, outputs - o0);
          if (!in_place) bf16_window_rows_of(x_win.data(), wp, g, run_words, o0, o0 + m, rows.data());
          if (amx) {
            // blocks of up to 32 outputs: in place, along one output row (their rows sW·C values apart in
            // x_win); or 32 of the rows built above
            const auto* built = reinterpret_cast<const uint16_t*>(rows.data());
            c10::BFloat16* y_o0 = y + n * out_sample + (planes ? o0 : o0 * g.f);  // output o0's (filter 0)
            for (int64_t i = 0; i < m;) {
              const int64_t o = o0 + i, o_w = o % g.ow;
              const int64_t kept =
                  in_place ? std::min({int64_t{kAmxBlock}, g.ow - o_w, m - i}) : std::min<int64_t>(kAmxBlock, m - i);
              const uint16_t* a_block =
                  in_place ? x_win.data() + (o / g.ow * g.sh * wp + o_w * g.sw) * g.c : built + i * 2 * row_words;
              const int64_t a_row = in_place ? g.sw * g.c : 2 * row_words;
              for (int64_t j = 0; j < g.f; j += kAmxBlock) {
                const int cols = static_cast<int>(std::min<int64_t>(kAmxBlock, g.f - j));
                const uint32_t* sliver = filters.data() + (j / kBf16Nr) * row_words * kBf16Nr + j % kBf16Nr;
                amx_block(g.kh, 1, a_block, a_row, in_place ? win_taps.data() : tap_rows.data(), sliver,
                          run_words * kBf16Nr, kBf16Nr, c, kAmxBlock, /*accumulate=*/false);
                const float* bias = b ? b + j : nullptr;
                if (planes) {
                  amx_store_block_planes(c, planes_at.data() + i, kept, cols, bias, y_o0 + j * outputs, outputs);
                } else {
                  amx_store_block(c, pixels_at.data() + i, kept, cols, bias, y_o0 + j);
                }
              }
              i += kept;
            }
            continue;
          }
          for (int64_t s = 0; s < slivers; ++s) {
            const int64_t j = s * kBf16Nr;
            const int n_tile = static_cast<int>(std::min<int64_t>(kBf16Nr, g.f - j));
            for (int64_t i = 0; i < m; i += kBf16Mr) {
              bf16_tile(1, row_words, a, &tap0, row_table.data() + i, filters.data() + s * row_words * kBf16Nr,
                        out.data() + i * g.f + j, g.f, static_cast<int>(std::min<int64_t>(kBf16Mr, m - i)), n_tile,
                        b ? b + j : nullptr);
            }
          }
          store_bf16_outputs(out.data(), o0, m, g, planes, planes_out.data(), y + n * out_sample);
        }
      }
    }
  });
#else
  (void)x, (void)w, (void)b, (void)y, (void)g, (void)planes;
  TORCH_CHECK(false, "conv_forward_bf16_windows: AVX512-BF16 is an x86 instruction set");
#endif
}

// y (bfloat16; NHWC, or NCHW when `planes`) = conv(x, w) + b for a one-group layer (bf16_direct).
// x and y are in the same layout; w the (F, C, kH, kW) filters; b a float32 copy of the bias. Few channels
// go by windows (above).
inline void conv_forward_bf16(const c10::BFloat16* x, const Bf16Filters& w, const float* b, c10::BFloat16* y,
                              const Conv2dGeometry& g, bool planes) {
  if (bf16_window_rows(g)) return conv_forward_bf16_windows(x, w, b, y, g, planes);
#if CS231N_X86
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t cp = g.c + (g.c & 1), pairs = cp / 2, taps = g.taps();
  const std::vector<uint32_t> filters = pack_bf16_filters(w, g, pairs);
  const std::vector<uint8_t> used = bf16_used_phases(g, sp);
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * g.oh * g.ow;
  // Samples per block: one, its rows read in place from the padded plane (the real outputs' pixels in the
  // pitch Wq, through a table: the pitch's padding is never computed; with fewer samples than threads its
  // output rows in bands, each band's thread padding the sample itself); or, by rows, as many samples as
  // fit kBf16RowsBytes, their rows copied.
  const bool by_rows = bf16_pixel_rows(g);
  const SampleBands split(g.n, by_rows ? 1 : g.oh);
  const int64_t chunks = split.chunks;
  // by rows with fewer samples than threads, the filters' slivers among the threads too (conv2d_amx.h)
  const int64_t slivers = (g.f + kBf16Nr - 1) / kBf16Nr;
  const int64_t f_parts = by_rows ? std::clamp<int64_t>(at::get_num_threads() / chunks, 1, slivers) : 1;
  const int64_t row_words = taps * pairs, outputs = g.col_cols();
  const int64_t block =
      by_rows ? std::clamp<int64_t>(kBf16RowsBytes / (outputs * row_words * 4), 1, (g.n + chunks - 1) / chunks) : 1;
  const std::vector<int64_t> in_pitch = output_pixels(g, sp, 1);  // output o's pixel in the pitch Wq
  std::vector<int64_t> row_table(block * outputs);                // row j's first word in the rows' words (a)
  for (int64_t j = 0; j < block * outputs; ++j) row_table[j] = by_rows ? j * row_words : in_pitch[j] * pairs;
  at::parallel_for(0, chunks * f_parts, 1, [&](int64_t cb, int64_t ce) {
    std::vector<uint16_t> x_pad(sp.plane() * cp);
    std::vector<uint32_t> a_rows(by_rows ? block * outputs * row_words : 0);
    std::vector<float> out(block * outputs * g.f), planes_out(planes ? outputs * g.f : 0);
    std::vector<int64_t> offsets(taps), a_tap(taps);
    for (int64_t t = 0; t < taps; ++t) {
      offsets[t] = shifted_offset(g, sp, t);                // B's row (c = 0, t): the tap's pixel
      a_tap[t] = by_rows ? t * pairs : offsets[t] * pairs;  // the tap's words from a row's start
    }
    // the rows' words: the block's copied rows, or the padded plane read in place
    const bf16_word* a =
        by_rows ? reinterpret_cast<const bf16_word*>(a_rows.data()) : reinterpret_cast<const bf16_word*>(x_pad.data());
    for (int64_t item = cb; item < ce; ++item) {
      const int64_t chunk = item / f_parts, part = item % f_parts;
      const int64_t j0 = chunk_begin(part, f_parts, slivers) * kBf16Nr;  // its filters [j0, j1)
      const int64_t j1 = std::min(g.f, chunk_begin(part + 1, f_parts, slivers) * kBf16Nr);
      int64_t n_begin, n_end, r0, r1;
      split.of(chunk, &n_begin, &n_end, &r0, &r1);
      for (int64_t n0 = n_begin; n0 < n_end; n0 += block) {
        const int64_t nb = std::min(block, n_end - n0);
        // the block's rows: all its samples' outputs, or (one sample) those of the band's output rows
        const int64_t i0 = by_rows ? 0 : r0 * g.ow, m = by_rows ? nb * outputs : r1 * g.ow;
        for (int64_t s = 0; s < nb; ++s) {
          pad_bf16_pixels(x + (n0 + s) * in_sample, g, sp, cp, planes, used, x_pad.data(), /*zeroed=*/true);
          if (!by_rows) break;  // one sample a block
          for (int64_t o = 0; o < g.col_cols(); ++o) {
            const int64_t pixel = in_pitch[o];
            uint32_t* row = a_rows.data() + (s * g.col_cols() + o) * row_words;
            for (int64_t t = 0; t < taps; ++t) {
              std::memcpy(row + t * pairs, x_pad.data() + (pixel + offsets[t]) * cp, pairs * sizeof(uint32_t));
            }
          }
        }
        for (int64_t j = j0; j < j1; j += kBf16Nr) {
          const int n_tile = static_cast<int>(std::min<int64_t>(kBf16Nr, g.f - j));
          const uint32_t* sliver = filters.data() + (j / kBf16Nr) * taps * pairs * kBf16Nr;
          for (int64_t i = i0; i < m; i += kBf16Mr) {
            const int m_tile = static_cast<int>(std::min<int64_t>(kBf16Mr, m - i));
            bf16_tile(taps, pairs, a, a_tap.data(), row_table.data() + i, sliver, out.data() + i * g.f + j, g.f, m_tile,
                      n_tile, b ? b + j : nullptr);
          }
        }
        if (split.bands > 1) {  // the band's outputs only
          store_bf16_outputs(out.data() + i0 * g.f, i0, m - i0, g, planes, planes_out.data(), y + n0 * out_sample);
          continue;
        }
        for (int64_t s = 0; s < nb; ++s) {
          const float* out_s = out.data() + s * outputs * g.f;
          c10::BFloat16* y_s = y + (n0 + s) * out_sample;
          if (f_parts > 1) {
            store_bf16_filters(out_s, j0, j1, g, planes, planes_out.data(), y_s);
          } else {
            store_bf16_sample(out_s, g, planes, planes_out.data(), y_s);
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

// ---------------------------------------------------------------------------------------------- d_x
// d_x is the transposed convolution: the forward above on dY with the transposed filters (W_t[c, f, t] =
// W[f, c, flipped t]), which is a stride-1 convolution when the layer has stride 1 (conv2d_gemm.h:
// transposed_geometry). Its filters are the layer's C input channels: with fewer than 32 the 64-wide
// tiles are mostly padding, and the float32 route is faster (12.4 against 2.3 ms on the CS231n layer).
// AMX's blocks are 32 wide, and even 3 of them used beat the float32 route's copies and FMAs: MobileNetV2's
// (16, 16, 64, 64) -> 96 1 x 1 d_x 3.6 -> 1.4 ms in channels_last (oneDNN 1.3), (16, 8, 56, 56) -> 64 3 x 3
// 4.7 -> 1.8, a stem's (16, 3, 64, 64) 7 x 7 s2 3.2 -> 2.1.
inline bool bf16_input_grad_direct(const Conv2dGeometry& g) {
  return bf16_direct(g) && (2 * g.c >= kBf16Nr || cpu::cpu_amx());
}

// The pieces of a d_x by phases that its vdpbf16ps route (below) and its AMX one (conv2d_amx.h) share.
// Each phase's filters, W's taps of the phase read transposed, packed with `pairs` the pitch.
inline std::vector<std::vector<uint32_t>> pack_bf16_phase_filters(const PhasePixels& pp, const at::Tensor& w,
                                                                  const Conv2dGeometry& g, int64_t pairs) {
  std::vector<std::vector<uint32_t>> filters;
  for (const InputPhase& ph : pp.phases) {
    const at::Tensor taps = w.slice(2, ph.a, g.kh, g.sh).slice(3, ph.b, g.kw, g.sw);
    filters.push_back(pack_bf16_filters(Bf16Filters::transposed_of(taps), ph.t, pairs));
  }
  return filters;
}

// Samples a block: for small images (under kMinPixelsPerSample outputs) as many as fit kBf16RowsBytes of
// padded dY (channel pitch cp), at most a chunk's share; otherwise one.
inline int64_t bf16_phase_block(const Conv2dGeometry& g, int64_t plane, int64_t cp, int64_t chunks) {
  if (g.col_cols() >= kMinPixelsPerSample) return 1;
  return std::clamp<int64_t>(kBf16RowsBytes / (plane * cp * 2), 1, (g.n + chunks - 1) / chunks);
}

// Sample s of a block of nb into dx_n: the phases' float32 sums (`out`, PhasePixels::put's order) at its
// pixels ([pixels x C] in dx_pixels), transposed into dx_planes when NCHW, rounded to bfloat16 once.
inline void round_bf16_phase_sample(const PhasePixels& pp, const float* out, int64_t nb, int64_t s,
                                    const Conv2dGeometry& g, bool planes, float* dx_pixels, float* dx_planes,
                                    c10::BFloat16* dx_n) {
  const int64_t pixels = g.h * g.w;
  pp.put(out, nb, s, dx_pixels, g);
  const float* src = dx_pixels;
  if (planes) {
    cpu::transpose_matrix(src, g.c, pixels, g.c, dx_planes, pixels);
    src = dx_planes;
  }
  cpu::from_float(src, g.c * pixels, dx_n);
}

// A strided layer (dilation 1): d_x by the stride's phases in one pass, as the float32 route does
// (conv2d_shifted.h: PhasePixels): dY padded into pixel pairs once, each phase's transposed convolution
// tiles (bf16_tile) whose rows are only its outputs that land in the image, their float32 sums put at the
// phase's pixels of the sample's d_x and rounded once. Small images (under kMinPixelsPerSample outputs)
// a block of samples at a time, their padded dY side by side (at most kBf16RowsBytes), so that a filter
// sliver serves more than a sample's few rows. The filters of each phase are packed from a strided view of
// W's taps. dx in the results' layout (NCHW when `planes`), dy bfloat16 in that layout, contiguous.
inline void conv_input_grad_bf16_phases(const at::Tensor& dy, const at::Tensor& w, at::Tensor& dx,
                                        const Conv2dGeometry& g, bool planes) {
#if CS231N_X86
  const PhasePixels pp(g);
  const size_t np = pp.phases.size();
  const int64_t cp = g.f + (g.f & 1), pairs = cp / 2;  // dY's channels, the transposed convolutions' input
  const int64_t plane = pp.sp.plane(), pixels = g.h * g.w, in_sample = g.c * pixels;
  const int64_t out_sample = g.f * g.col_cols();
  const std::vector<std::vector<uint32_t>> filters = pack_bf16_phase_filters(pp, w, g, pairs);
  const std::vector<uint8_t> used = bf16_used_phases(pp.t0, pp.sp);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.n, at::get_num_threads()));
  const int64_t block = bf16_phase_block(g, plane, cp, chunks);
  // phase q's rows for a block, in words: sample s's one padded dY further on; its taps' shifts
  std::vector<std::vector<int64_t>> rows(np), taps(np);
  for (size_t q = 0; q < np; ++q) {
    for (int64_t s = 0; s < block; ++s) {
      for (const int64_t r : pp.rows[q]) rows[q].push_back((s * plane + r) * pairs);
    }
    for (const int64_t t : pp.taps[q]) taps[q].push_back(t * pairs);
  }
  auto* dxp = dx.mutable_data_ptr<c10::BFloat16>();
  const auto* dyp = dy.const_data_ptr<c10::BFloat16>();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<uint16_t> dy_pad(block * plane * cp);
    std::vector<float> out(block * pixels * g.c), dx_pixels(in_sample), dx_planes(planes ? in_sample : 0);
    const auto* a = reinterpret_cast<const bf16_word*>(dy_pad.data());
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t n_end = chunk_begin(chunk + 1, chunks, g.n);
      for (int64_t n0 = chunk_begin(chunk, chunks, g.n); n0 < n_end; n0 += block) {
        const int64_t nb = std::min(block, n_end - n0);
        for (int64_t s = 0; s < nb; ++s) {
          pad_bf16_pixels(dyp + (n0 + s) * out_sample, pp.t0, pp.sp, cp, planes, used, dy_pad.data() + s * plane * cp,
                          /*zeroed=*/true);
        }
        float* o = out.data();  // phase after phase, the block's rows of each
        for (size_t q = 0; q < np; ++q) {
          const int64_t m = nb * pp.rows[q].size();
          for (int64_t j = 0; j < g.c; j += kBf16Nr) {
            const int n_tile = static_cast<int>(std::min<int64_t>(kBf16Nr, g.c - j));
            const uint32_t* sliver = filters[q].data() + (j / kBf16Nr) * taps[q].size() * pairs * kBf16Nr;
            for (int64_t i = 0; i < m; i += kBf16Mr) {
              const int m_tile = static_cast<int>(std::min<int64_t>(kBf16Mr, m - i));
              bf16_tile(taps[q].size(), pairs, a, taps[q].data(), rows[q].data() + i, sliver, o + i * g.c + j, g.c,
                        m_tile, n_tile, nullptr);
            }
          }
          o += m * g.c;
        }
        for (int64_t s = 0; s < nb; ++s) {
          round_bf16_phase_sample(pp, out.data(), nb, s, g, planes, dx_pixels.data(), dx_planes.data(),
                                  dxp + (n0 + s) * in_sample);
        }
      }
    }
  });
#else
  (void)dy, (void)w, (void)dx, (void)g, (void)planes;
  TORCH_CHECK(false, "conv_input_grad_bf16_phases: AVX512-BF16 is an x86 instruction set");
#endif
}

// ------------------------------------------------------------------------------------------------ d_W
// d_W[f, t, c] = Σ_pixels dY'[p, f] · x_pad[p + offset(t), c], with dY' = dY in the pitch Wq (zeros in
// the thrown-away pixels, as conv_weight_grad_nhwc). k is the pixel here, taken in pairs (2q, 2q+1):
//   A: dy_pairs[q * F + f]   = (dY'[2q, f], dY'[2q+1, f])
//   B: x_pairs[p * cw + c]   = (x_pad[p, c], x_pad[p+1, c])          every pixel p, so that the pair of any
//      tap, (x_pad[2q + o, c], x_pad[2q + 1 + o, c]), is the word at p = 2q + o: read in place
// (cw: C rounded up to 16, whole vectors). A tile is 6 filters x 64 channels of one tap, summed over all
// pixel pairs, written into d_W or added to it.
#if CS231N_X86
CS231N_AVX512_BF16 inline void bf16_weight_grad_tile(int64_t pairs, const bf16_word* a, int64_t lda, const bf16_word* b,
                                                     int64_t ldb, float* c, int64_t ldc, int m, int n,
                                                     bool accumulate) {
  Bf16Tile acc;
  bf16_zero(acc);
#pragma GCC unroll 2
  for (int64_t q = 0; q < pairs; ++q) {
    const bf16_word* aq = a + q * lda;
    bf16_step(acc, b + q * ldb, [aq, m](int r) { return aq[r < m ? r : 0]; });
  }
  bf16_store(acc, c, ldc, m, n, /*bias=*/nullptr, accumulate);
}

// The tile of bf16_weight_grad_by_taps: 6 (tap, channel) rows x 64 filters, d_Wᵀ[(t, c), f] += Σ_q
// x_pairs[2q + offset(t), c] · dy_pairs[q, f]. Row r's words are rows[r][q * row_step]; B is dy_pairs.
CS231N_AVX512_BF16 inline void bf16_weight_grad_tile_by_taps(int64_t pairs, const bf16_word* const* rows,
                                                             int64_t row_step, const bf16_word* b, int64_t ldb,
                                                             float* c, int64_t ldc, int m, int n) {
  Bf16Tile acc;
  bf16_zero(acc);
  const bf16_word* ar[kBf16Mr];
#pragma GCC unroll 8
  for (int r = 0; r < kBf16Mr; ++r) ar[r] = rows[r < m ? r : 0];
#pragma GCC unroll 2
  for (int64_t q = 0; q < pairs; ++q) {
    bf16_step(acc, b + q * ldb, [&ar, q, row_step](int r) { return ar[r][q * row_step]; });
  }
  bf16_store(acc, c, ldc, m, n, /*bias=*/nullptr, /*accumulate=*/true);
}
#undef CS231N_BF16_INLINE
#endif

// d_W of small images (bf16_pixel_rows) by pixel rows: k is an output pixel of a block of samples, taken
// in pairs of rows (2r, 2r+1), with no pixel thrown away:
//   A: dy_pairs[r * F + f]               = (dY[2r, f], dY[2r+1, f])
//   B: row_pairs[(r * taps + t) * cw + c] = (x under tap t of output 2r, of output 2r+1), channel c
// (the im2col of x, in pairs of rows; the odd last row pairs with zeros). Blocks are long, up to
// kBf16WeightGradRows rows (whole samples), and all the threads work on each: the pairs are built in
// parallel, then d_W's tiles are split among the threads, each tile summing the whole block. A tile is
// stored once per block, written by the first and added to by the others. Splitting the samples instead
// gave each thread a d_W of its own to zero and add up (9 MiB each at 512 x 512 x 3 x 3: 5.2 ms against
// 2.4 for d_W of (16, 512, 4, 4)).
constexpr int64_t kBf16WeightGradRows = 512;

// Rows [2 r0, 2 r1) of the block (of `rows`) into their pairs.
inline void bf16_row_pairs(const uint16_t* dy_rows, const uint16_t* x_pad, const Conv2dGeometry& g,
                           const ShiftedPlanes& sp, const std::vector<int64_t>& offsets, int64_t cp, int64_t cw,
                           int64_t rows, int64_t r0, int64_t r1, uint32_t* dy_pairs, uint32_t* row_pairs) {
  const int64_t taps = g.taps(), plane = sp.plane();
  // Output row j (sample j / oH*oW, output o) sits at this pixel of the block's padded planes.
  const auto pixel = [&](int64_t j) {
    const int64_t o = j % g.col_cols();
    return j / g.col_cols() * plane + o / g.ow * sp.wq + o % g.ow;
  };
  for (int64_t r = r0; r < r1; ++r) {
    const bool odd_last = 2 * r + 1 == rows;  // the last row's partner is a zero row
    const uint16_t *even = dy_rows + 2 * r * g.f, *odd = even + g.f;
    for (int64_t f = 0; f < g.f; ++f) dy_pairs[r * g.f + f] = bf16_pair(even[f], odd_last ? uint16_t(0) : odd[f]);
    for (int64_t t = 0; t < taps; ++t) {
      const uint16_t* a = x_pad + (pixel(2 * r) + offsets[t]) * cp;
      const uint16_t* b = odd_last ? nullptr : x_pad + (pixel(2 * r + 1) + offsets[t]) * cp;
      uint32_t* out = row_pairs + (r * taps + t) * cw;
      for (int64_t c = 0; c < g.c; ++c) out[c] = bf16_pair(a[c], b ? b[c] : uint16_t(0));
    }
  }
}

// d_W (float32, [F][taps][C]) of a bf16_direct layer with small images, from bfloat16 dy and x (NHWC, or
// NCHW when `planes`). The blocks are summed in order: the result does not depend on the threads.
inline at::Tensor conv_weight_grad_bf16_rows(const c10::BFloat16* dy, const c10::BFloat16* x, const Conv2dGeometry& g,
                                             bool planes) {
  at::Tensor dw = at::empty({g.f, g.taps() * g.c}, at::TensorOptions().dtype(at::kFloat));
#if CS231N_X86
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t cp = g.c + (g.c & 1), cw = (g.c + 15) / 16 * 16, taps = g.taps(), outputs = g.col_cols();
  const int64_t plane = sp.plane(), ldc = taps * g.c, in_sample = g.c * g.h * g.w, out_sample = g.f * outputs;
  const std::vector<uint8_t> used = bf16_used_phases(g, sp);
  const int64_t block = std::clamp<int64_t>(kBf16WeightGradRows / outputs, 1, g.n);
  const int64_t max_pairs = (block * outputs + 1) / 2;
  std::vector<uint16_t> x_pad((block * plane + 1) * cp, 0);          // one zero pixel more: the last one's pair
  std::vector<uint16_t> dy_planes(planes ? block * out_sample : 0);  // NCHW dY as rows; NHWC's are its own
  std::vector<uint32_t> dy_pairs(max_pairs * g.f), row_pairs(max_pairs * taps * cw, 0);
  std::vector<int64_t> offsets(taps);
  for (int64_t t = 0; t < taps; ++t) offsets[t] = shifted_offset(g, sp, t);  // tap t's pixel from an output's
  const auto* dyb = reinterpret_cast<const uint16_t*>(dy);
  // d_W's tiles: (tap, 64 channels, 6 filters)
  const int64_t c_tiles = (g.c + kBf16Nr - 1) / kBf16Nr, f_tiles = (g.f + kBf16Mr - 1) / kBf16Mr;
  float* out = dw.mutable_data_ptr<float>();
  for (int64_t n0 = 0; n0 < g.n; n0 += block) {
    const int64_t nb = std::min(block, g.n - n0), rows = nb * outputs, pairs = (rows + 1) / 2;
    at::parallel_for(0, nb, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        pad_bf16_pixels(x + (n0 + s) * in_sample, g, sp, cp, planes, used, x_pad.data() + s * plane * cp);
        if (!planes) continue;
        const uint16_t* dy_n = dyb + (n0 + s) * out_sample;  // [F][outputs] -> [outputs][F]
        planes_to_pixels(dy_n, outputs, g.f, outputs, dy_planes.data() + s * outputs * g.f, g.f);
      }
    });
    const uint16_t* dy_rows = planes ? dy_planes.data() : dyb + n0 * out_sample;
    at::parallel_for(0, pairs, 1, [&](int64_t r0, int64_t r1) {
      bf16_row_pairs(dy_rows, x_pad.data(), g, sp, offsets, cp, cw, rows, r0, r1, dy_pairs.data(), row_pairs.data());
    });
    const auto* a = reinterpret_cast<const bf16_word*>(dy_pairs.data());
    const auto* b = reinterpret_cast<const bf16_word*>(row_pairs.data());
    at::parallel_for(0, taps * c_tiles * f_tiles, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = i / (c_tiles * f_tiles), c0 = i / f_tiles % c_tiles * kBf16Nr, f0 = i % f_tiles * kBf16Mr;
        bf16_weight_grad_tile(pairs, a + f0, g.f, b + t * cw + c0, taps * cw, out + f0 * ldc + t * g.c + c0, ldc,
                              static_cast<int>(std::min<int64_t>(kBf16Mr, g.f - f0)),
                              static_cast<int>(std::min<int64_t>(kBf16Nr, g.c - c0)), /*accumulate=*/n0 > 0);
      }
    });
  }
#else
  (void)dy, (void)x, (void)g, (void)planes;
  TORCH_CHECK(false, "conv_weight_grad_bf16_rows: AVX512-BF16 is an x86 instruction set");
#endif
  return dw;
}

// d_W (float32, [F][taps][C]: W's shape in channels_last memory) of a bf16_direct layer, from bfloat16
// dy and x (NHWC, or NCHW when `planes`): by pixel rows for small images (above), otherwise per sample by
// the padded planes. Each chunk of samples sums into its own d_W; the chunks are then added in order, so
// the result does not depend on the threads' timing.
inline at::Tensor conv_weight_grad_bf16(const c10::BFloat16* dy, const c10::BFloat16* x, const Conv2dGeometry& g,
                                        bool planes) {
  if (bf16_pixel_rows(g)) return conv_weight_grad_bf16_rows(dy, x, g, planes);
  at::Tensor dw = at::zeros({g.f, g.taps() * g.c}, at::TensorOptions().dtype(at::kFloat));
#if CS231N_X86
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t cp = g.c + (g.c & 1), cw = (g.c + 15) / 16 * 16, taps = g.taps();
  const int64_t plane = sp.plane(), ldc = taps * g.c;
  const std::vector<uint8_t> used = bf16_used_phases(g, sp);
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * g.oh * g.ow;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.n, at::get_num_threads()));
  const int64_t pairs = (sp.cols + 1) / 2;
  const bool by_taps = bf16_weight_grad_by_taps(g);  // partial d_Wᵀ [(t, c)][F] then, else d_W [F][(t, c)]
  std::vector<float> partial(chunks * g.f * ldc, 0.0f);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<uint16_t> x_pad((plane + 1) * cp, 0);  // one zero pixel more: the last one's pair
    // dy_pairs: kBf16Nr words more, read (not used) past F by the last pair's tiles when by_taps
    std::vector<uint32_t> dy_pairs(pairs * g.f + kBf16Nr, 0), x_pairs(by_taps ? g.c * plane : plane * cw, 0);
    std::vector<uint16_t> dy_pitch(2 * pairs * g.f, 0);  // dY' in the pitch Wq: its gaps are never written
    std::vector<int64_t> offsets(taps);
    for (int64_t t = 0; t < taps; ++t) offsets[t] = shifted_offset(g, sp, t);  // B's row (c = 0, t): the tap's pixel
    const auto* dyb = reinterpret_cast<const uint16_t*>(dy);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      float* dw_chunk = partial.data() + chunk * g.f * ldc;
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        pad_bf16_pixels(x + n * in_sample, g, sp, cp, planes, used, x_pad.data());
        const uint16_t* dy_n = dyb + n * out_sample;
        for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
          uint16_t* row = dy_pitch.data() + o_h * sp.wq * g.f;
          if (!planes) {
            std::memcpy(row, dy_n + o_h * g.ow * g.f, g.ow * g.f * sizeof(uint16_t));
            continue;
          }
          planes_to_pixels(dy_n + o_h * g.ow, g.oh * g.ow, g.f, g.ow, row, g.f);
        }
        if (by_taps) {  // channel by channel: x_pairs[c * plane + p] = (x_pad[p, c], x_pad[p + 1, c])
          for (int64_t c = 0; c < g.c; ++c) {
            for (int64_t p = 0; p < plane; ++p)
              x_pairs[c * plane + p] = bf16_pair(x_pad[p * cp + c], x_pad[(p + 1) * cp + c]);
          }
        } else {  // pixel by pixel, cw words a pixel: x_pairs[p * cw + c]
          pair_pixels(x_pad.data(), plane, cp, g.c, cw, x_pairs.data());
        }
        for (int64_t q = 0; q < pairs; ++q) {
          const uint16_t *even = dy_pitch.data() + 2 * q * g.f, *odd = even + g.f;
          for (int64_t f = 0; f < g.f; ++f) dy_pairs[q * g.f + f] = bf16_pair(even[f], odd[f]);
        }
        const auto* a = reinterpret_cast<const bf16_word*>(dy_pairs.data());
        const auto* b = reinterpret_cast<const bf16_word*>(x_pairs.data());
        if (by_taps) {
          for (int64_t k0 = 0; k0 < ldc; k0 += kBf16Mr) {
            const int m_tile = static_cast<int>(std::min<int64_t>(kBf16Mr, ldc - k0));
            const bf16_word* rows[kBf16Mr];
            for (int r = 0; r < m_tile; ++r) {  // row k = (t, c): channel c's words from the tap's pixel on
              const int64_t t = (k0 + r) / g.c, c = (k0 + r) % g.c;
              rows[r] = b + c * plane + offsets[t];
            }
            for (int64_t f0 = 0; f0 < g.f; f0 += kBf16Nr) {
              const int n_tile = static_cast<int>(std::min<int64_t>(kBf16Nr, g.f - f0));
              bf16_weight_grad_tile_by_taps(pairs, rows, 2, a + f0, g.f, dw_chunk + k0 * g.f + f0, g.f, m_tile, n_tile);
            }
          }
          continue;
        }
        for (int64_t t = 0; t < taps; ++t) {
          for (int64_t c0 = 0; c0 < g.c; c0 += kBf16Nr) {
            const int n_tile = static_cast<int>(std::min<int64_t>(kBf16Nr, g.c - c0));
            for (int64_t f0 = 0; f0 < g.f; f0 += kBf16Mr) {
              const int m_tile = static_cast<int>(std::min<int64_t>(kBf16Mr, g.f - f0));
              bf16_weight_grad_tile(pairs, a + f0, g.f, b + offsets[t] * cw + c0, 2 * cw,
                                    dw_chunk + f0 * ldc + t * g.c + c0, ldc, m_tile, n_tile, /*accumulate=*/true);
            }
          }
        }
      }
    }
  });
  // the chunks' partial sums added in chunk order (so the same whatever the threads' timing), the filters
  // among the threads
  float* out = dw.mutable_data_ptr<float>();
  at::parallel_for(0, g.f, 16, [&](int64_t f_begin, int64_t f_end) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const float* part = partial.data() + chunk * g.f * ldc;
      for (int64_t f = f_begin; f < f_end; ++f) {
        if (by_taps) {  // d_Wᵀ[k][f] -> d_W[f][k]
          for (int64_t k = 0; k < ldc; ++k) out[f * ldc + k] += part[k * g.f + f];
        } else {
          for (int64_t k = 0; k < ldc; ++k) out[f * ldc + k] += part[f * ldc + k];
        }
      }
    }
  });
#else
  (void)dy, (void)x, (void)g, (void)planes;
  TORCH_CHECK(false, "conv_weight_grad_bf16: AVX512-BF16 is an x86 instruction set");
#endif
  return dw;
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
