// Batch norm on the CPU: parallel per-channel reductions and fused elementwise passes over the math of
// common/batch_norm.h.
//
// Memory traffic, for M values per channel (the passes are what the time is, the op being memory-bound):
//   training forward   1 read of x for the statistics, then 1 read of x and 1 write of y
//   backward           1 read of x and dy for the two sums, then 1 read of x and dy and 1 write of dx
//   eval forward       1 read of x, 1 write of y
//
// Two layouts are walked directly (common/batch_norm_args.h): channel-first, where each (n, c) plane is S
// contiguous values, and channel-last (channels_last), where each row holds the C channels of one pixel.
//
// Reductions. Sums over a block of at most kBlock values go into kLanes independent accumulators of the
// input's type: lane l sums elements l, l + kLanes, ... That is the loop the compiler vectorises without
// -ffast-math (nothing is reassociated), and with at most kBlock / kLanes terms per lane the float error
// stays far below float32's resolution of the result. Block results are then combined in double
// (at::acc_type). The variance of a block is a two-pass in L1 cache (mean, then sum (x - mean)^2), and
// blocks are merged with Chan's formula (bn_merge): one read of x from memory, and no cancellation.
// Partial results are combined in a fixed order, so the results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "common/batch_norm.h"
#include "common/batch_norm_args.h"
#include "common/checks.h"
#include "common/layout.h"

namespace torch_cs231n {
namespace {

constexpr int64_t kBlock = 4096;        // values per two-pass block: 16 KiB of float, resident in L1
constexpr int64_t kGrain = 1 << 15;     // values per parallel task, so the OpenMP hand-off costs little
constexpr int64_t kMaxRowsPerBlock = 256;  // channel-last: rows summed per lane before folding into double
constexpr int64_t kMaxGroups = 64;      // channel-last: row groups reduced in parallel, merged in order

template <typename scalar_t>
struct Lanes {
  static constexpr int value = 64 / sizeof(scalar_t);  // 16 floats or 8 doubles: four SSE registers
};

// ------------------------------------------------------------------------------------- contiguous runs
// Sum of a run of n values, in lanes.
template <typename scalar_t, typename acc_t>
acc_t run_sum(const scalar_t* x, int64_t n) {
  constexpr int L = Lanes<scalar_t>::value;
  scalar_t lane[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) lane[l] += x[i + l];
  }
  acc_t total = 0;
  for (; i < n; ++i) total += x[i];
  for (int l = 0; l < L; ++l) total += lane[l];
  return total;
}

// (count, mean, M2) of a run of n <= kBlock values: two passes while the run is in cache.
template <typename scalar_t, typename acc_t>
BnStats<acc_t> run_stats(const scalar_t* x, int64_t n) {
  constexpr int L = Lanes<scalar_t>::value;
  const scalar_t shift = static_cast<scalar_t>(run_sum<scalar_t, acc_t>(x, n) / n);
  scalar_t sd[L] = {}, sd2[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) {
      const scalar_t d = x[i + l] - shift;
      sd[l] += d;
      sd2[l] += d * d;
    }
  }
  acc_t sum_d = 0, sum_d2 = 0;
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i] - shift);
    sum_d += d;
    sum_d2 += d * d;
  }
  for (int l = 0; l < L; ++l) {
    sum_d += sd[l];
    sum_d2 += sd2[l];
  }
  return bn_block_stats<acc_t>(static_cast<acc_t>(n), static_cast<acc_t>(shift), sum_d, sum_d2);
}

// Statistics of a whole plane of S values: blocks of at most kBlock, merged.
template <typename scalar_t, typename acc_t>
BnStats<acc_t> plane_stats(const scalar_t* x, int64_t S) {
  BnStats<acc_t> s{0, 0, 0};
  for (int64_t b = 0; b < S; b += kBlock) s = bn_merge(s, run_stats<scalar_t, acc_t>(x + b, std::min(kBlock, S - b)));
  return s;
}

