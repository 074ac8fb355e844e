// Conv2d on the CPU: im2col + GEMM (MKL through at::mm), and a direct kernel for depthwise.
//
// The index maps (which input pixel an output position and a filter tap read, and back) are those of
// common/conv2d.h, shared with the CUDA kernels; docs/conv2d.md derives every formula used here.
//
// Work split. The batch is cut into one chunk per thread. Each thread owns its column buffer (bounded:
// it does not grow with N) and runs im2col and a single-threaded GEMM (MKL runs on one thread inside a
// parallel region) on its own samples, so the GEMM reads columns the same core has just written:
//   * small samples (oH*oW < 2048) go in blocks of nb, side by side in one column matrix
//     [C*kH*kW, nb*oH*oW], so that one bigger GEMM covers the block (W packed once, d_W summed over the
//     block inside the GEMM);
//   * large samples are cut, for the forward and d_W, into tiles of a few output rows whose columns fit
//     in a core's L2 (512 KiB), and the GEMM writes each tile's columns of the output in place.
// With fewer samples than threads (N = 1), im2col/col2im and MKL are parallel inside the sample.
//
// Memory format: the output and d_input are contiguous (NCHW) whatever the input's strides; inputs that
// are not contiguous (channels_last, views) are copied to contiguous first.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
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

// ------------------------------------------------------------------------------------------------ GEMM
// out = a · b (+ row_bias[i] on row i), or out += a · b with `accumulate`; 2-D views whose rows or
// columns may be strided (a transposed operand is a view, not a copy). float32 runs our packed GEMM
// (gemm.h), threaded when called outside a parallel region; float64 keeps at::mm.
void gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
               const c10::optional<at::Tensor>& row_bias = c10::nullopt) {
  if (out.scalar_type() == at::kFloat) {
    TORCH_INTERNAL_ASSERT(out.stride(1) == 1 || out.size(1) <= 1);
    cpu::GemmEpilogue ep;
    ep.accumulate = accumulate;
    ep.row_bias = row_bias.has_value() ? row_bias->const_data_ptr<float>() : nullptr;
    cpu::sgemm_parallel(out.size(0), out.size(1), a.size(1), {a.const_data_ptr<float>(), a.stride(0), a.stride(1)},
                        {b.const_data_ptr<float>(), b.stride(0), b.stride(1)}, out.mutable_data_ptr<float>(),
                        out.stride(0), ep);
  } else if (row_bias.has_value()) {
    at::addmm_out(out, row_bias->unsqueeze(1), a, b);  // b broadcast over columns
  } else if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// ------------------------------------------------------------------------------------- im2col, col2im
// The column matrix of a block of nb samples is [C*kH*kW, nb*oH*oW]: sample s fills the columns
// s*oH*oW .. (s+1)*oH*oW - 1, so one GEMM covers the whole block. `ld` is the row length nb*oH*oW.
//
// Row r = (c, t_h, t_w) of one sample's columns:
//     col[r, (o_h, o_w)] = x[c, o_h*sH - pH + t_h*dH, o_w*sW - pW + t_w*dW]   (0 in the padding)
// The valid o_w of the tap are one interval [lo, hi): copy it, zero the rest, no test per element.
template <typename T>
void im2col_row(const T* __restrict__ x_sample, T* __restrict__ col_row, const ConvGeometry& g, int64_t r,
                int64_t oh_begin, int64_t oh_end) {
  const int64_t tw = r % g.kw, th = (r / g.kw) % g.kh, c = r / g.taps();
  const T* x_plane = x_sample + c * g.h * g.w;
  int64_t lo, hi;
  conv_valid_out_range(tw, g.sw, g.pw, g.dw, g.w, g.ow, &lo, &hi);
  const int64_t off = tw * g.dw - g.pw;  // i_w = o_w*sW + off
  for (int64_t o_h = oh_begin; o_h < oh_end; ++o_h) {
    T* dst = col_row + (o_h - oh_begin) * g.ow;
    const int64_t i_h = conv_in_index(o_h, th, g.sh, g.ph, g.dh);
    if (i_h < 0 || i_h >= g.h) {
      std::fill(dst, dst + g.ow, T(0));
      continue;
    }
    const T* x_row = x_plane + i_h * g.w;
    std::fill(dst, dst + lo, T(0));
    if (g.sw == 1) {
      for (int64_t o_w = lo; o_w < hi; ++o_w) dst[o_w] = x_row[o_w + off];
    } else {
      for (int64_t o_w = lo; o_w < hi; ++o_w) dst[o_w] = x_row[o_w * g.sw + off];
    }
    std::fill(dst + hi, dst + g.ow, T(0));
  }
}

// The columns of samples x[0 .. nb-1] (x points at the first), rows in parallel.
template <typename T>
void im2col(const T* x, int64_t nb, T* col, const ConvGeometry& g) {
  const int64_t rows = g.col_rows(), cols = g.col_cols(), ld = nb * cols, in_sample = g.c * g.h * g.w;
  at::parallel_for(0, rows * nb, std::max<int64_t>(1, kGrain / cols), [&](int64_t begin, int64_t end) {
    for (int64_t rs = begin; rs < end; ++rs) {
      const int64_t r = rs / nb, s = rs % nb;
      im2col_row(x + s * in_sample, col + r * ld + s * cols, g, r, 0, g.oh);
    }
  });
}

// The columns of output rows [oh_begin, oh_end) of one sample: a tile [C*kH*kW, (oh_end-oh_begin)*oW].
template <typename T>
void im2col_tile(const T* x_sample, int64_t oh_begin, int64_t oh_end, T* col, const ConvGeometry& g) {
  const int64_t rows = g.col_rows(), ld = (oh_end - oh_begin) * g.ow;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / ld), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) im2col_row(x_sample, col + r * ld, g, r, oh_begin, oh_end);
  });
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

