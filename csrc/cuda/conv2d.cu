// Conv2d on CUDA: im2col + GEMM (cuBLAS, called by cuda/blas.cuh), and direct depthwise kernels; the
// implicit GEMM and the depthwise tiles (below) are the defaults where they apply.
//
// Every kernel here is a grid-stride loop over the per-element math of common/conv2d.h (conv_in_index,
// col2im_value, depthwise_value, depthwise_grad_input_value), the same index maps that the CPU loops use
// and the CPU tests cover. docs/conv2d.md derives the formulas.
//
// The batch is processed in chunks of nb samples, nb chosen so that the column buffer stays under
// kColumnBudget elements whatever N is. Its layout puts the sample inside the row, col_t[r][s][q]
// (r = (c, t_h, t_w), q = (o_h, o_w)), so that each product below is one cuBLAS call per chunk and group:
//     forward   y[s]_g = W_g · col_t[:, s]_g             (batched over s: rows of B lie nb*cols apart)
//     d_input   d_col_t[:, s]_g = W_gᵀ · dY[s]_g, then d_x = col2im(d_col_t)   (a gather: deterministic)
//     d_weight  d_W_g += dY'_g · col_tᵀ_g                  (one GEMM of depth nb*cols, dY' = dY as [F][nb][cols];
//                                                          accumulated in float for half/bfloat16)
// A 1x1 filter with stride 1 and no padding needs no columns: the input is its own column matrix.
// No atomics anywhere, so every result is deterministic. float32 GEMMs run in TF32 when
// torch.backends.cudnn.allow_tf32 says so, as torch's own convolutions do (cuda/blas.cuh).
//
// Faster kernels that passed `make gpu-check` on an H200 (2026-11-30) are the defaults where they apply;
// an environment variable still chooses either way, and chooses the candidates that wait for a GPU
// (docs/conv2d.md, README):
//     TORCH_CS231N_CUDA_CONV       by default Winograd's forward and d_input for float32 3x3 stride-1 layers
//                                  with TF32 off (cuda/conv2d_winograd.h), implicit GEMMs, no column buffer,
//                                  for the other float32 layers but 1x1 ones (cuda/conv2d_implicit_gemm.h);
//                                  =implicit every layer it can do, =cublas none, =winograd Winograd with
//                                  TF32 too, on 128+ channels and filters (a candidate)
//     TORCH_CS231N_CUDA_DEPTHWISE  depthwise by shared-memory tiles (cuda/conv2d_depthwise.cuh): the tall
//                                  tiles by default, =tiles the earlier ones, =lines the line kernels below
//     candidates: TORCH_CS231N_CUDA_CONV_DW=winograd (d_W by Winograd), TORCH_CS231N_CUDA_CONV_DX=gather (the
//                 few channels' d_x, cuda/conv2d_few_channels.cuh), TORCH_CS231N_CUDA_POINTWISE_DW=samples,
//                 TORCH_CS231N_CUDA_CONV_LOADS=async and TORCH_CS231N_CUDA_CONV_LAYOUT=nhwc (the implicit
//                 GEMM's cp.async copies and channels-last copies, cuda/conv2d_implicit_gemm.cu)
//
// Memory format: computed in NCHW; the output, d_input and d_W are handed back in torch's format
// (conv2d_memory_format: channels_last when the input or the weight is, NCHW for float64), by a copy.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/conv2d.h"
#include "common/grads.h"
#include "cuda/blas.cuh"
#include "cuda/conv2d_depthwise.cuh"
#include "cuda/conv2d_few_channels.cuh"
#include "cuda/conv2d_implicit_gemm.h"
#include "cuda/conv2d_winograd.h"
#include "cuda/launch.cuh"

