// Batch norm's hot loops for float16 and bfloat16 on AVX2 (cpu/batch_norm.cpp calls them where the CPU has
// AVX2, and F16C for float16): each value is widened to float32 as it is loaded and rounded once as it is
// stored, 8 at a time (the elementwise passes 16 at a time on AVX-512, at the end), with the arithmetic of
// common/batch_norm.h in between. In the portable loops of
// batch_norm.cpp a piece is converted into an L1 buffer, computed there, and converted back: three
// passes where these make one, which matters once the narrow dtype has halved the bytes from memory.
//
// The reductions keep the structure of batch_norm.cpp's block_stats and block_grad_sums (a block of at
// most kBlock values, summed in lanes of float32, folded into double per block), with 32 lanes (four
// vectors of 8) instead of 16.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/batch_norm.h"
#include "cpu/cpu_features.h"
#include "cpu/reduced_float.h"

#if CS231N_X86
#include <immintrin.h>
#endif

namespace torch_cs231n {
namespace cpu {

// Whether the loops below run for this dtype here.
template <typename scalar_t>
inline bool narrow_avx2_available() {
  if (cpu_isa() < Isa::kAvx2) return false;
  return std::is_same_v<scalar_t, c10::BFloat16> || (std::is_same_v<scalar_t, c10::Half> && has_f16c());
}

#if CS231N_X86
#define CS231N_NARROW __attribute__((target("avx2,fma,f16c"))) inline

// 8 values widened to float32, and 8 float32 rounded (to nearest even; a NaN stays NaN, as
// reduced_float.h's from_float).
CS231N_NARROW __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

CS231N_NARROW __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

CS231N_NARROW void store8(__m256 v, c10::BFloat16* p) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  const __m256i b = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

CS231N_NARROW void store8(__m256 v, c10::Half* p) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The sum of a vector's 8 lanes, in double.
CS231N_NARROW double hsum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  double s = 0;
  for (float l : lanes) s += l;
  return s;
}

// (count, mean, M2) of a block of `count` runs of `len` values, `stride` apart (batch_norm.cpp's
// block_stats): the block's mean as the shift, then the corrected two-pass sums (bn_block_stats).
template <typename scalar_t>
CS231N_NARROW BnStats<double> narrow_block_stats(const scalar_t* x, int64_t count, int64_t stride, int64_t len) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  double total = 0;
  for (int64_t r = 0; r < count; ++r) {
    const scalar_t* v = x + r * stride;
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) {
      s0 = _mm256_add_ps(s0, load8(v + i));
      s1 = _mm256_add_ps(s1, load8(v + i + 8));
      s2 = _mm256_add_ps(s2, load8(v + i + 16));
      s3 = _mm256_add_ps(s3, load8(v + i + 24));
    }
    for (; i < len; ++i) total += static_cast<float>(v[i]);
  }
  const double n = static_cast<double>(count * len);
  total += hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  const float shift = static_cast<float>(total / n);
  const __m256 k = _mm256_set1_ps(shift);
  __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0, q0 = d0, q1 = d0, q2 = d0, q3 = d0;
  double sum_d = 0, sum_d2 = 0;
  for (int64_t r = 0; r < count; ++r) {
    const scalar_t* v = x + r * stride;
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) {
      const __m256 e0 = _mm256_sub_ps(load8(v + i), k), e1 = _mm256_sub_ps(load8(v + i + 8), k);
      const __m256 e2 = _mm256_sub_ps(load8(v + i + 16), k), e3 = _mm256_sub_ps(load8(v + i + 24), k);
      d0 = _mm256_add_ps(d0, e0), d1 = _mm256_add_ps(d1, e1), d2 = _mm256_add_ps(d2, e2), d3 = _mm256_add_ps(d3, e3);
      q0 = _mm256_fmadd_ps(e0, e0, q0), q1 = _mm256_fmadd_ps(e1, e1, q1);
      q2 = _mm256_fmadd_ps(e2, e2, q2), q3 = _mm256_fmadd_ps(e3, e3, q3);
    }
    for (; i < len; ++i) {
      const double d = static_cast<double>(static_cast<float>(v[i]) - shift);
      sum_d += d;
      sum_d2 += d * d;
    }
  }
  sum_d += hsum(_mm256_add_ps(_mm256_add_ps(d0, d1), _mm256_add_ps(d2, d3)));
  sum_d2 += hsum(_mm256_add_ps(_mm256_add_ps(q0, q1), _mm256_add_ps(q2, q3)));
  return bn_block_stats<double>(n, static_cast<double>(shift), sum_d, sum_d2);
}

