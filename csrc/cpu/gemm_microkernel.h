// The GEMM's micro-kernels: one MR x NR tile of C = A·B kept in registers while k runs, for AVX-512,
// AVX2+FMA and portable C++. gemm.cpp packs the operands and picks one at run time (cpu_features.h).
//
// Each k step reads one packed column of A (MR floats, broadcast one at a time) and one packed row of B
// (NR floats, NR/L vector loads, L = floats per vector), and does MR * NR/L fused multiply-adds into the
// accumulators; C is read and written once per tile, after the k loop. The register block is chosen so
// that (1) the accumulators plus the B vectors and one broadcast fit in the register file, and (2) there
// are enough independent accumulators to keep both FMA pipes busy through the FMA latency (2 pipes x 4
// cycles = 8 chains at least), with as few loads per FMA as the register file allows:
//
//   ISA        vector   registers   MR x NR    accumulators   loads per k step   FMAs per k step
//   AVX-512    16 fp32  32 zmm      8 x 48     24 zmm         8 bcast + 3 = 11   24
//   AVX2+FMA    8 fp32  16 ymm      6 x 16     12 ymm         6 bcast + 2 = 8    12
//   portable    scalar  -           4 x 8      32 scalars     (the compiler vectorises the 8 columns;
//                                                             float64 always runs this one)
//
// AVX-512's 8 x 48 (rather than 12 x 32 or 14 x 32) is the one with the fewest loads per FMA, and MR = 8
// divides the conv layers' channel counts (32, 64, 128, 256), which are M in the NCHW forward: no
// wasted edge rows there. Measured on Zen 5 (2 FMA pipes of 512 bits) in docs/conv2d.md.
//
// Edges: the packed panels are zero-padded to whole MR and NR, so the k loop never tests; only the first
// m rows and n columns of the tile are written (masked stores on AVX-512).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/cpu_features.h"

#if CS231N_X86
#include <immintrin.h>
#endif

namespace torch_cs231n {
namespace cpu {

// What the kernel adds when it writes the tile (GemmEpilogue for this tile; the biases point at the
// tile's first row / column).
template <typename T>
struct TileEpilogue {
  bool accumulate;
  const T* row_bias;
  const T* col_bias;
};

// a: kc x MR packed (MR values per k), b: kc x NR packed; c: the tile's top-left, row stride ldc;
// m <= MR rows and n <= NR columns are written.
template <typename T>
using MicroKernel = void (*)(int64_t kc, const T* a, const T* b, T* c, int64_t ldc, int m, int n,
                             const TileEpilogue<T>& ep);

// ---------------------------------------------------------------------------------------- portable C++
template <typename T, int MR, int NR>
void microkernel_portable(int64_t kc, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c, int64_t ldc,
                          int m, int n, const TileEpilogue<T>& ep) {
  T acc[MR][NR] = {};
  for (int64_t p = 0; p < kc; ++p, a += MR, b += NR) {
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < NR; ++j) acc[r][j] += a[r] * b[j];
    }
  }
  for (int r = 0; r < m; ++r) {
    T* c_row = c + r * ldc;
    for (int j = 0; j < n; ++j) {
      T v = acc[r][j];
      if (ep.accumulate) v += c_row[j];
      if (ep.row_bias) v += ep.row_bias[r];
      if (ep.col_bias) v += ep.col_bias[j];
      c_row[j] = v;
    }
  }
}

#if CS231N_X86
// -------------------------------------------------------------------------------------------- AVX2+FMA
template <int MR, int NV>
CS231N_AVX2 void microkernel_avx2(int64_t kc, const float* __restrict__ a, const float* __restrict__ b,
                                  float* __restrict__ c, int64_t ldc, int m, int n, const TileEpilogue<float>& ep) {
  constexpr int NR = 8 * NV;
  __m256 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  }
