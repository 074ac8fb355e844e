// Batch norm's per-channel and per-element math, called by the CPU loops (cpu/batch_norm.cpp) and the
// CUDA kernels (cuda/batch_norm.cu). Statistics are per channel c over the M = N*H*W values x_i of it.
//
//   forward   mu = (1/M) sum_i x_i           var = (1/M) sum_i (x_i - mu)^2       (biased: it normalises)
//             invstd = 1 / sqrt(var + eps)    xhat_i = (x_i - mu) * invstd       y_i = gamma * xhat_i + beta
//   running   running_mean <- (1-m) running_mean + m mu
//             running_var  <- (1-m) running_var  + m var * M/(M-1)                (unbiased)
//   backward  dbeta  = sum_i dy_i             dgamma = sum_i dy_i xhat_i
//             dx_i   = gamma invstd / M * (M dy_i - sum_j dy_j - xhat_i sum_j dy_j xhat_j)
//                    = gamma invstd * (dy_i - mean(dy) - (x_i - mu) * invstd^2 * sum_j dy_j (x_j - mu) / M)
//   eval      mu, invstd come from the running statistics, which do not depend on x: dx_i = gamma invstd dy_i
//
// The variance is never E[x^2] - E[x]^2 (it cancels catastrophically when |mu| >> std). Each backend
// computes (count, mean, M2 = sum (x - mean)^2) of small blocks with a two-pass in fast memory, then
// merges blocks with Chan et al.'s pairwise update (bn_merge below), which is exact in exact arithmetic
// and stable in floating point. Synchronised batch norm merges the processes' statistics the same way:
// process r sends (M_r, mean_r, var_r), and M2_r = var_r * M_r.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace torch_cs231n {

// Welford/Chan state of a set of values: how many, their mean, and M2 = sum (x - mean)^2.
template <typename acc_t>
struct BnStats {
  acc_t n;
  acc_t mean;
  acc_t m2;
};

// Chan, Golub and LeVeque: the statistics of the union of two disjoint sets a and b,
//   n = na + nb,   delta = mean_b - mean_a,
//   mean = mean_a + delta * nb / n,   M2 = M2_a + M2_b + delta^2 * na * nb / n.
// An empty side leaves the other unchanged (no 0/0).
template <typename acc_t>
C10_HOST_DEVICE inline BnStats<acc_t> bn_merge(BnStats<acc_t> a, BnStats<acc_t> b) {
  const acc_t n = a.n + b.n;
  if (b.n == acc_t(0)) return a;
  if (a.n == acc_t(0)) return b;
  const acc_t delta = b.mean - a.mean;
  const acc_t nb_over_n = b.n / n;
  BnStats<acc_t> r;
  r.n = n;
  r.mean = a.mean + delta * nb_over_n;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * nb_over_n;
  return r;
}

// bn_merge for many sets that share their counts (the channels of one block of rows): with
// r = nb / n and w = na * nb / n computed once, mean += delta * r and M2 += M2_b + delta^2 * w.
// na = 0 gives r = 1, w = 0: the block itself.
template <typename acc_t>
C10_HOST_DEVICE inline void bn_merge_shared_counts(acc_t& mean, acc_t& m2, acc_t mean_b, acc_t m2_b, acc_t r, acc_t w) {
  const acc_t delta = mean_b - mean;
  mean += delta * r;
  m2 += m2_b + delta * delta * w;
}

// One Welford step: add the value x to the set s.
template <typename acc_t>
C10_HOST_DEVICE inline BnStats<acc_t> bn_welford_add(BnStats<acc_t> s, acc_t x) {
  s.n += acc_t(1);
  const acc_t delta = x - s.mean;
  s.mean += delta / s.n;
  s.m2 += delta * (x - s.mean);
  return s;
}

