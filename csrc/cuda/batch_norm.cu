// Batch norm on CUDA: two-stage per-channel reductions (blocks of partial results, then one merge per
// channel) and grid-stride elementwise passes, all over the math of common/batch_norm.h.
//
//   statistics  grid (C, G): each block reduces a 1/G slice of one channel. Each thread runs Welford over
//               its values minus the channel's first value (the shift: a float mean of 1e4 would hold only
//               ~1e-3 of it, while x - shift is exact and small); the threads' states are merged with
//               Chan's formula (bn_merge), first across a warp with shuffles, then across the block's warps
//               through shared memory. A second kernel merges a channel's G block results in order, and
//               splits the mean into mean_hi = shift + mean_d rounded and the rest mean_lo (bn_split_mean).
//   normalise   y = ((x - mean_hi) - mean_lo) * (gamma * invstd) + beta per element (bn_normalize): for
//               a large mean this is closer to float64 than torch's CUDA kernel (test_large_mean_is_stable)
//   backward    the same two-stage shape for sum dy and sum dy (x - mean); then dx per element
//               (bn_backward_train / bn_backward_eval)
//   sync        synchronised batch norm's ops (ops.cpp) reuse these kernels: the statistics and the sums
//               stop after stage 2 so that the processes can exchange them; the merge is one thread per
//               channel over the processes' results (bn_merge), and d_input takes the global sums.
//   candidate   TORCH_CS231N_CUDA_BN=channels: one block per channel does a training pass, statistics
//               and outputs in one launch (below, "a block per channel")
//
// Statistics, parameters and accumulators are at::acc_type: float for float, half and bfloat16 inputs,
// double for double. Indices are int64. The input is made dense in the output's layout first
// (common/batch_norm_args.h): channel-first (N, C, S) or channel-last (N, S, C).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include "common/batch_norm.h"
#include "common/batch_norm_args.h"
#include "common/checks.h"
#include "common/layout.h"
#include "cuda/launch.cuh"

namespace torch_cs231n {
namespace {

using cuda::kWarp;
constexpr int kWarps = cuda::kThreads / kWarp;

// The memory offset of the m-th value (m in [0, N*S)) of channel c.
struct ChannelIndex {
  int64_t C, S;
  bool channels_last;
  __device__ int64_t operator()(int64_t c, int64_t m) const {
    const int64_t n = m / S, s = m - n * S;
    return channels_last ? (n * S + s) * C + c : (n * C + c) * S + s;
  }
  // The channel of the value at memory offset i.
  __device__ int64_t channel(int64_t i) const { return channels_last ? i % C : (i / S) % C; }
};

// The shift of channel c's statistics: its first value, an approximate mean that every block reads alike.
template <typename scalar_t, typename acc_t>
__device__ acc_t channel_shift(const scalar_t* __restrict__ x, ChannelIndex idx, int64_t c) {
  return static_cast<acc_t>(x[idx(c, 0)]);
}

template <typename acc_t>
__device__ BnStats<acc_t> warp_merge(BnStats<acc_t> s) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    BnStats<acc_t> o;
    o.n = __shfl_down_sync(0xffffffffu, s.n, offset);
    o.mean = __shfl_down_sync(0xffffffffu, s.mean, offset);
    o.m2 = __shfl_down_sync(0xffffffffu, s.m2, offset);
    s = bn_merge(s, o);
  }
  return s;
}

template <typename acc_t>
__device__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// The (n, mean, M2) of x - shift over the values m = first, first + step, ... < M of channel c, each thread
// its own, merged across the block: the result is thread 0's.
template <typename scalar_t, typename acc_t>
__device__ BnStats<acc_t> block_stats(const scalar_t* __restrict__ x, ChannelIndex idx, int64_t c, int64_t M,
                                      acc_t shift, int64_t first, int64_t step) {
  BnStats<acc_t> s{0, 0, 0};
  for (int64_t m = first; m < M; m += step) s = bn_welford_add(s, static_cast<acc_t>(x[idx(c, m)]) - shift);
  s = warp_merge(s);
  __shared__ acc_t sh_n[kWarps], sh_mean[kWarps], sh_m2[kWarps];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    sh_n[warp] = s.n;
    sh_mean[warp] = s.mean;
    sh_m2[warp] = s.m2;
  }
  __syncthreads();
  BnStats<acc_t> t{0, 0, 0};
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) t = bn_merge(t, BnStats<acc_t>{sh_n[w], sh_mean[w], sh_m2[w]});
  }
  return t;
}

