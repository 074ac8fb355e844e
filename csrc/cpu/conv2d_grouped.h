// The CPU convolution, grouped layers of few channels a group (ResNeXt's 32 groups of 4, 8 and 16): whole
// groups side by side in a vector's lanes. Part of the CPU convolution (cpu/conv2d.cpp routes each layer;
// docs/conv2d.md derives it).
//
// A group of k input channels and k filters is a k x k product per pixel and tap, too narrow for the
// GEMM's tiles (a 4-filter group fills a quarter of a 16-lane vector) and for its packing. A vector of L
// channels holds G = L / k whole groups; order its lanes filter-major, lane l = j·G + gi standing for
// channel gi·k + j (group gi of the vector, place j in it). Then input channel i of all G groups is G
// values side by side in a pixel's interleaved vector (at i·G), and one broadcast of those G values,
// multiplied by the weights of every lane's filter, adds one product to every lane:
//     y_b[p][j·G + gi] = b[gi·k + j] + Σ_t Σ_{i < k} W_b[t][i][j·G + gi] · x_b[p·s + t·d][i·G + gi]
//     W_b[t][i][j·G + gi] = W[gi·k + j, i, t]
// k·taps fused multiply-adds a vector of outputs, every lane useful, and the outputs' sums stay in
// registers over all the taps (blocks of up to 24 outputs a vector: each weight vector loaded once for the
// block, each broadcast a load). d_W is the same sum read the other way,
//     d_W_b[t][i][j·G + gi] = Σ_p dY_b[p][j·G + gi] · x_b[p·s + t·d][i·G + gi]
// and d_x at stride 1 the transposed convolution (grouped alike, cpu/conv2d_gemm.h's transposed_filters);
// strided, each of the stride's phases of d_x is such a sum over dY (InputGradPhases, below).
//
// Each sample's vectors are laid out [C/L][pixels][L], interleaved, padded and split into the stride's
// phases as the shifted planes are (cpu/conv2d_shifted.h): output p's tap t then reads pixel q(p) + off(t)
// of one plane, and a block's P outputs are P consecutive places q of the pitch Wq (those past oW in a
// row thrown away). The rotations of channels this replaced, one x vector loaded per product from a ring
// k times the input, ran ResNeXt's layers at 1.5-3 times oneDNN's time.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/conv2d.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/conv2d_depthwise.h"
#include "cpu/conv2d_shifted.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"

