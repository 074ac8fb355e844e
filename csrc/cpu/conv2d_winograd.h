// The CPU convolution by Winograd's F(2×2, 3×3): float32 3×3 layers of stride 1 on AVX-512, their forward,
// d_x (the transposed convolution, the same form) and d_W. Part of the CPU convolution (cpu/conv2d.cpp, which
// routes each layer; docs/conv2d.md has the table and the derivation; the transforms are common/winograd.h's,
// which the CUDA kernels share).
//
// A direct 3×3 layer does 9·C·F multiply-adds an output pixel; by 2×2 blocks of outputs, each from a 4×4
// tile of the input, it is 16·C·F a block, 4 a pixel: 2.25 times fewer. A sample's tiles in bands of tile
// rows (small images: several whole samples), each in blocks of tiles sized by U (winograd_forward_plan):
//     V[ξ][t][c] = (Bᵀ d_t,c B)[ξ]              d_t,c: tile t's 4×4 window of channel c (zeros outside)
//     M[ξ]       = V[ξ] · U[ξ]                  16 GEMMs, (tiles × C)·(C × F): gemm_segments, A in place
//     y_t,f      = Aᵀ M[·][t][f] A + b[f]       the block's 2×2 outputs (those inside the image)
// with U[ξ][c][f] = (G g_f,c Gᵀ)[ξ] computed once a call, straight into the GEMM's packed slivers (one
// sample among the threads with a large U: a sliver of 64 filters an item, winograd_forward_by_slivers). The
// transforms run on 16 channels (or filters) at a time, the pixels' channels being contiguous in NHWC; an
// NCHW band is transposed in cache on the way in and out, as conv_forward_nhwc does a sample. d_W is 16 GEMMs too,
// of the same V and the output gradient's transform (winograd_weight_grad, below).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common/conv2d.h"
#include "common/winograd.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"
#include "cpu/transpose16.h"

#if CS231N_X86
#include <immintrin.h>
#endif

namespace torch_cs231n {
namespace conv2d_cpu {

// Whether a layer goes by Winograd: float32 on AVX-512, 3×3, stride and dilation 1, one group, channels
// and filters whole vectors, outputs of at least 4×4; then, by pass (below), enough channels and tiles.
// TORCH_CS231N_CPU_CONV=direct gives these layers back to the direct kernels.
inline bool winograd_wanted() {
  const char* env = std::getenv("TORCH_CS231N_CPU_CONV");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "winograd") == 0) return true;
  TORCH_CHECK(std::strcmp(env, "direct") == 0,
              "TORCH_CS231N_CPU_CONV: expected 'winograd' or 'direct' (or unset: the default), but got '", env, "'");
  return false;
}

inline bool winograd_shape(const Conv2dGeometry& g) {
  return cpu::cpu_isa() == cpu::Isa::kAvx512 && g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && g.dh == 1 &&
         g.dw == 1 && g.groups == 1 && g.c % 16 == 0 && g.f % 16 == 0 && g.oh >= 4 && g.ow >= 4;
}

// A sample's tiles: tile t = (t_h, t_w) reads the padded input's rows 2t_h .. 2t_h+3 and columns
// 2t_w .. 2t_w+3, and writes the outputs (2t_h + i, 2t_w + j) that lie inside oH × oW.
struct WinogradTiles {
  int64_t th, tw;  // tiles per column and per row
  int64_t hp, wp;  // the padded input, large enough for every tile's window
  int64_t count() const { return th * tw; }
};
inline WinogradTiles winograd_tiles(const Conv2dGeometry& g) {
  const int64_t th = (g.oh + 1) / 2, tw = (g.ow + 1) / 2;
  return {th, tw, 2 * th + 2, 2 * tw + 2};
}

// The forward (and d_x, the transposed convolution's forward: g is then that convolution): its tiles go
// in blocks, each block's 16 GEMMs (block × C)·(C × F) reading all of U (64·C·F bytes). Where U fits in L2
// with the block's V and M (C·F ≤ 2¹⁴, 1 MiB), a block of those two about 512 KiB; where it does not, U
// comes from L3 or memory once per block, and the block grows with it, about C·F / (C + F) tiles so that
// U's share of the traffic is V's and M's (on a Xeon of 2 MiB L2, 24 tiles of 256 channels on 14 × 14
// took 16.6 ms, 96 took 12.5; 512 channels on 28 × 28: 64 → 39 ms from 24 to 288 tiles). Small images
// put several whole samples in one block.
struct WinogradForwardPlan {
  int64_t block;    // tiles a block at most: the rows of V and M in a thread's scratch
  int64_t groups;   // the batch's samples in this many even groups, each group's tiles one block (small
                    // images), a multiple of the threads; 0: each sample on its own, in bands
  int64_t samples;  // the largest group's samples (1 without groups)
  int64_t tiles;    // tiles a block holds, given the batch: what U's reading is spread over
};
inline WinogradForwardPlan winograd_forward_plan(const Conv2dGeometry& g) {
  const int64_t per_sample = winograd_tiles(g).count(), threads = at::get_num_threads();
  const int64_t block = 64 * g.c * g.f <= (int64_t(1) << 20)
                            ? std::clamp<int64_t>(8192 / (g.c + g.f) / 6 * 6, 24, 96)
                            : std::clamp<int64_t>(g.c * g.f / (g.c + g.f) / 6 * 6, 96, 288);
  const int64_t fit = block / per_sample;  // whole samples a block could hold
  if (fit < 2 || g.n < 2 * threads) return {block, 0, 1, std::min(block, per_sample)};
  const int64_t groups = ((g.n + fit - 1) / fit + threads - 1) / threads * threads;
  const int64_t samples = (g.n + groups - 1) / groups;
  return {block, groups, samples, samples * per_sample};
}