#pragma GCC unroll 2
  for (int64_t p = 0; p < kc; ++p, a += MR, b += NR) {
    __m256 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + 8 * v);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  // The tile through a buffer when it is cut by the right edge (AVX2 has no cheap masked store).
  alignas(32) float edge[MR][NR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (r >= m) break;
    float* c_row = c + r * ldc;
    const __m256 rb = ep.row_bias ? _mm256_set1_ps(ep.row_bias[r]) : _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m256 x = _mm256_add_ps(acc[r][v], rb);
      if (n == NR) {
        if (ep.accumulate) x = _mm256_add_ps(x, _mm256_loadu_ps(c_row + 8 * v));
        if (ep.col_bias) x = _mm256_add_ps(x, _mm256_loadu_ps(ep.col_bias + 8 * v));
        _mm256_storeu_ps(c_row + 8 * v, x);
      } else {
        _mm256_store_ps(edge[r] + 8 * v, x);
      }
    }
    if (n != NR) {
      for (int j = 0; j < n; ++j) {
        float v = edge[r][j];
        if (ep.accumulate) v += c_row[j];
        if (ep.col_bias) v += ep.col_bias[j];
        c_row[j] = v;
      }
    }
  }
}

// --------------------------------------------------------------------------------------------- AVX-512
// The three AVX-512 kernels differ only in where a k step's A values and B row come from; these parts
// are theirs in common (always inlined, so the accumulators stay in registers).
#define CS231N_AVX512_INLINE CS231N_AVX512 inline __attribute__((always_inline))

template <int MR, int NV>
CS231N_AVX512_INLINE void zero_tile(__m512 (&acc)[MR][NV]) {
#pragma GCC unroll 24
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
}

// One k step: acc[r] += a(r) · (the NV vectors at b_row), for the MR rows.
template <int MR, int NV, typename AValue>
CS231N_AVX512_INLINE void fma_step(__m512 (&acc)[MR][NV], const float* b_row, const AValue& a) {
  __m512 bv[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b_row + 16 * v);
#pragma GCC unroll 24
  for (int r = 0; r < MR; ++r) {
    const __m512 av = _mm512_set1_ps(a(r));
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
  }
}

// The tile written: its first m rows and n columns, with the epilogue's terms, through lane masks.
template <int MR, int NV>
CS231N_AVX512_INLINE void store_tile(const __m512 (&acc)[MR][NV], float* c, int64_t ldc, int m, int n,
                                     const TileEpilogue<float>& ep) {
  __mmask16 mask[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) mask[v] = lane_mask(n - 16 * v);
#pragma GCC unroll 24
  for (int r = 0; r < MR; ++r) {
    if (r >= m) break;
    float* c_row = c + r * ldc;
    const __m512 rb = ep.row_bias ? _mm512_set1_ps(ep.row_bias[r]) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m512 x = _mm512_add_ps(acc[r][v], rb);
      if (ep.accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask[v], c_row + 16 * v));
      if (ep.col_bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask[v], ep.col_bias + 16 * v));
      _mm512_mask_storeu_ps(c_row + 16 * v, mask[v], x);
    }
  }
}

// Both operands packed (the GEMM of the table above).
template <int MR, int NV>
CS231N_AVX512 void microkernel_avx512(int64_t kc, const float* __restrict__ a, const float* __restrict__ b,
                                      float* __restrict__ c, int64_t ldc, int m, int n, const TileEpilogue<float>& ep) {
  constexpr int NR = 16 * NV;
  __m512 acc[MR][NV];
  zero_tile(acc);
  // The tile of C is read after the loop: ask for its lines now, every one of them (a row of 48 floats
  // spans 3 or 4 lines; its first and last alone left the middle ones to miss: 2% of a 2048^3 product).
#pragma GCC unroll 24
  for (int r = 0; r < MR; ++r) {
    if (r >= m) break;
    const int cols = std::min(n, NR);
#pragma GCC unroll 4
    for (int j = 0; j < NR; j += 16) {
      if (j < cols) _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + j), _MM_HINT_T0);
    }
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + cols - 1), _MM_HINT_T0);
  }
#pragma GCC unroll 2
  for (int64_t p = 0; p < kc; ++p, a += MR, b += NR) fma_step(acc, b, [a](int r) { return a[r]; });
  store_tile(acc, c, ldc, m, n, ep);
}

