// The GEMM's driver: cache blocking and packing around the micro-kernels of gemm_microkernel.h.
//
// Loops, outermost first (the BLIS order; docs/conv2d.md draws it):
//   jc: columns of C in blocks of NC            B block  kc x nc  packed once per (jc, pc)
//   pc: the k dimension in blocks of KC            (a few hundred KiB: read from L2 by the kernels)
//   ic: rows of C in blocks of MC               A block  mc x kc  packed once per (jc, pc, ic), in L2
//   jr: one packed NR-column sliver of B        kc x NR  stays in L1 while ...
//   ir: ... the A slivers (kc x MR) pass under it, one micro-kernel call each
// A k step of the kernel reads MR + NR floats for MR * NR multiply-adds; C is loaded and stored once
// per tile and KC, so a long k is cut into a few equal blocks rather than a full one and a stub.
//
// Memory: each thread owns two packing buffers, at most MC * KC and KC * NC elements (0.24 and 2.4 MiB
// in float32), whatever the sizes of the product.
#include "cpu/gemm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/gemm_microkernel.h"
#include "cpu/transpose16.h"

namespace torch_cs231n {
namespace cpu {
namespace {

// Block sizes, in elements, for every ISA (MR and NR of each kernel divide MC and NC).
// KC: a B sliver (KC x 48 floats, 48 KiB) is read from L1/L2 while the A slivers pass; measured best of
//     128..576 on Zen 5 (docs/conv2d.md).
// MC: the A block (240 x 256 floats, 240 KiB) stays in L2 (1 MiB).
// NC: bounds the B block (256 x 2400 floats, 2.4 MiB), which is read once per A block.
constexpr int64_t kKc = 256;
constexpr int64_t kMc = 240;
constexpr int64_t kNc = 2400;

// `total` cut into the fewest blocks of at most `block`, all of about equal size (a multiple of `unit`).
int64_t even_block(int64_t total, int64_t block, int64_t unit) {
  const int64_t count = (total + block - 1) / block;
  const int64_t size = (total + count - 1) / count;
  return (size + unit - 1) / unit * unit;
}

// A[i0 .. i0+mc, p0 .. p0+kc) into slivers of mr rows: sliver s holds, for each k, its mr values
// (rows past mc are zeros).
template <typename T>
void pack_a(const MatrixView<T>& a, int64_t i0, int64_t p0, int64_t mc, int64_t kc, int mr, T* dst) {
  for (int64_t s = 0; s < mc; s += mr) {
    const int rows = static_cast<int>(std::min<int64_t>(mr, mc - s));
    if (a.rows) {  // rows through the table, each read along k
      for (int r = 0; r < rows; ++r) {
        const T* src = a.row(i0 + s + r) + p0 * a.cs;
        for (int64_t p = 0; p < kc; ++p) dst[p * mr + r] = src[p * a.cs];
      }
      for (int64_t p = 0; p < kc; ++p) std::fill(dst + p * mr + rows, dst + (p + 1) * mr, T(0));
      dst += kc * mr;
      continue;
    }
    const T* base = a.data + (i0 + s) * a.rs + p0 * a.cs;
    for (int64_t p = 0; p < kc; ++p, dst += mr) {
      const T* src = base + p * a.cs;
      if (a.rs == 1) {  // A's rows are contiguous for a fixed k (a transposed operand)
        for (int r = 0; r < rows; ++r) dst[r] = src[r];
      } else {
        for (int r = 0; r < rows; ++r) dst[r] = src[r * a.rs];
      }
      for (int r = rows; r < mr; ++r) dst[r] = T(0);
    }
  }
}

// B[p0 .. p0+kc, j0 .. j0+nc) into slivers of nr columns: sliver s holds, for each k, its nr values
// (columns past nc are zeros).
template <typename T>
void pack_b(const MatrixView<T>& b, int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, T* dst) {
  for (int64_t s = 0; s < nc; s += nr, dst += kc * nr) {
    const int cols = static_cast<int>(std::min<int64_t>(nr, nc - s));
    const T* base = b.data + p0 * b.rs + (j0 + s) * b.cs;
    if (b.cs == 1) {  // rows of B are contiguous: copy runs
      for (int64_t p = 0; p < kc; ++p) {
        T* out = dst + p * nr;
        std::memcpy(out, base + p * b.rs, sizeof(T) * cols);
        std::fill(out + cols, out + nr, T(0));
      }
    } else {  // columns of B are (nearly) contiguous: read each column once, write it across the rows
      for (int j = 0; j < cols; ++j) {
        const T* src = base + j * b.cs;
        for (int64_t p = 0; p < kc; ++p) dst[p * nr + j] = src[p * b.rs];
      }
      for (int64_t p = 0; p < kc; ++p) std::fill(dst + p * nr + cols, dst + (p + 1) * nr, T(0));
    }
  }
}

// The epilogue of the tile at (i, j) in a block of k: the first block writes C with the epilogue's terms,
// the later ones add to it.
template <typename T>
TileEpilogue<T> tile_epilogue(const GemmEpilogue<T>& ep, bool first, int64_t i, int64_t j) {
  return {!first || ep.accumulate, first && ep.row_bias ? ep.row_bias + i : nullptr,
          first && ep.col_bias ? ep.col_bias + j : nullptr};
}

// The product of an empty k: C is only the epilogue's terms.
template <typename T>
void epilogue_only(int64_t m, int64_t n, T* c, int64_t ldc, const GemmEpilogue<T>& ep) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T v = ep.accumulate ? c[i * ldc + j] : T(0);
      if (ep.row_bias) v += ep.row_bias[i];
      if (ep.col_bias) v += ep.col_bias[j];
      c[i * ldc + j] = v;
    }
  }
}

