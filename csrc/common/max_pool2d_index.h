// Max pooling's index maps along one spatial dimension, without torch types, so that the flat CUDA
// kernels (cuda/max_pool2d_backward.cuh) and their CPU emulation test can include them; common/max_pool2d.h,
// which the ops include, states the rules (1)-(3) they serve. The integer type is a template argument:
// int64 in the ops' loops, int32 where the flat backward knows its indices fit.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace torch_cs231n {
namespace pool {

// floor(a / b) for b > 0 and any sign of a (C++ division truncates towards zero).
template <typename I>
C10_HOST_DEVICE inline I floor_div(I a, I b) {
  if (b == 1) return a;  // dilation 1, stride 1: no division (on a GPU a long software routine)
  const I q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// ceil(a / b) for b > 0 and any sign of a.
template <typename I>
C10_HOST_DEVICE inline I ceil_div(I a, I b) {
  return -floor_div(-a, b);
}

// The number of outputs along one dimension, rule (2). May be < 1: the caller reports that as an error.
C10_HOST_DEVICE inline int64_t output_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t span = d * (k - 1) + 1;  // the effective kernel
  int64_t out = floor_div(in + 2 * p - span + (ceil_mode ? s - 1 : 0), s) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;  // a window starting in the right padding only
  return out;
}

// The taps t of output o that exist, as the half-open range [*t_begin, *t_end) of (1). It is never
// empty without dilation (padding <= half the kernel and rule (2) see to that); with dilation it can
// be, and max_pool2d_geometry refuses such a geometry.
C10_HOST_DEVICE inline void valid_taps(int64_t o, int64_t in, int64_t k, int64_t s, int64_t p, int64_t d,
                                       int64_t* t_begin, int64_t* t_end) {
  const int64_t start = o * s - p;                        // input position of tap 0
  const int64_t b = start < 0 ? ceil_div(-start, d) : 0;  // first t with start + t*d >= 0
  const int64_t e = ceil_div(in - start, d);              // first t with start + t*d >= in
  *t_begin = b;
  *t_end = e < k ? e : k;
}

// The outputs whose window can hold input position i: o*s - p <= i <= o*s - p + d*(k-1), clipped to
// [0, out). With dilation a window in this range may still step over i; the backward checks the
// saved index, which is exact, so the range only has to contain every output that can pick i.
template <typename I>
C10_HOST_DEVICE inline void candidate_outputs(I i, I out, I k, I s, I p, I d, I* o_begin, I* o_end) {
  const I lo = ceil_div(i + p - d * (k - 1), s);  // o*s >= i + p - d*(k-1)
  const I hi = floor_div(i + p, s) + 1;           // o*s <= i + p
  *o_begin = lo > 0 ? lo : 0;
  *o_end = hi < out ? hi : out;
}

// Whether input position i lies in the span of output o's window, o*s - p <= i <= o*s - p + d*(k-1): the
// relation candidate_outputs inverts, asked the other way round (an output checking its saved index).
template <typename I>
C10_HOST_DEVICE inline bool in_window_span(I i, I o, I k, I s, I p, I d) {
  const I r = i - (o * s - p);
  return r >= 0 && r <= d * (k - 1);
}

}  // namespace pool
}  // namespace torch_cs231n