// Under 64 channels or filters the transforms cost as much as they save (32 channels on 56 × 56: d_x 0.89
// of torch's time by Winograd, 0.82 direct); under C·F / 4096 tiles a block, U's reading does (512
// channels on 7 × 7, one sample's 16 tiles a block: 1.36 of torch's time, direct 1.32).
constexpr int64_t kWinogradMinChannels = 64;
constexpr int64_t kWinogradChannelProductPerTile = 4096;

inline bool winograd_forward_applies(const Conv2dGeometry& g) {
  return winograd_shape(g) && g.c >= kWinogradMinChannels && g.f >= kWinogradMinChannels &&
         winograd_forward_plan(g).tiles * kWinogradChannelProductPerTile >= g.c * g.f && winograd_wanted();
}

// d_W: its ∂U (16·F·C) is written and read again whatever the batch, and under kWinogradMinGradTiles
// tiles in all that outweighs the product (batch 1 of 256 channels on 14 × 14, 49 tiles: 2.6 ms against
// 2.3 direct). Its depth is the tiles, so 32 channels are enough (2 × 32 × 56 × 56: 0.82 of torch's time
// with the forward, 0.91 direct).
constexpr int64_t kWinogradMinGradChannels = 32;
constexpr int64_t kWinogradMinGradTiles = 96;

inline bool winograd_weight_grad_applies(const Conv2dGeometry& g) {
  return winograd_shape(g) && g.c >= kWinogradMinGradChannels && g.f >= kWinogradMinGradChannels &&
         g.n * winograd_tiles(g).count() >= kWinogradMinGradTiles && winograd_wanted();
}

#if CS231N_X86
// 16 floats as one value of common/winograd.h's transforms, which only add, subtract and halve: GCC's
// vector arithmetic, which the AVX-512 functions below inline as zmm instructions.
struct Lanes16 {
  __m512 v;
  Lanes16() = default;
  explicit Lanes16(double s) : v(__m512{} + static_cast<float>(s)) {}
  static Lanes16 of(__m512 x) {
    Lanes16 l;
    l.v = x;
    return l;
  }
};
inline Lanes16 operator+(Lanes16 a, Lanes16 b) { return Lanes16::of(a.v + b.v); }
inline Lanes16 operator-(Lanes16 a, Lanes16 b) { return Lanes16::of(a.v - b.v); }
inline Lanes16 operator*(Lanes16 a, Lanes16 b) { return Lanes16::of(a.v * b.v); }
inline Lanes16 operator-(Lanes16 a) { return Lanes16::of(-a.v); }

// Lane l's offset l·stride, for the gathers and scatters below (strides within int32: winograd_forward
// copies a weight whose are not).
CS231N_AVX512 inline __m512i lane_offsets(int64_t stride) {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(static_cast<int>(stride)));
}