// Stage 1 of the statistics: block (c, g) writes the (n, mean, M2) of x - shift over its slice of channel c.
template <typename scalar_t, typename acc_t>
__global__ void stats_partial_kernel(const scalar_t* __restrict__ x, ChannelIndex idx, int64_t M,
                                     BnStats<acc_t>* __restrict__ partial) {
  const int64_t c = blockIdx.x;
  const int64_t G = gridDim.y;
  const acc_t shift = channel_shift<scalar_t, acc_t>(x, idx, c);
  const BnStats<acc_t> t = block_stats<scalar_t, acc_t>(
      x, idx, c, M, shift, static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x, G * blockDim.x);
  if (threadIdx.x == 0) partial[c * G + blockIdx.y] = t;
}

// Channel c's statistics from its G partial results, merged in order.
template <typename acc_t>
__device__ BnStats<acc_t> merge_partials(const BnStats<acc_t>* __restrict__ partial, int64_t c, int64_t G) {
  BnStats<acc_t> s{0, 0, 0};
  for (int64_t g = 0; g < G; ++g) s = bn_merge(s, partial[c * G + g]);
  return s;
}

template <typename acc_t>
__device__ acc_t biased_var(const BnStats<acc_t>& s) {
  return s.n > acc_t(0) ? s.m2 / s.n : acc_t(0);  // biased: this is what normalises
}

// Stage 2: one thread per channel merges its G partial results in order; the saved statistics, the
// mean's low part (bn_split_mean) and the normalisation's scale = gamma * invstd.
template <typename scalar_t, typename acc_t>
__global__ void stats_final_kernel(const scalar_t* __restrict__ x, ChannelIndex idx,
                                   const BnStats<acc_t>* __restrict__ partial, int64_t C, int64_t G, double eps,
                                   const acc_t* __restrict__ gamma, acc_t* __restrict__ mean,
                                   acc_t* __restrict__ mean_lo, acc_t* __restrict__ invstd, acc_t* __restrict__ var,
                                   acc_t* __restrict__ scale) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const BnStats<acc_t> s = merge_partials(partial, c, G);
  const acc_t v = biased_var(s);
  const acc_t is = bn_invstd<acc_t>(v, eps);
  const acc_t shift = s.n > acc_t(0) ? channel_shift<scalar_t, acc_t>(x, idx, c) : acc_t(0);
  bn_split_mean(shift, s.mean, &mean[c], &mean_lo[c]);
  var[c] = v;
  invstd[c] = is;
  scale[c] = is * gamma[c];
}

// Eval: scale = gamma / sqrt(running_var + eps) per channel.
template <typename acc_t>
__global__ void eval_scale_kernel(const acc_t* __restrict__ running_var, const acc_t* __restrict__ gamma, int64_t C,
                                  double eps, acc_t* __restrict__ scale) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) scale[c] = bn_invstd<acc_t>(running_var[c], eps) * gamma[c];
}

// mean_lo: the mean's low part (bn_split_mean), or null where the mean is one number (eval).
template <typename scalar_t, typename acc_t>
__global__ void normalize_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, ChannelIndex idx, int64_t n,
                                 const acc_t* __restrict__ mean, const acc_t* __restrict__ mean_lo,
                                 const acc_t* __restrict__ scale, const acc_t* __restrict__ beta) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t c = idx.channel(i);
    const acc_t lo = mean_lo != nullptr ? mean_lo[c] : acc_t(0);
    y[i] = static_cast<scalar_t>(bn_normalize(static_cast<acc_t>(x[i]), mean[c], lo, scale[c], beta[c]));
  }
}

// sum dy (into a) and sum dy (x - mean) (into p) over the values m = first, first + step, ... < M of channel
// c, each thread its own, added across the block: the result is thread 0's.
template <typename scalar_t, typename acc_t>
__device__ void block_grad_sums(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, ChannelIndex idx,
                                int64_t c, int64_t M, acc_t mu, int64_t first, int64_t step, acc_t& a, acc_t& p) {
  a = 0;
  p = 0;
  for (int64_t m = first; m < M; m += step) {
    const int64_t off = idx(c, m);
    const acc_t g = static_cast<acc_t>(dy[off]);
    a += g;
    p += g * (static_cast<acc_t>(x[off]) - mu);
  }
  a = warp_sum(a);
  p = warp_sum(p);
  __shared__ acc_t sh_a[kWarps], sh_p[kWarps];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    sh_a[warp] = a;
    sh_p[warp] = p;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0;
    p = 0;
    for (int w = 0; w < kWarps; ++w) {
      a += sh_a[w];
      p += sh_p[w];
    }
  }
}