// The backward's two sums over a plane: sum dy and sum dy * (x - mean).
template <typename scalar_t, typename acc_t>
void plane_grad_sums(const scalar_t* dy, const scalar_t* x, scalar_t mean, int64_t S, acc_t& sum_dy,
                     acc_t& sum_dy_xmu) {
  constexpr int L = Lanes<scalar_t>::value;
  sum_dy = 0;
  sum_dy_xmu = 0;
  for (int64_t b = 0; b < S; b += kBlock) {
    const int64_t n = std::min(kBlock, S - b);
    const scalar_t* g = dy + b;
    const scalar_t* v = x + b;
    scalar_t a[L] = {}, p[L] = {};
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      for (int l = 0; l < L; ++l) {
        a[l] += g[i + l];
        p[l] += g[i + l] * (v[i + l] - mean);
      }
    }
    for (; i < n; ++i) {
      sum_dy += g[i];
      sum_dy_xmu += static_cast<acc_t>(g[i]) * static_cast<acc_t>(v[i] - mean);
    }
    for (int l = 0; l < L; ++l) {
      sum_dy += a[l];
      sum_dy_xmu += p[l];
    }
  }
}

// ---------------------------------------------------------------------------------------- reductions
// Per-channel statistics of x.
template <typename scalar_t, typename acc_t>
std::vector<BnStats<acc_t>> channel_stats(const scalar_t* x, const BnLayout& lay) {
  const int64_t N = lay.N, C = lay.C, S = lay.S;
  std::vector<BnStats<acc_t>> out(C, BnStats<acc_t>{0, 0, 0});
  if (!lay.channels_last) {
    // Planes in memory order, one result each; then each channel merges its N planes in order.
    std::vector<BnStats<acc_t>> planes(N * C);
    at::parallel_for(0, N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(S, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) planes[p] = plane_stats<scalar_t, acc_t>(x + p * S, S);
    });
    at::parallel_for(0, C, 16, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        for (int64_t n = 0; n < N; ++n) out[c] = bn_merge(out[c], planes[n * C + c]);
      }
    });
    return out;
  }
  // Channel-last: rows of C values. Blocks of rows, vectorised over c; each of G groups of consecutive
  // blocks merges its blocks into its own per-channel state; the groups are merged in order at the end.
  const int64_t R = N * S;
  const int64_t rows = std::clamp<int64_t>(kBlock / std::max<int64_t>(C, 1), 1, kMaxRowsPerBlock);
  const int64_t blocks = (R + rows - 1) / rows;
  const int64_t G = std::min(blocks, kMaxGroups);
  std::vector<acc_t> g_n(G, 0), g_mean(G * C, 0), g_m2(G * C, 0);
  at::parallel_for(0, G, 1, [&](int64_t gb, int64_t ge) {
    std::vector<scalar_t> sum(C), shift(C), sd(C), sd2(C);
    for (int64_t g = gb; g < ge; ++g) {
      acc_t* mean = &g_mean[g * C];
      acc_t* m2 = &g_m2[g * C];
      for (int64_t blk = g * blocks / G; blk < (g + 1) * blocks / G; ++blk) {
        const int64_t r0 = blk * rows, nr = std::min(rows, R - r0);
        const scalar_t* xb = x + r0 * C;
        // Pass 1: the block's mean per channel.
        std::fill(sum.begin(), sum.end(), scalar_t(0));
        for (int64_t r = 0; r < nr; ++r) {
          const scalar_t* row = xb + r * C;
          for (int64_t c = 0; c < C; ++c) sum[c] += row[c];
        }
        for (int64_t c = 0; c < C; ++c) shift[c] = sum[c] / static_cast<scalar_t>(nr);
        // Pass 2, from cache: sum (x - shift) and sum (x - shift)^2.
        std::fill(sd.begin(), sd.end(), scalar_t(0));
        std::fill(sd2.begin(), sd2.end(), scalar_t(0));
        for (int64_t r = 0; r < nr; ++r) {
          const scalar_t* row = xb + r * C;
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t d = row[c] - shift[c];
            sd[c] += d;
            sd2[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          const BnStats<acc_t> merged =
              bn_merge(BnStats<acc_t>{g_n[g], mean[c], m2[c]},
                       bn_block_stats<acc_t>(static_cast<acc_t>(nr), static_cast<acc_t>(shift[c]), sd[c], sd2[c]));
          mean[c] = merged.mean;
          m2[c] = merged.m2;
        }
        g_n[g] += static_cast<acc_t>(nr);
      }
    }
  });
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < C; ++c) out[c] = bn_merge(out[c], BnStats<acc_t>{g_n[g], g_mean[g * C + c], g_m2[g * C + c]});
  }
  return out;
}

