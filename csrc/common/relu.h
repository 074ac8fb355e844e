// ReLU's per-element math, called by the CPU loop (cpu/relu.cpp) and the CUDA kernel (cuda/relu.cu).
//
//   forward   y = max(x, 0)                 NaN passes through, as in torch: relu(nan) = nan
//   backward  dx = dy * [y > 0]             the gradient at 0 is 0 (torch's threshold_backward)
//
// Written as `x < 0 ? 0 : x` and `y <= 0 ? 0 : dy`: a NaN compares false, so it is kept, -0 stays -0 as in
// torch on the CPU (max(-0, 0) is its first argument), and the single compare keeps the CPU loop
// vectorisable. torch's CUDA kernel returns +0 for -0 instead; so does relu_value_cuda, each backend
// giving its own torch's bits (seen on an H200: test_special_values_bit_for_bit).
//
// Under autograd the forward also packs the mask [x > 0] (NaN counted as kept, as above) into bits, and
// the backward reads those bits instead of y: 1 bit per element rather than 32 (float) or 64 (double),
// so the backward moves about a third fewer bytes. Bit j of mask word w belongs to the element at memory
// offset 32 * w + j of the output.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace torch_cs231n {

template <typename T>
C10_HOST_DEVICE inline T relu_value(T x) {
  return x < T(0) ? T(0) : x;
}

// dy masked by the forward's output y (not its input): y > 0 exactly where x > 0.
template <typename T>
C10_HOST_DEVICE inline T relu_grad(T dy, T y) {
  return y <= T(0) ? T(0) : dy;
}

// ---- the bit-packed mask ----
constexpr int kReluMaskBits = 32;  // elements per mask word (an int32)

// Mask words for n elements: ceil(n / 32).
C10_HOST_DEVICE inline int64_t relu_mask_words(int64_t n) { return (n + kReluMaskBits - 1) / kReluMaskBits; }

// Whether x passes the ReLU, so its gradient passes too: the same test as relu_value and relu_grad.
template <typename T>
C10_HOST_DEVICE inline bool relu_keeps(T x) {
  return !(x <= T(0));
}

// ReLU as torch's CUDA kernel computes it: x where it passes (relu_keeps: x > 0 or NaN), +0 elsewhere, -0
// included.
template <typename T>
C10_HOST_DEVICE inline T relu_value_cuda(T x) {
  return relu_keeps(x) ? x : T(0);
}

// float: ptxas compiles `keep ? x : 0`, even as a select or a mask of x's bits, into FMNMX.NAN, whose NaN is
// the canonical 0x7fffffff rather than x's own bits (seen on an H200; torch keeps them). Written as torch's
// kernel is, NaN by its own select and the rest by fmaxf (which gives +0 for -0), the SASS keeps them
// (checked for sm_90: no FMNMX.NAN in the float kernels).
C10_HOST_DEVICE inline float relu_value_cuda(float x) {
#ifdef __CUDA_ARCH__
  return isnan(x) ? x : fmaxf(x, 0.f);
#else
  return relu_keeps(x) ? x : 0.f;
#endif
}

// dy masked by bit `bit` of a mask word: relu_grad(dy, y) with [y > 0] read from the mask.
template <typename T>
C10_HOST_DEVICE inline T relu_grad_from_mask(T dy, uint32_t word, int bit) {
  return ((word >> bit) & 1u) != 0u ? dy : T(0);
}

// ---- float16 and bfloat16 by their bits ----
// A CPU without F16C converts float16 in software, a dozen instructions a value; ReLU needs no
// conversion at all. With b the 16 bits of x and E the exponent mask (0x7c00 for float16, 0x7f80 for
// bfloat16): x is NaN when (b & 0x7fff) > E. x < 0 exactly when its sign bit is set and 0 < (b & 0x7fff) <= E
// (not -0, not NaN): relu_value gives +0 (bits 0) then, and x's own bits otherwise. x <= 0 adds the zeros,
// so relu_keeps(x) = NaN or (b != 0 and no sign bit). The same results as relu_value and relu_keeps above.
template <uint16_t kExponentMask>
C10_HOST_DEVICE inline uint16_t relu_bits_value(uint16_t b) {
  const uint16_t magnitude = b & 0x7fffu;
  return (b & 0x8000u) != 0 && magnitude != 0 && magnitude <= kExponentMask ? uint16_t(0) : b;
}

template <uint16_t kExponentMask>
C10_HOST_DEVICE inline bool relu_bits_keep(uint16_t b) {
  return (b & 0x7fffu) > kExponentMask || (b != 0 && (b & 0x8000u) == 0);
}

}  // namespace torch_cs231n
