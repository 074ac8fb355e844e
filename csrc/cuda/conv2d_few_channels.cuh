// d_input of a convolution with few input channels (an image's stem: 1 to 4 of them) on CUDA, as a gather
// of dY, with no column buffer (a candidate: TORCH_CS231N_CUDA_CONV_DX=gather, cuda/conv2d.cu):
//     dX[n, c, i_h, i_w] = Σ_f Σ_{t_h, t_w} W[f, c, t_h, t_w] · dY[n, f, o_h, o_w],
//     o_h = (i_h + p_h - t_h) / s_h where s_h divides it and 0 <= o_h < oH (the same along w)
// (dilation 1). Such a layer's d_input is a GEMM only 3 columns wide, which the implicit GEMM's 64-wide
// tiles would waste; the cuBLAS route writes a column buffer of C·kH·kW rows (147 for an RGB 7x7 stem:
// 944 MB at batch 128 of 224x224) and reads it back in col2im.
//
// Which taps reach an input pixel depends only on its phase (i_h mod s_h, i_w mod s_w): t_h ≡ i_h + p_h
// (mod s_h), likewise t_w. So a thread takes kRun pixels of one row and one phase, i_w = i_w0 + s_w·r
// (r < kRun), all reached by the same taps: tap k of a row of taps, t_w = t_w0 + s_w·k (k < K, K <= KMax),
// reaches output column q0 - k + r, so the thread's kRun x K products of a (filter, t_h) read a window of
// kRun + KMax - 1 values of dY's row, loaded once into registers, and W's C values of each tap as one
// 16-byte load (W laid out [f][t_h][t_w][4], the channels padded to 4). Consecutive threads take
// consecutive runs of one phase's row, so a warp's taps, and so its loop bounds and W's addresses, are
// the same in every lane (but where a warp straddles two phases). float32, summed in float32 with FMAs,
// also when TF32 is on: as exact as the float32 route.
#pragma once

#include <cstdint>

#include "common/conv2d_index.h"
#include "cuda/emulatable.cuh"

