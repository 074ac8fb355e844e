// Batch norm on the CPU: parallel per-channel reductions and fused elementwise passes over the math of
// common/batch_norm.h.
//
// Memory traffic (the op is memory-bound, so the passes over memory are what the time is):
//   training forward   1 read of x for the statistics, then 1 read of x and 1 write of y
//   backward           1 read of x and dy for the two sums, then 1 read of x and dy and 1 write of dx
//   eval forward       1 read of x, 1 write of y
// Channel-first with at least one channel per thread, each thread runs both passes over one channel before
// the next, so the second pass reads the channel back from cache (per_channel_fused).
//
// Two layouts are walked directly (common/batch_norm_args.h): channel-first, where each (n, c) plane is S
// contiguous values, and channel-last (channels_last), where each row holds the C channels of one pixel.
//
// Reductions. Sums over a block of at most kBlock values go into kLanes independent accumulators of the
// input's type (four 16-byte vectors), so that with at most kBlock / kLanes terms per lane the float error
// stays far below float32's resolution of the result. Block results are then combined in double
// (at::acc_type). The variance of a block is a two-pass in L1 cache (mean, then sum (x - mean)^2), and
// blocks are merged with Chan's formula (bn_merge): one read of x from memory, and no cancellation.
// Partial results are combined in a fixed order, so the results do not depend on the thread count.
//
// Synchronised batch norm's ops (ops.cpp) are the same reductions and passes, stopped where processes
// exchange their per-channel values: the statistics (channel_stats), their merge across processes
// (bn_merge in process order), the two sums (channel_grad_sums), and dx from the global sums.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/batch_norm.h"
#include "common/batch_norm_args.h"
#include "common/checks.h"
#include "common/layout.h"
#include "cpu/batch_norm_narrow.h"
#include "cpu/reduced_float.h"

namespace torch_cs231n {
namespace {

constexpr int64_t kBlock = 4096;           // values per two-pass block: 16 KiB of float, resident in L1
constexpr int64_t kGrain = 1 << 15;        // values per parallel task, so the OpenMP hand-off costs little
constexpr int64_t kMaxRowsPerBlock = 256;  // channel-last: rows summed per lane before folding into double
// channel-last: and at least this many, though a block of many channels then leaves L1 for L2. Each block
// ends in a per-channel merge in double; with kBlock / C rows, 2 at 2048 channels (ResNeXt's 4 x 4 stage),
// the merges cost more than the sums: training forward (16, 2048, 4, 4) 3.1 -> 1.3 times torch's time,
// (16, 1024, 8, 8) 1.8 -> 1.2 (16 rows: 1.5 and 1.5-2.1).
constexpr int64_t kMinRowsPerBlock = 64;
constexpr int64_t kMaxGroups = 64;  // channel-last: row groups reduced in parallel, merged in order

// at::parallel_for whose tasks run in the instruction set in force (cpu::with_best_isa): this file's loops
// are plain C++ and GCC vectors, built for the baseline ISA alone before. With AVX-512 (Zen 5), forward+
// backward took 0.47-0.59 of torch's time instead of 0.59-0.69 (NCHW cs231n, resnet), and 0.79-1.17
// instead of 1.05-1.27 in channels_last.
template <typename F>
void parallel_for_isa(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { cpu::with_best_isa([&] { f(b, e); }); });
}

// ------------------------------------------------------------------------------- float16, bfloat16
// A narrow input is read and written in its own dtype and computed in float32 (its op math): every loop
// below takes its values through `load` and gives its results through `store`, in pieces of at most
// kBlock values (or one channel-last row) converted in L1 (cpu/reduced_float.h). For float and double
// they are the tensor's own memory, and nothing is copied.
using cpu::kNarrow;
using cpu::opmath_t;

// The thread's buffers for converted pieces: one per operand that can be in flight at once.
enum class Piece : int { kX, kDy, kOut, kCount };

inline float* piece_buffer(Piece which, int64_t n) {
  thread_local std::vector<float> buffers[static_cast<int>(Piece::kCount)];
  std::vector<float>& b = buffers[static_cast<int>(which)];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// The n values at x, in op math.
template <typename scalar_t>
const opmath_t<scalar_t>* load(const scalar_t* x, int64_t n, Piece which) {
  if constexpr (kNarrow<scalar_t>) {
    float* b = piece_buffer(which, n);
    cpu::to_float(x, n, b);
    return b;
  } else {
    return x;
  }
}

// `count` runs of `len` values, `stride` apart (a block, below), in op math; *stride_out: theirs there.
template <typename scalar_t>
const opmath_t<scalar_t>* load_runs(const scalar_t* x, int64_t count, int64_t stride, int64_t len, Piece which,
                                    int64_t* stride_out) {
  if constexpr (kNarrow<scalar_t>) {
    float* b = piece_buffer(which, count * len);
    for (int64_t r = 0; r < count; ++r) cpu::to_float(x + r * stride, len, b + r * len);
    *stride_out = len;
    return b;
  } else {
    *stride_out = stride;
    return x;
  }
}

// Where n results bound for y are computed: y itself, or a buffer that `store` then narrows into y.
template <typename scalar_t>
opmath_t<scalar_t>* result_piece(scalar_t* y, int64_t n) {
  if constexpr (kNarrow<scalar_t>) {
    return piece_buffer(Piece::kOut, n);
  } else {
    return y;
  }
}

template <typename scalar_t>
void store(const opmath_t<scalar_t>* v, int64_t n, scalar_t* y) {
  if constexpr (kNarrow<scalar_t>) cpu::from_float(v, n, y);
}

// f(k0, n) over the pieces [k0, k0 + n) of a run of len values, n <= piece.
template <typename F>
void for_each_piece(int64_t len, F f, int64_t piece = kBlock) {
  for (int64_t k0 = 0; k0 < len; k0 += piece) f(k0, std::min(piece, len - k0));
}

// The pieces of an elementwise pass: kBlock values when they are converted through L1 buffers, the whole
// run when they are not (float, double: nothing to convert, and no loop overhead per piece).
template <typename scalar_t>
int64_t elementwise_piece(int64_t len) {
  return kNarrow<scalar_t> ? kBlock : std::max<int64_t>(len, 1);
}

// Reductions run on explicit 16-byte vectors (GCC/Clang vector extensions; SSE2 is x86-64's baseline,
// so no -m flag is needed), four accumulators deep to hide the adder's latency: kLanes = 16 floats or 8
// doubles. Left to itself, GCC vectorises a lanes-in-an-array loop across the wrong axis, with shuffles.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(16)));
};
template <typename T>
using vec_t = typename Simd<T>::type;
template <typename T>
constexpr int kWidth = 16 / sizeof(T);  // values per vector
template <typename T>
constexpr int kLanes = 4 * kWidth<T>;  // values per step of four accumulators

// kLanes values as one vector of 64 bytes, for the channel-last sums (band_two_pass, band_grad_sums): the AVX-512
// build runs it as one register, the others split it as they can; its lanes are those of the four
// 16-byte vectors above, in the same order.
template <typename T>
struct Wide {
  typedef T type __attribute__((vector_size(4 * 16)));
};
template <typename T>
using wide_t = typename Wide<T>::type;

template <typename T>
inline wide_t<T> wload(const T* p) {
  wide_t<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof v);  // an unaligned load (movups)
  return v;
}