// The statistics of a block from its two-pass sums: `shift` is an approximate mean (the first pass),
// sum_d = sum (x - shift) and sum_d2 = sum (x - shift)^2 (the second pass). The corrected two-pass
// formula M2 = sum_d2 - sum_d^2 / n removes the error of the rounded shift (Chan, Golub, LeVeque 1983);
// sum_d is small, so nothing cancels.
template <typename acc_t>
C10_HOST_DEVICE inline BnStats<acc_t> bn_block_stats(acc_t n, acc_t shift, acc_t sum_d, acc_t sum_d2) {
  BnStats<acc_t> s;
  s.n = n;
  s.mean = shift + sum_d / n;
  const acc_t m2 = sum_d2 - sum_d * sum_d / n;
  s.m2 = m2 > acc_t(0) ? m2 : acc_t(0);  // rounding can leave a tiny negative for constant data
  return s;
}

// invstd = 1 / sqrt(var + eps): finite for a zero-variance channel as long as eps > 0.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t bn_invstd(acc_t var, double eps) {
  return acc_t(1) / ::sqrt(var + static_cast<acc_t>(eps));
}

// y = ((x - mean_hi) - mean_lo) * scale + beta with scale = gamma * invstd, where mean_hi + mean_lo is
// the mean in two parts (mean_hi the mean rounded to T, mean_lo the rest; 0 where the mean is exactly a
// T). Subtracting the mean first, instead of the folded y = x * scale + (beta - mu * scale), keeps
// large-mean inputs exact: x - mean_hi has no rounding error when x and the mean are close (Sterbenz),
// whereas x * scale and mu * scale would each round at the size of |mu|; and mean_lo restores the part of
// the mean that float32 cannot hold next to |mu| (up to half an ulp of 1e4 = 5e-4 for mean 1e4).
template <typename T>
C10_HOST_DEVICE inline T bn_normalize(T x, T mean_hi, T mean_lo, T scale, T beta) {
  return ((x - mean_hi) - mean_lo) * scale + beta;
}

// A mean known as shift + mean_d (mean_d: the mean of x - shift), in bn_normalize's two parts: mean_hi =
// shift + mean_d rounded, mean_lo = what the rounding dropped; exact by Fast2Sum (Dekker) when
// |mean_d| <= |shift|, the case of a large mean, and within a rounding of mean_d otherwise.
template <typename T>
C10_HOST_DEVICE inline void bn_split_mean(T shift, T mean_d, T* mean_hi, T* mean_lo) {
  *mean_hi = shift + mean_d;
  *mean_lo = mean_d - (*mean_hi - shift);
}

// A running statistic after one batch, keep * running + take * batch, in the accumulation type
// (batch_norm_update_stats_): keep = 1 - momentum, take = momentum for the mean and momentum * M / (M - 1)
// for the variance, whose batch value is biased (M values per channel).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t bn_running_update(acc_t running, acc_t batch, acc_t keep, acc_t take) {
  return keep * running + take * batch;
}

// dx = gamma invstd * (dy - mean(dy) - (x - mu) * proj) in training, with the per-channel constants
//   gi = gamma * invstd,   dy_mean = sum dy / M,   proj = invstd^2 * sum dy (x - mu) / M.
template <typename acc_t>
struct BnGradConstants {
  acc_t gi;
  acc_t dy_mean;
  acc_t proj;
};

// Those constants from a channel's two sums over its M values (M = 0, an empty batch: no dx to scale).
// Synchronised batch norm passes the sums and M of the whole global batch.
template <typename acc_t>
C10_HOST_DEVICE inline BnGradConstants<acc_t> bn_grad_constants(acc_t sum_dy, acc_t sum_dy_xmu, acc_t M, acc_t gamma,
                                                                acc_t invstd) {
  BnGradConstants<acc_t> k;
  k.gi = gamma * invstd;
  k.dy_mean = M > acc_t(0) ? sum_dy / M : acc_t(0);
  k.proj = M > acc_t(0) ? sum_dy_xmu / M * invstd * invstd : acc_t(0);
  return k;
}

template <typename T>
C10_HOST_DEVICE inline T bn_backward_train(T dy, T x, T mean, T dy_mean, T proj, T gi) {
  return (dy - dy_mean - (x - mean) * proj) * gi;
}

// Eval: the statistics are constants, so dx = gamma * invstd * dy.
template <typename T>
C10_HOST_DEVICE inline T bn_backward_eval(T dy, T gi) {
  return dy * gi;
}

}  // namespace torch_cs231n