namespace torch_cs231n {
namespace conv2d_cpu {

// Groups of 2 to L channels (L / k whole groups a vector of the dtype's L lanes) and as many filters, the
// channels whole vectors. element_size: the dtype's bytes (64-byte vectors).
inline bool grouped_by_broadcasts(const Conv2dGeometry& g, int64_t element_size) {
  const int64_t lanes = 64 / element_size, k = g.c_per_group();
  return g.groups > 1 && k >= 2 && k <= lanes && lanes % k == 0 && g.f_per_group() == k && g.c % lanes == 0;
}

// A vector's lanes in the groups' order (k channels a group, G groups a vector): lane l holds channel
// channel(l) = (l mod G)·k + l / G of the vector, and channel c lies in lane lane(c); `in` and `out` are
// those maps as shuffle masks (x into the lanes' order, y back out of it).
template <typename T>
struct GroupLanes {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  static constexpr int L = V::kLanes;
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> Lane;
  typedef Lane Mask __attribute__((vector_size(64)));
  int64_t k, G;
  Mask in, out;  // in[l]: the channel lane l holds; out[c]: the lane channel c is in
  explicit GroupLanes(int64_t k_) : k(k_), G(L / k_) {
    for (int l = 0; l < L; ++l) {
      in[l] = static_cast<Lane>(channel(l));
      out[l] = static_cast<Lane>(lane(l));
    }
  }
  int64_t channel(int64_t l) const { return l % G * k + l / G; }
  int64_t lane(int64_t c) const { return c % k * G + c / k; }
  // count per-channel values (a bias; count a whole number of vectors) in the lanes' order, or none
  std::vector<T> in_lanes(const T* values, int64_t count) const {
    std::vector<T> out(values ? count : 0);
    for (int64_t o = 0; o < static_cast<int64_t>(out.size()); ++o) out[o] = values[o - o % L + channel(o % L)];
    return out;
  }
};

// r = the lanes of s (n of them) repeated over r's sizeof...(l) lanes: __builtin_shufflevector, whose result
// may be wider than its operands (clang; GCC from 12 on).
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
constexpr bool kHasShuffleVector = true;
template <int n, typename S, typename R, int... l>
CS231N_INLINE void repeat_lanes(const S& s, R& r, std::integer_sequence<int, l...>) {
  r = __builtin_shufflevector(s, s, (l % n)...);
}
#else
constexpr bool kHasShuffleVector = false;
template <int n, typename S, typename R, int... l>
CS231N_INLINE void repeat_lanes(const S& s, R& r, std::integer_sequence<int, l...>) {
  ((r[l] = s[l % n]), ...);
}
#endif

// v = the G values at p in every G lanes (lane l = p[l mod G]): G·sizeof(T) bytes broadcast. On AVX-512 one
// load instruction (vpbroadcastd/q, vbroadcastf32x4/f64x4); below it a 32-byte broadcast twice (two
// registers of AVX2's, four of SSE's: GCC built the 64-byte vector through the stack, and each of its loads
// waited on the stores before it, 50 times slower). kIsa: the caller's (cpu::Isa), which these bodies
// inline into.
template <int kIsa, int G, typename T>
CS231N_INLINE void broadcast_lanes(const T* p, typename ChannelVectors<T>::Vec& v) {
  using Vec = typename ChannelVectors<T>::Vec;
  constexpr int bytes = G * sizeof(T), half = 32 / sizeof(T);
  using U = std::conditional_t<bytes == 4, uint32_t, uint64_t>;  // a group of 4 or 8 bytes as a scalar
  if constexpr (kIsa >= static_cast<int>(cpu::Isa::kAvx512) && bytes <= 8) {
    typedef U UVec __attribute__((vector_size(64)));
    U u;
    std::memcpy(&u, p, bytes);
    v = (Vec)(UVec{} + u);
#if CS231N_X86 && !defined(__clang__)
  } else if constexpr (kIsa >= static_cast<int>(cpu::Isa::kAvx512)) {
    // GCC's builtins themselves: their intrinsic wrappers carry a target this shared body lacks (and
    // the 64-byte value they return warns of an ABI that, inlined, never applies)
    typedef float F4 __attribute__((vector_size(16), aligned(4), may_alias));
    typedef double D4 __attribute__((vector_size(32), aligned(8), may_alias));
    typedef float F16 __attribute__((vector_size(64)));
    typedef double D8 __attribute__((vector_size(64)));
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
    if constexpr (bytes == 16) {
      v = (Vec)__builtin_ia32_broadcastf32x4_512(*reinterpret_cast<const F4*>(p), F16{}, 0xffff);
    } else {
      v = (Vec)__builtin_ia32_broadcastf64x4_512(*reinterpret_cast<const D4*>(p), D8{}, 0xff);
    }
#pragma GCC diagnostic pop
#endif
  } else if constexpr (kIsa == static_cast<int>(cpu::Isa::kBaseline) || !kHasShuffleVector) {
    for (int l = 0; l < ChannelVectors<T>::kLanes; ++l) v[l] = p[l % G];
  } else {
    typedef T Half __attribute__((vector_size(32)));
    Half h;
    if constexpr (bytes <= 8) {
      typedef U UHalf __attribute__((vector_size(32)));
      U u;
      std::memcpy(&u, p, bytes);
      h = (Half)(UHalf{} + u);
    } else {
      typedef T Group __attribute__((vector_size(bytes), aligned(sizeof(T)), may_alias));
      repeat_lanes<G>(*reinterpret_cast<const Group*>(p), h, std::make_integer_sequence<int, half>{});
    }
    repeat_lanes<half>(h, v, std::make_integer_sequence<int, 2 * half>{});
  }
}

// P outputs from virtual output q0 (the input's pixel q0 + off[t] for tap t), one vector of channels.
template <int kIsa, int P, int G, typename T>
CS231N_INLINE void interleaved_block(const T* xv, int64_t q0, const int64_t* off, int n, const T* wv,
                                     const typename ChannelVectors<T>::Vec& init,
                                     typename ChannelVectors<T>::Vec (&acc)[P]) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  constexpr int L = V::kLanes, k = L / G;
#pragma GCC unroll 24
  for (int p = 0; p < P; ++p) acc[p] = init;
  for (int t = 0; t < n; ++t) {
    const T* src = xv + (q0 + off[t]) * L;
    const T* w_t = wv + t * k * L;
#pragma GCC unroll 16
    for (int i = 0; i < k; ++i) {
      const Vec w = V::at(w_t + i * L);
#pragma GCC unroll 24
      for (int p = 0; p < P; ++p) {
        Vec x;
        broadcast_lanes<kIsa, G>(src + p * L + i * G, x);
        acc[p] += w * x;
      }
    }
  }
}

// Where one vector's outputs go: output (m, c) of rows x cols at y + m·row_step + c·col_step.
template <typename T>
struct OutputRows {
  T* y;
  int64_t rows, cols, row_step, col_step;
};

template <int kIsa, int P, int G, typename T>
CS231N_INLINE void interleaved_blocks(const T* xv, const int64_t* off, int n, const T* wv, const T* bias, int64_t pitch,
                                      const OutputRows<T>& out, const GroupLanes<T>& lanes, int64_t total) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  const Vec init = bias ? V::at(bias) : Vec{};
  const typename GroupLanes<T>::Mask to_channels = lanes.out;
  Vec acc[P];
  for (int64_t b0 = 0; b0 < total; b0 += P) {
    const int64_t q0 = std::min(b0, total - P);  // the last block overlaps the one before
    interleaved_block<kIsa, P, G>(xv, q0, off, n, wv, init, acc);
    int64_t m = q0 / pitch, c = q0 % pitch;
#pragma GCC unroll 24
    for (int p = 0; p < P; ++p) {
      if (c < out.cols) V::at(out.y + m * out.row_step + c * out.col_step) = __builtin_shuffle(acc[p], to_channels);
      if (++c == pitch) c = 0, ++m;
    }
  }
}