template <typename T>
inline vec_t<T> vsplat(T s) {
  vec_t<T> v;
  for (int l = 0; l < kWidth<T>; ++l) v[l] = s;
  return v;
}

// The second pass of a shifted two-pass variance, one accumulator's step: e = x - shift adds to
// sum_d and e^2 to sum_d2 (common/batch_norm.h: bn_block_stats).
template <typename V>
inline void add_deviation(V e, V& sum_d, V& sum_d2) {
  sum_d += e;
  sum_d2 += e * e;
}

// a0 + a1 + a2 + a3, summed across lanes in acc_t.
template <typename T, typename acc_t>
inline acc_t vsum4(vec_t<T> a0, vec_t<T> a1, vec_t<T> a2, vec_t<T> a3) {
  const vec_t<T> v = (a0 + a1) + (a2 + a3);
  acc_t total = 0;
  for (int l = 0; l < kWidth<T>; ++l) total += static_cast<acc_t>(v[l]);
  return total;
}

// ------------------------------------------------------------------------------------------- blocks
// A block is `count` runs of `len` contiguous values, run r at x + r * stride, count * len <= kBlock:
// several small planes of one channel, or a piece of one large plane. Lanes carry over from run to run,
// so small planes (14x14) cost no more than one long run; a run's tail (len % kLanes values) is added
// straight into the double accumulators.

// Sum of a block, in lanes.
template <typename scalar_t, typename acc_t>
acc_t block_sum(const scalar_t* x, int64_t count, int64_t stride, int64_t len) {
  using V = vec_t<scalar_t>;
  constexpr int W = kWidth<scalar_t>, L = kLanes<scalar_t>;
  V s0{}, s1{}, s2{}, s3{};
  acc_t total = 0;
  for (int64_t r = 0; r < count; ++r) {
    const scalar_t* v = x + r * stride;
    int64_t i = 0;
    for (; i + L <= len; i += L) {
      s0 += vload(v + i);
      s1 += vload(v + i + W);
      s2 += vload(v + i + 2 * W);
      s3 += vload(v + i + 3 * W);
    }
    for (; i < len; ++i) total += v[i];
  }
  return total + vsum4<scalar_t, acc_t>(s0, s1, s2, s3);
}

// (count, mean, M2) of a block: two passes while the block is in L1 (common/batch_norm.h: bn_block_stats).
template <typename scalar_t, typename acc_t>
BnStats<acc_t> block_stats(const scalar_t* x, int64_t count, int64_t stride, int64_t len) {
  using V = vec_t<scalar_t>;
  constexpr int W = kWidth<scalar_t>, L = kLanes<scalar_t>;
  const acc_t n = static_cast<acc_t>(count * len);
  const scalar_t shift = static_cast<scalar_t>(block_sum<scalar_t, acc_t>(x, count, stride, len) / n);
  const V k = vsplat(shift);
  V d0{}, d1{}, d2{}, d3{}, q0{}, q1{}, q2{}, q3{};
  acc_t sum_d = 0, sum_d2 = 0;
  for (int64_t r = 0; r < count; ++r) {
    const scalar_t* v = x + r * stride;
    int64_t i = 0;
    for (; i + L <= len; i += L) {
      add_deviation(vload(v + i) - k, d0, q0);
      add_deviation(vload(v + i + W) - k, d1, q1);
      add_deviation(vload(v + i + 2 * W) - k, d2, q2);
      add_deviation(vload(v + i + 3 * W) - k, d3, q3);
    }
    for (; i < len; ++i) {
      const acc_t d = static_cast<acc_t>(v[i] - shift);
      sum_d += d;
      sum_d2 += d * d;
    }
  }
  sum_d += vsum4<scalar_t, acc_t>(d0, d1, d2, d3);
  sum_d2 += vsum4<scalar_t, acc_t>(q0, q1, q2, q3);
  return bn_block_stats<acc_t>(n, static_cast<acc_t>(shift), sum_d, sum_d2);
}

// The backward's two sums over a block: sum dy and sum dy * (x - mean), added to sum_dy and sum_dy_xmu.
template <typename scalar_t, typename acc_t>
void block_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t count, int64_t stride, int64_t len, scalar_t mean,
                     acc_t& sum_dy, acc_t& sum_dy_xmu) {
  using V = vec_t<scalar_t>;
  constexpr int W = kWidth<scalar_t>, L = kLanes<scalar_t>;
  const V m = vsplat(mean);
  V a0{}, a1{}, a2{}, a3{}, p0{}, p1{}, p2{}, p3{};
  for (int64_t r = 0; r < count; ++r) {
    const scalar_t* g = dy + r * stride;
    const scalar_t* v = x + r * stride;
    int64_t i = 0;
    for (; i + L <= len; i += L) {
      const V g0 = vload(g + i), g1 = vload(g + i + W), g2 = vload(g + i + 2 * W), g3 = vload(g + i + 3 * W);
      a0 += g0;
      a1 += g1;
      a2 += g2;
      a3 += g3;
      p0 += g0 * (vload(v + i) - m);
      p1 += g1 * (vload(v + i + W) - m);
      p2 += g2 * (vload(v + i + 2 * W) - m);
      p3 += g3 * (vload(v + i + 3 * W) - m);
    }
    for (; i < len; ++i) {
      sum_dy += g[i];
      sum_dy_xmu += static_cast<acc_t>(g[i]) * static_cast<acc_t>(v[i] - mean);
    }
  }
  sum_dy += vsum4<scalar_t, acc_t>(a0, a1, a2, a3);
  sum_dy_xmu += vsum4<scalar_t, acc_t>(p0, p1, p2, p3);
}

// Channel-first: the values of channel c are cut into U "units", reduced one by one and combined in
// order u = 0, 1, ... . Small planes (S <= kBlock): unit u is the block of planes n in
// [u * per, (u + 1) * per), per = kBlock / S. Large planes: unit u is plane u, in blocks of kBlock.
struct PlaneUnits {
  int64_t per;    // planes per unit (1 for large planes)
  int64_t count;  // units per channel
};

inline PlaneUnits plane_units(const BatchNormLayout& lay) {
  const int64_t per = lay.S <= kBlock ? std::max<int64_t>(1, kBlock / std::max<int64_t>(lay.S, 1)) : 1;
  return {per, (lay.N + per - 1) / per};
}

