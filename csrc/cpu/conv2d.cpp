// Conv2d on the CPU: every dense layer is a GEMM (our own, cpu/gemm.h), fed in the way that copies least
// for its shape; depthwise layers have direct kernels. docs/conv2d.md derives the formulas and has the
// table of routes; in this file, in order:
//
//   im2col, col2im          strided layers: im2col written straight into the GEMM's panels; col2im
//   shifted planes          stride 1, NCHW: each row of col(x) is a run of the padded input, read in place
//   implicit GEMM           the NCHW forward of the other layers (and the choice between the two above)
//   backward                d_W from im2col panels; d_x by d_col + col2im, or as the transposed convolution
//   depthwise               plane kernels (large planes), 3x3 d_W with the tap sums in registers
//   channels_last (NHWC)    pixels as GEMM rows read in place, taps as segments (also NCHW layers with
//                           short rows, transposed in cache)
//   depthwise, small        channels innermost
//   small images            all samples' pixels as the rows of one GEMM
//   routing                 which of the above a layer takes (the table of docs/conv2d.md)
//   the ops                 checks, memory format, dispatch
//
// The index maps (which input pixel an output position and a filter tap read, and back) are those of
// common/conv2d.h, shared with the CUDA kernels.
//
// Work split. The batch is cut into one chunk per thread; each thread runs single-threaded GEMMs on its
// own samples. With one chunk (N = 1, tiny layers, small images), each GEMM splits its rows or columns
// among the threads instead. Buffers are per thread and bounded: they do not grow with N.
//
// Memory format: torch's rule (conv2d_memory_format): channels_last results when the input or the weight
// is channels_last, contiguous NCHW otherwise.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/conv2d.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"

namespace torch_cs231n {
namespace {

using cpu::cpu_has_avx2_fma;  // the depthwise loops come in a baseline and an AVX2+FMA version
// The body shared by both versions: always inlined, so that it is compiled with its caller's ISA.
#define CS231N_INLINE inline __attribute__((always_inline))

// Elements per parallel task for the memory-bound loops.
constexpr int64_t kGrain = 1 << 14;

// ---------------------------------------------------------------------------------- im2col, col2im
// The column matrix of a block of nb samples is [C*kH*kW, nb*oH*oW]: sample s fills the columns
// s*oH*oW .. (s+1)*oH*oW - 1, so one GEMM covers the whole block. It is never stored whole: the GEMM's
// packing (cpu/gemm.h, PackB) asks for pieces of it, which im2col_segment writes.
//
// Row r = (c, t_h, t_w), column q = (s, o_h, o_w):
//     col[r, q] = x[s, c, o_h*sH - pH + t_h*dH, o_w*sW - pW + t_w*dW]   (0 in the padding)
// Within an output row the valid o_w of the tap are one interval [lo, hi): copy it, zero the rest, with
// no test per element. `in_sample` is the distance between samples in x.
template <typename T>
void im2col_segment(const T* __restrict__ x, int64_t in_sample, const ConvGeometry& g, int64_t r, int64_t q0,
                    int64_t q1, T* __restrict__ dst) {
  const int64_t tw = r % g.kw, th = (r / g.kw) % g.kh, c = r / g.taps(), cols = g.col_cols();
  int64_t lo, hi;
  conv_valid_out_range(tw, g.sw, g.pw, g.dw, g.w, g.ow, &lo, &hi);
  const int64_t off = tw * g.dw - g.pw;  // i_w = o_w*sW + off
  // (s, o_h, o_w) of q0, then stepped along: no division per output row (they cost more than a
  // 14-wide row's copy).
  int64_t s = q0 / cols, o_h = (q0 % cols) / g.ow, w0 = q0 % g.ow;
  const T* x_plane = x + s * in_sample + c * g.h * g.w;
  for (int64_t q = q0; q < q1;) {
    const int64_t w1 = std::min(g.ow, w0 + (q1 - q));
    T* out = dst + (q - q0) - w0;  // out[o_w] is column (s, o_h, o_w)
    const int64_t i_h = conv_in_index(o_h, th, g.sh, g.ph, g.dh);
    const int64_t a = std::max(w0, lo), b = std::min(w1, hi);
    if (i_h < 0 || i_h >= g.h || a >= b) {
      std::fill(out + w0, out + w1, T(0));
    } else {
      const T* x_row = x_plane + i_h * g.w;
      std::fill(out + w0, out + a, T(0));
      if (g.sw == 1) {
        for (int64_t o_w = a; o_w < b; ++o_w) out[o_w] = x_row[o_w + off];
      } else {
        for (int64_t o_w = a; o_w < b; ++o_w) out[o_w] = x_row[o_w * g.sw + off];
      }
      std::fill(out + b, out + w1, T(0));
    }
    q += w1 - w0;
    w0 = 0;
    if (++o_h == g.oh) {
      o_h = 0;
      x_plane += in_sample;
    }
  }
}

// A scratch row of the calling thread, at least `size` elements (the segments above, before they are
// scattered into the GEMM's panels; at most a GEMM block long).
template <typename T>
T* scratch_row(int64_t size) {
  thread_local std::vector<T> row;
  if (static_cast<int64_t>(row.size()) < size) row.resize(size);
  return row.data();
}

// The forward's B = col_g (rows r0 .. of group g's columns, columns = the block's pixels), packed.
template <typename T>
cpu::PackB<T> pack_columns(const T* x, int64_t in_sample, const ConvGeometry& g, int64_t r0) {
  return [=, &g](int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, T* dst) {
    T* row = scratch_row<T>(nc);
    for (int64_t p = 0; p < kc; ++p) {
      im2col_segment(x, in_sample, g, r0 + p0 + p, j0, j0 + nc, row);
      cpu::scatter_row_to_slivers(row, p, kc, nc, nr, dst);
    }
  };
}

// d_W's B = col_gᵀ (rows = the block's pixels, columns = rows r0 .. of group g's columns), packed: each
// column of the block is one segment of a row of col, written down its sliver.
template <typename T>
cpu::PackB<T> pack_columns_transposed(const T* x, int64_t in_sample, const ConvGeometry& g, int64_t r0) {
  return [=, &g](int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, T* dst) {
    T* row = scratch_row<T>(kc);
    for (int64_t j = 0; j < nc; ++j) {
      im2col_segment(x, in_sample, g, r0 + j0 + j, p0, p0 + kc, row);
      T* out = dst + (j / nr) * kc * nr + j % nr;
      for (int64_t p = 0; p < kc; ++p) out[p * nr] = row[p];
    }
    const int64_t tail = nc % nr;  // the last sliver's missing columns are zeros
    if (tail != 0) {
      T* last = dst + (nc / nr) * kc * nr;
      for (int64_t p = 0; p < kc; ++p) std::fill(last + p * nr + tail, last + (p + 1) * nr, T(0));
    }
  };
}

// col2im as a gather, one input row (c, i_h) of one sample at a time: the transposed convolution.
//     d_x[c, i_h, i_w] = Σ_{t_h, t_w} d_col[(c, t_h, t_w), (o_h, o_w)]
// over the taps for which o_h = (i_h + pH - t_h*dH)/sH and o_w = (i_w + pW - t_w*dW)/sW are integers
// in range. For a fixed tap, the inputs i_w = i0, i0+sW, ... take the outputs o_w = o0, o0+1, ... .
// `dcol` points at the sample's first column; rows are `ld` apart.
template <typename T>
void col2im_row(const T* __restrict__ dcol, int64_t ld, T* __restrict__ dx_row, const ConvGeometry& g, int64_t c,
                int64_t i_h) {
  std::fill(dx_row, dx_row + g.w, T(0));
  for (int64_t th = 0; th < g.kh; ++th) {
    int64_t o_h;
    if (!conv_out_index(i_h, th, g.sh, g.ph, g.dh, g.oh, &o_h)) continue;
    for (int64_t tw = 0; tw < g.kw; ++tw) {
      const T* src = dcol + ((c * g.kh + th) * g.kw + tw) * ld + o_h * g.ow;
      int64_t i0, o0;
      conv_tap_first(tw, g.sw, g.pw, g.dw, &i0, &o0);
      if (i0 >= g.w || o0 >= g.ow) continue;
      const int64_t count = std::min((g.w - i0 + g.sw - 1) / g.sw, g.ow - o0);
      if (g.sw == 1) {
        for (int64_t k = 0; k < count; ++k) dx_row[i0 + k] += src[o0 + k];
      } else {
        for (int64_t k = 0; k < count; ++k) dx_row[i0 + k * g.sw] += src[o0 + k];
      }
    }
  }
}

// d_x of samples 0 .. nb-1 of a block (dx points at the first), rows in parallel.
template <typename T>
void col2im(const T* dcol, int64_t nb, T* dx, const ConvGeometry& g) {
  const int64_t rows = g.c * g.h, cols = g.col_cols(), ld = nb * cols;
  at::parallel_for(0, rows * nb, std::max<int64_t>(1, kGrain / (g.w * g.taps())), [&](int64_t begin, int64_t end) {
    for (int64_t rs = begin; rs < end; ++rs) {
      const int64_t s = rs / rows, row = rs % rows;
      col2im_row(dcol + s * cols, ld, dx + (s * rows + row) * g.w, g, row / g.h, row % g.h);
    }
  });
}

// Sample ranges: the batch cut into one chunk per thread (fewer when N is small), or a single chunk when
// the whole convolution is too small to pay for waking another thread (gradcheck-sized inputs, for one).
// With a single chunk the GEMMs split their columns among the threads instead. The backward sums its
// per-chunk weight gradients in chunk order, so the result is deterministic for a given thread count.
// Small images (fewer than kMinPixelsPerSample outputs: ResNet's 8x8 and 4x4 stages) go as one chunk
// too: all their samples side by side make one GEMM, which splits its filters among the threads, so the
// filters (large in those layers) are packed and read once, not once per thread.
constexpr int64_t kMinParallelMacs = int64_t(1) << 17;
constexpr int64_t kMinPixelsPerSample = 128;
int64_t chunk_count(const ConvGeometry& g) {
  const int64_t macs = g.n * g.f * g.c_per_group() * g.taps() * g.col_cols();
  if (macs < kMinParallelMacs || g.col_cols() < kMinPixelsPerSample) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(g.n, at::get_num_threads()));
}
int64_t chunk_begin(int64_t chunk, int64_t chunks, int64_t n) { return chunk * n / chunks; }

// Samples per GEMM: enough columns (nb*oH*oW) that the micro-kernel's 48-column slivers are mostly
// full (a 14x14 output alone fills 4 of 5), bounded so that the d_col buffer of the strided backward
// stays under kColumnBudget elements (it never grows with N).
constexpr int64_t kMinColumns = 512;
constexpr int64_t kColumnBudget = int64_t(1) << 21;  // 8 MiB in float32
int64_t block_size(const ConvGeometry& g, int64_t chunk_len) {
  const int64_t by_target = (kMinColumns + g.col_cols() - 1) / g.col_cols();
  const int64_t by_budget = kColumnBudget / std::max<int64_t>(1, g.col_rows() * g.col_cols());
  return std::max<int64_t>(1, std::min({chunk_len, by_target, by_budget}));
}

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
  int64_t hp, wp;  // the padded plane
  int64_t sh, sw;  // phases per axis (the stride)
  int64_t hq, wq;  // one phase; wq is the outputs' row pitch
  int64_t cols;    // GEMM columns per sample: (oH-1)*Wq + oW
  int64_t plane() const { return sh * sw * hq * wq; }  // one channel's phases
};

