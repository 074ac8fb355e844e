// Depthwise conv2d on CUDA (groups = C, F = m·C: filter f reads channel c = f/m), by tiles in shared memory.
//
// The line kernels of cuda/conv2d.cu read each input value once per tap that reaches it, from global
// memory, and decode a tap's indices per element; their d_weight reads the whole of dY and x once per tap.
// Here a block takes a tile of 8 x 32 outputs of one plane, first copies the input region that the tile's
// windows cover into shared memory (rows (8-1)·s + (kH-1)·d + 1, columns (32-1)·s + (kW-1)·d + 1; 0 in the
// padding), then each thread computes its output from there with the kH·kW weights in registers (kH and kW
// are template arguments: 3x3 and 5x5, the depthwise filters real models use).
//     forward   y[n, f, o] = b[f] + Σ_t W[f, t] · x[n, c, o·s − p + t·d]
//     d_input   dx[n, c, i] = Σ_j Σ_t W[c·m + j, t] · dY[n, c·m + j, (i + p − t·d)/s]
//               with s = 1, this is the forward map over dY with the filter flipped, t' = k−1−t, and the
//               padding (k−1)·d − p: the same tile kernel, summing the m planes of c
//     d_weight  dW[f, t] = Σ_{n, o} dY[n, f, o] · x[n, c, o·s − p + t·d]
//               each thread keeps the kH·kW sums of its output position over a share of the (sample, tile)
//               pairs of f; the block adds them in shared memory, in a fixed order, into one partial sum per
//               block, and a second kernel adds a filter's partial sums in block order (deterministic).
// The tall tiles at the end of the file are a candidate form of all three (32 x 32 outputs, four a thread). Like
// cuda/conv2d_implicit_gemm.cuh, this file has no torch type in it: tests/cuda_emulation/ runs it on the CPU.
#pragma once

#include <cstdint>

#include "common/conv2d_index.h"
#include "cuda/emulatable.cuh"