template <typename scalar_t, typename acc_t>
BnStats<acc_t> unit_stats(const scalar_t* x, const BatchNormLayout& lay, const PlaneUnits& pu, int64_t c, int64_t u) {
  using T = opmath_t<scalar_t>;
  const int64_t C = lay.C, S = lay.S, n0 = u * pu.per;
  const scalar_t* base = x + (n0 * C + c) * S;
#if CS231N_X86
  if constexpr (kNarrow<scalar_t>) {
    if (cpu::narrow_avx2_available<scalar_t>()) {  // widened as loaded (batch_norm_narrow.h)
      if (S <= kBlock) return cpu::narrow_block_stats(base, std::min(pu.per, lay.N - n0), C * S, S);
      BnStats<acc_t> s{0, 0, 0};
      for_each_piece(S, [&](int64_t b, int64_t len) { s = bn_merge(s, cpu::narrow_block_stats(base + b, 1, 0, len)); });
      return s;
    }
  }
#endif
  if (S <= kBlock) {
    const int64_t count = std::min(pu.per, lay.N - n0);
    int64_t stride;
    const T* block = load_runs(base, count, C * S, S, Piece::kX, &stride);
    return block_stats<T, acc_t>(block, count, stride, S);
  }
  BnStats<acc_t> s{0, 0, 0};
  for_each_piece(S, [&](int64_t b, int64_t len) {
    s = bn_merge(s, block_stats<T, acc_t>(load(base + b, len, Piece::kX), 1, 0, len));
  });
  return s;
}

template <typename scalar_t, typename acc_t, typename T = opmath_t<scalar_t>>
void unit_grad_sums(const scalar_t* dy, const scalar_t* x, const BatchNormLayout& lay, const PlaneUnits& pu, int64_t c,
                    int64_t u, T mean, acc_t& sum_dy, acc_t& sum_dy_xmu) {
  const int64_t C = lay.C, S = lay.S, n0 = u * pu.per;
  const int64_t off = (n0 * C + c) * S;
  sum_dy = 0;
  sum_dy_xmu = 0;
#if CS231N_X86
  if constexpr (kNarrow<scalar_t>) {
    if (cpu::narrow_avx2_available<scalar_t>()) {
      if (S <= kBlock) {
        cpu::narrow_grad_sums(dy + off, x + off, std::min(pu.per, lay.N - n0), C * S, S, mean, sum_dy, sum_dy_xmu);
        return;
      }
      for_each_piece(S, [&](int64_t b, int64_t len) {
        cpu::narrow_grad_sums(dy + off + b, x + off + b, 1, 0, len, mean, sum_dy, sum_dy_xmu);
      });
      return;
    }
  }
#endif
  if (S <= kBlock) {
    const int64_t count = std::min(pu.per, lay.N - n0);
    int64_t stride;
    const T* g = load_runs(dy + off, count, C * S, S, Piece::kDy, &stride);
    const T* v = load_runs(x + off, count, C * S, S, Piece::kX, &stride);
    block_grad_sums<T, acc_t>(g, v, count, stride, S, mean, sum_dy, sum_dy_xmu);
    return;
  }
  for_each_piece(S, [&](int64_t b, int64_t len) {
    block_grad_sums<T, acc_t>(load(dy + off + b, len, Piece::kDy), load(x + off + b, len, Piece::kX), 1, 0, len, mean,
                              sum_dy, sum_dy_xmu);
  });
}

// ---------------------------------------------------------------------------------------- reductions
// Channel-last: the two-pass of one block of nr rows of C values (in L1 or L2), for every channel: shift =
// the block's mean, sd = sum (x - shift), sd2 = sum (x - shift)^2. Channels are taken in bands of up to
// 4 * kLanes (256 bytes of each row, four cache lines), their accumulators in registers, walking down the
// rows; the last C % kLanes channels one by one. A band of one vector, a cache line a row 256 bytes apart
// at 64 channels, left the hardware prefetchers behind, and the prefetches issued for the next block
// stalled on the misses in flight (Zen 4): (32, 64, 56, 56) statistics 1.6-2.0 -> 1.15-1.2 ms (torch's
// x.sum over the same dimensions 1.4-1.6), training forward 1.20 -> 0.90 of torch's time.
// band_two_pass: the band of B vectors of channels from c0. Per lane the sums run down the rows in order
// as before, so the results are the same bits.
template <int B, typename scalar_t>
void band_two_pass(const scalar_t* xb, int64_t nr, int64_t C, int64_t c0, scalar_t inv, scalar_t* shift, scalar_t* sd,
                   scalar_t* sd2) {
  using V = wide_t<scalar_t>;
  constexpr int L = kLanes<scalar_t>;
  const scalar_t* band = xb + c0;
  V s[B] = {};
  for (int64_t r = 0; r < nr; ++r) {
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) s[b] += wload(band + r * C + b * L);
  }
  V k[B], d[B] = {}, q[B] = {};
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) k[b] = s[b] * inv;
  for (int64_t r = 0; r < nr; ++r) {
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) add_deviation(wload(band + r * C + b * L) - k[b], d[b], q[b]);
  }
  std::memcpy(shift + c0, k, sizeof k);
  std::memcpy(sd + c0, d, sizeof d);
  std::memcpy(sd2 + c0, q, sizeof q);
}

template <typename scalar_t>
void rows_two_pass(const scalar_t* xb, int64_t nr, int64_t C, scalar_t* shift, scalar_t* sd, scalar_t* sd2) {
  constexpr int L = kLanes<scalar_t>;
  const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(nr);
  int64_t c0 = 0;
  for (; c0 + 4 * L <= C; c0 += 4 * L) band_two_pass<4>(xb, nr, C, c0, inv, shift, sd, sd2);
  for (; c0 + 2 * L <= C; c0 += 2 * L) band_two_pass<2>(xb, nr, C, c0, inv, shift, sd, sd2);
  for (; c0 + L <= C; c0 += L) band_two_pass<1>(xb, nr, C, c0, inv, shift, sd, sd2);
  for (int64_t c = c0; c < C; ++c) {
    scalar_t sum = 0;
    for (int64_t r = 0; r < nr; ++r) sum += xb[r * C + c];
    const scalar_t k = sum * inv;
    scalar_t d = 0, q = 0;
    for (int64_t r = 0; r < nr; ++r) {
      const scalar_t e = xb[r * C + c] - k;
      d += e;
      q += e * e;
    }
    shift[c] = k;
    sd[c] = d;
    sd2[c] = q;
  }
}