namespace torch_cs231n {
namespace {

// Column buffer bound, in elements (128 Mi: 512 MiB in float32).
constexpr int64_t kColumnBudget = int64_t(1) << 27;

// ------------------------------------------------------------------------------------------- kernels
// Depthwise forward: one warp per output line (n, f, o_h), line = (n * F + f) * oH + o_h.
template <typename T>
__global__ void depthwise_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                         T* __restrict__ y, Conv2dGeometry g) {
  using acc_t = at::acc_type<T, true>;
  const int64_t lines = g.n * g.f * g.oh, m = g.f / g.c;
  for (int64_t line = cuda::first_line(); line < lines; line += cuda::line_step()) {
    const int64_t o_h = line % g.oh, nf = line / g.oh;
    const int64_t n = nf / g.f, f = nf % g.f;
    const T* x_plane = x + (n * g.c + f / m) * g.h * g.w;
    const acc_t bias = b != nullptr ? static_cast<acc_t>(b[f]) : acc_t(0);
    for (int64_t o_w = cuda::lane(); o_w < g.ow; o_w += cuda::kWarp) {
      const acc_t acc = bias + depthwise_value<T, acc_t>(x_plane, w + f * g.taps(), g, o_h, o_w);
      y[line * g.ow + o_w] = static_cast<T>(acc);
    }
  }
}

// Depthwise d_x: one warp per input line (n, c, i_h), line = (n * C + c) * H + i_h, each value gathering
// from the m filters of c.
template <typename T>
__global__ void depthwise_grad_input_kernel(const T* __restrict__ dy, const T* __restrict__ w, T* __restrict__ dx,
                                            Conv2dGeometry g) {
  using acc_t = at::acc_type<T, true>;
  const int64_t lines = g.n * g.c * g.h, m = g.f / g.c, plane_out = g.oh * g.ow;
  for (int64_t line = cuda::first_line(); line < lines; line += cuda::line_step()) {
    const int64_t i_h = line % g.h, nc = line / g.h;
    const int64_t n = nc / g.c, c = nc % g.c;
    for (int64_t i_w = cuda::lane(); i_w < g.w; i_w += cuda::kWarp) {
      acc_t acc = 0;
      for (int64_t j = 0; j < m; ++j) {
        const int64_t f = c * m + j;
        acc += depthwise_grad_input_value<T, acc_t>(dy + (n * g.f + f) * plane_out, w + f * g.taps(), g, i_h, i_w);
      }
      dx[line * g.w + i_w] = static_cast<T>(acc);
    }
  }
}

// Depthwise d_W[f, t] = Σ_{n, o_h, o_w} dY[n, f, o_h, o_w] · x[n, f/m, i_h, i_w]: one block per (f, t), its
// warps taking the lines (n, o_h) in turn and their lanes the o_w, then a fixed-order tree reduction in
// shared memory (deterministic, no atomics).
template <typename T>
__global__ void depthwise_grad_weight_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dw,
                                             Conv2dGeometry g) {
  using acc_t = at::acc_type<T, true>;
  __shared__ acc_t partial[cuda::kThreads];
  const int64_t taps = g.taps(), m = g.f / g.c;
  const int64_t f = blockIdx.x / taps, t = blockIdx.x % taps;
  const int64_t th = t / g.kw, tw = t % g.kw, c = f / m;
  const int64_t warps = blockDim.x / cuda::kWarp, lines = g.n * g.oh;
  acc_t acc = 0;
  for (int64_t line = threadIdx.x / cuda::kWarp; line < lines; line += warps) {
    const int64_t n = line / g.oh, o_h = line % g.oh;
    const int64_t i_h = conv_in_index(o_h, th, g.sh, g.ph, g.dh);
    if (i_h < 0 || i_h >= g.h) continue;
    const T* dy_row = dy + ((n * g.f + f) * g.oh + o_h) * g.ow;
    const T* x_row = x + ((n * g.c + c) * g.h + i_h) * g.w;
    for (int64_t o_w = cuda::lane(); o_w < g.ow; o_w += cuda::kWarp) {
      const int64_t i_w = conv_in_index(o_w, tw, g.sw, g.pw, g.dw);
      if (i_w >= 0 && i_w < g.w) acc += static_cast<acc_t>(dy_row[o_w]) * static_cast<acc_t>(x_row[i_w]);
    }
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) dw[blockIdx.x] = static_cast<T>(partial[0]);
}

// ------------------------------------------------------------------------------------------- helpers
int64_t chunk_size(const Conv2dGeometry& g) {
  const int64_t per_sample = std::max<int64_t>(1, g.col_rows() * g.col_cols());
  return std::max<int64_t>(1, std::min<int64_t>(g.n, kColumnBudget / per_sample));
}

