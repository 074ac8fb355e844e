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
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/reduced_float.h"

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
  for (int64_t t = 0; t < taps; ++t) {
    const uint16_t* at = a + a_tap[t];
    const uint32_t* bt = b + t * b_tap;
    for (int64_t k = 0; k < ksteps; ++k) {
      _tile_loadd(4, at + k * kAmxK, a_stride);                     // rows 0-15
      _tile_loadd(5, at + 16 * a_row + k * kAmxK, a_stride);        // rows 16-31
      _tile_loadd(6, bt + k * (kAmxK / 2) * b_row, b_stride);       // columns 0-15
      _tile_loadd(7, bt + k * (kAmxK / 2) * b_row + 16, b_stride);  // columns 16-31
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, c_stride);
  _tile_stored(1, c + 16, c_stride);
  _tile_stored(2, c + 16 * ldc, c_stride);
  _tile_stored(3, c + 16 * ldc + 16, c_stride);
}

// The block's row r into out's row (n columns of it, plus the bias when there is one).
CS231N_AMX inline void amx_store_row(const float* c_row, float* out, int n, const float* bias) {
  for (int v = 0; v < 2; ++v) {
    const __mmask16 mask = cpu::lane_mask(n - 16 * v);
    __m512 x = _mm512_loadu_ps(c_row + 16 * v);
    if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, bias + 16 * v));
    _mm512_mask_storeu_ps(out + 16 * v, mask, x);
  }
}

// The same, rounded to bfloat16 as it is stored (cpu::from_float's rounding), into a bfloat16 row.
CS231N_AMX inline void amx_store_row_bf16(const float* c_row, c10::BFloat16* out, int n, const float* bias) {
  for (int v = 0; v < 2; ++v) {
    const __mmask16 mask = cpu::lane_mask(n - 16 * v);
    __m512 x = _mm512_loadu_ps(c_row + 16 * v);
    if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, bias + 16 * v));
    _mm256_mask_storeu_epi16(out + 16 * v, mask, cpu::bf16_bits_avx512(x));
  }
}

#endif

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
