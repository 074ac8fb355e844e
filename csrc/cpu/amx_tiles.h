// The AMX tiles (Intel's matrix unit: Sapphire Rapids and later) as the bfloat16 convolution uses them
// (conv2d_amx.h has the routes). 8 tiles of 16 rows x 64 bytes; tdpbf16ps adds A (16 x 32 bfloat16)
// times B (32 x 16 bfloat16, in pairs: row q holds 16 columns' values 2q and 2q+1, the layout vdpbf16ps
// reads) into C (16 x 16 float32): 8192 products, exact in float32 and summed there. A tile load takes
// 16 rows from any address with any row stride, so A and B are mostly read in place.
//
// GCC 12's intrinsics hide their memory operands from the compiler (_tile_loadconfig names 8 bytes of the
// config, _tile_loadd none of what it reads): the config is loaded by an asm that names all of it, and
// the kernels begin with a compiler barrier, so that every store to A and B is done before the loads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/reduced_float.h"
#include "cpu/transpose16.h"

#if CS231N_X86
#include <immintrin.h>
#endif

namespace torch_cs231n {
namespace conv2d_cpu {

constexpr int kAmxBlock = 32;  // pixels and filters a block: 2 x 2 tiles of 16
constexpr int kAmxK = 32;      // bfloat16 values of k a tile step (a tile row: 64 bytes)

// A buffer of n values whose first lies on a 64-byte boundary: a tile row of 64 bytes then fills one cache
// line instead of straddling two. Zeroed, unless the caller writes every value a kept result reads (the
// forward's rows of A: a tile's rows past the last are read, but only into rows of C that are not stored).
template <typename T>
class TileBuffer {
 public:
  explicit TileBuffer(int64_t n, bool zeroed = true)
      : values_(zeroed ? new T[n + 64 / sizeof(T)]() : new T[n + 64 / sizeof(T)]) {
    const auto address = reinterpret_cast<uintptr_t>(values_.get());
    data_ = values_.get() + ((64 - address % 64) % 64) / sizeof(T);
  }
  T* data() { return data_; }
  const T* data() const { return data_; }