ShiftedPlanes shifted_planes(const ConvGeometry& g) {
  const int64_t hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw;
  const int64_t hq = (hp + g.sh - 1) / g.sh, wq = (wp + g.sw - 1) / g.sw;
  return {hp, wp, g.sh, g.sw, hq, wq, (g.oh - 1) * wq + g.ow};
}

// Worth it when the thrown-away columns are few: at least 3/4 of the GEMM's columns are outputs, and
// the output rows are long enough to amortise the padded copy (the tiny images go through im2col).
bool use_shifted_planes(const ConvGeometry& g) {
  // one sample per GEMM: not for small images (chunk_count)
  if (g.col_cols() < kMinPixelsPerSample) return false;
  const ShiftedPlanes sp = shifted_planes(g);
  return g.ow >= 8 && 4 * g.col_cols() >= 3 * sp.cols;
}

// x_pad[c] = the phases of the plane x[c] with pH rows and pW columns of zeros around it (the padded
// plane itself when the stride is 1); `x_pad` holds C * sp.plane().
template <typename T>
void pad_planes(const T* x, const ConvGeometry& g, const ShiftedPlanes& sp, T* x_pad) {
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

// The offset of row r = (c, t_h, t_w) of B in x_pad.
inline int64_t shifted_offset(const ConvGeometry& g, const ShiftedPlanes& sp, int64_t r) {
  const int64_t tw = r % g.kw, th = (r / g.kw) % g.kh, c = r / g.taps();
  const int64_t vh = th * g.dh, vw = tw * g.dw;  // the tap's offset in the padded plane
  const int64_t phase = (c * sp.sh + vh % sp.sh) * sp.sw + vw % sp.sw;
  return (phase * sp.hq + vh / sp.sh) * sp.wq + vw / sp.sw;
}

// The forward by shifted planes, one sample at a time: Y'_g (Fg x cols) = W_g · B_g + b_g, in pitch Wq,
// then the oW real columns of each row copied to y.
template <typename T>
void conv_forward_shifted(const T* x, const T* w, const T* b, T* y, const ConvGeometry& g) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps();
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * g.col_cols();
  const int64_t chunks = chunk_count(g);
  std::vector<int64_t> offsets(g.col_rows());  // B's rows in x_pad, all groups
  for (int64_t r = 0; r < g.col_rows(); ++r) offsets[r] = shifted_offset(g, sp, r);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, g.c * sp.plane() + cpu::kRowsBSlack);
    T* out = cpu::thread_scratch<T>(cpu::Scratch::kOut, g.f * sp.cols);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        pad_planes(x + n * in_sample, g, sp, x_pad);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          cpu::GemmEpilogue<T> ep;
          ep.row_bias = b ? b + grp * fg : nullptr;
          cpu::gemm_rows_b<T>(fg, sp.cols, kg, {w + grp * fg * kg, kg, 1}, x_pad, offsets.data() + grp * kg,
                              out + grp * fg * sp.cols, sp.cols, ep);
        }
        T* y_n = y + n * out_sample;
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
void conv_weight_grad_shifted(const T* dy, const T* x, T* dw, const ConvGeometry& g) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps();
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * g.col_cols();
  const int64_t chunks = chunk_count(g);
  std::vector<T> partial(chunks * g.f * kg, T(0));  // d_W of each chunk, summed in order below
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, g.c * sp.plane());
    T* dy_pitch = cpu::thread_scratch<T>(cpu::Scratch::kGrad, g.f * sp.cols);
    std::fill(dy_pitch, dy_pitch + g.f * sp.cols, T(0));  // the gaps stay zero
    std::vector<const T*> runs(kg);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        pad_planes(x + n * in_sample, g, sp, x_pad);
        for (int64_t f = 0; f < g.f; ++f) {  // the gaps stay zero from the allocation
          for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
            const T* src = dy + n * out_sample + (f * g.oh + o_h) * g.ow;
            std::copy(src, src + g.ow, dy_pitch + f * sp.cols + o_h * sp.wq);
          }
        }
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          for (int64_t r = 0; r < kg; ++r) runs[r] = x_pad + shifted_offset(g, sp, grp * kg + r);
          const cpu::PackB<T> pack = [&runs](int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, T* dst) {
            cpu::pack_transposed_rows(runs.data() + j0, p0, kc, nc, nr, dst);
          };
          cpu::GemmEpilogue<T> ep;
          ep.accumulate = true;
          cpu::gemm<T>(fg, kg, sp.cols, {dy_pitch + grp * fg * sp.cols, sp.cols, 1}, pack,
                       partial.data() + (chunk * g.f + grp * fg) * kg, kg, ep);
        }
      }
    }
  });
  for (int64_t i = 0; i < g.f * kg; ++i) {
    T sum = T(0);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * g.f * kg + i];
    dw[i] = sum;
  }
}

