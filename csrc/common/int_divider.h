// Division by a divisor fixed for a whole kernel, as a multiply-high, an add and a shift. A GPU has no
// integer divider: `n / d` there is a software routine of about 20 instructions in 32 bits and over 60 in
// 64, which the implicit-GEMM kernels (cuda/conv2d_implicit_gemm.cuh) would otherwise run for every stage
// that decodes a position k = (sample, row, column). Plain integer arithmetic with no torch type in it, so
// that the kernels' CPU emulation (tests/cuda_emulation/) compiles it, and its test proves it there.
//
// The method (Granlund and Montgomery, "Division by invariant integers using multiplication", 1994): for
// 1 <= d < 2^31 let s = ceil(log2 d), so that 2^(s-1) < d <= 2^s, and
//     m' = floor(2^(32+s) / d) + 1 = 2^(32+s) / d + e,   0 < e <= 1.
// Then for 0 <= n < 2^31
//     n * m' / 2^(32+s) = n/d + n*e / 2^(32+s),   where   n*e / 2^(32+s) < 2^31 / 2^(32+s) = 1 / 2^(s+1) <= 1/(2d)
// and the fractional part of n/d is at most 1 - 1/d, so floor(n * m' / 2^(32+s)) = floor(n / d). m' needs
// 33 bits; its low 32 bits m = m' - 2^32 are stored, and
//     floor(n * m' / 2^32) = umulhi(n, m) + n   (< 2^32, as umulhi(n, m) < n < 2^31),
// shifted right by s, is the quotient.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace torch_cs231n {

struct IntDivider {
  uint32_t divisor = 1, magic = 0, shift = 0;

  IntDivider() = default;
  // 1 <= d < 2^31 (the caller checks)
  explicit IntDivider(uint32_t d) : divisor(d) {
    while ((uint64_t(1) << shift) < d) ++shift;
    magic = static_cast<uint32_t>((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d) / d + 1);
  }

  // n / d for 0 <= n < 2^31. Larger n give some value and no undefined behaviour: callers test such n
  // (a negative position seen as unsigned) against a bound before they use the quotient.
  C10_HOST_DEVICE uint32_t quotient(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t high = __umulhi(n, magic);
#else
    const uint32_t high = static_cast<uint32_t>((uint64_t(n) * magic) >> 32);
#endif
    return (high + n) >> shift;
  }
};

}  // namespace torch_cs231n
