// The CPU convolution: shifted planes (stride 1, and strided through the stride's phases).
// Part of the CPU convolution (cpu/conv2d.cpp, which routes each layer; docs/conv2d.md has the table).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/conv2d.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"

namespace torch_cs231n {
namespace conv2d_cpu {

// ------------------------------------------------------------------------------------ shifted planes
// With stride 1, pad each input plane once, to Hp x Wp, and index the outputs with the padded row pitch
// Wp: output j = o_h*Wp + o_w (o_w < Wp, the columns past oW thrown away). Then tap (t_h, t_w) of
// channel c reads, for every output, the padded plane shifted by one offset:
//     col[(c, t_h, t_w), j] = x_pad[c*Hp*Wp + t_h*dH*Wp + t_w*dW + j]
// so each row of the GEMM's B is a contiguous run of x_pad, which the micro-kernel reads in place
// (cpu::gemm_rows_b): no im2col, no packing, no padding tests. The price is the thrown-away columns,
// (Wp - oW) of every Wp, and the padded copy.
//
// With stride s, the padded plane is first split into its s_h x s_w phases (the rows ≡ a mod s_h and the
// columns ≡ b mod s_w), each Hq x Wq = ceil(Hp/s_h) x ceil(Wp/s_w). Input (o*s + t*d) of output o is
// then element o + floor(t*d/s) of phase (t*d mod s): again a shift of one plane, now in the pitch Wq:
//     col[(c, t_h, t_w), j] = x_phases[c, (t_h*dH) % sH, (t_w*dW) % sW][j + (t_h*dH/sH)*Wq + t_w*dW/sW]
// With s = 1 there is one phase, the padded plane itself.
struct ShiftedPlanes {
  int64_t hp, wp;                                      // the padded plane
  int64_t sh, sw;                                      // phases per axis (the stride)
  int64_t hq, wq;                                      // one phase; wq is the outputs' row pitch
  int64_t cols;                                        // GEMM columns per sample: (oH-1)*Wq + oW
  int64_t plane() const { return sh * sw * hq * wq; }  // one channel's phases
};

inline ShiftedPlanes shifted_planes(const Conv2dGeometry& g) {
  const int64_t hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw;
  const int64_t hq = (hp + g.sh - 1) / g.sh, wq = (wp + g.sw - 1) / g.sw;
  return {hp, wp, g.sh, g.sw, hq, wq, (g.oh - 1) * wq + g.ow};
}

// Worth it when the thrown-away columns are few: at least 3/4 of the GEMM's columns are outputs, and
// the output rows are long enough to amortise the padded copy (the tiny images go through im2col).
inline bool use_shifted_planes(const Conv2dGeometry& g) {
  // one sample per GEMM: not for small images (chunk_count)
  if (g.col_cols() < kMinPixelsPerSample) return false;
  const ShiftedPlanes sp = shifted_planes(g);
  return g.ow >= 8 && 4 * g.col_cols() >= 3 * sp.cols;
}

// x_pad[c] = the phases of the plane x[c] with pH rows and pW columns of zeros around it (the padded
// plane itself when the stride is 1); `x_pad` holds C * sp.plane().
template <typename T>
void pad_planes(const T* x, const Conv2dGeometry& g, const ShiftedPlanes& sp, T* x_pad) {
  if (sp.sh == 1 && sp.sw == 1) {
    for (int64_t c = 0; c < g.c; ++c) {
      T* plane = x_pad + c * sp.hp * sp.wp;
      std::fill(plane, plane + g.ph * sp.wp, T(0));
      for (int64_t i = 0; i < g.h; ++i) {
        T* row = plane + (g.ph + i) * sp.wp;
        std::fill(row, row + g.pw, T(0));
        std::copy(x + (c * g.h + i) * g.w, x + (c * g.h + i + 1) * g.w, row + g.pw);
        std::fill(row + g.pw + g.w, row + sp.wp, T(0));
      }
      std::fill(plane + (g.ph + g.h) * sp.wp, plane + sp.hp * sp.wp, T(0));
    }
    return;
  }
  std::fill(x_pad, x_pad + g.c * sp.plane(), T(0));
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t i = 0; i < g.h; ++i) {
      const int64_t pi = i + g.ph;  // padded row: phase pi % sH, row pi / sH of it
      const T* x_row = x + (c * g.h + i) * g.w;
      for (int64_t b = 0; b < sp.sw; ++b) {  // phase column b: padded columns b, b + sW, ...
        T* dst = x_pad + (((c * sp.sh + pi % sp.sh) * sp.sw + b) * sp.hq + pi / sp.sh) * sp.wq;
        // padded column q*sW + b is input column q*sW + b - pW, for q from the first one >= 0
        const int64_t first = b >= g.pw ? 0 : (g.pw - b + sp.sw - 1) / sp.sw;
        for (int64_t q = first, j = q * sp.sw + b - g.pw; q < sp.wq && j < g.w; ++q, j += sp.sw) dst[q] = x_row[j];
      }
    }
  }
}