// ------------------------------------------------------------------------------ forward: implicit GEMM
// Per block of nb samples and group g:
//     Y_g (Fg x nb*oH*oW) = W_g (Fg x Cg*kH*kW) · col_g (Cg*kH*kW x nb*oH*oW) + b_g
// with col_g packed straight from x (pack_columns). With nb = 1 the GEMM writes into the NCHW output;
// otherwise into a buffer whose columns are then copied to the nb samples (one pass over the output,
// small next to the GEMM). Raw pointers, contiguous NCHW tensors: the backward's d_x reuses it.
template <typename T>
void conv_forward_gemm(const T* x, const T* w, const T* b, T* y, const ConvGeometry& g) {
  if (use_shifted_planes(g)) {
    conv_forward_shifted(x, w, b, y, g);
    return;
  }
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps(), cols = g.col_cols();
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * cols;
  const int64_t chunks = chunk_count(g);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t n_begin = chunk_begin(chunk, chunks, g.n), n_end = chunk_begin(chunk + 1, chunks, g.n);
      const int64_t nb_max = block_size(g, n_end - n_begin);
      T* buffer = nb_max > 1 ? cpu::thread_scratch<T>(cpu::Scratch::kOut, g.f * nb_max * cols) : nullptr;
      for (int64_t n0 = n_begin; n0 < n_end; n0 += nb_max) {
        const int64_t nb = std::min(nb_max, n_end - n0), ld = nb * cols;
        T* out = nb == 1 ? y + n0 * out_sample : buffer;
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          cpu::GemmEpilogue<T> ep;
          ep.row_bias = b ? b + grp * fg : nullptr;
          cpu::gemm<T>(fg, ld, kg, {w + grp * fg * kg, kg, 1}, pack_columns(x + n0 * in_sample, in_sample, g, grp * kg),
                       out + grp * fg * ld, ld, ep);
        }
        for (int64_t s = 0; nb > 1 && s < nb; ++s) {  // buffer [F, (s, q)] -> y[n0 + s, F, q]
          for (int64_t f = 0; f < g.f; ++f) {
            std::copy(out + f * ld + s * cols, out + f * ld + (s + 1) * cols, y + (n0 + s) * out_sample + f * cols);
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------- backward
// d_x for stride 1 is itself a convolution: the transposed convolution of dY is the convolution of dY
// with the filters flipped in space and with in and out channels swapped, padded by d*(k-1) - p
// (docs/conv2d.md). It runs through conv_forward_gemm. The geometry of that convolution, or false when
// the layer is strided (or padded beyond d*(k-1)), where d_x goes through d_col and col2im instead.
bool transposed_geometry(const ConvGeometry& g, ConvGeometry* t) {
  const int64_t ph = g.dh * (g.kh - 1) - g.ph, pw = g.dw * (g.kw - 1) - g.pw;
  if (g.sh != 1 || g.sw != 1 || ph < 0 || pw < 0) return false;
  *t = g;
  t->c = g.f;
  t->h = g.oh;
  t->w = g.ow;
  t->f = g.c;
  t->oh = g.h;
  t->ow = g.w;
  t->ph = ph;
  t->pw = pw;
  return true;
}

// The filters of that convolution: W_t[g*Cg + c, f, kH-1-t_h, kW-1-t_w] = W[g*Fg + f, c, t_h, t_w].
at::Tensor transposed_filters(const at::Tensor& w, const ConvGeometry& g) {
  return w.view({g.groups, g.f_per_group(), g.c_per_group(), g.kh, g.kw})
      .transpose(1, 2)
      .flip({3, 4})
      .contiguous()
      .view({g.c, g.f_per_group(), g.kh, g.kw});
}

// Per block of nb samples and group g, with dY_b = [dY[n0] | dY[n0+1] | ...] (Fg x nb*oH*oW):
//   d_W_g += dY_b · col_gᵀ        (K = nb*oH*oW; B packed straight from x: pack_columns_transposed)
// and, when the layer is strided, d_col_g = W_gᵀ · dY_b, then d_x[n] = col2im(d_col[n]).
template <typename T>
void conv_backward_gemm(const T* dy, const T* x, const T* w, T* dx, T* dw, const ConvGeometry& g, bool dx_by_col2im) {
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps(), cols = g.col_cols();
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * cols;
  const int64_t chunks = chunk_count(g);
  std::vector<T> partial(dw ? chunks * g.f * kg : 0, T(0));  // d_W of each chunk, summed in order below
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t n_begin = chunk_begin(chunk, chunks, g.n), n_end = chunk_begin(chunk + 1, chunks, g.n);
      const int64_t nb_max = block_size(g, n_end - n_begin);
      T* dy_buffer = nb_max > 1 ? cpu::thread_scratch<T>(cpu::Scratch::kGrad, g.f * nb_max * cols) : nullptr;
      T* dcol = dx_by_col2im ? cpu::thread_scratch<T>(cpu::Scratch::kRows, g.col_rows() * nb_max * cols) : nullptr;
      T* dw_chunk = dw ? partial.data() + chunk * g.f * kg : nullptr;
      for (int64_t n0 = n_begin; n0 < n_end; n0 += nb_max) {
        const int64_t nb = std::min(nb_max, n_end - n0), ld = nb * cols;
        const T* dy_b = dy + n0 * out_sample;
        if (nb > 1) {  // gather the block's dY side by side: [dY[n0] | dY[n0+1] | ...]
          for (int64_t s = 0; s < nb; ++s) {
            for (int64_t f = 0; f < g.f; ++f) {
              const T* src = dy + (n0 + s) * out_sample + f * cols;
              std::copy(src, src + cols, dy_buffer + f * ld + s * cols);
            }
          }
          dy_b = dy_buffer;
        }
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const cpu::MatrixView<T> dy_g{dy_b + grp * fg * ld, ld, 1};
          if (dw) {
            cpu::GemmEpilogue<T> ep;
            ep.accumulate = true;
            cpu::gemm<T>(fg, kg, ld, dy_g, pack_columns_transposed(x + n0 * in_sample, in_sample, g, grp * kg),
                         dw_chunk + grp * fg * kg, kg, ep);
          }
          if (dx_by_col2im) {  // d_col_g = W_gᵀ · dY_b: A is W_g read down its columns
            cpu::gemm<T>(kg, ld, fg, {w + grp * fg * kg, 1, kg}, dy_g, dcol + grp * kg * ld, ld);
          }
        }
        if (dx_by_col2im) col2im(dcol, nb, dx + n0 * in_sample, g);
      }
    }
  });
  if (dw) {
    for (int64_t i = 0; i < g.f * kg; ++i) {
      T sum = T(0);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * g.f * kg + i];
      dw[i] = sum;
    }
  }
}