namespace torch_cs231n {
namespace cuda {
namespace few_channels {

constexpr int kThreads = 256;
constexpr int kRun = 8;          // pixels a thread
constexpr int kMaxChannels = 4;  // C, padded to 4 in W's layout

// The layers it does: one group, at most kMaxChannels channels, dilation 1, and at most 7 taps of a row
// reaching a pixel (ceil(kW / sW): 4 for a 7x7 stride-2 stem, 7 for a 7x7 stride-1 layer).
inline int64_t taps_reaching(int64_t k, int64_t s) { return (k + s - 1) / s; }
inline bool fits(const Conv2dGeometry& g) {
  return g.groups == 1 && g.c >= 1 && g.c <= kMaxChannels && g.dh == 1 && g.dw == 1 && taps_reaching(g.kw, g.sw) <= 7;
}

// W (F x C x kH x kW) as [f][t_h][t_w][4]: a tap's channels side by side, zeros past C. Floats.
inline int64_t filters_size(const Conv2dGeometry& g) { return g.f * g.kh * g.kw * kMaxChannels; }

struct alignas(16) Channels {
  float v[kMaxChannels];
};

// One 16-byte read, through the read-only cache on a GPU.
__device__ __forceinline__ Channels read_channels(const Channels* p) {
#if defined(__CUDA_ARCH__)
  const float4 q = __ldg(reinterpret_cast<const float4*>(p));
  return Channels{{q.x, q.y, q.z, q.w}};
#else
  return *p;
#endif
}

__device__ __forceinline__ float read_value(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// The items of the grid: for each sample, phase (a_h, a_w) and row i of the phase (i_h = a_h + s_h·i),
// the runs j of kRun pixels (i_w = a_w + s_w·(kRun·j + r)); run fastest, then row, phase w, phase h,
// sample. Every phase counts ceil(H / s_h) rows and ceil(ceil(W / s_w) / kRun) runs (some past the image).
struct Items {
  int64_t rows, runs;
  __host__ __device__ int64_t count(const Conv2dGeometry& g) const { return g.n * g.sh * g.sw * rows * runs; }
};
inline Items items_of(const Conv2dGeometry& g) {
  return {(g.h + g.sh - 1) / g.sh, ((g.w + g.sw - 1) / g.sw + kRun - 1) / kRun};
}

// KMax: the most taps of a row reaching a pixel, rounded up to one of the instantiations (4 or 7).
template <int C, int KMax>
__global__ void grad_input_kernel(const float* __restrict__ dy, const Channels* __restrict__ w, float* __restrict__ dx,
                                  Conv2dGeometry g, Items items) {
  const int64_t total = items.count(g);
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rest = item;
    const int64_t j = rest % items.runs;
    rest /= items.runs;
    const int64_t i = rest % items.rows;
    rest /= items.rows;
    const int64_t a_w = rest % g.sw;
    rest /= g.sw;
    const int64_t a_h = rest % g.sh, n = rest / g.sh;
    const int64_t i_h = a_h + g.sh * i, i_w0 = a_w + g.sw * kRun * j;
    if (i_h >= g.h || i_w0 >= g.w) continue;
    // the taps reaching this phase, t_h ≡ i_h + p_h and t_w ≡ i_w0 + p_w (mod s): the first of each and its
    // output row (o_h) and column for r = 0 (q0)
    int64_t th0, o_h, tw0, q0;
    conv_first_tap(i_h, g.sh, g.ph, &th0, &o_h);
    conv_first_tap(i_w0, g.sw, g.pw, &tw0, &q0);
    const int taps_w = tw0 < g.kw ? static_cast<int>((g.kw - 1 - tw0) / g.sw + 1) : 0;
    // window[u] below is dY's column q0 - (KMax - 1) + u, and tap k and pixel r read u = r - k + KMax - 1.
    // Which u are read and lie in the row: the same for every row.
    const int64_t first = q0 - (KMax - 1);
    bool inside[kRun + KMax - 1];
#pragma unroll
    for (int u = 0; u < kRun + KMax - 1; ++u) inside[u] = u >= KMax - taps_w && first + u >= 0 && first + u < g.ow;
    float acc[kRun][C] = {};
    // t_h = th0 + s_h·m reaches output row o_h - m: rows down as taps go up
    for (int64_t th = th0; th < g.kh && o_h >= 0; th += g.sh, --o_h) {
      if (o_h >= g.oh) continue;
      const float* row = dy + (n * g.f * g.oh + o_h) * g.ow + first;  // filter f's: + f·oH·oW
      const Channels* taps = w + th * g.kw + tw0;                     // filter f's: + f·kH·kW
      for (int64_t f = 0; f < g.f; ++f, row += g.oh * g.ow, taps += g.kh * g.kw) {
        float window[kRun + KMax - 1];
#pragma unroll
        for (int u = 0; u < kRun + KMax - 1; ++u) window[u] = inside[u] ? read_value(row + u) : 0.f;
#pragma unroll
        for (int k = 0; k < KMax; ++k) {
          if (k < taps_w) {
            const Channels wk = read_channels(taps + k * g.sw);
#pragma unroll
            for (int r = 0; r < kRun; ++r) {
#pragma unroll
              for (int c = 0; c < C; ++c) acc[r][c] += wk.v[c] * window[r - k + KMax - 1];
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRun; ++r) {
      const int64_t i_w = i_w0 + g.sw * r;
      if (i_w < g.w) {
#pragma unroll
        for (int c = 0; c < C; ++c) dx[((n * C + c) * g.h + i_h) * g.w + i_w] = acc[r][c];
      }
    }
  }
}

// The grid of the grid-stride loop over the items (at most 65535 blocks).
inline dim3 grid_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks)));
}

template <int C>
void grad_input_channels(const float* dy, const Channels* w, float* dx, const Conv2dGeometry& g, cudaStream_t stream) {
  const Items items = items_of(g);
  if (taps_reaching(g.kw, g.sw) <= 4) {
    auto* kernel = &grad_input_kernel<C, 4>;
    TORCH_CS231N_LAUNCH(kernel, grid_for(items.count(g)), kThreads, stream, dy, w, dx, g, items);
  } else {
    auto* kernel = &grad_input_kernel<C, 7>;
    TORCH_CS231N_LAUNCH(kernel, grid_for(items.count(g)), kThreads, stream, dy, w, dx, g, items);
  }
}

// dX (n x C x H x W) from dY and the filters in layout (filters_size(g) floats, laid out by the caller:
// cuda/conv2d.cu with tensor ops, the emulation test by hand), for a layer that fits().
inline void grad_input(const float* dy, const Channels* w, float* dx, const Conv2dGeometry& g, cudaStream_t stream) {
  switch (g.c) {
    case 1:
      grad_input_channels<1>(dy, w, dx, g, stream);
      break;
    case 2:
      grad_input_channels<2>(dy, w, dx, g, stream);
      break;
    case 3:
      grad_input_channels<3>(dy, w, dx, g, stream);
      break;
    default:
      grad_input_channels<4>(dy, w, dx, g, stream);
      break;
  }
}

}  // namespace few_channels
}  // namespace cuda
}  // namespace torch_cs231n
