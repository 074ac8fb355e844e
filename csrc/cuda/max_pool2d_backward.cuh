// Max-pool backward on CUDA without 64-bit divisions: cuda/max_pool2d.cu's default since they passed
// `make gpu-check` on an H200 (TORCH_CS231N_CUDA_POOL_BACKWARD=lines chooses the line kernel instead).
//
// The line kernel (cuda/max_pool2d.cu) gathers, for each input i, over the outputs whose window can hold it, rule (3)
// of common/max_pool2d.h:  dx[i] = Σ_{o : i in window(o), ind[o] = i} dy[o].  It finds those outputs with 64-bit
// divisions per element, a long software routine on a GPU; on the H200 its backward took 1.67 ms where torch's took
// 0.97. Two forms here:
//   scatter  when windows do not overlap ((k-1)·d + 1 <= s on both axes: 2x2 stride 2, the common case),
//            each input lies in at most one window, so the sum has at most one term: dx is zeroed and
//            each output writes dy[o] to dx[ind[o]], if ind[o] lies in its window's span (the gather's
//            condition). No two outputs write one element: deterministic, without atomics.
//   gather   the same gather as the line kernel, flat over the inputs.
// Both decode a flat index with divisions of the index type, 32-bit wherever every index the grid-stride
// loop forms (the last step's overshoot included) stays below 2^31. Like the other emulatable headers, it
// has no torch type: tests/cuda_emulation/ runs it on the CPU.
#pragma once

#include <cstdint>

#include "common/max_pool2d_index.h"
#include "cuda/emulatable.cuh"

namespace torch_cs231n {
namespace cuda {
namespace max_pool {

constexpr int kThreads = 256;

// The pooling's geometry, by value into the kernels.
struct Params {
  int64_t channels, height, width, out_h, out_w;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// No input lies in two windows.
inline bool windows_disjoint(const Params& p) { return (p.kh - 1) * p.dh + 1 <= p.sh && (p.kw - 1) * p.dw + 1 <= p.sw; }

// (n, c, h, w) of a flat index into a dense (N, C, rows, cols) tensor, NCHW or NHWC.
template <typename index_t>
struct Position {
  index_t n, c, h, w;
};
template <typename index_t, bool kChannelsLast>
__host__ __device__ inline Position<index_t> position(index_t idx, index_t C, index_t rows, index_t cols) {
  Position<index_t> q;
  if (kChannelsLast) {
    q.c = idx % C;
    idx /= C;
    q.w = idx % cols;
    idx /= cols;
    q.h = idx % rows;
    q.n = idx / rows;
  } else {
    q.w = idx % cols;
    idx /= cols;
    q.h = idx % rows;
    idx /= rows;
    q.c = idx % C;
    q.n = idx / C;
  }
  return q;
}
template <typename index_t, bool kChannelsLast>
__host__ __device__ inline index_t flat(index_t n, index_t c, index_t h, index_t w, index_t C, index_t rows,
                                        index_t cols) {
  return kChannelsLast ? ((n * rows + h) * cols + w) * C + c : ((n * C + c) * rows + h) * cols + w;
}

// Scatter over the outputs (windows disjoint; dx zeroed beforehand).
template <typename T, bool kChannelsLast, typename index_t>
__global__ void scatter_kernel(const T* __restrict__ dy, const int64_t* __restrict__ ind, T* __restrict__ dx,
                               index_t outputs, Params p) {
  const index_t C = p.channels, H = p.height, W = p.width, OH = p.out_h, OW = p.out_w;
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t o = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < outputs; o += step) {
    const int64_t k = ind[o];
    if (k < 0 || k >= static_cast<int64_t>(H) * W) continue;  // not an index of this plane: nothing to write
    const Position<index_t> q = position<index_t, kChannelsLast>(o, C, OH, OW);
    const index_t ih = static_cast<index_t>(k) / W, iw = static_cast<index_t>(k) % W;
    if (pool::in_window_span<index_t>(ih, q.h, p.kh, p.sh, p.ph, p.dh) &&
        pool::in_window_span<index_t>(iw, q.w, p.kw, p.sw, p.pw, p.dw)) {
      dx[flat<index_t, kChannelsLast>(q.n, q.c, ih, iw, C, H, W)] = dy[o];
    }
  }
}

// Gather over the inputs, rule (3), over pool::candidate_outputs (the line kernel's range, in index_t).
template <typename T, typename Acc, bool kChannelsLast, typename index_t>
__global__ void gather_kernel(const T* __restrict__ dy, const int64_t* __restrict__ ind, T* __restrict__ dx,
                              index_t inputs, Params p) {
  const index_t C = p.channels, H = p.height, W = p.width, OH = p.out_h, OW = p.out_w;
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < inputs; i += step) {
    const Position<index_t> q = position<index_t, kChannelsLast>(i, C, H, W);
    index_t oh0, oh1, ow0, ow1;
    pool::candidate_outputs<index_t>(q.h, OH, p.kh, p.sh, p.ph, p.dh, &oh0, &oh1);
    pool::candidate_outputs<index_t>(q.w, OW, p.kw, p.sw, p.pw, p.dw, &ow0, &ow1);
    const int64_t target = static_cast<int64_t>(q.h) * W + q.w;
    Acc sum = Acc(0);
    for (index_t oh = oh0; oh < oh1; ++oh) {
      for (index_t ow = ow0; ow < ow1; ++ow) {
        const index_t o = flat<index_t, kChannelsLast>(q.n, q.c, oh, ow, C, OH, OW);
        if (ind[o] == target) sum += static_cast<Acc>(dy[o]);
      }
    }
    dx[i] = static_cast<T>(sum);
  }
}

// The grid of a grid-stride loop over n items: at most `cap` blocks.
inline dim3 grid_for(int64_t n, int64_t cap) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks)));
}

// dx from dy and the forward's indices, all dense in one layout: N planes of C channels. For the scatter, dx
// must hold zeros. `cap`: blocks enough to fill the GPU.
template <typename T, typename Acc, bool kChannelsLast, typename index_t>
void backward(const T* dy, const int64_t* ind, T* dx, int64_t batch, const Params& p, int64_t cap,
              cudaStream_t stream) {
  if (windows_disjoint(p)) {
    const int64_t outputs = batch * p.channels * p.out_h * p.out_w;
    auto* kernel = &scatter_kernel<T, kChannelsLast, index_t>;
    TORCH_CS231N_LAUNCH(kernel, grid_for(outputs, cap), kThreads, stream, dy, ind, dx, static_cast<index_t>(outputs),
                        p);
  } else {
    const int64_t inputs = batch * p.channels * p.height * p.width;
    auto* kernel = &gather_kernel<T, Acc, kChannelsLast, index_t>;
    TORCH_CS231N_LAUNCH(kernel, grid_for(inputs, cap), kThreads, stream, dy, ind, dx, static_cast<index_t>(inputs), p);
  }
}

}  // namespace max_pool
}  // namespace cuda
}  // namespace torch_cs231n
