// The CPU convolution: how the batch is cut among threads and into GEMMs, and what the kernels share.
// Part of the CPU convolution (cpu/conv2d.cpp, which routes each layer; docs/conv2d.md has the table).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/conv2d.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"

namespace torch_cs231n {
namespace conv2d_cpu {

using cpu::cpu_has_avx2_fma;  // the depthwise loops come in a baseline and an AVX2+FMA version

// Elements per parallel task for the memory-bound loops.
constexpr int64_t kGrain = 1 << 14;

// Sample ranges: the batch cut into one chunk per thread (fewer when N is small), or a single chunk when
// the whole convolution is too small to pay for waking another thread (gradcheck-sized inputs, for one).
// With a single chunk the GEMMs split their columns among the threads instead. The backward sums its
// per-chunk weight gradients in chunk order, so the result is deterministic for a given thread count.
// Small images (fewer than kMinPixelsPerSample outputs: ResNet's 8x8 and 4x4 stages) go as one chunk
// too: all their samples side by side make one GEMM, which splits its filters among the threads, so the
// filters (large in those layers) are packed and read once, not once per thread.
constexpr int64_t kMinParallelMacs = int64_t(1) << 17;
constexpr int64_t kMinPixelsPerSample = 128;
inline int64_t chunk_count(const Conv2dGeometry& g) {
  const int64_t macs = g.n * g.f * g.c_per_group() * g.taps() * g.col_cols();
  if (macs < kMinParallelMacs || g.col_cols() < kMinPixelsPerSample) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(g.n, at::get_num_threads()));
}
inline int64_t chunk_begin(int64_t chunk, int64_t chunks, int64_t n) { return chunk * n / chunks; }

// f(cb, ce) over the chunks [0, chunks) among the threads, as at::parallel_for(0, chunks, 1, f), except
// that a single chunk runs on the calling thread outside any parallel region, so that the GEMMs in it
// split among the threads as said above: inside at::parallel_for even one chunk, run serially, marks its
// region parallel, and they ran on one thread (a batch-1 (1, 256, 14, 14) 3x3 layer took as long on two
// threads as on one).
template <typename F>
void for_chunks(int64_t chunks, const F& f) {
  if (chunks == 1) {
    f(int64_t(0), int64_t(1));
    return;
  }
  at::parallel_for(0, chunks, 1, f);
}

// f(grp) for each of the layer's groups. With at least as many groups as threads they go among the threads,
// each group's product then on one (a group's product is small: ResNeXt's groups of 16 channels at
// batch 1 made products too small to split, and ran on one thread); otherwise one after the other, each
// product splitting itself. Inside a parallel region (a chunk of samples a thread) on the calling thread.
template <typename F>
void for_each_group(const Conv2dGeometry& g, const F& f) {
  if (g.groups > 1 && g.groups >= at::get_num_threads()) {
    at::parallel_for(0, g.groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t grp = g0; grp < g1; ++grp) f(grp);
    });
    return;
  }
  for (int64_t grp = 0; grp < g.groups; ++grp) f(grp);
}

// The batch cut into chunks among the threads for the kernels that walk a sample's output rows with state
// of their own (conv2d_depthwise.h's row taps, the bfloat16 forwards' padded sample): whole samples, a chunk a thread;
// or, with fewer samples than threads (batch-1 inference, where one sample was all one thread's), each sample's `rows`
// rows in bands, a chunk a band.
struct SampleBands {
  int64_t n, rows, bands, chunks;
  SampleBands(int64_t samples, int64_t rows_) : n(samples), rows(rows_) {
    const int64_t threads = at::get_num_threads();
    bands = n == 0 || n >= threads || rows <= 1 ? 1 : std::min<int64_t>(rows, (threads + n - 1) / n);
    chunks = bands > 1 ? n * bands : std::max<int64_t>(1, std::min<int64_t>(n, threads));
  }
  // Chunk `chunk`'s samples [n0, n1), and the rows [r0, r1) of each.
  void of(int64_t chunk, int64_t* n0, int64_t* n1, int64_t* r0, int64_t* r1) const {
    if (bands == 1) {
      *n0 = chunk_begin(chunk, chunks, n), *n1 = chunk_begin(chunk + 1, chunks, n), *r0 = 0, *r1 = rows;
      return;
    }
    const int64_t band = chunk % bands;
    *n0 = chunk / bands, *n1 = *n0 + 1;
    *r0 = chunk_begin(band, bands, rows), *r1 = chunk_begin(band + 1, bands, rows);
  }
};

// The d_W of each chunk of samples, then their sum, added in chunk order: deterministic for a given
// thread count. The chunks' buffers are the calling thread's scratch, kept from call to call (a fresh
// 5 MiB came back one page fault per 4 KiB, and zeroing it cost as much again: 1 ms of a 9 ms d_W); a
// chunk's first product writes its buffer (accumulate = false), the later ones add to it.
template <typename T>
struct ChunkPartials {
  T* data;
  int64_t size;  // elements of one chunk's d_W

  ChunkPartials(int64_t chunks, int64_t size_)
      : data(cpu::thread_scratch<T>(cpu::Scratch::kPartial, chunks * size_)), size(size_) {}
  T* of(int64_t chunk) const { return data + chunk * size; }

  // out[i] = Σ_chunk of(chunk)[i], in parallel over i (nothing to do for one chunk summed into itself).
  void sum_into(int64_t chunks, T* out) const {
    if (chunks == 1 && out == data) return;
    at::parallel_for(0, size, 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T sum = data[i];
        for (int64_t chunk = 1; chunk < chunks; ++chunk) sum += data[chunk * size + i];
        out[i] = sum;
      }
    });
  }
};

// Samples per GEMM: enough columns (nb*oH*oW) that the micro-kernel's 48-column slivers are mostly
// full (a 14x14 output alone fills 4 of 5), bounded so that the d_col buffer of the strided backward
// stays under kColumnBudget elements (it never grows with N).
constexpr int64_t kMinColumns = 512;
constexpr int64_t kColumnBudget = int64_t(1) << 21;  // 8 MiB in float32
inline int64_t block_size(const Conv2dGeometry& g, int64_t chunk_len) {
  const int64_t by_target = (kMinColumns + g.col_cols() - 1) / g.col_cols();
  const int64_t by_budget = kColumnBudget / std::max<int64_t>(1, g.col_rows() * g.col_cols());
  return std::max<int64_t>(1, std::min({chunk_len, by_target, by_budget}));
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
