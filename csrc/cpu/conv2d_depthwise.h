// The CPU convolution, depthwise: plane kernels for large planes, channels innermost for small ones.
// Part of the CPU convolution (cpu/conv2d.cpp, which routes each layer; docs/conv2d.md has the table).
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/conv2d.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/conv2d_pixels.h"
#include "cpu/conv2d_shifted.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"

namespace torch_cs231n {
namespace conv2d_cpu {

// ------------------------------------------------------------------------------------------- depthwise
// groups == C: output channel f (of m = F/C per input channel) sees only input plane c = f/m.
//     y[n, f, o_h, o_w] = b[f] + Σ_{t_h, t_w} W[f, 0, t_h, t_w] · x[n, f/m, i_h, i_w]
// One plane per task; rows are accumulated tap by tap over the valid interval, a loop that vectorises.
template <typename T>
CS231N_INLINE void depthwise_forward_planes(const T* xp, const T* wp, const T* bp, T* yp, const Conv2dGeometry& g,
                                            int64_t begin, int64_t end) {
  const int64_t m = g.f / g.c, plane_in = g.h * g.w, plane_out = g.oh * g.ow;
  for (int64_t nf = begin; nf < end; ++nf) {
    const int64_t n = nf / g.f, f = nf % g.f;
    const T* x_plane = xp + (n * g.c + f / m) * plane_in;
    const T* w_f = wp + f * g.taps();
    T* y_plane = yp + nf * plane_out;
    for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
      T* __restrict__ y_row = y_plane + o_h * g.ow;
      std::fill(y_row, y_row + g.ow, bp ? bp[f] : T(0));
      for (int64_t th = 0; th < g.kh; ++th) {
        const int64_t i_h = conv_in_index(o_h, th, g.sh, g.ph, g.dh);
        if (i_h < 0 || i_h >= g.h) continue;
        const T* __restrict__ x_row = x_plane + i_h * g.w;
        for (int64_t tw = 0; tw < g.kw; ++tw) {
          int64_t lo, hi;
          conv_valid_out_range(tw, g.sw, g.pw, g.dw, g.w, g.ow, &lo, &hi);
          const int64_t off = tw * g.dw - g.pw;
          const T wv = w_f[th * g.kw + tw];
          if (g.sw == 1) {
            for (int64_t o_w = lo; o_w < hi; ++o_w) y_row[o_w] += wv * x_row[o_w + off];
          } else {
            for (int64_t o_w = lo; o_w < hi; ++o_w) y_row[o_w] += wv * x_row[o_w * g.sw + off];
          }
        }
      }
    }
  }
}

template <typename T>
CS231N_AVX2 void depthwise_forward_planes_avx2(const T* xp, const T* wp, const T* bp, T* yp, const Conv2dGeometry& g,
                                               int64_t begin, int64_t end) {
  depthwise_forward_planes<T>(xp, wp, bp, yp, g, begin, end);
}

// Vectors of T: GCC's generic vectors of 64 bytes, which each instruction set's build splits as it can.
template <typename T>
struct ChannelVectors {
  static constexpr int kLanes = 64 / sizeof(T);
  // at(p): the vector at p, any T-aligned address (read and written through a reference, which also keeps
  // vectors out of the ABI of functions built for the baseline ISA)
  typedef T Vec __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
  static const Vec& at(const T* p) { return *reinterpret_cast<const Vec*>(p); }
  static Vec& at(T* p) { return *reinterpret_cast<Vec*>(p); }
};

// bfloat16 channels as float32 vectors, in pairs (the channels_last bfloat16 kernels: the forward, the
// gather of d_x, d_W and d_b). 2L
// bfloat16 channels read as L 32-bit words hold channel 2i in word i's low half and 2i + 1 in its high
// half: the words shifted up 16 bits are the even channels as float32, the words with their low halves
// cleared the odd ones. (Widening 16 values in place took three shuffles a vector, GCC's lowering, and
// the shuffle port bound the kernel.) The kernels keep the even and the odd channels' sums apart, their
// filters and bias in the same order (bf16_pair_lanes), and store each pair of vectors as one again, every
// sum rounded to nearest even and a NaN made torch's 0x7fc0 (reduced_float.h's from_float, on L lanes):
// the bits of the float32 kernel on converted copies, without the copies. kWords: 16 (64 bytes) or 8.
// (Vectors go in and out through references, which keeps them out of the baseline build's ABI.)
template <int kWords>
struct Bf16Pairs {
  typedef uint32_t Words __attribute__((vector_size(4 * kWords), aligned(2), may_alias));
  typedef float Floats __attribute__((vector_size(4 * kWords), aligned(4), may_alias));
  CS231N_INLINE static const Floats& at(const float* p) { return *reinterpret_cast<const Floats*>(p); }
  CS231N_INLINE static Floats& at(float* p) { return *reinterpret_cast<Floats*>(p); }
  CS231N_INLINE static void load(const c10::BFloat16* p, Floats& even, Floats& odd) {
    const Words u = *reinterpret_cast<const Words*>(p);
    even = (Floats)(u << 16);
    odd = (Floats)(u & 0xffff0000u);
  }
  CS231N_INLINE static void round(const Floats& v, Words& bits) {  // v's bfloat16 bits, in each word's low half
    const Words u = (Words)v;
    const Words nan = (Words)((u & 0x7fffffffu) > 0x7f800000u);  // all ones where v is a NaN
    bits = (((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) & ~nan) | (nan & 0x7fc0u);
  }
  CS231N_INLINE static void store(c10::BFloat16* p, const Floats& even, const Floats& odd) {
    Words low, high;
    round(even, low);
    round(odd, high);
    *reinterpret_cast<Words*>(p) = low | (high << 16);
  }
};

// The order of a [.][C] float32 row (filters, bias; d_W and d_b) that the bfloat16 kernels use: each
// block of 32 channels as its 16 even then its 16 odd channels, a block of 16 after them as its 8 even
// then 8 odd; the last C mod 16 as they are. order[j] = the channel at place j.
inline std::vector<int64_t> bf16_pair_lanes(int64_t C) {
  std::vector<int64_t> order(C);
  int64_t c = 0;
  for (const int64_t block : {int64_t(32), int64_t(16)}) {
    for (; c + block <= C; c += block) {
      for (int64_t i = 0; i < block; ++i) order[c + i] = c + (i < block / 2 ? 2 * i : 2 * (i - block / 2) + 1);
    }
  }
  for (; c < C; ++c) order[c] = c;
  return order;
}

// The same for stride 1, with every output's sum over the taps kept in registers: the loop above adds each
// tap into y's row in memory, a load and a store per tap and output (measured 1.4 times oneDNN's forward
// on an AVX-512 Xeon). Each plane is copied once into a padded scratch plane (zeros around it, as the
// 3x3 d_W kernel below), so that no tap needs a bounds test; then each row's outputs go kBlock vectors at
// a time (up to 4, as few as cover a row), each tap's weight broadcast once for them:
//     y[o_h, o_w .. o_w + kBlock·lanes) = b + Σ_{t_h, t_w} W[t_h, t_w] · x_pad[o_h + t_h·dH, o_w + t_w·dW ..]
// A row's last vectors read past its end (into the next row, or the scratch's tail) for lanes that are
// not stored.
inline bool depthwise_forward_in_registers(const Conv2dGeometry& g) { return g.sh == 1 && g.sw == 1; }

template <typename T, int kBlock>
CS231N_INLINE void depthwise_forward_padded_planes(const T* xp, const T* wp, const T* bp, T* yp,
                                                   const Conv2dGeometry& g, int64_t begin, int64_t end) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  constexpr int kWidth = kBlock * V::kLanes;
  const int64_t m = g.f / g.c, pitch = g.w + 2 * g.pw, hp = g.h + 2 * g.ph, plane_out = g.oh * g.ow;
  const int64_t scratch = hp * pitch + kWidth + (g.kw - 1) * g.dw;  // + what the last row's vectors read past
  T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, scratch);
  std::fill(x_pad, x_pad + scratch, T(0));  // the border stays zero: only the interior is copied
  const T* copied = nullptr;
  for (int64_t nf = begin; nf < end; ++nf) {
    const int64_t n = nf / g.f, f = nf % g.f;
    const T* x_plane = xp + (n * g.c + f / m) * g.h * g.w;
    if (x_plane != copied) {  // (a channel's m filters read one plane)
      for (int64_t i = 0; i < g.h; ++i) {
        std::copy(x_plane + i * g.w, x_plane + (i + 1) * g.w, x_pad + (g.ph + i) * pitch + g.pw);
      }
      copied = x_plane;
    }
    const T* w_f = wp + f * g.taps();
    const T b = bp ? bp[f] : T(0);
    T* y_plane = yp + nf * plane_out;
    for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
      for (int64_t o_w = 0; o_w < g.ow; o_w += kWidth) {
        Vec acc[kBlock];
#pragma GCC unroll 4
        for (int v = 0; v < kBlock; ++v) acc[v] = Vec{} + b;  // (kBlock is a constant: the loops unroll)
        for (int64_t th = 0; th < g.kh; ++th) {
          const T* row = x_pad + (o_h + th * g.dh) * pitch + o_w;
          for (int64_t tw = 0; tw < g.kw; ++tw) {
            const T wv = w_f[th * g.kw + tw];
            const T* in = row + tw * g.dw;
#pragma GCC unroll 4
            for (int v = 0; v < kBlock; ++v) acc[v] += wv * V::at(in + v * V::kLanes);
          }
        }
        T* out = y_plane + o_h * g.ow + o_w;
        if (o_w + kWidth <= g.ow) {
#pragma GCC unroll 4
          for (int v = 0; v < kBlock; ++v) V::at(out + v * V::kLanes) = acc[v];
        } else {
          T last[kWidth];
          std::memcpy(last, acc, sizeof last);
          std::copy(last, last + (g.ow - o_w), out);
        }
      }
    }
  }
}