namespace torch_cs231n {
namespace cuda {
namespace depthwise {

constexpr int kThreads = 256;
constexpr int kTileH = 8, kTileW = 32;  // one output per thread
constexpr int kRegion = 48 * 80;        // the shared input region's capacity, in values

// The input region a tile of tile_h x kTileW outputs covers, for a map i = o·s − p + t·d (the forward's, or
// d_input's flipped one): its rows and columns, 0 if it does not fit in `capacity` values.
struct Region {
  int rows, cols;
};
inline Region region_of(int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t tile_h = kTileH,
                        int64_t capacity = kRegion) {
  const int64_t rows = (tile_h - 1) * sh + (kh - 1) * dh + 1, cols = (kTileW - 1) * sw + (kw - 1) * dw + 1;
  return rows * cols <= capacity ? Region{static_cast<int>(rows), static_cast<int>(cols)} : Region{0, 0};
}

// A tiled pass: out[n, o_ch, o] from src planes of src_h x src_w through the map i = o·s − p + t·d.
struct Tiling {
  int64_t out_h, out_w, src_h, src_w;
  int64_t sh, sw, ph, pw, dh, dw;
  int rows, cols;          // the Region
  int64_t tiles_w, tiles;  // tiles per row of tiles, and per plane
};

// Copies the region of src_plane for the tile whose first output is (o_h0, o_w0) into shared memory.
template <typename T, typename Acc>
__device__ void load_region(Acc* region, const T* src_plane, const Tiling& m, int64_t o_h0, int64_t o_w0) {
  const int64_t i_h0 = conv_in_index(o_h0, 0, m.sh, m.ph, 1), i_w0 = conv_in_index(o_w0, 0, m.sw, m.pw, 1);
  for (int idx = threadIdx.x; idx < m.rows * m.cols; idx += kThreads) {
    const int r = idx / m.cols, c = idx % m.cols;
    const int64_t i_h = i_h0 + r, i_w = i_w0 + c;
    region[idx] = i_h >= 0 && i_h < m.src_h && i_w >= 0 && i_w < m.src_w
                      ? static_cast<Acc>(src_plane[i_h * m.src_w + i_w])
                      : Acc(0);
  }
}

// Where tap (th, tw) of the tile's output (oy, ox) reads in the region: the forward map
// o·s − p + t·d, relative to the region's origin (which holds the padding).
__device__ inline int region_at(const Tiling& m, int oy, int ox, int th, int tw) {
  return static_cast<int>(conv_in_index(oy, th, m.sh, 0, m.dh) * m.cols + conv_in_index(ox, tw, m.sw, 0, m.dw));
}

// Σ_t w[t] · region at the thread's output (oy, ox) of the tile.
template <typename Acc, int KH, int KW>
__device__ Acc window_sum(const Acc* region, const Acc (&w)[KH * KW], const Tiling& m, int oy, int ox) {
  Acc acc = Acc(0);
#pragma unroll
  for (int th = 0; th < KH; ++th) {
#pragma unroll
    for (int tw = 0; tw < KW; ++tw) {
      acc += w[th * KW + tw] * region[region_at(m, oy, ox, th, tw)];
    }
  }
  return acc;
}

// Plane j of output channel o_ch: its source channel (returned; the forward's o_ch/m, d_input's o_ch·m + j)
// and, in wr, the taps of the filter that joins them (flipped for d_input).
template <typename T, typename Acc, int KH, int KW>
__device__ int64_t plane_filter(const T* w, int64_t o_ch, int64_t j, int64_t mult, bool grad_input,
                                Acc (&wr)[KH * KW]) {
  const int64_t s_ch = grad_input ? o_ch * mult + j : o_ch / mult;
  const T* filter = w + (grad_input ? s_ch : o_ch) * (KH * KW);
#pragma unroll
  for (int t = 0; t < KH * KW; ++t) wr[t] = static_cast<Acc>(filter[grad_input ? KH * KW - 1 - t : t]);
  return s_ch;
}

// Forward (out = y, src = x: channel f/m, filter f, plus the bias) and, with stride 1, d_input (out = dx,
// src = dY: the m planes c·m + j, each through its filter flipped). Block = (out plane, tile).
template <typename T, typename Acc, int KH, int KW>
__global__ void __launch_bounds__(kThreads)
    tiled_kernel(const T* __restrict__ src, const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ out,
                 Tiling m, int64_t out_channels, int64_t src_channels, int64_t mult, bool grad_input) {
  __shared__ Acc region[kRegion];
  const int64_t plane = blockIdx.x / m.tiles, tile = blockIdx.x % m.tiles;
  const int64_t n = plane / out_channels, o_ch = plane % out_channels;
  const int64_t o_h0 = (tile / m.tiles_w) * kTileH, o_w0 = (tile % m.tiles_w) * kTileW;
  const int oy = threadIdx.x / kTileW, ox = threadIdx.x % kTileW;
  Acc acc = bias != nullptr ? static_cast<Acc>(bias[o_ch]) : Acc(0);
  const int64_t planes = grad_input ? mult : 1;
  for (int64_t j = 0; j < planes; ++j) {
    Acc wr[KH * KW];
    const int64_t s_ch = plane_filter<T, Acc, KH, KW>(w, o_ch, j, mult, grad_input, wr);
    if (j > 0) __syncthreads();  // everyone has read the previous plane's region
    load_region<T, Acc>(region, src + (n * src_channels + s_ch) * m.src_h * m.src_w, m, o_h0, o_w0);
    __syncthreads();
    acc += window_sum<Acc, KH, KW>(region, wr, m, oy, ox);
  }
  const int64_t o_h = o_h0 + oy, o_w = o_w0 + ox;
  if (o_h < m.out_h && o_w < m.out_w) out[(plane * m.out_h + o_h) * m.out_w + o_w] = static_cast<T>(acc);
}

// out[t] = Σ over the block's threads of acc[t], for each of the kTaps sums a thread keeps, added pairwise in
// a fixed order through `sums` (kThreads values of shared memory); thread 0 writes.
template <typename Acc, int kTaps>
__device__ void add_block_sums(const Acc (&acc)[kTaps], Acc* sums, Acc* out) {
#pragma unroll
  for (int t = 0; t < kTaps; ++t) {
    sums[threadIdx.x] = acc[t];
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride /= 2) {
      if (static_cast<int>(threadIdx.x) < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) out[t] = sums[0];
    __syncthreads();  // sums[0] has been read before the next tap overwrites it
  }
}

// d_weight, partial sums: block = (filter f, slice); the slice takes the (sample, tile) pairs u ≡ slice
// (mod slices). partial[f][slice][t].
template <typename T, typename Acc, int KH, int KW>
__global__ void __launch_bounds__(kThreads)
    grad_weight_kernel(const T* __restrict__ dy, const T* __restrict__ x, Acc* __restrict__ partial, Tiling m,
                       int64_t n_samples, int64_t f_channels, int64_t c_channels, int64_t slices) {
  __shared__ Acc region[kRegion];
  __shared__ Acc sums[kThreads];
  const int64_t f = blockIdx.x / slices, slice = blockIdx.x % slices, c = f * c_channels / f_channels;
  const int oy = threadIdx.x / kTileW, ox = threadIdx.x % kTileW;
  Acc acc[KH * KW];
#pragma unroll
  for (int t = 0; t < KH * KW; ++t) acc[t] = Acc(0);
  for (int64_t u = slice; u < n_samples * m.tiles; u += slices) {
    const int64_t n = u / m.tiles, tile = u % m.tiles;
    const int64_t o_h = (tile / m.tiles_w) * kTileH + oy, o_w = (tile % m.tiles_w) * kTileW + ox;
    __syncthreads();  // the previous region has been read
    load_region<T, Acc>(region, x + (n * c_channels + c) * m.src_h * m.src_w, m, o_h - oy, o_w - ox);
    __syncthreads();
    if (o_h < m.out_h && o_w < m.out_w) {
      const Acc g = static_cast<Acc>(dy[((n * f_channels + f) * m.out_h + o_h) * m.out_w + o_w]);
#pragma unroll
      for (int th = 0; th < KH; ++th) {
#pragma unroll
        for (int tw = 0; tw < KW; ++tw) {
          acc[th * KW + tw] += g * region[region_at(m, oy, ox, th, tw)];
        }
      }
    }
  }
  add_block_sums<Acc, KH * KW>(acc, sums, partial + blockIdx.x * (KH * KW));
}

// dw[f][t] = Σ_slice partial[f][slice][t], in slice order.
template <typename T, typename Acc>
__global__ void sum_slices_kernel(const Acc* __restrict__ partial, T* __restrict__ dw, int64_t filters, int64_t taps,
                                  int64_t slices) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < filters * taps;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = i / taps, t = i % taps;
    Acc sum = Acc(0);
    for (int64_t s = 0; s < slices; ++s) sum += partial[(f * slices + s) * taps + t];
    dw[i] = static_cast<T>(sum);
  }
}

// ----------------------------------------------------------------------------------------------- the calls
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, typename Acc>
void launch_sum_slices(const Acc* partial, T* dw, int64_t filters, int64_t taps, int64_t slices, cudaStream_t stream) {
  auto* sum = &sum_slices_kernel<T, Acc>;
  const int64_t blocks = ceil_div(filters * taps, kThreads);
  TORCH_CS231N_LAUNCH(sum, dim3(static_cast<unsigned int>(blocks < 4096 ? blocks : 4096)), kThreads, stream, partial,
                      dw, filters, taps, slices);
}

inline Tiling tiling(int64_t out_h, int64_t out_w, int64_t src_h, int64_t src_w, int64_t sh, int64_t sw, int64_t ph,
                     int64_t pw, int64_t dh, int64_t dw, Region r, int64_t tile_h = kTileH) {
  Tiling m{out_h, out_w, src_h, src_w, sh, sw, ph, pw, dh, dw, r.rows, r.cols, 0, 0};
  m.tiles_w = ceil_div(out_w, kTileW);
  m.tiles = m.tiles_w * ceil_div(out_h, tile_h);
  return m;
}

// Which passes the tiles can do: the filter is 3x3 or 5x5 and the region fits; d_input needs stride 1.
inline bool tiles_fit(const Conv2dGeometry& g) {
  const bool sizes = (g.kh == 3 && g.kw == 3) || (g.kh == 5 && g.kw == 5);
  return sizes && region_of(g.kh, g.kw, g.sh, g.sw, g.dh, g.dw).rows > 0;
}
inline bool grad_input_tiles_fit(const Conv2dGeometry& g) { return tiles_fit(g) && g.sh == 1 && g.sw == 1; }

template <typename T, typename Acc, int KH, int KW>
void forward(const T* x, const T* w, const T* bias, T* y, const Conv2dGeometry& g, cudaStream_t stream) {
  const Tiling m =
      tiling(g.oh, g.ow, g.h, g.w, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, region_of(KH, KW, g.sh, g.sw, g.dh, g.dw));
  if (g.n * g.f * m.tiles == 0) return;  // no output
  auto* kernel = &tiled_kernel<T, Acc, KH, KW>;
  TORCH_CS231N_LAUNCH(kernel, dim3(static_cast<unsigned int>(g.n * g.f * m.tiles)), kThreads, stream, x, w, bias, y, m,
                      g.f, g.c, g.f / g.c, false);
}

// Stride 1 only (grad_input_tiles_fit): the flipped filter over dY, padding (k−1)·d − p.
template <typename T, typename Acc, int KH, int KW>
void grad_input(const T* dy, const T* w, T* dx, const Conv2dGeometry& g, cudaStream_t stream) {
  const Tiling m = tiling(g.h, g.w, g.oh, g.ow, 1, 1, (KH - 1) * g.dh - g.ph, (KW - 1) * g.dw - g.pw, g.dh, g.dw,
                          region_of(KH, KW, 1, 1, g.dh, g.dw));
  if (g.n * g.c * m.tiles == 0) return;  // an empty input plane: no d_input to write
  auto* kernel = &tiled_kernel<T, Acc, KH, KW>;
  TORCH_CS231N_LAUNCH(kernel, dim3(static_cast<unsigned int>(g.n * g.c * m.tiles)), kThreads, stream, dy, w,
                      static_cast<const T*>(nullptr), dx, m, g.c, g.f, g.f / g.c, true);
}

// d_weight's slices per filter: about `blocks_wanted` blocks in all, each with at least 8 (sample, tile)
// pairs. partial: filters x slices x taps values of Acc.
inline int64_t grad_weight_slices(const Conv2dGeometry& g, int64_t blocks_wanted) {
  const int64_t units = g.n * tiling(g.oh, g.ow, g.h, g.w, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, Region{1, 1}).tiles;
  int64_t slices = ceil_div(blocks_wanted, g.f);
  const int64_t most = ceil_div(units, 8);
  return slices < 1 ? 1 : (slices > most ? most : slices);
}

template <typename T, typename Acc, int KH, int KW>
void grad_weight(const T* dy, const T* x, T* dw, const Conv2dGeometry& g, int64_t slices, Acc* partial,
                 cudaStream_t stream) {
  const Tiling m =
      tiling(g.oh, g.ow, g.h, g.w, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, region_of(KH, KW, g.sh, g.sw, g.dh, g.dw));
  auto* kernel = &grad_weight_kernel<T, Acc, KH, KW>;
  TORCH_CS231N_LAUNCH(kernel, dim3(static_cast<unsigned int>(g.f * slices)), kThreads, stream, dy, x, partial, m, g.n,
                      g.f, g.c, slices);
  launch_sum_slices<T, Acc>(partial, dw, g.f, KH * KW, slices, stream);
}

// ------------------------------------------------------------------------------ the tall tiles (candidate)
// On the H200 the tiles above spent most of their instructions on a block's bookkeeping rather than its sums:
// decoding blockIdx (64-bit divisions), a division per value of the region they load, the weights, all for
// one output a thread (about 400 instructions a warp around 9 FMAs, by the SASS; the (128,128,56,56)
// forward took 0.97 ms against torch's 0.48). The tall tiles give a thread kTallRows outputs, consecutive
// rows of one column (a tile of 32 x 32), take the plane from the grid's y and z instead of dividing, and
// load the region a warp per row and a lane per column, with no division.
// d_weight likewise: four outputs a thread per (sample, tile) pair, the pairs stepped through without
// dividing. TORCH_CS231N_CUDA_DEPTHWISE=tall chooses them (the forward, d_input with stride 1, d_weight)
// until `make gpu-check` has tested and timed them on a GPU.
constexpr int kTallRows = 4;
constexpr int kTallTileH = (kThreads / kTileW) * kTallRows;  // 32
constexpr int kTallRegion = 72 * 72;                         // stride 2 with a 5x5 filter needs 67 x 67
constexpr int64_t kGridYZ = 65535;                           // gridDim.y's and gridDim.z's limit

// Copies the region of src_plane for the tile whose first output is (o_h0, o_w0) into shared memory, a warp
// per row and a lane per column (0 in the padding). Positions are 32-bit (tall_fit: a plane holds fewer than
// 2^31 values), and a lane tests its column once.
template <typename T, typename Acc>
__device__ void load_region_by_rows(Acc* region, const T* src_plane, const Tiling& m, int64_t o_h0, int64_t o_w0) {
  const int i_h0 = static_cast<int>(conv_in_index(o_h0, 0, m.sh, m.ph, 1));
  const int i_w0 = static_cast<int>(conv_in_index(o_w0, 0, m.sw, m.pw, 1));
  const int src_h = static_cast<int>(m.src_h), src_w = static_cast<int>(m.src_w);
  const int warp = threadIdx.x / kTileW, lane = threadIdx.x % kTileW;
  for (int c = lane; c < m.cols; c += kTileW) {
    const int i_w = i_w0 + c;
    const bool column_inside = i_w >= 0 && i_w < src_w;
    for (int r = warp; r < m.rows; r += kThreads / kTileW) {
      const int i_h = i_h0 + r;
      region[r * m.cols + c] =
          column_inside && i_h >= 0 && i_h < src_h ? static_cast<Acc>(src_plane[i_h * src_w + i_w]) : Acc(0);
    }
  }
}

// The forward (out = y, src = x) and, with stride 1, d_input (out = dx, src = dY, the filters flipped), as
// tiled_kernel, over a grid (tiles, out_channels, samples up to kGridYZ; more samples loop).
template <typename T, typename Acc, int KH, int KW>
__global__ void __launch_bounds__(kThreads)
    tall_kernel(const T* __restrict__ src, const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ out,
                Tiling m, int64_t samples, int64_t out_channels, int64_t src_channels, int64_t mult, bool grad_input) {
  __shared__ Acc region[kTallRegion];
  const int64_t o_ch = blockIdx.y;
  const int tile = static_cast<int>(blockIdx.x), tiles_w = static_cast<int>(m.tiles_w);  // tall_fit: 32-bit
  const int64_t o_h0 = static_cast<int64_t>(tile / tiles_w) * kTallTileH;
  const int64_t o_w0 = static_cast<int64_t>(tile % tiles_w) * kTileW;
  // this thread's outputs: rows row0 + r of column col; where their taps start in the region
  const int row0 = (threadIdx.x / kTileW) * kTallRows, col = threadIdx.x % kTileW;
  const int sh = static_cast<int>(m.sh), dh = static_cast<int>(m.dh), sw = static_cast<int>(m.sw);
  const int dw = static_cast<int>(m.dw), cols = m.cols;
  const int start = row0 * sh * cols + col * sw;
  const int64_t planes = grad_input ? mult : 1;
  for (int64_t n = blockIdx.z; n < samples; n += gridDim.z) {
    const Acc b = bias != nullptr ? static_cast<Acc>(bias[o_ch]) : Acc(0);
    Acc acc[kTallRows];
#pragma unroll
    for (int r = 0; r < kTallRows; ++r) acc[r] = b;
    for (int64_t j = 0; j < planes; ++j) {
      Acc wr[KH * KW];
      const int64_t s_ch = plane_filter<T, Acc, KH, KW>(w, o_ch, j, mult, grad_input, wr);
      __syncthreads();  // the previous region has been read
      load_region_by_rows<T, Acc>(region, src + (n * src_channels + s_ch) * m.src_h * m.src_w, m, o_h0, o_w0);
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kTallRows; ++r) {
#pragma unroll
        for (int th = 0; th < KH; ++th) {
#pragma unroll
          for (int tw = 0; tw < KW; ++tw) {
            acc[r] += wr[th * KW + tw] * region[start + (r * sh + th * dh) * cols + tw * dw];
          }
        }
      }
    }
    const int64_t o_h = o_h0 + row0, o_w = o_w0 + col;
    if (o_h < m.out_h && o_w < m.out_w) {  // this thread's column, rows o_h, o_h + 1, ... that exist
      T* column = out + ((n * out_channels + o_ch) * m.out_h + o_h) * m.out_w + o_w;
      const int64_t rows = m.out_h - o_h;
#pragma unroll
      for (int r = 0; r < kTallRows; ++r) {
        if (r < rows) column[r * m.out_w] = static_cast<T>(acc[r]);
      }
    }
  }
}