// ------------------------------------------------------------------------------------------- depthwise
// groups == C: output channel f (of m = F/C per input channel) sees only input plane c = f/m.
//     y[n, f, o_h, o_w] = b[f] + Σ_{t_h, t_w} W[f, 0, t_h, t_w] · x[n, f/m, i_h, i_w]
// One plane per task; rows are accumulated tap by tap over the valid interval, a loop that vectorises.
template <typename T>
CS231N_INLINE void depthwise_forward_planes(const T* xp, const T* wp, const T* bp, T* yp, const ConvGeometry& g,
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
CS231N_AVX2 void depthwise_forward_planes_avx2(const T* xp, const T* wp, const T* bp, T* yp, const ConvGeometry& g,
                                               int64_t begin, int64_t end) {
  depthwise_forward_planes<T>(xp, wp, bp, yp, g, begin, end);
}

template <typename T>
void depthwise_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       at::Tensor& y, const ConvGeometry& g) {
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const T* bp = bias.has_value() && bias->defined() ? bias->const_data_ptr<T>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();
  at::parallel_for(0, g.n * g.f, std::max<int64_t>(1, kGrain / (g.oh * g.ow)), [&](int64_t begin, int64_t end) {
    if (cpu_has_avx2_fma()) {
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
                                               const ConvGeometry& g, int64_t begin, int64_t end) {
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
                                                  const ConvGeometry& g, int64_t begin, int64_t end) {
  depthwise_backward_channels<T>(dyp, xp, wp, dxp, dwp, dbp, g, begin, end);
}

// d_W and d_b of a 3x3 stride-1 depthwise layer (one filter per channel), with the nine tap sums in
// registers: each vector of dY is loaded once for all nine taps, where the loop above keeps a lane row
// per tap in memory. The x plane is padded once (scratch), so that no tap needs a bounds test:
//     d_W[c, t_h, t_w] = Σ_{n, o_h, o_w} dY[n, c, o_h, o_w] · x_pad[n, c, o_h + t_h*dH, o_w + t_w*dW]
// Vectors are GCC's generic vectors of 64 bytes, which each instruction set's build splits as it can.
template <typename T>
CS231N_INLINE void depthwise_weight_grad_3x3_channels(const T* dyp, const T* xp, T* dwp, T* dbp, const ConvGeometry& g,
                                                      int64_t begin, int64_t end) {
  constexpr int kLanes = 64 / sizeof(T);
  typedef T Vec __attribute__((vector_size(64)));
  const int64_t wp = g.w + 2 * g.pw, hp = g.h + 2 * g.ph, plane_out = g.oh * g.ow;
  T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, hp * wp + kLanes);
  std::fill(x_pad, x_pad + hp * wp + kLanes, T(0));  // the border stays zero: only the interior is copied
  auto load = [](const T* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  };
  for (int64_t c = begin; c < end; ++c) {
    Vec acc[9] = {}, bias = {};
    T tail[9] = {}, tail_bias = 0;
    for (int64_t n = 0; n < g.n; ++n) {
      const T* x_plane = xp + (n * g.c + c) * g.h * g.w;
      for (int64_t i = 0; i < g.h; ++i) std::copy(x_plane + i * g.w, x_plane + (i + 1) * g.w, x_pad + (g.ph + i) * wp + g.pw);
      const T* dy_plane = dyp + (n * g.c + c) * plane_out;
      for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
        const T* d = dy_plane + o_h * g.ow;
        const T* rows[3] = {x_pad + o_h * wp, x_pad + (o_h + g.dh) * wp, x_pad + (o_h + 2 * g.dh) * wp};
        int64_t o_w = 0;
        for (; o_w + kLanes <= g.ow; o_w += kLanes) {
          const Vec dv = load(d + o_w);
          bias += dv;
#pragma GCC unroll 3
          for (int th = 0; th < 3; ++th) {
#pragma GCC unroll 3
            for (int tw = 0; tw < 3; ++tw) acc[th * 3 + tw] += dv * load(rows[th] + o_w + tw * g.dw);
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
void depthwise_weight_grad_3x3_baseline(const T* dyp, const T* xp, T* dwp, T* dbp, const ConvGeometry& g,
                                        int64_t begin, int64_t end) {
  depthwise_weight_grad_3x3_channels(dyp, xp, dwp, dbp, g, begin, end);
}
template <typename T>
CS231N_AVX2 void depthwise_weight_grad_3x3_avx2(const T* dyp, const T* xp, T* dwp, T* dbp, const ConvGeometry& g,
                                                int64_t begin, int64_t end) {
  depthwise_weight_grad_3x3_channels(dyp, xp, dwp, dbp, g, begin, end);
}
template <typename T>
CS231N_AVX512 void depthwise_weight_grad_3x3_avx512(const T* dyp, const T* xp, T* dwp, T* dbp, const ConvGeometry& g,
                                                    int64_t begin, int64_t end) {
  depthwise_weight_grad_3x3_channels(dyp, xp, dwp, dbp, g, begin, end);
}

bool depthwise_weight_grad_is_3x3(const ConvGeometry& g) {
  return g.f == g.c && g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1;
}

template <typename T>
void depthwise_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, at::Tensor& dx,
                        at::Tensor& dw, at::Tensor& db, const ConvGeometry& g, bool need_dx, bool need_dw,
                        bool need_db) {
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

// ---------------------------------------------------------------------------- channels_last (NHWC)
// In NHWC a pixel's channels are contiguous, so pixels are the GEMM's rows and channels its k. With
// stride 1 and the shifted planes (above), now of pixels: x_pad[Hp][Wp][C], output j = o_h*Wp + o_w,
//     Y'[j, f] = b[f] + Σ_{t_h, t_w} Σ_c x_pad[j + t_h*dH*Wp + t_w*dW, c] · W[f, c, t_h, t_w]
// one GEMM per tap over the channels, summed: Y' = Σ_taps A_tap · B_tap, where A_tap is x_pad shifted by
// the tap (pixel rows C apart, read in place) and B_tap = W[:, :, t_h, t_w]ᵀ (cpu::gemm_segments).
// The weight in channels_last memory is W[f][t_h][t_w][c], so the taps' B are its rows, one after the
// other. Strided layers take the NCHW kernels (the input copied to NCHW, the results back).
// It runs one sample at a time (kMinPixelsPerSample).
bool channels_last_direct(const ConvGeometry& g) {
  return !conv2d_is_depthwise(g) && g.sh == 1 && g.sw == 1 && g.col_cols() >= kMinPixelsPerSample;
}

// x_pad = the NHWC sample x with pH rows and pW columns of zero pixels around it.
template <typename T>
void pad_pixels(const T* x, const ConvGeometry& g, const ShiftedPlanes& sp, T* x_pad) {
  const int64_t row = sp.wp * g.c, side = g.pw * g.c, inner = g.w * g.c;
  std::fill(x_pad, x_pad + g.ph * row, T(0));
  for (int64_t i = 0; i < g.h; ++i) {
    T* dst = x_pad + (g.ph + i) * row;
    std::fill(dst, dst + side, T(0));
    std::copy(x + i * inner, x + (i + 1) * inner, dst + side);
    std::fill(dst + side + inner, dst + row, T(0));
  }
  std::fill(x_pad + (g.ph + g.h) * row, x_pad + sp.hp * row, T(0));
}

// The pixel offset of tap t = (t_h, t_w) in x_pad.
inline int64_t tap_offset(const ConvGeometry& g, const ShiftedPlanes& sp, int64_t t) {
  return (t / g.kw) * g.dh * sp.wp + (t % g.kw) * g.dw;
}

// x_pad from an NCHW sample: the same, each pixel's channels gathered (a transpose done while padding).
template <typename T>
void pad_pixels_from_planes(const T* x, const ConvGeometry& g, const ShiftedPlanes& sp, T* x_pad) {
  const int64_t row = sp.wp * g.c;
  std::fill(x_pad, x_pad + g.ph * row, T(0));
  for (int64_t i = 0; i < g.h; ++i) {  // input row i: the [C x W] slice x[:, i, :], transposed
    T* dst = x_pad + (g.ph + i) * row;
    std::fill(dst, dst + g.pw * g.c, T(0));
    cpu::transpose_matrix(x + i * g.w, g.h * g.w, g.c, g.w, dst + g.pw * g.c, g.c);
    std::fill(dst + (g.pw + g.w) * g.c, dst + row, T(0));
  }
  std::fill(x_pad + (g.ph + g.h) * row, x_pad + sp.hp * row, T(0));
}

// The forward in NHWC: w is W in channels_last memory; x and y are NHWC, or NCHW when `planes` is set
// (transposed per sample on the way in and out, while the sample is in cache).
template <typename T>
void conv_forward_nhwc(const T* x, const T* w, const T* b, T* y, const ConvGeometry& g, bool planes = false) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t fg = g.f_per_group(), cg = g.c_per_group(), kg = cg * g.taps();
  const int64_t in_sample = g.h * g.w * g.c, out_sample = g.col_cols() * g.f;
  const int64_t chunks = chunk_count(g);
  // each group's B = W_gᵀ, packed once for every sample
  const int64_t packed_size = cpu::segments_b_size<T>(kg, fg);
  T* packed = cpu::thread_scratch<T>(cpu::Scratch::kFilters, g.groups * packed_size);
  std::vector<cpu::SegmentsB<T>> filters;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    filters.push_back(cpu::prepare_segments_b<T>(kg, fg, {w + grp * fg * kg, 1, kg}, packed + grp * packed_size));
  }
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.hp * sp.wp * g.c);
    T* out = cpu::thread_scratch<T>(cpu::Scratch::kOut, sp.cols * g.f);
    std::vector<const T*> taps(g.taps());
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        if (planes) {
          pad_pixels_from_planes(x + n * in_sample, g, sp, x_pad);
        } else {
          pad_pixels(x + n * in_sample, g, sp, x_pad);
        }
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          for (int64_t t = 0; t < g.taps(); ++t) taps[t] = x_pad + tap_offset(g, sp, t) * g.c + grp * cg;
          cpu::GemmEpilogue<T> ep;
          ep.col_bias = b ? b + grp * fg : nullptr;
          cpu::gemm_segments<T>(sp.cols, g.taps(), cg, taps.data(), g.c, filters[grp], out + grp * fg, g.f,
                                ep);
        }
        T* y_n = y + n * out_sample;
        for (int64_t o_h = 0; o_h < g.oh; ++o_h) {  // the oW real pixels of each row
          const T* src = out + o_h * sp.wp * g.f;
          if (!planes) {
            std::copy(src, src + g.ow * g.f, y_n + o_h * g.ow * g.f);
            continue;
          }
          cpu::transpose_matrix(src, g.f, g.ow, g.f, y_n + o_h * g.ow, g.oh * g.ow);  // [oW x F] -> y[:, o_h, :]
        }
      }
    }
  });
}