// Per-channel sum dy and sum dy * (x - mean), the two sums of the backward.
template <typename scalar_t, typename acc_t>
void channel_grad_sums(const scalar_t* dy, const scalar_t* x, const scalar_t* mean, const BnLayout& lay,
                       std::vector<acc_t>& sum_dy, std::vector<acc_t>& sum_dy_xmu) {
  const int64_t N = lay.N, C = lay.C, S = lay.S;
  sum_dy.assign(C, 0);
  sum_dy_xmu.assign(C, 0);
  if (!lay.channels_last) {
    std::vector<acc_t> p_dy(N * C), p_dyx(N * C);
    at::parallel_for(0, N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(S, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        plane_grad_sums<scalar_t, acc_t>(dy + p * S, x + p * S, mean[p % C], S, p_dy[p], p_dyx[p]);
      }
    });
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] += p_dy[n * C + c];
        sum_dy_xmu[c] += p_dyx[n * C + c];
      }
    }
    return;
  }
  const int64_t R = N * S;
  const int64_t rows = std::clamp<int64_t>(kBlock / std::max<int64_t>(C, 1), 1, kMaxRowsPerBlock);
  const int64_t blocks = (R + rows - 1) / rows;
  const int64_t G = std::min(blocks, kMaxGroups);
  std::vector<acc_t> g_dy(G * C, 0), g_dyx(G * C, 0);
  at::parallel_for(0, G, 1, [&](int64_t gb, int64_t ge) {
    std::vector<scalar_t> a(C), p(C);
    for (int64_t g = gb; g < ge; ++g) {
      for (int64_t blk = g * blocks / G; blk < (g + 1) * blocks / G; ++blk) {
        const int64_t r0 = blk * rows, nr = std::min(rows, R - r0);
        std::fill(a.begin(), a.end(), scalar_t(0));
        std::fill(p.begin(), p.end(), scalar_t(0));
        for (int64_t r = 0; r < nr; ++r) {
          const scalar_t* gr = dy + (r0 + r) * C;
          const scalar_t* xr = x + (r0 + r) * C;
          for (int64_t c = 0; c < C; ++c) {
            a[c] += gr[c];
            p[c] += gr[c] * (xr[c] - mean[c]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          g_dy[g * C + c] += a[c];
          g_dyx[g * C + c] += p[c];
        }
      }
    }
  });
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += g_dy[g * C + c];
      sum_dy_xmu[c] += g_dyx[g * C + c];
    }
  }
}

// ---------------------------------------------------------------------------------- elementwise passes
// out = f(c, i) over every value, with c its channel; `f` is given (c, index) and is called in memory order.
// Channel-first: one plane at a time, so the per-channel constants are loop invariants. Channel-last: one
// row at a time, the constants indexed by c (the arrays stay in L1).
template <typename F>
void for_each_channel_run(const BnLayout& lay, F f) {
  const int64_t N = lay.N, C = lay.C, S = lay.S;
  if (!lay.channels_last) {
    at::parallel_for(0, N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(S, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) f(/*offset=*/p * S, /*len=*/S, /*c=*/p % C, /*channels_last=*/false);
    });
  } else {
    at::parallel_for(0, N * S, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) f(r * C, C, 0, true);
    });
  }
}

// y = (x - mean) * scale + beta, the constants per channel (common/batch_norm.h: bn_normalize).
template <typename scalar_t>
void normalize_loop(const scalar_t* x, scalar_t* y, const BnLayout& lay, const scalar_t* mean,
                    const scalar_t* scale, const scalar_t* beta) {
  for_each_channel_run(lay, [&](int64_t off, int64_t len, int64_t c, bool cl) {
    const scalar_t* xi = x + off;
    scalar_t* yo = y + off;
    if (cl) {
      for (int64_t k = 0; k < len; ++k) yo[k] = bn_normalize(xi[k], mean[k], scale[k], beta[k]);
    } else {
      const scalar_t m = mean[c], s = scale[c], b = beta[c];
      for (int64_t k = 0; k < len; ++k) yo[k] = bn_normalize(xi[k], m, s, b);
    }
  });
}