// d_weight by tall tiles, partial sums: block = (slice, filter f), grid (slices, F). The slice takes the
// (sample, tile) pairs from pair `slice` on, every `slices`-th, stepping through them as (samples, tile rows,
// tile columns) with carries rather than dividing; a thread keeps the kH·kW sums of its four outputs, and
// the block adds them as grad_weight_kernel does, into partial[f][slice][t].
template <typename T, typename Acc, int KH, int KW>
__global__ void __launch_bounds__(kThreads)
    tall_grad_weight_kernel(const T* __restrict__ dy, const T* __restrict__ x, Acc* __restrict__ partial, Tiling m,
                            int64_t samples, int64_t f_channels, int64_t c_channels, int64_t slices) {
  __shared__ Acc region[kTallRegion];
  __shared__ Acc sums[kThreads];
  const int64_t slice = blockIdx.x, f = blockIdx.y, c = f * c_channels / f_channels;
  const int row0 = (threadIdx.x / kTileW) * kTallRows, col = threadIdx.x % kTileW;
  const int sh = static_cast<int>(m.sh), dh = static_cast<int>(m.dh), sw = static_cast<int>(m.sw);
  const int dw = static_cast<int>(m.dw), cols = m.cols;
  const int start = row0 * sh * cols + col * sw;
  Acc acc[KH * KW];
#pragma unroll
  for (int t = 0; t < KH * KW; ++t) acc[t] = Acc(0);
  const int64_t tiles = m.tiles, tiles_w = m.tiles_w, tiles_h = tiles_w > 0 ? tiles / tiles_w : 0;
  if (tiles > 0) {
    int64_t n = slice / tiles, t_row = (slice % tiles) / tiles_w, t_col = (slice % tiles) % tiles_w;
    const int64_t step_n = slices / tiles, step_row = (slices % tiles) / tiles_w, step_col = (slices % tiles) % tiles_w;
    for (; n < samples; n += step_n) {
      const int64_t o_h0 = t_row * kTallTileH, o_w0 = t_col * kTileW;
      __syncthreads();  // the previous region has been read
      load_region_by_rows<T, Acc>(region, x + (n * c_channels + c) * m.src_h * m.src_w, m, o_h0, o_w0);
      __syncthreads();
      const int64_t o_h = o_h0 + row0, o_w = o_w0 + col;
      if (o_h < m.out_h && o_w < m.out_w) {  // rows o_h + r that exist (an absent one must not add 0 · inf)
        const T* column = dy + ((n * f_channels + f) * m.out_h + o_h) * m.out_w + o_w;
        const int64_t rows = m.out_h - o_h;
#pragma unroll
        for (int r = 0; r < kTallRows; ++r) {
          if (r < rows) {
            const Acc g = static_cast<Acc>(column[r * m.out_w]);
#pragma unroll
            for (int th = 0; th < KH; ++th) {
#pragma unroll
              for (int tw = 0; tw < KW; ++tw) {
                acc[th * KW + tw] += g * region[start + (r * sh + th * dh) * cols + tw * dw];
              }
            }
          }
        }
      }
      // the next pair: add the step, carrying columns into rows and rows into samples
      t_col += step_col;
      t_row += step_row;
      if (t_col >= tiles_w) t_col -= tiles_w, ++t_row;
      if (t_row >= tiles_h) t_row -= tiles_h, ++n;
    }
  }
  add_block_sums<Acc, KH * KW>(acc, sums, partial + (f * slices + slice) * (KH * KW));
}