// The fewest vectors (at most 4) that cover a row of outputs.
template <typename T>
CS231N_INLINE void depthwise_forward_padded_rows(const T* xp, const T* wp, const T* bp, T* yp, const Conv2dGeometry& g,
                                                 int64_t begin, int64_t end) {
  switch (std::min<int64_t>(4, (g.ow + ChannelVectors<T>::kLanes - 1) / ChannelVectors<T>::kLanes)) {
    case 1:
      return depthwise_forward_padded_planes<T, 1>(xp, wp, bp, yp, g, begin, end);
    case 2:
      return depthwise_forward_padded_planes<T, 2>(xp, wp, bp, yp, g, begin, end);
    case 3:
      return depthwise_forward_padded_planes<T, 3>(xp, wp, bp, yp, g, begin, end);
    default:
      return depthwise_forward_padded_planes<T, 4>(xp, wp, bp, yp, g, begin, end);
  }
}

template <typename T>
void depthwise_forward_padded_baseline(const T* xp, const T* wp, const T* bp, T* yp, const Conv2dGeometry& g,
                                       int64_t begin, int64_t end) {
  depthwise_forward_padded_rows<T>(xp, wp, bp, yp, g, begin, end);
}
template <typename T>
CS231N_AVX2 void depthwise_forward_padded_avx2(const T* xp, const T* wp, const T* bp, T* yp, const Conv2dGeometry& g,
                                               int64_t begin, int64_t end) {
  depthwise_forward_padded_rows<T>(xp, wp, bp, yp, g, begin, end);
}
template <typename T>
CS231N_AVX512 void depthwise_forward_padded_avx512(const T* xp, const T* wp, const T* bp, T* yp,
                                                   const Conv2dGeometry& g, int64_t begin, int64_t end) {
  depthwise_forward_padded_rows<T>(xp, wp, bp, yp, g, begin, end);
}

template <typename T>
void depthwise_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, at::Tensor& y,
                       const Conv2dGeometry& g) {
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const T* bp = bias.has_value() && bias->defined() ? bias->const_data_ptr<T>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();
  const cpu::Isa isa = cpu::cpu_isa();
  const bool in_registers = depthwise_forward_in_registers(g);
  at::parallel_for(0, g.n * g.f, std::max<int64_t>(1, kGrain / (g.oh * g.ow)), [&](int64_t begin, int64_t end) {
    if (in_registers && isa == cpu::Isa::kAvx512) {
      depthwise_forward_padded_avx512<T>(xp, wp, bp, yp, g, begin, end);
    } else if (in_registers && isa == cpu::Isa::kAvx2) {
      depthwise_forward_padded_avx2<T>(xp, wp, bp, yp, g, begin, end);
    } else if (in_registers) {
      depthwise_forward_padded_baseline<T>(xp, wp, bp, yp, g, begin, end);
    } else if (cpu_has_avx2_fma()) {
      depthwise_forward_planes_avx2<T>(xp, wp, bp, yp, g, begin, end);
    } else {
      depthwise_forward_planes<T>(xp, wp, bp, yp, g, begin, end);
    }
  });
}

// Depthwise backward, one input channel c (and its m filters) per task, so that every d_x plane and every
// d_W entry has one owner: no atomics, and the sums are in a fixed order.
//   d_x[n, c, i_h, i_w] = Σ_{f of c} Σ_taps W[f, t] · dY[n, f, o_h, o_w]      (gather: transposed conv)
//   d_W[f, t]           = Σ_{n, o_h, o_w} dY[n, f, o_h, o_w] · x[n, c, i_h, i_w]
// d_W is accumulated lane by lane into one row per tap (a vectorisable loop), reduced at the end.
template <typename T>
CS231N_INLINE void depthwise_backward_channels(const T* dyp, const T* xp, const T* wp, T* dxp, T* dwp, T* dbp,
                                               const Conv2dGeometry& g, int64_t begin, int64_t end) {
  using acc_t = at::acc_type<T, /*is_cuda=*/false>;
  const bool need_dx = dxp != nullptr, need_dw = dwp != nullptr, need_db = dbp != nullptr;
  const int64_t m = g.f / g.c, plane_in = g.h * g.w, plane_out = g.oh * g.ow, taps = g.taps();
  std::vector<T> lanes(need_dw ? m * taps * g.ow : 0);
  std::vector<T> bias_lanes(need_db ? m * g.ow : 0);  // d_b[f] = Σ dY[n, f], lane by lane, while dY is in cache
  for (int64_t c = begin; c < end; ++c) {
    std::fill(lanes.begin(), lanes.end(), T(0));
    std::fill(bias_lanes.begin(), bias_lanes.end(), T(0));
    for (int64_t n = 0; n < g.n; ++n) {
      const T* x_plane = xp + (n * g.c + c) * plane_in;
      T* dx_plane = need_dx ? dxp + (n * g.c + c) * plane_in : nullptr;
      if (need_dx) std::fill(dx_plane, dx_plane + plane_in, T(0));
      for (int64_t j = 0; j < m; ++j) {
        const int64_t f = c * m + j;
        const T* dy_plane = dyp + (n * g.f + f) * plane_out;
        const T* w_f = wp + f * taps;
        if (need_dx) {
          for (int64_t i_h = 0; i_h < g.h; ++i_h) {
            T* __restrict__ dx_row = dx_plane + i_h * g.w;
            for (int64_t th = 0; th < g.kh; ++th) {
              int64_t o_h;
              if (!conv_out_index(i_h, th, g.sh, g.ph, g.dh, g.oh, &o_h)) continue;
              const T* __restrict__ dy_row = dy_plane + o_h * g.ow;
              for (int64_t tw = 0; tw < g.kw; ++tw) {
                int64_t i0, o0;
                conv_tap_first(tw, g.sw, g.pw, g.dw, &i0, &o0);
                if (i0 >= g.w || o0 >= g.ow) continue;
                const int64_t count = std::min((g.w - i0 + g.sw - 1) / g.sw, g.ow - o0);
                const T wv = w_f[th * g.kw + tw];
                if (g.sw == 1) {
                  for (int64_t k = 0; k < count; ++k) dx_row[i0 + k] += wv * dy_row[o0 + k];
                } else {
                  for (int64_t k = 0; k < count; ++k) dx_row[i0 + k * g.sw] += wv * dy_row[o0 + k];
                }
              }
            }
          }
        }
        if (need_db) {
          T* __restrict__ lane = bias_lanes.data() + j * g.ow;
          for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
            const T* __restrict__ dy_row = dy_plane + o_h * g.ow;
            for (int64_t o_w = 0; o_w < g.ow; ++o_w) lane[o_w] += dy_row[o_w];
          }
        }
        if (need_dw) {
          for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
            const T* __restrict__ dy_row = dy_plane + o_h * g.ow;
            for (int64_t th = 0; th < g.kh; ++th) {
              const int64_t i_h = conv_in_index(o_h, th, g.sh, g.ph, g.dh);
              if (i_h < 0 || i_h >= g.h) continue;
              const T* __restrict__ x_row = x_plane + i_h * g.w;
              for (int64_t tw = 0; tw < g.kw; ++tw) {
                int64_t lo, hi;
                conv_valid_out_range(tw, g.sw, g.pw, g.dw, g.w, g.ow, &lo, &hi);
                const int64_t off = tw * g.dw - g.pw;
                T* __restrict__ lane = lanes.data() + (j * taps + th * g.kw + tw) * g.ow;
                if (g.sw == 1) {
                  for (int64_t o_w = lo; o_w < hi; ++o_w) lane[o_w] += dy_row[o_w] * x_row[o_w + off];
                } else {
                  for (int64_t o_w = lo; o_w < hi; ++o_w) lane[o_w] += dy_row[o_w] * x_row[o_w * g.sw + off];
                }
              }
            }
          }
        }
      }
    }
    if (need_dw) {
      for (int64_t j = 0; j < m; ++j) {
        for (int64_t t = 0; t < taps; ++t) {
          const T* lane = lanes.data() + (j * taps + t) * g.ow;
          acc_t s = 0;
          for (int64_t o_w = 0; o_w < g.ow; ++o_w) s += static_cast<acc_t>(lane[o_w]);
          dwp[(c * m + j) * taps + t] = static_cast<T>(s);
        }
      }
    }
    if (need_db) {
      for (int64_t j = 0; j < m; ++j) {
        acc_t s = 0;
        for (int64_t o_w = 0; o_w < g.ow; ++o_w) s += static_cast<acc_t>(bias_lanes[j * g.ow + o_w]);
        dbp[c * m + j] = static_cast<T>(s);
      }
    }
  }
}

template <typename T>
CS231N_AVX2 void depthwise_backward_channels_avx2(const T* dyp, const T* xp, const T* wp, T* dxp, T* dwp, T* dbp,
                                                  const Conv2dGeometry& g, int64_t begin, int64_t end) {
  depthwise_backward_channels<T>(dyp, xp, wp, dxp, dwp, dbp, g, begin, end);
}