// Per-channel statistics of x.
template <typename scalar_t, typename acc_t>
std::vector<BnStats<acc_t>> channel_stats(const scalar_t* x, const BatchNormLayout& lay) {
  const int64_t N = lay.N, C = lay.C, S = lay.S;
  std::vector<BnStats<acc_t>> out(C, BnStats<acc_t>{0, 0, 0});
  if (!lay.channels_last) {
    // Units of all channels in parallel, one result each; then each channel merges its units in order.
    const PlaneUnits pu = plane_units(lay);
    std::vector<BnStats<acc_t>> units(pu.count * C);
    const int64_t unit_values = pu.per * S;
    parallel_for_isa(0, pu.count * C, std::max<int64_t>(1, kGrain / unit_values), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) units[i] = unit_stats<scalar_t, acc_t>(x, lay, pu, i % C, i / C);
    });
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t u = 0; u < pu.count; ++u) out[c] = bn_merge(out[c], units[u * C + c]);
    }
    return out;
  }
  // Channel-last: rows of C values. Blocks of rows, vectorised over c; each of G groups of consecutive
  // blocks merges its blocks into its own per-channel state; the groups are merged in order at the end.
  const int64_t R = N * S;
  const int64_t rows = std::clamp<int64_t>(kBlock / std::max<int64_t>(C, 1), kMinRowsPerBlock, kMaxRowsPerBlock);
  const int64_t blocks = (R + rows - 1) / rows;
  const int64_t G = std::min(blocks, kMaxGroups);
  std::vector<acc_t> g_n(G, 0), g_mean(G * C, 0), g_m2(G * C, 0);
  using T = opmath_t<scalar_t>;
  parallel_for_isa(0, G, std::max<int64_t>(1, kGrain * G / std::max<int64_t>(R * C, 1)), [&](int64_t gb, int64_t ge) {
    std::vector<T> shift(C), sd(C), sd2(C);
    for (int64_t g = gb; g < ge; ++g) {
      acc_t* mean = &g_mean[g * C];
      acc_t* m2 = &g_m2[g * C];
      for (int64_t blk = g * blocks / G; blk < (g + 1) * blocks / G; ++blk) {
        const int64_t r0 = blk * rows, nr = std::min(rows, R - r0);
        const T* xb = load(x + r0 * C, nr * C, Piece::kX);
        rows_two_pass<T>(xb, nr, C, shift.data(), sd.data(), sd2.data());
        // Every channel of the block has nr values and of the group g_n[g]: Chan's weights are shared,
        // computed once, and the per-channel merge has no division (bn_merge_shared_counts).
        const acc_t na = g_n[g], nb = static_cast<acc_t>(nr), n = na + nb;
        const acc_t inv_nb = acc_t(1) / nb, r = nb / n, w = na * nb / n;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = sd[c], mean_b = static_cast<acc_t>(shift[c]) + d * inv_nb;
          const acc_t m2_raw = static_cast<acc_t>(sd2[c]) - d * d * inv_nb;  // corrected two-pass
          bn_merge_shared_counts(mean[c], m2[c], mean_b, m2_raw > acc_t(0) ? m2_raw : acc_t(0), r, w);
        }
        g_n[g] = n;
      }
    }
  });
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < C; ++c)
      out[c] = bn_merge(out[c], BnStats<acc_t>{g_n[g], g_mean[g * C + c], g_m2[g * C + c]});
  }
  return out;
}

// Channel-last: one row's dy and dy * (x - mean) added into a[c] and p[c], channel by channel.
template <typename scalar_t, typename T = opmath_t<scalar_t>>
void grad_sums_row(const scalar_t* dy, const scalar_t* x, int64_t C, const T* mean, T* a, T* p) {
#if CS231N_X86
  if constexpr (kNarrow<scalar_t>) {
    if (cpu::narrow_avx2_available<scalar_t>()) return cpu::narrow_grad_sums_row(dy, x, C, mean, a, p);
  }
#endif
  const T* gr = load(dy, C, Piece::kDy);
  const T* xr = load(x, C, Piece::kX);
  for (int64_t c = 0; c < C; ++c) {
    a[c] += gr[c];
    p[c] += gr[c] * (xr[c] - mean[c]);
  }
}

// Channel-last, float and double: one block's nr rows of dy and dy * (x - mean) summed into a[c] and p[c],
// in bands of up to 4 * kLanes channels with the sums in registers (as rows_two_pass; the same order per
// lane as grad_sums_row, whose arrays in L1 were loaded and stored again every row).
template <int B, typename T>
void band_grad_sums(const T* dy, const T* x, int64_t nr, int64_t C, int64_t c0, const T* mean, T* a, T* p) {
  using V = wide_t<T>;
  constexpr int L = kLanes<T>;
  V m[B], sa[B] = {}, sp[B] = {};
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) m[b] = wload(mean + c0 + b * L);
  for (int64_t r = 0; r < nr; ++r) {
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) {
      const V g = wload(dy + r * C + c0 + b * L);
      sa[b] += g;
      sp[b] += g * (wload(x + r * C + c0 + b * L) - m[b]);
    }
  }
  std::memcpy(a + c0, sa, sizeof sa);
  std::memcpy(p + c0, sp, sizeof sp);
}

template <typename T>
void rows_grad_sums(const T* dy, const T* x, int64_t nr, int64_t C, const T* mean, T* a, T* p) {
  constexpr int L = kLanes<T>;
  int64_t c0 = 0;
  for (; c0 + 4 * L <= C; c0 += 4 * L) band_grad_sums<4>(dy, x, nr, C, c0, mean, a, p);
  for (; c0 + 2 * L <= C; c0 += 2 * L) band_grad_sums<2>(dy, x, nr, C, c0, mean, a, p);
  for (; c0 + L <= C; c0 += L) band_grad_sums<1>(dy, x, nr, C, c0, mean, a, p);
  for (int64_t c = c0; c < C; ++c) {  // the channels past the vectors
    T sa = 0, sp = 0;
    for (int64_t r = 0; r < nr; ++r) {
      sa += dy[r * C + c];
      sp += dy[r * C + c] * (x[r * C + c] - mean[c]);
    }
    a[c] = sa;
    p[c] = sp;
  }
}