// U[ξ] = (G g Gᵀ)[ξ] for rows [i0, i1) of the GEMM's B (kc × n), in gemm_segments' packed form: U[ξ] at
// u + ξ·plane (plane ≥ kc·n rounded up to slivers of 64), sliver s at + s·kc·64, row i at + i·64. The filter at
// (row i, column j) has its tap (a, b) at w + i·s_row + j·s_col + a·s_a + b·s_b; 16 columns at a time.
// Where a filter's 9 taps lie together (s_b = ±1, s_a = 3·s_b: NCHW weights, forwards or turned by 180°),
// the 16 filters' runs are loaded and transposed in registers; where rows do (s_row = 1) or columns do
// (s_col = 1: channels_last weights, forwards and turned), a tap of 16 filters is one load; otherwise
// each tap is gathered (16 gathers of stride s_col took as long as the 16 GEMMs at batch 1). Columns
// past n are zeros.
CS231N_AVX512 inline void winograd_filters(const float* w, int64_t s_row, int64_t s_col, int64_t s_a, int64_t s_b,
                                           int64_t kc, int64_t n, int64_t i0, int64_t i1, float* u, int64_t plane) {
  const int64_t n_pad = (n + 63) / 64 * 64;
  const auto out_at = [&](int64_t i, int64_t j) { return u + j / 64 * kc * 64 + i * 64 + j % 64; };
  if (s_row == 1) {
    // Rows lie together (channels_last filters, forwards): 16 rows a vector, column by column, and each ξ's
    // 16 × 16 block transposed into the slivers' rows (the gathers of 16 columns took a third of a
    // 512-channel 7 × 7 layer's forward)
    for (int64_t i = i0; i < i1; i += 16) {
      const int rows = static_cast<int>(std::min<int64_t>(16, i1 - i));
      const __mmask16 mask = cpu::lane_mask(rows);
      for (int64_t j = 0; j < n_pad; j += 16) {
        alignas(64) float block[16][16][16];  // [ξ][column j + q][row i + lane]
        for (int q = 0; q < 16; ++q) {
          Lanes16 g[3][3], t[4][4];
          const float* base = w + i + (j + q) * s_col;
          for (int a = 0; a < 3; ++a) {
            for (int b = 0; b < 3; ++b) {
              g[a][b] =
                  Lanes16::of(j + q < n ? _mm512_maskz_loadu_ps(mask, base + a * s_a + b * s_b) : _mm512_setzero_ps());
            }
          }
          winograd::filter_tile(g, t);
          for (int xi = 0; xi < 16; ++xi) _mm512_store_ps(block[xi][q], t[xi / 4][xi % 4].v);
        }
        for (int xi = 0; xi < 16; ++xi) {
          __m512 r[16];
          for (int q = 0; q < 16; ++q) r[q] = _mm512_load_ps(block[xi][q]);
          cpu::transpose16(r);  // r[m]: row i + m's 16 columns
          for (int m = 0; m < rows; ++m) _mm512_storeu_ps(out_at(i + m, j) + xi * plane, r[m]);
        }
      }
    }
    return;
  }
  const bool runs = (s_b == 1 || s_b == -1) && s_a == 3 * s_b;
  const __m512i lanes = lane_offsets(s_col);
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j = 0; j < n_pad; j += 16) {
      float* out = out_at(i, j);
      if (j >= n) {
        for (int xi = 0; xi < 16; ++xi) _mm512_storeu_ps(out + xi * plane, _mm512_setzero_ps());
        continue;
      }
      Lanes16 g[3][3], t[4][4];
      const float* base = w + i * s_row + j * s_col;
      if (runs) {
        __m512 r[16];
        const float* lowest = s_b > 0 ? base : base - 8;  // the run's first tap in memory
        for (int q = 0; q < 16; ++q) r[q] = _mm512_maskz_loadu_ps(0x1ff, lowest + q * s_col);
        cpu::transpose16(r);  // r[m]: the 16 filters' tap at memory position m of their runs
        for (int k = 0; k < 9; ++k) g[k / 3][k % 3] = Lanes16::of(r[s_b > 0 ? k : 8 - k]);
      } else {  // columns together (channels_last filters, turned for d_x) or apart
        for (int a = 0; a < 3; ++a) {
          for (int b = 0; b < 3; ++b) {
            const float* tap = base + a * s_a + b * s_b;
            g[a][b] = Lanes16::of(s_col == 1 ? _mm512_loadu_ps(tap) : _mm512_i32gather_ps(lanes, tap, 4));
          }
        }
      }
      winograd::filter_tile(g, t);
      for (int xi = 0; xi < 16; ++xi) _mm512_storeu_ps(out + xi * plane, t[xi / 4][xi % 4].v);
    }
  }
}
#pragma GCC diagnostic pop

// V[ξ][t - t0][c] = (Bᵀ d B)[ξ] for tiles [t0, t1) of the padded NHWC sample x_pad (hp × wp × c), into v
// with a row of c per tile and a plane of `pitch` rows per ξ.
CS231N_AVX512 inline void winograd_inputs(const float* x_pad, const WinogradTiles& tiles, int64_t c, int64_t t0,
                                          int64_t t1, float* v, int64_t pitch) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* origin = x_pad + (t / tiles.tw * 2 * tiles.wp + t % tiles.tw * 2) * c;
    float* row = v + (t - t0) * c;
    for (int64_t k = 0; k < c; k += 16) {
      Lanes16 d[4][4], tv[4][4];
      for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) d[a][b] = Lanes16::of(_mm512_loadu_ps(origin + (a * tiles.wp + b) * c + k));
      }
      winograd::input_tile(d, tv);
      for (int xi = 0; xi < 16; ++xi) _mm512_storeu_ps(row + xi * pitch * c + k, tv[xi / 4][xi % 4].v);
    }
  }
}