inline Region tall_region_of(int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw) {
  return region_of(kh, kw, sh, sw, dh, dw, kTallTileH, kTallRegion);
}

// Which passes the tall tiles can do: 3x3 or 5x5 whose region fits, channels and filters within gridDim.y,
// planes of under 2^31 values (positions within a plane are 32-bit; the region's too, however far its
// padding reaches); d_input needs stride 1 as well.
inline bool tall_fit(const Conv2dGeometry& g) {
  const bool sizes = (g.kh == 3 && g.kw == 3) || (g.kh == 5 && g.kw == 5);
  if (!sizes || tall_region_of(g.kh, g.kw, g.sh, g.sw, g.dh, g.dw).rows == 0 || g.f > kGridYZ) return false;
  const int64_t reach = (kTallTileH + g.kh) * (g.sh + g.dh) + g.ph + g.pw + 64;  // past a plane's edges
  return (g.h + reach) * (g.w + reach) <= INT32_MAX && (g.oh + reach) * (g.ow + reach) <= INT32_MAX;
}
inline bool grad_input_tall_fit(const Conv2dGeometry& g) { return tall_fit(g) && g.sh == 1 && g.sw == 1; }

// grid_z: the most samples the grid's z takes (the tests lower it to exercise the loop over the rest).
template <typename T, typename Acc, int KH, int KW>
void tall_forward(const T* x, const T* w, const T* bias, T* y, const Conv2dGeometry& g, cudaStream_t stream,
                  int64_t grid_z = kGridYZ) {
  const Tiling m = tiling(g.oh, g.ow, g.h, g.w, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
                          tall_region_of(KH, KW, g.sh, g.sw, g.dh, g.dw), kTallTileH);
  if (g.n * g.f * m.tiles == 0) return;  // no output
  const dim3 grid(static_cast<unsigned int>(m.tiles), static_cast<unsigned int>(g.f),
                  static_cast<unsigned int>(g.n < grid_z ? g.n : grid_z));
  auto* kernel = &tall_kernel<T, Acc, KH, KW>;
  TORCH_CS231N_LAUNCH(kernel, grid, kThreads, stream, x, w, bias, y, m, g.n, g.f, g.c, g.f / g.c, false);
}