// Per-channel sum dy and sum dy * (x - mean), the two sums of the backward.
template <typename scalar_t, typename acc_t, typename T = opmath_t<scalar_t>>
void channel_grad_sums(const scalar_t* dy, const scalar_t* x, const T* mean, const BatchNormLayout& lay,
                       std::vector<acc_t>& sum_dy, std::vector<acc_t>& sum_dy_xmu) {
  const int64_t N = lay.N, C = lay.C, S = lay.S;
  sum_dy.assign(C, 0);
  sum_dy_xmu.assign(C, 0);
  if (!lay.channels_last) {
    const PlaneUnits pu = plane_units(lay);
    std::vector<acc_t> u_dy(pu.count * C), u_dyx(pu.count * C);
    parallel_for_isa(0, pu.count * C, std::max<int64_t>(1, kGrain / (pu.per * S)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t c = i % C;
        unit_grad_sums<scalar_t, acc_t>(dy, x, lay, pu, c, i / C, mean[c], u_dy[i], u_dyx[i]);
      }
    });
    for (int64_t u = 0; u < pu.count; ++u) {
      for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] += u_dy[u * C + c];
        sum_dy_xmu[c] += u_dyx[u * C + c];
      }
    }
    return;
  }
  const int64_t R = N * S;
  const int64_t rows = std::clamp<int64_t>(kBlock / std::max<int64_t>(C, 1), kMinRowsPerBlock, kMaxRowsPerBlock);
  const int64_t blocks = (R + rows - 1) / rows;
  const int64_t G = std::min(blocks, kMaxGroups);
  std::vector<acc_t> g_dy(G * C, 0), g_dyx(G * C, 0);
  parallel_for_isa(0, G, std::max<int64_t>(1, kGrain * G / std::max<int64_t>(R * C, 1)), [&](int64_t gb, int64_t ge) {
    std::vector<T> a(C), p(C);
    for (int64_t g = gb; g < ge; ++g) {
      for (int64_t blk = g * blocks / G; blk < (g + 1) * blocks / G; ++blk) {
        const int64_t r0 = blk * rows, nr = std::min(rows, R - r0);
        if constexpr (!kNarrow<scalar_t>) {
          rows_grad_sums<T>(dy + r0 * C, x + r0 * C, nr, C, mean, a.data(), p.data());
        } else {
          std::fill(a.begin(), a.end(), T(0));
          std::fill(p.begin(), p.end(), T(0));
          for (int64_t r = 0; r < nr; ++r)
            grad_sums_row(dy + (r0 + r) * C, x + (r0 + r) * C, C, mean, a.data(), p.data());
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
void for_each_channel_run(const BatchNormLayout& lay, F f) {
  const int64_t N = lay.N, C = lay.C, S = lay.S;
  if (!lay.channels_last) {
    parallel_for_isa(0, N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(S, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) f(/*offset=*/p * S, /*len=*/S, /*c=*/p % C, /*channels_last=*/false);
    });
  } else {
    parallel_for_isa(0, N * S, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) f(r * C, C, 0, true);
    });
  }
}

// y = ((x - mean_hi) - mean_lo) * scale + beta over one run of for_each_channel_run: a channel-first plane
// of channel c (its constants are loop invariants) or a channel-last row of all C channels (the constants
// indexed by position). common/batch_norm.h: bn_normalize.
template <typename scalar_t, typename T = opmath_t<scalar_t>>
void normalize_run(const scalar_t* x, scalar_t* y, int64_t off, int64_t len, int64_t c, bool channels_last,
                   const T* mean, const T* mean_lo, const T* scale, const T* beta) {
#if CS231N_X86
  if constexpr (kNarrow<scalar_t>) {
    if (cpu::cpu_isa() == cpu::Isa::kAvx512) {
      if (channels_last) return cpu::narrow_normalize_row_avx512(x + off, y + off, len, mean, mean_lo, scale, beta);
      return cpu::narrow_normalize_avx512(x + off, y + off, len, mean[c], mean_lo[c], scale[c], beta[c]);
    }
    if (cpu::narrow_avx2_available<scalar_t>()) {
      if (channels_last) return cpu::narrow_normalize_row(x + off, y + off, len, mean, mean_lo, scale, beta);
      return cpu::narrow_normalize(x + off, y + off, len, mean[c], mean_lo[c], scale[c], beta[c]);
    }
  }
#endif
  for_each_piece(
      len,
      [&](int64_t k0, int64_t n) {
        const T* xi = load(x + off + k0, n, Piece::kX);
        T* yo = result_piece(y + off + k0, n);
        if (channels_last) {
          const T *m = mean + k0, *lo = mean_lo + k0, *s = scale + k0, *b = beta + k0;
          for (int64_t k = 0; k < n; ++k) yo[k] = bn_normalize(xi[k], m[k], lo[k], s[k], b[k]);
        } else {
          const T m = mean[c], lo = mean_lo[c], s = scale[c], b = beta[c];
          for (int64_t k = 0; k < n; ++k) yo[k] = bn_normalize(xi[k], m, lo, s, b);
        }
        store(yo, n, y + off + k0);
      },
      elementwise_piece<scalar_t>(len));
}

template <typename scalar_t, typename T = opmath_t<scalar_t>>
void normalize_loop(const scalar_t* x, scalar_t* y, const BatchNormLayout& lay, const T* mean, const T* mean_lo,
                    const T* scale, const T* beta) {
  for_each_channel_run(lay, [&](int64_t off, int64_t len, int64_t c, bool cl) {
    normalize_run(x, y, off, len, c, cl, mean, mean_lo, scale, beta);
  });
}

// The per-channel constants of dx (common/batch_norm.h: bn_grad_constants), one array each.
template <typename T>
struct GradConstants {
  std::vector<T> gi, dy_mean, proj;
  explicit GradConstants(int64_t C) : gi(C), dy_mean(C), proj(C) {}
  template <typename acc_t>
  void set(int64_t c, const BnGradConstants<acc_t>& k) {
    gi[c] = static_cast<T>(k.gi);
    dy_mean[c] = static_cast<T>(k.dy_mean);
    proj[c] = static_cast<T>(k.proj);
  }
};

// dx over one run of for_each_channel_run, as normalize_run.
template <typename scalar_t, typename T = opmath_t<scalar_t>>
void grad_input_run(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t off, int64_t len, int64_t c,
                    bool channels_last, const T* mean, const GradConstants<T>& k, bool training) {
#if CS231N_X86
  if constexpr (kNarrow<scalar_t>) {
    if (cpu::cpu_isa() == cpu::Isa::kAvx512) {
      if (channels_last) {
        return cpu::narrow_grad_input_row_avx512(dy + off, x + off, dx + off, len, mean, k.dy_mean.data(),
                                                 k.proj.data(), k.gi.data(), training);
      }
      return cpu::narrow_grad_input_avx512(dy + off, x + off, dx + off, len, mean[c], k.dy_mean[c], k.proj[c], k.gi[c],
                                           training);
    }
    if (cpu::narrow_avx2_available<scalar_t>()) {
      if (channels_last) {
        return cpu::narrow_grad_input_row(dy + off, x + off, dx + off, len, mean, k.dy_mean.data(), k.proj.data(),
                                          k.gi.data(), training);
      }
      return cpu::narrow_grad_input(dy + off, x + off, dx + off, len, mean[c], k.dy_mean[c], k.proj[c], k.gi[c],
                                    training);
    }
  }
#endif
  for_each_piece(
      len,
      [&](int64_t k0, int64_t n) {
        const T* gr = load(dy + off + k0, n, Piece::kDy);
        const T* xi = training ? load(x + off + k0, n, Piece::kX) : nullptr;
        T* out = result_piece(dx + off + k0, n);
        if (channels_last) {
          const T *gi = k.gi.data() + k0, *dm = k.dy_mean.data() + k0, *pj = k.proj.data() + k0, *m = mean + k0;
          if (training) {
            for (int64_t i = 0; i < n; ++i) out[i] = bn_backward_train(gr[i], xi[i], m[i], dm[i], pj[i], gi[i]);
          } else {
            for (int64_t i = 0; i < n; ++i) out[i] = bn_backward_eval(gr[i], gi[i]);
          }
        } else {
          const T s = k.gi[c];
          if (training) {
            const T m = mean[c], dm = k.dy_mean[c], pj = k.proj[c];
            for (int64_t i = 0; i < n; ++i) out[i] = bn_backward_train(gr[i], xi[i], m, dm, pj, s);
          } else {
            for (int64_t i = 0; i < n; ++i) out[i] = bn_backward_eval(gr[i], s);
          }
        }
        store(out, n, dx + off + k0);
      },
      elementwise_piece<scalar_t>(len));
}

// ------------------------------------------------------------------------------------------------- ops
// The input in the output's layout, with the layout's description.
std::tuple<at::Tensor, at::Tensor, BatchNormLayout> dense_input(const at::Tensor& input) {
  at::Tensor out = bn_empty_output(input);
  at::Tensor x = dense_like(input, out);
  return {x, out, batch_norm_layout(x)};
}

// Channel-first with at least one channel per thread: each thread takes whole channels and runs both
// passes over one channel before the next. The second pass then reads the channel from cache (its
// N*S values are at most a few hundred KiB at the suite's shapes), so x (and dy) come from memory once.
// With fewer channels than threads, the reduction is split over planes instead (channel_stats).
bool per_channel_fused(const BatchNormLayout& lay) { return !lay.channels_last && lay.C >= at::get_num_threads(); }

// The statistics of channel c of a channel-first tensor: its units merged in order (the same order as
// channel_stats, so both paths give the same bits).
template <typename scalar_t, typename acc_t>
BnStats<acc_t> channel_first_stats(const scalar_t* x, const BatchNormLayout& lay, int64_t c) {
  const PlaneUnits pu = plane_units(lay);
  BnStats<acc_t> s{0, 0, 0};
  for (int64_t u = 0; u < pu.count; ++u) s = bn_merge(s, unit_stats<scalar_t, acc_t>(x, lay, pu, c, u));
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_train_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  constexpr const char* op = "batch_norm_forward_train";
  check_batch_norm_forward_train(input, weight, bias, eps, op);
  auto [x, output, lay] = dense_input(input);
  const auto stat_opts = input.options().dtype(bn_stat_dtype(input.scalar_type()));
  at::Tensor save_mean = at::empty({lay.C}, stat_opts);
  at::Tensor save_invstd = at::empty({lay.C}, stat_opts);
  at::Tensor save_var = at::empty({lay.C}, stat_opts);
  const at::Tensor gamma = bn_channel_values(weight, input, 1.0);
  const at::Tensor beta = bn_channel_values(bias, input, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_forward_train_cpu", [&] {
    using T = opmath_t<scalar_t>;          // the statistics' and the arithmetic's type
    using acc_t = at::acc_type<T, false>;  // double
    const int64_t C = lay.C, S = lay.S;
    T* mean_p = save_mean.mutable_data_ptr<T>();
    T* invstd_p = save_invstd.mutable_data_ptr<T>();
    T* var_p = save_var.mutable_data_ptr<T>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = output.mutable_data_ptr<scalar_t>();
    const T* g = gamma.const_data_ptr<T>();
    const T* b = beta.const_data_ptr<T>();
    std::vector<T> scale(C), mean_lo(C);
    // From a channel's (n, mean, M2): the saved statistics, scale = gamma * invstd, and the part of the
    // double mean that the saved mean (of type T) does not hold.
    auto finish = [&](int64_t c, const BnStats<acc_t>& st) {
      const acc_t var = lay.M() > 0 ? st.m2 / st.n : acc_t(0);  // biased: this is what normalises
      const acc_t invstd = bn_invstd<acc_t>(var, eps);
      mean_p[c] = static_cast<T>(st.mean);  // 0 for an empty batch
      mean_lo[c] = static_cast<T>(st.mean - static_cast<acc_t>(mean_p[c]));
      var_p[c] = static_cast<T>(var);
      invstd_p[c] = static_cast<T>(invstd);
      scale[c] = static_cast<T>(invstd * g[c]);
    };
    if (lay.M() == 0) {  // an empty batch: nothing to normalise; finite placeholder statistics
      for (int64_t c = 0; c < C; ++c) finish(c, BnStats<acc_t>{0, 0, 0});
      return;
    }
    if (per_channel_fused(lay)) {
      parallel_for_isa(0, C, std::max<int64_t>(1, kGrain / std::max<int64_t>(lay.M(), 1)), [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
          finish(c, channel_first_stats<scalar_t, acc_t>(xp, lay, c));
          for (int64_t n = 0; n < lay.N; ++n) {  // the channel's planes again, now from cache
            normalize_run(xp, yp, (n * C + c) * S, S, c, false, mean_p, mean_lo.data(), scale.data(), b);
          }
        }
      });
      return;
    }
    const std::vector<BnStats<acc_t>> stats = channel_stats<scalar_t, acc_t>(xp, lay);
    for (int64_t c = 0; c < C; ++c) finish(c, stats[c]);
    normalize_loop(xp, yp, lay, mean_p, mean_lo.data(), scale.data(), b);
  });
  return {output, save_mean, save_invstd, save_var};
}