// The outputs of tiles [t0, t1) for f filters from M[ξ][t - t0][f] (a row of ldm per tile, `pitch` rows
// per ξ): Aᵀ M A, plus b, into the NHWC output `out` (oH × oW pixels, ldo apart), only the pixels inside it.
CS231N_AVX512 inline void winograd_outputs(const float* m, int64_t ldm, int64_t pitch, const WinogradTiles& tiles,
                                           const Conv2dGeometry& g, int64_t f, int64_t ldo, int64_t t0, int64_t t1,
                                           const float* b, float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t o_h = t / tiles.tw * 2, o_w = t % tiles.tw * 2;
    const int rows = o_h + 1 < g.oh ? 2 : 1, cols = o_w + 1 < g.ow ? 2 : 1;
    const float* row = m + (t - t0) * ldm;
    float* corner = out + (o_h * g.ow + o_w) * ldo;
    for (int64_t k = 0; k < f; k += 16) {
      Lanes16 mt[4][4], y[2][2];
      for (int xi = 0; xi < 16; ++xi) mt[xi / 4][xi % 4] = Lanes16::of(_mm512_loadu_ps(row + xi * pitch * ldm + k));
      winograd::output_tile(mt, y);
      const __m512 bias = b ? _mm512_loadu_ps(b + k) : _mm512_setzero_ps();
      for (int a = 0; a < rows; ++a) {
        for (int c = 0; c < cols; ++c) _mm512_storeu_ps(corner + (a * g.ow + c) * ldo + k, y[a][c].v + bias);
      }
    }
  }
}

// Z[ξ][t - t0][f] = (A dy Aᵀ)[ξ] for tiles [t0, t1), from dy_pad: the NHWC output gradient, f channels,
// wq pixels a row, zeros past the output (so that every tile's 2×2 block lies inside it).
CS231N_AVX512 inline void winograd_grad_outputs(const float* dy_pad, int64_t wq, const WinogradTiles& tiles, int64_t f,
                                                int64_t t0, int64_t t1, float* z, int64_t pitch) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* origin = dy_pad + (t / tiles.tw * 2 * wq + t % tiles.tw * 2) * f;
    float* row = z + (t - t0) * f;
    for (int64_t k = 0; k < f; k += 16) {
      Lanes16 dy[2][2], tz[4][4];
      for (int a = 0; a < 2; ++a) {
        for (int b = 0; b < 2; ++b) dy[a][b] = Lanes16::of(_mm512_loadu_ps(origin + (a * wq + b) * f + k));
      }
      winograd::grad_output_tile(dy, tz);
      for (int xi = 0; xi < 16; ++xi) _mm512_storeu_ps(row + xi * pitch * f + k, tz[xi / 4][xi % 4].v);
    }
  }
}

// d_W[f, c] = Gᵀ ∂U[f, c] G for filters [f0, f1), from ∂U[ξ][f][c] (c channels, F·C a ξ), 16 channels at a
// time, into dw through its strides (tap (a, b) of filter f, channel c at dw + f·s0 + c·s1 + a·s2 + b·s3).
CS231N_AVX512 inline void winograd_filter_grads(const float* du, int64_t f_count, int64_t c, int64_t f0, int64_t f1,
                                                float* dw, int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
  const __m512i lanes = lane_offsets(s1);
  for (int64_t f = f0; f < f1; ++f) {
    for (int64_t k = 0; k < c; k += 16) {
      Lanes16 u[4][4], g[3][3];
      for (int xi = 0; xi < 16; ++xi) {
        u[xi / 4][xi % 4] = Lanes16::of(_mm512_loadu_ps(du + (xi * f_count + f) * c + k));
      }
      winograd::grad_filter_tile(u, g);
      float* out = dw + f * s0 + k * s1;
      for (int a = 0; a < 3; ++a) {
        for (int b = 0; b < 3; ++b) _mm512_i32scatter_ps(out + a * s2 + b * s3, lanes, g[a][b].v, 4);
      }
    }
  }
}
#endif  // CS231N_X86

// Rows [r0, r1) of x_pad (tiles.hp × tiles.wp × C: the sample x with pH rows and pW columns of zeros
// before it, zeros after) from a sample x, NHWC or (planes) NCHW, into x_rows (row r0 first).
inline void winograd_pad(const float* x, const Conv2dGeometry& g, const WinogradTiles& tiles, bool planes, int64_t r0,
                         int64_t r1, float* x_rows) {
  const int64_t row = tiles.wp * g.c;
  for (int64_t r = r0; r < r1; ++r) {
    float* dst = x_rows + (r - r0) * row;
    const int64_t i = r - g.ph;  // the input row
    if (i < 0 || i >= g.h) {
      std::fill(dst, dst + row, 0.0f);
      continue;
    }
    std::fill(dst, dst + g.pw * g.c, 0.0f);
    if (planes) {  // the [C x W] slice x[:, i, :], transposed
      cpu::transpose_matrix(x + i * g.w, g.h * g.w, g.c, g.w, dst + g.pw * g.c, g.c);
    } else {
      std::copy(x + i * g.w * g.c, x + (i + 1) * g.w * g.c, dst + g.pw * g.c);
    }
    std::fill(dst + (g.pw + g.w) * g.c, dst + row, 0.0f);
  }
}

