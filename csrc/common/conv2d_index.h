// Conv2d's index maps and its geometry: plain integer arithmetic, with no torch type in it, so that the
// CUDA implicit-GEMM kernels (cuda/conv2d_implicit_gemm.cuh) and their CPU emulation test
// (tests/cuda_emulation/) can include it without ATen. common/conv2d.h, which the ops include, derives the
// formulas and adds the argument checks.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

namespace torch_cs231n {

// ------------------------------------------------------------------------------ per-element index maps
// Output size along one axis: floor((I + 2p - d*(K-1) - 1) / s) + 1 (may be <= 0 for a too-small input).
C10_HOST_DEVICE inline int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1;
  return span < 0 ? 0 : span / s + 1;
}

// Forward map: the input position read by output position o through tap t. May lie in the padding
// (< 0 or >= I), where the value is zero. In o's type: int64_t, or int32_t where the CUDA implicit GEMM
// has bounded the sizes (cuda/conv2d_implicit_gemm.cuh: fits); the other arguments convert to it.
template <typename Index>
using SameAs = typename std::common_type<Index>::type;  // Index, in a context that deduces nothing
template <typename Index>
C10_HOST_DEVICE inline Index conv_in_index(Index o, SameAs<Index> t, SameAs<Index> s, SameAs<Index> p,
                                           SameAs<Index> d) {
  return o * s - p + t * d;
}

// Inverse map: the output position o with conv_in_index(o, t) == i, if there is one in [0, out).
C10_HOST_DEVICE inline bool conv_out_index(int64_t i, int64_t t, int64_t s, int64_t p, int64_t d, int64_t out,
                                           int64_t* o) {
  const int64_t num = i + p - t * d;  // = o*s
  if (num < 0) return false;
  if (s == 1) {  // the common case, without a division (a GPU's integer division is a long software routine)
    *o = num;
  } else {
    if (num % s != 0) return false;
    *o = num / s;
  }
  return *o < out;
}

// The outputs [lo, hi) whose tap t reads inside the input [0, in): o*s - p + t*d in [0, in).
// Lets a loop copy the interior of a row without a bounds test per element.
C10_HOST_DEVICE inline void conv_valid_out_range(int64_t t, int64_t s, int64_t p, int64_t d, int64_t in, int64_t out,
                                                 int64_t* lo, int64_t* hi) {
  const int64_t off = t * d - p;  // i = o*s + off
  // smallest o with o*s + off >= 0:  ceil(-off / s), at least 0
  int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
  // largest o with o*s + off <= in-1, plus one:  floor((in-1-off)/s) + 1
  const int64_t last = in - 1 - off;
  int64_t b = last < 0 ? 0 : last / s + 1;
  if (a > out) a = out;
  if (b > out) b = out;
  if (b < a) b = a;
  *lo = a;
  *hi = b;
}

// The inputs i ≡ r (mod s) that tap t reaches: the first such input i0 >= 0, and the output o0 it maps
// to, so that inputs i0, i0+s, i0+2s, ... map to outputs o0, o0+1, o0+2, ... . Used by the gather form
// of col2im: for tap t, input i receives from output (i + p - t*d)/s when that is an integer.
C10_HOST_DEVICE inline void conv_tap_first(int64_t t, int64_t s, int64_t p, int64_t d, int64_t* i0, int64_t* o0) {
  const int64_t off = p - t * d;  // o*s = i + off
  // smallest i >= 0 with (i + off) % s == 0 and i + off >= 0
  int64_t i = off >= 0 ? 0 : -off;
  const int64_t r = ((i + off) % s + s) % s;
  if (r != 0) i += s - r;
  *i0 = i;
  *o0 = (i + off) / s;
}

// The other way round, dilation 1: the taps that reach input i are t ≡ i + p (mod s); the first, t0 < s,
// and the output it maps to, so that taps t0, t0+s, t0+2s, ... map to outputs o0, o0-1, o0-2, ... (o0 may be
// >= out, and the later ones < 0: the caller bounds them). The gather form of d_input for few channels
// (cuda/conv2d_few_channels.cuh) walks a pixel's taps so.
C10_HOST_DEVICE inline void conv_first_tap(int64_t i, int64_t s, int64_t p, int64_t* t0, int64_t* o0) {
  *t0 = (i + p) % s;
  *o0 = (i + p - *t0) / s;
}

// ------------------------------------------------------------------------------------ column geometry
struct Conv2dGeometry {
  int64_t n, c, h, w;  // input
  int64_t f, kh, kw;   // weight (f out channels, c / groups in channels per group)
  int64_t oh, ow;      // output
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t groups;

  C10_HOST_DEVICE int64_t c_per_group() const { return c / groups; }
  C10_HOST_DEVICE int64_t f_per_group() const { return f / groups; }
  C10_HOST_DEVICE int64_t taps() const { return kh * kw; }
  C10_HOST_DEVICE int64_t col_rows() const { return c * kh * kw; }  // all groups
  C10_HOST_DEVICE int64_t col_cols() const { return oh * ow; }
};

}  // namespace torch_cs231n
