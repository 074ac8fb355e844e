// Parallel elementwise maps out[i] = f(i) for the CPU kernels: compiled for AVX2 as well as the baseline
// (cpu_features.h), and with non-temporal ("streaming") stores for outputs larger than the cache.
//
// A normal store first reads the destination's cache line from memory (read-for-ownership), so an
// elementwise y = f(x) over tensors larger than the cache moves 3 bytes for every 2 it needs. Streaming
// stores write whole lines straight to memory, skipping that read. They also skip the cache, which is a
// loss when the result would still be in cache for the next op; so they are used only for outputs larger
// than the last-level cache, where nothing would stay there anyway. Measured on a 2-core AMD EPYC guest
// (32 MiB L3), ReLU forward then backward in a C++ loop: 5% faster with 100 MiB tensors, 2% with 25 MiB;
// but 7% slower with 19 MiB and 50% slower with 6 MiB, which is why the bar is the whole cache.
//
// The per-element function runs into a small buffer that stays in L1 (so the compiler vectorises the same
// scalar math the CUDA kernels call), and the buffer is then streamed out.
#pragma once

#include <ATen/Parallel.h>

#include "cpu/cpu_features.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace torch_cs231n {
namespace cpu {

// Bytes of the largest cache that CPU 0 reads from, as Linux reports it in sysfs ("32768K"). This is the
// share this core actually has. sysconf's figure can be the whole package's L3: 256 MiB on the 2-core
// AMD EPYC guest this was measured on, whose cores share one 32 MiB L3.
inline int64_t sysfs_last_level_cache_bytes() {
  int64_t best = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string path = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size";
    std::FILE* file = std::fopen(path.c_str(), "r");
    if (file == nullptr) break;
    long long value = 0;
    char unit = 0;
    const int got = std::fscanf(file, "%lld%c", &value, &unit);
    std::fclose(file);
    if (got < 1) continue;
    const int shift = unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
    best = std::max<int64_t>(best, static_cast<int64_t>(value) << shift);
  }
  return best;
}

// Bytes of the last-level cache: sysfs, else sysconf where the C library knows it, else 32 MiB.
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    const int64_t from_sysfs = sysfs_last_level_cache_bytes();
    if (from_sysfs > 0) return from_sysfs;
#ifdef _SC_LEVEL3_CACHE_SIZE
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l3 > 0) return static_cast<int64_t>(l3);
#endif
    return static_cast<int64_t>(32) << 20;
  }();
  return bytes;
}

// Copy n elements from an L1-resident buffer to dst with streaming stores where the CPU has them.
template <typename T>
inline void stream_out(T* dst, const T* src, int64_t n) {
#if defined(__SSE2__)
  int64_t i = 0;
  // Streaming stores need 16-byte aligned addresses: plain stores up to the first aligned one.
  while (i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0) {
    dst[i] = src[i];
    ++i;
  }
  char* out = reinterpret_cast<char*>(dst + i);
  const char* in = reinterpret_cast<const char*>(src + i);
  const int64_t bytes = (n - i) * static_cast<int64_t>(sizeof(T));
  int64_t b = 0;
  for (; b + 16 <= bytes; b += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(out + b), _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + b)));
  }
  std::memcpy(out + b, in + b, bytes - b);
#else
  std::memcpy(dst, src, n * sizeof(T));
#endif
}

// One thread's share of the map, [begin, end). Always inlined into the two versions below, so that the
// loop is vectorised for each one's instruction set.
template <typename T, typename F>
inline __attribute__((always_inline)) void map_range(T* out, int64_t begin, int64_t end, bool streaming, const F& f) {
  if (!streaming) {
    // Two vectors per iteration, as ATen's own vectorised loops do: with one, a lone core streaming
    // 6 MiB from the L3 ran up to 20% slower than torch's ReLU (2-core AMD EPYC guest).
#pragma GCC unroll 2
    for (int64_t i = begin; i < end; ++i) out[i] = f(i);
    return;
  }
  constexpr int64_t kBlock = 1024;  // 4-8 KiB: the buffer stays in L1
  alignas(64) T buffer[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t len = std::min(kBlock, end - start);
    for (int64_t j = 0; j < len; ++j) buffer[j] = f(start + j);
    stream_out(out + start, buffer, len);
  }
#if defined(__SSE2__)
  _mm_sfence();  // make the streamed lines visible before the parallel region ends
#endif
}

