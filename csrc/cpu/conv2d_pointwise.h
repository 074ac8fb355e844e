// The CPU convolution of 1 x 1 layers in channels_last: whole-batch matrix products. Part of the CPU
// convolution (cpu/conv2d.cpp, which routes each layer; docs/conv2d.md has the table).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/conv2d.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/conv2d_pixels.h"
#include "cpu/gemm.h"

namespace torch_cs231n {
namespace conv2d_cpu {

// A 1 x 1 layer of stride 1 without padding and of one group (MobileNetV2's expansions and projections,
// ResNet-50's bottlenecks), in NHWC. Every pixel of every sample is a row of X [P x C], P = N·H·W, as
// the tensor lies, and the layer is a product over the channels:
//     Y   [P x F] = X · Wᵀ + b          the forward
//     d_X [P x C] = dY · W              its transposed convolution, a 1 x 1 layer too
//     d_W [F x C] = dYᵀ · X             a sum over all P rows
// One product for the whole batch: no padded copy, no loop over the samples, and the small images
// (MobileNetV2's 8 x 8 and 4 x 4 stages, 16 and 64 rows a sample) make products as long as the large ones.
inline bool pointwise_nhwc(const Conv2dGeometry& g) { return g.groups == 1 && conv2d_is_pointwise(g); }

// Y = X · B by the filters of w (filter_segments: Wᵀ, or when `transposed` W itself, for d_X = dY · W;
// g is the convolution that runs), + b; the rows split among the threads (gemm_segments).
template <typename T>
void pointwise_forward_nhwc(const T* x, const at::Tensor& w, bool transposed, const T* b, T* y,
                            const Conv2dGeometry& g) {
  cpu::GemmEpilogue<T> ep;
  ep.col_bias = b;
  if (!transposed && g.c < 32) {
    // k = C under 32: too short for gemm_segments' per-tap setup, while the plain GEMM's 8 x 48 tiles run
    // F = 96 or 144 whole ((16, 16, 64, 64) -> 96: 1.2 -> 0.9 ms)
    const cpu::MatrixView<T> wt = {w.const_data_ptr<T>(), w.stride(1), w.stride(0)};
    cpu::gemm<T>(g.n * g.h * g.w, g.f, g.c, {x, g.c, 1}, wt, y, g.f, ep);
    return;
  }
  const FilterSegments<T> filters = filter_segments<T>(w, transposed, g);
  cpu::gemm_segments<T>(g.n * g.h * g.w, &x, g.c, filters.groups[0], y, g.f, ep);
}

// d_W = dYᵀ · X, its rows cut into one chunk per thread, each chunk's product summed in chunk order
// (deterministic for a given thread count). On AVX-512 (float32) as d_Wᵀ = Xᵀ · dY with neither operand
// copied (cpu::gemm_gather_a: row c of Xᵀ starts at channel c, column p is pixel p's, p·C further on;
// dY's rows as they lie), in tiles shaped to F: (16, 32, 64, 64) -> 16, whose packed F = 16 rows and 32
// columns filled a third of the 8 x 48 tiles, 0.49 -> 0.3 ms. Elsewhere packed, the GEMM's columns the
// larger of C and F, its rows the smaller (d_Wᵀ = Xᵀ · dY when C < F); d_Wᵀ is transposed at the end.
constexpr int64_t kFewPixels = 1024, kManyChannels = int64_t(1) << 18;
template <typename T>
void pointwise_weight_grad_nhwc(const T* dy, const T* x, T* dw, const Conv2dGeometry& g) {
  const int64_t rows = g.n * g.h * g.w;
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>({rows * g.c * g.f / kMinParallelMacs, rows, at::get_num_threads()}));
  const ChunkPartials<T> partial(chunks, g.f * g.c);
  // (at 16 channels the gathered product was twice the packed one's time: (16, 16, 64, 64) -> 96, 1.9
  // against 0.96 ms; from 24 on it is faster, (16, 24, 32, 32) -> 144 0.52 -> 0.34)
  const bool gather = std::is_same_v<T, float> && cpu::gather_a_available() && g.c >= 24;
  const bool filters_as_rows = !gather && g.f <= g.c;
  // column p of Xᵀ from its row's start, for a block of kBlock pixels at a time (a chunk's table would
  // grow with the batch)
  constexpr int64_t kBlock = 4096;
  std::vector<int64_t> pixel_at(gather ? kBlock : 0);
  for (int64_t p = 0; p < static_cast<int64_t>(pixel_at.size()); ++p) pixel_at[p] = p * g.c;
  if (rows <= kFewPixels && g.c * g.f >= kManyChannels) {
    // Few pixels and many channels (the 1 x 1 layers of ResNet's and ResNeXt's last stages, 8 x 8 and 4 x 4
    // at 128 x 128): each chunk's partial d_W would be as large as its share of the inputs, and the
    // gathered product ran at a third of the peak there. One packed product d_Wᵀ = Xᵀ · dY, its rows
    // split among the threads: (16, 1024, 8, 8) -> 1024 24.9 -> 23.1 ms (oneDNN 24.3), (16, 2048, 4, 4)
    // -> 1024 20.0 -> 14.3 (15.8), same process, alternating.
    T* dw_t = partial.of(0);  // [C x F]
    cpu::gemm<T>(g.c, g.f, rows, cpu::MatrixView<T>{x, 1, g.c}, cpu::MatrixView<T>{dy, g.f, 1}, dw_t, g.f);
    cpu::transpose_matrix(dw_t, g.f, g.c, g.f, dw, g.c);  // [C x F] -> [F x C]
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<const T*> channel(gather ? g.c : 0);  // where each row of the chunk's Xᵀ starts
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t r0 = chunk_begin(chunk, chunks, rows), r1 = chunk_begin(chunk + 1, chunks, rows);
      if constexpr (std::is_same_v<T, float>) {
        if (gather) {
          for (int64_t q0 = r0; q0 < r1 || q0 == r0; q0 += kBlock) {  // one call, k = 0, for an empty chunk
            const int64_t q1 = std::min(r1, q0 + kBlock);
            for (int64_t c = 0; c < g.c; ++c) channel[c] = x + q0 * g.c + c;
            cpu::GemmEpilogue<T> ep;
            ep.accumulate = q0 > r0;
            cpu::gemm_gather_a(g.c, g.f, q1 - q0, channel.data(), pixel_at.data(), dy + q0 * g.f, g.f,
                               partial.of(chunk), g.f, ep);
          }
          continue;
        }
      }
      const cpu::MatrixView<T> dy_t{dy + r0 * g.f, 1, g.f}, x_t{x + r0 * g.c, 1, g.c};  // dYᵀ, Xᵀ
      const cpu::MatrixView<T> x_rows{x + r0 * g.c, g.c, 1}, dy_rows{dy + r0 * g.f, g.f, 1};
      if (filters_as_rows) {
        cpu::gemm<T>(g.f, g.c, r1 - r0, dy_t, x_rows, partial.of(chunk), g.c);
      } else {
        cpu::gemm<T>(g.c, g.f, r1 - r0, x_t, dy_rows, partial.of(chunk), g.f);
      }
    }
  });
  if (filters_as_rows) {  // [F x C]: W's memory in either layout
    partial.sum_into(chunks, dw);
    return;
  }
  partial.sum_into(chunks, partial.of(0));
  cpu::transpose_matrix(partial.of(0), g.f, g.c, g.f, dw, g.c);  // [C x F] -> [F x C]
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