// d_W and d_b of a 3x3 stride-1 depthwise layer (one filter per channel), with the nine tap sums in
// registers: each vector of dY is loaded once for all nine taps, where the loop above keeps a lane row
// per tap in memory. The x plane is padded once (scratch), so that no tap needs a bounds test:
//     d_W[c, t_h, t_w] = Σ_{n, o_h, o_w} dY[n, c, o_h, o_w] · x_pad[n, c, o_h + t_h*dH, o_w + t_w*dW]
// Vectors are GCC's generic vectors of 64 bytes, which each instruction set's build splits as it can.
template <typename T>
CS231N_INLINE void depthwise_weight_grad_3x3_channels(const T* dyp, const T* xp, T* dwp, T* dbp,
                                                      const Conv2dGeometry& g, int64_t begin, int64_t end) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  constexpr int kLanes = V::kLanes;
  const int64_t wp = g.w + 2 * g.pw, hp = g.h + 2 * g.ph, plane_out = g.oh * g.ow;
  T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, hp * wp + kLanes);
  std::fill(x_pad, x_pad + hp * wp + kLanes, T(0));  // the border stays zero: only the interior is copied
  for (int64_t c = begin; c < end; ++c) {
    Vec acc[9] = {}, bias = {};
    T tail[9] = {}, tail_bias = 0;
    for (int64_t n = 0; n < g.n; ++n) {
      const T* x_plane = xp + (n * g.c + c) * g.h * g.w;
      for (int64_t i = 0; i < g.h; ++i)
        std::copy(x_plane + i * g.w, x_plane + (i + 1) * g.w, x_pad + (g.ph + i) * wp + g.pw);
      const T* dy_plane = dyp + (n * g.c + c) * plane_out;
      for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
        const T* d = dy_plane + o_h * g.ow;
        const T* rows[3] = {x_pad + o_h * wp, x_pad + (o_h + g.dh) * wp, x_pad + (o_h + 2 * g.dh) * wp};
        int64_t o_w = 0;
        for (; o_w + kLanes <= g.ow; o_w += kLanes) {
          const Vec dv = V::at(d + o_w);
          bias += dv;
#pragma GCC unroll 3
          for (int th = 0; th < 3; ++th) {
#pragma GCC unroll 3
            for (int tw = 0; tw < 3; ++tw) acc[th * 3 + tw] += dv * V::at(rows[th] + o_w + tw * g.dw);
          }
        }
        for (; o_w < g.ow; ++o_w) {
          tail_bias += d[o_w];
          for (int t = 0; t < 9; ++t) tail[t] += d[o_w] * rows[t / 3][o_w + (t % 3) * g.dw];
        }
      }
    }
    for (int t = 0; t < 9; ++t) {
      T sum = tail[t];
      for (int l = 0; l < kLanes; ++l) sum += acc[t][l];
      if (dwp) dwp[c * 9 + t] = sum;
    }
    if (dbp) {
      T sum = tail_bias;
      for (int l = 0; l < kLanes; ++l) sum += bias[l];
      dbp[c] = sum;
    }
  }
}

template <typename T>
void depthwise_weight_grad_3x3_baseline(const T* dyp, const T* xp, T* dwp, T* dbp, const Conv2dGeometry& g,
                                        int64_t begin, int64_t end) {
  depthwise_weight_grad_3x3_channels(dyp, xp, dwp, dbp, g, begin, end);
}
template <typename T>
CS231N_AVX2 void depthwise_weight_grad_3x3_avx2(const T* dyp, const T* xp, T* dwp, T* dbp, const Conv2dGeometry& g,
                                                int64_t begin, int64_t end) {
  depthwise_weight_grad_3x3_channels(dyp, xp, dwp, dbp, g, begin, end);
}
template <typename T>
CS231N_AVX512 void depthwise_weight_grad_3x3_avx512(const T* dyp, const T* xp, T* dwp, T* dbp, const Conv2dGeometry& g,
                                                    int64_t begin, int64_t end) {
  depthwise_weight_grad_3x3_channels(dyp, xp, dwp, dbp, g, begin, end);
}

inline bool depthwise_weight_grad_is_3x3(const Conv2dGeometry& g) {
  return g.f == g.c && g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1;
}

template <typename T>
void depthwise_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, at::Tensor& dx, at::Tensor& dw,
                        at::Tensor& db, const Conv2dGeometry& g, bool need_dx, bool need_dw, bool need_db) {
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const T* dyp = dy.const_data_ptr<T>();
  T* dxp = need_dx ? dx.mutable_data_ptr<T>() : nullptr;
  T* dwp = need_dw ? dw.mutable_data_ptr<T>() : nullptr;
  T* dbp = need_db ? db.mutable_data_ptr<T>() : nullptr;
  const int64_t per_channel = std::max<int64_t>(1, g.n * g.oh * g.ow * g.taps());
  const cpu::Isa isa = cpu::cpu_isa();
  at::parallel_for(0, g.c, std::max<int64_t>(1, kGrain / per_channel), [&](int64_t begin, int64_t end) {
    if (!need_dx && depthwise_weight_grad_is_3x3(g)) {
      if (isa == cpu::Isa::kAvx512) {
        depthwise_weight_grad_3x3_avx512<T>(dyp, xp, dwp, dbp, g, begin, end);
      } else if (isa == cpu::Isa::kAvx2) {
        depthwise_weight_grad_3x3_avx2<T>(dyp, xp, dwp, dbp, g, begin, end);
      } else {
        depthwise_weight_grad_3x3_baseline<T>(dyp, xp, dwp, dbp, g, begin, end);
      }
    } else if (cpu_has_avx2_fma()) {
      depthwise_backward_channels_avx2<T>(dyp, xp, wp, dxp, dwp, dbp, g, begin, end);
    } else {
      depthwise_backward_channels<T>(dyp, xp, wp, dxp, dwp, dbp, g, begin, end);
    }
  });
}

// ------------------------------------------------------------------ depthwise, channels innermost
// Depthwise with one filter per channel (MobileNet's): each sample is transposed in cache to pixels x
// channels (pad_pixels_from_planes), so that every tap is a multiply-add over a contiguous run of
// channels, vectorised across channels whatever the size of the plane (a 4x4 plane gives a row loop of
// 4), then transposed back. With positions in the padded plane (any stride, dilation and padding):
//   y[o, c]                 = b[c] + Σ_t W[c, t] · x_pad[o*s + t*d, c]
//   d_x[i, c]               = Σ_{(t, o): o*s + t*d = i} W[c, t] · dY[o, c]   (a gather: InputGradReaches)
//   d_W[c, t]              += dY[o, c] · x_pad[o*s + t*d, c],   d_b[c] += dY[o, c]
// The backward runs the samples of a chunk in order on one thread, so its sums are deterministic.
// NCHW layers take it for planes of up to 16 x 16 outputs, where the plane kernels (above) spend more on
// their short rows than on the sums: measured 4-7x faster there (MobileNetV2's 16x16 to 4x4 stages), and
// slower on large planes (56 x 56: the two transposes cost more than the short rows). Strided layers,
// whose plane kernels add a row into the output tap by tap, take it up to 32 x 32 outputs: (1, 144, 56, 56)
// stride 2, ms, on a Zen 4: forward 0.36 -> 0.18, with d_x 1.07 -> 0.79, with d_W 0.94 -> 0.55 (torch
// 0.27, 0.89, 0.74); at (8, 96, 112, 112), 56 x 56 outputs, it lost (forward 5.2 -> 7.9). channels_last
// layers need no transposes, and take it for every size (`planes` false: x, y, dY and d_x in NHWC); their
// forward reads x unpadded (dw_forward_nhwc), and so does their d_W on rows of 16 outputs or more
// (dw_weight_grad_nhwc).
constexpr int64_t kMaxDepthwisePixels = 256, kMaxDepthwiseStridedPixels = 1024;
// Taps the kernels below hold a vector of weights (and an offset) each for, in registers or on the
// stack: up to 7 x 7. Larger filters take the padded form's scalar loops.
constexpr int kMaxDepthwiseTaps = 49;
inline bool depthwise_by_pixels(const Conv2dGeometry& g) {
  const bool strided = g.sh > 1 || g.sw > 1;
  return conv2d_is_depthwise(g) && g.f == g.c &&
         g.col_cols() <= (strided ? kMaxDepthwiseStridedPixels : kMaxDepthwisePixels);
}
inline bool depthwise_channels_last_direct(const Conv2dGeometry& g) { return conv2d_is_depthwise(g) && g.f == g.c; }

// Each tap's offset (pixels) from the padded pixel of an output's first tap:
// dw_in_pixel(g, sp, o_h, o_w, t) = dw_in_pixel(g, sp, o_h, o_w, 0) + offset[t].
inline std::vector<int64_t> depthwise_tap_offsets(const Conv2dGeometry& g, const ShiftedPlanes& sp) {
  std::vector<int64_t> offset(g.taps());
  for (int64_t t = 0; t < g.taps(); ++t) offset[t] = dw_in_pixel(g, sp, 0, 0, t);
  return offset;
}

// out[o, :] for every output pixel o of one sample; w_t = W as [taps][C]. One vector of channels at a
// time, its weights (one vector per tap) read once; then 8 output pixels of a row at a time, whose sums
// stay in registers over the taps (the loop that added into out tap by tap was 3-7x slower than oneDNN's).
template <typename T>
CS231N_INLINE void dw_forward_pixels(const T* x_pad, const T* w_t, const T* b, T* out, const Conv2dGeometry& g,
                                     const ShiftedPlanes& sp, const int64_t* offset) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  constexpr int kPixels = 8;
  const int64_t C = g.c, taps = g.taps(), whole = C / V::kLanes * V::kLanes, step = g.sw * C;
  int64_t at[kMaxDepthwiseTaps];  // tap t's first element from an output's first tap's, when taps fit
  const bool few_taps = taps <= kMaxDepthwiseTaps;
  for (int64_t t = 0; few_taps && t < taps; ++t) at[t] = offset[t] * C;
  for (int64_t c = 0; c < whole && few_taps; c += V::kLanes) {
    Vec w[kMaxDepthwiseTaps];
    for (int64_t t = 0; t < taps; ++t) w[t] = V::at(w_t + t * C + c);
    const Vec init = b ? V::at(b + c) : Vec{};
    for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
      const T* row = x_pad + dw_in_pixel(g, sp, o_h, 0, 0) * C + c;  // output (o_h, 0)'s first tap, channel c
      T* y = out + o_h * g.ow * C + c;
      int64_t o_w = 0;
      for (; o_w + kPixels <= g.ow; o_w += kPixels) {
        Vec acc[kPixels];
#pragma GCC unroll 8
        for (int p = 0; p < kPixels; ++p) acc[p] = init;
        const T* first = row + o_w * step;
        for (int64_t t = 0; t < taps; ++t) {
#pragma GCC unroll 8
          for (int p = 0; p < kPixels; ++p) acc[p] += w[t] * V::at(first + p * step + at[t]);
        }
#pragma GCC unroll 8
        for (int p = 0; p < kPixels; ++p) V::at(y + (o_w + p) * C) = acc[p];
      }
      for (; o_w < g.ow; ++o_w) {
        Vec acc = init;
        for (int64_t t = 0; t < taps; ++t) acc += w[t] * V::at(row + o_w * step + at[t]);
        V::at(y + o_w * C) = acc;
      }
    }
  }
  const int64_t scalar_from = few_taps ? whole : 0;  // the channels past the vectors (all, for huge filters)
  for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
    for (int64_t o_w = 0; o_w < g.ow && scalar_from < C; ++o_w) {
      const T* first = x_pad + dw_in_pixel(g, sp, o_h, o_w, 0) * C;
      for (int64_t c = scalar_from; c < C; ++c) {
        T acc = b ? b[c] : T(0);
        for (int64_t t = 0; t < taps; ++t) acc += w_t[t * C + c] * first[offset[t] * C + c];
        out[(o_h * g.ow + o_w) * C + c] = acc;
      }
    }
  }
}

