// Run-time choice of instruction set for hot CPU loops.
//
// The extension is compiled for the baseline x86-64 ISA (SSE2: 4 floats per instruction). Hot code is
// compiled again for AVX2+FMA (8 floats, fused multiply-add; CS231N_AVX2) and, for the GEMM micro-kernel,
// for AVX-512 F/BW/VL (16 floats, 32 registers; CS231N_AVX512), and chosen at run time from what the
// CPU reports, never from the build machine. A function without target attributes (the per-element maths
// of csrc/common/) inlines into either version. Above AVX-512 stands AMX (Intel's tile unit, Sapphire
// Rapids and later: 16 x 16 float32 sums of bfloat16 products per instruction; CS231N_AMX), which only the
// bfloat16 convolution uses (cpu/conv2d_amx.h): the level "amx" is AVX-512 with the tiles allowed.
//
// The choice can be lowered, never raised above what the CPU has, so that tests run every path on one
// machine: the environment variable TORCH_CS231N_CPU_ISA (read once, at the first call) or the op
// torch.ops.torch_cs231n.set_cpu_isa ("amx", "avx512", "avx2", "baseline" or "auto").
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CS231N_X86 1
#define CS231N_AVX2 __attribute__((target("avx2,fma")))
#define CS231N_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define CS231N_F16C __attribute__((target("avx,f16c")))
#define CS231N_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))
#define CS231N_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi2,avx2,fma")))
#else
#define CS231N_X86 0
#define CS231N_AVX2
#define CS231N_AVX512
#define CS231N_F16C
#define CS231N_AVX512_BF16
#define CS231N_AMX
#endif

// A body shared by the versions of a loop: always inlined, so that it is compiled with its caller's ISA.
#define CS231N_INLINE inline __attribute__((always_inline))

namespace torch_cs231n {
namespace cpu {

// The mask of the first `lanes` of a vector's 16 (none below 0, all above 16): an AVX-512 __mmask16 for a
// tile's last, partial vector of floats.
inline uint16_t lane_mask(int lanes) { return static_cast<uint16_t>((1u << std::clamp(lanes, 0, 16)) - 1u); }

// Ordered: a path may run wherever the CPU has at least its level.
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAmx ? "amx" : isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "baseline";
}

// AMX with bfloat16 products, usable by this process: the CPU has the tiles (cpuid leaf 7: AMX-TILE and
// AMX-BF16), the OS saves them (XCR0 bits 17 and 18), and Linux has granted this process their 8 KiB of
// state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA; without it the first tile instruction is SIGILL).
inline bool amx_bf16_usable() {
#if CS231N_X86 && defined(__linux__)
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  const bool amx = (d >> 24 & 1) && (d >> 22 & 1);  // AMX-TILE, AMX-BF16
  // (the kernels' AVX-512 part: every CPU with the tiles has these, but the target attribute names them)
  if (!amx || !__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512dq") ||
      !__builtin_cpu_supports("avx512vbmi2")) {
    return false;
  }
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo >> 17 & 3) != 3) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

// What the CPU can run (cpuid through the compiler's runtime; the OS's saving of the wide registers
// included).
inline Isa detected_isa() {
#if CS231N_X86
  static const Isa isa = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("fma"))
      return amx_bf16_usable() ? Isa::kAmx : Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

// float16 <-> float32 conversion instructions (F16C; every x86-64 CPU with AVX2 has them, but it is asked).
inline bool has_f16c() {
#if CS231N_X86
  static const bool yes = __builtin_cpu_supports("f16c");
  return yes;
#else
  return false;
#endif
}

// AVX512-BF16 (vdpbf16ps: pairs of bfloat16 products summed into float32 lanes). Zen 4 and later, Cooper
// Lake and Sapphire Rapids have it. Only taken where the ISA in force (below) is AVX-512.
inline bool has_avx512_bf16() {
#if CS231N_X86
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}

// Parses "amx" / "avx512" / "avx2" / "baseline"; false for anything else.
inline bool parse_isa(const char* text, Isa* out) {
  for (Isa isa : {Isa::kAmx, Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (std::strcmp(text, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

// The cap set by the user (-1: none). Starts from TORCH_CS231N_CPU_ISA; a value that names no ISA (nor
// "auto") is ignored with a warning, not silently.
inline std::atomic<int>& isa_cap() {
  static std::atomic<int> cap{[] {
    const char* env = std::getenv("TORCH_CS231N_CPU_ISA");
    Isa isa;
    if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return -1;
    if (parse_isa(env, &isa)) return static_cast<int>(isa);
    std::fprintf(stderr,
                 "torch_cs231n: TORCH_CS231N_CPU_ISA='%s' is not one of amx, avx512, avx2, baseline or auto; "
                 "ignored\n",
                 env);
    return -1;
  }()};
  return cap;
}

// The level in force: what the CPU has, lowered to the cap if one is set (kAmx included).
inline Isa cpu_level() {
  const int cap = isa_cap().load(std::memory_order_relaxed);
  const Isa have = detected_isa();
  return cap >= 0 && cap < static_cast<int>(have) ? static_cast<Isa>(cap) : have;
}

// The vector instruction set the kernels use (AVX-512 at most: the tiles are asked for by cpu_amx()).
inline Isa cpu_isa() {
  const Isa level = cpu_level();
  return level == Isa::kAmx ? Isa::kAvx512 : level;
}

// Whether the bfloat16 convolution may use the AMX tiles.
inline bool cpu_amx() { return cpu_level() == Isa::kAmx; }

inline bool cpu_has_avx2_fma() { return cpu_isa() >= Isa::kAvx2; }

// f() compiled again for the instruction set in force: `flatten` inlines f and everything it calls into a
// function built for AVX2 or AVX-512, so one body of plain loops (left to the vectoriser) serves all three.
// Templates f instantiates out of line keep the baseline ISA, so no AVX code leaks into shared symbols.
template <typename F>
CS231N_AVX512 __attribute__((flatten)) void run_avx512(const F& f) {
  f();
}
template <typename F>
CS231N_AVX2 __attribute__((flatten)) void run_avx2(const F& f) {
  f();
}
template <typename F>
inline void with_best_isa(const F& f) {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return run_avx512(f);
    case Isa::kAvx2:
      return run_avx2(f);
    default:
      return f();
  }
}

}  // namespace cpu
}  // namespace torch_cs231n
