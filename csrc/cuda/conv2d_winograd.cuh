// Conv2d on CUDA by Winograd's F(2×2, 3×3) (common/winograd.h): the forward and d_input of float32 3×3 layers
// with stride 1, dilation 1 and one group, when TF32 is off (cuda/conv2d_winograd.h says which, by default),
// and their d_weight (a candidate).
// cuDNN's float32 forward of the 256-channel 14×14 layer ran at 85 TFLOP/s on the H200 (counted as a direct
// convolution), above the 67 that its CUDA cores can do: it multiplies less. So does this route, 16 products
// for a 2×2 block of outputs where the implicit GEMM does 36 (on the H200: forward 0.40 ms against the
// implicit GEMM's 0.97 and cuDNN's 0.35 for that layer; 0.72, 1.2 and 0.79 for 64 channels at 56×56):
//   1. filter_transform_kernel   U[ξ][o][i] = (G g Gᵀ)[ξ] for each filter g = W[o][i] (for d_input, the
//                                transposed and flipped filter W[i][o][2-r][2-s]: d_input is the stride-1
//                                correlation of dY with it, with padding 2 - p);
//   2. input_transform_kernel    V[ξ][i][p] = (Bᵀ d B)[ξ] for the 4×4 input tile d of output block p =
//                                (n, t_h, t_w), read at rows 2·t_h - p_h .. +3 (zeros outside the image);
//   3. 16 GEMMs                  M[ξ] (outs × P) = U[ξ] (outs × ins) · V[ξ] (ins × P), by the caller (cuBLAS
//                                in float32 on a GPU, a loop in the emulation test);
//   4. output_transform_kernel   the block (Aᵀ M A) of each output channel and tile, plus the bias.
// d_weight (a candidate, TORCH_CS231N_CUDA_CONV_DW=winograd; common/winograd.h derives it) reuses step 2 on x
// and sums over blocks instead of channels:
//   5. grad_output_transform_kernel  Z[ξ][f][p] = (A dY_p Aᵀ)[ξ] for the 2×2 block of dY at output block p;
//   6. 16·S GEMMs                    ∂U[ξ][s] (F × C) = Z[ξ][s] (F × chunk) · V[ξ][s]ᵀ (chunk × C): the blocks
//                                    cut into S chunks (Chunks), so that the products, F × C each, are enough
//                                    of them to fill the GPU while each sums over thousands of blocks;
//   7. grad_filter_transform_kernel  dW[f][c] = Gᵀ (Σ_s ∂U[ξ][s][f][c]) G, the chunks summed in a fixed order.
// Every kernel is a grid-stride loop with the tile index p fastest, so that a warp's writes of V and reads
// of M are contiguous. The buffers (sizes below) hold 16 floats a tile and channel: four times the input
// and the output, the price of the 2.25 times fewer multiplications.
#pragma once

#include <cstdint>

#include "common/conv2d_index.h"
#include "common/winograd.h"
#include "cuda/emulatable.cuh"