// ------------------------------------------------------------------------------------------- GEMMs
// Two forms of im2col and of col2im, both run on an H200, chosen by the length of a line (an image row):
//   lines  one warp per line: the line's indices are decoded once, the lanes walk it. Faster when a row
//          fills a warp: 56-wide rows took 0.70 ms per im2col where the flat form took 0.84, 0.56 ms per
//          col2im against 0.87 (conv3x3 of the GPU suite).
//   flat   one thread per element, decoded with int32 divisions where the chunk allows. Faster for short
//          rows, where a warp per line leaves lanes idle: 14-wide rows, 0.41 ms per im2col against 1.08.

// col_t[r][s][q] = x[n0 + s, c, i_h, i_w] (0 in the padding), a warp per line (r, s, o_h) of o_w values:
// line = (r * nb + s) * oH + o_h, whose values start at col_t + line * oW.
template <typename T>
__global__ void im2col_t_lines_kernel(const T* __restrict__ x, T* __restrict__ col, Conv2dGeometry g, int64_t nb) {
  const int64_t lines = g.col_rows() * nb * g.oh;
  for (int64_t line = cuda::first_line(); line < lines; line += cuda::line_step()) {
    const int64_t o_h = line % g.oh, rs = line / g.oh;
    const int64_t s = rs % nb, r = rs / nb;
    const int64_t c = r / g.taps(), t = r % g.taps();
    const int64_t i_h = conv_in_index(o_h, t / g.kw, g.sh, g.ph, g.dh);
    const int64_t tw = t % g.kw;
    const bool row_inside = i_h >= 0 && i_h < g.h;
    const T* in = x + ((s * g.c + c) * g.h + (row_inside ? i_h : 0)) * g.w;
    T* out = col + line * g.ow;
    for (int64_t o_w = cuda::lane(); o_w < g.ow; o_w += cuda::kWarp) {
      const int64_t i_w = conv_in_index(o_w, tw, g.sw, g.pw, g.dw);
      out[o_w] = row_inside && i_w >= 0 && i_w < g.w ? in[i_w] : T(0);
    }
  }
}

// The same, a thread per element of col_t.
template <typename T, typename index_t>
__global__ void im2col_t_flat_kernel(const T* __restrict__ x, T* __restrict__ col, Conv2dGeometry g, index_t nb) {
  const index_t cols = g.col_cols(), ow = g.ow, kw = g.kw, taps = g.taps();
  const index_t total = static_cast<index_t>(g.col_rows()) * nb * cols;
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const index_t row = idx / cols, q = idx - row * cols;
    const index_t r = row / nb, s = row - r * nb;
    const index_t c = r / taps, t = r - c * taps;
    const index_t o_h = q / ow, o_w = q - o_h * ow;
    const int64_t i_h = conv_in_index(o_h, t / kw, g.sh, g.ph, g.dh);
    const int64_t i_w = conv_in_index(o_w, t % kw, g.sw, g.pw, g.dw);
    const bool inside = i_h >= 0 && i_h < g.h && i_w >= 0 && i_w < g.w;
    col[idx] = inside ? x[((static_cast<int64_t>(s) * g.c + c) * g.h + i_h) * g.w + i_w] : T(0);
  }
}

// d_x[n0 + s, c, i_h, i_w] gathered from d_col_t (rows nb*cols apart, sample s at offset s*cols), a warp per
// line (s, c, i_h) of d_x, whose values start at dx + line * W.
template <typename T>
__global__ void col2im_t_lines_kernel(const T* __restrict__ dcol, T* __restrict__ dx, Conv2dGeometry g, int64_t nb) {
  using acc_t = at::acc_type<T, true>;
  const int64_t lines = nb * g.c * g.h, cols = g.col_cols();
  for (int64_t line = cuda::first_line(); line < lines; line += cuda::line_step()) {
    const int64_t i_h = line % g.h, sc = line / g.h;
    const int64_t c = sc % g.c, s = sc / g.c;
    for (int64_t i_w = cuda::lane(); i_w < g.w; i_w += cuda::kWarp) {
      dx[line * g.w + i_w] = static_cast<T>(col2im_value<T, acc_t>(dcol + s * cols, g, c, i_h, i_w, nb * cols));
    }
  }
}

