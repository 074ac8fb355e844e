// The CPU convolution of integer tensors (uint8, int8, int16, int32, int64): the forward only, as integer
// tensors have no gradients. Part of the CPU convolution (cpu/conv2d.cpp routes each layer).
//
// torch's CPU conv2d takes these dtypes and sums in the dtype itself, wrapping around on overflow: a uint8
// layer of 27 taps of 200 · 1 gives 5400 mod 256 = 24. Wrapping is arithmetic mod 2^bits, so the sums are
// made in an unsigned type at least as wide (IntegerSum), where overflow is defined behaviour (a signed
// value enters as its two's-complement bits, the same number mod 2^bits), and their low bits read back in
// the dtype:
//     y = (b + Σ_{c, t_h, t_w} W[f, c, t] · x[n, c, i]) mod 2^bits
// A narrow type is also a fast one: a vector holds as many sums as it has lanes of that width.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/conv2d.h"
#include "cpu/conv2d_im2col.h"
#include "cpu/cpu_features.h"

namespace torch_cs231n {
namespace conv2d_cpu {

// An im2col and a product, a chunk of output pixels at a time (torch's own form for these dtypes): the
// chunk's columns col[k][p] (k = (c, t_h, t_w), 0 in the padding) are gathered once, in the sums' type,
// then each filter's sums over the chunk add w[f, k] · col[k][:] along k, kIntegerFilters filters a pass
// over col: long contiguous runs, which vectorise. x, w and y are contiguous NCHW.
// At most 512 pixels a chunk, fewer for deep layers: col stays under 2^18 values (up to 2 MiB).
constexpr int64_t kIntegerFilters = 8, kIntegerPixels = 512, kIntegerColValues = int64_t(1) << 18;

// The sums' type: unsigned, as wide as T, but 16 bits for 8-bit T (the vectors multiply 16-bit lanes;
// the low 8 bits of a sum mod 2^16 are the sum mod 2^8).
template <typename T>
using IntegerSum = std::conditional_t<sizeof(T) == 1, uint16_t, std::make_unsigned_t<T>>;

struct IntegerChunks {
  const Conv2dGeometry& g;
  int64_t depth() const { return g.c_per_group() * g.kh * g.kw; }  // k, the rows of col
  int64_t pixels() const {
    return depth() == 0 ? kIntegerPixels
                        : std::clamp(kIntegerColValues / depth() / 16 * 16, int64_t(16), kIntegerPixels);
  }
  int64_t chunks() const { return (g.oh * g.ow + pixels() - 1) / pixels(); }  // per sample
  int64_t units() const { return g.n * g.groups * chunks(); }
};

// Units [begin, end), unit = (n * groups + group) * chunks + chunk. `col` holds depth * r.pixels() and
// `sums` kIntegerFilters * r.pixels(). Always inlined into the versions below, each compiled for its
// instruction set.
template <typename T>
CS231N_INLINE void integer_chunks(const T* x, const T* w, const T* b, T* y, const IntegerChunks& r, int64_t begin,
                                  int64_t end, IntegerSum<T>* col, IntegerSum<T>* sums) {
  using U = IntegerSum<T>;
  using P = std::common_type_t<U, unsigned>;  // products: U promotes to int, which may overflow, P does not
  const Conv2dGeometry& g = r.g;
  const int64_t fg = g.f_per_group(), cg = g.c_per_group(), depth = r.depth(), pixels = g.oh * g.ow;
  const int64_t chunk_pixels = r.pixels();  // the pitch of col's rows and of the sums' rows
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t chunk = unit % r.chunks(), group = unit / r.chunks() % g.groups, n = unit / r.chunks() / g.groups;
    const int64_t p0 = chunk * chunk_pixels, np = std::min(chunk_pixels, pixels - p0);
    // col[k][p] = x[n, c, i_h, i_w] of output pixel p0 + p through tap k (0 in the padding): the GEMM
    // routes' im2col, its values widened to U (a signed one sign-extended: the same number mod 2^bits)
    const int64_t q0 = n * pixels + p0;  // the chunk's first column, counted from sample 0
    for (int64_t k = 0; k < depth; ++k) {
      im2col_segment<T, U>(x + group * cg * g.h * g.w, g.c * g.h * g.w, g, k, q0, q0 + np, col + k * chunk_pixels);
    }
    for (int64_t f0 = group * fg; f0 < (group + 1) * fg; f0 += kIntegerFilters) {
      const int64_t filters = std::min(kIntegerFilters, (group + 1) * fg - f0);
      for (int64_t i = 0; i < filters; ++i) {
        std::fill(sums + i * chunk_pixels, sums + i * chunk_pixels + np, b ? static_cast<U>(b[f0 + i]) : U(0));
      }
      for (int64_t k = 0; k < depth; ++k) {
        const U* col_k = col + k * chunk_pixels;
        for (int64_t i = 0; i < filters; ++i) {
          const P weight = static_cast<U>(w[(f0 + i) * depth + k]);
          U* row = sums + i * chunk_pixels;
          for (int64_t p = 0; p < np; ++p) row[p] = static_cast<U>(row[p] + weight * col_k[p]);
        }
      }
      for (int64_t i = 0; i < filters; ++i) {
        T* y_f = y + (n * g.f + f0 + i) * pixels + p0;
        for (int64_t p = 0; p < np; ++p) y_f[p] = static_cast<T>(sums[i * chunk_pixels + p]);
      }
    }
  }
}

#if CS231N_X86
template <typename T>
CS231N_AVX512 void integer_chunks_avx512(const T* x, const T* w, const T* b, T* y, const IntegerChunks& r,
                                         int64_t begin, int64_t end, IntegerSum<T>* col, IntegerSum<T>* sums) {
  integer_chunks(x, w, b, y, r, begin, end, col, sums);
}

template <typename T>
CS231N_AVX2 void integer_chunks_avx2(const T* x, const T* w, const T* b, T* y, const IntegerChunks& r, int64_t begin,
                                     int64_t end, IntegerSum<T>* col, IntegerSum<T>* sums) {
  integer_chunks(x, w, b, y, r, begin, end, col, sums);
}
#endif

template <typename T>
void conv_forward_integer(const T* x, const T* w, const T* b, T* y, const Conv2dGeometry& g) {
  const IntegerChunks chunks{g};
  const cpu::Isa isa = cpu::cpu_isa();
  at::parallel_for(0, chunks.units(), 1, [&](int64_t begin, int64_t end) {
    std::vector<IntegerSum<T>> col(chunks.depth() * chunks.pixels()), sums(kIntegerFilters * chunks.pixels());
#if CS231N_X86
    if (isa >= cpu::Isa::kAvx512) return integer_chunks_avx512(x, w, b, y, chunks, begin, end, col.data(), sums.data());
    if (isa >= cpu::Isa::kAvx2) return integer_chunks_avx2(x, w, b, y, chunks, begin, end, col.data(), sums.data());
#endif
    integer_chunks(x, w, b, y, chunks, begin, end, col.data(), sums.data());
  });
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