namespace torch_cs231n {
namespace cuda {
namespace winograd_conv {

constexpr int kThreads = 256;
constexpr int kPositions = 16;  // ξ: the 4×4 transformed tile

// The layers it does: 3×3, stride 1, dilation 1, one group, padding at most 2 (so that d_input's, 2 - p, is
// a padding too).
inline bool fits(const Conv2dGeometry& g) {
  return g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 && g.groups == 1 && g.ph >= 0 &&
         g.ph <= 2 && g.pw >= 0 && g.pw <= 2;
}

// The 2×2 output blocks of an image of `samples` planes of h × w outputs.
struct Blocks {
  int64_t samples, rows, cols;  // rows = ceil(h / 2), cols = ceil(w / 2)
  __host__ __device__ int64_t count() const { return samples * rows * cols; }
  // block p = (n, b_h, b_w): its sample, and the position of its first output (2·b_h, 2·b_w)
  __host__ __device__ void place(int64_t p, int64_t& n, int64_t& top, int64_t& left) const {
    n = p / (rows * cols);
    const int64_t in_plane = p - n * rows * cols, b_h = in_plane / cols;
    top = 2 * b_h;
    left = 2 * (in_plane - b_h * cols);
  }
};
inline Blocks blocks_of(int64_t samples, int64_t h, int64_t w) { return {samples, (h + 1) / 2, (w + 1) / 2}; }

// How V (or Z) lays the blocks out: in `count` chunks of `size` blocks, [ξ][s][channel][q] for block
// p = s·size + q, so that each of d_weight's GEMMs sums over one chunk (positions p past the last block hold
// zeros); the forward's and d_input's V is one chunk of all the blocks, [ξ][channel][p].
struct Chunks {
  int64_t count, size;
  __host__ __device__ int64_t blocks() const { return count * size; }
  // Item k = (s·channels + c)·size + q of a transform's loop: its channel c and block p.
  __host__ __device__ void split(int64_t k, int64_t channels, int64_t& c, int64_t& p) const {
    const int64_t per_chunk = channels * size, s = count == 1 ? 0 : k / per_chunk, rest = k - s * per_chunk;
    c = rest / size;
    p = s * size + (rest - c * size);
  }
};
inline Chunks one_chunk(const Blocks& blocks) { return {1, blocks.count()}; }

// d_weight's chunks: enough products (16 a chunk, each of ceil(F/128)·ceil(C/128) output tiles of 128 × 128)
// for `tiles_wanted` tiles in all (a few waves of the GPU's multiprocessors), each chunk at least `min_size`
// blocks deep, a multiple of 4 (rows of 16 bytes for cuBLAS).
inline Chunks grad_weight_chunks(const Conv2dGeometry& g, int64_t tiles_wanted, int64_t min_size = 512) {
  const int64_t blocks = blocks_of(g.n, g.oh, g.ow).count();
  const int64_t tiles = kPositions * ((g.f + 127) / 128) * ((g.c + 127) / 128);
  const int64_t deepest = blocks / min_size > 1 ? blocks / min_size : 1;
  int64_t count = (tiles_wanted + tiles - 1) / tiles;
  count = count < 1 ? 1 : (count > deepest ? deepest : count);
  const int64_t size = ((blocks + count - 1) / count + 3) / 4 * 4;
  return {(blocks + size - 1) / size, size};
}

// Buffer sizes, in floats, for one call (forward or d_input; `largest` covers both).
inline int64_t filter_size(const Conv2dGeometry& g) { return kPositions * g.f * g.c; }
inline int64_t input_size(const Conv2dGeometry& g) {  // V: the forward's over x, d_input's over dY
  const int64_t forward = g.c * blocks_of(g.n, g.oh, g.ow).count(), grad = g.f * blocks_of(g.n, g.h, g.w).count();
  return kPositions * (forward > grad ? forward : grad);
}
inline int64_t output_size(const Conv2dGeometry& g) {  // M: the forward's F per block, d_input's C
  const int64_t forward = g.f * blocks_of(g.n, g.oh, g.ow).count(), grad = g.c * blocks_of(g.n, g.h, g.w).count();
  return kPositions * (forward > grad ? forward : grad);
}

// d_weight's buffers, in floats: V over x and Z over dY, both in `chunks`, and the products' F × C partial
// sums, 16 a chunk.
inline int64_t grad_weight_input_size(const Conv2dGeometry& g, Chunks chunks) {
  return kPositions * g.c * chunks.blocks();
}
inline int64_t grad_weight_output_size(const Conv2dGeometry& g, Chunks chunks) {
  return kPositions * g.f * chunks.blocks();
}
inline int64_t grad_weight_partial_size(const Conv2dGeometry& g, Chunks chunks) {
  return kPositions * chunks.count * g.f * g.c;
}

// The grid of a helper kernel's grid-stride loop over n items (at most 4096 blocks).
inline dim3 grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > 4096 ? 4096 : blocks)));
}

// U[ξ][o][i] for outs × ins filters of w (F × C × 3 × 3): g = w[o][i] (flipped false), or w[i][o] turned by
// 180 degrees (flipped: d_input's, with outs = C and ins = F).
__global__ void filter_transform_kernel(const float* __restrict__ w, float* __restrict__ u, int64_t outs, int64_t ins,
                                        bool flipped) {
  const int64_t total = outs * ins;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = k / ins, i = k - o * ins;
    const float* src = w + (flipped ? i * outs + o : k) * 9;
    float g[3][3], t[4][4];
    for (int r = 0; r < 3; ++r) {
      for (int s = 0; s < 3; ++s) g[r][s] = flipped ? src[(2 - r) * 3 + (2 - s)] : src[r * 3 + s];
    }
    winograd::filter_tile(g, t);
    for (int xi = 0; xi < kPositions; ++xi) u[xi * total + k] = t[xi / 4][xi % 4];
  }
}