at::Tensor batch_norm_forward_eval_cpu(const at::Tensor& input, const at::Tensor& running_mean,
                                       const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "batch_norm_forward_eval";
  check_batch_norm_forward_eval(input, running_mean, running_var, weight, bias, eps, op);
  auto [x, output, lay] = dense_input(input);
  if (output.numel() == 0) return output;
  const at::Tensor rm = bn_channel_values(running_mean, input, 0.0);
  const at::Tensor rv = bn_channel_values(running_var, input, 1.0);
  const at::Tensor gamma = bn_channel_values(weight, input, 1.0);
  const at::Tensor beta = bn_channel_values(bias, input, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_forward_eval_cpu", [&] {
    using T = opmath_t<scalar_t>;
    using acc_t = at::acc_type<T, false>;
    const T* v = rv.const_data_ptr<T>();
    const T* g = gamma.const_data_ptr<T>();
    std::vector<T> scale(lay.C);
    for (int64_t c = 0; c < lay.C; ++c) scale[c] = static_cast<T>(bn_invstd<acc_t>(v[c], eps) * g[c]);
    const std::vector<T> zeros(lay.C, T(0));  // the running mean is exactly a T
    normalize_loop(x.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), lay, rm.const_data_ptr<T>(),
                   zeros.data(), scale.data(), beta.const_data_ptr<T>());
  });
  return output;
}

