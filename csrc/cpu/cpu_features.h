// Run-time choice of instruction set for hot CPU loops.
//
// The extension is compiled for the baseline x86-64 ISA (SSE2: 4 floats per instruction). Hot loops are
// compiled a second time for AVX2+FMA (8 floats, fused multiply-add) with CS231N_AVX2, and chosen at run
// time when the CPU has them; elsewhere (other CPUs, other compilers) the baseline runs. A function
// without target attributes (the per-element math of csrc/common/) inlines into either version.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CS231N_AVX2 __attribute__((target("avx2,fma")))
namespace torch_cs231n {
namespace cpu {
inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
}  // namespace cpu
}  // namespace torch_cs231n
#else
#define CS231N_AVX2
namespace torch_cs231n {
namespace cpu {
inline bool cpu_has_avx2_fma() { return false; }
}  // namespace cpu
}  // namespace torch_cs231n
#endif
