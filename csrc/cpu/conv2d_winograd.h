// The CPU convolution by Winograd's F(2×2, 3×3): float32 3×3 layers of stride 1 on AVX-512, their forward
// and d_x (the transposed convolution, the same form). Part of the CPU convolution (cpu/conv2d.cpp, which
// routes each layer; docs/conv2d.md has the table and the derivation; the transforms are common/winograd.h's,
// which the CUDA kernels share).
//
// A direct 3×3 layer does 9·C·F multiply-adds an output pixel; by 2×2 blocks of outputs, each from a 4×4
// tile of the input, it is 16·C·F a block, 4 a pixel: 2.25 times fewer. Per sample, tiles in blocks of a
// few dozen, so that a block's transformed values stay in L2:
//     V[ξ][t][c] = (Bᵀ d_t,c B)[ξ]              d_t,c: tile t's 4×4 window of channel c (zeros outside)
//     M[ξ]       = V[ξ] · U[ξ]                  16 GEMMs, (tiles × C)·(C × F): gemm_segments, A in place
//     y_t,f      = Aᵀ M[·][t][f] A + b[f]       the block's 2×2 outputs (those inside the image)
// with U[ξ][c][f] = (G g_f,c Gᵀ)[ξ] computed once a call, straight into the GEMM's packed slivers. The
// transforms run on 16 channels (or filters) at a time, the pixels' channels being contiguous in NHWC; an
// NCHW sample is transposed in cache on the way in and out, as conv_forward_nhwc does.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/conv2d.h"
#include "common/winograd.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"

#if CS231N_X86
#include <immintrin.h>
#endif

namespace torch_cs231n {
namespace conv2d_cpu {

// Whether the convolution that runs (a layer, or its transposed convolution for d_x) goes by Winograd:
// float32 on AVX-512, 3×3, stride and dilation 1, one group, channels and filters whole vectors and at
// least kWinogradMinChannels (fewer leave the 16 GEMMs too short to pay for the transforms), and outputs
// of at least 4×4. TORCH_CS231N_CPU_CONV=direct gives these layers back to the direct kernels.
constexpr int64_t kWinogradMinChannels = 32;

inline bool winograd_wanted() {
  const char* env = std::getenv("TORCH_CS231N_CPU_CONV");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "winograd") == 0) return true;
  TORCH_CHECK(std::strcmp(env, "direct") == 0,
              "TORCH_CS231N_CPU_CONV: expected 'winograd' or 'direct' (or unset: the default), but got '", env, "'");
  return false;
}