// An NHWC depthwise layer's taps, row by row, for the kernels that read x where it lies: the outputs
// [lo, hi) whose taps' columns all lie in the image, and, after set(o_h), the n taps whose rows lie in it:
// their weights' offsets in w_t [taps][C] (w_at), where each reads in x for output (o_h, 0) (at: its
// column may be < 0) and their columns (tw). At most kMaxDepthwiseTaps taps.
struct DepthwiseRowTaps {
  const Conv2dGeometry& g;
  int64_t lo = 0, hi = 0;
  int n = 0;
  int64_t w_at[kMaxDepthwiseTaps], at[kMaxDepthwiseTaps], tw[kMaxDepthwiseTaps];

  explicit DepthwiseRowTaps(const Conv2dGeometry& geometry) : g(geometry) {
    int64_t lo_last, hi_last;  // the outputs whose first and whose last tap column lie in the image
    conv_valid_out_range(0, g.sw, g.pw, g.dw, g.w, g.ow, &lo, &hi);
    conv_valid_out_range(g.kw - 1, g.sw, g.pw, g.dw, g.w, g.ow, &lo_last, &hi_last);
    lo = std::max(lo, lo_last);
    hi = std::max(lo, std::min(hi, hi_last));
  }

  void set(int64_t o_h) {
    n = 0;
    for (int64_t t = 0; t < g.taps(); ++t) {
      const int64_t i_h = conv_in_index(o_h, t / g.kw, g.sh, g.ph, g.dh);
      if (i_h < 0 || i_h >= g.h) continue;
      w_at[n] = t * g.c;
      tw[n] = t % g.kw;
      at[n++] = (i_h * g.w + conv_in_index<int64_t>(0, t % g.kw, g.sw, g.pw, g.dw)) * g.c;
    }
  }

  // Whether tap k's column lies in the image for output o_w.
  bool in_image(int64_t o_w, int k) const {
    const int64_t i_w = conv_in_index(o_w, tw[k], g.sw, g.pw, g.dw);
    return i_w >= 0 && i_w < g.w;
  }

  // The taps of output o_w (one outside [lo, hi)) whose columns lie in the image, their w_at and at
  // copied into w_in and at_in; returns how many.
  int border(int64_t o_w, int64_t* w_in, int64_t* at_in) const {
    int m = 0;
    for (int k = 0; k < n; ++k) {
      if (!in_image(o_w, k)) continue;
      w_in[m] = w_at[k];
      at_in[m++] = at[k];
    }
    return m;
  }
};

// P outputs side by side (`first` = the first one's first tap, `step` apart), every vector of channels,
// over taps [0, n) that all lie in the image (at[k]: tap k's offset in x, w_at[k]: its weights' in w_t).
// The channels inside the block: the block's input pixels (all channels) are read in sequence while in L1.
template <int P, typename T>
CS231N_INLINE void dw_outputs_nhwc(const T* first, int64_t step, const T* w_t, const int64_t* w_at, const int64_t* at,
                                   int n, const T* b, T* y, int64_t C) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  const int64_t whole = C / V::kLanes * V::kLanes;
  for (int64_t c = 0; c < whole; c += V::kLanes) {
    Vec acc[P];
    const Vec init = b ? V::at(b + c) : Vec{};
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) acc[p] = init;
    for (int k = 0; k < n; ++k) {
      const Vec w = V::at(w_t + w_at[k] + c);
      const T* src = first + at[k] + c;
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) acc[p] += w * V::at(src + p * step);
    }
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) V::at(y + p * C + c) = acc[p];
  }
}

// The same in bfloat16, summed in float32 (Bf16Pairs; w_t and b float32, in bf16_pair_lanes' order): blocks
// of 32 channels, then one of 16; the channels past whole 16s are left to the caller's scalar loop.
template <int P, int kWords>
CS231N_INLINE void dw_outputs_bf16(const c10::BFloat16* first, int64_t step, const float* w_t, const int64_t* w_at,
                                   const int64_t* at, int n, const float* b, c10::BFloat16* y, int64_t C, int64_t c) {
  using B = Bf16Pairs<kWords>;
  using Floats = typename B::Floats;
  Floats even[P], odd[P];  // (the odd channels' filters and bias follow the even ones', kWords on)
  const Floats init_even = b ? B::at(b + c) : Floats{}, init_odd = b ? B::at(b + c + kWords) : Floats{};
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) even[p] = init_even, odd[p] = init_odd;
  for (int k = 0; k < n; ++k) {
    const Floats w_even = B::at(w_t + w_at[k] + c), w_odd = B::at(w_t + w_at[k] + c + kWords);
    const c10::BFloat16* src = first + at[k] + c;
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      Floats x_even, x_odd;
      B::load(src + p * step, x_even, x_odd);
      even[p] += w_even * x_even;
      odd[p] += w_odd * x_odd;
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) B::store(y + p * C + c, even[p], odd[p]);
}
template <int P>
CS231N_INLINE void dw_outputs_nhwc(const c10::BFloat16* first, int64_t step, const float* w_t, const int64_t* w_at,
                                   const int64_t* at, int n, const float* b, c10::BFloat16* y, int64_t C) {
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) dw_outputs_bf16<P, 16>(first, step, w_t, w_at, at, n, b, y, C, c);
  if (c + 16 <= C) dw_outputs_bf16<P, 8>(first, step, w_t, w_at, at, n, b, y, C, c);
}

// Prefetch into L1 what `count` outputs from o read beyond the outputs before them, in the row of taps
// that no earlier output row read (the others are in cache): `last` = the last tap's first element for
// output 0, outputs `step` elements apart, pixels of C elements. The new elements lie after output o - 1's
// last pixel, up to output o + count - 1's: one contiguous run (at stride 2, the pixels between too).
template <typename T>
CS231N_INLINE void prefetch_new_pixels(const T* last, int64_t o, int64_t count, int64_t step, int64_t C) {
  if (count <= 0) return;
  const char* begin = reinterpret_cast<const char*>(last + (o - 1) * step + C);
  const int64_t bytes = count * step * static_cast<int64_t>(sizeof(T));
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(begin + byte, 0, 3);
}

// The outputs [lo, hi) of a row, all of whose taps lie in the image: blocks of 8, then of 4, then single
// outputs; a last short block overlaps its predecessor where the run is long enough (an output computed
// twice is stored twice, the same value).
template <typename T, typename S>
CS231N_INLINE void dw_interior_nhwc(const T* x, int64_t step, const S* w_t, const int64_t* w_at, const int64_t* at,
                                    int n, const S* b, T* y, int64_t C, int64_t lo, int64_t hi) {
  int64_t o = lo;
  for (; o + 8 <= hi; o += 8) {
    // The next block's new pixels, fetched into L1 a block ahead: 3.9-5.4 -> 2.7 ms at (32, 128, 56, 56),
    // where x streams from memory; no change where it fits in cache.
    if (n > 0) prefetch_new_pixels(x + at[n - 1], o + 8, std::min<int64_t>(8, hi - o - 8), step, C);
    dw_outputs_nhwc<8>(x + o * step, step, w_t, w_at, at, n, b, y + o * C, C);
  }
  if (o < hi && hi - lo >= 8) {
    dw_outputs_nhwc<8>(x + (hi - 8) * step, step, w_t, w_at, at, n, b, y + (hi - 8) * C, C);
    return;
  }
  for (; o + 4 <= hi; o += 4) dw_outputs_nhwc<4>(x + o * step, step, w_t, w_at, at, n, b, y + o * C, C);
  if (o < hi && hi - lo >= 4) {
    dw_outputs_nhwc<4>(x + (hi - 4) * step, step, w_t, w_at, at, n, b, y + (hi - 4) * C, C);
    return;
  }
  for (; o < hi; ++o) dw_outputs_nhwc<1>(x + o * step, step, w_t, w_at, at, n, b, y + o * C, C);
}