// d_input, d_weight, d_bias, each only when output_mask asks for it (None otherwise). `mean` and `invstd`
// are the saved batch statistics in training, the running mean and 1/sqrt(running_var + eps) in eval.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> batch_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, std::array<bool, 3> output_mask) {
  constexpr const char* op = "batch_norm_backward";
  check_batch_norm_backward(grad_output, input, weight, mean, invstd, op);
  at::Tensor grad_input = bn_empty_output(input);
  const at::Tensor x = dense_like(input, grad_input);
  const at::Tensor dy = dense_like(grad_output, grad_input);
  const BatchNormLayout lay = batch_norm_layout(x);
  const int64_t C = lay.C, S = lay.S;
  const auto stat_opts = input.options().dtype(bn_stat_dtype(input.scalar_type()));
  at::Tensor grad_weight = output_mask[1] ? at::empty({C}, stat_opts) : at::Tensor();
  at::Tensor grad_bias = output_mask[2] ? at::empty({C}, stat_opts) : at::Tensor();
  const at::Tensor gamma = bn_channel_values(weight, input, 1.0);
  const at::Tensor mu = mean.to(stat_opts.dtype()).contiguous();
  const at::Tensor is = invstd.to(stat_opts.dtype()).contiguous();

  // d_weight and d_bias are of the statistics' dtype (float32 for a narrow input), as on CUDA.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_backward_cpu", [&] {
    using T = opmath_t<scalar_t>;
    using acc_t = at::acc_type<T, false>;
    const T* mean_p = mu.const_data_ptr<T>();
    const T* invstd_p = is.const_data_ptr<T>();
    const T* g = gamma.const_data_ptr<T>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
    T* dwp = output_mask[1] ? grad_weight.mutable_data_ptr<T>() : nullptr;
    T* dbp = output_mask[2] ? grad_bias.mutable_data_ptr<T>() : nullptr;
    const bool need_sums = training || output_mask[1] || output_mask[2];
    const acc_t M = static_cast<acc_t>(lay.M());
    GradConstants<T> k(C);
    // From a channel's two sums: dgamma = invstd * sum dy (x - mean), dbeta = sum dy, and the constants
    // of dx (common/batch_norm.h: bn_backward_train).
    auto finish = [&](int64_t c, acc_t sum_dy, acc_t sum_dy_xmu) {
      const acc_t inv = invstd_p[c];
      if (dwp) dwp[c] = static_cast<T>(sum_dy_xmu * inv);
      if (dbp) dbp[c] = static_cast<T>(sum_dy);
      k.set(c, bn_grad_constants<acc_t>(sum_dy, sum_dy_xmu, M, g[c], inv));
    };
    // dx over one contiguous run of a channel-first plane.
    auto dx_plane = [&](int64_t off, int64_t c) {
      grad_input_run(dyp, xp, dxp, off, S, c, false, mean_p, k, training);
    };

    if (need_sums && lay.M() > 0 && per_channel_fused(lay)) {
      // Both passes per channel, the second from cache.
      parallel_for_isa(0, C, std::max<int64_t>(1, kGrain / std::max<int64_t>(lay.M(), 1)), [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
          const PlaneUnits pu = plane_units(lay);
          acc_t sum_dy = 0, sum_dy_xmu = 0;
          for (int64_t u = 0; u < pu.count; ++u) {  // in channel_grad_sums's order: the same bits
            acc_t a, p;
            unit_grad_sums<scalar_t, acc_t>(dyp, xp, lay, pu, c, u, mean_p[c], a, p);
            sum_dy += a;
            sum_dy_xmu += p;
          }
          finish(c, sum_dy, sum_dy_xmu);
          if (dxp) {
            for (int64_t n = 0; n < lay.N; ++n) dx_plane((n * C + c) * S, c);
          }
        }
      });
      return;
    }
    // Otherwise pass 1 over the whole tensor, then pass 2.
    std::vector<acc_t> sum_dy(C, 0), sum_dy_xmu(C, 0);
    if (need_sums && lay.M() > 0) channel_grad_sums<scalar_t, acc_t>(dyp, xp, mean_p, lay, sum_dy, sum_dy_xmu);
    for (int64_t c = 0; c < C; ++c) finish(c, sum_dy[c], sum_dy_xmu[c]);
    if (!dxp || grad_input.numel() == 0) return;
    for_each_channel_run(lay, [&](int64_t off, int64_t len, int64_t c, bool cl) {
      grad_input_run(dyp, xp, dxp, off, len, c, cl, mean_p, k, training);
    });
  });
  return masked_grads(grad_input, grad_weight, grad_bias, output_mask);
}

// ------------------------------------------------------------------------------- synchronised batch norm
// Per-channel mean and biased variance of this process's input (0 and 0 for an empty batch).
std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input) {
  constexpr const char* op = "batch_norm_stats";
  check_batch_norm_input(input, op);
  const at::Tensor x = dense_like(input, bn_empty_output(input));
  const BatchNormLayout lay = batch_norm_layout(x);
  const auto stat_opts = input.options().dtype(bn_stat_dtype(input.scalar_type()));
  at::Tensor mean = at::empty({lay.C}, stat_opts);
  at::Tensor var = at::empty({lay.C}, stat_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_stats_cpu", [&] {
    using T = opmath_t<scalar_t>;
    using acc_t = at::acc_type<T, false>;
    std::vector<BnStats<acc_t>> stats(lay.C, BnStats<acc_t>{0, 0, 0});
    if (lay.M() > 0) stats = channel_stats<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), lay);
    T* mean_p = mean.mutable_data_ptr<T>();
    T* var_p = var.mutable_data_ptr<T>();
    for (int64_t c = 0; c < lay.C; ++c) {
      mean_p[c] = static_cast<T>(stats[c].mean);
      var_p[c] = static_cast<T>(stats[c].n > 0 ? stats[c].m2 / stats[c].n : acc_t(0));
    }
  });
  return {mean, var};
}