// The calling thread's buffer for U of kc rows and n columns (winograd_filters' packed form), and its
// plane: each U[ξ] 64-byte aligned, as the packed slivers' rows are read, and the planes a quarter of a
// page past a whole number of pages, so that one row's 16 stores (one to each plane) fall in different
// cache sets (at batch 1 of 256 channels on 14 × 14, those stores took longer than the 16 GEMMs).
struct WinogradU {
  float* u;
  int64_t plane;
};
inline WinogradU winograd_u_buffer(int64_t kc, int64_t n) {
  const int64_t plane = (kc * ((n + 63) / 64 * 64) + 1023) / 1024 * 1024 + 256;
  float* scratch = cpu::thread_scratch<float>(cpu::Scratch::kFilters, 16 * plane + 16);
  return {scratch + (64 - reinterpret_cast<uintptr_t>(scratch) % 64) % 64 / sizeof(float), plane};
}

// W for winograd_filters: row i of B an input channel of the convolution that runs, column j a filter,
// from w or (`transposed`, d_x) from w turned by 180° with its channels and filters trading places.
struct WinogradFilterView {
  at::Tensor kept;  // w, or its copy
  const float* w;
  int64_t s_row, s_col, s_a, s_b;
};
inline WinogradFilterView winograd_filter_view(const at::Tensor& w, bool transposed) {
  // the gathers' lane offsets (15 columns apart) are int32: a view with larger strides is copied
  const bool narrow = 15 * std::max(w.stride(0), w.stride(1)) <= std::numeric_limits<int32_t>::max();
  at::Tensor wc = narrow ? w : w.contiguous();
  const int64_t s0 = wc.stride(0), s1 = wc.stride(1), s2 = wc.stride(2), s3 = wc.stride(3);
  const float* w0 = wc.const_data_ptr<float>();
  if (transposed) return {wc, w0 + 2 * s2 + 2 * s3, s0, s1, -s2, -s3};  // row f of the layer, column c
  return {wc, w0, s1, s0, s2, s3};
}

// With fewer samples than threads and U past L2, the tile blocks among the threads each read all of U
// (256 channels on 14 × 14 at batch 1: two blocks of 25 tiles, each reading 4 MiB; 0.93 ms against
// oneDNN's 0.83). The filters go among them instead, by slivers of 64: an item transforms its sliver's
// U (C × 64 a ξ, in L2) and runs all the sample's tiles against it, V made once and shared. Where V
// itself leaves L2 (large images) it would be read once a sliver: those keep the blocks.
constexpr int64_t kWinogradSliver = 64;
inline bool winograd_by_slivers(const Conv2dGeometry& g) {
  return g.n < at::get_num_threads() && 64 * g.c * g.f > (int64_t(1) << 20) && g.f > kWinogradSliver &&
         winograd_tiles(g).count() * g.c <= (int64_t(1) << 15);
}

#if CS231N_X86
inline void winograd_forward_by_slivers(const float* x, const WinogradFilterView& fv, const float* b, float* y,
                                        const Conv2dGeometry& g, bool planes) {
  const WinogradTiles tiles = winograd_tiles(g);
  const int64_t count = tiles.count(), slivers = (g.f + kWinogradSliver - 1) / kWinogradSliver;
  const int64_t parts = std::max<int64_t>(1, at::get_num_threads() / slivers);  // tile ranges a sliver
  const int64_t in_sample = g.h * g.w * g.c, out_sample = g.oh * g.ow * g.f;
  std::vector<int64_t> a_rows(count);
  for (int64_t i = 0; i < count; ++i) a_rows[i] = i * g.c;
  float* x_pad = cpu::thread_scratch<float>(cpu::Scratch::kPadded, tiles.hp * tiles.wp * g.c);
  float* v = cpu::thread_scratch<float>(cpu::Scratch::kRows, 16 * count * g.c);  // all the tiles' V
  float* out = planes ? cpu::thread_scratch<float>(cpu::Scratch::kOut, out_sample) : nullptr;
  for (int64_t n = 0; n < g.n; ++n) {
    winograd_pad(x + n * in_sample, g, tiles, planes, 0, tiles.hp, x_pad);
    at::parallel_for(0, count, 8,
                     [&](int64_t t0, int64_t t1) { winograd_inputs(x_pad, tiles, g.c, t0, t1, v + t0 * g.c, count); });
    float* y_n = planes ? out : y + n * out_sample;  // NHWC
    at::parallel_for(0, slivers * parts, 1, [&](int64_t i0, int64_t i1) {
      const WinogradU sliver = winograd_u_buffer(g.c, kWinogradSliver);  // this item's sliver of U
      float* const u = sliver.u;
      const int64_t plane = sliver.plane;
      float* m = cpu::thread_scratch<float>(cpu::Scratch::kGrad, 16 * count * kWinogradSliver);
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t s = item / parts, part = item % parts, j0 = s * kWinogradSliver;
        const int64_t nf = std::min<int64_t>(kWinogradSliver, g.f - j0);
        if (item == i0 || part == 0) {  // this sliver's U, unless the item before made it
          winograd_filters(fv.w + j0 * fv.s_col, fv.s_row, fv.s_col, fv.s_a, fv.s_b, g.c, nf, 0, g.c, u, plane);
        }
        const int64_t t0 = chunk_begin(part, parts, count), t1 = chunk_begin(part + 1, parts, count);
        for (int xi = 0; xi < 16; ++xi) {
          const cpu::SegmentsB<float> filters{cpu::SegmentedView<float>{nullptr, 0, 0, 0}, 1, g.c, nf, u + xi * plane};
          const float* a = v + (xi * count + t0) * g.c;
          cpu::gemm_segments<float>(t1 - t0, &a, g.c, filters, m + xi * count * kWinogradSliver, kWinogradSliver, {},
                                    a_rows.data());
        }
        winograd_outputs(m, kWinogradSliver, count, tiles, g, nf, g.f, t0, t1, b ? b + j0 : nullptr, y_n + j0);
      }
    });
    if (planes) cpu::transpose_matrix(out, g.f, g.oh * g.ow, g.f, y + n * out_sample, g.oh * g.ow);
  }
}
#endif  // CS231N_X86