// Stage 1 of the backward's sums: block (c, g) writes sum dy and sum dy (x - mean) of its slice.
template <typename scalar_t, typename acc_t>
__global__ void grad_sums_partial_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                         ChannelIndex idx, int64_t M, const acc_t* __restrict__ mean,
                                         acc_t* __restrict__ partial) {
  const int64_t c = blockIdx.x;
  const int64_t G = gridDim.y;
  acc_t a, p;
  block_grad_sums<scalar_t, acc_t>(dy, x, idx, c, M, mean[c],
                                   static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x, G * blockDim.x, a, p);
  if (threadIdx.x == 0) {
    partial[(c * G + blockIdx.y) * 2] = a;
    partial[(c * G + blockIdx.y) * 2 + 1] = p;
  }
}

// Stage 2: per channel, dgamma = invstd * sum dy (x - mean), dbeta = sum dy, and the constants of dx:
// k[0] = gamma * invstd, k[1] = sum dy / M, k[2] = invstd^2 * sum dy (x - mean) / M.
template <typename acc_t>
__device__ void set_grad_constants(acc_t* __restrict__ k, int64_t C, int64_t c, const BnGradConstants<acc_t>& v) {
  k[c] = v.gi;
  k[C + c] = v.dy_mean;
  k[2 * C + c] = v.proj;
}

// Channel c's two sums from its G partial results, added in order.
template <typename acc_t>
__device__ void add_partial_sums(const acc_t* __restrict__ partial, int64_t c, int64_t G, acc_t& a, acc_t& p) {
  a = 0;
  p = 0;
  for (int64_t g = 0; g < G; ++g) {
    a += partial[(c * G + g) * 2];
    p += partial[(c * G + g) * 2 + 1];
  }
}

template <typename acc_t>
__global__ void grad_sums_final_kernel(const acc_t* __restrict__ partial, int64_t C, int64_t G, int64_t M,
                                       const acc_t* __restrict__ gamma, const acc_t* __restrict__ invstd,
                                       acc_t* __restrict__ dgamma, acc_t* __restrict__ dbeta, acc_t* __restrict__ k) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t a, p;
  add_partial_sums(partial, c, G, a, p);
  const acc_t is = invstd[c];
  if (dgamma != nullptr) dgamma[c] = p * is;
  if (dbeta != nullptr) dbeta[c] = a;
  set_grad_constants(k, C, c, bn_grad_constants<acc_t>(a, p, static_cast<acc_t>(M), gamma[c], is));
}

// Eval without dgamma/dbeta: only k[0] = gamma * invstd is needed.
template <typename acc_t>
__global__ void eval_grad_scale_kernel(const acc_t* __restrict__ gamma, const acc_t* __restrict__ invstd, int64_t C,
                                       acc_t* __restrict__ k) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) k[c] = gamma[c] * invstd[c];
}

template <typename scalar_t, typename acc_t>
__global__ void grad_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ dx, ChannelIndex idx, int64_t n,
                                  const acc_t* __restrict__ mean, const acc_t* __restrict__ k, bool training) {
  const int64_t C = idx.C;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t c = idx.channel(i);
    const acc_t g = static_cast<acc_t>(dy[i]);
    const acc_t r = training ? bn_backward_train(g, static_cast<acc_t>(x[i]), mean[c], k[C + c], k[2 * C + c], k[c])
                             : bn_backward_eval(g, k[c]);
    dx[i] = static_cast<scalar_t>(r);
  }
}

// -------------------------------------------------------------------- a block per channel (candidate)
// At small shapes the layer's time is its launches: the two stages above are three kernels forward and three
// backward (on the H200, (32,256,14,14) spent 0.043 ms in kernels of a 0.27-0.49 ms step, 1.7-1.8x
// cuDNN's two launches). When a channel is one block's work, one block per channel can do the whole pass
// in one launch: its statistics (or its two sums), then its own values' outputs, with the per-channel
// constants handed over in shared memory. Channel-first layouts (a plane's values are consecutive) with
// 0 < M <= kChannelBlockMost values a channel; TORCH_CS231N_CUDA_BN=channels chooses it until `make
// gpu-check` has tested and timed it.
constexpr int64_t kChannelBlockMost = 65536;

// The training forward of channel c = blockIdx.x: its statistics as stats_partial_kernel and
// stats_final_kernel compute them (with G = 1), then y = bn_normalize over its values.
template <typename scalar_t, typename acc_t>
__global__ void channel_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, ChannelIndex idx,
                                       int64_t M, double eps, const acc_t* __restrict__ gamma,
                                       const acc_t* __restrict__ beta, acc_t* __restrict__ mean,
                                       acc_t* __restrict__ invstd, acc_t* __restrict__ var) {
  const int64_t c = blockIdx.x;
  const acc_t shift = channel_shift<scalar_t, acc_t>(x, idx, c);
  const BnStats<acc_t> s = block_stats<scalar_t, acc_t>(x, idx, c, M, shift, threadIdx.x, blockDim.x);
  __shared__ acc_t k[3];  // the mean's high and low parts, the scale gamma * invstd
  if (threadIdx.x == 0) {
    const acc_t v = biased_var(s);
    const acc_t is = bn_invstd<acc_t>(v, eps);
    bn_split_mean(shift, s.mean, &k[0], &k[1]);
    k[2] = is * gamma[c];
    mean[c] = k[0];
    var[c] = v;
    invstd[c] = is;
  }
  __syncthreads();
  const acc_t hi = k[0], lo = k[1], scale = k[2], b = beta[c];
  for (int64_t m = threadIdx.x; m < M; m += blockDim.x) {
    const int64_t off = idx(c, m);
    y[off] = static_cast<scalar_t>(bn_normalize(static_cast<acc_t>(x[off]), hi, lo, scale, b));
  }
}