// The block of P1, P2 or P3 outputs (of those the ISA's registers hold, P1 > P2 > P3) that computes the
// fewest of `total` outputs in all, the larger on a tie; 1 under P3. At 8 x 8 (78 places of the pitch) 16
// computes 80 where 24 computed 96.
inline int64_t lanes_block(int64_t total, int64_t p1, int64_t p2, int64_t p3) {
  if (total < p3) return 1;
  const auto computed = [&](int64_t p) { return total >= p ? (total + p - 1) / p * p : INT64_MAX; };
  if (computed(p1) <= std::min(computed(p2), computed(p3))) return p1;
  return computed(p2) <= computed(p3) ? p2 : p3;
}

template <int kIsa, int P1, int P2, int P3, int G, typename T>
CS231N_INLINE void interleaved_vector(const T* xv, const int64_t* off, int n, const T* wv, const T* bias, int64_t pitch,
                                      const OutputRows<T>& out, const GroupLanes<T>& lanes) {
  if (out.rows <= 0 || out.cols <= 0) return;
  const int64_t total = (out.rows - 1) * pitch + out.cols, p = lanes_block(total, P1, P2, P3);
  if (p == P1) {
    interleaved_blocks<kIsa, P1, G>(xv, off, n, wv, bias, pitch, out, lanes, total);
  } else if (p == P2) {
    interleaved_blocks<kIsa, P2, G>(xv, off, n, wv, bias, pitch, out, lanes, total);
  } else if (p == P3) {
    interleaved_blocks<kIsa, P3, G>(xv, off, n, wv, bias, pitch, out, lanes, total);
  } else {
    interleaved_blocks<kIsa, 1, G>(xv, off, n, wv, bias, pitch, out, lanes, total);
  }
}

// d_W of one vector: dwv[t][i] += Σ_{(m, c)} dyv[m·cols + c] · broadcast(xv[m·pitch + c + off[t]], i), the
// sums of U outputs at a time apart (16 accumulators).
template <int kIsa, int G, typename T>
CS231N_INLINE void interleaved_weight_grad_vector(const T* xv, const T* dyv, const int64_t* off, int n, int64_t rows,
                                                  int64_t cols, int64_t pitch, T* dwv) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  constexpr int L = V::kLanes, k = L / G, U = k >= 16 ? 1 : 16 / k;
  for (int t = 0; t < n; ++t) {
    Vec acc[U][k];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
      for (int i = 0; i < k; ++i) acc[u][i] = Vec{};
    for (int64_t m = 0; m < rows; ++m) {
      const T* d = dyv + m * cols * L;
      const T* src = xv + (m * pitch + off[t]) * L;
      int64_t c = 0;
      for (; c + U <= cols; c += U) {
#pragma GCC unroll 16
        for (int u = 0; u < U; ++u) {
          const Vec dv = V::at(d + (c + u) * L);
#pragma GCC unroll 16
          for (int i = 0; i < k; ++i) {
            Vec x;
            broadcast_lanes<kIsa, G>(src + (c + u) * L + i * G, x);
            acc[u][i] += dv * x;
          }
        }
      }
      for (; c < cols; ++c) {
        const Vec dv = V::at(d + c * L);
#pragma GCC unroll 16
        for (int i = 0; i < k; ++i) {
          Vec x;
          broadcast_lanes<kIsa, G>(src + c * L + i * G, x);
          acc[0][i] += dv * x;
        }
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < k; ++i) {
      Vec sum = acc[0][i];
#pragma GCC unroll 16
      for (int u = 1; u < U; ++u) sum += acc[u][i];
      V::at(dwv + (t * k + i) * L) += sum;
    }
  }
}

// count pixels, `pixel` apart from src (null: zeros), of `vectors` vectors of channels each, interleaved into
// dst: vector v of pixel w at dst + v·plane + w·L.
template <typename T>
CS231N_INLINE void interleave_run(const T* src, int64_t pixel, int64_t count, int64_t vectors, T* dst, int64_t plane,
                                  const GroupLanes<T>& lanes) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  constexpr int L = V::kLanes;
  const typename GroupLanes<T>::Mask to_lanes = lanes.in;
  for (int64_t w = 0; w < count; ++w) {
    for (int64_t v = 0; v < vectors; ++v) {
      V::at(dst + v * plane + w * L) = src ? __builtin_shuffle(V::at(src + w * pixel + v * L), to_lanes) : Vec{};
    }
  }
}

