// float16 and bfloat16 on the CPU. Every op computes them as torch does: in float32 (at::opmath_type),
// rounded to the input's dtype once, at the end. Two ways:
//   - loops that read and write the narrow dtype, converting pieces that stay in L1 (to_float and
//     from_float below): batch norm;
//   - where a kernel has no such loop, the op converts its operands to float32 tensors, runs the float32
//     kernel, and rounds the result (to_float(Tensor), round_to): the same numbers, at the price of a
//     float32 copy of each operand (docs/architecture.md, "Dtypes").
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "cpu/cpu_features.h"

#if CS231N_X86
#include <immintrin.h>
#endif

namespace torch_cs231n {
namespace cpu {

// The type a loop computes in (float32 for float16 and bfloat16; any other type itself), and whether a
// dtype is such a narrow one.
template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;
template <typename scalar_t>
constexpr bool kNarrow = !std::is_same_v<scalar_t, opmath_t<scalar_t>>;

inline bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// A float32 copy with the same sizes and strides (memory format and all), so that the float32 kernel picks
// the same layout for its results as for the original.
inline at::Tensor to_float(const at::Tensor& t) { return t.defined() && is_reduced_float(t) ? t.to(at::kFloat) : t; }

inline std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return t;
  return to_float(*t);
}

// A result of the float32 kernel rounded to `dtype` (strides kept); an undefined or absent one stays so.
inline at::Tensor round_to(const at::Tensor& t, at::ScalarType dtype) { return t.defined() ? t.to(dtype) : t; }

inline std::optional<at::Tensor> round_to(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return t;
  return round_to(*t, dtype);
}

// ---- runs of values, for loops that read and write the narrow dtype and compute in float32 ----
// bfloat16 is the top half of a float32: widening is a shift, narrowing rounds to nearest even (the
// bits below the top 16, plus 0x7fff, plus the kept part's lowest bit, carry into it), and a NaN
// becomes torch's quiet NaN 0x7fc0, as c10::BFloat16 does. Written on integers, the loops vectorise.
#if CS231N_X86
// The same on AVX2, 8 values at a time (the baseline build's SSE2 has no unsigned compare nor blend, and
// left these loops scalar). A tail of fewer than 8 goes through the portable loops below.
CS231N_AVX2 inline int64_t to_float_avx2(const c10::BFloat16* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_slli_epi32(wide, 16));
  }
  return i;
}

CS231N_AVX2 inline int64_t from_float_avx2(const float* src, int64_t n, c10::BFloat16* dst) {
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  const __m256i quiet_nan = _mm256_set1_epi32(0x7fc0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias), lsb), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);  // both sides < 2^31
    const __m256i b = _mm256_blendv_epi8(rounded, quiet_nan, nan);
    // 8 x 32 -> 8 x 16 bits: packus works within 128-bit lanes, the permute puts them in order
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
  }
  return i;
}

// The same rounding of 16 values on AVX-512 (for kernels that round as they store: AMX's tiles), their
// bfloat16 bits in order.
CS231N_AVX512 inline __m256i bf16_bits_avx512(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7fc0)));
}
#endif

inline void to_float(const c10::BFloat16* src, int64_t n, float* dst) {
#if CS231N_X86
  if (cpu_isa() >= Isa::kAvx2) {
    const int64_t done = to_float_avx2(src, n, dst);
    src += done;
    dst += done;
    n -= done;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    uint16_t b;
    std::memcpy(&b, src + i, 2);
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

inline void from_float(const float* src, int64_t n, c10::BFloat16* dst) {
#if CS231N_X86
  if (cpu_isa() >= Isa::kAvx2) {
    const int64_t done = from_float_avx2(src, n, dst);
    src += done;
    dst += done;
    n -= done;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint16_t b = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
    std::memcpy(dst + i, &b, 2);
  }
}

// float16 through F16C's conversions, 8 values at a time; without them (or for a tail), c10::Half's own.
#if CS231N_X86
CS231N_F16C inline void to_float_f16c(const c10::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

CS231N_F16C inline void from_float_f16c(const float* src, int64_t n, c10::Half* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}
#endif

inline void to_float(const c10::Half* src, int64_t n, float* dst) {
#if CS231N_X86
  if (has_f16c()) return to_float_f16c(src, n, dst);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void from_float(const float* src, int64_t n, c10::Half* dst) {
#if CS231N_X86
  if (has_f16c()) return from_float_f16c(src, n, dst);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

}  // namespace cpu
}  // namespace torch_cs231n