// ------------------------------------------------------------------------------------------------- ops
// The input in the output's layout, with the layout's description.
std::tuple<at::Tensor, at::Tensor, BnLayout> dense_input(const at::Tensor& input) {
  at::Tensor out = bn_empty_output(input);
  at::Tensor x = dense_like(input, out);
  return {x, out, bn_layout(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_train_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  constexpr const char* op = "batch_norm_forward_train";
  bn_check_input(input, op);
  bn_check_optional(weight, "weight", input, op);
  bn_check_optional(bias, "bias", input, op);
  TORCH_CHECK(eps > 0, op, ": expected eps to be positive in training, but got ", eps);
  bn_check_training_size(input, op);

  auto [x, output, lay] = dense_input(input);
  const auto stat_opts = input.options().dtype(bn_stat_dtype(input.scalar_type()));
  at::Tensor save_mean = at::empty({lay.C}, stat_opts);
  at::Tensor save_invstd = at::empty({lay.C}, stat_opts);
  at::Tensor save_var = at::empty({lay.C}, stat_opts);
  const at::Tensor gamma = bn_channel_values(weight, input, 1.0);
  const at::Tensor beta = bn_channel_values(bias, input, 0.0);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_forward_train_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;  // double
    const int64_t C = lay.C;
    scalar_t* mean_p = save_mean.mutable_data_ptr<scalar_t>();
    scalar_t* invstd_p = save_invstd.mutable_data_ptr<scalar_t>();
    scalar_t* var_p = save_var.mutable_data_ptr<scalar_t>();
    if (lay.M() == 0) {  // an empty batch: nothing to normalise; finite placeholder statistics
      for (int64_t c = 0; c < C; ++c) {
        mean_p[c] = 0;
        var_p[c] = 0;
        invstd_p[c] = static_cast<scalar_t>(bn_invstd<acc_t>(0, eps));
      }
      return;
    }
    const std::vector<BnStats<acc_t>> stats = channel_stats<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), lay);
    const scalar_t* g = gamma.const_data_ptr<scalar_t>();
    std::vector<scalar_t> scale(C);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t var = stats[c].m2 / stats[c].n;  // biased: this is what normalises
      const acc_t invstd = bn_invstd<acc_t>(var, eps);
      mean_p[c] = static_cast<scalar_t>(stats[c].mean);
      var_p[c] = static_cast<scalar_t>(var);
      invstd_p[c] = static_cast<scalar_t>(invstd);
      scale[c] = static_cast<scalar_t>(invstd * g[c]);
    }
    normalize_loop<scalar_t>(x.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), lay, mean_p,
                             scale.data(), beta.const_data_ptr<scalar_t>());
  });
  return {output, save_mean, save_invstd, save_var};
}

at::Tensor batch_norm_forward_eval_cpu(const at::Tensor& input, const at::Tensor& running_mean,
                                       const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "batch_norm_forward_eval";
  bn_check_input(input, op);
  bn_check_channel_tensor(running_mean, "running_mean", input, op);
  bn_check_channel_tensor(running_var, "running_var", input, op);
  bn_check_optional(weight, "weight", input, op);
  bn_check_optional(bias, "bias", input, op);
  TORCH_CHECK(eps >= 0, op, ": expected eps to be non-negative, but got ", eps);

  auto [x, output, lay] = dense_input(input);
  if (output.numel() == 0) return output;
  const at::Tensor rm = bn_channel_values(running_mean, input, 0.0);
  const at::Tensor rv = bn_channel_values(running_var, input, 1.0);
  const at::Tensor gamma = bn_channel_values(weight, input, 1.0);
  const at::Tensor beta = bn_channel_values(bias, input, 0.0);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_forward_eval_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* v = rv.const_data_ptr<scalar_t>();
    const scalar_t* g = gamma.const_data_ptr<scalar_t>();
    std::vector<scalar_t> scale(lay.C);
    for (int64_t c = 0; c < lay.C; ++c) scale[c] = static_cast<scalar_t>(bn_invstd<acc_t>(v[c], eps) * g[c]);
    normalize_loop<scalar_t>(x.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), lay,
                             rm.const_data_ptr<scalar_t>(), scale.data(), beta.const_data_ptr<scalar_t>());
  });
  return output;
}