// The blocked loops (top of the file), on the calling thread; pack_b_block(p0, j0, kc, nc, nr, dst)
// packs B as a PackB does.
template <typename T, typename PackBlock>
void gemm_blocked(int64_t m, int64_t n, int64_t k, const MatrixView<T>& a, const PackBlock& pack_b_block, T* c,
                  int64_t ldc, const GemmEpilogue<T>& ep) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    epilogue_only(m, n, c, ldc, ep);
    return;
  }
  const MicroKernelInfo<T> uk = microkernel_for<T>(cpu_isa());
  const int mr = uk.mr, nr = uk.nr;
  const int64_t kc_block = even_block(k, kKc, 1);
  const int64_t mc_block = even_block(m, kMc / mr * mr, mr);
  const int64_t nc_block = even_block(n, kNc / nr * nr, nr);
  // at most kMc*kKc and kKc*kNc elements, rounded up to whole slivers
  T* a_pack = thread_scratch<T>(Scratch::kPackA, mc_block * kc_block);
  T* b_pack = thread_scratch<T>(Scratch::kPackB, kc_block * nc_block);

  for (int64_t jc = 0; jc < n; jc += nc_block) {
    const int64_t nc = std::min(nc_block, n - jc);
    for (int64_t pc = 0; pc < k; pc += kc_block) {
      const int64_t kc = std::min(kc_block, k - pc);
      pack_b_block(pc, jc, kc, nc, nr, b_pack);
      const bool first = pc == 0;
      for (int64_t ic = 0; ic < m; ic += mc_block) {
        const int64_t mc = std::min(mc_block, m - ic);
        pack_a(a, ic, pc, mc, kc, mr, a_pack);
        for (int64_t jr = 0; jr < nc; jr += nr) {
          const int n_tile = static_cast<int>(std::min<int64_t>(nr, nc - jr));
          for (int64_t ir = 0; ir < mc; ir += mr) {
            const int m_tile = static_cast<int>(std::min<int64_t>(mr, mc - ir));
            const int64_t i = ic + ir, j = jc + jr;
            const TileEpilogue<T> tile = tile_epilogue(ep, first, i, j);
            uk.kernel(kc, a_pack + ir * kc, b_pack + jr * kc, c + i * ldc + j, ldc, m_tile, n_tile, tile);
          }
        }
      }
    }
  }
}

// Splits C among the threads along its longer side, in whole tiles, and runs gemm_blocked on each part
// (each thread packs its own panels). One thread inside a parallel region, or for a small product.
template <typename T, typename PackBlock>
void gemm_split(int64_t m, int64_t n, int64_t k, const MatrixView<T>& a, const PackBlock& pack_b_block, T* c,
                int64_t ldc, const GemmEpilogue<T>& ep) {
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const MicroKernelInfo<T> uk = microkernel_for<T>(cpu_isa());
  const bool by_columns = n / uk.nr >= m / uk.mr;
  const int64_t units = by_columns ? (n + uk.nr - 1) / uk.nr : (m + uk.mr - 1) / uk.mr;
  if (threads <= 1 || units < 2 || 2 * m * n * k < (int64_t(1) << 20)) {
    gemm_blocked(m, n, k, a, pack_b_block, c, ldc, ep);
    return;
  }
  const int64_t parts = std::min<int64_t>(threads, units);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t u0 = part * units / parts, u1 = (part + 1) * units / parts;
      GemmEpilogue<T> e = ep;
      if (by_columns) {  // columns [j0, j1): B's and C's columns shift, A stays
        const int64_t j0 = u0 * uk.nr, j1 = std::min(n, u1 * uk.nr);
        if (e.col_bias) e.col_bias += j0;
        auto pack = [&](int64_t p0, int64_t jb, int64_t kc, int64_t nc, int nr, T* dst) {
          pack_b_block(p0, j0 + jb, kc, nc, nr, dst);
        };
        gemm_blocked(m, j1 - j0, k, a, pack, c + j0, ldc, e);
      } else {  // rows [i0, i1): A's and C's rows shift, B stays
        const int64_t i0 = u0 * uk.mr, i1 = std::min(m, u1 * uk.mr);
        if (e.row_bias) e.row_bias += i0;
        const MatrixView<T> a_part =
            a.rows ? MatrixView<T>{a.data, a.rs, a.cs, a.rows + i0} : MatrixView<T>{a.data + i0 * a.rs, a.rs, a.cs};
        gemm_blocked(i1 - i0, n, k, a_part, pack_b_block, c + i0 * ldc, ldc, e);
      }
    }
  });
}