// Sample ranges: the batch cut into one chunk per thread (fewer when N is small). Used by forward and
// backward alike; the backward sums its per-chunk weight gradients in chunk order, so the result is
// deterministic for a given thread count.
// Threads that share the batch: one chunk of samples each, or a single chunk when the whole convolution
// is too small to pay for waking another thread (gradcheck-sized inputs, for one).
constexpr int64_t kMinParallelMacs = int64_t(1) << 17;
int64_t chunk_count(const ConvGeometry& g) {
  const int64_t macs = g.n * g.f * g.c_per_group() * g.taps() * g.col_cols();
  if (macs < kMinParallelMacs) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(g.n, at::get_num_threads()));
}
int64_t chunk_begin(int64_t chunk, int64_t chunks, int64_t n) { return chunk * n / chunks; }

// Samples per GEMM block: enough columns (nb*oH*oW) for MKL to amortise packing W, while the column
// buffer of a thread stays under kColumnBudget elements (it never grows with N).
constexpr int64_t kTargetColumns = 2048;
constexpr int64_t kColumnBudget = int64_t(1) << 21;  // 8 MiB in float32
int64_t block_size(const ConvGeometry& g, int64_t chunk_len) {
  const int64_t by_target = (kTargetColumns + g.col_cols() - 1) / g.col_cols();
  const int64_t by_budget = kColumnBudget / std::max<int64_t>(1, g.col_rows() * g.col_cols());
  return std::max<int64_t>(1, std::min({chunk_len, by_target, by_budget}));
}

// Output rows per column tile when one sample's columns are too big for the cache (forward and d_W).
int64_t tile_size(const ConvGeometry& g) {
  constexpr int64_t budget = int64_t(1) << 17;  // 512 KiB in float32: about a core's L2; measured best of 2^16..2^18
  return std::max<int64_t>(1, std::min(g.oh, budget / std::max<int64_t>(1, g.col_rows() * g.ow)));
}

