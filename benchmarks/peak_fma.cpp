// The machine's float32 FMA peak, for the benchmark tables: each thread runs independent chains of fused
// multiply-adds on full-width vectors, more chains than the FMA latency times the FMA pipes (so the pipes,
// not the latency, bound it), on data in registers (no memory traffic). Built by benchmarks/peak.py for
// the widest vectors this CPU has; 2 flops per lane per FMA.
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec splat(float x) { return _mm512_set1_ps(x); }
inline float first(Vec v) { return _mm512_cvtss_f32(v); }
#else
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec splat(float x) { return _mm256_set1_ps(x); }
inline float first(Vec v) { return _mm256_cvtss_f32(v); }
#endif

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const long iterations = 200000000L / kLanes;
  constexpr int kChains = 12;  // > 2 pipes x 4 cycles of latency on Zen 4/5 and recent Intel cores
  double best = 0;
  for (int round = 0; round < 5; ++round) {
    float sink = 0;
    const auto start = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      Vec acc[kChains];
      for (int i = 0; i < kChains; ++i) acc[i] = splat(1.0f + i * 1e-3f);
      const Vec a = splat(0.999999f), b = splat(1e-7f);
      for (long it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
        for (int i = 0; i < kChains; ++i) acc[i] = fma(acc[i], a, b);
      }
      for (int i = 0; i < kChains; ++i) sink += first(acc[i]);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double gflops = 2.0 * kLanes * kChains * iterations * threads / seconds / 1e9;
    if (gflops > best) best = gflops;
    if (sink == 12345.f) std::fprintf(stderr, "%f\n", sink);  // keeps the chains alive
  }
  std::printf("%.1f\n", best);
  return 0;
}