#if CS231N_X86
// GCC 12's unpack intrinsics take _mm512_undefined_ps() as their unused source, which -Wmaybe-uninitialized
// reports once they are inlined into the packing loops (GCC bug 105593); every register is set before use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// pack_transposed_rows for AVX-512 with nr a multiple of 16: blocks of 16 columns (runs) x 16 rows (p),
// loaded (masked past kc; missing runs read as zeros), transposed, stored into the sliver. Rows go in
// chunks of 256 (64 KiB of the sliver, which stays in L2 while its 16-column stripes are written one
// after the other): a stripe reads 16 runs, which the prefetchers follow; all of a row's nr columns at
// once would be nr streams, and a whole sliver's stripe (1.2 MiB at 4608 rows) left L2 between stripes.
CS231N_AVX512 void pack_transposed_rows_avx512(const float* const* rows, int64_t p0, int64_t kc, int64_t nc, int nr,
                                               float* dst) {
  constexpr int64_t kChunk = 256;
  const int64_t slivers = (nc + nr - 1) / nr;
  for (int64_t s = 0; s < slivers; ++s) {
    for (int64_t pc = 0; pc < kc; pc += kChunk) {
      for (int64_t jb = 0; jb < nr; jb += 16) {
        const int64_t j0 = s * nr + jb;
        for (int64_t pb = pc; pb < std::min(kc, pc + kChunk); pb += 16) {
          const int valid = static_cast<int>(std::min<int64_t>(16, kc - pb));
          const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
          __m512 r[16];
#pragma GCC unroll 16
          for (int i = 0; i < 16; ++i) {
            r[i] = j0 + i < nc ? _mm512_maskz_loadu_ps(mask, rows[j0 + i] + p0 + pb) : _mm512_setzero_ps();
          }
          transpose16(r);
          float* out = dst + s * kc * nr + pb * nr + jb;
          for (int i = 0; i < valid; ++i) _mm512_storeu_ps(out + i * nr, r[i]);
        }
      }
    }
  }
}
#endif

}  // namespace

template <typename T>
void pack_transposed_rows(const T* const* rows, int64_t p0, int64_t kc, int64_t nc, int nr, T* dst) {
#if CS231N_X86
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_isa() == Isa::kAvx512 && nr % 16 == 0) {
      pack_transposed_rows_avx512(rows, p0, kc, nc, nr, dst);
      return;
    }
  }
#endif
  for (int64_t s = 0; s < nc; s += nr) {
    T* sliver = dst + s * kc;
    const int64_t cols = std::min<int64_t>(nr, nc - s);
    for (int64_t j = 0; j < cols; ++j) {
      const T* src = rows[s + j] + p0;
      for (int64_t p = 0; p < kc; ++p) sliver[p * nr + j] = src[p];
    }
    for (int64_t p = 0; p < kc; ++p) std::fill(sliver + p * nr + cols, sliver + (p + 1) * nr, T(0));
  }
}

#if CS231N_X86
// dst's rows [j0, j0 + 16) from src's [i0, i0 + 16), in registers; fewer at the edges, through lane
// masks (a 14-pixel row is one partial block, not 14 x C scalar copies).
CS231N_AVX512 inline void transpose_block_avx512(const float* src, int64_t src_stride, int64_t rows, int64_t cols,
                                                 float* dst, int64_t dst_stride, int64_t i0, int64_t j0) {
  const int row_count = static_cast<int>(std::min<int64_t>(16, rows - i0));
  const __mmask16 row_mask = static_cast<__mmask16>((1u << row_count) - 1u);  // lanes of a stored row
  const int col_count = static_cast<int>(std::min<int64_t>(16, cols - j0));
  const __mmask16 col_mask = static_cast<__mmask16>((1u << col_count) - 1u);  // lanes of a loaded row
  __m512 r[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    r[i] = i < row_count ? _mm512_maskz_loadu_ps(col_mask, src + (i0 + i) * src_stride + j0) : _mm512_setzero_ps();
  }
  transpose16(r);
  for (int j = 0; j < col_count; ++j) _mm512_mask_storeu_ps(dst + (j0 + j) * dst_stride + i0, row_mask, r[j]);
}

// transpose_matrix for float on AVX-512, by those 16 x 16 blocks. Many rows and few columns (a block of
// pixels' filters into NCHW planes): 16 columns at a time down all
// the rows, so that dst is written as 16 runs, not a 64-byte piece of each of its rows in turn (the 7 x 7
// stem's NCHW forward spent a third of its time here); otherwise 16 rows at a time across the columns,
// src read as 16 runs.
CS231N_AVX512 void transpose_matrix_avx512(const float* src, int64_t src_stride, int64_t rows, int64_t cols, float* dst,
                                           int64_t dst_stride) {
  if (rows > 4 * cols) {
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      for (int64_t i0 = 0; i0 < rows; i0 += 16) {
        transpose_block_avx512(src, src_stride, rows, cols, dst, dst_stride, i0, j0);
      }
    }
  } else {
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {
      for (int64_t j0 = 0; j0 < cols; j0 += 16) {
        transpose_block_avx512(src, src_stride, rows, cols, dst, dst_stride, i0, j0);
      }
    }
  }
}
#endif

template <typename T>
void transpose_on_thread(const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst, int64_t dst_stride) {
#if CS231N_X86
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_isa() == Isa::kAvx512) {
      transpose_matrix_avx512(src, src_stride, rows, cols, dst, dst_stride);
      return;
    }
  }
#endif
  constexpr int64_t kTile = 16;  // tiles keep each one's reads and writes within 16 cache lines
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * dst_stride + i] = src[i * src_stride + j];
      }
    }
  }
}