// The kernels above compiled for one instruction set (ATTR) with its blocks of outputs (P1-P3).
#define CS231N_INTERLEAVED_KERNELS(NAME, ATTR, ISA, P1, P2, P3)                                                    \
  struct NAME {                                                                                                    \
    template <int G, typename T>                                                                                   \
    ATTR static void vector(const T* xv, const int64_t* off, int n, const T* wv, const T* bias, int64_t pitch,     \
                            const OutputRows<T>& out, const GroupLanes<T>& lanes) {                                \
      interleaved_vector<static_cast<int>(ISA), P1, P2, P3, G>(xv, off, n, wv, bias, pitch, out, lanes);           \
    }                                                                                                              \
    template <int G, typename T>                                                                                   \
    ATTR static void weight_grad(const T* xv, const T* dyv, const int64_t* off, int n, int64_t rows, int64_t cols, \
                                 int64_t pitch, T* dwv) {                                                          \
      interleaved_weight_grad_vector<static_cast<int>(ISA), G>(xv, dyv, off, n, rows, cols, pitch, dwv);           \
    }                                                                                                              \
    template <typename T>                                                                                          \
    ATTR static void run(const T* src, int64_t pixel, int64_t count, int64_t vectors, T* dst, int64_t plane,       \
                         const GroupLanes<T>& lanes) {                                                             \
      interleave_run(src, pixel, count, vectors, dst, plane, lanes);                                               \
    }                                                                                                              \
  };
CS231N_INTERLEAVED_KERNELS(InterleavedBaseline, , cpu::Isa::kBaseline, 2, 2, 2)
CS231N_INTERLEAVED_KERNELS(InterleavedAvx2, CS231N_AVX2, cpu::Isa::kAvx2, 6, 4, 2)
CS231N_INTERLEAVED_KERNELS(InterleavedAvx512, CS231N_AVX512, cpu::Isa::kAvx512, 24, 16, 8)
#undef CS231N_INTERLEAVED_KERNELS

// f(kernels, std::integral_constant<int, G>) with the kernels of `isa` and the layer's G (1, 2, 4 or 8
// groups a vector).
template <typename F>
void with_interleaved_kernels(cpu::Isa isa, int64_t G, const F& f) {
  const auto with_g = [&](auto kernels) {
    switch (G) {
      case 1:
        return f(kernels, std::integral_constant<int, 1>{});
      case 2:
        return f(kernels, std::integral_constant<int, 2>{});
      case 4:
        return f(kernels, std::integral_constant<int, 4>{});
      default:
        return f(kernels, std::integral_constant<int, 8>{});
    }
  };
  if (isa >= cpu::Isa::kAvx512) return with_g(InterleavedAvx512{});
  if (isa == cpu::Isa::kAvx2) return with_g(InterleavedAvx2{});
  with_g(InterleavedBaseline{});
}

template <typename T>
void interleaved_vector_for(cpu::Isa isa, int64_t G, const T* xv, const int64_t* off, int n, const T* wv, const T* bias,
                            int64_t pitch, const OutputRows<T>& out, const GroupLanes<T>& lanes) {
  with_interleaved_kernels(isa, G, [&](auto kernels, auto g_) {
    decltype(kernels)::template vector<decltype(g_)::value>(xv, off, n, wv, bias, pitch, out, lanes);
  });
}

template <typename T>
void interleaved_weight_grad_for(cpu::Isa isa, int64_t G, const T* xv, const T* dyv, const int64_t* off, int n,
                                 int64_t rows, int64_t cols, int64_t pitch, T* dwv) {
  with_interleaved_kernels(isa, G, [&](auto kernels, auto g_) {
    decltype(kernels)::template weight_grad<decltype(g_)::value>(xv, dyv, off, n, rows, cols, pitch, dwv);
  });
}

template <typename T>
void interleave_run_for(cpu::Isa isa, const T* src, int64_t pixel, int64_t count, int64_t vectors, T* dst,
                        int64_t plane, const GroupLanes<T>& lanes) {
  with_interleaved_kernels(
      isa, 1, [&](auto kernels, auto) { decltype(kernels)::run(src, pixel, count, vectors, dst, plane, lanes); });
}