// d_W in NHWC: d_W_g[f, (t, c)] += Σ_j dY'[j, f] · x_pad[j + tap_offset(t), c], with dY' = dY in the
// pitch Wp (zeros in the thrown-away pixels). A = dY'ᵀ, whose packing copies MR channels of a pixel;
// B's rows are pixels, each a run of C channels per tap: packing copies runs. dw is W's shape in
// channels_last memory.
template <typename T>
void conv_weight_grad_nhwc(const T* dy, const T* x, T* dw, const ConvGeometry& g) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t fg = g.f_per_group(), cg = g.c_per_group(), kg = cg * g.taps();
  const int64_t in_sample = g.h * g.w * g.c, out_sample = g.col_cols() * g.f;
  const int64_t chunks = chunk_count(g);
  std::vector<T> partial(chunks * g.f * kg, T(0));  // d_W of each chunk, summed in order below
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.hp * sp.wp * g.c);
    T* dy_pitch = cpu::thread_scratch<T>(cpu::Scratch::kGrad, sp.cols * g.f);
    std::fill(dy_pitch, dy_pitch + sp.cols * g.f, T(0));  // the gaps stay zero
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        pad_pixels(x + n * in_sample, g, sp, x_pad);
        for (int64_t o_h = 0; o_h < g.oh; ++o_h) {  // the gaps stay zero from the allocation
          const T* src = dy + n * out_sample + o_h * g.ow * g.f;
          std::copy(src, src + g.ow * g.f, dy_pitch + o_h * sp.wp * g.f);
        }
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const T* x_grp = x_pad + grp * cg;
          const cpu::PackB<T> pack = [&, x_grp](int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, T* dst) {
            for (int64_t p = 0; p < kc; ++p) {
              const T* pixel = x_grp + (p0 + p) * g.c;
              for (int64_t k = j0; k < j0 + nc;) {  // runs of channels, one tap at a time
                const int64_t t = k / cg, c = k % cg, len = std::min(cg - c, j0 + nc - k);
                cpu::copy_run_to_slivers(pixel + tap_offset(g, sp, t) * g.c + c, k - j0, len, p, kc, nr, dst);
                k += len;
              }
            }
            if (nc % nr != 0) {  // the last sliver's missing columns are zeros
              T* last = dst + (nc / nr) * kc * nr;
              for (int64_t p = 0; p < kc; ++p) std::fill(last + p * nr + nc % nr, last + (p + 1) * nr, T(0));
            }
          };
          cpu::GemmEpilogue<T> ep;
          ep.accumulate = true;
          cpu::gemm<T>(fg, kg, sp.cols, {dy_pitch + grp * fg, 1, g.f}, pack,
                       partial.data() + (chunk * g.f + grp * fg) * kg, kg, ep);
        }
      }
    }
  });
  for (int64_t i = 0; i < g.f * kg; ++i) {
    T sum = T(0);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * g.f * kg + i];
    dw[i] = sum;
  }
}

// ------------------------------------------------------------------ depthwise, channels innermost
// Depthwise with one filter per channel (MobileNet's): each sample is transposed in cache to pixels x
// channels (pad_pixels_from_planes), so that every tap is a multiply-add over a contiguous run of
// channels, vectorised across channels whatever the size of the plane (a 4x4 plane gives a row loop of
// 4), then transposed back. With positions in the padded plane (any stride, dilation and padding):
//   y[o, c]                 = b[c] + Σ_t W[c, t] · x_pad[o*s + t*d, c]
//   d_x_pad[o*s + t*d, c]  += W[c, t] · dY[o, c]          (the transposed convolution, as a scatter)
//   d_W[c, t]              += dY[o, c] · x_pad[o*s + t*d, c],   d_b[c] += dY[o, c]
// The backward runs the samples of a chunk in order on one thread, so its sums are deterministic.
// Taken for planes of up to 16 x 16 outputs, where the plane kernels (above) spend more on their short
// rows than on the sums: measured 4-7x faster there (MobileNetV2's 16x16 to 4x4 stages), and slower on
// large planes (56 x 56: the two transposes cost more than the short rows).
constexpr int64_t kMaxDepthwisePixels = 256;
bool depthwise_by_pixels(const ConvGeometry& g) {
  return conv2d_is_depthwise(g) && g.f == g.c && g.col_cols() <= kMaxDepthwisePixels;
}

// The padded-plane offset, in pixels, of the input under tap t of output (o_h, o_w).
CS231N_INLINE int64_t dw_in_pixel(const ConvGeometry& g, const ShiftedPlanes& sp, int64_t o_h, int64_t o_w,
                                  int64_t t) {
  return (o_h * g.sh + (t / g.kw) * g.dh) * sp.wp + o_w * g.sw + (t % g.kw) * g.dw;
}