 private:
  std::unique_ptr<T[]> values_;
  T* data_;
};

#if CS231N_X86
// The tile configuration (palette 1): tiles 0-7, each 16 rows of 64 bytes.
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// The tiles configured on this thread for the scope, released after it (a thread holding tile state
// costs every context switch 8 KiB more to save).
class AmxScope {
 public:
  CS231N_AMX AmxScope() {
    AmxConfig config;
    for (int t = 0; t < 8; ++t) {
      config.bytes_per_row[t] = 64;
      config.rows[t] = 16;
    }
    __asm__ volatile("ldtilecfg %0" ::"m"(config));
  }
  CS231N_AMX ~AmxScope() { _tile_release(); }
  AmxScope(const AmxScope&) = delete;
  AmxScope& operator=(const AmxScope&) = delete;
};

// One block: C[r, j] (+)= Σ_t Σ_k A[r, t, k] · B[t, k, j] for 32 rows r and 32 columns j, where row r's
// k-th value under tap t is a[r * a_row + a_tap[t] + k] (k < 32 · ksteps) and B's pair q of tap t,
// column j is the word b[t * b_tap + q * b_row + j]. C is c (row stride ldc floats): added to when
// `accumulate`, overwritten otherwise.
//
// The tiles are not renamed: a load into tile 4 waits until every tdpbf16ps reading tile 4 is done. So
// each step's loads for the next step go in as soon as their tile is free (A's rows 0-15 after the two
// products that read them, ...), while the step's other products run, instead of all four loads after
// all four products: 4-8% faster forwards on the 2-core Xeon (docs/benchmarks.md). The products of each C
// tile come in the same order either way, so the sums are the same, bit for bit.
CS231N_AMX inline void amx_block(int64_t taps, int64_t ksteps, const uint16_t* a, int64_t a_row, const int64_t* a_tap,
                                 const uint32_t* b, int64_t b_tap, int64_t b_row, float* c, int64_t ldc,
                                 bool accumulate) {
  __asm__ volatile("" ::: "memory");                                             // (see the top)
  const int64_t a_stride = a_row * 2, b_stride = b_row * 4, c_stride = ldc * 4;  // bytes
  if (accumulate) {
    _tile_loadd(0, c, c_stride);
    _tile_loadd(1, c + 16, c_stride);
    _tile_loadd(2, c + 16 * ldc, c_stride);
    _tile_loadd(3, c + 16 * ldc + 16, c_stride);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  // step (t, k): A's rows 0-15 and 16-31 (tiles 4, 5) and B's columns 0-15 and 16-31 (tiles 6, 7)
  const int64_t steps = taps * ksteps, a_half = 16 * a_row, b_step = (kAmxK / 2) * b_row;
  if (steps == 0) {  // no products: C as it was, or zeros
    _tile_stored(0, c, c_stride);
    _tile_stored(1, c + 16, c_stride);
    _tile_stored(2, c + 16 * ldc, c_stride);
    _tile_stored(3, c + 16 * ldc + 16, c_stride);
    return;
  }
  _tile_loadd(4, a + a_tap[0], a_stride);
  _tile_loadd(6, b, b_stride);
  _tile_loadd(5, a + a_tap[0] + a_half, a_stride);
  _tile_loadd(7, b + 16, b_stride);
  int64_t t = 0, k = 0;
  for (int64_t s = 1; s < steps; ++s) {
    if (++k == ksteps) {
      k = 0;
      ++t;
    }
    const uint16_t* an = a + a_tap[t] + k * kAmxK;
    const uint32_t* bn = b + t * b_tap + k * b_step;
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(4, an, a_stride);  // tile 4 is free
    _tile_dpbf16ps(2, 5, 6);
    _tile_loadd(6, bn, b_stride);  // tile 6 is free
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(5, an + a_half, a_stride);
    _tile_loadd(7, bn + 16, b_stride);
  }
  _tile_dpbf16ps(0, 4, 6);  // the last step's products
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
  _tile_stored(0, c, c_stride);
  _tile_stored(1, c + 16, c_stride);
  _tile_stored(2, c + 16 * ldc, c_stride);
  _tile_stored(3, c + 16 * ldc + 16, c_stride);
}

// 32 floats (lo, then hi) as bfloat16 bits, rounded as cpu::from_float rounds them: to nearest even, every
// NaN 0x7fc0, denormals kept. vcvtne2ps2bf16 rounds to nearest even in one instruction but flushes
// denormals to zero and keeps a NaN's sign and payload, so the rare vectors holding either go the long way
// (cpu::bf16_bits_avx512).
CS231N_AMX inline __m512i amx_bf16_bits(__m512 lo, __m512 hi) {
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // vfpclassps: quiet NaN, denormal, signalling NaN
  const __mmask16 odd = _mm512_fpclass_ps_mask(lo, kNanOrDenormal) | _mm512_fpclass_ps_mask(hi, kNanOrDenormal);
  if (__builtin_expect(odd == 0, 1)) return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  return _mm512_inserti64x4(_mm512_castsi256_si512(cpu::bf16_bits_avx512(lo)), cpu::bf16_bits_avx512(hi), 1);
}

// A block's C (32 rows of 32 floats, as amx_block stores it) into an output: row r < rows, its first n
// columns plus the bias when there is one, at out + place[r], or nowhere where place[r] < 0 (a pitch's
// thrown-away column). float32 outputs as they are, bfloat16 ones rounded (amx_bf16_bits). One call a
// block, its masks and bias in registers: a call a row, with the rounding done lane by lane, took longer
// than the block's tdpbf16ps on 1 x 1 layers of 64 channels.
template <typename T>
CS231N_AMX inline void amx_store_block(const float* c, const int64_t* place, int64_t rows, int n, const float* bias,
                                       T* out) {
  const __mmask16 lo_mask = cpu::lane_mask(n), hi_mask = cpu::lane_mask(n - 16);
  const __m512 lo_bias = bias ? _mm512_maskz_loadu_ps(lo_mask, bias) : _mm512_setzero_ps();
  const __m512 hi_bias = bias ? _mm512_maskz_loadu_ps(hi_mask, bias + 16) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    if (place[r] < 0) continue;
    __m512 lo = _mm512_loadu_ps(c + r * kAmxBlock), hi = _mm512_loadu_ps(c + r * kAmxBlock + 16);
    if (bias) {  // (not added when absent: the sums stay bit for bit what the tiles made)
      lo = _mm512_add_ps(lo, lo_bias);
      hi = _mm512_add_ps(hi, hi_bias);
    }
    if constexpr (std::is_same_v<T, float>) {
      _mm512_mask_storeu_ps(out + place[r], lo_mask, lo);
      _mm512_mask_storeu_ps(out + place[r] + 16, hi_mask, hi);
    } else {
      static_assert(std::is_same_v<T, c10::BFloat16>, "amx_store_block: float or bfloat16 outputs");
      const __mmask32 mask = static_cast<__mmask32>(lo_mask) | static_cast<__mmask32>(hi_mask) << 16;
      _mm512_mask_storeu_epi16(out + place[r], mask, amx_bf16_bits(lo, hi));
    }
  }
}

// The same into NCHW planes, transposed: row r's output of filter f at y[place[r] + f * plane], skipped where
// place[r] < 0. A block's kept rows are consecutive outputs (the pitch's thrown-away columns between them)
// save where a block of samples' rows crosses into the next sample, so each run of rows whose places follow
// one another is one store a filter of the run's lanes of the 32 rounded values, packed (vpcompressw);
// the block goes through a 32 x 32 transpose first (cpu/transpose16.h). A staging copy of the
// sample, transposed and rounded afterwards, took 6 times the tiles' time on NCHW 1 x 1 layers.
CS231N_AMX inline void amx_store_block_planes(const float* c, const int64_t* place, int64_t rows, int n,
                                              const float* bias, c10::BFloat16* y, int64_t plane) {
  alignas(64) float ct[kAmxBlock * kAmxBlock];  // ct[f * 32 + r] = c[r * 32 + f]
  for (int rb = 0; rb < 2; ++rb) {
    for (int fb = 0; fb < 2; ++fb) {
      __m512 v[16];
      for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_ps(c + (16 * rb + i) * kAmxBlock + 16 * fb);
      cpu::transpose16(v);
      for (int j = 0; j < 16; ++j) _mm512_store_ps(ct + (16 * fb + j) * kAmxBlock + 16 * rb, v[j]);
    }
  }
  struct Run {
    int64_t first;    // y's index of the run's first row (filter 0)
    int64_t length;   // rows
    __mmask32 lanes;  // the run's rows
  };
  Run runs[kAmxBlock];
  int count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (place[r] < 0) continue;
    if (count == 0 || place[r] != runs[count - 1].first + runs[count - 1].length) runs[count++] = {place[r], 0, 0};
    runs[count - 1].length += 1;
    runs[count - 1].lanes |= __mmask32{1} << r;
  }
  for (int f = 0; f < n; ++f) {
    __m512 lo = _mm512_load_ps(ct + f * kAmxBlock), hi = _mm512_load_ps(ct + f * kAmxBlock + 16);
    if (bias) {
      lo = _mm512_add_ps(lo, _mm512_set1_ps(bias[f]));
      hi = _mm512_add_ps(hi, _mm512_set1_ps(bias[f]));
    }
    const __m512i bits = amx_bf16_bits(lo, hi);
    for (int k = 0; k < count; ++k) {  // (compressed in a register: vpcompressw into memory is slow on some CPUs)
      const __mmask32 packed = static_cast<__mmask32>((uint64_t{1} << runs[k].length) - 1);
      _mm512_mask_storeu_epi16(y + runs[k].first + f * plane, packed, _mm512_maskz_compress_epi16(runs[k].lanes, bits));
    }
  }
}

#endif

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