// run(src, w0, w1, dst) for each row of a padded sample's stride phases (conv2d_shifted.h's layout, sp.wq
// places a row, L values a place, dst the row's first): places [w0, w1) hold input columns
// b + w·sW - pW of input row i, their first at src = x_rows + i·row + (b + w0·sW - pW)·pixel (null for a
// padding row); the rest are padding. Every place of the phases is in one call.
template <typename T, typename Run>
void for_phase_rows(const Conv2dGeometry& g, const ShiftedPlanes& sp, int64_t L, const T* x_rows, int64_t row,
                    int64_t pixel, T* dst_planes, const Run& run) {
  for (int64_t a = 0; a < sp.sh; ++a) {
    for (int64_t u = 0; u < sp.hq; ++u) {
      const int64_t i = a + u * sp.sh - g.ph;  // the input row of the phases' row u
      const bool row_in = i >= 0 && i < g.h;
      for (int64_t b = 0; b < sp.sw; ++b) {
        T* dst = dst_planes + ((a * sp.sw + b) * sp.hq + u) * sp.wq * L;
        const int64_t w0 = row_in ? std::min(sp.wq, std::max<int64_t>(0, (g.pw - b + sp.sw - 1) / sp.sw)) : sp.wq;
        const int64_t w1 = row_in ? std::max(w0, std::min(sp.wq, (g.w + g.pw - b + sp.sw - 1) / sp.sw)) : sp.wq;
        run(row_in ? x_rows + i * row + (b + w0 * sp.sw - g.pw) * pixel : nullptr, w0, w1, dst);
      }
    }
  }
}

// Vectors [v0, v1) of one sample's x (NHWC [H][W][C], or NCHW when `planes`) into xb, vector after vector
// sp.plane() pixels of L interleaved channels, in the stride's phases (conv2d_shifted.h's layout), zeros in
// the padding: every pixel of the phases written. An NCHW sample goes a vector at a time, its L planes
// transposed whole into `planes_t` (H·W·L) and laid out from there: a row of all the channels at a time
// read a piece of every plane, too many streams for the prefetchers (the forward of (32, 256, 28, 28) in
// groups of 8 spent half its time in the transposes).
template <typename T>
void interleaved_input(cpu::Isa isa, const T* x, bool planes, const Conv2dGeometry& g, const ShiftedPlanes& sp,
                       int64_t v0, int64_t v1, const GroupLanes<T>& lanes, T* xb, T* planes_t) {
  constexpr int L = ChannelVectors<T>::kLanes;
  const int64_t plane = sp.plane() * L;
  // `vectors` vectors from x_rows (input row i at x_rows + i·row, pixels `pixel` apart) into dst
  const auto lay_out = [&](const T* x_rows, int64_t row, int64_t pixel, int64_t vectors, T* dst_planes) {
    for_phase_rows(g, sp, L, x_rows, row, pixel, dst_planes, [&](const T* src, int64_t w0, int64_t w1, T* dst) {
      interleave_run_for<T>(isa, nullptr, 0, w0, vectors, dst, plane, lanes);
      interleave_run_for(isa, src, sp.sw * pixel, w1 - w0, vectors, dst + w0 * L, plane, lanes);
      interleave_run_for<T>(isa, nullptr, 0, sp.wq - w1, vectors, dst + w1 * L, plane, lanes);
    });
  };
  if (!planes) {
    lay_out(x + v0 * L, g.w * g.c, g.c, v1 - v0, xb);
    return;
  }
  const int64_t hw = g.h * g.w;
  for (int64_t v = v0; v < v1; ++v) {
    cpu::transpose_matrix(x + v * L * hw, hw, L, hw, planes_t, L);
    lay_out(planes_t, g.w * L, L, 1, xb + (v - v0) * plane);
  }
}

// Vectors [v0, v1) of one sample's dY (NHWC, or NCHW when `planes`: a vector's planes at a time through
// dy_t, oH·oW·L) into dyb, vector after vector the outputs' L interleaved channels.
template <typename T>
void interleaved_grad(cpu::Isa isa, const T* dy, bool planes, const Conv2dGeometry& g, int64_t v0, int64_t v1,
                      const GroupLanes<T>& lanes, T* dyb, T* dy_t) {
  constexpr int L = ChannelVectors<T>::kLanes;
  const int64_t outputs = g.col_cols();
  if (!planes) {
    interleave_run_for(isa, dy + v0 * L, g.f, outputs, v1 - v0, dyb, outputs * L, lanes);
    return;
  }
  for (int64_t v = v0; v < v1; ++v) {
    cpu::transpose_matrix(dy + v * L * outputs, outputs, L, outputs, dy_t, L);
    interleave_run_for(isa, dy_t, L, outputs, 1, dyb + (v - v0) * outputs * L, outputs * L, lanes);
  }
}

// W_b [C/L][n][k][L]: lane l of vector v (its channel o = v·L + lanes.channel(l)) holds value(o, i, j) for
// input channel i of the group and tap j.
template <typename T, typename F>
std::vector<T> interleaved_filters(int64_t channels, int64_t n, const GroupLanes<T>& lanes, const F& value) {
  constexpr int L = ChannelVectors<T>::kLanes;
  const int64_t k = lanes.k;
  std::vector<T> w(channels * n * k);
  for (int64_t v = 0; v < channels / L; ++v)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < k; ++i)
        for (int64_t l = 0; l < L; ++l) w[((v * n + j) * k + i) * L + l] = value(v * L + lanes.channel(l), i, j);
  return w;
}