// The backward's two sums over such a block (batch_norm.cpp's block_grad_sums), added to sum_dy and
// sum_dy_xmu.
template <typename scalar_t>
CS231N_NARROW void narrow_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t count, int64_t stride, int64_t len,
                                    float mean, double& sum_dy, double& sum_dy_xmu) {
  const __m256 m = _mm256_set1_ps(mean);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, p0 = a0, p1 = a0;
  for (int64_t r = 0; r < count; ++r) {
    const scalar_t* g = dy + r * stride;
    const scalar_t* v = x + r * stride;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      const __m256 g0 = load8(g + i), g1 = load8(g + i + 8);
      a0 = _mm256_add_ps(a0, g0), a1 = _mm256_add_ps(a1, g1);
      p0 = _mm256_fmadd_ps(g0, _mm256_sub_ps(load8(v + i), m), p0);
      p1 = _mm256_fmadd_ps(g1, _mm256_sub_ps(load8(v + i + 8), m), p1);
    }
    for (; i < len; ++i) {
      const float gi = static_cast<float>(g[i]);
      sum_dy += gi;
      sum_dy_xmu += static_cast<double>(gi) * static_cast<double>(static_cast<float>(v[i]) - mean);
    }
  }
  sum_dy += hsum(_mm256_add_ps(a0, a1));
  sum_dy_xmu += hsum(_mm256_add_ps(p0, p1));
}

// y = ((x - mean) - mean_lo) * scale + beta over a run of one channel (bn_normalize).
template <typename scalar_t>
CS231N_NARROW void narrow_normalize(const scalar_t* x, scalar_t* y, int64_t len, float mean, float mean_lo, float scale,
                                    float beta) {
  const __m256 m = _mm256_set1_ps(mean), lo = _mm256_set1_ps(mean_lo), s = _mm256_set1_ps(scale);
  const __m256 b = _mm256_set1_ps(beta);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    store8(_mm256_fmadd_ps(_mm256_sub_ps(_mm256_sub_ps(load8(x + i), m), lo), s, b), y + i);
  }
  for (; i < len; ++i) y[i] = static_cast<scalar_t>(bn_normalize(static_cast<float>(x[i]), mean, mean_lo, scale, beta));
}

// dx over a run of one channel: bn_backward_train (training) or bn_backward_eval.
template <typename scalar_t>
CS231N_NARROW void narrow_grad_input(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len, float mean,
                                     float dy_mean, float proj, float gi, bool training) {
  const __m256 m = _mm256_set1_ps(mean), dm = _mm256_set1_ps(dy_mean), pj = _mm256_set1_ps(proj);
  const __m256 s = _mm256_set1_ps(gi);
  int64_t i = 0;
  if (training) {
    for (; i + 8 <= len; i += 8) {
      const __m256 centred = _mm256_sub_ps(load8(x + i), m);
      const __m256 inner = _mm256_fnmadd_ps(centred, pj, _mm256_sub_ps(load8(dy + i), dm));  // dy - dm - (x-m)pj
      store8(_mm256_mul_ps(inner, s), dx + i);
    }
    for (; i < len; ++i) {
      dx[i] = static_cast<scalar_t>(
          bn_backward_train(static_cast<float>(dy[i]), static_cast<float>(x[i]), mean, dy_mean, proj, gi));
    }
  } else {
    for (; i + 8 <= len; i += 8) store8(_mm256_mul_ps(load8(dy + i), s), dx + i);
    for (; i < len; ++i) dx[i] = static_cast<scalar_t>(bn_backward_eval(static_cast<float>(dy[i]), gi));
  }
}