inline bool winograd_applies(const Conv2dGeometry& g) {
  return cpu::cpu_isa() == cpu::Isa::kAvx512 && g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && g.dh == 1 &&
         g.dw == 1 && g.groups == 1 && g.c % 16 == 0 && g.f % 16 == 0 && g.c >= kWinogradMinChannels &&
         g.f >= kWinogradMinChannels && g.oh >= 4 && g.ow >= 4 && winograd_wanted();
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

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on _mm512_i32gather_ps, as pack_bf16_tap_runs
// U[ξ] = (G g Gᵀ)[ξ] for rows [i0, i1) of the GEMM's B (kc × n), in gemm_segments' packed form: U[ξ] at
// u + ξ·kc·np (np: n rounded up to slivers of 64), sliver s at + s·kc·64, row i at + i·64. The filter at
// (row i, column j) has its tap (a, b) at w + i·s_row + j·s_col + a·s_a + b·s_b; 16 columns are gathered
// at a time. Columns past n are zeros.
CS231N_AVX512 inline void winograd_filters(const float* w, int64_t s_row, int64_t s_col, int64_t s_a, int64_t s_b,
                                           int64_t kc, int64_t n, int64_t i0, int64_t i1, float* u) {
  const int64_t np = (n + 63) / 64 * 64;
  const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(s_col)));
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j = 0; j < np; j += 16) {
      float* out = u + j / 64 * kc * 64 + i * 64 + j % 64;
      if (j >= n) {
        for (int xi = 0; xi < 16; ++xi) _mm512_storeu_ps(out + xi * kc * np, _mm512_setzero_ps());
        continue;
      }
      Lanes16 g[3][3], t[4][4];
      const float* base = w + i * s_row + j * s_col;
      for (int a = 0; a < 3; ++a) {
        for (int b = 0; b < 3; ++b) g[a][b] = Lanes16::of(_mm512_i32gather_ps(lanes, base + a * s_a + b * s_b, 4));
      }
      winograd::filter_tile(g, t);
      for (int xi = 0; xi < 16; ++xi) _mm512_storeu_ps(out + xi * kc * np, t[xi / 4][xi % 4].v);
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

// The outputs of tiles [t0, t1) from M[ξ][t - t0][f] (a row of f per tile, `pitch` rows per ξ): Aᵀ M A,
// plus b, into the NHWC output `out` (oH × oW × f), only the pixels inside it.
CS231N_AVX512 inline void winograd_outputs(const float* m, int64_t pitch, const WinogradTiles& tiles,
                                           const Conv2dGeometry& g, int64_t f, int64_t t0, int64_t t1, const float* b,
                                           float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t o_h = t / tiles.tw * 2, o_w = t % tiles.tw * 2;
    const int rows = o_h + 1 < g.oh ? 2 : 1, cols = o_w + 1 < g.ow ? 2 : 1;
    const float* row = m + (t - t0) * f;
    float* corner = out + (o_h * g.ow + o_w) * f;
    for (int64_t k = 0; k < f; k += 16) {
      Lanes16 mt[4][4], y[2][2];
      for (int xi = 0; xi < 16; ++xi) mt[xi / 4][xi % 4] = Lanes16::of(_mm512_loadu_ps(row + xi * pitch * f + k));
      winograd::output_tile(mt, y);
      const __m512 bias = b ? _mm512_loadu_ps(b + k) : _mm512_setzero_ps();
      for (int a = 0; a < rows; ++a) {
        for (int c = 0; c < cols; ++c) _mm512_storeu_ps(corner + (a * g.ow + c) * f + k, y[a][c].v + bias);
      }
    }
  }
}
#endif  // CS231N_X86

// x_pad (tiles.hp × tiles.wp × C, zeros around) from a sample x, NHWC or (planes) NCHW.
inline void winograd_pad(const float* x, const Conv2dGeometry& g, const WinogradTiles& tiles, bool planes,
                         float* x_pad) {
  const int64_t row = tiles.wp * g.c;
  std::fill(x_pad, x_pad + g.ph * row, 0.0f);
  for (int64_t i = 0; i < g.h; ++i) {
    float* dst = x_pad + (g.ph + i) * row;
    std::fill(dst, dst + g.pw * g.c, 0.0f);
    if (planes) {  // input row i: the [C x W] slice x[:, i, :], transposed
      cpu::transpose_matrix(x + i * g.w, g.h * g.w, g.c, g.w, dst + g.pw * g.c, g.c);
    } else {
      std::copy(x + i * g.w * g.c, x + (i + 1) * g.w * g.c, dst + g.pw * g.c);
    }
    std::fill(dst + (g.pw + g.w) * g.c, dst + row, 0.0f);
  }
  std::fill(x_pad + (g.ph + g.h) * row, x_pad + tiles.hp * row, 0.0f);
}