// The statistics of the union of P processes' batches, from each one's (count, mean, biased var): Chan's
// merge (bn_merge) in process order, in double. An empty process (count 0) contributes nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_merge_stats_cpu(const at::Tensor& counts,
                                                                          const at::Tensor& means,
                                                                          const at::Tensor& vars, double eps) {
  constexpr const char* op = "batch_norm_merge_stats";
  check_batch_norm_merge_stats(counts, means, vars, eps, op);
  if (cpu::is_reduced_float(means)) {
    auto [mean, var, invstd] =
        batch_norm_merge_stats_cpu(cpu::to_float(counts), cpu::to_float(means), cpu::to_float(vars), eps);
    const auto dtype = means.scalar_type();
    return {cpu::round_to(mean, dtype), cpu::round_to(var, dtype), cpu::round_to(invstd, dtype)};
  }
  const int64_t P = means.size(0), C = means.size(1);
  at::Tensor mean = at::empty({C}, means.options());
  at::Tensor var = at::empty({C}, means.options());
  at::Tensor invstd = at::empty({C}, means.options());
  const at::Tensor n = counts.contiguous(), mu = means.contiguous(), v = vars.contiguous();
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "batch_norm_merge_stats_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t *np = n.const_data_ptr<scalar_t>(), *mp = mu.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      BnStats<acc_t> s{0, 0, 0};
      for (int64_t p = 0; p < P; ++p) {
        const acc_t np_ = np[p];
        s = bn_merge(s,
                     BnStats<acc_t>{np_, static_cast<acc_t>(mp[p * C + c]), static_cast<acc_t>(vp[p * C + c]) * np_});
      }
      const acc_t var_c = s.n > acc_t(0) ? s.m2 / s.n : acc_t(0);
      mean.mutable_data_ptr<scalar_t>()[c] = static_cast<scalar_t>(s.mean);
      var.mutable_data_ptr<scalar_t>()[c] = static_cast<scalar_t>(var_c);
      invstd.mutable_data_ptr<scalar_t>()[c] = static_cast<scalar_t>(bn_invstd<acc_t>(var_c, eps));
    }
  });
  return {mean, var, invstd};
}

// This process's sum dy and sum dy (x - mean) per channel (the mean is the global one).
std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cpu(const at::Tensor& grad_output,
                                                                  const at::Tensor& input, const at::Tensor& mean) {
  constexpr const char* op = "batch_norm_backward_reduce";
  check_batch_norm_backward_reduce(grad_output, input, mean, op);
  const at::Tensor layout = bn_empty_output(input);
  const at::Tensor x = dense_like(input, layout);
  const at::Tensor dy = dense_like(grad_output, layout);
  const BatchNormLayout lay = batch_norm_layout(x);
  const auto stat_opts = input.options().dtype(bn_stat_dtype(input.scalar_type()));
  at::Tensor sum_dy = at::empty({lay.C}, stat_opts);
  at::Tensor sum_dy_xmu = at::empty({lay.C}, stat_opts);
  const at::Tensor mu = mean.to(stat_opts.dtype()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_backward_reduce_cpu", [&] {
    using T = opmath_t<scalar_t>;
    using acc_t = at::acc_type<T, false>;
    std::vector<acc_t> a(lay.C, 0), p(lay.C, 0);
    if (lay.M() > 0) {
      channel_grad_sums<scalar_t, acc_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                         mu.const_data_ptr<T>(), lay, a, p);
    }
    for (int64_t c = 0; c < lay.C; ++c) {
      sum_dy.mutable_data_ptr<T>()[c] = static_cast<T>(a[c]);
      sum_dy_xmu.mutable_data_ptr<T>()[c] = static_cast<T>(p[c]);
    }
  });
  return {sum_dy, sum_dy_xmu};
}

// d_input of training from the sums over the whole batch of `count` values per channel (all processes):
// dx = gamma invstd (dy - sum_dy / count - (x - mean) invstd^2 sum_dy_xmu / count).
at::Tensor batch_norm_backward_elemt_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                         const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                         const at::Tensor& invstd, const at::Tensor& sum_dy,
                                         const at::Tensor& sum_dy_xmu, int64_t count) {
  constexpr const char* op = "batch_norm_backward_elemt";
  check_batch_norm_backward_elemt(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count, op);
  at::Tensor grad_input = bn_empty_output(input);
  if (grad_input.numel() == 0) return grad_input;
  const at::Tensor x = dense_like(input, grad_input);
  const at::Tensor dy = dense_like(grad_output, grad_input);
  const BatchNormLayout lay = batch_norm_layout(x);
  const auto dtype = bn_stat_dtype(input.scalar_type());
  const at::Tensor gamma = bn_channel_values(weight, input, 1.0);
  const at::Tensor mu = mean.to(dtype).contiguous(), is = invstd.to(dtype).contiguous();
  const at::Tensor a = sum_dy.to(dtype).contiguous(), p = sum_dy_xmu.to(dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_backward_elemt_cpu", [&] {
    using T = opmath_t<scalar_t>;
    using acc_t = at::acc_type<T, false>;
    const T *g = gamma.const_data_ptr<T>(), *isp = is.const_data_ptr<T>();
    const T *ap = a.const_data_ptr<T>(), *pp = p.const_data_ptr<T>();
    GradConstants<T> k(lay.C);
    for (int64_t c = 0; c < lay.C; ++c) {
      k.set(c, bn_grad_constants<acc_t>(ap[c], pp[c], static_cast<acc_t>(count), g[c], isp[c]));
    }
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const T* mean_p = mu.const_data_ptr<T>();
    scalar_t* dxp = grad_input.mutable_data_ptr<scalar_t>();
    for_each_channel_run(lay, [&](int64_t off, int64_t len, int64_t c, bool cl) {
      grad_input_run(dyp, xp, dxp, off, len, c, cl, mean_p, k, /*training=*/true);
    });
  });
  return grad_input;
}

}  // namespace

// ---------------------------------------------------------------------------- running statistics
// running <- keep * running + take * batch (bn_running_update), in the running tensor's accumulation type,
// through its stride (a running statistic may be a view).
void update_running(at::Tensor& running, const at::Tensor& batch, double keep, double take) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "batch_norm_update_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor b = batch.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    scalar_t* rp = running.mutable_data_ptr<scalar_t>();
    const int64_t stride = running.stride(0);
    for (int64_t c = 0; c < running.size(0); ++c) {
      rp[c * stride] = static_cast<scalar_t>(bn_running_update<acc_t>(
          static_cast<acc_t>(rp[c * stride]), bp[c], static_cast<acc_t>(keep), static_cast<acc_t>(take)));
    }
  });
}

void batch_norm_update_stats_cpu(const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, const at::Tensor& mean,
                                 const at::Tensor& var, double momentum, int64_t count) {
  check_batch_norm_update_stats(running_mean, running_var, mean, var, count, "batch_norm_update_stats_");
  if (count == 0) return;  // an empty batch leaves them alone, as torch does
  if (running_mean.has_value() && running_mean->defined()) {
    at::Tensor r = *running_mean;
    update_running(r, mean, 1.0 - momentum, momentum);
  }
  if (running_var.has_value() && running_var->defined()) {
    at::Tensor r = *running_var;
    update_running(r, var, 1.0 - momentum, momentum * static_cast<double>(count) / static_cast<double>(count - 1));
  }
}

TORCH_LIBRARY_IMPL(torch_cs231n, CPU, m) {
  m.impl("batch_norm_update_stats_", &batch_norm_update_stats_cpu);
  m.impl("batch_norm_forward_train", &batch_norm_forward_train_cpu);
  m.impl("batch_norm_forward_eval", &batch_norm_forward_eval_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_merge_stats", &batch_norm_merge_stats_cpu);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cpu);
}

}  // namespace torch_cs231n