// ------------------------------------------------------------------------------- forward: im2col + GEMM
// Per block of nb samples and group g:
//     Y_g (Fg x nb*oH*oW) = W_g (Fg x Cg*kH*kW) · col_g (Cg*kH*kW x nb*oH*oW) + b_g
// With nb = 1 the GEMM writes straight into the NCHW output; otherwise into a buffer whose columns are
// then scattered to the nb output samples (one pass over the output, small next to the GEMM).
template <typename T>
void gemm_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  at::Tensor& y, const ConvGeometry& g) {
  const bool pointwise = conv2d_is_pointwise(g);
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps(), cols = g.col_cols();
  const at::Tensor w2d = w.view({g.f, kg});
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t chunks = chunk_count(g);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    // OpenMP workers do not inherit the caller's dispatch state: keep the GEMMs below autograd, where the
    // caller already is (the inputs may require grad; these products are not part of any graph).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t n_begin = chunk_begin(chunk, chunks, g.n), n_end = chunk_begin(chunk + 1, chunks, g.n);
      const int64_t nb_max = pointwise ? 1 : block_size(g, n_end - n_begin);
      // flat buffers; a block of nb samples uses their first rows*nb*cols elements as a [rows, nb*cols] matrix
      const int64_t tile_rows = pointwise || nb_max > 1 ? g.oh : tile_size(g);
      at::Tensor col = pointwise ? at::Tensor()
                                 : at::empty({g.col_rows() * (tile_rows < g.oh ? tile_rows * g.ow : nb_max * cols)}, x.options());
      at::Tensor buf = nb_max > 1 ? at::empty({g.f * nb_max * cols}, x.options()) : at::Tensor();
      // Y_g = W_g · col_g (+ b_g) for every group, into `out` (rows F, columns those of `cols_b`)
      auto gemm = [&](at::Tensor& out, const at::Tensor& cols_b) {
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor y_g = out.narrow(0, grp * fg, fg);
          const at::Tensor w_g = w2d.narrow(0, grp * fg, fg);
          const at::Tensor c_g = cols_b.narrow(0, grp * kg, kg);
          gemm_into(y_g, w_g, c_g, /*accumulate=*/false,
                    has_bias ? c10::optional<at::Tensor>(bias->narrow(0, grp * fg, fg)) : c10::nullopt);
        }
      };
      for (int64_t n0 = n_begin; n0 < n_end; n0 += nb_max) {
        const int64_t nb = std::min(nb_max, n_end - n0);
        const T* x_n = x.const_data_ptr<T>() + n0 * g.c * g.h * g.w;
        if (tile_rows < g.oh) {
          // One large sample: its columns in tiles of tile_rows output rows, each still in cache when the
          // GEMM reads it; the GEMM writes its columns of Y[n] in place (leading dimension oH*oW).
          for (int64_t oh0 = 0; oh0 < g.oh; oh0 += tile_rows) {
            const int64_t oh1 = std::min(g.oh, oh0 + tile_rows), tcols = (oh1 - oh0) * g.ow;
            at::Tensor cols_t = col.narrow(0, 0, g.col_rows() * tcols).view({g.col_rows(), tcols});
            im2col_tile(x_n, oh0, oh1, cols_t.mutable_data_ptr<T>(), g);
            at::Tensor out = y[n0].view({g.f, cols}).narrow(1, oh0 * g.ow, tcols);
            gemm(out, cols_t);
          }
          continue;
        }
        at::Tensor cols_b;
        if (pointwise) {
          cols_b = x[n0].view({g.c, cols});  // 1x1, stride 1, no padding: the input is its own columns
        } else {
          cols_b = col.narrow(0, 0, g.col_rows() * nb * cols).view({g.col_rows(), nb * cols});
          im2col(x_n, nb, cols_b.mutable_data_ptr<T>(), g);
        }
        at::Tensor out = nb == 1 ? y[n0].view({g.f, cols}) : buf.narrow(0, 0, g.f * nb * cols).view({g.f, nb * cols});
        gemm(out, cols_b);
        if (nb > 1) y.narrow(0, n0, nb).view({nb, g.f, cols}).copy_(out.view({g.f, nb, cols}).transpose(0, 1));
      }
    }
  });
}

