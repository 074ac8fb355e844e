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
// Memory: each thread owns two packing buffers, at most MC * KC and KC * NC floats (about 0.2 and
// 2 MiB), whatever the sizes of the product.
#include "cpu/gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/gemm_microkernel.h"

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
void pack_a(const MatrixView& a, int64_t i0, int64_t p0, int64_t mc, int64_t kc, int mr, float* dst) {
  for (int64_t s = 0; s < mc; s += mr) {
    const int rows = static_cast<int>(std::min<int64_t>(mr, mc - s));
    const float* base = a.data + (i0 + s) * a.rs + p0 * a.cs;
    if (a.rs == 1) {  // A's rows are contiguous for a fixed k (a transposed operand)
      for (int64_t p = 0; p < kc; ++p, dst += mr) {
        const float* src = base + p * a.cs;
        for (int r = 0; r < rows; ++r) dst[r] = src[r];
        for (int r = rows; r < mr; ++r) dst[r] = 0.f;
      }
    } else {
      for (int64_t p = 0; p < kc; ++p, dst += mr) {
        const float* src = base + p * a.cs;
        for (int r = 0; r < rows; ++r) dst[r] = src[r * a.rs];
        for (int r = rows; r < mr; ++r) dst[r] = 0.f;
      }
    }
  }
}

// B[p0 .. p0+kc, j0 .. j0+nc) into slivers of nr columns: sliver s holds, for each k, its nr values
// (columns past nc are zeros).
void pack_b(const MatrixView& b, int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, float* dst) {
  for (int64_t s = 0; s < nc; s += nr, dst += kc * nr) {
    const int cols = static_cast<int>(std::min<int64_t>(nr, nc - s));
    const float* base = b.data + p0 * b.rs + (j0 + s) * b.cs;
    if (b.cs == 1) {  // rows of B are contiguous: copy runs
      for (int64_t p = 0; p < kc; ++p) {
        float* out = dst + p * nr;
        std::memcpy(out, base + p * b.rs, sizeof(float) * cols);
        std::fill(out + cols, out + nr, 0.f);
      }
    } else {  // columns of B are (nearly) contiguous: read each column once, write it across the rows
      for (int j = 0; j < cols; ++j) {
        const float* src = base + j * b.cs;
        for (int64_t p = 0; p < kc; ++p) dst[p * nr + j] = src[p * b.rs];
      }
      for (int64_t p = 0; p < kc; ++p) std::fill(dst + p * nr + cols, dst + (p + 1) * nr, 0.f);
    }
  }
}

// The product of an empty k: C is only the epilogue's terms.
void epilogue_only(int64_t m, int64_t n, float* c, int64_t ldc, const GemmEpilogue& ep) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float v = ep.accumulate ? c[i * ldc + j] : 0.f;
      if (ep.row_bias) v += ep.row_bias[i];
      if (ep.col_bias) v += ep.col_bias[j];
      c[i * ldc + j] = v;
    }
  }
}

// The thread's packing buffers, grown to the largest size asked for (at most kMc*kKc and kKc*kNc
// floats, plus one sliver of slack for rounding up to MR/NR).
float* thread_buffer(std::vector<float>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

}  // namespace

void sgemm(int64_t m, int64_t n, int64_t k, MatrixView a, MatrixView b, float* c, int64_t ldc,
           const GemmEpilogue& ep) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    epilogue_only(m, n, c, ldc, ep);
    return;
  }
  const MicroKernelInfo uk = microkernel_for(cpu_isa());
  const int mr = uk.mr, nr = uk.nr;
  const int64_t kc_block = even_block(k, kKc, 1);
  const int64_t mc_block = even_block(m, kMc / mr * mr, mr);
  const int64_t nc_block = even_block(n, kNc / nr * nr, nr);
  thread_local std::vector<float> a_buffer, b_buffer;
  float* a_pack = thread_buffer(a_buffer, mc_block * kc_block);
  float* b_pack = thread_buffer(b_buffer, kc_block * nc_block);

  for (int64_t jc = 0; jc < n; jc += nc_block) {
    const int64_t nc = std::min(nc_block, n - jc);
    for (int64_t pc = 0; pc < k; pc += kc_block) {
      const int64_t kc = std::min(kc_block, k - pc);
      pack_b(b, pc, jc, kc, nc, nr, b_pack);
      // The first k block writes C with the epilogue's terms; the later ones add to it.
      const bool first = pc == 0;
      for (int64_t ic = 0; ic < m; ic += mc_block) {
        const int64_t mc = std::min(mc_block, m - ic);
        pack_a(a, ic, pc, mc, kc, mr, a_pack);
        for (int64_t jr = 0; jr < nc; jr += nr) {
          const int n_tile = static_cast<int>(std::min<int64_t>(nr, nc - jr));
          for (int64_t ir = 0; ir < mc; ir += mr) {
            const int m_tile = static_cast<int>(std::min<int64_t>(mr, mc - ir));
            const int64_t i = ic + ir, j = jc + jr;
            const TileEpilogue tile{!first || ep.accumulate, first && ep.row_bias ? ep.row_bias + i : nullptr,
                                    first && ep.col_bias ? ep.col_bias + j : nullptr};
            uk.kernel(kc, a_pack + ir * kc, b_pack + jr * kc, c + i * ldc + j, ldc, m_tile, n_tile, tile);
          }
        }
      }
    }
  }
}

void sgemm_parallel(int64_t m, int64_t n, int64_t k, MatrixView a, MatrixView b, float* c, int64_t ldc,
                    const GemmEpilogue& ep) {
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const MicroKernelInfo uk = microkernel_for(cpu_isa());
  // Split the longer side of C, in whole tiles, so that every thread packs its own operands.
  const bool by_columns = n / uk.nr >= m / uk.mr;
  const int64_t units = by_columns ? (n + uk.nr - 1) / uk.nr : (m + uk.mr - 1) / uk.mr;
  if (threads <= 1 || units < 2 || 2 * m * n * k < (int64_t(1) << 20)) {
    sgemm(m, n, k, a, b, c, ldc, ep);
    return;
  }
  const int64_t parts = std::min<int64_t>(threads, units);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t u0 = part * units / parts, u1 = (part + 1) * units / parts;
      if (by_columns) {
        const int64_t j0 = u0 * uk.nr, j1 = std::min(n, u1 * uk.nr);
        GemmEpilogue e = ep;
        if (e.col_bias) e.col_bias += j0;
        sgemm(m, j1 - j0, k, a, {b.data + j0 * b.cs, b.rs, b.cs}, c + j0, ldc, e);
      } else {
        const int64_t i0 = u0 * uk.mr, i1 = std::min(m, u1 * uk.mr);
        GemmEpilogue e = ep;
        if (e.row_bias) e.row_bias += i0;
        sgemm(i1 - i0, n, k, {a.data + i0 * a.rs, a.rs, a.cs}, b, c + i0 * ldc, ldc, e);
      }
    }
  });
}

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
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, op,
              ": expected a and b to be float32, but got ", a.scalar_type(), " and ", b.scalar_type());
  at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
  cpu::sgemm_parallel(a.size(0), b.size(1), a.size(1), {a.const_data_ptr<float>(), a.stride(0), a.stride(1)},
                      {b.const_data_ptr<float>(), b.stride(0), b.stride(1)}, c.mutable_data_ptr<float>(),
                      c.size(1), {});
  return c;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CPU, m) { m.impl("gemm", &gemm_cpu); }

}  // namespace torch_cs231n