// Item k of a transform's loop over the `channels` planes (h × w) of src and the blocks laid out in
// `chunks`: the R × S values of its plane from (top + dh, left + dw) for its block's first output (top,
// left), zeros outside the plane and past the last block.
template <int R, int S>
__host__ __device__ void block_values(const float* src, int64_t channels, int64_t h, int64_t w, int64_t dh, int64_t dw,
                                      const Blocks& blocks, const Chunks& chunks, int64_t k, float (&d)[R][S]) {
  int64_t c, p, n, top, left;
  chunks.split(k, channels, c, p);
  for (int r = 0; r < R; ++r) {
    for (int s = 0; s < S; ++s) d[r][s] = 0.f;
  }
  if (p >= blocks.count()) return;
  blocks.place(p, n, top, left);
  const float* plane = src + (n * channels + c) * h * w;
  for (int r = 0; r < R; ++r) {
    for (int s = 0; s < S; ++s) {
      const int64_t i = top + dh + r, j = left + dw + s;
      if (i >= 0 && i < h && j >= 0 && j < w) d[r][s] = plane[i * w + j];
    }
  }
}

// V[ξ] = Bᵀ d B for the `channels` planes (h × w) of src and every block p = (n, b_h, b_w) of `blocks`, d
// its 4 × 4 tile from (2·b_h - ph, 2·b_w - pw) (conv_in_index at the block's first output), laid out in
// `chunks`.
__global__ void input_transform_kernel(const float* __restrict__ src, float* __restrict__ v, int64_t channels,
                                       int64_t h, int64_t w, int64_t ph, int64_t pw, Blocks blocks, Chunks chunks) {
  const int64_t total = channels * chunks.blocks();
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float d[4][4], t[4][4];
    block_values(src, channels, h, w, -ph, -pw, blocks, chunks, k, d);
    winograd::input_tile(d, t);
    for (int xi = 0; xi < kPositions; ++xi) v[xi * total + k] = t[xi / 4][xi % 4];
  }
}

// Z[ξ] = A dY Aᵀ for the `outs` planes (h × w, the output's) of dy and every 2×2 block of `blocks` (zeros
// past the plane's edge), laid out in `chunks`.
__global__ void grad_output_transform_kernel(const float* __restrict__ dy, float* __restrict__ z, int64_t outs,
                                             int64_t h, int64_t w, Blocks blocks, Chunks chunks) {
  const int64_t total = outs * chunks.blocks();
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float d[2][2], t[4][4];
    block_values(dy, outs, h, w, 0, 0, blocks, chunks, k, d);
    winograd::grad_output_tile(d, t);
    for (int xi = 0; xi < kPositions; ++xi) z[xi * total + k] = t[xi / 4][xi % 4];
  }
}

// dW[o][i] (outs × ins × 3 × 3) = Gᵀ (Σ_s ∂U[ξ][s][o][i]) G from the chunks' partial sums (`count` of them).
__global__ void grad_filter_transform_kernel(const float* __restrict__ partial, float* __restrict__ dw, int64_t outs,
                                             int64_t ins, int64_t count) {
  const int64_t total = outs * ins;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float t[4][4], g[3][3];
    for (int xi = 0; xi < kPositions; ++xi) {
      float sum = 0.f;
      for (int64_t s = 0; s < count; ++s) sum += partial[(xi * count + s) * total + k];
      t[xi / 4][xi % 4] = sum;
    }
    winograd::grad_filter_tile(t, g);
    for (int r = 0; r < 3; ++r) {
      for (int s = 0; s < 3; ++s) dw[k * 9 + r * 3 + s] = g[r][s];
    }
  }
}

// dst[n][o] (planes of h × w) = Aᵀ M A over each block, plus bias[o] (or nothing), from M[ξ][o][p].
__global__ void output_transform_kernel(const float* __restrict__ m, const float* __restrict__ bias,
                                        float* __restrict__ dst, int64_t outs, int64_t h, int64_t w, Blocks blocks) {
  const int64_t count = blocks.count(), total = outs * count;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = k / count;
    int64_t n, top, left;
    blocks.place(k - o * count, n, top, left);
    float t[4][4], y[2][2];
    for (int xi = 0; xi < kPositions; ++xi) t[xi / 4][xi % 4] = m[xi * total + k];
    winograd::output_tile(t, y);
    const float b = bias != nullptr ? bias[o] : 0.f;
    float* plane = dst + (n * outs + o) * h * w;
    for (int r = 0; r < 2; ++r) {
      for (int s = 0; s < 2; ++s) {
        const int64_t i = top + r, j = left + s;
        if (i < h && j < w) plane[i * w + j] = y[r][s] + b;
      }
    }
  }
}