// The training backward of channel c = blockIdx.x: its two sums as grad_sums_partial_kernel and
// grad_sums_final_kernel compute them (with G = 1), d_gamma and d_beta where asked, then dx where asked.
template <typename scalar_t, typename acc_t>
__global__ void channel_backward_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                        scalar_t* __restrict__ dx, ChannelIndex idx, int64_t M,
                                        const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                        const acc_t* __restrict__ gamma, acc_t* __restrict__ dgamma,
                                        acc_t* __restrict__ dbeta) {
  const int64_t c = blockIdx.x;
  const acc_t mu = mean[c];
  acc_t a, p;
  block_grad_sums<scalar_t, acc_t>(dy, x, idx, c, M, mu, threadIdx.x, blockDim.x, a, p);
  __shared__ acc_t k[3];  // bn_grad_constants: gi, dy_mean, proj
  if (threadIdx.x == 0) {
    const acc_t is = invstd[c];
    if (dgamma != nullptr) dgamma[c] = p * is;
    if (dbeta != nullptr) dbeta[c] = a;
    const BnGradConstants<acc_t> v = bn_grad_constants<acc_t>(a, p, static_cast<acc_t>(M), gamma[c], is);
    k[0] = v.gi;
    k[1] = v.dy_mean;
    k[2] = v.proj;
  }
  __syncthreads();
  if (dx == nullptr) return;
  const acc_t gi = k[0], dy_mean = k[1], proj = k[2];
  for (int64_t m = threadIdx.x; m < M; m += blockDim.x) {
    const int64_t off = idx(c, m);
    const acc_t r = bn_backward_train(static_cast<acc_t>(dy[off]), static_cast<acc_t>(x[off]), mu, dy_mean, proj, gi);
    dx[off] = static_cast<scalar_t>(r);
  }
}

// ------------------------------------------------------------------------------ synchronised batch norm
// One thread per channel: this process's mean and biased variance from the partial results.
template <typename scalar_t, typename acc_t>
__global__ void stats_mean_var_kernel(const scalar_t* __restrict__ x, ChannelIndex idx,
                                      const BnStats<acc_t>* __restrict__ partial, int64_t C, int64_t G,
                                      acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const BnStats<acc_t> s = merge_partials(partial, c, G);
  mean[c] = channel_shift<scalar_t, acc_t>(x, idx, c) + s.mean;
  var[c] = biased_var(s);
}

// One thread per channel: the P processes' (count, mean, biased var) merged in process order.
template <typename scalar_t, typename acc_t>
__global__ void merge_stats_kernel(const scalar_t* __restrict__ counts, const scalar_t* __restrict__ means,
                                   const scalar_t* __restrict__ vars, int64_t P, int64_t C, double eps,
                                   scalar_t* __restrict__ mean, scalar_t* __restrict__ var,
                                   scalar_t* __restrict__ invstd) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  BnStats<acc_t> s{0, 0, 0};
  for (int64_t p = 0; p < P; ++p) {
    const acc_t n = static_cast<acc_t>(counts[p]);
    s = bn_merge(s, BnStats<acc_t>{n, static_cast<acc_t>(means[p * C + c]), static_cast<acc_t>(vars[p * C + c]) * n});
  }
  const acc_t v = biased_var(s);
  mean[c] = static_cast<scalar_t>(s.mean);
  var[c] = static_cast<scalar_t>(v);
  invstd[c] = static_cast<scalar_t>(bn_invstd<acc_t>(v, eps));
}

// One thread per channel: this process's sum dy and sum dy (x - mean).
template <typename acc_t>
__global__ void grad_sums_total_kernel(const acc_t* __restrict__ partial, int64_t C, int64_t G,
                                       acc_t* __restrict__ sum_dy, acc_t* __restrict__ sum_dy_xmu) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  add_partial_sums(partial, c, G, sum_dy[c], sum_dy_xmu[c]);
}