// Outside a parallel region (a sample's transposes at batch 1; d_W's last one), a large matrix in bands
// of 64 rows or columns among the threads.
template <typename T>
void transpose_matrix(const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst, int64_t dst_stride) {
  constexpr int64_t kBand = 64;
  const bool split = rows * cols >= (int64_t(1) << 16) && !at::in_parallel_region() && at::get_num_threads() > 1;
  if (split && rows >= cols) {
    at::parallel_for(0, (rows + kBand - 1) / kBand, 1, [&](int64_t begin, int64_t end) {
      const int64_t i0 = begin * kBand, i1 = std::min(rows, end * kBand);
      transpose_on_thread(src + i0 * src_stride, src_stride, i1 - i0, cols, dst + i0, dst_stride);
    });
  } else if (split) {
    at::parallel_for(0, (cols + kBand - 1) / kBand, 1, [&](int64_t begin, int64_t end) {
      const int64_t j0 = begin * kBand, j1 = std::min(cols, end * kBand);
      transpose_on_thread(src + j0, src_stride, rows, j1 - j0, dst + j0 * dst_stride, dst_stride);
    });
  } else {
    transpose_on_thread(src, src_stride, rows, cols, dst, dst_stride);
  }
}

template void transpose_matrix<float>(const float*, int64_t, int64_t, int64_t, float*, int64_t);
template void transpose_matrix<double>(const double*, int64_t, int64_t, int64_t, double*, int64_t);

template void pack_transposed_rows<float>(const float* const*, int64_t, int64_t, int64_t, int, float*);
template void pack_transposed_rows<double>(const double* const*, int64_t, int64_t, int64_t, int, double*);

template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, MatrixView<T> a, MatrixView<T> b, T* c, int64_t ldc,
          const GemmEpilogue<T>& ep) {
  auto pack = [&b](int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, T* dst) {
    pack_b(b, p0, j0, kc, nc, nr, dst);
  };
  gemm_split(m, n, k, a, pack, c, ldc, ep);
}

template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, MatrixView<T> a, const PackB<T>& b, T* c, int64_t ldc,
          const GemmEpilogue<T>& ep) {
  gemm_split(m, n, k, a, b, c, ldc, ep);
}