template <typename T, typename F>
void map_range_baseline(T* out, int64_t begin, int64_t end, bool streaming, const F& f) {
  map_range(out, begin, end, streaming, f);
}

template <typename T, typename F>
CS231N_AVX2 void map_range_avx2(T* out, int64_t begin, int64_t end, bool streaming, const F& f) {
  map_range(out, begin, end, streaming, f);
}

// out[i] = f(i) for i in [0, n), in parallel; with streaming stores when the output exceeds the
// last-level cache. f must be a pure function of the index (a lambda over csrc/common/ math).
template <typename T, typename F>
void parallel_map(T* out, int64_t n, int64_t grain, F f) {
  const bool streaming = n * static_cast<int64_t>(sizeof(T)) > last_level_cache_bytes();
  const bool avx2 = cpu_has_avx2_fma();
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    if (avx2) {
      map_range_avx2(out, begin, end, streaming, f);
    } else {
      map_range_baseline(out, begin, end, streaming, f);
    }
  });
}

// ---- maps in blocks of 32 elements, for ops that pack one bit per element into an int32 word ----

// The elements of words [w0, w1): word_fn(w, dst, len) writes the len (32, or fewer for the last word)
// outputs of word w, out[32 w, 32 w + len), to dst. Streaming as in map_range: whole words go through the
// L1 buffer.
constexpr int64_t kWord = 32;  // elements per word

template <typename T, typename F>
inline __attribute__((always_inline)) void map_words_range(T* out, int64_t n, int64_t w0, int64_t w1, bool streaming,
                                                           const F& word_fn) {
  auto len_of = [n](int64_t w) { return static_cast<int>(std::min(kWord, n - w * kWord)); };
  if (!streaming) {
    for (int64_t w = w0; w < w1; ++w) word_fn(w, out + w * kWord, len_of(w));
    return;
  }
  constexpr int64_t kBlockWords = 32;  // 1024 elements: the buffer stays in L1
  alignas(64) T buffer[kBlockWords * kWord];
  for (int64_t start = w0; start < w1; start += kBlockWords) {
    const int64_t stop = std::min(w1, start + kBlockWords);
    int64_t len = 0;
    for (int64_t w = start; w < stop; ++w) {
      const int l = len_of(w);
      word_fn(w, buffer + len, l);
      len += l;
    }
    stream_out(out + start * kWord, buffer, len);
  }
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// flatten: word_fn must be inlined, so that it is compiled for each one's instruction set. Left to its
// heuristics, GCC once called a word function with two branches out of line (baseline code, one call
// per 32 elements): 60x slower.
template <typename T, typename F>
__attribute__((flatten)) void map_words_range_baseline(T* out, int64_t n, int64_t w0, int64_t w1, bool streaming,
                                                       const F& f) {
  map_words_range(out, n, w0, w1, streaming, f);
}

template <typename T, typename F>
CS231N_AVX2 __attribute__((flatten)) void map_words_range_avx2(T* out, int64_t n, int64_t w0, int64_t w1,
                                                               bool streaming, const F& f) {
  map_words_range(out, n, w0, w1, streaming, f);
}

// parallel_map by words of 32 elements: word_fn(w, dst, len) as in map_words_range, for every word of
// n elements, in parallel (grain in words).
template <typename T, typename F>
void parallel_map_words(T* out, int64_t n, int64_t grain_words, F word_fn) {
  const bool streaming = n * static_cast<int64_t>(sizeof(T)) > last_level_cache_bytes();
  const bool avx2 = cpu_has_avx2_fma();
  const int64_t words = (n + kWord - 1) / kWord;
  at::parallel_for(0, words, grain_words, [&](int64_t w0, int64_t w1) {
    if (avx2) {
      map_words_range_avx2(out, n, w0, w1, streaming, word_fn);
    } else {
      map_words_range_baseline(out, n, w0, w1, streaming, word_fn);
    }
  });
}

}  // namespace cpu
}  // namespace torch_cs231n