// B read in place, row by row: row p of the tile's B starts at b + b_off[p]. For the shifted planes of a
// stride-1 convolution (conv2d.cpp), where every row of col(x) is a run of the padded input, so that B
// is never packed; and for a 1x1 layer's input planes as they lie. A last tile of fewer than 16 * NV
// columns reads its n through lane masks, so no row is read past its end.
template <int MR, int NV>
CS231N_AVX512 void microkernel_avx512_rows_b(int64_t kc, const float* __restrict__ a, const float* b,
                                             const int64_t* __restrict__ b_off, float* __restrict__ c, int64_t ldc,
                                             int m, int n, const TileEpilogue<float>& ep) {
  __m512 acc[MR][NV];
  zero_tile(acc);
  if (n >= 16 * NV) {
#pragma GCC unroll 2
    for (int64_t p = 0; p < kc; ++p, a += MR) fma_step(acc, b + b_off[p], [a](int r) { return a[r]; });
  } else {
    __mmask16 mask[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) mask[v] = lane_mask(n - 16 * v);
    for (int64_t p = 0; p < kc; ++p, a += MR) {
      __m512 bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_ps(mask[v], b + b_off[p] + 16 * v);
#pragma GCC unroll 24
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
      }
    }
  }
  store_tile(acc, c, ldc, m, n, ep);
}

// A read in place, for the channels_last convolution: C = Σ_s A_s · B_s over nseg segments (the
// filter's taps), A_s read at a_seg[s] + a_rows[r] + p (rows r = pixels, at the table's offsets; p =
// channels, contiguous), B packed as for the first kernel (the segments' rows one after the other). No A panel
// is packed: each pixel row is broadcast straight from the input, so the accumulators stay in registers
// across all taps. Rows r >= m read row 0 (never written). B's rows lie PITCH floats apart (its slivers'
// width), of which the tile reads its NR = 16 * NV.
template <int MR, int NV, int PITCH>
CS231N_AVX512 void microkernel_avx512_segments(int64_t nseg, const float* const* a_seg, const int64_t* a_rows,
                                               int64_t kc, const float* __restrict__ b, float* __restrict__ c,
                                               int64_t ldc, int m, int n, const TileEpilogue<float>& ep) {
  static_assert(16 * NV <= PITCH, "the tile reads within B's rows");
  __m512 acc[MR][NV];
  zero_tile(acc);
  for (int64_t s = 0; s < nseg; ++s) {
    const float* ar[MR];
#pragma GCC unroll 24
    for (int r = 0; r < MR; ++r) ar[r] = a_seg[s] + a_rows[r < m ? r : 0];
#pragma GCC unroll 2
    for (int64_t p = 0; p < kc; ++p, b += PITCH) fma_step(acc, b, [&ar, p](int r) { return ar[r][p]; });
  }
  store_tile(acc, c, ldc, m, n, ep);
}

// Neither operand packed, for d_W in NHWC: A[r, p] = a_row[r][a_col[p]] (row r's start, plus column p's
// offset: a tap's shift of the padded input plus an output's pixel, so the MR values of a column are
// channels side by side), B's row p at b + p * ldb as it lies (dY), its first n columns read through
// lane masks. Rows r >= m read row 0 (never written).
template <int MR, int NV>
CS231N_AVX512 void microkernel_avx512_gather_a(int64_t kc, const float* const* a_row, const int64_t* __restrict__ a_col,
                                               const float* __restrict__ b, int64_t ldb, float* __restrict__ c,
                                               int64_t ldc, int m, int n, const TileEpilogue<float>& ep) {
  __m512 acc[MR][NV];
  zero_tile(acc);
  const float* ar[MR];
#pragma GCC unroll 24
  for (int r = 0; r < MR; ++r) ar[r] = a_row[r < m ? r : 0];
  __mmask16 mask[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) mask[v] = lane_mask(n - 16 * v);
#pragma GCC unroll 2
  for (int64_t p = 0; p < kc; ++p, b += ldb) {
    const int64_t at = a_col[p];
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_ps(mask[v], b + 16 * v);
#pragma GCC unroll 24
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(ar[r][at]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  store_tile(acc, c, ldc, m, n, ep);
}
#endif  // CS231N_X86

// The register block of each path (see the table above).
template <typename T>
struct MicroKernelInfo {
  int mr, nr;
  MicroKernel<T> kernel;
};

// float64 (gradcheck's dtype) always takes the portable kernel.
template <typename T>
inline MicroKernelInfo<T> microkernel_for(Isa) {
  return {4, 8, &microkernel_portable<T, 4, 8>};
}

template <>
inline MicroKernelInfo<float> microkernel_for<float>(Isa isa) {
#if CS231N_X86
  if (isa == Isa::kAvx512) return {8, 48, &microkernel_avx512<8, 3>};
  if (isa == Isa::kAvx2) return {6, 16, &microkernel_avx2<6, 2>};
#endif
  (void)isa;
  return {4, 8, &microkernel_portable<float, 4, 8>};
}

}  // namespace cpu
}  // namespace torch_cs231n