// The same, a thread per element of d_x.
template <typename T, typename index_t>
__global__ void col2im_t_flat_kernel(const T* __restrict__ dcol, T* __restrict__ dx, Conv2dGeometry g, index_t nb) {
  using acc_t = at::acc_type<T, true>;
  const index_t plane = g.h * g.w, w = g.w, C = g.c;
  const index_t total = nb * C * plane;
  const int64_t cols = g.col_cols();
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const index_t sc = idx / plane, rem = idx - sc * plane;
    const index_t s = sc / C, c = sc - s * C;
    const index_t i_h = rem / w, i_w = rem - i_h * w;
    dx[idx] = static_cast<T>(col2im_value<T, acc_t>(dcol + s * cols, g, c, i_h, i_w, nb * cols));
  }
}

// Whether a grid-stride loop of `blocks` blocks over n items can count in int32: every index it forms, the
// last step's overshoot included, stays below 2^31.
bool fits_int32(int64_t n, unsigned int blocks) {
  return n + static_cast<int64_t>(blocks) * cuda::kThreads <= std::numeric_limits<int32_t>::max();
}

template <typename T>
void launch_im2col_t(const T* x, T* col, const Conv2dGeometry& g, int64_t nb, cudaStream_t stream) {
  const int64_t total = g.col_rows() * nb * g.col_cols();
  const unsigned int blocks = cuda::grid_for(total);
  if (g.ow >= cuda::kWarp) {
    im2col_t_lines_kernel<T>
        <<<cuda::grid_for_lines(g.col_rows() * nb * g.oh), cuda::kThreads, 0, stream>>>(x, col, g, nb);
  } else if (fits_int32(total, blocks)) {
    im2col_t_flat_kernel<T, int32_t><<<blocks, cuda::kThreads, 0, stream>>>(x, col, g, static_cast<int32_t>(nb));
  } else {
    im2col_t_flat_kernel<T, int64_t><<<blocks, cuda::kThreads, 0, stream>>>(x, col, g, nb);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_col2im_t(const T* dcol, T* dx, const Conv2dGeometry& g, int64_t nb, cudaStream_t stream) {
  const int64_t total = nb * g.c * g.h * g.w;
  const unsigned int blocks = cuda::grid_for(total);
  if (g.w >= cuda::kWarp) {
    col2im_t_lines_kernel<T><<<cuda::grid_for_lines(nb * g.c * g.h), cuda::kThreads, 0, stream>>>(dcol, dx, g, nb);
  } else if (fits_int32(std::max(total, g.col_rows() * nb * g.col_cols()), blocks)) {  // d_col_t's offsets too
    col2im_t_flat_kernel<T, int32_t><<<blocks, cuda::kThreads, 0, stream>>>(dcol, dx, g, static_cast<int32_t>(nb));
  } else {
    col2im_t_flat_kernel<T, int64_t><<<blocks, cuda::kThreads, 0, stream>>>(dcol, dx, g, nb);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A 1x1 layer's d_W, Σ_s dY[s] · x[s]ᵀ, either from x and dY transposed so that the sum over samples and
// pixels is one GEMM (the default: they move (C + F)·H·W values a sample), or by samples: one batched GEMM
// of each sample's product as x and dY lie, into F·C partial sums a sample that are then added
// (TORCH_CS231N_CUDA_POINTWISE_DW=samples, a candidate, for the layers where F·C < (C + F)·H·W: the suite's
// (128,256,28,28) 1x1 layer moves 9 times fewer values so, where its TF32 step took 0.42-0.61 ms against
// cuDNN's 0.26 on the H200).
bool pointwise_dw_by_samples(const Conv2dGeometry& g) {
  const int named = cuda::kernel_named("TORCH_CS231N_CUDA_POINTWISE_DW", {"samples", "transposed"});
  const int64_t per_sample = g.f * g.c_per_group(), transposed = (g.c + g.f) * g.col_cols();
  return named == 0 && conv2d_is_pointwise(g) && per_sample < transposed;
}

// d_input of a layer of few channels (a stem) by the gather of cuda/conv2d_few_channels.cuh, with no column
// buffer: TORCH_CS231N_CUDA_CONV_DX=gather (a candidate, not yet run on a GPU; unset or `gemm`: the cuBLAS
// route's column buffer and col2im), float32 layers that fit (1 to 4 channels, dilation 1).
bool few_channels_grad_input_chosen(const Conv2dGeometry& g, const at::Tensor& x) {
  if (cuda::kernel_named("TORCH_CS231N_CUDA_CONV_DX", {"gather", "gemm"}) != 0) return false;
  return x.scalar_type() == at::kFloat && cuda::few_channels::fits(g);
}

void few_channels_grad_input(const at::Tensor& dy, const at::Tensor& w, at::Tensor& dx, const Conv2dGeometry& g,
                             cudaStream_t stream) {
  namespace fc = cuda::few_channels;
  // W as [f][t_h][t_w][4]: each tap's channels side by side, zeros past C (a fresh tensor: 16-byte aligned)
  const at::Tensor taps = at::constant_pad_nd(w.permute({0, 2, 3, 1}), {0, fc::kMaxChannels - g.c}).contiguous();
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(taps.const_data_ptr()) % alignof(fc::Channels) == 0);
  fc::grad_input(dy.const_data_ptr<float>(), reinterpret_cast<const fc::Channels*>(taps.const_data_ptr<float>()),
                 dx.mutable_data_ptr<float>(), g, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void gemm_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, at::Tensor& y,
                  const Conv2dGeometry& g, cudaStream_t stream) {
  const bool pointwise = conv2d_is_pointwise(g), tf32 = cuda::conv_allows_tf32();
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps(), cols = g.col_cols();
  const int64_t nb_max = pointwise ? g.n : chunk_size(g);
  at::Tensor col = pointwise ? at::Tensor() : at::empty({g.col_rows(), nb_max, cols}, x.options());
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  for (int64_t n0 = 0; n0 < g.n; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, g.n - n0);
    if (!pointwise) launch_im2col_t<T>(xp + n0 * g.c * g.h * g.w, col.mutable_data_ptr<T>(), g, nb, stream);
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const cuda::Operand<T> a{wp + grp * fg * kg, kg, 0, false};
      // The input is its own column matrix when the filter is 1x1 with stride 1 and no padding.
      const cuda::Operand<T> b =
          pointwise ? cuda::Operand<T>{xp + (n0 * g.c + grp * kg) * cols, cols, g.c * cols, false}
                    : cuda::Operand<T>{col.const_data_ptr<T>() + grp * kg * nb * cols, nb * cols, cols, false};
      cuda::gemm_batched<T>(fg, cols, kg, a, b, 0.f, yp + (n0 * g.f + grp * fg) * cols, cols, g.f * cols, nb, tf32);
    }
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->view({1, g.f, 1, 1}));
}

template <typename T>
void gemm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, at::Tensor& dx, at::Tensor& dw,
                   const Conv2dGeometry& g, bool need_dx, bool need_dw, cudaStream_t stream) {
  const bool pointwise = conv2d_is_pointwise(g), tf32 = cuda::conv_allows_tf32();
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps(), cols = g.col_cols();
  const int64_t nb_max = chunk_size(g);
  // Columns for d_W (im2col, or the input itself regrouped for 1x1), d_col for d_x: one buffer, in turn;
  // a 1x1 layer needs none for d_x, nor for d_W by samples.
  const bool col_needed = !pointwise || (need_dw && !pointwise_dw_by_samples(g));
  at::Tensor col = col_needed ? at::empty({g.col_rows(), nb_max, cols}, x.options()) : at::Tensor();
  // d_W accumulates over the chunks in float for half/bfloat16, in the dtype itself otherwise.
  const auto acc_dtype = at::toAccumulateType(x.scalar_type(), /*is_cuda=*/true);
  at::Tensor dw_acc =
      need_dw ? (acc_dtype == x.scalar_type() ? dw : at::empty({g.f, kg}, x.options().dtype(acc_dtype))) : at::Tensor();
  using acc_t = at::acc_type<T, true>;
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const T* dyp = dy.const_data_ptr<T>();
  const bool dw_by_samples = need_dw && pointwise_dw_by_samples(g);
  for (int64_t n0 = 0; n0 < g.n; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, g.n - n0);
    const at::Tensor dy_chunk = dy.narrow(0, n0, nb).view({nb, g.f, cols});
    if (dw_by_samples) {
      // d_W_s = dY[s]_g (Fg × HW) · x[s]_gᵀ (HW × Cg) for each sample of the chunk, as they lie, then summed
      at::Tensor partial = at::empty({nb, g.f, kg}, x.options().dtype(acc_dtype));
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const cuda::Operand<T> a{dyp + (n0 * g.f + grp * fg) * cols, cols, g.f * cols, false};
        const cuda::Operand<T> b{xp + (n0 * g.c + grp * kg) * cols, cols, g.c * cols, true};
        cuda::gemm_batched<T, acc_t>(fg, kg, cols, a, b, 0.f, partial.mutable_data_ptr<acc_t>() + grp * fg * kg, kg,
                                     g.f * kg, nb, tf32);
      }
      if (n0 == 0) {
        dw_acc.view({g.f, kg}).copy_(partial.sum(0));
      } else {
        dw_acc.view({g.f, kg}).add_(partial.sum(0));
      }
    } else if (need_dw) {
      if (pointwise) {
        // x[s][c][q] regrouped as col_t[c][s][q], dense for this chunk's nb like im2col's output
        col.view(-1)
            .narrow(0, 0, g.c * nb * cols)
            .view({g.c, nb, cols})
            .copy_(x.narrow(0, n0, nb).view({nb, g.c, cols}).transpose(0, 1));
      } else {
        launch_im2col_t<T>(xp + n0 * g.c * g.h * g.w, col.mutable_data_ptr<T>(), g, nb, stream);
      }
      const at::Tensor dy_t = dy_chunk.transpose(0, 1).contiguous();  // dY' [F][nb][cols]
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const cuda::Operand<T> a{dy_t.const_data_ptr<T>() + grp * fg * nb * cols, nb * cols, 0, false};
        const cuda::Operand<T> b{col.const_data_ptr<T>() + grp * kg * nb * cols, nb * cols, 0, true};
        cuda::gemm_batched<T, acc_t>(fg, kg, nb * cols, a, b, n0 == 0 ? 0.f : 1.f,
                                     dw_acc.mutable_data_ptr<acc_t>() + grp * fg * kg, kg, 0, 1, tf32);
      }
    }
    if (need_dx) {
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const cuda::Operand<T> a{wp + grp * fg * kg, kg, 0, true};
        const cuda::Operand<T> b{dyp + (n0 * g.f + grp * fg) * cols, cols, g.f * cols, false};
        if (pointwise) {  // d_x[s]_g = W_gᵀ · dY[s]_g directly: no columns, no col2im
          cuda::gemm_batched<T>(kg, cols, fg, a, b, 0.f, dx.mutable_data_ptr<T>() + (n0 * g.c + grp * kg) * cols, cols,
                                g.c * cols, nb, tf32);
        } else {
          cuda::gemm_batched<T>(kg, cols, fg, a, b, 0.f, col.mutable_data_ptr<T>() + grp * kg * nb * cols, nb * cols,
                                cols, nb, tf32);
        }
      }
      if (!pointwise)
        launch_col2im_t<T>(col.const_data_ptr<T>(), dx.mutable_data_ptr<T>() + n0 * g.c * g.h * g.w, g, nb, stream);
    }
  }
  if (need_dw && !dw_acc.is_same(dw)) dw.copy_(dw_acc.view(dw.sizes()));
}