// The same from an NHWC sample x read where it lies, with no padded copy (that copy was a third of the
// forward's time). Per output row, the taps whose rows lie in the image; along the row, the outputs
// [lo, hi) whose taps' columns all lie in the image run in blocks (dw_interior_nhwc), and the few at the
// borders (one each side for 3x3 with padding 1) one at a time, over the taps whose columns reach the
// image. Where one block of 8 chose per tap between x and a vector of zeros, every output of a small
// plane ran that select, one vector of channels at a time over the whole row (1.7x oneDNN's time at
// 32 x 32). At most kMaxDepthwiseTaps taps (the caller pads for more).
template <typename T, typename S>
CS231N_INLINE void dw_forward_nhwc(const T* x, int64_t r0, int64_t r1, const S* w_t, const S* b, T* out,
                                   const Conv2dGeometry& g) {
  const int64_t C = g.c, step = g.sw * C;
  DepthwiseRowTaps r(g);
  for (int64_t o_h = r0; o_h < r1; ++o_h) {
    r.set(o_h);
    T* y = out + o_h * g.ow * C;
    dw_interior_nhwc(x, step, w_t, r.w_at, r.at, r.n, b, y, C, r.lo, r.hi);
    const auto border = [&](int64_t o_w) {  // an output outside [lo, hi): only its taps in the image
      int64_t w_in[kMaxDepthwiseTaps], at_in[kMaxDepthwiseTaps];
      const int m = r.border(o_w, w_in, at_in);
      dw_outputs_nhwc<1>(x + o_w * step, step, w_t, w_in, at_in, m, b, y + o_w * C, C);
    };
    for (int64_t o_w = 0; o_w < r.lo; ++o_w) border(o_w);
    for (int64_t o_w = r.hi; o_w < g.ow; ++o_w) border(o_w);
    using V = ChannelVectors<S>;
    for (int64_t c = C / V::kLanes * V::kLanes; c < C; ++c) {  // the channels past the vectors, one output at a time
      for (int64_t o_w = 0; o_w < g.ow; ++o_w) {
        S acc = b ? b[c] : S(0);
        for (int k = 0; k < r.n; ++k) {
          if (r.in_image(o_w, k)) acc += w_t[r.w_at[k] + c] * static_cast<S>(x[r.at[k] + o_w * step + c]);
        }
        y[o_w * C + c] = static_cast<T>(acc);
      }
    }
  }
}

// d_W and d_b over P outputs side by side (`first` = the first one's first tap in x, `step` apart; dy =
// the first one's dY), every channel, over taps [0, n) that all lie in the image, added into the running
// dw_t [taps][C] (at w_at[k]) and db. The P vectors of dY are loaded once for all the taps; each tap's sum
// over the P outputs is one chain, the taps' chains independent.
template <int P, typename T>
CS231N_INLINE void dw_weight_grad_outputs_nhwc(const T* first, int64_t step, const T* dy, const int64_t* w_at,
                                               const int64_t* at, int n, T* dw_t, T* db, int64_t C) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  const int64_t whole = C / V::kLanes * V::kLanes;
  for (int64_t c = 0; c < whole; c += V::kLanes) {
    Vec d[P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) d[p] = V::at(dy + p * C + c);
    if (db) {
      Vec sum = d[0];
#pragma GCC unroll 8
      for (int p = 1; p < P; ++p) sum += d[p];
      V::at(db + c) += sum;
    }
    for (int k = 0; k < n && dw_t; ++k) {
      const T* src = first + at[k] + c;
      Vec sum = d[0] * V::at(src);
#pragma GCC unroll 8
      for (int p = 1; p < P; ++p) sum += d[p] * V::at(src + p * step);
      V::at(dw_t + w_at[k] + c) += sum;
    }
  }
  for (int64_t c = whole; c < C; ++c) {  // the channels past the vectors
    for (int p = 0; p < P; ++p) {
      const T dv = dy[p * C + c];
      if (db) db[c] += dv;
      for (int k = 0; k < n && dw_t; ++k) dw_t[w_at[k] + c] += dv * first[at[k] + p * step + c];
    }
  }
}

// The same in bfloat16 (Bf16Pairs), the sums float32 in bf16_pair_lanes' order: blocks of 32 channels,
// then one of 16, then the last few one at a time as above.
template <int P, int kWords>
CS231N_INLINE void dw_weight_grad_bf16(const c10::BFloat16* first, int64_t step, const c10::BFloat16* dy,
                                       const int64_t* w_at, const int64_t* at, int n, float* dw_t, float* db, int64_t C,
                                       int64_t c) {
  using B = Bf16Pairs<kWords>;
  using Floats = typename B::Floats;
  Floats d_even[P], d_odd[P];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) B::load(dy + p * C + c, d_even[p], d_odd[p]);
  if (db) {
    Floats even = d_even[0], odd = d_odd[0];
#pragma GCC unroll 8
    for (int p = 1; p < P; ++p) even += d_even[p], odd += d_odd[p];
    B::at(db + c) += even;
    B::at(db + c + kWords) += odd;
  }
  for (int k = 0; k < n && dw_t; ++k) {
    const c10::BFloat16* src = first + at[k] + c;
    Floats x_even, x_odd;
    B::load(src, x_even, x_odd);
    Floats even = d_even[0] * x_even, odd = d_odd[0] * x_odd;
#pragma GCC unroll 8
    for (int p = 1; p < P; ++p) {
      B::load(src + p * step, x_even, x_odd);
      even += d_even[p] * x_even;
      odd += d_odd[p] * x_odd;
    }
    B::at(dw_t + w_at[k] + c) += even;
    B::at(dw_t + w_at[k] + c + kWords) += odd;
  }
}
template <int P>
CS231N_INLINE void dw_weight_grad_outputs_nhwc(const c10::BFloat16* first, int64_t step, const c10::BFloat16* dy,
                                               const int64_t* w_at, const int64_t* at, int n, float* dw_t, float* db,
                                               int64_t C) {
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) dw_weight_grad_bf16<P, 16>(first, step, dy, w_at, at, n, dw_t, db, C, c);
  if (c + 16 <= C) dw_weight_grad_bf16<P, 8>(first, step, dy, w_at, at, n, dw_t, db, C, c), c += 16;
  for (; c < C; ++c) {  // the channels past the vectors
    for (int p = 0; p < P; ++p) {
      const float dv = static_cast<float>(dy[p * C + c]);
      if (db) db[c] += dv;
      for (int k = 0; k < n && dw_t; ++k) dw_t[w_at[k] + c] += dv * static_cast<float>(first[at[k] + p * step + c]);
    }
  }
}

// NHWC d_W in place (dw_weight_grad_nhwc) for rows of 16 outputs or more, where blocks of 8 carry the
// work. On shorter rows (MobileNetV2's 8 x 8 and 4 x 4 stages) most outputs run alone, each adding its
// taps' sums into d_W; the padded copy's loop (dw_weight_grad_pixels), whose sums stay in registers over the
// whole sample, took 0.6-0.8x the time there.
inline bool depthwise_weight_grad_in_place(const Conv2dGeometry& g) {
  return g.ow >= 16 && g.taps() <= kMaxDepthwiseTaps;
}

// The running d_W (dw_t [taps][C]) and d_b of one NHWC sample, x and dY read where they lie (no padded
// copy), in the forward's order (dw_forward_nhwc): per output row the taps in the image; the outputs
// whose taps' columns all lie in the image in blocks of 8, 4 and 1 (none overlapping: these are sums), the
// borders' outputs over their own taps. Replaces a loop over the whole sample per vector of channels,
// with the input padded: (32, 128, 56, 56) d_W and d_b 4.6 -> 3.7 ms (oneDNN 4.7).
template <typename T, typename S>
CS231N_INLINE void dw_weight_grad_nhwc(const T* dy, const T* x, int64_t r0, int64_t r1, S* dw_t, S* db,
                                       const Conv2dGeometry& g) {
  const int64_t C = g.c, step = g.sw * C;
  DepthwiseRowTaps r(g);
  const int64_t *w_at = r.w_at, *at = r.at;
  for (int64_t o_h = r0; o_h < r1; ++o_h) {
    r.set(o_h);
    const int n = r.n;
    const T* d = dy + o_h * g.ow * C;
    int64_t o = r.lo;
    for (; o + 8 <= r.hi; o += 8) {
      const int64_t next = std::min<int64_t>(8, r.hi - o - 8);
      if (n > 0) prefetch_new_pixels(x + at[n - 1], o + 8, next, step, C);  // as the forward's
      prefetch_new_pixels(d, o + 8, next, C, C);                            // and dY's next block
      dw_weight_grad_outputs_nhwc<8>(x + o * step, step, d + o * C, w_at, at, n, dw_t, db, C);
    }
    for (; o + 4 <= r.hi; o += 4)
      dw_weight_grad_outputs_nhwc<4>(x + o * step, step, d + o * C, w_at, at, n, dw_t, db, C);
    for (; o < r.hi; ++o) dw_weight_grad_outputs_nhwc<1>(x + o * step, step, d + o * C, w_at, at, n, dw_t, db, C);
    const auto border = [&](int64_t o_w) {  // an output outside [lo, hi): only its taps in the image
      int64_t w_in[kMaxDepthwiseTaps], at_in[kMaxDepthwiseTaps];
      const int m = r.border(o_w, w_in, at_in);
      dw_weight_grad_outputs_nhwc<1>(x + o_w * step, step, d + o_w * C, w_in, at_in, m, dw_t, db, C);
    };
    for (int64_t o_w = 0; o_w < r.lo; ++o_w) border(o_w);
    for (int64_t o_w = r.hi; o_w < g.ow; ++o_w) border(o_w);
  }
}