// y = conv(x, W) + b by Winograd, with W the filters of w or, when `transposed`, those of its transposed
// convolution (d_x: g is then that convolution, W[f, c] turned by 180° with f and c trading places); x and
// y NHWC, or NCHW when `planes`. winograd_forward_applies(g) must hold.
inline void winograd_forward(const float* x, const at::Tensor& w, bool transposed, const float* b, float* y,
                             const Conv2dGeometry& g, bool planes) {
#if CS231N_X86
  const WinogradFilterView fv = winograd_filter_view(w, transposed);
  if (winograd_by_slivers(g)) return winograd_forward_by_slivers(x, fv, b, y, g, planes);
  const WinogradTiles tiles = winograd_tiles(g);
  const WinogradU buffer = winograd_u_buffer(g.c, g.f);  // the filters, transformed once
  float* const u = buffer.u;
  const int64_t plane = buffer.plane;
  at::parallel_for(0, g.c, 16, [&](int64_t i0, int64_t i1) {
    winograd_filters(fv.w, fv.s_row, fv.s_col, fv.s_a, fv.s_b, g.c, g.f, i0, i1, u, plane);
  });
  std::vector<cpu::SegmentsB<float>> filters;
  for (int xi = 0; xi < 16; ++xi) {
    filters.push_back({cpu::SegmentedView<float>{nullptr, 0, 0, 0}, 1, g.c, g.f, u + xi * plane});
  }
  const WinogradForwardPlan plan = winograd_forward_plan(g);
  const int64_t block = plan.block;
  std::vector<int64_t> a_rows(block);
  for (int64_t i = 0; i < block; ++i) a_rows[i] = i * g.c;
  // Each sample in bands of tile rows, a band about two blocks of tiles (a whole small image): a band's
  // input rows, padded (transposed from NCHW), its V and M, and (NCHW) its outputs before they are
  // transposed into y stay in L2, where a whole 56 × 56 sample's did not. Small images go in groups of
  // plan.samples whole samples instead, their tiles one block. The bands (or groups) of all samples go
  // among the threads; with fewer samples than threads (batch 1) a sample is one band, whose blocks go
  // among them (bands of whole tile rows would split 14 × 14's 7 unevenly).
  const int64_t threads = at::get_num_threads(), in_sample = g.h * g.w * g.c, out_sample = g.oh * g.ow * g.f;
  const bool by_bands = g.n >= threads;
  const int64_t band =
      by_bands && plan.groups == 0 ? std::clamp<int64_t>((2 * block + tiles.tw - 1) / tiles.tw, 1, tiles.th) : tiles.th;
  const int64_t bands = (tiles.th + band - 1) / band;
  // Tile rows [r0, r1) of samples [n0, n1), their tiles one after the other, from their padded rows in
  // x_rows (one after the other), through out_rows when NCHW.
  const auto run_band = [&](int64_t n0, int64_t n1, int64_t r0, int64_t r1, float* x_rows, float* out_rows) {
    const int64_t rows_size = (2 * (r1 - r0) + 2) * tiles.wp * g.c;
    for (int64_t n = n0; n < n1; ++n) {
      winograd_pad(x + n * in_sample, g, tiles, planes, 2 * r0, 2 * r1 + 2, x_rows + (n - n0) * rows_size);
    }
    Conv2dGeometry gb = g;  // the band as an image of its own, its first output row 2·r0
    gb.oh = std::min(2 * (r1 - r0), g.oh - 2 * r0);
    const WinogradTiles tb{r1 - r0, tiles.tw, 2 * (r1 - r0) + 2, tiles.wp};
    const int64_t per_sample = tb.count(), count = (n1 - n0) * per_sample, band_out = gb.oh * g.ow * g.f;
    const auto y_rows = [&](int64_t n) {
      return planes ? out_rows + (n - n0) * band_out : y + n * out_sample + 2 * r0 * g.ow * g.f;
    };
    int64_t blocks = (count + block - 1) / block;
    if (!by_bands) blocks = (blocks + threads - 1) / threads * threads;
    at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {  // inside a band's item: on this thread
      float* v = cpu::thread_scratch<float>(cpu::Scratch::kRows, 16 * block * g.c);
      float* m = cpu::thread_scratch<float>(cpu::Scratch::kGrad, 16 * block * g.f);
      for (int64_t k = k0; k < k1; ++k) {  // even blocks of at most `block` tiles
        const int64_t t0 = k * count / blocks, t1 = (k + 1) * count / blocks;
        if (t1 <= t0) continue;
        // the block's tiles, by sample: tiles [s0, s1) of sample n are its rows s0 + n_first - t0 ..
        const auto by_sample = [&](auto&& fn) {
          for (int64_t n = n0 + t0 / per_sample; n < n1 && (n - n0) * per_sample < t1; ++n) {
            const int64_t first = (n - n0) * per_sample;
            const int64_t s0 = std::max(t0, first) - first, s1 = std::min(t1, first + per_sample) - first;
            fn(n, s0, s1, first + s0 - t0);
          }
        };
        by_sample([&](int64_t n, int64_t s0, int64_t s1, int64_t row) {
          winograd_inputs(x_rows + (n - n0) * rows_size, tb, g.c, s0, s1, v + row * g.c, block);
        });
        for (int xi = 0; xi < 16; ++xi) {
          const float* a = v + xi * block * g.c;
          cpu::gemm_segments<float>(t1 - t0, &a, g.c, filters[xi], m + xi * block * g.f, g.f, {}, a_rows.data());
        }
        by_sample([&](int64_t n, int64_t s0, int64_t s1, int64_t row) {
          winograd_outputs(m + row * g.f, g.f, block, tb, gb, g.f, g.f, s0, s1, b, y_rows(n));
        });
      }
    });
    // -> y[n][F][rows]: the band's pixels are a run of each filter's plane
    if (planes) {
      for (int64_t n = n0; n < n1; ++n) {
        cpu::transpose_matrix(y_rows(n), g.f, gb.oh * g.ow, g.f, y + n * out_sample + 2 * r0 * g.ow, g.oh * g.ow);
      }
    }
  };
  const auto input_rows = [&] {  // the calling thread's buffers for a band
    return cpu::thread_scratch<float>(cpu::Scratch::kPadded, plan.samples * (2 * band + 2) * tiles.wp * g.c);
  };
  const auto output_rows = [&] {
    return planes ? cpu::thread_scratch<float>(cpu::Scratch::kOut, plan.samples * 2 * band * g.ow * g.f) : nullptr;
  };
  if (plan.groups > 0) {
    at::parallel_for(0, plan.groups, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t k = i0; k < i1; ++k) {
        run_band(chunk_begin(k, plan.groups, g.n), chunk_begin(k + 1, plan.groups, g.n), 0, tiles.th, input_rows(),
                 output_rows());
      }
    });
  } else if (by_bands) {
    at::parallel_for(0, g.n * bands, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t r0 = item % bands * band;
        run_band(item / bands, item / bands + 1, r0, std::min(tiles.th, r0 + band), input_rows(), output_rows());
      }
    });
  } else {
    for (int64_t n = 0; n < g.n; ++n) run_band(n, n + 1, 0, tiles.th, input_rows(), output_rows());
  }