// ------------------------------------------------------------------------------------- depthwise
// The kernels TORCH_CS231N_CUDA_DEPTHWISE chooses. tall (the default): the tall tiles of
// cuda/conv2d_depthwise.cuh where they fit (d_input: stride 1 as well), else the tiles, else the line
// kernels; on the H200 they took the (128,128,56,56) layer's forward+backward from 3.3 ms to 1.9 (torch
// 2.2). tiles (the default before): the tiles for 3x3 and 5x5 filters whose input region fits in shared
// memory (d_input: stride 1 as well), the line kernels above for the rest; they had taken that layer from 5.6
// to 3.3 ms. lines: the line kernels for everything.
enum class Depthwise { kLines, kTiles, kTall };
Depthwise depthwise_kernels(const Conv2dGeometry& g) {
  const int named = cuda::kernel_named("TORCH_CS231N_CUDA_DEPTHWISE", {"tiles", "lines", "tall"});
  if ((named == 2 || named == -1) && cuda::depthwise::tall_fit(g)) return Depthwise::kTall;
  if (named != 1 && cuda::depthwise::tiles_fit(g)) return Depthwise::kTiles;
  return Depthwise::kLines;
}

// f(std::integral_constant<int, k>{}) for the filter size k (3 or 5) of a tiles_fit or tall_fit geometry.
template <typename F>
void with_filter_size(const Conv2dGeometry& g, F&& f) {
  if (g.kh == 3) {
    f(std::integral_constant<int, 3>{});
  } else {
    f(std::integral_constant<int, 5>{});
  }
}