// ------------------------------------------------------------------ d_x of strided layers by phases
// d_x[i, c] = Σ_{f in c's group} Σ_t W[f, c mod k, t] · dY[o, f] over the taps t and outputs o with
// o·s = i + p - t·d (per axis). Along an axis the input indices i = a + s·m of phase a (0 <= a < s) take
// the taps with (a + p - t·d) mod s = 0, at o = m + off(t), off(t) = (a + p - t·d) / s: each phase is a
// stride-1 correlation of dY with its own taps, and all of them together compute each d_x pixel once (the
// forward's count of products). In the lanes' order, with dY as the input and base(c) = c - c mod k:
//     d_x_b[a + s·m][j·G + gi] = Σ_{t of the phase} Σ_{i < k} V_b[t][i][j·G + gi] · dY_b[m + off(t)][i·G + gi]
//     V_b[t][i][j·G + gi] = W[base(c) + i, j, t]  for channel c = gi·k + j of the vector
// dY is read from one plane padded to the rows and columns the phases' taps reach (zeros outside dY), so
// that one pitch serves every phase (fixed margins of ceil((kH - 1)·dH / sH) + 2 made it a third wider at
// 16 x 16). (conv2d_shifted.h's input_phases covers dilation 1 only, each phase a transposed convolution of
// its own padding; a dilated layer's taps fall into the phases unevenly, so here each phase lists its taps
// and their offsets into the one plane.)
struct InputGradPhases {
  struct Phase {
    int64_t a_h, a_w, outputs_h, outputs_w;   // its first input row and column; how many of each
    std::vector<int64_t> taps, off_h, off_w;  // its taps (t_h·kW + t_w), and where each reads in the plane
  };
  Conv2dGeometry dy;    // dY as an input: oH x oW pixels of F channels, stride 1, padded by dy.ph and dy.pw
  ShiftedPlanes plane;  // that padded plane, hp x wp; wp is also the outputs' pitch
  std::vector<Phase> phases;

  explicit InputGradPhases(const Conv2dGeometry& g) : dy(g) {
    // output (m, c) of phase (a_h, a_w) reads dY[m + r_h, c + r_w], r = (a + p - t·d) / s (exact) per axis
    int64_t min_h = INT64_MAX, min_w = INT64_MAX, end_h = 1, end_w = 1;
    for (int64_t a_h = 0; a_h < std::min(g.sh, g.h); ++a_h) {
      for (int64_t a_w = 0; a_w < std::min(g.sw, g.w); ++a_w) {
        Phase q{a_h, a_w, (g.h - a_h + g.sh - 1) / g.sh, (g.w - a_w + g.sw - 1) / g.sw, {}, {}, {}};
        for (int64_t t = 0; t < g.taps(); ++t) {
          const int64_t rh = a_h + g.ph - (t / g.kw) * g.dh, rw = a_w + g.pw - (t % g.kw) * g.dw;
          if (floor_mod(rh, g.sh) != 0 || floor_mod(rw, g.sw) != 0) continue;
          q.taps.push_back(t);
          q.off_h.push_back(rh / g.sh);
          q.off_w.push_back(rw / g.sw);
          min_h = std::min(min_h, q.off_h.back()), min_w = std::min(min_w, q.off_w.back());
        }
        phases.push_back(std::move(q));
      }
    }
    if (min_h == INT64_MAX) min_h = min_w = 0;  // no phase has a tap: d_x is zero, dY never read
    for (Phase& q : phases) {
      for (size_t j = 0; j < q.taps.size(); ++j) {
        q.off_h[j] -= min_h, q.off_w[j] -= min_w;
        end_h = std::max(end_h, q.outputs_h + q.off_h[j]), end_w = std::max(end_w, q.outputs_w + q.off_w[j]);
      }
      end_w = std::max(end_w, q.outputs_w);
    }
    dy.h = g.oh, dy.w = g.ow, dy.c = g.f, dy.f = g.c;
    dy.sh = dy.sw = 1, dy.ph = -min_h, dy.pw = -min_w;  // (negative: dY's first rows never read)
    plane = ShiftedPlanes{end_h, end_w, 1, 1, end_h, end_w, 0};
  }
  static int64_t floor_mod(int64_t a, int64_t b) { return ((a % b) + b) % b; }
};

// Items: samples, and at fewer samples than threads each sample's vectors in slices among the threads.
struct VectorSlices {
  int64_t n, vectors, slices, items;
  VectorSlices(int64_t samples, int64_t vectors_) : n(samples), vectors(vectors_) {
    const int64_t threads = at::get_num_threads();
    slices = n >= threads ? 1 : std::max<int64_t>(1, std::min<int64_t>(vectors, (threads + n - 1) / n));
    items = n * slices;
  }
  void of(int64_t item, int64_t* sample, int64_t* v0, int64_t* v1) const {
    *sample = item / slices;
    const int64_t s = item % slices;
    *v0 = chunk_begin(s, slices, vectors), *v1 = chunk_begin(s + 1, slices, vectors);
  }
};