// ---------------------------------------------------------------------------- backward: GEMM + col2im
// Per block of nb samples and group g, with dY_b = [dY[n0] | dY[n0+1] | ...] (Fg x nb*oH*oW):
//   d_W_g += dY_b · col_gᵀ             (K = nb*oH*oW: one GEMM sums the block's samples)
//   d_col_g = W_gᵀ · dY_b              then d_x[n] = col2im(d_col[n]): the transposed convolution
// Pointwise: the columns are x[n] itself and d_x[n] = Wᵀ · dY[n] directly.
template <typename T>
void gemm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, at::Tensor& dx, at::Tensor& dw,
                   const ConvGeometry& g, bool need_dx, bool need_dw) {
  const bool pointwise = conv2d_is_pointwise(g);
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps(), cols = g.col_cols();
  const at::Tensor w2d = w.view({g.f, kg});
  const int64_t chunks = chunk_count(g);
  at::Tensor partial = need_dw ? at::zeros({chunks, g.f, kg}, x.options()) : at::Tensor();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see gemm_forward
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t n_begin = chunk_begin(chunk, chunks, g.n), n_end = chunk_begin(chunk + 1, chunks, g.n);
      const int64_t nb_max = pointwise ? 1 : block_size(g, n_end - n_begin);
      const int64_t tile_rows = pointwise || nb_max > 1 ? g.oh : tile_size(g);
      // flat buffers; a block of nb samples uses their first rows*nb*cols elements as a [rows, nb*cols] matrix
      // (d_col needs the whole sample; the tiles of d_W use its beginning)
      at::Tensor col = pointwise ? at::Tensor() : at::empty({g.col_rows() * nb_max * cols}, x.options());
      at::Tensor dy_buf = nb_max > 1 ? at::empty({g.f * nb_max * cols}, x.options()) : at::Tensor();
      at::Tensor dw_chunk = need_dw ? partial[chunk] : at::Tensor();
      for (int64_t n0 = n_begin; n0 < n_end; n0 += nb_max) {
        const int64_t nb = std::min(nb_max, n_end - n0);
        at::Tensor dy_b;
        if (nb == 1) {
          dy_b = dy[n0].view({g.f, cols});
        } else {  // gather the block's dY side by side: [dY[n0] | dY[n0+1] | ...]
          dy_b = dy_buf.narrow(0, 0, g.f * nb * cols).view({g.f, nb * cols});
          dy_b.view({g.f, nb, cols}).copy_(dy.narrow(0, n0, nb).view({nb, g.f, cols}).transpose(0, 1));
        }
        at::Tensor col_b =
            pointwise ? at::Tensor() : col.narrow(0, 0, g.col_rows() * nb * cols).view({g.col_rows(), nb * cols});
        if (need_dw && tile_rows < g.oh) {
          // One large sample: d_W += dY[:, tile] · col_tileᵀ, tile by tile, each tile still in cache.
          const T* x_n = x.const_data_ptr<T>() + n0 * g.c * g.h * g.w;
          for (int64_t oh0 = 0; oh0 < g.oh; oh0 += tile_rows) {
            const int64_t oh1 = std::min(g.oh, oh0 + tile_rows), tcols = (oh1 - oh0) * g.ow;
            at::Tensor cols_t = col.narrow(0, 0, g.col_rows() * tcols).view({g.col_rows(), tcols});
            im2col_tile(x_n, oh0, oh1, cols_t.mutable_data_ptr<T>(), g);
            const at::Tensor dy_t = dy_b.narrow(1, oh0 * g.ow, tcols);
            for (int64_t grp = 0; grp < g.groups; ++grp) {
              at::Tensor dw_g = dw_chunk.narrow(0, grp * fg, fg);
              gemm_into(dw_g, dy_t.narrow(0, grp * fg, fg), cols_t.narrow(0, grp * kg, kg).t(), /*accumulate=*/true);
            }
          }
        } else if (need_dw) {
          at::Tensor cols_b;
          if (pointwise) {
            cols_b = x[n0].view({g.c, cols});
          } else {
            im2col(x.const_data_ptr<T>() + n0 * g.c * g.h * g.w, nb, col_b.mutable_data_ptr<T>(), g);
            cols_b = col_b;
          }
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            at::Tensor dw_g = dw_chunk.narrow(0, grp * fg, fg);
            gemm_into(dw_g, dy_b.narrow(0, grp * fg, fg), cols_b.narrow(0, grp * kg, kg).t(), /*accumulate=*/true);
          }
        }
        if (need_dx) {
          // The column buffer is free again (d_W has used it): it now receives d_col.
          at::Tensor dcol = pointwise ? dx[n0].view({g.c, cols}) : col_b;
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            at::Tensor out = dcol.narrow(0, grp * kg, kg);
            gemm_into(out, w2d.narrow(0, grp * fg, fg).t(), dy_b.narrow(0, grp * fg, fg), /*accumulate=*/false);
          }
          if (!pointwise) {
            col2im(col_b.const_data_ptr<T>(), nb, dx.mutable_data_ptr<T>() + n0 * g.c * g.h * g.w, g);
          }
        }
      }
    }
  });
  if (need_dw) dw.copy_(partial.sum(0).view(dw.sizes()));
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
  at::parallel_for(0, g.c, std::max<int64_t>(1, kGrain / per_channel), [&](int64_t begin, int64_t end) {
    if (cpu_has_avx2_fma()) {
      depthwise_backward_channels_avx2<T>(dyp, xp, wp, dxp, dwp, dbp, g, begin, end);
    } else {
      depthwise_backward_channels<T>(dyp, xp, wp, dxp, dwp, dbp, g, begin, end);
    }
  });
}