// One thread per channel: the constants of dx from the global sums over `count` values per channel.
template <typename acc_t>
__global__ void grad_constants_kernel(const acc_t* __restrict__ sum_dy, const acc_t* __restrict__ sum_dy_xmu,
                                      const acc_t* __restrict__ gamma, const acc_t* __restrict__ invstd, int64_t C,
                                      int64_t count, acc_t* __restrict__ k) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C)
    set_grad_constants(
        k, C, c, bn_grad_constants<acc_t>(sum_dy[c], sum_dy_xmu[c], static_cast<acc_t>(count), gamma[c], invstd[c]));
}

// ---------------------------------------------------------------------------------------------- host
ChannelIndex channel_index(const BatchNormLayout& lay) { return ChannelIndex{lay.C, lay.S, lay.channels_last}; }

// Blocks per channel for the reductions: enough blocks in all to fill the GPU, at least a few values per
// thread, and within gridDim.y's limit.
int64_t blocks_per_channel(const BatchNormLayout& lay) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, (4 * sms + lay.C - 1) / std::max<int64_t>(lay.C, 1));
  const int64_t useful = std::max<int64_t>(1, lay.M() / (cuda::kThreads * 4));
  return std::min<int64_t>({want, useful, 65535});
}

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::max<int64_t>(1, (n + cuda::kThreads - 1) / cuda::kThreads));
}

// Whether a block per channel does the training pass: where it fits, and by default only where the channels
// fill the GPU (C at least the multiprocessors' count). On the H200 it took (32,256,14,14)'s training step
// from 0.25 ms to 0.18 (torch 0.13-0.17), but (50,32,32,32)'s, 32 blocks for 132 multiprocessors, from 0.22
// to 0.25. TORCH_CS231N_CUDA_BN=channels: wherever it fits; =stages: never (the two-stage kernels).
bool channel_blocks_chosen(const BatchNormLayout& lay) {
  const int named = cuda::kernel_named("TORCH_CS231N_CUDA_BN", {"stages", "channels"});
  const bool fits =
      !lay.channels_last && lay.M() > 0 && lay.M() <= kChannelBlockMost && lay.C <= std::numeric_limits<int32_t>::max();
  if (named == 0 || !fits) return false;
  return named == 1 || lay.C >= at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_train_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  constexpr const char* op = "batch_norm_forward_train";
  check_batch_norm_forward_train(input, weight, bias, eps, op);
  const c10::cuda::CUDAGuard guard(input.device());

  at::Tensor output = bn_empty_output(input);
  const at::Tensor x = dense_like(input, output);
  const BatchNormLayout lay = batch_norm_layout(x);
  const int64_t C = lay.C;
  const auto stat_opts = input.options().dtype(bn_stat_dtype(input.scalar_type()));
  at::Tensor save_mean = at::empty({C}, stat_opts);
  at::Tensor save_invstd = at::empty({C}, stat_opts);
  at::Tensor save_var = at::empty({C}, stat_opts);
  const at::Tensor gamma = bn_channel_values(weight, input, 1.0);
  const at::Tensor beta = bn_channel_values(bias, input, 0.0);
  if (C == 0) return {output, save_mean, save_invstd, save_var};
  auto stream = at::cuda::getCurrentCUDAStream();
  if (channel_blocks_chosen(lay)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_forward_train_cuda", [&] {
          using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
          channel_forward_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(C), cuda::kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), channel_index(lay), lay.M(), eps,
              gamma.const_data_ptr<acc_t>(), beta.const_data_ptr<acc_t>(), save_mean.mutable_data_ptr<acc_t>(),
              save_invstd.mutable_data_ptr<acc_t>(), save_var.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    return {output, save_mean, save_invstd, save_var};
  }
  at::Tensor scale = at::empty({C}, stat_opts);
  at::Tensor mean_lo = at::empty({C}, stat_opts);
  const int64_t G = lay.M() > 0 ? blocks_per_channel(lay) : 1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_forward_train_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    // (n, mean, M2) per block: three acc_t each.
    at::Tensor partial = at::empty({C * G * 3}, stat_opts);
    auto* partial_p = reinterpret_cast<BnStats<acc_t>*>(partial.mutable_data_ptr<acc_t>());
    if (lay.M() > 0) {
      stats_partial_kernel<scalar_t, acc_t><<<dim3(C, G), cuda::kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), channel_index(lay), lay.M(), partial_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      partial.zero_();  // an empty batch: finite placeholder statistics (mean 0, var 0)
    }
    stats_final_kernel<scalar_t, acc_t><<<blocks_for(C), cuda::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), channel_index(lay), partial_p, C, G, eps, gamma.const_data_ptr<acc_t>(),
        save_mean.mutable_data_ptr<acc_t>(), mean_lo.mutable_data_ptr<acc_t>(), save_invstd.mutable_data_ptr<acc_t>(),
        save_var.mutable_data_ptr<acc_t>(), scale.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t n = output.numel();
    if (n > 0) {
      normalize_kernel<scalar_t, acc_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), channel_index(lay), n,
          save_mean.const_data_ptr<acc_t>(), mean_lo.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(),
          beta.const_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {output, save_mean, save_invstd, save_var};
}