namespace {

// gemm_segments on AVX-512: B packed once in slivers of 64 columns (all segments' rows), then every tile
// of C runs through all segments and k in registers. The tile has 24 accumulators and a shape fitted to
// its sliver's real columns: 6 x 64 (4 B vectors, one broadcast; 64, 128 and 256 filters are whole
// slivers), and for a narrow sliver (16, 24 or 32 filters, the last of 96 or 144) 8 x 48, 12 x 32 or
// 24 x 16, which run more rows where 6 x 64 would multiply zeros.
#if CS231N_X86
constexpr int kSegmentsNr = 64;

// f(MR, NV) (as std::integral_constant) with the tile for a sliver of nc <= 64 real columns: always 24
// accumulators, shaped to the width (gemm_segments' and gemm_gather_a's kernels alike).
template <typename F>
void with_tile_for(int nc, const F& f) {
  using std::integral_constant;
  if (nc > 48) return f(integral_constant<int, 6>{}, integral_constant<int, 4>{});
  if (nc > 32) return f(integral_constant<int, 8>{}, integral_constant<int, 3>{});
  if (nc > 16) return f(integral_constant<int, 12>{}, integral_constant<int, 2>{});
  f(integral_constant<int, 24>{}, integral_constant<int, 1>{});
}

// The tiles of sliver columns [j, j + nc) for rows [0, m), MR rows at a time.
template <int MR, int NV>
void segments_sliver(int64_t m, int64_t j, int nc, int64_t nseg, int64_t kc, const float* const* a_seg,
                     const int64_t* a_rows, const float* b_sliver, float* c, int64_t ldc, const GemmEpilogue<float>& ep,
                     bool first) {
  for (int64_t i = 0; i < m; i += MR) {
    const int m_tile = static_cast<int>(std::min<int64_t>(MR, m - i));
    const TileEpilogue<float> tile = tile_epilogue(ep, first, i, j);
    microkernel_avx512_segments<MR, NV, kSegmentsNr>(nseg, a_seg, a_rows + i, kc, b_sliver, c + i * ldc + j, ldc,
                                                     m_tile, nc, tile);
  }
}

// The products of all slivers for rows [0, m), segment block by segment block.
void gemm_segments_rows(int64_t m, int64_t n, int64_t nseg, int64_t kc, const float* const* a_seg,
                        const int64_t* a_rows, const float* b_pack, float* c, int64_t ldc,
                        const GemmEpilogue<float>& ep) {
  constexpr int nr = kSegmentsNr;
  const int64_t k = nseg * kc;
  // Segments in blocks of about kKc * 2 rows of B, so that a block of a B sliver (64 KiB to 128 KiB)
  // stays in L2 while every row tile of C passes over it.
  const int64_t per_block = std::max<int64_t>(1, 2 * kKc / kc);
  for (int64_t s0 = 0; s0 < nseg; s0 += per_block) {
    const int64_t s1 = std::min(nseg, s0 + per_block);
    const bool first = s0 == 0;
    for (int64_t j = 0; j < n; j += nr) {
      const int nc = static_cast<int>(std::min<int64_t>(nr, n - j));
      const float* b_sliver = b_pack + j * k + s0 * kc * nr;
      with_tile_for(nc, [&](auto mr, auto nv) {
        segments_sliver<decltype(mr)::value, decltype(nv)::value>(m, j, nc, s1 - s0, kc, a_seg + s0, a_rows, b_sliver,
                                                                  c, ldc, ep, first);
      });
    }
  }
}

// Where B has more than one sliver, every sliver's tiles read the same rows of A: in blocks of
// kSegmentsRowBlock rows (240 pixels of 256 channels, 240 KiB), a block's A rows are read from memory
// by the first sliver and from L2 by the others. (Whole parts of 2400 rows at a time read them from
// memory once per sliver: a (32, 256, 28, 28) 1 x 1 layer's forward and d_x took 12.4 and 11.5 ms, now
// 11.1 and 10.3 on the Xeon of docs/benchmarks.md; one sliver has nothing to share, and 3 x 3 layers
// of 256 filters read the same with or without.)
constexpr int64_t kSegmentsRowBlock = 240;

void gemm_segments_avx512(int64_t m, int64_t n, int64_t nseg, int64_t kc, const float* const* a_seg,
                          const int64_t* a_rows, const float* b_pack, float* c, int64_t ldc,
                          const GemmEpilogue<float>& ep) {
  const int64_t block = n > kSegmentsNr ? kSegmentsRowBlock : m;
  for (int64_t i0 = 0; i0 < m; i0 += block) {
    GemmEpilogue<float> e = ep;
    if (e.row_bias) e.row_bias += i0;
    gemm_segments_rows(std::min(block, m - i0), n, nseg, kc, a_seg, a_rows + i0, b_pack, c + i0 * ldc, ldc, e);
  }
}

// The packing of a SegmentedView into slivers of 64 columns: sliver sl at storage + sl * k * 64, its row
// s*kc + i holding B[s*kc + i, 64 sl .. 64 sl + 64) (zeros past n). Three forms, by which stride is 1:
//   cs = 1       the rows of B lie in memory (channels_last filters, transposed): copies of runs;
//   rs = 1, ss = kc (or one segment)
//                the columns of B lie in memory (channels_last filters): 16 x 16 register transposes;
//   ss = ±1      each column's taps lie in memory (NCHW filters, either way): per row i of a segment,
//                16 columns' runs of up to 16 taps loaded, transposed, stored as rows of 16 segments.
// Anything else element by element. Each call packs rows [i0, i1) of every segment of one sliver.
enum class SegmentsPacking { kRows, kColumns, kTaps, kElements };

SegmentsPacking segments_packing(const SegmentedView<float>& b, int64_t nseg, int64_t kc) {
  if (b.cs == 1) return SegmentsPacking::kRows;
  if (b.rs == 1 && (nseg == 1 || b.ss == kc)) return SegmentsPacking::kColumns;
  if (b.ss == 1 || b.ss == -1) return SegmentsPacking::kTaps;
  return SegmentsPacking::kElements;
}

CS231N_AVX512 void pack_segments_avx512(const SegmentedView<float>& b, SegmentsPacking how, int64_t nseg, int64_t kc,
                                        int64_t n, int64_t sl, int64_t i0, int64_t i1, float* storage) {
  constexpr int nr = kSegmentsNr;
  const int64_t k = nseg * kc, j0 = sl * nr, nc = std::min<int64_t>(nr, n - j0);
  float* sliver = storage + sl * k * nr;
  const float* first = b.data + j0 * b.cs;  // B[0, j0]
  switch (how) {
    case SegmentsPacking::kRows:
      for (int64_t s = 0; s < nseg; ++s) {
        for (int64_t i = i0; i < i1; ++i) {
          float* out = sliver + (s * kc + i) * nr;
          std::memcpy(out, first + s * b.ss + i * b.rs, sizeof(float) * nc);
          std::fill(out + nc, out + nr, 0.0f);
        }
      }
      return;
    case SegmentsPacking::kColumns: {
      // B's rows s*kc + i0 .. for all segments are one run of each column when there is one segment;
      // otherwise (ss = kc) segment by segment
      const float* runs[nr];
      for (int64_t j = 0; j < nc; ++j) runs[j] = first + j * b.cs;
      for (int64_t s = 0; s < nseg; ++s) {
        pack_transposed_rows_avx512(runs, s * kc + i0, i1 - i0, nc, nr, sliver + (s * kc + i0) * nr);
      }
      return;
    }
    case SegmentsPacking::kTaps:
      // row by row, 16 columns at a time: a row's runs of the sliver's columns are read in memory order
      // when the columns lie one run apart (W[f, c, :] for c in a sliver: d_x's filters); going down the
      // rows 16 columns at a time left it waiting on memory (0.5 ms of 3.6 at 512 x 512 x 3 x 3)
      for (int64_t i = i0; i < i1; ++i) {
        for (int jb = 0; jb < nr; jb += 16) {
          for (int64_t s0 = 0; s0 < nseg; s0 += 16) {
            const int valid = static_cast<int>(std::min<int64_t>(16, nseg - s0));
            const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
            // the lowest address of the run: segment s0 when ss = 1, s0 + valid - 1 when ss = -1
            const float* run = first + i * b.rs + (b.ss > 0 ? s0 : -(s0 + valid - 1));
            __m512 r[16];
#pragma GCC unroll 16
            for (int q = 0; q < 16; ++q) {
              r[q] = jb + q < nc ? _mm512_maskz_loadu_ps(mask, run + (jb + q) * b.cs) : _mm512_setzero_ps();
            }
            transpose16(r);  // r[m]: the 16 columns' element at memory position m of their runs
            for (int m = 0; m < valid; ++m) {
              const int64_t s = b.ss > 0 ? s0 + m : s0 + valid - 1 - m;
              _mm512_storeu_ps(sliver + (s * kc + i) * nr + jb, r[m]);
            }
          }
        }
      }
      return;
    case SegmentsPacking::kElements:
      for (int64_t s = 0; s < nseg; ++s) {
        for (int64_t i = i0; i < i1; ++i) {
          float* out = sliver + (s * kc + i) * nr;
          for (int64_t j = 0; j < nr; ++j) out[j] = j < nc ? first[s * b.ss + i * b.rs + j * b.cs] : 0.0f;
        }
      }
      return;
  }
}
#pragma GCC diagnostic pop
#endif

// Elsewhere: one packed GEMM per segment, the first writing C with the epilogue, the others adding.
template <typename T>
void gemm_segments_packed(int64_t m, const T* const* a_seg, const int64_t* a_rows, const SegmentsB<T>& b, T* c,
                          int64_t ldc, const GemmEpilogue<T>& ep) {
  for (int64_t s = 0; s < b.nseg; ++s) {
    GemmEpilogue<T> e = ep;
    if (s > 0) e = GemmEpilogue<T>{true, nullptr, nullptr};
    const MatrixView<T> b_s{b.view.data + s * b.view.ss, b.view.rs, b.view.cs};
    auto pack = [&](int64_t p0, int64_t j0, int64_t kcb, int64_t nc, int nr, T* dst) {
      pack_b(b_s, p0, j0, kcb, nc, nr, dst);
    };
    gemm_blocked(m, b.n, b.kc, MatrixView<T>{a_seg[s], 0, 1, a_rows}, pack, c, ldc, e);
  }
}

}  // namespace