// One sample's d_W and d_b from its padded x: added into the running dw_t [taps][C] and db [C]. One vector
// of channels at a time over all the pixels, its d_W (one vector per tap) and d_b held in registers; a
// 3x3 filter's nine sums with a fixed count. (d_x is the gather, depthwise_input_grad_rows.)
template <typename T>
CS231N_INLINE void dw_weight_grad_pixels(const T* dy_t, const T* x_pad, T* dw_t, T* db, const Conv2dGeometry& g,
                                         const ShiftedPlanes& sp, const int64_t* offset) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  const int64_t C = g.c, taps = g.taps(), whole = C / V::kLanes * V::kLanes;
  const bool few_taps = taps <= kMaxDepthwiseTaps;
  int64_t at[kMaxDepthwiseTaps];
  for (int64_t t = 0; few_taps && t < taps; ++t) at[t] = offset[t] * C;
  const auto first = [&](int64_t o_h, int64_t o_w) { return dw_in_pixel(g, sp, o_h, o_w, 0) * C; };
  const auto vectors = [&](auto fixed_taps) {  // the whole vectors of channels; fixed_taps: 9, or 0 (any)
    constexpr int kFixed = decltype(fixed_taps)::value;
    const int64_t count = kFixed > 0 ? kFixed : taps;
    for (int64_t c = 0; c < whole; c += V::kLanes) {
      Vec dw_acc[kFixed > 0 ? kFixed : kMaxDepthwiseTaps] = {}, db_acc = {};
      for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
        for (int64_t o_w = 0; o_w < g.ow; ++o_w) {
          const Vec d = V::at(dy_t + (o_h * g.ow + o_w) * C + c);
          db_acc += d;
          if (!dw_t) continue;  // d_b alone: no padded x
          const T* x = x_pad + first(o_h, o_w) + c;
#pragma GCC unroll 9
          for (int64_t t = 0; t < count; ++t) dw_acc[t] += d * V::at(x + at[t]);
        }
      }
      if (db) V::at(db + c) += db_acc;
      for (int64_t t = 0; dw_t && t < count; ++t) V::at(dw_t + t * C + c) += dw_acc[t];
    }
  };
  if (taps == 9) {
    vectors(std::integral_constant<int, 9>{});
  } else if (few_taps) {
    vectors(std::integral_constant<int, 0>{});
  }
  for (int64_t c = few_taps ? whole : 0; c < C; ++c) {  // the channels past the vectors (all, for huge filters)
    for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
      for (int64_t o_w = 0; o_w < g.ow; ++o_w) {
        const T d = dy_t[(o_h * g.ow + o_w) * C + c];
        if (db) db[c] += d;
        const int64_t base = first(o_h, o_w) + c;
        for (int64_t t = 0; dw_t && t < taps; ++t) dw_t[t * C + c] += d * x_pad[base + offset[t] * C];
      }
    }
  }
}

// The same in bfloat16 (Bf16Pairs), the sums float32 in bf16_pair_lanes' order; at most
// kMaxDepthwiseTaps taps (the caller's condition). kWords channels of each parity a block.
template <int kWords, int kFixed>
CS231N_INLINE void dw_weight_grad_pixels_bf16(const c10::BFloat16* dy_t, const c10::BFloat16* x_pad, float* dw_t,
                                              float* db, const Conv2dGeometry& g, const ShiftedPlanes& sp,
                                              const int64_t* at, int64_t c) {
  using B = Bf16Pairs<kWords>;
  using Floats = typename B::Floats;
  const int64_t C = g.c, count = kFixed > 0 ? kFixed : g.taps();
  Floats even[kFixed > 0 ? kFixed : kMaxDepthwiseTaps] = {}, odd[kFixed > 0 ? kFixed : kMaxDepthwiseTaps] = {};
  Floats db_even = {}, db_odd = {};
  for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
    for (int64_t o_w = 0; o_w < g.ow; ++o_w) {
      Floats d_even, d_odd, x_even, x_odd;
      B::load(dy_t + (o_h * g.ow + o_w) * C + c, d_even, d_odd);
      db_even += d_even;
      db_odd += d_odd;
      if (!dw_t) continue;  // d_b alone: no padded x
      const c10::BFloat16* x = x_pad + dw_in_pixel(g, sp, o_h, o_w, 0) * C + c;
#pragma GCC unroll 9
      for (int64_t t = 0; t < count; ++t) {
        B::load(x + at[t], x_even, x_odd);
        even[t] += d_even * x_even;
        odd[t] += d_odd * x_odd;
      }
    }
  }
  if (db) B::at(db + c) += db_even, B::at(db + c + kWords) += db_odd;
  for (int64_t t = 0; dw_t && t < count; ++t) {
    B::at(dw_t + t * C + c) += even[t];
    B::at(dw_t + t * C + c + kWords) += odd[t];
  }
}
CS231N_INLINE void dw_weight_grad_pixels(const c10::BFloat16* dy_t, const c10::BFloat16* x_pad, float* dw_t, float* db,
                                         const Conv2dGeometry& g, const ShiftedPlanes& sp, const int64_t* offset) {
  const int64_t C = g.c, taps = g.taps();
  int64_t at[kMaxDepthwiseTaps];
  for (int64_t t = 0; t < taps; ++t) at[t] = offset[t] * C;
  int64_t c = 0;
  if (taps == 9) {
    for (; c + 32 <= C; c += 32) dw_weight_grad_pixels_bf16<16, 9>(dy_t, x_pad, dw_t, db, g, sp, at, c);
    if (c + 16 <= C) dw_weight_grad_pixels_bf16<8, 9>(dy_t, x_pad, dw_t, db, g, sp, at, c), c += 16;
  } else {
    for (; c + 32 <= C; c += 32) dw_weight_grad_pixels_bf16<16, 0>(dy_t, x_pad, dw_t, db, g, sp, at, c);
    if (c + 16 <= C) dw_weight_grad_pixels_bf16<8, 0>(dy_t, x_pad, dw_t, db, g, sp, at, c), c += 16;
  }
  for (; c < C; ++c) {  // the channels past the vectors, as the float32 loop's
    for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
      for (int64_t o_w = 0; o_w < g.ow; ++o_w) {
        const float d = static_cast<float>(dy_t[(o_h * g.ow + o_w) * C + c]);
        if (db) db[c] += d;
        const int64_t base = dw_in_pixel(g, sp, o_h, o_w, 0) * C + c;
        for (int64_t t = 0; dw_t && t < taps; ++t) dw_t[t * C + c] += d * static_cast<float>(x_pad[base + at[t]]);
      }
    }
  }
}

// The loops above compiled for each instruction set (their bodies inline into each).
template <typename T, typename S>
void dw_forward_nhwc_baseline(const T* x, int64_t r0, int64_t r1, const S* w_t, const S* b, T* out,
                              const Conv2dGeometry& g) {
  dw_forward_nhwc(x, r0, r1, w_t, b, out, g);
}
template <typename T, typename S>
CS231N_AVX2 void dw_forward_nhwc_avx2(const T* x, int64_t r0, int64_t r1, const S* w_t, const S* b, T* out,
                                      const Conv2dGeometry& g) {
  dw_forward_nhwc(x, r0, r1, w_t, b, out, g);
}
template <typename T, typename S>
CS231N_AVX512 void dw_forward_nhwc_avx512(const T* x, int64_t r0, int64_t r1, const S* w_t, const S* b, T* out,
                                          const Conv2dGeometry& g) {
  dw_forward_nhwc(x, r0, r1, w_t, b, out, g);
}
template <typename T, typename S>
void dw_weight_grad_nhwc_baseline(const T* dy, const T* x, int64_t r0, int64_t r1, S* dw_t, S* db,
                                  const Conv2dGeometry& g) {
  dw_weight_grad_nhwc(dy, x, r0, r1, dw_t, db, g);
}
template <typename T, typename S>
CS231N_AVX2 void dw_weight_grad_nhwc_avx2(const T* dy, const T* x, int64_t r0, int64_t r1, S* dw_t, S* db,
                                          const Conv2dGeometry& g) {
  dw_weight_grad_nhwc(dy, x, r0, r1, dw_t, db, g);
}
template <typename T, typename S>
CS231N_AVX512 void dw_weight_grad_nhwc_avx512(const T* dy, const T* x, int64_t r0, int64_t r1, S* dw_t, S* db,
                                              const Conv2dGeometry& g) {
  dw_weight_grad_nhwc(dy, x, r0, r1, dw_t, db, g);
}
template <typename T>
void dw_forward_pixels_baseline(const T* x_pad, const T* w_t, const T* b, T* out, const Conv2dGeometry& g,
                                const ShiftedPlanes& sp, const int64_t* offset) {
  dw_forward_pixels(x_pad, w_t, b, out, g, sp, offset);
}
template <typename T>
CS231N_AVX2 void dw_forward_pixels_avx2(const T* x_pad, const T* w_t, const T* b, T* out, const Conv2dGeometry& g,
                                        const ShiftedPlanes& sp, const int64_t* offset) {
  dw_forward_pixels(x_pad, w_t, b, out, g, sp, offset);
}
template <typename T>
CS231N_AVX512 void dw_forward_pixels_avx512(const T* x_pad, const T* w_t, const T* b, T* out, const Conv2dGeometry& g,
                                            const ShiftedPlanes& sp, const int64_t* offset) {
  dw_forward_pixels(x_pad, w_t, b, out, g, sp, offset);
}
template <typename T, typename S>
void dw_weight_grad_pixels_baseline(const T* dy_t, const T* x_pad, S* dw_t, S* db, const Conv2dGeometry& g,
                                    const ShiftedPlanes& sp, const int64_t* offset) {
  dw_weight_grad_pixels(dy_t, x_pad, dw_t, db, g, sp, offset);
}
template <typename T, typename S>
CS231N_AVX2 void dw_weight_grad_pixels_avx2(const T* dy_t, const T* x_pad, S* dw_t, S* db, const Conv2dGeometry& g,
                                            const ShiftedPlanes& sp, const int64_t* offset) {
  dw_weight_grad_pixels(dy_t, x_pad, dw_t, db, g, sp, offset);
}
template <typename T, typename S>
CS231N_AVX512 void dw_weight_grad_pixels_avx512(const T* dy_t, const T* x_pad, S* dw_t, S* db, const Conv2dGeometry& g,
                                                const ShiftedPlanes& sp, const int64_t* offset) {
  dw_weight_grad_pixels(dy_t, x_pad, dw_t, db, g, sp, offset);
}

// W [C, 1, kH, kW] as [taps][C].
template <typename T>
std::vector<T> taps_by_channel(const T* w, const Conv2dGeometry& g) {
  std::vector<T> w_t(g.taps() * g.c);
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t t = 0; t < g.taps(); ++t) w_t[t * g.c + c] = w[c * g.taps() + t];
  }
  return w_t;
}

// W [C, 1, kH, kW] as [taps][C] for the NHWC kernels reading T: bfloat16's filters (float32) in
// bf16_pair_lanes' order.
template <typename T, typename S>
std::vector<S> channel_taps(const S* w, const Conv2dGeometry& g) {
  std::vector<S> w_t = taps_by_channel(w, g);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const std::vector<int64_t> order = bf16_pair_lanes(g.c);
    const std::vector<S> w_c = w_t;
    for (int64_t t = 0; t < g.taps(); ++t) {
      for (int64_t j = 0; j < g.c; ++j) w_t[t * g.c + j] = w_c[t * g.c + order[j]];
    }
  }
  return w_t;
}