// The same over a channel-last row: len values of consecutive channels, each with its own constants
// (the arrays start at the row's first channel).
template <typename scalar_t>
CS231N_NARROW void narrow_normalize_row(const scalar_t* x, scalar_t* y, int64_t len, const float* mean,
                                        const float* mean_lo, const float* scale, const float* beta) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 centred =
        _mm256_sub_ps(_mm256_sub_ps(load8(x + i), _mm256_loadu_ps(mean + i)), _mm256_loadu_ps(mean_lo + i));
    store8(_mm256_fmadd_ps(centred, _mm256_loadu_ps(scale + i), _mm256_loadu_ps(beta + i)), y + i);
  }
  for (; i < len; ++i) {
    y[i] = static_cast<scalar_t>(bn_normalize(static_cast<float>(x[i]), mean[i], mean_lo[i], scale[i], beta[i]));
  }
}

template <typename scalar_t>
CS231N_NARROW void narrow_grad_input_row(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len,
                                         const float* mean, const float* dy_mean, const float* proj, const float* gi,
                                         bool training) {
  int64_t i = 0;
  if (training) {
    for (; i + 8 <= len; i += 8) {
      const __m256 centred = _mm256_sub_ps(load8(x + i), _mm256_loadu_ps(mean + i));
      const __m256 inner = _mm256_fnmadd_ps(centred, _mm256_loadu_ps(proj + i),
                                            _mm256_sub_ps(load8(dy + i), _mm256_loadu_ps(dy_mean + i)));
      store8(_mm256_mul_ps(inner, _mm256_loadu_ps(gi + i)), dx + i);
    }
    for (; i < len; ++i) {
      dx[i] = static_cast<scalar_t>(
          bn_backward_train(static_cast<float>(dy[i]), static_cast<float>(x[i]), mean[i], dy_mean[i], proj[i], gi[i]));
    }
  } else {
    for (; i + 8 <= len; i += 8) store8(_mm256_mul_ps(load8(dy + i), _mm256_loadu_ps(gi + i)), dx + i);
    for (; i < len; ++i) dx[i] = static_cast<scalar_t>(bn_backward_eval(static_cast<float>(dy[i]), gi[i]));
  }
}

// The backward's two sums over a channel-last row, lane by lane into a[c] and p[c] (float32 per block of
// rows, as batch_norm.cpp's channel-last loop).
template <typename scalar_t>
CS231N_NARROW void narrow_grad_sums_row(const scalar_t* dy, const scalar_t* x, int64_t len, const float* mean, float* a,
                                        float* p) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 g = load8(dy + i);
    _mm256_storeu_ps(a + i, _mm256_add_ps(_mm256_loadu_ps(a + i), g));
    _mm256_storeu_ps(
        p + i, _mm256_fmadd_ps(g, _mm256_sub_ps(load8(x + i), _mm256_loadu_ps(mean + i)), _mm256_loadu_ps(p + i)));
  }
  for (; i < len; ++i) {
    const float g = static_cast<float>(dy[i]);
    a[i] += g;
    p[i] += g * (static_cast<float>(x[i]) - mean[i]);
  }
}

// ---- the elementwise passes on AVX-512, 16 values at a time ----
// At 8 values a vector the passes that read and write the narrow dtype were bound by their own arithmetic
// (the rounding is ten operations), not by memory: bfloat16 channels_last eval (16, 32, 112, 112) ran at
// 20 GB/s, 1.35 times oneDNN's time.
CS231N_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
CS231N_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
CS231N_AVX512 inline void store16(__m512 v, c10::BFloat16* p) {  // (reduced_float.h's rounding)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits_avx512(v));
}
CS231N_AVX512 inline void store16(__m512 v, c10::Half* p) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// narrow_normalize and narrow_normalize_row, 16 at a time (the last few as they do).
template <typename scalar_t>
CS231N_AVX512 void narrow_normalize_avx512(const scalar_t* x, scalar_t* y, int64_t len, float mean, float mean_lo,
                                           float scale, float beta) {
  const __m512 m = _mm512_set1_ps(mean), lo = _mm512_set1_ps(mean_lo), s = _mm512_set1_ps(scale);
  const __m512 b = _mm512_set1_ps(beta);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    store16(_mm512_fmadd_ps(_mm512_sub_ps(_mm512_sub_ps(load16(x + i), m), lo), s, b), y + i);
  }
  for (; i < len; ++i) y[i] = static_cast<scalar_t>(bn_normalize(static_cast<float>(x[i]), mean, mean_lo, scale, beta));
}