// d_input, d_weight, d_bias, each only when output_mask asks for it (None otherwise). `mean` and `invstd`
// are the saved batch statistics in training, the running mean and 1/sqrt(running_var + eps) in eval.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> batch_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, std::array<bool, 3> output_mask) {
  constexpr const char* op = "batch_norm_backward";
  bn_check_input(input, op);
  check_same_device(input, "input", grad_output, "grad_output", op);
  check_same_dtype(input, "input", grad_output, "grad_output", op);
  check_same_shape(input, "input", grad_output, "grad_output", op);
  bn_check_optional(weight, "weight", input, op);
  bn_check_channel_tensor(mean, "mean", input, op);
  bn_check_channel_tensor(invstd, "invstd", input, op);

  at::Tensor grad_input = bn_empty_output(input);
  const at::Tensor x = dense_like(input, grad_input);
  const at::Tensor dy = dense_like(grad_output, grad_input);
  const BnLayout lay = bn_layout(x);
  const int64_t C = lay.C;
  const auto stat_opts = input.options().dtype(bn_stat_dtype(input.scalar_type()));
  at::Tensor grad_weight = output_mask[1] ? at::empty({C}, stat_opts) : at::Tensor();
  at::Tensor grad_bias = output_mask[2] ? at::empty({C}, stat_opts) : at::Tensor();
  // The weight's gradient has the weight's dtype (float in a mixed-precision call).
  const at::Tensor gamma = bn_channel_values(weight, input, 1.0);
  const at::Tensor mu = mean.to(stat_opts.dtype()).contiguous();
  const at::Tensor is = invstd.to(stat_opts.dtype()).contiguous();

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_backward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* mean_p = mu.const_data_ptr<scalar_t>();
    const scalar_t* invstd_p = is.const_data_ptr<scalar_t>();
    const scalar_t* g = gamma.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    // Pass 1 (training, or when dgamma/dbeta are asked): sum dy and sum dy (x - mean), once per channel.
    std::vector<acc_t> sum_dy(C, 0), sum_dy_xmu(C, 0);
    const bool need_sums = training || output_mask[1] || output_mask[2];
    if (need_sums && lay.M() > 0) channel_grad_sums<scalar_t, acc_t>(dyp, xp, mean_p, lay, sum_dy, sum_dy_xmu);
    if (output_mask[1]) {  // dgamma = sum dy * xhat = invstd * sum dy (x - mean)
      scalar_t* p = grad_weight.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) p[c] = static_cast<scalar_t>(sum_dy_xmu[c] * invstd_p[c]);
    }
    if (output_mask[2]) {  // dbeta = sum dy
      scalar_t* p = grad_bias.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) p[c] = static_cast<scalar_t>(sum_dy[c]);
    }
    if (!output_mask[0] || grad_input.numel() == 0) return;
    // Pass 2: dx, with per-channel constants (common/batch_norm.h).
    scalar_t* dxp = grad_input.mutable_data_ptr<scalar_t>();
    std::vector<scalar_t> gi(C), dy_mean(C), proj(C);
    const acc_t M = static_cast<acc_t>(lay.M());
    for (int64_t c = 0; c < C; ++c) {
      const acc_t inv = invstd_p[c];
      gi[c] = static_cast<scalar_t>(g[c] * inv);
      dy_mean[c] = static_cast<scalar_t>(sum_dy[c] / M);
      proj[c] = static_cast<scalar_t>(sum_dy_xmu[c] / M * inv * inv);
    }
    if (training) {
      for_each_channel_run(lay, [&](int64_t off, int64_t len, int64_t c, bool cl) {
        const scalar_t* gr = dyp + off;
        const scalar_t* xi = xp + off;
        scalar_t* out = dxp + off;
        if (cl) {
          for (int64_t k = 0; k < len; ++k) out[k] = bn_backward_train(gr[k], xi[k], mean_p[k], dy_mean[k], proj[k], gi[k]);
        } else {
          const scalar_t m = mean_p[c], dm = dy_mean[c], pj = proj[c], s = gi[c];
          for (int64_t k = 0; k < len; ++k) out[k] = bn_backward_train(gr[k], xi[k], m, dm, pj, s);
        }
      });
    } else {
      for_each_channel_run(lay, [&](int64_t off, int64_t len, int64_t c, bool cl) {
        const scalar_t* gr = dyp + off;
        scalar_t* out = dxp + off;
        if (cl) {
          for (int64_t k = 0; k < len; ++k) out[k] = bn_backward_eval(gr[k], gi[k]);
        } else {
          const scalar_t s = gi[c];
          for (int64_t k = 0; k < len; ++k) out[k] = bn_backward_eval(gr[k], s);
        }
      });
    }
  });
  return {output_mask[0] ? std::optional<at::Tensor>(grad_input) : std::nullopt,
          output_mask[1] ? std::optional<at::Tensor>(grad_weight) : std::nullopt,
          output_mask[2] ? std::optional<at::Tensor>(grad_bias) : std::nullopt};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CPU, m) {
  m.impl("batch_norm_forward_train", &batch_norm_forward_train_cpu);
  m.impl("batch_norm_forward_eval", &batch_norm_forward_eval_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace torch_cs231n