template <typename T>
void depthwise_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, at::Tensor& y,
                       const Conv2dGeometry& g, cudaStream_t stream) {
  const T* bias = b.has_value() ? b->const_data_ptr<T>() : nullptr;
  const Depthwise kernels = depthwise_kernels(g);
  if (kernels == Depthwise::kTall) {
    with_filter_size(g, [&](auto k) {
      cuda::depthwise::tall_forward<T, at::acc_type<T, true>, k, k>(x.const_data_ptr<T>(), w.const_data_ptr<T>(), bias,
                                                                    y.mutable_data_ptr<T>(), g, stream);
    });
  } else if (kernels == Depthwise::kTiles) {
    with_filter_size(g, [&](auto k) {
      cuda::depthwise::forward<T, at::acc_type<T, true>, k, k>(x.const_data_ptr<T>(), w.const_data_ptr<T>(), bias,
                                                               y.mutable_data_ptr<T>(), g, stream);
    });
  } else {
    depthwise_forward_kernel<T><<<cuda::grid_for_lines(g.n * g.f * g.oh), cuda::kThreads, 0, stream>>>(
        x.const_data_ptr<T>(), w.const_data_ptr<T>(), bias, y.mutable_data_ptr<T>(), g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void depthwise_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, at::Tensor& dx, at::Tensor& dw,
                        const Conv2dGeometry& g, bool need_dx, bool need_dw, cudaStream_t stream) {
  using acc_t = at::acc_type<T, true>;
  const Depthwise kernels = depthwise_kernels(g);
  const bool tiles = kernels != Depthwise::kLines && cuda::depthwise::tiles_fit(g);
  if (need_dx && kernels == Depthwise::kTall && cuda::depthwise::grad_input_tall_fit(g)) {
    with_filter_size(g, [&](auto k) {
      cuda::depthwise::tall_grad_input<T, acc_t, k, k>(dy.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                                       dx.mutable_data_ptr<T>(), g, stream);
    });
  } else if (need_dx && tiles && cuda::depthwise::grad_input_tiles_fit(g)) {
    with_filter_size(g, [&](auto k) {
      cuda::depthwise::grad_input<T, acc_t, k, k>(dy.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                                  dx.mutable_data_ptr<T>(), g, stream);
    });
  } else if (need_dx) {
    depthwise_grad_input_kernel<T><<<cuda::grid_for_lines(g.n * g.c * g.h), cuda::kThreads, 0, stream>>>(
        dy.const_data_ptr<T>(), w.const_data_ptr<T>(), dx.mutable_data_ptr<T>(), g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (need_dw && kernels != Depthwise::kLines) {
    // about four blocks per multiprocessor, each summing a slice of the (sample, tile) pairs of its filter
    const int64_t blocks = 4 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const bool tall = kernels == Depthwise::kTall;
    const int64_t slices =
        tall ? cuda::depthwise::tall_grad_weight_slices(g, blocks) : cuda::depthwise::grad_weight_slices(g, blocks);
    at::Tensor partial =
        at::empty({g.f * slices * g.taps()}, x.options().dtype(at::toAccumulateType(x.scalar_type(), true)));
    with_filter_size(g, [&](auto k) {
      if (tall) {
        cuda::depthwise::tall_grad_weight<T, acc_t, k, k>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(),
                                                          dw.mutable_data_ptr<T>(), g, slices,
                                                          partial.mutable_data_ptr<acc_t>(), stream);
      } else {
        cuda::depthwise::grad_weight<T, acc_t, k, k>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(),
                                                     dw.mutable_data_ptr<T>(), g, slices,
                                                     partial.mutable_data_ptr<acc_t>(), stream);
      }
    });
  } else if (need_dw) {
    depthwise_grad_weight_kernel<T><<<g.f * g.taps(), cuda::kThreads, 0, stream>>>(
        dy.const_data_ptr<T>(), x.const_data_ptr<T>(), dw.mutable_data_ptr<T>(), g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------- the ops
at::Tensor conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const Conv2dGeometry g = conv2d_geometry(input, weight, bias, stride, padding, dilation, groups, "conv2d_forward");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat format = conv2d_memory_format(input, weight);
  at::Tensor y = at::empty({g.n, g.f, g.oh, g.ow}, input.options());  // contiguous NCHW
  if (y.numel() == 0) return y.contiguous(format);
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  c10::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  if (cuda::winograd_chosen(g, x)) {
    cuda::winograd_forward(x, w, b, y, g, stream);
    return y.contiguous(format);
  }
  if (cuda::implicit_gemm_chosen(g, x) && g.f_per_group() >= cuda::kImplicitMinColumns) {
    cuda::implicit_gemm_forward(x, w, b, y, g, stream);
    return y.contiguous(format);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_forward_cuda", [&] {
    if (conv2d_is_depthwise(g)) {
      depthwise_forward<scalar_t>(x, w, b, y, g, stream);
    } else {
      gemm_forward<scalar_t>(x, w, b, y, g, stream);
    }
  });
  return y.contiguous(format);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_buffers(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  constexpr const char* op = "conv2d_backward";
  const Conv2dGeometry g = conv2d_geometry(input, weight, c10::nullopt, stride, padding, dilation, groups, op);
  check_conv2d_grad_output(grad_output, input, g, op);
  const c10::cuda::CUDAGuard guard(input.device());
  bool need_dx = output_mask[0], need_dw = output_mask[1];
  const bool need_db = output_mask[2];
  const at::MemoryFormat format = conv2d_memory_format(input, weight);
  auto [dx, dw, db] = conv2d_grad_buffers(input, weight, g, output_mask);
  // in NCHW here; handed back in torch's format
  auto in_format = [format](at::Tensor& t) { return t.dim() == 4 ? t.contiguous(format) : t; };
  if (g.n == 0 || g.f == 0 || g.c == 0) {
    dx.zero_();
    dw.zero_();
    db.zero_();
    return {in_format(dx), in_format(dw), db};
  }
  const at::Tensor dy = grad_output.contiguous();
  if (need_db) {  // d_b[f] = Σ_{n, o_h, o_w} dY[n, f, o_h, o_w], summed in float for half/bfloat16
    db.copy_(dy.sum({0, 2, 3}, /*keepdim=*/false, at::toAccumulateType(dy.scalar_type(), /*is_cuda=*/true)));
  }
  if (!need_dx && !need_dw) return {in_format(dx), in_format(dw), db};
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  // Winograd's d_input and d_W, or the few channels' d_input, where chosen; what is left as below, by the
  // route that would have done both
  if (need_dx && cuda::winograd_chosen(g, x)) {
    cuda::winograd_grad_input(dy, w, dx, g, stream);
    need_dx = false;
  }
  if (need_dx && few_channels_grad_input_chosen(g, x)) {
    few_channels_grad_input(dy, w, dx, g, stream);
    need_dx = false;
  }
  if (need_dw && cuda::winograd_grad_weight_chosen(g, x)) {
    cuda::winograd_grad_weight(dy, x, dw, g, stream);
    need_dw = false;
  }
  if (!need_dx && !need_dw) return {in_format(dx), in_format(dw), db};
  if (cuda::implicit_gemm_chosen(g, x)) {
    const bool implicit_dx = need_dx && g.c_per_group() >= cuda::kImplicitMinColumns;
    cuda::implicit_gemm_backward(dy, x, w, dx, dw, g, implicit_dx, need_dw, stream);
    if (need_dx && !implicit_dx) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_backward_cuda", [&] {
        gemm_backward<scalar_t>(dy, x, w, dx, dw, g, /*need_dx=*/true, /*need_dw=*/false, stream);
      });
    }
    return {in_format(dx), in_format(dw), db};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_backward_cuda", [&] {
    if (conv2d_is_depthwise(g)) {
      depthwise_backward<scalar_t>(dy, x, w, dx, dw, g, need_dx, need_dw, stream);
    } else {
      gemm_backward<scalar_t>(dy, x, w, dx, dw, g, need_dx, need_dw, stream);
    }
  });
  return {in_format(dx), in_format(dw), db};
}

// The op: the gradients output_mask asks for, None for the others (common/grads.h).
MaskedGrads conv2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, std::array<bool, 3> output_mask) {
  auto [dx, dw, db] =
      conv2d_backward_buffers(grad_output, input, weight, stride, padding, dilation, groups, output_mask);
  return masked_grads(dx, dw, db, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CUDA, m) {
  m.impl("conv2d_forward", &conv2d_forward_cuda);
  m.impl("conv2d_backward", &conv2d_backward_cuda);
}

}  // namespace torch_cs231n