template <typename T>
int64_t segments_b_size(int64_t k, int64_t n) {
#if CS231N_X86
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_isa() == Isa::kAvx512 && k > 0 && n > 0) return k * ((n + kSegmentsNr - 1) / kSegmentsNr) * kSegmentsNr;
  }
#endif
  return 0;
}

template <typename T>
SegmentsB<T> prepare_segments_b(int64_t nseg, int64_t kc, int64_t n, SegmentedView<T> b, T* storage) {
  SegmentsB<T> prepared{b, nseg, kc, n, nullptr};
#if CS231N_X86
  if constexpr (std::is_same_v<T, float>) {
    if (segments_b_size<float>(nseg * kc, n) > 0) {
      // in parallel over slivers and blocks of 64 rows of the segments (one sliver: 64 filters)
      constexpr int64_t kRowsPerItem = 64;
      const SegmentsPacking how = segments_packing(b, nseg, kc);
      const int64_t slivers = (n + kSegmentsNr - 1) / kSegmentsNr, blocks = (kc + kRowsPerItem - 1) / kRowsPerItem;
      at::parallel_for(0, slivers * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t sl = item / blocks, i0 = item % blocks * kRowsPerItem;
          pack_segments_avx512(b, how, nseg, kc, n, sl, i0, std::min<int64_t>(kc, i0 + kRowsPerItem), storage);
        }
      });
      prepared.packed = storage;
    }
  }
#endif
  return prepared;
}

template <typename T>
void gemm_segments(int64_t m, const T* const* a_seg, int64_t lda, const SegmentsB<T>& b, T* c, int64_t ldc,
                   const GemmEpilogue<T>& ep, const int64_t* a_rows) {
  const int64_t n = b.n, nseg = b.nseg, kc = b.kc;
  if (m <= 0 || n <= 0) return;
  if (nseg <= 0 || kc <= 0) {
    epilogue_only(m, n, c, ldc, ep);
    return;
  }
  // Rows [i0, i1), their offsets in `rows` (rows[0] for row i0).
  const auto run = [&](int64_t i0, int64_t i1, const int64_t* rows) {
    GemmEpilogue<T> e = ep;
    if (e.row_bias) e.row_bias += i0;
#if CS231N_X86
    if constexpr (std::is_same_v<T, float>) {
      if (b.packed != nullptr) {
        gemm_segments_avx512(i1 - i0, n, nseg, kc, a_seg, rows, b.packed, c + i0 * ldc, ldc, e);
        return;
      }
    }
#endif
    gemm_segments_packed(i1 - i0, a_seg, rows, b, c + i0 * ldc, ldc, e);
  };
  // Rows among the threads when called outside a parallel region (a single sample, a batch's pixels).
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  // Parts start at multiples of 24 rows, a whole number of tiles of every shape (6, 8, 12, 24 rows).
  constexpr int64_t kUnit = 24;
  const int64_t parts =
      2 * m * n * nseg * kc < (int64_t(1) << 20) ? 1 : std::min<int64_t>(threads, (m + kUnit - 1) / kUnit);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t i0 = (part * m / parts) / kUnit * kUnit,
                    i1 = part + 1 == parts ? m : ((part + 1) * m / parts) / kUnit * kUnit;
      if (i1 <= i0) continue;
      if (a_rows != nullptr) {
        run(i0, i1, a_rows + i0);
        continue;
      }
      // Rows lda apart: the kernels' table of them, built for a block at a time (a whole batch's pixels
      // would make a table of N·H·W offsets)
      constexpr int64_t kBlock = 100 * kUnit;
      std::vector<int64_t> evenly(std::min(kBlock, i1 - i0));
      for (int64_t r0 = i0; r0 < i1; r0 += kBlock) {
        const int64_t r1 = std::min(i1, r0 + kBlock);
        for (int64_t i = r0; i < r1; ++i) evenly[i - r0] = i * lda;
        run(r0, r1, evenly.data());
      }
    }
  });
}