#else
  (void)x, (void)w, (void)transposed, (void)b, (void)y, (void)g, (void)planes;
  TORCH_CHECK(false, "conv2d: Winograd's route needs an x86 CPU");
#endif
}

// d_W by Winograd (winograd_weight_grad_applies(g), g the layer): Y is linear in U = G g Gᵀ, so
//     ∂U[ξ][f][c] = Σ_t Z[ξ][t][f] · V[ξ][t][c]       Z_t,f = A dY_t,f Aᵀ (tile t's 2×2 block of dY)
//     d_W[f, c]   = Gᵀ ∂U[·][f][c] G
// the sum 16 GEMMs of (F × tiles)·(tiles × C), Z read in place through a table of its rows (gemm_gather_a)
// and V as it lies. Work among the threads, one part each: where each thread gets at least
// kWinogradTilesPerPart tiles, the batch's tiles (in sample order) in even ranges, each summed into a ∂U of
// its own, those added in part order (deterministic for a given thread count); a range in bands of tile
// rows, as the forward's; with fewer (batch 1 of 28 × 28: 196 tiles, where each thread's ∂U of 16·F·C
// would be read and written for a few tiles), all the tiles by every thread, each summing its own ξ of
// the one ∂U. A block of tiles may span samples (small images). dy and x NHWC, or NCHW when `planes`;
// dw of any strides.
constexpr int64_t kWinogradTilesPerPart = 128;
constexpr int64_t kWinogradGradBlock = 96;  // tiles a block: each block reads and writes ∂U once