// y = conv(x, W) + b by Winograd, with W the filters of w or, when `transposed`, those of its transposed
// convolution (d_x: g is then that convolution, W[f, c] turned by 180° with f and c trading places); x and
// y NHWC, or NCHW when `planes`. winograd_applies(g) must hold.
inline void winograd_forward(const float* x, const at::Tensor& w, bool transposed, const float* b, float* y,
                             const Conv2dGeometry& g, bool planes) {
#if CS231N_X86
  const WinogradTiles tiles = winograd_tiles(g);
  const int64_t np = (g.f + 63) / 64 * 64, u_size = g.c * np;
  // The filters, transformed once: row i of B is an input channel of the convolution that runs.
  float* u = cpu::thread_scratch<float>(cpu::Scratch::kFilters, 16 * u_size);
  {
    const int64_t s0 = w.stride(0), s1 = w.stride(1), s2 = w.stride(2), s3 = w.stride(3);
    const float* w0 = w.const_data_ptr<float>();
    at::parallel_for(0, g.c, 16, [&](int64_t i0, int64_t i1) {
      if (transposed) {  // row f of the layer, column c, taps turned by 180°
        winograd_filters(w0 + 2 * s2 + 2 * s3, s0, s1, -s2, -s3, g.c, g.f, i0, i1, u);
      } else {
        winograd_filters(w0, s1, s0, s2, s3, g.c, g.f, i0, i1, u);
      }
    });
  }
  std::vector<cpu::SegmentsB<float>> filters;
  for (int xi = 0; xi < 16; ++xi) {
    filters.push_back({cpu::SegmentedView<float>{nullptr, 0, 0, 0}, 1, g.c, g.f, u + xi * u_size});
  }
  // Tiles a block: its V and M (16 floats a channel and a filter each) about 512 KiB, in L2; a multiple of
  // 6, the GEMM tile's rows.
  const int64_t block = std::clamp<int64_t>(8192 / (g.c + g.f) / 6 * 6, 24, 96);
  std::vector<int64_t> a_rows(block);
  for (int64_t i = 0; i < block; ++i) a_rows[i] = i * g.c;
  const int64_t in_sample = g.h * g.w * g.c, out_sample = g.oh * g.ow * g.f;
  const int64_t chunks = chunk_count(g);
  for_chunks(chunks, [&](int64_t cb, int64_t ce) {
    float* x_pad = cpu::thread_scratch<float>(cpu::Scratch::kPadded, tiles.hp * tiles.wp * g.c);
    float* out_t = planes ? cpu::thread_scratch<float>(cpu::Scratch::kOut, out_sample) : nullptr;
    for (int64_t n = chunk_begin(cb, chunks, g.n); n < chunk_begin(ce, chunks, g.n); ++n) {
      winograd_pad(x + n * in_sample, g, tiles, planes, x_pad);
      float* out = planes ? out_t : y + n * out_sample;
      // The sample's tiles in blocks; with one chunk (a single sample) the blocks go among the threads,
      // as many a thread.
      int64_t items = (tiles.count() + block - 1) / block;
      if (chunks == 1) {
        const int64_t threads = at::get_num_threads();
        items = (items + threads - 1) / threads * threads;
      }
      at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
        float* v = cpu::thread_scratch<float>(cpu::Scratch::kRows, 16 * block * g.c);
        float* m = cpu::thread_scratch<float>(cpu::Scratch::kGrad, 16 * block * g.f);
        for (int64_t item = i0; item < i1; ++item) {
          const int64_t t0 = item * tiles.count() / items, t1 = (item + 1) * tiles.count() / items;
          if (t1 <= t0) continue;
          winograd_inputs(x_pad, tiles, g.c, t0, t1, v, block);
          for (int xi = 0; xi < 16; ++xi) {
            const float* a = v + xi * block * g.c;
            cpu::gemm_segments<float>(t1 - t0, &a, g.c, filters[xi], m + xi * block * g.f, g.f, {}, a_rows.data());
          }
          winograd_outputs(m, block, tiles, g, g.f, t0, t1, b, out);
        }
      });
      if (planes) cpu::transpose_matrix(out_t, g.f, g.oh * g.ow, g.f, y + n * out_sample, g.oh * g.ow);
    }
  });
#else
  (void)x, (void)w, (void)transposed, (void)b, (void)y, (void)g, (void)planes;
  TORCH_CHECK(false, "conv2d: Winograd's route needs an x86 CPU");
#endif
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