// Where padded position (pi, pj) of one channel lies in its phases: pixel (pi / sH, pj / sW) of phase
// (pi % sH, pj % sW), phases one after the other. The layout of x_pad here, and of the NHWC kernels' pixels.
inline int64_t phase_pixel(const ShiftedPlanes& sp, int64_t pi, int64_t pj) {
  const int64_t phase = (pi % sp.sh) * sp.sw + pj % sp.sw;
  return (phase * sp.hq + pi / sp.sh) * sp.wq + pj / sp.sw;
}

// The offset of row r = (c, t_h, t_w) of B in x_pad (c = 0: the tap's offset in pixels).
inline int64_t shifted_offset(const Conv2dGeometry& g, const ShiftedPlanes& sp, int64_t r) {
  const int64_t tw = r % g.kw, th = (r / g.kw) % g.kh, c = r / g.taps();
  return c * sp.plane() + phase_pixel(sp, th * g.dh, tw * g.dw);  // the tap's offset in the padded plane
}

// Where the planes are the tensors themselves: without padding and with stride 1 x_pad would be x, and
// with one column a tap (kW = 1) the pitch Wq is oW, so that Y' (the forward's) and dY' (d_W's) are y and
// dY as they lie. A 1x1 layer's products then copy nothing (the copies were 40% of a batch-1
// (1, 64, 56, 56) -> 256 layer's forward).
struct ShiftedInPlace {
  bool x, y;
  ShiftedInPlace(const Conv2dGeometry& g, const ShiftedPlanes& sp)
      : x(g.ph == 0 && g.pw == 0 && sp.sh == 1 && sp.sw == 1), y(sp.cols == g.col_cols()) {}
};

// The forward by shifted planes, one sample at a time: Y'_g (Fg x cols) = W_g · B_g + b_g, in pitch Wq,
// then the oW real columns of each row copied to y.
template <typename T>
void conv_forward_shifted(const T* x, const T* w, const T* b, T* y, const Conv2dGeometry& g) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps();
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * g.col_cols();
  const int64_t chunks = chunk_count(g);
  std::vector<int64_t> offsets(g.col_rows());  // B's rows in x_pad, all groups
  for (int64_t r = 0; r < g.col_rows(); ++r) offsets[r] = shifted_offset(g, sp, r);
  const ShiftedInPlace in_place(g, sp);
  for_chunks(chunks, [&](int64_t cb, int64_t ce) {
    T* x_pad = in_place.x ? nullptr : cpu::thread_scratch<T>(cpu::Scratch::kPadded, g.c * sp.plane());
    T* out = in_place.y ? nullptr : cpu::thread_scratch<T>(cpu::Scratch::kOut, g.f * sp.cols);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        if (!in_place.x) pad_planes(x + n * in_sample, g, sp, x_pad);
        const T* b_n = in_place.x ? x + n * in_sample : x_pad;
        T* y_n = y + n * out_sample;
        T* out_n = in_place.y ? y_n : out;
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          cpu::GemmEpilogue<T> ep;
          ep.row_bias = b ? b + grp * fg : nullptr;
          cpu::gemm_rows_b<T>(fg, sp.cols, kg, {w + grp * fg * kg, kg, 1}, b_n, offsets.data() + grp * kg,
                              out_n + grp * fg * sp.cols, sp.cols, ep);
        }
        if (in_place.y) continue;
        for (int64_t f = 0; f < g.f; ++f) {
          for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
            const T* src = out + f * sp.cols + o_h * sp.wq;
            std::copy(src, src + g.ow, y_n + (f * g.oh + o_h) * g.ow);
          }
        }
      }
    }
  });
}