inline void winograd_weight_grad(const float* dy, const float* x, at::Tensor& dw, const Conv2dGeometry& g,
                                 bool planes) {
#if CS231N_X86
  const WinogradTiles tiles = winograd_tiles(g);
  // dY padded with zeros to whole 2×2 blocks: the geometry of a "layer" of dY's size, padding 0
  Conv2dGeometry gy = g;
  gy.c = g.f, gy.h = g.oh, gy.w = g.ow, gy.ph = 0, gy.pw = 0;
  const WinogradTiles dy_tiles{tiles.th, tiles.tw, 2 * tiles.th, 2 * tiles.tw};
  const int64_t total = g.n * tiles.count(), du_size = 16 * g.f * g.c, threads = at::get_num_threads();
  const bool by_tiles = total >= threads * kWinogradTilesPerPart;
  const int64_t tile_parts = by_tiles ? threads : 1, xi_parts = by_tiles ? 1 : std::min<int64_t>(threads, 16);
  const int64_t block = kWinogradGradBlock, band = std::max<int64_t>(1, block / tiles.tw);
  const int64_t in_sample = g.h * g.w * g.c, out_sample = g.oh * g.ow * g.f;
  ChunkPartials<float> partials(tile_parts, du_size);
  std::vector<int64_t> a_col(block);
  for (int64_t p = 0; p < block; ++p) a_col[p] = p * g.f;
  at::parallel_for(0, tile_parts * xi_parts, 1, [&](int64_t p0, int64_t p1) {
    float* x_pad = cpu::thread_scratch<float>(cpu::Scratch::kPadded, (2 * band + 2) * tiles.wp * g.c);
    float* dy_pad = cpu::thread_scratch<float>(cpu::Scratch::kOut, 2 * band * dy_tiles.wp * g.f);
    float* v = cpu::thread_scratch<float>(cpu::Scratch::kRows, 16 * block * g.c);
    float* z = cpu::thread_scratch<float>(cpu::Scratch::kGrad, 16 * block * g.f);
    std::vector<const float*> a_row(g.f);
    for (int64_t part = p0; part < p1; ++part) {
      const int64_t tp = part / xi_parts, xp = part % xi_parts;
      const int xi0 = static_cast<int>(chunk_begin(xp, xi_parts, 16)),
                xi1 = static_cast<int>(chunk_begin(xp + 1, xi_parts, 16));
      float* du = partials.of(tp);
      bool first = true;
      int64_t filled = 0;  // tiles in the block, from one sample or several (small images)
      const auto flush = [&] {
        for (int xi = xi0; xi < xi1 && filled > 0; ++xi) {
          for (int64_t f = 0; f < g.f; ++f) a_row[f] = z + xi * block * g.f + f;
          cpu::GemmEpilogue<float> ep;
          ep.accumulate = !first;
          cpu::gemm_gather_a(g.f, g.c, filled, a_row.data(), a_col.data(), v + xi * block * g.c, g.c,
                             du + xi * g.f * g.c, g.c, ep);
        }
        first = first && filled == 0;
        filled = 0;
      };
      const int64_t r0 = chunk_begin(tp, tile_parts, total), r1 = chunk_begin(tp + 1, tile_parts, total);
      for (int64_t n = r0 / tiles.count(); n * tiles.count() < r1; ++n) {
        const int64_t s0 = std::max(r0 - n * tiles.count(), int64_t(0)),
                      s1 = std::min(r1 - n * tiles.count(), tiles.count());
        // the range in bands of tile rows, each band's x and dY rows padded (transposed) in L2
        for (int64_t q0 = s0 / tiles.tw; q0 * tiles.tw < s1; q0 += band) {
          const int64_t q1 = std::min(tiles.th, q0 + band), base = q0 * tiles.tw, end = std::min(s1, q1 * tiles.tw);
          winograd_pad(x + n * in_sample, g, tiles, planes, 2 * q0, 2 * q1 + 2, x_pad);
          winograd_pad(dy + n * out_sample, gy, dy_tiles, planes, 2 * q0, 2 * q1, dy_pad);
          for (int64_t t0 = std::max(s0, base); t0 < end;) {
            const int64_t t1 = std::min(end, t0 + block - filled);
            winograd_inputs(x_pad, tiles, g.c, t0 - base, t1 - base, v + filled * g.c, block);
            winograd_grad_outputs(dy_pad, dy_tiles.wp, tiles, g.f, t0 - base, t1 - base, z + filled * g.f, block);
            filled += t1 - t0;
            t0 = t1;
            if (filled == block) flush();
          }
        }
      }
      flush();
      if (first) std::fill(du + xi0 * g.f * g.c, du + xi1 * g.f * g.c, 0.0f);  // a range without tiles
    }
  });
  partials.sum_into(tile_parts, partials.of(0));
  float* out = dw.mutable_data_ptr<float>();
  at::parallel_for(0, g.f, 4, [&](int64_t f0, int64_t f1) {
    winograd_filter_grads(partials.of(0), g.f, g.c, f0, f1, out, dw.stride(0), dw.stride(1), dw.stride(2),
                          dw.stride(3));
  });
#else
  (void)dy, (void)x, (void)dw, (void)g, (void)planes;
  TORCH_CHECK(false, "conv2d: Winograd's route needs an x86 CPU");
#endif
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