// At batch 1 a sample a thread leaves the other threads idle. An NCHW sample's channels [c0, c1) lie
// together (x, y, dY and d_x planes; W's and d_W's rows), so a slice of channels is a depthwise layer of
// its own: f(c0, sub) runs each slice, in parallel, sub being g with its c1 - c0 channels, whole vectors of
// 16 channels a slice. Returns false, having run nothing, where the layer does not split: NHWC, more than
// one sample, one thread, or too few outputs to share.
constexpr int64_t kSliceChannels = 16;
constexpr int64_t kMinSlicedOutputs = int64_t(1) << 14;
template <typename F>
bool depthwise_by_channel_slices(const Conv2dGeometry& g, bool planes, const F& f) {
  const int64_t threads = at::get_num_threads(), units = (g.c + kSliceChannels - 1) / kSliceChannels;
  if (!planes || g.n != 1 || threads < 2 || units < 2 || g.c * g.col_cols() < kMinSlicedOutputs) return false;
  const int64_t slices = std::min(threads, units);
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t c0 = chunk_begin(s, slices, units) * kSliceChannels;
      Conv2dGeometry sub = g;
      sub.c = sub.f = sub.groups = std::min(g.c, chunk_begin(s + 1, slices, units) * kSliceChannels) - c0;
      f(c0, sub);
    }
  });
  return true;
}

// An NHWC layer read where it lies (dw_forward_nhwc), up to kMaxDepthwiseTaps taps; T float32, float64, or
// bfloat16 with float32 filters and bias (Bf16Pairs): the bfloat16 forward, channels_last, of cpu/conv2d.cpp.
inline bool depthwise_forward_in_place(const Conv2dGeometry& g) {
  return depthwise_channels_last_direct(g) && g.taps() <= kMaxDepthwiseTaps;
}
template <typename T, typename S>
void depthwise_forward_nhwc(const T* x, const S* w, const S* b, T* y, const Conv2dGeometry& g) {
  const std::vector<S> w_t = channel_taps<T>(w, g);
  std::vector<S> b_lanes;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // the bias in the pairs' order too (Bf16Pairs)
    if (b) {
      for (const int64_t c : bf16_pair_lanes(g.c)) b_lanes.push_back(b[c]);
      b = b_lanes.data();
    }
  }
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.c * g.col_cols();
  const cpu::Isa isa = cpu::cpu_isa();
  const SampleBands split(g.n, g.oh);  // at batch 1, a sample's rows in bands among the threads
  at::parallel_for(0, split.chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      int64_t n0, n1, r0, r1;
      split.of(chunk, &n0, &n1, &r0, &r1);
      for (int64_t n = n0; n < n1; ++n) {
        const T* x_n = x + n * in_sample;
        T* y_n = y + n * out_sample;
        if (isa == cpu::Isa::kAvx512) {
          dw_forward_nhwc_avx512(x_n, r0, r1, w_t.data(), b, y_n, g);
        } else if (isa == cpu::Isa::kAvx2) {
          dw_forward_nhwc_avx2(x_n, r0, r1, w_t.data(), b, y_n, g);
        } else {
          dw_forward_nhwc_baseline(x_n, r0, r1, w_t.data(), b, y_n, g);
        }
      }
    }
  });
}

template <typename T>
void depthwise_forward_by_samples(const T* x, const T* w, const T* b, T* y, const Conv2dGeometry& g, bool planes) {
  if (!planes && g.taps() <= kMaxDepthwiseTaps) return depthwise_forward_nhwc(x, w, b, y, g);
  const ShiftedPlanes sp = shifted_planes(g);
  const std::vector<T> w_t = taps_by_channel(w, g);
  const std::vector<int64_t> offset = depthwise_tap_offsets(g, sp);
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.c * g.col_cols();
  const cpu::Isa isa = cpu::cpu_isa();
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.hp * sp.wp * g.c);
    T* out = planes ? cpu::thread_scratch<T>(cpu::Scratch::kOut, out_sample) : nullptr;
    for (int64_t n = n0; n < n1; ++n) {
      if (planes) {
        pad_pixels_from_planes(x + n * in_sample, g, sp, x_pad);
      } else {
        pad_pixels(x + n * in_sample, g, sp, x_pad);
        out = y + n * out_sample;  // NHWC's y is [oH*oW][C]
      }
      if (isa == cpu::Isa::kAvx512) {
        dw_forward_pixels_avx512(x_pad, w_t.data(), b, out, g, sp, offset.data());
      } else if (isa == cpu::Isa::kAvx2) {
        dw_forward_pixels_avx2(x_pad, w_t.data(), b, out, g, sp, offset.data());
      } else {
        dw_forward_pixels_baseline(x_pad, w_t.data(), b, out, g, sp, offset.data());
      }
      if (planes) cpu::transpose_matrix(out, g.c, g.col_cols(), g.c, y + n * out_sample, g.col_cols());  // [C][oH*oW]
    }
  });
}

// The forward a sample a thread, or at batch 1 (NCHW) a slice of channels a thread.
template <typename T>
void depthwise_forward_pixels(const T* x, const T* w, const T* b, T* y, const Conv2dGeometry& g, bool planes = true) {
  const int64_t plane_in = g.h * g.w, plane_out = g.col_cols(), taps = g.taps();
  const bool sliced = depthwise_by_channel_slices(g, planes, [&](int64_t c0, const Conv2dGeometry& sub) {
    depthwise_forward_by_samples(x + c0 * plane_in, w + c0 * taps, b ? b + c0 : nullptr, y + c0 * plane_out, sub,
                                 planes);
  });
  if (!sliced) depthwise_forward_by_samples(x, w, b, y, g, planes);
}

// One input pixel's d_x, every channel: the sum over its (weight, dY) pairs (offsets in w_t [taps][C] and
// in the sample's dY). Q > 0 fixes the count of pairs (1, 2 or 4 at stride 2 with a 3x3 filter), so that
// the loop over the channels runs without a data-dependent inner loop: with the count read per vector of
// channels, its exit branch mispredicted at every change of parity, 2.2x oneDNN's time.
template <int Q, typename T>
CS231N_INLINE void depthwise_input_grad_pixel(const T* w_t, const T* dy, const int64_t* __restrict__ at_w,
                                              const int64_t* __restrict__ at_dy, int pairs, T* out, int64_t C) {
  using V = ChannelVectors<T>;
  using Vec = typename V::Vec;
  const int count = Q > 0 ? Q : pairs;
  const int64_t whole = C / V::kLanes * V::kLanes;
  for (int64_t c = 0; c < whole; c += V::kLanes) {
    Vec acc = {};
#pragma GCC unroll 4
    for (int q = 0; q < count; ++q) acc += V::at(w_t + at_w[q] + c) * V::at(dy + at_dy[q] + c);
    V::at(out + c) = acc;
  }
  for (int64_t c = whole; c < C; ++c) {  // the channels past the vectors
    T acc = T(0);
    for (int q = 0; q < count; ++q) acc += w_t[at_w[q] + c] * dy[at_dy[q] + c];
    out[c] = acc;
  }
}

// The same in bfloat16 (Bf16Pairs; w_t float32 in bf16_pair_lanes' order).
template <int Q, int kWords>
CS231N_INLINE void depthwise_input_grad_bf16(const float* w_t, const c10::BFloat16* dy,
                                             const int64_t* __restrict__ at_w, const int64_t* __restrict__ at_dy,
                                             int pairs, c10::BFloat16* out, int64_t c) {
  using B = Bf16Pairs<kWords>;
  using Floats = typename B::Floats;
  const int count = Q > 0 ? Q : pairs;
  Floats even = {}, odd = {};
#pragma GCC unroll 4
  for (int q = 0; q < count; ++q) {
    Floats d_even, d_odd;
    B::load(dy + at_dy[q] + c, d_even, d_odd);
    even += B::at(w_t + at_w[q] + c) * d_even;
    odd += B::at(w_t + at_w[q] + c + kWords) * d_odd;
  }
  B::store(out + c, even, odd);
}
template <int Q>
CS231N_INLINE void depthwise_input_grad_pixel(const float* w_t, const c10::BFloat16* dy,
                                              const int64_t* __restrict__ at_w, const int64_t* __restrict__ at_dy,
                                              int pairs, c10::BFloat16* out, int64_t C) {
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) depthwise_input_grad_bf16<Q, 16>(w_t, dy, at_w, at_dy, pairs, out, c);
  if (c + 16 <= C) depthwise_input_grad_bf16<Q, 8>(w_t, dy, at_w, at_dy, pairs, out, c), c += 16;
  const int count = Q > 0 ? Q : pairs;
  for (; c < C; ++c) {  // the channels past the vectors
    float acc = 0.0f;
    for (int q = 0; q < count; ++q) acc += w_t[at_w[q] + c] * static_cast<float>(dy[at_dy[q] + c]);
    out[c] = static_cast<c10::BFloat16>(acc);
  }
}

// d_x of a depthwise layer in NHWC as a gather: each input pixel sums the taps that reach it,
//     d_x[i_h, i_w, c] = Σ W[c, t_h, t_w] · dY[o_h, o_w, c]   over i_h + pH - t_h·dH = o_h·sH, 0 <= o_h < oH
// (and the same along the width: conv_out_index). Which (tap, output) pairs reach a row depends on the
// row alone, so they are listed once per row and per column (InputGradReaches): at stride 2 a pixel sums
// 1, 2 or 4 taps. The scatter it replaces added each output's nine taps into a padded d_x, every update
// queued behind a neighbouring output's.
struct InputGradReaches {
  struct Reach {
    int64_t t, o;  // a tap and the output it comes from
  };
  std::vector<std::vector<Reach>> rows, cols;