// out[o, :] for every output pixel o of one sample; w_t = W as [taps][C].
template <typename T>
CS231N_INLINE void dw_forward_pixels(const T* x_pad, const T* w_t, const T* b, T* out, const ConvGeometry& g,
                                     const ShiftedPlanes& sp) {
  const int64_t C = g.c;
  for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
    for (int64_t o_w = 0; o_w < g.ow; ++o_w) {
      T* __restrict__ acc = out + (o_h * g.ow + o_w) * C;
      for (int64_t c = 0; c < C; ++c) acc[c] = b ? b[c] : T(0);
      for (int64_t t = 0; t < g.taps(); ++t) {
        const T* __restrict__ xs = x_pad + dw_in_pixel(g, sp, o_h, o_w, t) * C;
        const T* __restrict__ wt = w_t + t * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += wt[c] * xs[c];
      }
    }
  }
}

// The backward's sums for one sample: dx_pad (zeroed here) and the running dw_t [taps][C] and db [C].
template <typename T>
CS231N_INLINE void dw_backward_pixels(const T* dy_t, const T* x_pad, const T* w_t, T* dx_pad, T* dw_t, T* db,
                                      const ConvGeometry& g, const ShiftedPlanes& sp) {
  const int64_t C = g.c;
  if (dx_pad) std::fill(dx_pad, dx_pad + sp.hp * sp.wp * C, T(0));
  for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
    for (int64_t o_w = 0; o_w < g.ow; ++o_w) {
      const T* __restrict__ d = dy_t + (o_h * g.ow + o_w) * C;
      if (db) {
        T* __restrict__ db_r = db;
        for (int64_t c = 0; c < C; ++c) db_r[c] += d[c];
      }
      for (int64_t t = 0; t < g.taps(); ++t) {
        const int64_t pixel = dw_in_pixel(g, sp, o_h, o_w, t) * C;
        if (dx_pad) {
          T* __restrict__ dx = dx_pad + pixel;
          const T* __restrict__ wt = w_t + t * C;
          for (int64_t c = 0; c < C; ++c) dx[c] += wt[c] * d[c];
        }
        if (dw_t) {
          T* __restrict__ dw = dw_t + t * C;
          const T* __restrict__ xs = x_pad + pixel;
          for (int64_t c = 0; c < C; ++c) dw[c] += d[c] * xs[c];
        }
      }
    }
  }
}

// The loops above compiled for each instruction set (their bodies inline into each).
template <typename T>
void dw_forward_pixels_baseline(const T* x_pad, const T* w_t, const T* b, T* out, const ConvGeometry& g,
                                const ShiftedPlanes& sp) {
  dw_forward_pixels(x_pad, w_t, b, out, g, sp);
}
template <typename T>
CS231N_AVX2 void dw_forward_pixels_avx2(const T* x_pad, const T* w_t, const T* b, T* out, const ConvGeometry& g,
                                        const ShiftedPlanes& sp) {
  dw_forward_pixels(x_pad, w_t, b, out, g, sp);
}
template <typename T>
CS231N_AVX512 void dw_forward_pixels_avx512(const T* x_pad, const T* w_t, const T* b, T* out, const ConvGeometry& g,
                                            const ShiftedPlanes& sp) {
  dw_forward_pixels(x_pad, w_t, b, out, g, sp);
}
template <typename T>
void dw_backward_pixels_baseline(const T* dy_t, const T* x_pad, const T* w_t, T* dx_pad, T* dw_t, T* db,
                                 const ConvGeometry& g, const ShiftedPlanes& sp) {
  dw_backward_pixels(dy_t, x_pad, w_t, dx_pad, dw_t, db, g, sp);
}
template <typename T>
CS231N_AVX2 void dw_backward_pixels_avx2(const T* dy_t, const T* x_pad, const T* w_t, T* dx_pad, T* dw_t, T* db,
                                         const ConvGeometry& g, const ShiftedPlanes& sp) {
  dw_backward_pixels(dy_t, x_pad, w_t, dx_pad, dw_t, db, g, sp);
}
template <typename T>
CS231N_AVX512 void dw_backward_pixels_avx512(const T* dy_t, const T* x_pad, const T* w_t, T* dx_pad, T* dw_t, T* db,
                                             const ConvGeometry& g, const ShiftedPlanes& sp) {
  dw_backward_pixels(dy_t, x_pad, w_t, dx_pad, dw_t, db, g, sp);
}

// W [C, 1, kH, kW] as [taps][C].
template <typename T>
std::vector<T> taps_by_channel(const T* w, const ConvGeometry& g) {
  std::vector<T> w_t(g.taps() * g.c);
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t t = 0; t < g.taps(); ++t) w_t[t * g.c + c] = w[c * g.taps() + t];
  }
  return w_t;
}

template <typename T>
void depthwise_forward_pixels(const T* x, const T* w, const T* b, T* y, const ConvGeometry& g) {
  const ShiftedPlanes sp = shifted_planes(g);
  const std::vector<T> w_t = taps_by_channel(w, g);
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.c * g.col_cols();
  const cpu::Isa isa = cpu::cpu_isa();
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.hp * sp.wp * g.c);
    T* out = cpu::thread_scratch<T>(cpu::Scratch::kOut, out_sample);
    for (int64_t n = n0; n < n1; ++n) {
      pad_pixels_from_planes(x + n * in_sample, g, sp, x_pad);
      if (isa == cpu::Isa::kAvx512) {
        dw_forward_pixels_avx512(x_pad, w_t.data(), b, out, g, sp);
      } else if (isa == cpu::Isa::kAvx2) {
        dw_forward_pixels_avx2(x_pad, w_t.data(), b, out, g, sp);
      } else {
        dw_forward_pixels_baseline(x_pad, w_t.data(), b, out, g, sp);
      }
      cpu::transpose_matrix(out, g.c, g.col_cols(), g.c, y + n * out_sample, g.col_cols());  // -> [C][oH*oW]
    }
  });
}

template <typename T>
void depthwise_backward_pixels(const T* dy, const T* x, const T* w, T* dx, T* dw, T* db, const ConvGeometry& g) {
  const ShiftedPlanes sp = shifted_planes(g);
  const std::vector<T> w_t = taps_by_channel(w, g);
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.c * g.col_cols();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.n, at::get_num_threads()));
  // each chunk's d_W [taps][C] and d_b [C], summed in chunk order below
  std::vector<T> dw_part(dw ? chunks * g.taps() * g.c : 0, T(0)), db_part(db ? chunks * g.c : 0, T(0));
  const cpu::Isa isa = cpu::cpu_isa();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    T* x_pad = dw ? cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.hp * sp.wp * g.c) : nullptr;
    T* dx_pad = dx ? cpu::thread_scratch<T>(cpu::Scratch::kOut, sp.hp * sp.wp * g.c) : nullptr;
    T* dy_t = cpu::thread_scratch<T>(cpu::Scratch::kGrad, out_sample);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      T* dw_c = dw ? dw_part.data() + chunk * g.taps() * g.c : nullptr;
      T* db_c = db ? db_part.data() + chunk * g.c : nullptr;
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        cpu::transpose_matrix(dy + n * out_sample, g.col_cols(), g.c, g.col_cols(), dy_t, g.c);  // -> [oH*oW][C]
        if (dw) pad_pixels_from_planes(x + n * in_sample, g, sp, x_pad);
        T* dxp = dx_pad;
        if (isa == cpu::Isa::kAvx512) {
          dw_backward_pixels_avx512(dy_t, x_pad, w_t.data(), dxp, dw_c, db_c, g, sp);
        } else if (isa == cpu::Isa::kAvx2) {
          dw_backward_pixels_avx2(dy_t, x_pad, w_t.data(), dxp, dw_c, db_c, g, sp);
        } else {
          dw_backward_pixels_baseline(dy_t, x_pad, w_t.data(), dxp, dw_c, db_c, g, sp);
        }
        for (int64_t i = 0; dx && i < g.h; ++i) {  // the interior of d_x_pad, back to [C][H][W]
          cpu::transpose_matrix(dx_pad + ((g.ph + i) * sp.wp + g.pw) * g.c, g.c, g.w, g.c,
                          dx + n * in_sample + i * g.w, g.h * g.w);
        }
      }
    }
  });
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t t = 0; dw && t < g.taps(); ++t) {
      T sum = T(0);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += dw_part[(chunk * g.taps() + t) * g.c + c];
      dw[c * g.taps() + t] = sum;
    }
    if (db) {
      T sum = T(0);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += db_part[chunk * g.c + c];
      db[c] = sum;
    }
  }
}