// ---------------------------------------------------------------------------------------------- the ops
at::Tensor conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g = conv2d_geometry(input, weight, bias, stride, padding, dilation, groups, "conv2d_forward");
  at::Tensor y = at::empty({g.n, g.f, g.oh, g.ow}, input.options());  // contiguous NCHW, see the top
  if (y.numel() == 0) return y;
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  c10::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_cpu", [&] {
    if (conv2d_is_depthwise(g)) {
      depthwise_forward<scalar_t>(x, w, b, y, g);
    } else {
      gemm_forward<scalar_t>(x, w, b, y, g);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  constexpr const char* op = "conv2d_backward";
  const ConvGeometry g = conv2d_geometry(input, weight, c10::nullopt, stride, padding, dilation, groups, op);
  check_conv2d_grad_output(grad_output, input, g, op);
  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];
  auto [dx, dw, db] = conv2d_grad_buffers(input, weight, g, output_mask);
  if (g.n == 0 || g.f == 0 || g.c == 0) {  // nothing flows: every gradient is zero
    dx.zero_();
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  const at::Tensor dy = grad_output.contiguous();
  const bool depthwise = conv2d_is_depthwise(g);
  // d_b[f] = Σ_{n, o_h, o_w} dY[n, f, o_h, o_w]; the depthwise kernel sums it in its own pass over dY
  if (need_db && !depthwise) db.copy_(dy.sum({0, 2, 3}));
  if (need_dx || need_dw || (need_db && depthwise)) {
    const at::Tensor x = input.contiguous();
    const at::Tensor w = weight.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_backward_cpu", [&] {
      if (depthwise) {
        depthwise_backward<scalar_t>(dy, x, w, dx, dw, db, g, need_dx, need_dw, need_db);
      } else if (need_dx || need_dw) {
        gemm_backward<scalar_t>(dy, x, w, dx, dw, g, need_dx, need_dw);
      }
    });
  }
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CPU, m) {
  m.impl("conv2d_forward", &conv2d_forward_cpu);
  m.impl("conv2d_backward", &conv2d_backward_cpu);
}

}  // namespace torch_cs231n