  explicit InputGradReaches(const Conv2dGeometry& g)
      : rows(list(g.h, g.oh, g.kh, g.sh, g.ph, g.dh)), cols(list(g.w, g.ow, g.kw, g.sw, g.pw, g.dw)) {}

  static std::vector<std::vector<Reach>> list(int64_t in, int64_t out, int64_t k, int64_t s, int64_t p, int64_t d) {
    std::vector<std::vector<Reach>> r(in);
    for (int64_t i = 0; i < in; ++i) {
      for (int64_t t = 0; t < k; ++t) {
        int64_t o;
        if (conv_out_index(i, t, s, p, d, out, &o)) r[i].push_back({t, o});
      }
    }
    return r;
  }
};

// Input rows [i0, i1) of one sample's d_x (dx_n [H][W][C]) from its dY (dy_n [oH*oW][C]) and w_t [taps][C];
// at_w and at_dy hold g.taps() offsets each.
template <typename T, typename S>
CS231N_INLINE void depthwise_input_grad_rows(const T* dy_n, const S* w_t, T* dx_n, const Conv2dGeometry& g,
                                             const InputGradReaches& r, int64_t i0, int64_t i1, int64_t* at_w,
                                             int64_t* at_dy) {
  const int64_t C = g.c;
  for (int64_t i_h = i0; i_h < i1; ++i_h) {
    T* dx_row = dx_n + i_h * g.w * C;
    for (int64_t i_w = 0; i_w < g.w; ++i_w) {
      int pairs = 0;
      for (const InputGradReaches::Reach& rh : r.rows[i_h]) {
        for (const InputGradReaches::Reach& rw : r.cols[i_w]) {
          at_w[pairs] = (rh.t * g.kw + rw.t) * C;
          at_dy[pairs++] = (rh.o * g.ow + rw.o) * C;
        }
      }
      T* out = dx_row + i_w * C;
      switch (pairs) {
        case 1:
          depthwise_input_grad_pixel<1>(w_t, dy_n, at_w, at_dy, pairs, out, C);
          break;
        case 2:
          depthwise_input_grad_pixel<2>(w_t, dy_n, at_w, at_dy, pairs, out, C);
          break;
        case 4:
          depthwise_input_grad_pixel<4>(w_t, dy_n, at_w, at_dy, pairs, out, C);
          break;
        default:
          depthwise_input_grad_pixel<0>(w_t, dy_n, at_w, at_dy, pairs, out, C);
      }
    }
  }
}

// A strided NHWC layer's d_x, a row of a sample a task (stride 1 takes the forward with flipped filters).
// T float32, float64, or bfloat16 with float32 filters (Bf16Pairs).
template <typename T, typename S>
void depthwise_input_grad_nhwc(const T* dy, const S* w, T* dx, const Conv2dGeometry& g) {
  const InputGradReaches reaches(g);
  const std::vector<S> w_t = channel_taps<T>(w, g);  // [taps][C]
  const int64_t in_sample = g.h * g.w * g.c, out_sample = g.col_cols() * g.c;
  at::parallel_for(0, g.n * g.h, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> at_w(g.taps()), at_dy(g.taps());  // a pixel's (weight, dY) offsets, one pair per tap
    cpu::with_best_isa([&] {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / g.h, i_h = item % g.h;
        depthwise_input_grad_rows(dy + n * out_sample, w_t.data(), dx + n * in_sample, g, reaches, i_h, i_h + 1,
                                  at_w.data(), at_dy.data());
      }
    });
  });
}

// T: float32 and float64; or bfloat16 with d_W and d_b in float32 (S), NHWC and up to kMaxDepthwiseTaps
// taps (Bf16Pairs' kernels), and no d_x (the caller's: depthwise_forward_nhwc or depthwise_input_grad_nhwc).
template <typename T, typename S = T>
void depthwise_backward_by_samples(const T* dy, const T* x, const T* w, T* dx, S* dw, S* db, const Conv2dGeometry& g,
                                   bool planes) {
  const ShiftedPlanes sp = shifted_planes(g);
  const std::vector<T> w_t = dx ? taps_by_channel(w, g) : std::vector<T>();
  const std::vector<int64_t> offset = depthwise_tap_offsets(g, sp);
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.c * g.col_cols();
  const bool in_place = !planes && !dx && depthwise_weight_grad_in_place(g);  // NHWC d_W without the padded copy
  // Chunks of samples; in place, a batch smaller than the threads also splits each sample's output rows
  // into bands (NHWC's channels do not lie together, as depthwise_by_channel_slices wants).
  const SampleBands split(g.n, in_place ? g.oh : 1);
  const int64_t chunks = split.chunks;
  // each chunk's d_W [taps][C] and d_b [C], summed in chunk order below
  std::vector<S> dw_part(dw ? chunks * g.taps() * g.c : 0, S(0)), db_part(db ? chunks * g.c : 0, S(0));
  const cpu::Isa isa = cpu::cpu_isa();
  const InputGradReaches reaches(dx ? g : Conv2dGeometry{});
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    T* x_pad = dw && !in_place ? cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.hp * sp.wp * g.c) : nullptr;
    // d_x gathered into [H*W][C] (NCHW's transposed afterwards); the scatter into a padded d_x it replaced
    // queued each pixel's updates behind its neighbours': (32, 576, 14, 14) forward and d_x 10.5 -> 8.9 ms
    // (Zen 4)
    T* dx_pixels = dx && planes ? cpu::thread_scratch<T>(cpu::Scratch::kOut, in_sample) : nullptr;
    std::vector<int64_t> at_w(dx ? g.taps() : 0), at_dy(dx ? g.taps() : 0);
    T* dy_scratch = planes ? cpu::thread_scratch<T>(cpu::Scratch::kGrad, out_sample) : nullptr;
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      S* dw_c = dw ? dw_part.data() + chunk * g.taps() * g.c : nullptr;
      S* db_c = db ? db_part.data() + chunk * g.c : nullptr;
      int64_t n0, n1, r0, r1;  // rows [r0, r1) in place only
      split.of(chunk, &n0, &n1, &r0, &r1);
      for (int64_t n = n0; n < n1; ++n) {
        const T* dy_t = dy + n * out_sample;   // [oH*oW][C]: NHWC's dY as it lies
        if constexpr (std::is_same_v<T, S>) {  // (bfloat16: NHWC only)
          if (planes) {
            cpu::transpose_matrix(dy_t, g.col_cols(), g.c, g.col_cols(), dy_scratch, g.c);
            dy_t = dy_scratch;
          }
          if (dw && planes) pad_pixels_from_planes(x + n * in_sample, g, sp, x_pad);
        }
        if (in_place) {
          const T* x_n = x + n * in_sample;
          if (isa == cpu::Isa::kAvx512) {
            dw_weight_grad_nhwc_avx512(dy_t, x_n, r0, r1, dw_c, db_c, g);
          } else if (isa == cpu::Isa::kAvx2) {
            dw_weight_grad_nhwc_avx2(dy_t, x_n, r0, r1, dw_c, db_c, g);
          } else {
            dw_weight_grad_nhwc_baseline(dy_t, x_n, r0, r1, dw_c, db_c, g);
          }
          continue;
        }
        if (dw && !planes) pad_pixels(x + n * in_sample, g, sp, x_pad);
        if (dw || db) {
          if (isa == cpu::Isa::kAvx512) {
            dw_weight_grad_pixels_avx512(dy_t, x_pad, dw_c, db_c, g, sp, offset.data());
          } else if (isa == cpu::Isa::kAvx2) {
            dw_weight_grad_pixels_avx2(dy_t, x_pad, dw_c, db_c, g, sp, offset.data());
          } else {
            dw_weight_grad_pixels_baseline(dy_t, x_pad, dw_c, db_c, g, sp, offset.data());
          }
        }
        if constexpr (std::is_same_v<T, S>) {
          if (dx) {
            T* out = planes ? dx_pixels : dx + n * in_sample;
            cpu::with_best_isa([&] {
              depthwise_input_grad_rows(dy_t, w_t.data(), out, g, reaches, 0, g.h, at_w.data(), at_dy.data());
            });
            if (planes) cpu::transpose_matrix(out, g.c, g.h * g.w, g.c, dx + n * in_sample, g.h * g.w);  // [C][H*W]
          }
        }
      }
    }
  });
  std::vector<int64_t> lane(g.c);  // channel c's place in the rows of sums (bfloat16: the pairs' order)
  for (int64_t c = 0; c < g.c; ++c) lane[c] = c;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const std::vector<int64_t> order = bf16_pair_lanes(g.c);
    for (int64_t j = 0; j < g.c; ++j) lane[order[j]] = j;
  }
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t t = 0; dw && t < g.taps(); ++t) {
      S sum = S(0);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += dw_part[(chunk * g.taps() + t) * g.c + lane[c]];
      dw[c * g.taps() + t] = sum;
    }
    if (db) {
      S sum = S(0);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += db_part[chunk * g.c + lane[c]];
      db[c] = sum;
    }
  }
}

// The backward a chunk of samples a thread, or at batch 1 (NCHW) a slice of channels a thread: every
// channel's d_W and d_b then has one owner, and no partial sums to add.
template <typename T>
void depthwise_backward_pixels(const T* dy, const T* x, const T* w, T* dx, T* dw, T* db, const Conv2dGeometry& g,
                               bool planes = true) {
  const int64_t plane_in = g.h * g.w, plane_out = g.col_cols(), taps = g.taps();
  const bool sliced = depthwise_by_channel_slices(g, planes, [&](int64_t c0, const Conv2dGeometry& sub) {
    depthwise_backward_by_samples(dy + c0 * plane_out, x + c0 * plane_in, w + c0 * taps,
                                  dx ? dx + c0 * plane_in : nullptr, dw ? dw + c0 * taps : nullptr,
                                  db ? db + c0 : nullptr, sub, planes);
  });
  if (!sliced) depthwise_backward_by_samples(dy, x, w, dx, dw, db, g, planes);
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