// The planes a sample is laid out in for the forward and d_W: conv2d_shifted.h's, except that at stride 1
// each row keeps only its left padding (pitch W + pW, where the outputs still fit in it: pW <= (kW - 1)·dW).
// A row's reads past its end then fall on the next row's left padding, and the last row's on `tail` places
// of zeros past the last plane; fewer of the pitch's places are computed and thrown away (8 x 8 outputs lie
// in 71 places, not 78: (16, 512, 8, 8) in groups of 16, forward 0.80 -> 0.70 ms channels_last, 1.07 ->
// 0.86 NCHW; (16, 256, 16, 16) in groups of 8 0.77 -> 0.71).
struct LanesPlanes {
  ShiftedPlanes sp;
  int64_t tail;
};
inline LanesPlanes lanes_planes(const Conv2dGeometry& g) {
  ShiftedPlanes sp = shifted_planes(g);
  if (g.sh != 1 || g.sw != 1 || g.pw == 0 || g.pw > (g.kw - 1) * g.dw) return {sp, 0};
  sp.wp = sp.wq = g.w + g.pw;
  sp.cols = (g.oh - 1) * sp.wq + g.ow;
  return {sp, g.pw};
}

// One pass over a sample's laid-out input: tap j reads place q + off[j] of the planes (pitch Wq), with the
// filters W_b; output (m, c) of rows x cols is pixel first + m·row_step + c·col_step of the result. The
// forward is one pass; d_x of a strided layer one a phase.
template <typename T>
struct LanesPass {
  std::vector<int64_t> off;
  std::vector<T> w_b;
  int64_t first, rows, cols, row_step, col_step;
};

// The passes over every sample of x (geometry `in`, laid out as sp with `tail` places of zeros after; NHWC,
// or NCHW when `planes`) into y (in.f channels, `pixels` a sample, the same layout), plus b (in.f, or null).
template <typename T>
void interleaved_passes(const T* x, bool planes, const Conv2dGeometry& in, const ShiftedPlanes& sp, int64_t tail,
                        const std::vector<LanesPass<T>>& passes, const T* b, const GroupLanes<T>& lanes, T* y,
                        int64_t pixels) {
  constexpr int L = ChannelVectors<T>::kLanes;
  const std::vector<T> b_b = lanes.in_lanes(b, in.f);
  const int64_t in_sample = in.h * in.w * in.c, out_sample = pixels * in.f, plane = sp.plane() * L;
  const cpu::Isa isa = cpu::cpu_isa();
  const VectorSlices split(in.n, in.c / L);
  at::parallel_for(0, split.items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      int64_t n, v0, v1;
      split.of(item, &n, &v0, &v1);
      const int64_t cs = (v1 - v0) * L;
      T* xb = cpu::thread_scratch<T>(cpu::Scratch::kPadded, (v1 - v0) * plane + tail * L);
      T* planes_t = planes ? cpu::thread_scratch<T>(cpu::Scratch::kTransposed, in.h * in.w * L) : nullptr;
      T* out = planes ? cpu::thread_scratch<T>(cpu::Scratch::kOut, pixels * cs) : nullptr;  // [pixels][cs]
      interleaved_input(isa, x + n * in_sample, planes, in, sp, v0, v1, lanes, xb, planes_t);
      std::fill(xb + (v1 - v0) * plane, xb + (v1 - v0) * plane + tail * L, T(0));
      T* y_n = y + n * out_sample;
      const int64_t pixel = planes ? cs : in.f;  // between the result's pixels
      for (int64_t v = v0; v < v1; ++v) {
        T* y_v = planes ? out + (v - v0) * L : y_n + v * L;
        for (const LanesPass<T>& q : passes) {
          const int taps = static_cast<int>(q.off.size());
          const OutputRows<T> rows{y_v + q.first * pixel, q.rows, q.cols, q.row_step * pixel, q.col_step * pixel};
          interleaved_vector_for<T>(isa, lanes.G, xb + (v - v0) * plane, q.off.data(), taps,
                                    q.w_b.data() + v * taps * lanes.k * L, b ? b_b.data() + v * L : nullptr, sp.wq,
                                    rows, lanes);
        }
      }
      for (int64_t v = v0; planes && v < v1; ++v) {  // a vector's planes at a time, as the input's
        cpu::transpose_matrix(out + (v - v0) * L, cs, pixels, L, y_n + v * L * pixels, pixels);
      }
    }
  });
}

// y = conv(x, W) + b, x and y NHWC, or NCHW when `planes`. W: the layer's filters (any strides), or when g is
// a transposed convolution those of transposed_filters.
template <typename T>
void grouped_forward(const T* x, const at::Tensor& w, const T* b, T* y, const Conv2dGeometry& g, bool planes = false) {
  const GroupLanes<T> lanes(g.c_per_group());
  const LanesPlanes lp = lanes_planes(g);
  const ShiftedPlanes& sp = lp.sp;
  const auto a = w.accessor<T, 4>();
  LanesPass<T> all{{}, {}, 0, g.oh, g.ow, g.ow, 1};
  for (int64_t t = 0; t < g.taps(); ++t) all.off.push_back(shifted_offset(g, sp, t));
  all.w_b = interleaved_filters<T>(g.f, g.taps(), lanes,
                                   [&](int64_t o, int64_t i, int64_t t) { return a[o][i][t / g.kw][t % g.kw]; });
  interleaved_passes(x, planes, g, sp, lp.tail, {all}, b, lanes, y, g.col_cols());
}