at::Tensor batch_norm_forward_eval_cuda(const at::Tensor& input, const at::Tensor& running_mean,
                                        const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "batch_norm_forward_eval";
  check_batch_norm_forward_eval(input, running_mean, running_var, weight, bias, eps, op);
  const c10::cuda::CUDAGuard guard(input.device());

  at::Tensor output = bn_empty_output(input);
  const int64_t n = output.numel();
  if (n == 0) return output;
  const at::Tensor x = dense_like(input, output);
  const BatchNormLayout lay = batch_norm_layout(x);
  const at::Tensor rm = bn_channel_values(running_mean, input, 0.0);
  const at::Tensor rv = bn_channel_values(running_var, input, 1.0);
  const at::Tensor gamma = bn_channel_values(weight, input, 1.0);
  const at::Tensor beta = bn_channel_values(bias, input, 0.0);
  at::Tensor scale = at::empty_like(rm);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_forward_eval_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    eval_scale_kernel<acc_t><<<blocks_for(lay.C), cuda::kThreads, 0, stream>>>(
        rv.const_data_ptr<acc_t>(), gamma.const_data_ptr<acc_t>(), lay.C, eps, scale.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    normalize_kernel<scalar_t, acc_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), channel_index(lay), n,
        rm.const_data_ptr<acc_t>(), nullptr, scale.const_data_ptr<acc_t>(), beta.const_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> batch_norm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, std::array<bool, 3> output_mask) {
  constexpr const char* op = "batch_norm_backward";
  check_batch_norm_backward(grad_output, input, weight, mean, invstd, op);
  const c10::cuda::CUDAGuard guard(input.device());

  at::Tensor grad_input = bn_empty_output(input);
  const at::Tensor x = dense_like(input, grad_input);
  const at::Tensor dy = dense_like(grad_output, grad_input);
  const BatchNormLayout lay = batch_norm_layout(x);
  const int64_t C = lay.C;
  const auto stat_opts = input.options().dtype(bn_stat_dtype(input.scalar_type()));
  at::Tensor grad_weight = output_mask[1] ? at::empty({C}, stat_opts) : at::Tensor();
  at::Tensor grad_bias = output_mask[2] ? at::empty({C}, stat_opts) : at::Tensor();
  const at::Tensor gamma = bn_channel_values(weight, input, 1.0);
  const at::Tensor mu = mean.to(stat_opts.dtype()).contiguous();
  const at::Tensor is = invstd.to(stat_opts.dtype()).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  if (training && C > 0 && channel_blocks_chosen(lay)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      channel_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(C), cuda::kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr, channel_index(lay), lay.M(),
          mu.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(), gamma.const_data_ptr<acc_t>(),
          output_mask[1] ? grad_weight.mutable_data_ptr<acc_t>() : nullptr,
          output_mask[2] ? grad_bias.mutable_data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return masked_grads(grad_input, grad_weight, grad_bias, output_mask);
  }
  at::Tensor k = at::empty({3 * C}, stat_opts);
  const bool need_sums = training || output_mask[1] || output_mask[2];
  const int64_t G = lay.M() > 0 ? blocks_per_channel(lay) : 1;

  if (C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      if (need_sums) {
        at::Tensor partial = at::empty({C * G * 2}, stat_opts);
        if (lay.M() > 0) {
          grad_sums_partial_kernel<scalar_t, acc_t><<<dim3(C, G), cuda::kThreads, 0, stream>>>(
              dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), channel_index(lay), lay.M(),
              mu.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          partial.zero_();
        }
        grad_sums_final_kernel<acc_t><<<blocks_for(C), cuda::kThreads, 0, stream>>>(
            partial.const_data_ptr<acc_t>(), C, G, lay.M(), gamma.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(),
            output_mask[1] ? grad_weight.mutable_data_ptr<acc_t>() : nullptr,
            output_mask[2] ? grad_bias.mutable_data_ptr<acc_t>() : nullptr, k.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        eval_grad_scale_kernel<acc_t><<<blocks_for(C), cuda::kThreads, 0, stream>>>(
            gamma.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(), C, k.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const int64_t n = grad_input.numel();
      if (output_mask[0] && n > 0) {
        grad_input_kernel<scalar_t, acc_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
            channel_index(lay), n, mu.const_data_ptr<acc_t>(), k.const_data_ptr<acc_t>(), training);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  return masked_grads(grad_input, grad_weight, grad_bias, output_mask);
}

// ------------------------------------------------------------------------------ synchronised batch norm
std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  constexpr const char* op = "batch_norm_stats";
  check_batch_norm_input(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = dense_like(input, bn_empty_output(input));
  const BatchNormLayout lay = batch_norm_layout(x);
  const int64_t C = lay.C;
  const auto stat_opts = input.options().dtype(bn_stat_dtype(input.scalar_type()));
  at::Tensor mean = at::zeros({C}, stat_opts);
  at::Tensor var = at::zeros({C}, stat_opts);
  if (C == 0 || lay.M() == 0) return {mean, var};  // an empty batch: 0 and 0, which a merge ignores
  const int64_t G = blocks_per_channel(lay);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    at::Tensor partial = at::empty({C * G * 3}, stat_opts);
    auto* partial_p = reinterpret_cast<BnStats<acc_t>*>(partial.mutable_data_ptr<acc_t>());
    stats_partial_kernel<scalar_t, acc_t><<<dim3(C, G), cuda::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), channel_index(lay), lay.M(), partial_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stats_mean_var_kernel<scalar_t, acc_t><<<blocks_for(C), cuda::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), channel_index(lay), partial_p, C, G, mean.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_merge_stats_cuda(const at::Tensor& counts,
                                                                           const at::Tensor& means,
                                                                           const at::Tensor& vars, double eps) {
  constexpr const char* op = "batch_norm_merge_stats";
  check_batch_norm_merge_stats(counts, means, vars, eps, op);
  const c10::cuda::CUDAGuard guard(means.device());
  const int64_t P = means.size(0), C = means.size(1);
  at::Tensor mean = at::empty({C}, means.options());
  at::Tensor var = at::empty({C}, means.options());
  at::Tensor invstd = at::empty({C}, means.options());
  if (C == 0) return {mean, var, invstd};
  const at::Tensor n = counts.contiguous(), mu = means.contiguous(), v = vars.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "batch_norm_merge_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    merge_stats_kernel<scalar_t, acc_t><<<blocks_for(C), cuda::kThreads, 0, stream>>>(
        n.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), P, C, eps,
        mean.mutable_data_ptr<scalar_t>(), var.mutable_data_ptr<scalar_t>(), invstd.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var, invstd};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(const at::Tensor& grad_output,
                                                                   const at::Tensor& input, const at::Tensor& mean) {
  constexpr const char* op = "batch_norm_backward_reduce";
  check_batch_norm_backward_reduce(grad_output, input, mean, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor layout = bn_empty_output(input);
  const at::Tensor x = dense_like(input, layout);
  const at::Tensor dy = dense_like(grad_output, layout);
  const BatchNormLayout lay = batch_norm_layout(x);
  const int64_t C = lay.C;
  const auto stat_opts = input.options().dtype(bn_stat_dtype(input.scalar_type()));
  at::Tensor sum_dy = at::zeros({C}, stat_opts);
  at::Tensor sum_dy_xmu = at::zeros({C}, stat_opts);
  if (C == 0 || lay.M() == 0) return {sum_dy, sum_dy_xmu};
  const at::Tensor mu = mean.to(stat_opts.dtype()).contiguous();
  const int64_t G = blocks_per_channel(lay);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_backward_reduce_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, true>;
        at::Tensor partial = at::empty({C * G * 2}, stat_opts);
        grad_sums_partial_kernel<scalar_t, acc_t><<<dim3(C, G), cuda::kThreads, 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), channel_index(lay), lay.M(),
            mu.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        grad_sums_total_kernel<acc_t><<<blocks_for(C), cuda::kThreads, 0, stream>>>(
            partial.const_data_ptr<acc_t>(), C, G, sum_dy.mutable_data_ptr<acc_t>(),
            sum_dy_xmu.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor batch_norm_backward_elemt_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                          const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                          const at::Tensor& invstd, const at::Tensor& sum_dy,
                                          const at::Tensor& sum_dy_xmu, int64_t count) {
  constexpr const char* op = "batch_norm_backward_elemt";
  check_batch_norm_backward_elemt(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count, op);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_input = bn_empty_output(input);
  const int64_t n = grad_input.numel();
  if (n == 0) return grad_input;
  const at::Tensor x = dense_like(input, grad_input);
  const at::Tensor dy = dense_like(grad_output, grad_input);
  const BatchNormLayout lay = batch_norm_layout(x);
  const int64_t C = lay.C;
  const auto dtype = bn_stat_dtype(input.scalar_type());
  const at::Tensor gamma = bn_channel_values(weight, input, 1.0);
  const at::Tensor mu = mean.to(dtype).contiguous(), is = invstd.to(dtype).contiguous();
  const at::Tensor a = sum_dy.to(dtype).contiguous(), p = sum_dy_xmu.to(dtype).contiguous();
  at::Tensor k = at::empty({3 * C}, input.options().dtype(dtype));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_backward_elemt_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    grad_constants_kernel<acc_t><<<blocks_for(C), cuda::kThreads, 0, stream>>>(
        a.const_data_ptr<acc_t>(), p.const_data_ptr<acc_t>(), gamma.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(),
        C, count, k.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_input_kernel<scalar_t, acc_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
        channel_index(lay), n, mu.const_data_ptr<acc_t>(), k.const_data_ptr<acc_t>(), /*training=*/true);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

// ---------------------------------------------------------------------------- running statistics
// Per channel c, running_mean[c] and running_var[c] <- keep * running + take * batch (bn_running_update),
// each through its stride; a null running pointer is left out. One launch for both.
template <typename scalar_t, typename acc_t>
__global__ void update_running_kernel(scalar_t* running_mean, int64_t mean_stride, scalar_t* running_var,
                                      int64_t var_stride, const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                      int64_t C, acc_t keep, acc_t take_mean, acc_t take_var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  if (running_mean != nullptr) {
    scalar_t& r = running_mean[c * mean_stride];
    r = static_cast<scalar_t>(bn_running_update<acc_t>(static_cast<acc_t>(r), mean[c], keep, take_mean));
  }
  if (running_var != nullptr) {
    scalar_t& r = running_var[c * var_stride];
    r = static_cast<scalar_t>(bn_running_update<acc_t>(static_cast<acc_t>(r), var[c], keep, take_var));
  }
}

// The running statistics given (null where absent), both of one dtype, in one launch.
void launch_update_running(at::Tensor* running_mean, at::Tensor* running_var, const at::Tensor& mean,
                           const at::Tensor& var, double keep, double take_mean, double take_var) {
  const at::Tensor& any = running_mean != nullptr ? *running_mean : *running_var;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, any.scalar_type(), "batch_norm_update_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor m = mean.to(acc).contiguous(), v = var.to(acc).contiguous();
    update_running_kernel<scalar_t, acc_t><<<blocks_for(any.size(0)), cuda::kThreads, 0, stream>>>(
        running_mean != nullptr ? running_mean->mutable_data_ptr<scalar_t>() : nullptr,
        running_mean != nullptr ? running_mean->stride(0) : 0,
        running_var != nullptr ? running_var->mutable_data_ptr<scalar_t>() : nullptr,
        running_var != nullptr ? running_var->stride(0) : 0, m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(),
        any.size(0), static_cast<acc_t>(keep), static_cast<acc_t>(take_mean), static_cast<acc_t>(take_var));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// One launch for both statistics, rounding once as torch's own CUDA batch norm does: the default since it
// passed `make gpu-check` on an H200. TORCH_CS231N_CUDA_BN_UPDATE=aten chooses torch's two in-place ops per
// statistic instead (four launches, a rounding after each).
void batch_norm_update_stats_cuda(const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var, const at::Tensor& mean,
                                  const at::Tensor& var, double momentum, int64_t count) {
  check_batch_norm_update_stats(running_mean, running_var, mean, var, count, "batch_norm_update_stats_");
  if (count == 0) return;  // an empty batch leaves them alone, as torch does
  const c10::cuda::CUDAGuard guard(mean.device());
  const double keep = 1.0 - momentum, take_var = momentum * static_cast<double>(count) / (count - 1.0);
  at::Tensor rm = running_mean.has_value() ? *running_mean : at::Tensor();
  at::Tensor rv = running_var.has_value() ? *running_var : at::Tensor();
  if (cuda::kernel_named("TORCH_CS231N_CUDA_BN_UPDATE", {"fused", "aten"}) == 1) {
    if (rm.defined()) rm.mul_(keep).add_(mean.to(rm.scalar_type()), momentum);
    if (rv.defined()) rv.mul_(keep).add_(var.to(rv.scalar_type()), take_var);
    return;
  }
  if (rm.defined() && rv.defined() && rm.scalar_type() != rv.scalar_type()) {  // a launch for each
    launch_update_running(&rm, nullptr, mean, var, keep, momentum, take_var);
    launch_update_running(nullptr, &rv, mean, var, keep, momentum, take_var);
  } else if (rm.defined() || rv.defined()) {
    launch_update_running(rm.defined() ? &rm : nullptr, rv.defined() ? &rv : nullptr, mean, var, keep, momentum,
                          take_var);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CUDA, m) {
  m.impl("batch_norm_update_stats_", &batch_norm_update_stats_cuda);
  m.impl("batch_norm_forward_train", &batch_norm_forward_train_cuda);
  m.impl("batch_norm_forward_eval", &batch_norm_forward_eval_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_merge_stats", &batch_norm_merge_stats_cuda);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cuda);
}

}  // namespace torch_cs231n