// --------------------------------------------------------------------------- small images: pixel rows
// Below kMinPixelsPerSample outputs (ResNet's 8x8 and 4x4 stages, whose filters are the largest), every
// output pixel of a block of samples becomes a row of one GEMM, through the im2col of channels_last:
//     A[j, (t, c)] = x_pad[s, o_h*sH + t_h*dH, o_w*sW + t_w*dW, c]        row j = (s, o_h, o_w)
// built by copying C contiguous channels per row and tap (the NCHW im2col would copy rows of 4 or 8).
//     Y[j, f]        = b[f] + Σ_t A[j, (t, :)] · W[f, :, t]ᵀ    (gemm_segments: taps as segments)
//     d_W[f, (t, c)] = Σ_j dY[j, f] · A[j, (t, c)]              (one GEMM, both operands copied)
// The samples are transposed to and from NCHW in cache. One group only (the copies of a group's channels
// would no longer be contiguous rows).
bool use_pixel_rows(const ConvGeometry& g) {
  return g.groups == 1 && g.col_cols() < kMinPixelsPerSample && g.c >= 16;
}

// Samples per block: the rows (block * oH*oW x taps*C) under twice kColumnBudget, in equal blocks.
int64_t pixel_rows_block(const ConvGeometry& g) {
  const int64_t per_sample = g.col_cols() * g.taps() * g.c;
  const int64_t most = std::max<int64_t>(1, 2 * kColumnBudget / std::max<int64_t>(1, per_sample));
  const int64_t blocks = (g.n + most - 1) / most;
  return (g.n + blocks - 1) / blocks;
}

// A's rows for samples [n0, n0 + nb) of the NCHW x, in parallel over the samples.
template <typename T>
void build_pixel_rows(const T* x, int64_t n0, int64_t nb, const ConvGeometry& g, T* rows) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t k = g.taps() * g.c, in_sample = g.c * g.h * g.w, p = g.col_cols();
  at::parallel_for(0, nb, 1, [&](int64_t s0, int64_t s1) {
    T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.hp * sp.wp * g.c);
    for (int64_t s = s0; s < s1; ++s) {
      pad_pixels_from_planes(x + (n0 + s) * in_sample, g, sp, x_pad);
      for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
        for (int64_t o_w = 0; o_w < g.ow; ++o_w) {
          T* row = rows + (s * p + o_h * g.ow + o_w) * k;
          for (int64_t t = 0; t < g.taps(); ++t) {
            const T* src = x_pad + dw_in_pixel(g, sp, o_h, o_w, t) * g.c;
            std::copy(src, src + g.c, row + t * g.c);
          }
        }
      }
    }
  });
}

template <typename T>
void conv_forward_pixel_rows(const T* x, const at::Tensor& w, const T* b, T* y, const ConvGeometry& g) {
  const int64_t k = g.taps() * g.c, p = g.col_cols(), out_sample = g.f * p, nb_max = pixel_rows_block(g);
  const at::Tensor w_cl = w.contiguous(at::MemoryFormat::ChannelsLast);  // W[f][t][c]: Bᵀ's rows
  const cpu::SegmentsB<T> filters = cpu::prepare_segments_b<T>(
      k, g.f, {w_cl.const_data_ptr<T>(), 1, k},
      cpu::thread_scratch<T>(cpu::Scratch::kFilters, cpu::segments_b_size<T>(k, g.f)));
  T* rows = cpu::thread_scratch<T>(cpu::Scratch::kRows, nb_max * p * k);
  T* out = cpu::thread_scratch<T>(cpu::Scratch::kOut, nb_max * p * g.f);
  std::vector<const T*> taps(g.taps());
  for (int64_t n0 = 0; n0 < g.n; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, g.n - n0);
    build_pixel_rows(x, n0, nb, g, rows);
    for (int64_t t = 0; t < g.taps(); ++t) taps[t] = rows + t * g.c;
    cpu::GemmEpilogue<T> ep;
    ep.col_bias = b;
    cpu::gemm_segments<T>(nb * p, g.taps(), g.c, taps.data(), k, filters, out, g.f, ep);
    at::parallel_for(0, nb, 1, [&](int64_t s0, int64_t s1) {  // [pixels x F] -> y[n][F][pixels]
      for (int64_t s = s0; s < s1; ++s) {
        cpu::transpose_matrix(out + s * p * g.f, g.f, p, g.f, y + (n0 + s) * out_sample, p);
      }
    });
  }
}

// d_W into dw (W's shape, NCHW memory).
template <typename T>
void conv_weight_grad_pixel_rows(const T* dy, const T* x, T* dw, const ConvGeometry& g) {
  const int64_t k = g.taps() * g.c, p = g.col_cols(), out_sample = g.f * p, nb_max = pixel_rows_block(g);
  T* rows = cpu::thread_scratch<T>(cpu::Scratch::kRows, nb_max * p * k);
  T* dy_t = cpu::thread_scratch<T>(cpu::Scratch::kGrad, nb_max * p * g.f);
  T* dw_cl = cpu::thread_scratch<T>(cpu::Scratch::kOut, g.f * k);  // d_W[f][t][c]
  for (int64_t n0 = 0; n0 < g.n; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, g.n - n0);
    build_pixel_rows(x, n0, nb, g, rows);
    at::parallel_for(0, nb, 1, [&](int64_t s0, int64_t s1) {  // dY[n][F][pixels] -> [pixels x F]
      for (int64_t s = s0; s < s1; ++s) {
        cpu::transpose_matrix(dy + (n0 + s) * out_sample, p, g.f, p, dy_t + s * p * g.f, g.f);
      }
    });
    cpu::GemmEpilogue<T> ep;
    ep.accumulate = n0 > 0;
    cpu::gemm<T>(g.f, k, nb * p, {dy_t, 1, g.f}, cpu::MatrixView<T>{rows, k, 1}, dw_cl, k, ep);
  }
  for (int64_t f = 0; f < g.f; ++f) {  // [F][t][c] -> [F][c][t]
    for (int64_t c = 0; c < g.c; ++c) {
      for (int64_t t = 0; t < g.taps(); ++t) dw[(f * g.c + c) * g.taps() + t] = dw_cl[(f * g.taps() + t) * g.c + c];
    }
  }
}

// ---------------------------------------------------------------------------------------------- routing
// The NCHW kernels, on contiguous tensors.
// A stride-1 NCHW layer whose shifted planes would throw away a tenth or more of the GEMM (short rows:
// 14 of 16 columns) but whose channels are many runs the NHWC kernel instead, transposing each sample in
// and out while it is in cache. It throws away as many pixels, but its kernel packs nothing and runs at
// nearly the FMA peak (docs/conv2d.md).
bool nchw_through_pixels(const ConvGeometry& g) {
  return channels_last_direct(g) && g.c_per_group() >= 16 && 10 * g.col_cols() < 9 * shifted_planes(g).cols;
}