template int64_t segments_b_size<float>(int64_t, int64_t);
template int64_t segments_b_size<double>(int64_t, int64_t);
template SegmentsB<float> prepare_segments_b<float>(int64_t, int64_t, int64_t, SegmentedView<float>, float*);
template SegmentsB<double> prepare_segments_b<double>(int64_t, int64_t, int64_t, SegmentedView<double>, double*);
template void gemm_segments<float>(int64_t, const float* const*, int64_t, const SegmentsB<float>&, float*, int64_t,
                                   const GemmEpilogue<float>&, const int64_t*);
template void gemm_segments<double>(int64_t, const double* const*, int64_t, const SegmentsB<double>&, double*, int64_t,
                                    const GemmEpilogue<double>&, const int64_t*);

namespace {

#if CS231N_X86
// The tiles of columns [j, j + nc) (nc <= 64) for rows [0, m), MR rows at a time, over k block [p0, p0 + kc).
template <int MR, int NV>
void gather_a_sliver(int64_t m, int64_t j, int nc, int64_t p0, int64_t kc, const float* const* a_row,
                     const int64_t* a_col, const float* b, int64_t ldb, float* c, int64_t ldc,
                     const GemmEpilogue<float>& ep) {
  for (int64_t i = 0; i < m; i += MR) {
    const int m_tile = static_cast<int>(std::min<int64_t>(MR, m - i));
    const TileEpilogue<float> tile = tile_epilogue(ep, p0 == 0, i, j);
    microkernel_avx512_gather_a<MR, NV>(kc, a_row + i, a_col + p0, b + p0 * ldb + j, ldb, c + i * ldc + j, ldc, m_tile,
                                        nc, tile);
  }
}
#endif

}  // namespace

bool gather_a_available() { return CS231N_X86 && cpu_isa() == Isa::kAvx512; }

// k in blocks of kKc, so that B's block (kKc x 64 floats, 64 KiB) stays in L2 while every row tile passes
// over it; C is added to from the second block on. Tiles as gemm_segments': 24 accumulators, shaped to
// the columns (6 x 64, or for fewer 8 x 48, 12 x 32, 24 x 16).
void gemm_gather_a(int64_t m, int64_t n, int64_t k, const float* const* a_row, const int64_t* a_col, const float* b,
                   int64_t ldb, float* c, int64_t ldc, const GemmEpilogue<float>& ep) {
  TORCH_CHECK(gather_a_available(), "gemm_gather_a: needs the AVX-512 kernel");
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    epilogue_only(m, n, c, ldc, ep);
    return;
  }
#if CS231N_X86
  // Outside a parallel region (a convolution of one sample), the rows among the threads, in parts of
  // whole 24-row units: every tile shape divides 24, so each row is summed as on one thread.
  constexpr int64_t kUnit = 24;
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t units = (m + kUnit - 1) / kUnit;
  const int64_t parts = 2 * m * n * k < (int64_t(1) << 21) ? 1 : std::min<int64_t>(threads, units);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t i0 = part * units / parts * kUnit, i1 = std::min(m, (part + 1) * units / parts * kUnit);
      GemmEpilogue<float> e = ep;
      if (e.row_bias) e.row_bias += i0;
      for (int64_t p0 = 0; p0 < k; p0 += kKc) {
        const int64_t kc = std::min(kKc, k - p0);
        for (int64_t j = 0; j < n; j += 64) {
          const int nc = static_cast<int>(std::min<int64_t>(64, n - j));
          with_tile_for(nc, [&](auto mr, auto nv) {
            gather_a_sliver<decltype(mr)::value, decltype(nv)::value>(i1 - i0, j, nc, p0, kc, a_row + i0, a_col, b, ldb,
                                                                      c + i0 * ldc, ldc, e);
          });
        }
      }
    }
  });
#endif
}

namespace {

#if CS231N_X86
// gemm_rows_b on AVX-512, on the calling thread: gemm_blocked's loops without B's packing.
void gemm_rows_b_avx512(int64_t m, int64_t n, int64_t k, const MatrixView<float>& a, const float* b,
                        const int64_t* b_off, float* c, int64_t ldc, const GemmEpilogue<float>& ep) {
  constexpr int mr = 8, nr = 48;
  const int64_t kc_block = even_block(k, kKc, 1), mc_block = even_block(m, kMc / mr * mr, mr);
  float* a_pack = thread_scratch<float>(Scratch::kPackA, mc_block * kc_block);
  for (int64_t pc = 0; pc < k; pc += kc_block) {
    const int64_t kc = std::min(kc_block, k - pc);
    const bool first = pc == 0;
    for (int64_t ic = 0; ic < m; ic += mc_block) {
      const int64_t mc = std::min(mc_block, m - ic);
      pack_a(a, ic, pc, mc, kc, mr, a_pack);
      for (int64_t j = 0; j < n; j += nr) {
        const int n_tile = static_cast<int>(std::min<int64_t>(nr, n - j));
        // a last tile of 16 or 32 columns or fewer in as many vectors (14 x 14 pixels end in one of 4)
        const auto tiles = [&](auto nv) {
          for (int64_t ir = 0; ir < mc; ir += mr) {
            const int m_tile = static_cast<int>(std::min<int64_t>(mr, mc - ir));
            const int64_t i = ic + ir;
            const TileEpilogue<float> tile = tile_epilogue(ep, first, i, j);
            microkernel_avx512_rows_b<mr, decltype(nv)::value>(kc, a_pack + ir * kc, b + j, b_off + pc, c + i * ldc + j,
                                                               ldc, m_tile, n_tile, tile);
          }
        };
        if (n_tile <= 16) {
          tiles(std::integral_constant<int, 1>{});
        } else if (n_tile <= 32) {
          tiles(std::integral_constant<int, 2>{});
        } else {
          tiles(std::integral_constant<int, 3>{});
        }
      }
    }
  }
}
#endif

}  // namespace