// Stride 1 only (grad_input_tall_fit): the flipped filter over dY, padding (k−1)·d − p.
template <typename T, typename Acc, int KH, int KW>
void tall_grad_input(const T* dy, const T* w, T* dx, const Conv2dGeometry& g, cudaStream_t stream,
                     int64_t grid_z = kGridYZ) {
  const Tiling m = tiling(g.h, g.w, g.oh, g.ow, 1, 1, (KH - 1) * g.dh - g.ph, (KW - 1) * g.dw - g.pw, g.dh, g.dw,
                          tall_region_of(KH, KW, 1, 1, g.dh, g.dw), kTallTileH);
  if (g.n * g.c * m.tiles == 0) return;  // an empty input plane: no d_input to write
  const dim3 grid(static_cast<unsigned int>(m.tiles), static_cast<unsigned int>(g.c),
                  static_cast<unsigned int>(g.n < grid_z ? g.n : grid_z));
  auto* kernel = &tall_kernel<T, Acc, KH, KW>;
  TORCH_CS231N_LAUNCH(kernel, grid, kThreads, stream, dy, w, static_cast<const T*>(nullptr), dx, m, g.n, g.c, g.f,
                      g.f / g.c, true);
}

// d_weight's slices per filter with the tall tiles: about `blocks_wanted` blocks in all, each with at least
// 4 (sample, tile) pairs (a pair is 4 times the tiles' 8-row pair). partial: filters x slices x taps of Acc.
inline int64_t tall_grad_weight_slices(const Conv2dGeometry& g, int64_t blocks_wanted) {
  const int64_t units = g.n * ceil_div(g.oh, kTallTileH) * ceil_div(g.ow, kTileW);
  const int64_t slices = ceil_div(blocks_wanted, g.f), most = ceil_div(units, 4);
  return slices < 1 ? 1 : (slices > most ? (most < 1 ? 1 : most) : slices);
}

template <typename T, typename Acc, int KH, int KW>
void tall_grad_weight(const T* dy, const T* x, T* dw, const Conv2dGeometry& g, int64_t slices, Acc* partial,
                      cudaStream_t stream) {
  const Tiling m = tiling(g.oh, g.ow, g.h, g.w, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
                          tall_region_of(KH, KW, g.sh, g.sw, g.dh, g.dw), kTallTileH);
  auto* kernel = &tall_grad_weight_kernel<T, Acc, KH, KW>;
  TORCH_CS231N_LAUNCH(kernel, dim3(static_cast<unsigned int>(slices), static_cast<unsigned int>(g.f)), kThreads, stream,
                      dy, x, partial, m, g.n, g.f, g.c, slices);
  launch_sum_slices<T, Acc>(partial, dw, g.f, KH * KW, slices, stream);
}

}  // namespace depthwise
}  // namespace cuda
}  // namespace torch_cs231n