template <typename T>
void grouped_weight_grad(const T* dy, const T* x, at::Tensor& dw, const Conv2dGeometry& g, bool planes = false) {
  constexpr int L = ChannelVectors<T>::kLanes;
  const GroupLanes<T> lanes(g.c_per_group());
  const LanesPlanes lp = lanes_planes(g);
  const ShiftedPlanes& sp = lp.sp;
  const int64_t k = lanes.k, taps = g.taps(), vectors = g.c / L, per_vector = taps * k * L;
  std::vector<int64_t> off(taps);
  for (int64_t t = 0; t < taps; ++t) off[t] = shifted_offset(g, sp, t);
  const int64_t in_sample = g.h * g.w * g.c, outputs = g.col_cols(), out_sample = outputs * g.f;
  const int64_t threads = at::get_num_threads(), chunks = std::max<int64_t>(1, std::min(g.n, threads));
  const VectorSlices slices(chunks, vectors);  // chunks of samples in place of samples
  const ChunkPartials<T> partial(chunks, vectors * per_vector);
  const cpu::Isa isa = cpu::cpu_isa();
  at::parallel_for(0, slices.items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      int64_t chunk, v0, v1;
      slices.of(item, &chunk, &v0, &v1);
      const int64_t cs = (v1 - v0) * L;
      T* dwb = partial.of(chunk);
      std::fill(dwb + v0 * per_vector, dwb + v1 * per_vector, T(0));
      T* xb = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.plane() * cs + lp.tail * L);
      std::fill(xb + sp.plane() * cs, xb + sp.plane() * cs + lp.tail * L, T(0));
      T* planes_t = planes ? cpu::thread_scratch<T>(cpu::Scratch::kTransposed, g.h * g.w * L) : nullptr;
      T* dyb = cpu::thread_scratch<T>(cpu::Scratch::kGrad, outputs * cs);
      T* dy_t = planes ? cpu::thread_scratch<T>(cpu::Scratch::kRows, outputs * L) : nullptr;
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        interleaved_input(isa, x + n * in_sample, planes, g, sp, v0, v1, lanes, xb, planes_t);
        interleaved_grad(isa, dy + n * out_sample, planes, g, v0, v1, lanes, dyb, dy_t);
        for (int64_t v = v0; v < v1; ++v) {
          interleaved_weight_grad_for<T>(isa, lanes.G, xb + (v - v0) * sp.plane() * L, dyb + (v - v0) * outputs * L,
                                         off.data(), taps, g.oh, g.ow, sp.wq, dwb + v * per_vector);
        }
      }
    }
  });
  partial.sum_into(chunks, partial.of(0));
  const T* dwb = partial.of(0);
  auto out = dw.accessor<T, 4>();
  for (int64_t v = 0; v < vectors; ++v)
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t i = 0; i < k; ++i)
        for (int64_t l = 0; l < L; ++l)
          out[v * L + lanes.channel(l)][i][t / g.kw][t % g.kw] = dwb[v * per_vector + (t * k + i) * L + l];
}

// d_x of a strided layer by the phases of InputGradPhases, a pass each over dY (NHWC, or NCHW when `planes`).
template <typename T>
void grouped_input_grad_phases(const T* dy, const at::Tensor& w, T* dx, const Conv2dGeometry& g, bool planes = false) {
  const InputGradPhases ph(g);
  const GroupLanes<T> lanes(g.c_per_group());
  const int64_t k = lanes.k;
  const auto a = w.accessor<T, 4>();
  std::vector<LanesPass<T>> passes;
  for (const InputGradPhases::Phase& q : ph.phases) {
    LanesPass<T> pass{{}, {}, q.a_h * g.w + q.a_w, q.outputs_h, q.outputs_w, g.sh * g.w, g.sw};
    for (size_t j = 0; j < q.taps.size(); ++j) pass.off.push_back(q.off_h[j] * ph.plane.wq + q.off_w[j]);
    pass.w_b = interleaved_filters<T>(g.c, q.taps.size(), lanes, [&](int64_t c, int64_t i, int64_t j) {
      const int64_t t = q.taps[j];
      return a[c - c % k + i][c % k][t / g.kw][t % g.kw];
    });
    passes.push_back(std::move(pass));
  }
  interleaved_passes(dy, planes, ph.dy, ph.plane, /*tail=*/0, passes, static_cast<const T*>(nullptr), lanes, dx,
                     g.h * g.w);
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