template <typename T>
void gemm_rows_b(int64_t m, int64_t n, int64_t k, MatrixView<T> a, const T* b, const int64_t* b_off, T* c, int64_t ldc,
                 const GemmEpilogue<T>& ep) {
#if CS231N_X86
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_isa() == Isa::kAvx512 && m > 0 && n > 0 && k > 0) {
      // columns among the threads outside a parallel region (B is read in place: nothing is duplicated
      // but A's small panels)
      // When the columns share out unevenly and the rows evenly (a 1x1 layer on 14 x 14 pixels: 5 column
      // tiles for 2 threads, 1024 filters), the rows instead: every thread reads all of B, from L2.
      const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
      const int64_t units = (n + 47) / 48, row_units = (m + 7) / 8;
      const int64_t parts = 2 * m * n * k < (int64_t(1) << 20) ? 1 : std::min<int64_t>(threads, units);
      const auto evenness = [](int64_t u, int64_t p) { return double(u) / double(p * ((u + p - 1) / p)); };
      const bool by_rows = parts > 1 && row_units >= parts && evenness(row_units, parts) > evenness(units, parts);
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t part = begin; part < end; ++part) {
          GemmEpilogue<float> e = ep;
          if (by_rows) {
            const int64_t i0 = part * row_units / parts * 8, i1 = std::min(m, (part + 1) * row_units / parts * 8);
            if (e.row_bias) e.row_bias += i0;
            const MatrixView<float> a_part = a.rows ? MatrixView<float>{a.data, a.rs, a.cs, a.rows + i0}
                                                    : MatrixView<float>{a.data + i0 * a.rs, a.rs, a.cs};
            gemm_rows_b_avx512(i1 - i0, n, k, a_part, b, b_off, c + i0 * ldc, ldc, e);
            continue;
          }
          const int64_t j0 = part * units / parts * 48, j1 = std::min(n, (part + 1) * units / parts * 48);
          if (e.col_bias) e.col_bias += j0;
          gemm_rows_b_avx512(m, j1 - j0, k, a, b + j0, b_off, c + j0, ldc, e);
        }
      });
      return;
    }
  }
#endif
  auto pack = [&](int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, T* dst) {
    for (int64_t p = 0; p < kc; ++p) {
      const T* src = b + b_off[p0 + p] + j0;
      for (int64_t s = 0; s < nc; s += nr) {
        T* out = dst + s * kc + p * nr;
        const int64_t len = std::min<int64_t>(nr, nc - s);
        std::copy(src + s, src + s + len, out);
        std::fill(out + len, out + nr, T(0));
      }
    }
  };
  gemm_split(m, n, k, a, pack, c, ldc, ep);
}

template void gemm_rows_b<float>(int64_t, int64_t, int64_t, MatrixView<float>, const float*, const int64_t*, float*,
                                 int64_t, const GemmEpilogue<float>&);
template void gemm_rows_b<double>(int64_t, int64_t, int64_t, MatrixView<double>, const double*, const int64_t*, double*,
                                  int64_t, const GemmEpilogue<double>&);

template void gemm<float>(int64_t, int64_t, int64_t, MatrixView<float>, MatrixView<float>, float*, int64_t,
                          const GemmEpilogue<float>&);
template void gemm<double>(int64_t, int64_t, int64_t, MatrixView<double>, MatrixView<double>, double*, int64_t,
                           const GemmEpilogue<double>&);
template void gemm<float>(int64_t, int64_t, int64_t, MatrixView<float>, const PackB<float>&, float*, int64_t,
                          const GemmEpilogue<float>&);
template void gemm<double>(int64_t, int64_t, int64_t, MatrixView<double>, const PackB<double>&, double*, int64_t,
                           const GemmEpilogue<double>&);

}  // namespace cpu
}  // namespace torch_cs231n

// ------------------------------------------------------------------------------ the op, for the tests
namespace torch_cs231n {
namespace {

at::Tensor gemm_cpu(const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* op = "gemm";
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": expected a and b to be 2-D, but got a of shape ", a.sizes(),
              " and b of shape ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(0), op, ": expected a.size(1) == b.size(0), but got a of shape ", a.sizes(),
              " and b of shape ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              op, ": expected a and b to be both float32 or both float64, but got ", a.scalar_type(), " and ",
              b.scalar_type());
  at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), op, [&] {
    cpu::gemm<scalar_t>(a.size(0), b.size(1), a.size(1), {a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1)},
                        cpu::MatrixView<scalar_t>{b.const_data_ptr<scalar_t>(), b.stride(0), b.stride(1)},
                        c.mutable_data_ptr<scalar_t>(), c.size(1));
  });
  return c;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CPU, m) { m.impl("gemm", &gemm_cpu); }

}  // namespace torch_cs231n
