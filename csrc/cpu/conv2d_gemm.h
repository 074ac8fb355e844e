// The CPU convolution in NCHW: the implicit-GEMM forward and the backward (d_W panels, d_col + col2im, d_x as the
// transposed convolution). Part of the CPU convolution (cpu/conv2d.cpp, which routes each layer; docs/conv2d.md has the
// table).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/conv2d.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/conv2d_im2col.h"
#include "cpu/conv2d_shifted.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"

namespace torch_cs231n {
namespace conv2d_cpu {

// ------------------------------------------------------------------------------ forward: implicit GEMM
// Per block of nb samples and group g:
//     Y_g (Fg x nb*oH*oW) = W_g (Fg x Cg*kH*kW) · col_g (Cg*kH*kW x nb*oH*oW) + b_g
// with col_g packed straight from x (pack_columns). With nb = 1 the GEMM writes into the NCHW output;
// otherwise into a buffer whose columns are then copied to the nb samples (one pass over the output,
// small next to the GEMM). Raw pointers, contiguous NCHW tensors: the backward's d_x reuses it.
template <typename T>
void conv_forward_gemm(const T* x, const T* w, const T* b, T* y, const Conv2dGeometry& g) {
  if (use_shifted_planes(g)) {
    conv_forward_shifted(x, w, b, y, g);
    return;
  }
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps(), cols = g.col_cols();
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * cols;
  const int64_t chunks = chunk_count(g);
  for_chunks(chunks, [&](int64_t cb, int64_t ce) {
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
inline bool transposed_geometry(const Conv2dGeometry& g, Conv2dGeometry* t) {
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

// The filters of that convolution as a tensor, for the NCHW GEMM and the depthwise kernels (the pixel
// kernels read them through W's strides instead: filter_segments, conv2d_pixels.h):
//     W_t[g*Cg + c, f, kH-1-t_h, kW-1-t_w] = W[g*Fg + f, c, t_h, t_w]
// from a weight of any strides, NCHW. One pass, parallel over W_t's channels, writing along its memory
// (torch's transpose, flip and copies took 5 ms a call at 512 x 512 x 3 x 3). A 1 x 1 layer's channels
// lie side by side, and each group's W_t is its matrix transposed, by blocks of 16 x 16: a channel at a
// time read W down its columns, a cache line a value (a third of d_x of (1, 256, 14, 14) -> 1024).
inline at::Tensor transposed_filters(const at::Tensor& w, const Conv2dGeometry& g) {
  const int64_t fg = g.f_per_group(), cg = g.c_per_group(), kh = g.kh, kw = g.kw;
  at::Tensor out = at::empty({g.c, fg, kh, kw}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "transposed_filters", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t s0 = w.stride(0), s1 = w.stride(1), s2 = w.stride(2), s3 = w.stride(3);
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      if (kh * kw == 1 && s1 == 1) {  // W_t[g*Cg + c, f] = W[g*Fg + f, c]: blocks of 16 filters
        constexpr int64_t kBlock = 16;
        const int64_t blocks = (fg + kBlock - 1) / kBlock;
        at::parallel_for(0, g.groups * blocks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const int64_t grp = i / blocks, f0 = i % blocks * kBlock, rows = std::min(kBlock, fg - f0);
            cpu::transpose_matrix(src + (grp * fg + f0) * s0, s0, rows, cg, dst + grp * cg * fg + f0, fg);
          }
        });
        return;
      }
    }
    at::parallel_for(0, g.c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ct = begin; ct < end; ++ct) {  // W_t's channel: group ct / Cg, W's in-channel ct % Cg
        const scalar_t* from = src + (ct / cg) * fg * s0 + (ct % cg) * s1 + (kh - 1) * s2 + (kw - 1) * s3;
        scalar_t* to = dst + ct * fg * kh * kw;
        for (int64_t f = 0; f < fg; ++f)
          for (int64_t th = 0; th < kh; ++th)
            for (int64_t tw = 0; tw < kw; ++tw) *to++ = from[f * s0 - th * s2 - tw * s3];
      }
    });
  });
  return out;
}

// Per block of nb samples and group g, with dY_b = [dY[n0] | dY[n0+1] | ...] (Fg x nb*oH*oW):
//   d_W_g += dY_b · col_gᵀ        (K = nb*oH*oW; B packed straight from x: pack_columns_transposed)
// and, when the layer is strided, d_col_g = W_gᵀ · dY_b, then d_x[n] = col2im(d_col[n]).
template <typename T>
void conv_backward_gemm(const T* dy, const T* x, const T* w, T* dx, T* dw, const Conv2dGeometry& g, bool dx_by_col2im) {
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps(), cols = g.col_cols();
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * cols;
  const int64_t chunks = chunk_count(g);
  const ChunkPartials<T> partial(dw ? chunks : 0, g.f * kg);
  for_chunks(chunks, [&](int64_t cb, int64_t ce) {
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t n_begin = chunk_begin(chunk, chunks, g.n), n_end = chunk_begin(chunk + 1, chunks, g.n);
      const int64_t nb_max = block_size(g, n_end - n_begin);
      T* dy_buffer = nb_max > 1 ? cpu::thread_scratch<T>(cpu::Scratch::kGrad, g.f * nb_max * cols) : nullptr;
      T* dcol = dx_by_col2im ? cpu::thread_scratch<T>(cpu::Scratch::kRows, g.col_rows() * nb_max * cols) : nullptr;
      T* dw_chunk = dw ? partial.of(chunk) : nullptr;
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
            ep.accumulate = n0 > n_begin;
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
  if (dw) partial.sum_into(chunks, dw);
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