// d_W by shifted planes, per sample and group:
//     d_W_g (Fg x Cg*kH*kW) += dY'_g (Fg x cols) · B_gᵀ
// dY' is dY in the pitch Wq, zero in the thrown-away columns (so they add nothing), and the
// columns of B_gᵀ are the runs of x_pad that the forward's rows of B are (pack_transposed_rows).
template <typename T>
void conv_weight_grad_shifted(const T* dy, const T* x, T* dw, const Conv2dGeometry& g) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps();
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * g.col_cols();
  const int64_t chunks = chunk_count(g);
  const ChunkPartials<T> partial(chunks, g.f * kg);
  const ShiftedInPlace in_place(g, sp);
  for_chunks(chunks, [&](int64_t cb, int64_t ce) {
    T* x_pad = in_place.x ? nullptr : cpu::thread_scratch<T>(cpu::Scratch::kPadded, g.c * sp.plane());
    T* dy_pitch = in_place.y ? nullptr : cpu::thread_scratch<T>(cpu::Scratch::kGrad, g.f * sp.cols);
    if (dy_pitch) std::fill(dy_pitch, dy_pitch + g.f * sp.cols, T(0));  // the gaps stay zero
    std::vector<const T*> runs(kg);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        if (x_pad) pad_planes(x + n * in_sample, g, sp, x_pad);
        const T* x_n = x_pad ? x_pad : x + n * in_sample;
        for (int64_t f = 0; dy_pitch && f < g.f; ++f) {  // the gaps stay zero from the allocation
          for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
            const T* src = dy + n * out_sample + (f * g.oh + o_h) * g.ow;
            std::copy(src, src + g.ow, dy_pitch + f * sp.cols + o_h * sp.wq);
          }
        }
        const T* dy_n = dy_pitch ? dy_pitch : dy + n * out_sample;
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          for (int64_t r = 0; r < kg; ++r) runs[r] = x_n + shifted_offset(g, sp, grp * kg + r);
          const cpu::PackB<T> pack = [&runs](int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, T* dst) {
            cpu::pack_transposed_rows(runs.data() + j0, p0, kc, nc, nr, dst);
          };
          cpu::GemmEpilogue<T> ep;
          ep.accumulate = n > chunk_begin(chunk, chunks, g.n);
          cpu::gemm<T>(fg, kg, sp.cols, {dy_n + grp * fg * sp.cols, sp.cols, 1}, pack,
                       partial.of(chunk) + grp * fg * kg, kg, ep);
        }
      }
    }
  });
  partial.sum_into(chunks, dw);
}

// ------------------------------------------------------------------------------- d_x by the phases
// d_x of a strided layer (dilation 1) splits into the stride's phases too. Along one axis, input i takes
// the taps t with i + p = o*s + t. The inputs of phase a = (i + p) mod s take only the taps t = a + j*s
// (j < k_a = ceil((k - a) / s)), and then o = u - j where u = (i + p - a) / s:
//     dx[u*s + a - p] = Σ_j dY[u - j] · W[a + j*s]
// the transposed convolution, stride 1, of dY with the phase's taps: a forward on dY with their transposed
// filters and padding k_a - 1, whose output v is u (v < oH + k_a - 1). Every input is in one phase, so
// each gradient is one sum; an input no window reaches stays 0.
struct InputPhase {
  int64_t a, b;            // the phase, along the height and the width
  Conv2dGeometry sub, t;   // its taps as a layer of their own, and their transposed convolution
  int64_t u0, u1, v0, v1;  // the outputs of t whose inputs u*s + a - p lie in the image, as ranges
};

// Along one axis: the outputs u in [0, out) of phase a whose input u*s + a - p lies in [0, in), as [u0, u1).
inline void phase_outputs(int64_t in, int64_t out, int64_t s, int64_t p, int64_t a, int64_t* u0, int64_t* u1) {
  *u0 = p > a ? (p - a + s - 1) / s : 0;
  const int64_t last = in - 1 + p - a;  // u*s <= last
  *u1 = std::min(out, last >= 0 ? last / s + 1 : 0);
}