// conv_forward_gemm's NCHW choices, with w the filters as a tensor (NCHW contiguous).
template <typename T>
void forward_nchw_dense(const T* x, const at::Tensor& w, const T* b, T* y, const ConvGeometry& g) {
  if (use_pixel_rows(g)) {
    conv_forward_pixel_rows<T>(x, w, b, y, g);
  } else if (nchw_through_pixels(g)) {
    const at::Tensor w_cl = w.contiguous(at::MemoryFormat::ChannelsLast);
    conv_forward_nhwc<T>(x, w_cl.const_data_ptr<T>(), b, y, g, /*planes=*/true);
  } else {
    conv_forward_gemm<T>(x, w.const_data_ptr<T>(), b, y, g);
  }
}

template <typename T>
void forward_nchw(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, at::Tensor& y,
                  const ConvGeometry& g) {
  if (depthwise_by_pixels(g)) {
    depthwise_forward_pixels<T>(x.const_data_ptr<T>(), w.const_data_ptr<T>(), b ? b->const_data_ptr<T>() : nullptr,
                                y.mutable_data_ptr<T>(), g);
  } else if (conv2d_is_depthwise(g)) {
    depthwise_forward<T>(x, w, b, y, g);
  } else {
    forward_nchw_dense<T>(x.const_data_ptr<T>(), w, b ? b->const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(), g);
  }
}

template <typename T>
void backward_nchw(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, at::Tensor& dx, at::Tensor& dw,
                   at::Tensor& db, const ConvGeometry& g, bool need_dx, bool need_dw, bool need_db) {
  if (depthwise_by_pixels(g)) {  // d_b too, in its own pass over dY
    depthwise_backward_pixels<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                 need_dx ? dx.mutable_data_ptr<T>() : nullptr,
                                 need_dw ? dw.mutable_data_ptr<T>() : nullptr,
                                 need_db ? db.mutable_data_ptr<T>() : nullptr, g);
    return;
  }
  if (conv2d_is_depthwise(g)) {
    // d_x of a stride-1 layer with one filter per channel is the depthwise convolution of dY with the
    // flipped filters (as for the dense layers): the forward's kernel, measured 7.7 against 11.8 ms for
    // the gather at (32, 128, 56, 56). d_W and d_b (in the same pass over dY) by the backward kernel.
    ConvGeometry t;
    const bool dx_by_conv = need_dx && g.f == g.c && transposed_geometry(g, &t);
    if (dx_by_conv) depthwise_forward<T>(dy, transposed_filters(w, g), c10::nullopt, dx, t);
    if (need_dw || need_db || (need_dx && !dx_by_conv)) {
      depthwise_backward<T>(dy, x, w, dx, dw, db, g, need_dx && !dx_by_conv, need_dw, need_db);
    }
    return;
  }
  if (need_db) db.copy_(dy.sum({0, 2, 3}));  // d_b[f] = Σ_{n, o_h, o_w} dY[n, f, o_h, o_w]
  // d_x: stride 1 as the convolution of dY with the transposed filters, when its out channels (our in
  // channels) fill the micro-kernel's rows; otherwise d_col and col2im.
  ConvGeometry t;
  const bool dx_by_conv = need_dx && g.c_per_group() >= 16 && transposed_geometry(g, &t);
  const bool dx_by_col2im = need_dx && !dx_by_conv;
  // d_W: by pixel rows or shifted planes where the forward uses them, otherwise from im2col panels.
  const bool dw_by_rows = need_dw && use_pixel_rows(g);
  const bool dw_by_shift = need_dw && !dw_by_rows && use_shifted_planes(g);
  T* dxp = dx_by_col2im ? dx.mutable_data_ptr<T>() : nullptr;
  T* dwp = need_dw && !dw_by_shift && !dw_by_rows ? dw.mutable_data_ptr<T>() : nullptr;
  if (dw_by_rows) {
    conv_weight_grad_pixel_rows<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), dw.mutable_data_ptr<T>(), g);
  }
  if (dxp || dwp) {
    conv_backward_gemm<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<T>(), dxp, dwp, g,
                          dx_by_col2im);
  }
  if (dw_by_shift) {
    conv_weight_grad_shifted<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), dw.mutable_data_ptr<T>(), g);
  }
  if (dx_by_conv) {
    forward_nchw_dense<T>(dy.const_data_ptr<T>(), transposed_filters(w, g), nullptr, dx.mutable_data_ptr<T>(), t);
  }
}

// ---------------------------------------------------------------------------------------------- the ops
at::Tensor conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g = conv2d_geometry(input, weight, bias, stride, padding, dilation, groups, "conv2d_forward");
  const at::MemoryFormat format = conv2d_memory_format(input, weight);
  at::Tensor y = at::empty({g.n, g.f, g.oh, g.ow}, input.options().memory_format(format));
  if (y.numel() == 0) return y;
  c10::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  if (format == at::MemoryFormat::ChannelsLast && channels_last_direct(g)) {
    const at::Tensor x = input.contiguous(format), w = weight.contiguous(format);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_cpu", [&] {
      conv_forward_nhwc<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                  b ? b->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), g);
    });
    return y;
  }
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  at::Tensor y_nchw = format == at::MemoryFormat::Contiguous ? y : at::empty(y.sizes(), y.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_cpu", [&] { forward_nchw<scalar_t>(x, w, b, y_nchw, g); });
  if (!y.is_same(y_nchw)) y.copy_(y_nchw);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  constexpr const char* op = "conv2d_backward";
  const ConvGeometry g = conv2d_geometry(input, weight, c10::nullopt, stride, padding, dilation, groups, op);
  check_conv2d_grad_output(grad_output, input, g, op);
  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];
  const at::MemoryFormat format = conv2d_memory_format(input, weight);
  auto [dx, dw, db] = conv2d_grad_buffers(input, weight, g, output_mask, format);
  if (g.n == 0 || g.f == 0 || g.c == 0) {  // nothing flows: every gradient is zero
    dx.zero_();
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  if (!need_dx && !need_dw && !need_db) return {dx, dw, db};
  ConvGeometry t;
  if (format == at::MemoryFormat::ChannelsLast && channels_last_direct(g) && (!need_dx || transposed_geometry(g, &t))) {
    const at::Tensor dy = grad_output.contiguous(format), x = input.contiguous(format);
    if (need_db) db.copy_(dy.sum({0, 2, 3}));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_backward_cpu", [&] {
      if (need_dw) {
        conv_weight_grad_nhwc<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                        dw.mutable_data_ptr<scalar_t>(), g);
      }
      if (need_dx) {  // the transposed convolution, in NHWC too
        const at::Tensor w_t = transposed_filters(weight.contiguous(), g).contiguous(format);
        conv_forward_nhwc<scalar_t>(dy.const_data_ptr<scalar_t>(), w_t.const_data_ptr<scalar_t>(), nullptr,
                                    dx.mutable_data_ptr<scalar_t>(), t);
      }
    });
    return {dx, dw, db};
  }
  // The NCHW kernels, into NCHW buffers when the results are channels_last.
  const at::Tensor dy = grad_output.contiguous(), x = input.contiguous(), w = weight.contiguous();
  const bool nchw = format == at::MemoryFormat::Contiguous;
  at::Tensor dx_nchw = nchw || !need_dx ? dx : at::empty(dx.sizes(), dx.options());
  at::Tensor dw_nchw = nchw || !need_dw ? dw : at::empty(dw.sizes(), dw.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_backward_cpu", [&] {
    backward_nchw<scalar_t>(dy, x, w, dx_nchw, dw_nchw, db, g, need_dx, need_dw, need_db);
  });
  if (!dx.is_same(dx_nchw)) dx.copy_(dx_nchw);
  if (!dw.is_same(dw_nchw)) dw.copy_(dw_nchw);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CPU, m) {
  m.impl("conv2d_forward", &conv2d_forward_cpu);
  m.impl("conv2d_backward", &conv2d_backward_cpu);
}

}  // namespace torch_cs231n