template <typename scalar_t>
CS231N_AVX512 void narrow_normalize_row_avx512(const scalar_t* x, scalar_t* y, int64_t len, const float* mean,
                                               const float* mean_lo, const float* scale, const float* beta) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 centred =
        _mm512_sub_ps(_mm512_sub_ps(load16(x + i), _mm512_loadu_ps(mean + i)), _mm512_loadu_ps(mean_lo + i));
    store16(_mm512_fmadd_ps(centred, _mm512_loadu_ps(scale + i), _mm512_loadu_ps(beta + i)), y + i);
  }
  for (; i < len; ++i) {
    y[i] = static_cast<scalar_t>(bn_normalize(static_cast<float>(x[i]), mean[i], mean_lo[i], scale[i], beta[i]));
  }
}

// narrow_grad_input and narrow_grad_input_row, 16 at a time.
template <typename scalar_t>
CS231N_AVX512 void narrow_grad_input_avx512(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len,
                                            float mean, float dy_mean, float proj, float gi, bool training) {
  const __m512 m = _mm512_set1_ps(mean), dm = _mm512_set1_ps(dy_mean), pj = _mm512_set1_ps(proj);
  const __m512 s = _mm512_set1_ps(gi);
  int64_t i = 0;
  if (training) {
    for (; i + 16 <= len; i += 16) {
      const __m512 centred = _mm512_sub_ps(load16(x + i), m);
      const __m512 inner = _mm512_fnmadd_ps(centred, pj, _mm512_sub_ps(load16(dy + i), dm));  // dy - dm - (x-m)pj
      store16(_mm512_mul_ps(inner, s), dx + i);
    }
    for (; i < len; ++i) {
      dx[i] = static_cast<scalar_t>(
          bn_backward_train(static_cast<float>(dy[i]), static_cast<float>(x[i]), mean, dy_mean, proj, gi));
    }
  } else {
    for (; i + 16 <= len; i += 16) store16(_mm512_mul_ps(load16(dy + i), s), dx + i);
    for (; i < len; ++i) dx[i] = static_cast<scalar_t>(bn_backward_eval(static_cast<float>(dy[i]), gi));
  }
}

template <typename scalar_t>
CS231N_AVX512 void narrow_grad_input_row_avx512(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len,
                                                const float* mean, const float* dy_mean, const float* proj,
                                                const float* gi, bool training) {
  int64_t i = 0;
  if (training) {
    for (; i + 16 <= len; i += 16) {
      const __m512 centred = _mm512_sub_ps(load16(x + i), _mm512_loadu_ps(mean + i));
      const __m512 inner = _mm512_fnmadd_ps(centred, _mm512_loadu_ps(proj + i),
                                            _mm512_sub_ps(load16(dy + i), _mm512_loadu_ps(dy_mean + i)));
      store16(_mm512_mul_ps(inner, _mm512_loadu_ps(gi + i)), dx + i);
    }
    for (; i < len; ++i) {
      dx[i] = static_cast<scalar_t>(
          bn_backward_train(static_cast<float>(dy[i]), static_cast<float>(x[i]), mean[i], dy_mean[i], proj[i], gi[i]));
    }
  } else {
    for (; i + 16 <= len; i += 16) store16(_mm512_mul_ps(load16(dy + i), _mm512_loadu_ps(gi + i)), dx + i);
    for (; i < len; ++i) dx[i] = static_cast<scalar_t>(bn_backward_eval(static_cast<float>(dy[i]), gi[i]));
  }
}

#undef CS231N_NARROW
#endif  // CS231N_X86

}  // namespace cpu
}  // namespace torch_cs231n