// The phases that reach an input: those of the rows that reach one times those of the columns. The first
// has the most taps along each axis (k_a falls as a grows), so its t pads dY the most.
inline std::vector<InputPhase> input_phases(const Conv2dGeometry& g) {
  std::vector<InputPhase> phases;
  for (int64_t a = 0; a < std::min(g.sh, g.kh); ++a) {
    for (int64_t b = 0; b < std::min(g.sw, g.kw); ++b) {
      InputPhase phase{a, b, g, g, 0, 0, 0, 0};
      phase.sub.kh = (g.kh - a + g.sh - 1) / g.sh;
      phase.sub.kw = (g.kw - b + g.sw - 1) / g.sw;
      Conv2dGeometry& t = phase.t;
      t = phase.sub;
      t.c = g.f, t.h = g.oh, t.w = g.ow, t.f = g.c;
      t.sh = t.sw = 1, t.ph = phase.sub.kh - 1, t.pw = phase.sub.kw - 1;
      t.oh = g.oh + phase.sub.kh - 1, t.ow = g.ow + phase.sub.kw - 1;
      phase_outputs(g.h, t.oh, g.sh, g.ph, a, &phase.u0, &phase.u1);
      phase_outputs(g.w, t.ow, g.sw, g.pw, b, &phase.v0, &phase.v1);
      if (phase.u1 > phase.u0 && phase.v1 > phase.v0) phases.push_back(phase);
    }
  }
  return phases;
}

// d_x by phases over dY padded into pixels (conv_input_grad_phases, conv_input_grad_bf16_phases). dY is
// padded once, by the first phase's padding, the most of any phase (a phase of fewer taps reads it from
// further in); each phase's outputs that land in the image, [u0, u1) x [v0, v1), are the rows of one
// product over it, and their results go to the phase's pixels of d_x: every pixel once, the ones no
// window reaches (a stride over the kernel, a remainder at the end) zero.
struct PhasePixels {
  std::vector<InputPhase> phases;
  Conv2dGeometry t0;                       // the first phase's transposed convolution: dY_pad's padding
  ShiftedPlanes sp;                        // dY_pad (stride 1: the padded plane)
  std::vector<std::vector<int64_t>> rows;  // phase q's rows: their first tap's pixel in dY_pad
  std::vector<std::vector<int64_t>> taps;  // phase q's taps: their shifts in dY_pad, in pixels
  std::vector<bool> row_hit, col_hit;      // the image's rows and columns that some phase reaches
  bool all_hit;

  explicit PhasePixels(const Conv2dGeometry& g)
      : phases(input_phases(g)),
        t0(phases.front().t),
        sp(shifted_planes(t0)),
        rows(phases.size()),
        taps(phases.size()),
        row_hit(g.h, false),
        col_hit(g.w, false) {
    for (size_t q = 0; q < phases.size(); ++q) {
      const InputPhase& ph = phases[q];
      const int64_t dh = t0.ph - ph.t.ph, dw = t0.pw - ph.t.pw;  // where its padded dY starts in dY_pad
      for (int64_t u = ph.u0; u < ph.u1; ++u) {
        for (int64_t v = ph.v0; v < ph.v1; ++v) rows[q].push_back((u + dh) * sp.wp + v + dw);
        row_hit[u * g.sh + ph.a - g.ph] = true;
      }
      for (int64_t v = ph.v0; v < ph.v1; ++v) col_hit[v * g.sw + ph.b - g.pw] = true;
      for (int64_t th = 0; th < ph.t.kh; ++th) {
        for (int64_t tw = 0; tw < ph.t.kw; ++tw) taps[q].push_back(th * sp.wp + tw);
      }
    }
    all_hit = std::find(row_hit.begin(), row_hit.end(), false) == row_hit.end() &&
              std::find(col_hit.begin(), col_hit.end(), false) == col_hit.end();
  }