// dst (n × outs × oh × ow) = the stride-1 3×3 correlation of src (n × ins × h × w, padding ph, pw) with the
// filters whose transforms are u, plus bias. gemm(m, n, k, a, b, c) computes the 16 row-major products
// c[ξ] (m × n) = a[ξ] (m × k) · b[ξ] (k × n), matrices packed one after another.
template <typename Gemm>
void correlate(const float* src, int64_t n, int64_t ins, int64_t h, int64_t w, int64_t ph, int64_t pw, const float* u,
               const float* bias, float* dst, int64_t outs, int64_t oh, int64_t ow, float* v, float* m, Gemm&& gemm,
               cudaStream_t stream) {
  const Blocks blocks = blocks_of(n, oh, ow);
  auto* input = &input_transform_kernel;
  TORCH_CS231N_LAUNCH(input, grid_for(ins * blocks.count()), kThreads, stream, src, v, ins, h, w, ph, pw, blocks,
                      one_chunk(blocks));
  gemm(outs, blocks.count(), ins, u, v, m);
  auto* output = &output_transform_kernel;
  TORCH_CS231N_LAUNCH(output, grid_for(outs * blocks.count()), kThreads, stream, m, bias, dst, outs, oh, ow, blocks);
}

// y = x ⋆ W + b. u, v, m: filter_size(g), input_size(g) and output_size(g) floats.
template <typename Gemm>
void forward(const float* x, const float* w, const float* bias, float* y, const Conv2dGeometry& g, float* u, float* v,
             float* m, Gemm&& gemm, cudaStream_t stream) {
  auto* filters = &filter_transform_kernel;
  TORCH_CS231N_LAUNCH(filters, grid_for(g.f * g.c), kThreads, stream, w, u, g.f, g.c, false);
  correlate(x, g.n, g.c, g.h, g.w, g.ph, g.pw, u, bias, y, g.f, g.oh, g.ow, v, m, gemm, stream);
}

// d_input: dY correlated with the transposed, flipped filters, with padding 2 - p (so that its output is
// H × W: oH + 2(2 - p) - 2 = H + 2p - 2 + 2 - 2p).
template <typename Gemm>
void grad_input(const float* dy, const float* w, float* dx, const Conv2dGeometry& g, float* u, float* v, float* m,
                Gemm&& gemm, cudaStream_t stream) {
  auto* filters = &filter_transform_kernel;
  TORCH_CS231N_LAUNCH(filters, grid_for(g.f * g.c), kThreads, stream, w, u, g.c, g.f, true);
  correlate(dy, g.n, g.f, g.oh, g.ow, 2 - g.ph, 2 - g.pw, u, nullptr, dx, g.c, g.h, g.w, v, m, gemm, stream);
}

// d_weight (F × C × 3 × 3) = Σ over x's blocks of Gᵀ [(A dY Aᵀ) ⊙ (Bᵀ d B)] G. v, z, partial:
// grad_weight_input_size, grad_weight_output_size and grad_weight_partial_size floats for `chunks`.
// gemm_nt(m, n, k, batch, a, b, c) computes the row-major products c[j] (m × n) = a[j] (m × k) · b[j]ᵀ
// (b[j]: n × k) for j < batch, matrices packed one after another.
template <typename GemmNT>
void grad_weight(const float* dy, const float* x, float* dw, const Conv2dGeometry& g, Chunks chunks, float* v, float* z,
                 float* partial, GemmNT&& gemm_nt, cudaStream_t stream) {
  const Blocks blocks = blocks_of(g.n, g.oh, g.ow);
  auto* input = &input_transform_kernel;
  TORCH_CS231N_LAUNCH(input, grid_for(g.c * chunks.blocks()), kThreads, stream, x, v, g.c, g.h, g.w, g.ph, g.pw, blocks,
                      chunks);
  auto* output = &grad_output_transform_kernel;
  TORCH_CS231N_LAUNCH(output, grid_for(g.f * chunks.blocks()), kThreads, stream, dy, z, g.f, g.oh, g.ow, blocks,
                      chunks);
  gemm_nt(g.f, g.c, chunks.size, kPositions * chunks.count, z, v, partial);
  auto* filters = &grad_filter_transform_kernel;
  TORCH_CS231N_LAUNCH(filters, grid_for(g.f * g.c), kThreads, stream, partial, dw, g.f, g.c, chunks.count);
}

}  // namespace winograd_conv
}  // namespace cuda
}  // namespace torch_cs231n