  // Sample s of a block of nb samples into its pixels dx_n [H*W x C], from the products `out`: phase
  // after phase, the block's rows of each ([rows x C] a sample). Output (u, v) of phase (a, b) is input
  // (u*sH + a - pH, v*sW + b - pW).
  template <typename T>
  void put(const T* out, int64_t nb, int64_t s, T* dx_n, const Conv2dGeometry& g) const {
    const int64_t C = g.c;
    if (!all_hit) {
      for (int64_t i = 0; i < g.h; ++i) {
        for (int64_t j = 0; j < g.w; ++j) {
          if (!row_hit[i] || !col_hit[j]) std::fill(dx_n + (i * g.w + j) * C, dx_n + (i * g.w + j + 1) * C, T(0));
        }
      }
    }
    for (size_t q = 0; q < phases.size(); ++q) {
      const InputPhase& ph = phases[q];
      const int64_t nv = ph.v1 - ph.v0, j0 = ph.v0 * g.sw + ph.b - g.pw, count = rows[q].size();
      const T* src = out + s * count * C;
      for (int64_t u = ph.u0; u < ph.u1; ++u) {
        T* dst = dx_n + ((u * g.sh + ph.a - g.ph) * g.w + j0) * C;
        for (int64_t v = 0; v < nv; ++v, src += C) std::copy(src, src + C, dst + v * g.sw * C);
      }
      out += nb * count * C;
    }
  }
};

// W's taps of each phase, (F, C, k_a, k_b): views of one tensor [F][taps][C] that holds each filter's
// taps phase after phase, channels innermost, so that a phase's taps lie evenly spaced, as in a whole
// channels_last weight: the pixel kernels pack them by runs of channels (a strided view of w's taps they
// would first copy). From a channels_last w the channels are copied by runs; from NCHW each filter's
// [C x taps] is transposed first (cpu::transpose_matrix). One pass, parallel over the filters.
template <typename T>
std::vector<at::Tensor> phase_filters(const at::Tensor& w, const std::vector<InputPhase>& phases) {
  const int64_t f = w.size(0), c = w.size(1), kh = w.size(2), kw = w.size(3);
  std::vector<int64_t> first{0};  // each phase's first tap in a filter's taps
  std::vector<int64_t> tap_of;    // w's tap (t_h*kW + t_w) of each of them: a + i*sH, b + j*sW
  for (const InputPhase& ph : phases) {
    first.push_back(first.back() + ph.sub.kh * ph.sub.kw);
    for (int64_t i = 0; i < ph.sub.kh; ++i) {
      for (int64_t j = 0; j < ph.sub.kw; ++j) tap_of.push_back((ph.a + i * ph.sub.sh) * kw + ph.b + j * ph.sub.sw);
    }
  }
  const int64_t taps = first.back();
  const bool nchw = w.is_contiguous();
  at::Tensor all = at::empty({f, taps * c}, w.options().memory_format(at::MemoryFormat::Contiguous));
  const T* src = w.const_data_ptr<T>();
  T* dst = all.mutable_data_ptr<T>();
  at::parallel_for(0, f, 1, [&](int64_t f0, int64_t f1) {
    T* by_tap = nchw ? cpu::thread_scratch<T>(cpu::Scratch::kTransposed, kh * kw * c) : nullptr;  // [taps][C]
    for (int64_t fi = f0; fi < f1; ++fi) {
      T* to = dst + fi * taps * c;
      if (nchw) {
        cpu::transpose_matrix(src + fi * c * kh * kw, kh * kw, c, kh * kw, by_tap, c);
        for (int64_t t = 0; t < taps; ++t) std::copy(by_tap + tap_of[t] * c, by_tap + (tap_of[t] + 1) * c, to + t * c);
        continue;
      }
      for (int64_t t = 0; t < taps; ++t) {
        const T* tap = src + fi * w.stride(0) + tap_of[t] / kw * w.stride(2) + tap_of[t] % kw * w.stride(3);
        if (w.stride(1) == 1) {  // channels_last: a run
          std::copy(tap, tap + c, to + t * c);
        } else {
          for (int64_t ci = 0; ci < c; ++ci) to[t * c + ci] = tap[ci * w.stride(1)];
        }
      }
    }
  });
  std::vector<at::Tensor> views;
  for (size_t q = 0; q < phases.size(); ++q) {
    const int64_t kb = phases[q].sub.kw;
    views.push_back(all.as_strided({f, c, phases[q].sub.kh, kb}, {taps * c, 1, kb * c, c}, first[q] * c));
  }
  return views;
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
