// The CPU convolution with pixels as GEMM rows: channels_last (NHWC) layers, NCHW layers transposed in cache, and small
// images as pixel rows. Part of the CPU convolution (cpu/conv2d.cpp, which routes each layer; docs/conv2d.md has the
// table).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/conv2d.h"
#include "cpu/conv2d_blocks.h"
#include "cpu/conv2d_shifted.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm.h"

namespace torch_cs231n {
namespace conv2d_cpu {

// ------------------------------------------------------------------------------ the filters as B
// gemm_segments' B for each group of a layer's filters W [F, C/groups, kH, kW], the taps as segments, read
// through W's own strides (NCHW, channels_last, or a phase's taps: a strided view), never copied:
//     the forward              B_t[c, f] = W[grp*Fg + f, c, t]
//     the transposed (d_x)     B_t[f, c] = W[grp*Fg + f, c, T-1-t]
// the transposed convolution's filters are W's flipped, f and c trading places (docs/conv2d.md). g is
// the geometry of the convolution that runs: its C and F per group are the segments' rows and B's columns.
// The taps must lie evenly spaced (t_h's stride kW times t_w's), as in any contiguous layout; a view
// whose taps do not (a phase's) is copied first.
// The packed filters lie in the calling thread's scratch, so one set at a time, unless `own_storage`.
template <typename T>
struct FilterSegments {
  at::Tensor w;            // W, or its copy with evenly spaced taps: the views below read it
  std::vector<T> storage;  // the packed filters, when own_storage
  std::vector<cpu::SegmentsB<T>> groups;
};

template <typename T>
FilterSegments<T> filter_segments(const at::Tensor& weight, bool transposed, const Conv2dGeometry& g,
                                  bool own_storage = false) {
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const bool even = kh == 1 || kw == 1 || weight.stride(2) == kw * weight.stride(3);
  FilterSegments<T> out{even ? weight : weight.contiguous(), {}, {}};
  const at::Tensor& w = out.w;
  const int64_t st = kw > 1 ? w.stride(3) : w.stride(2);  // from one tap to the next
  const int64_t fg = w.size(0) / g.groups, kc = g.c_per_group(), n = g.f_per_group(),
                size = cpu::segments_b_size<T>(g.taps() * kc, n);
  if (own_storage) out.storage.resize(g.groups * size);
  T* packed = own_storage ? out.storage.data() : cpu::thread_scratch<T>(cpu::Scratch::kFilters, g.groups * size);
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const T* base = w.const_data_ptr<T>() + grp * fg * w.stride(0);
    const cpu::SegmentedView<T> view =
        transposed ? cpu::SegmentedView<T>{base + (g.taps() - 1) * st, -st, w.stride(0), w.stride(1)}
                   : cpu::SegmentedView<T>{base, st, w.stride(1), w.stride(0)};
    out.groups.push_back(cpu::prepare_segments_b<T>(g.taps(), kc, n, view, packed + grp * size));
  }
  return out;
}

// ---------------------------------------------------------------------------- channels_last (NHWC)
// In NHWC a pixel's channels are contiguous, so pixels are the GEMM's rows and channels its k. With
// stride 1 and the shifted planes (above), now of pixels: x_pad[Hp][Wp][C], output j = (o_h, o_w) at
// pixel p(j) = o_h*Wp + o_w of the padded pitch,
//     Y[j, f] = b[f] + Σ_{t_h, t_w} Σ_c x_pad[p(j) + t_h*dH*Wp + t_w*dW, c] · W[f, c, t_h, t_w]
// one GEMM per tap over the channels, summed: Y = Σ_taps A_tap · B_tap, where A_tap is x_pad shifted by
// the tap (its rows read in place through the table p(j), so the pitch's padding pixels are skipped) and
// B_tap = W[:, :, t_h, t_w]ᵀ (cpu::gemm_segments; filter_segments above). A strided layer splits x_pad
// into the stride's phases first (conv2d_shifted.h), pixel-major: each tap is again one shift, of one
// phase, in the outputs' pitch Wq. It runs one sample at a time (kMinPixelsPerSample).
inline bool channels_last_direct(const Conv2dGeometry& g) {
  return !conv2d_is_depthwise(g) && g.col_cols() >= kMinPixelsPerSample;
}

// p(j) * unit for every output j = o_h*oW + o_w: where its pixel starts in x_pad, in elements (unit = C)
// or in any other count per pixel (bfloat16 pairs; 1: the pixel itself).
inline std::vector<int64_t> output_pixels(const Conv2dGeometry& g, const ShiftedPlanes& sp, int64_t unit) {
  std::vector<int64_t> rows(g.col_cols());
  for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
    for (int64_t o_w = 0; o_w < g.ow; ++o_w) rows[o_h * g.ow + o_w] = (o_h * sp.wq + o_w) * unit;
  }
  return rows;
}

// x_pad = the NHWC sample x with pH rows and pW columns of zero pixels around it.
template <typename T>
void pad_pixels(const T* x, const Conv2dGeometry& g, const ShiftedPlanes& sp, T* x_pad) {
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

// x_pad = the NHWC sample x padded and split into the stride's phases, pixel-major (phase_pixel; pad_pixels
// itself for stride 1). Taps read it at shifted_offset(g, sp, t) pixels from an output's.
template <typename T>
void pad_pixel_phases(const T* x, const Conv2dGeometry& g, const ShiftedPlanes& sp, T* x_pad) {
  if (sp.sh == 1 && sp.sw == 1) return pad_pixels(x, g, sp, x_pad);
  std::fill(x_pad, x_pad + sp.plane() * g.c, T(0));
  for (int64_t i = 0; i < g.h; ++i) {
    for (int64_t j = 0; j < g.w; ++j) {
      const T* src = x + (i * g.w + j) * g.c;
      std::copy(src, src + g.c, x_pad + phase_pixel(sp, g.ph + i, g.pw + j) * g.c);
    }
  }
}

// The padded-plane offset, in pixels, of the input under tap t of output (o_h, o_w): common/conv2d.h's
// conv_in_index, shifted by the padding.
CS231N_INLINE int64_t dw_in_pixel(const Conv2dGeometry& g, const ShiftedPlanes& sp, int64_t o_h, int64_t o_w,
                                  int64_t t) {
  const int64_t i_h = conv_in_index(o_h, t / g.kw, g.sh, g.ph, g.dh) + g.ph;
  const int64_t i_w = conv_in_index(o_w, t % g.kw, g.sw, g.pw, g.dw) + g.pw;
  return i_h * sp.wp + i_w;
}

// x_pad from an NCHW sample: the same, each pixel's channels gathered (a transpose done while padding).
template <typename T>
void pad_pixels_from_planes(const T* x, const Conv2dGeometry& g, const ShiftedPlanes& sp, T* x_pad) {
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

// pad_pixel_phases from an NCHW sample: each input row's [C x W] slice transposed (in L1), then its
// pixels copied to their phases (pad_pixels_from_planes itself for stride 1).
template <typename T>
void pad_pixel_phases_from_planes(const T* x, const Conv2dGeometry& g, const ShiftedPlanes& sp, T* x_pad) {
  if (sp.sh == 1 && sp.sw == 1) return pad_pixels_from_planes(x, g, sp, x_pad);
  T* row = cpu::thread_scratch<T>(cpu::Scratch::kTransposed, g.w * g.c);
  std::fill(x_pad, x_pad + sp.plane() * g.c, T(0));
  for (int64_t i = 0; i < g.h; ++i) {
    cpu::transpose_matrix(x + i * g.w, g.h * g.w, g.c, g.w, row, g.c);
    for (int64_t j = 0; j < g.w; ++j) {
      std::copy(row + j * g.c, row + (j + 1) * g.c, x_pad + phase_pixel(sp, g.ph + i, g.pw + j) * g.c);
    }
  }
}

// The forward in NHWC, by the filters of w (filter_segments: W's own, or when `transposed` those of its
// transposed convolution, g being that convolution); x and y are NHWC, or NCHW when `planes` is set
// (transposed per sample on the way in and out, while the sample is in cache).
template <typename T>
void conv_forward_nhwc(const T* x, const at::Tensor& w, bool transposed, const T* b, T* y, const Conv2dGeometry& g,
                       bool planes = false) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t fg = g.f_per_group(), cg = g.c_per_group();
  const int64_t in_sample = g.h * g.w * g.c, out_sample = g.col_cols() * g.f;
  const int64_t chunks = chunk_count(g);
  const FilterSegments<T> filters = filter_segments<T>(w, transposed, g);  // packed once for every sample
  // The GEMM's rows are the real outputs only: row (o_h, o_w) reads the pixels at its place in the pitch
  // Wq, and the pitch's thrown-away pixels (2 of 16 in a 14x14 image) are never computed.
  const std::vector<int64_t> rows = output_pixels(g, sp, g.c);
  for_chunks(chunks, [&](int64_t cb, int64_t ce) {
    T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.plane() * g.c);
    T* out = planes ? cpu::thread_scratch<T>(cpu::Scratch::kOut, g.col_cols() * g.f) : nullptr;
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        if (planes) {
          pad_pixel_phases_from_planes(x + n * in_sample, g, sp, x_pad);
        } else {
          pad_pixel_phases(x + n * in_sample, g, sp, x_pad);
        }
        T* y_n = y + n * out_sample;
        T* pixels = planes ? out : y_n;  // [pixels x F]: NHWC's y itself
        for_each_group(g, [&](int64_t grp) {
          std::vector<const T*> taps(g.taps());
          for (int64_t t = 0; t < g.taps(); ++t) taps[t] = x_pad + shifted_offset(g, sp, t) * g.c + grp * cg;
          cpu::GemmEpilogue<T> ep;
          ep.col_bias = b ? b + grp * fg : nullptr;
          cpu::gemm_segments<T>(g.col_cols(), taps.data(), g.c, filters.groups[grp], pixels + grp * fg, g.f, ep,
                                rows.data());
        });
        if (planes) cpu::transpose_matrix(out, g.f, g.col_cols(), g.f, y_n, g.col_cols());  // -> y[n][F][pixels]
      }
    }
  });
}

// Filters (or their gradients) from the pixel kernels' order [F][taps][C] (channels_last memory) to
// NCHW's [F][C][taps], each filter's taps x C matrix transposed, in parallel over the filters.
template <typename T>
void taps_major_to_nchw(const T* src, T* dst, const Conv2dGeometry& g) {
  const int64_t k = g.taps() * g.c_per_group();
  at::parallel_for(0, g.f, 1, [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      cpu::transpose_matrix(src + f * k, g.c_per_group(), g.taps(), g.c_per_group(), dst + f * k, g.taps());
    }
  });
}

// d_W from the products' d_W_gᵀ, [groups][(t, c) x Fg] at dwt, into dw: W's channels_last order
// [F][taps][Cg], or with `planes` NCHW's [F][Cg][taps]. The latter 16 filters at a time, through their
// [16][taps][Cg] in a buffer of the thread's (in L2), each filter then transposed into place: one pass
// over memory where the two transposes one after the other made two (they were a fifth of a batch-1 NCHW
// d_W of (1, 256, 14, 14) 3 x 3, which now takes 0.91 of its time). In parallel over the blocks of filters.
template <typename T>
void weight_grad_from_transposed(const T* dwt, T* dw, const Conv2dGeometry& g, bool planes) {
  const int64_t fg = g.f_per_group(), cg = g.c_per_group(), kg = g.taps() * cg;
  if (!planes) {
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      cpu::transpose_matrix(dwt + grp * kg * fg, fg, kg, fg, dw + grp * fg * kg, kg);
    }
    return;
  }
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (fg + kBlock - 1) / kBlock;
  at::parallel_for(0, g.groups * blocks, 1, [&](int64_t begin, int64_t end) {
    T* block = cpu::thread_scratch<T>(cpu::Scratch::kOut, kBlock * kg);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / blocks, f0 = item % blocks * kBlock, nf = std::min(kBlock, fg - f0);
      cpu::transpose_matrix(dwt + grp * kg * fg + f0, fg, kg, nf, block, kg);
      for (int64_t f = 0; f < nf; ++f) {
        cpu::transpose_matrix(block + f * kg, cg, g.taps(), cg, dw + (grp * fg + f0 + f) * kg, g.taps());
      }
    }
  });
}

// rows[t*cg + c] = where row (t, c) of col(x)ᵀ starts (cpu::gemm_gather_a's A), cg channels from `first`
// (a group's first channel of a padded plane): tap t's shift plus c.
template <typename T>
void col_rows_from(const T* first, const Conv2dGeometry& g, const ShiftedPlanes& sp, int64_t cg, const T** rows) {
  for (int64_t t = 0; t < g.taps(); ++t) {
    const T* tap = first + shifted_offset(g, sp, t) * g.c;
    for (int64_t c = 0; c < cg; ++c) rows[t * cg + c] = tap + c;
  }
}

// d_W in NHWC: d_W_g[f, (t, c)] += Σ_j dY[j, f] · x_pad[pixel(j) + offset(t), c] over the real outputs
// j, pixel(j) being j's place in the pitch Wq of x_pad (in the stride's phases): the pitch's thrown-away
// pixels are never summed. On AVX-512 (float32) neither operand is copied: d_W_gᵀ = col(x)ᵀ · dY, row
// (t, c) of col(x)ᵀ starting at its tap's shift of x_pad and column j adding pixel(j), dY's rows as they
// lie (cpu::gemm_gather_a); transposed into W's order at the end. Elsewhere A = dYᵀ, whose packing copies
// MR channels of a pixel, and B's rows are the outputs' pixels, each a run of C channels per tap: packing
// copies runs. dw is W's shape in channels_last memory; or, when `planes`, x, dY and dw are NCHW (x and dY
// transposed per sample while it is in cache).
template <typename T>
void conv_weight_grad_nhwc(const T* dy, const T* x, T* dw, const Conv2dGeometry& g, bool planes = false) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t fg = g.f_per_group(), cg = g.c_per_group(), kg = cg * g.taps(), outputs = g.col_cols();
  const int64_t in_sample = g.h * g.w * g.c, out_sample = outputs * g.f;
  const int64_t chunks = chunk_count(g);
  const ChunkPartials<T> partial(chunks, g.f * kg);
  const std::vector<int64_t> pixels = output_pixels(g, sp, g.c);
  std::vector<int64_t> offsets(g.taps());
  for (int64_t t = 0; t < g.taps(); ++t) offsets[t] = shifted_offset(g, sp, t);
  const bool gather = std::is_same_v<T, float> && cpu::gather_a_available();
  for_chunks(chunks, [&](int64_t cb, int64_t ce) {
    T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.plane() * g.c);
    T* dy_t = planes ? cpu::thread_scratch<T>(cpu::Scratch::kGrad, out_sample) : nullptr;  // [pixels x F]
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        if (planes) {
          pad_pixel_phases_from_planes(x + n * in_sample, g, sp, x_pad);
          cpu::transpose_matrix(dy + n * out_sample, outputs, g.f, outputs, dy_t, g.f);
        } else {
          pad_pixel_phases(x + n * in_sample, g, sp, x_pad);
        }
        const T* dy_n = planes ? dy_t : dy + n * out_sample;
        for_each_group(g, [&](int64_t grp) {
          const T* x_grp = x_pad + grp * cg;
          if constexpr (std::is_same_v<T, float>) {
            if (gather) {                       // d_W_gᵀ [kg x fg] into the chunk's buffer
              std::vector<const T*> a_row(kg);  // where each row (t, c) of the group's col(x)ᵀ starts
              col_rows_from(x_grp, g, sp, cg, a_row.data());
              cpu::GemmEpilogue<T> ep;
              ep.accumulate = n > chunk_begin(chunk, chunks, g.n);
              cpu::gemm_gather_a(kg, fg, outputs, a_row.data(), pixels.data(), dy_n + grp * fg, g.f,
                                 partial.of(chunk) + grp * kg * fg, fg, ep);
              return;
            }
          }
          // Runs of channels, one tap at a time (the same cut for every row p), copied in the CPU's widest
          // vectors (with_best_isa: the baseline build's copies are SSE).
          const cpu::PackB<T> pack = [&, x_grp](int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, T* dst) {
            cpu::with_best_isa([&] {
              for (int64_t k = j0; k < j0 + nc;) {
                const int64_t t = k / cg, c = k % cg, len = std::min(cg - c, j0 + nc - k);
                const T* run = x_grp + offsets[t] * g.c + c;
                for (int64_t p = 0; p < kc; ++p) {
                  cpu::copy_run_to_slivers(run + pixels[p0 + p], k - j0, len, p, kc, nr, dst);
                }
                k += len;
              }
              cpu::zero_last_sliver_tail(dst, kc, nc, nr);
            });
          };
          cpu::GemmEpilogue<T> ep;
          ep.accumulate = n > chunk_begin(chunk, chunks, g.n);
          cpu::gemm<T>(fg, kg, outputs, {dy_n + grp * fg, 1, g.f}, pack, partial.of(chunk) + grp * fg * kg, kg, ep);
        });
      }
    }
  });
  if (gather) {  // each group's [kg x fg] summed, then transposed into W's order
    partial.sum_into(chunks, partial.of(0));
    weight_grad_from_transposed(partial.of(0), dw, g, planes);
    return;
  }
  if (!planes) {
    partial.sum_into(chunks, dw);
    return;
  }
  // [F][taps][C] summed into the first chunk's buffer, then in NCHW's order into dw
  partial.sum_into(chunks, partial.of(0));
  taps_major_to_nchw(partial.of(0), dw, g);
}

// --------------------------------------------------------------------------- small images: pixel rows
// Below kMinPixelsPerSample outputs (ResNet's 8x8 and 4x4 stages, whose filters are the largest), every
// output pixel of a block of samples becomes a row of one GEMM, through the im2col of channels_last:
//     A[j, (t, c)] = x_pad[s, o_h*sH + t_h*dH, o_w*sW + t_w*dW, c]        row j = (s, o_h, o_w)
// built by copying C contiguous channels per row and tap (the NCHW im2col would copy rows of 4 or 8).
//     Y[j, f]        = b[f] + Σ_t A[j, (t, :)] · W[f, :, t]ᵀ    (gemm_segments: taps as segments)
//     d_W[f, (t, c)] = Σ_j dY[j, f] · A[j, (t, c)]              (one GEMM, both operands copied)
// NCHW samples are transposed to and from pixels in cache (`planes`); NHWC ones are read and written as
// they are. With groups (ResNeXt's last stages: 32 groups of 16 or 32 channels on 14 x 14 and 7 x 7
// images) each group is its own product over the same rows: its channels' runs as segments, its filters
// as B, its outputs as C's columns. At least 16 channels a group, as the NHWC kernel: fewer fill too little
// of a vector (the layers of 4 and 8 channels a group run elsewhere).
inline bool use_pixel_rows(const Conv2dGeometry& g) {
  return g.col_cols() < kMinPixelsPerSample && g.c_per_group() >= 16;
}

// Samples per block, when each takes per_sample elements of a block's buffer: under twice kColumnBudget
// elements, in equal blocks.
inline int64_t samples_per_block(const Conv2dGeometry& g, int64_t per_sample) {
  const int64_t most = std::max<int64_t>(1, 2 * kColumnBudget / std::max<int64_t>(1, per_sample));
  const int64_t blocks = (g.n + most - 1) / most;
  return (g.n + blocks - 1) / blocks;
}

// Samples per block of pixel rows (oH*oW x taps*C a sample).
inline int64_t pixel_rows_block(const Conv2dGeometry& g) { return samples_per_block(g, g.col_cols() * g.taps() * g.c); }

// A's rows for samples [n0, n0 + nb) of x (NCHW when `planes`, else NHWC), in parallel over the samples.
// Columns group by group, (grp, t, c) for c of the group, so that each group's are one run of taps·Cg
// in W's channels_last order (one group: (t, c)).
template <typename T>
void build_pixel_rows(const T* x, int64_t n0, int64_t nb, const Conv2dGeometry& g, bool planes, T* rows) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t k = g.taps() * g.c, in_sample = g.c * g.h * g.w, p = g.col_cols(), cg = g.c_per_group(),
                kg = g.taps() * cg;
  at::parallel_for(0, nb, 1, [&](int64_t s0, int64_t s1) {
    T* x_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, sp.hp * sp.wp * g.c);
    for (int64_t s = s0; s < s1; ++s) {
      if (planes) {
        pad_pixels_from_planes(x + (n0 + s) * in_sample, g, sp, x_pad);
      } else {
        pad_pixels(x + (n0 + s) * in_sample, g, sp, x_pad);
      }
      for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
        for (int64_t o_w = 0; o_w < g.ow; ++o_w) {
          T* row = rows + (s * p + o_h * g.ow + o_w) * k;
          for (int64_t t = 0; t < g.taps(); ++t) {
            const T* src = x_pad + dw_in_pixel(g, sp, o_h, o_w, t) * g.c;
            for (int64_t grp = 0; grp < g.groups; ++grp) {
              std::copy(src + grp * cg, src + (grp + 1) * cg, row + grp * kg + t * cg);
            }
          }
        }
      }
    }
  });
}

// The same rows from NCHW x with their columns in W's NCHW order (c, t), for d_W: the product
// dYᵀ · rows is then d_W as NCHW holds it (a group's columns are one run: its channels'). Each
// (sample, channel) plane is read once, an output's taps through a table of their offsets in the plane
// (-1: the padding's zeros). The im2col route's packer (pack_columns_transposed, building col(x)ᵀ
// inside the GEMM's packing) gives the same product but took 3.3 ms against 2.8 at (16, 512, 4, 4)
// 3 x 3, and 1.9 against 1.4 at (16, 256, 8, 8) stride 2.
template <typename T>
void build_pixel_rows_channels_major(const T* x, int64_t n0, int64_t nb, const Conv2dGeometry& g, T* rows) {
  const int64_t taps = g.taps(), k = taps * g.c, p = g.col_cols(), plane = g.h * g.w;
  constexpr bool kTransposable = std::is_same_v<T, float> || std::is_same_v<T, double>;  // (transpose_matrix's)
  if (kTransposable && taps == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0) {
    // 1 x 1 of stride 1 without padding: a sample's rows are its [C][P] planes transposed, by 16 x 16 blocks
    // (element by element, each plane's outputs were written C values apart: a quarter of (16, 1024, 8, 8)
    // -> 256's forward and d_W)
    at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
      if constexpr (kTransposable) {
        for (int64_t s = begin; s < end; ++s) {
          cpu::transpose_matrix(x + (n0 + s) * g.c * plane, plane, g.c, plane, rows + s * p * k, k);
        }
      }
    });
    return;
  }
  std::vector<int64_t> offset(p * taps);  // [output][tap]: the tap's element of the input plane
  for (int64_t o = 0; o < p; ++o) {
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t i_h = conv_in_index(o / g.ow, t / g.kw, g.sh, g.ph, g.dh);
      const int64_t i_w = conv_in_index(o % g.ow, t % g.kw, g.sw, g.pw, g.dw);
      offset[o * taps + t] = i_h >= 0 && i_h < g.h && i_w >= 0 && i_w < g.w ? i_h * g.w + i_w : -1;
    }
  }
  at::parallel_for(0, nb * g.c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / g.c, c = item % g.c;
      const T* x_plane = x + ((n0 + s) * g.c + c) * plane;
      for (int64_t o = 0; o < p; ++o) {
        T* dst = rows + (s * p + o) * k + c * taps;
        const int64_t* off = offset.data() + o * taps;
        for (int64_t t = 0; t < taps; ++t) dst[t] = off[t] >= 0 ? x_plane[off[t]] : T(0);
      }
    }
  });
}

// The padded planes of a block of samples side by side (pad_pixel_phases each, or its _from_planes), in
// which the rows of all the block's outputs are places: the NHWC kernel's row table, made to span
// samples. Read in place by gemm_segments (taps as segments) and gemm_gather_a (d_W), it stands for the
// pixel rows' im2col without copying each input taps times: (16, 256, 8, 8) 3 x 3, 1.6 MiB of padded
// planes where the rows were 9.4 MiB. The forward of strided NCHW layers keeps the im2col: transposed
// into the stride's phases, a 4 x 4 output's planes are 6 times its pixels ((16, 256, 8, 8) 3 x 3 stride
// 2: 1.5 ms by im2col, 1.8 padded), and at 8 x 8 the two tie. Grouped layers' im2col copies runs of only
// a group's channels, and they go padded: (16, 1024, 14, 14) 32 groups stride 2, 13.6 -> 11.9 ms.
inline bool pixel_rows_padded(const Conv2dGeometry& g, bool planes) {
  return !planes || (g.sh == 1 && g.sw == 1) || g.groups > 1;
}

// Samples per block of padded planes.
inline int64_t padded_rows_block(const Conv2dGeometry& g, const ShiftedPlanes& sp) {
  return samples_per_block(g, sp.plane() * g.c);
}

// Samples [n0, n0 + nb) of x (NCHW when `planes`, else NHWC) padded into `padded`, one plane apart, in
// parallel over the samples.
template <typename T>
void pad_block(const T* x, int64_t n0, int64_t nb, const Conv2dGeometry& g, const ShiftedPlanes& sp, bool planes,
               T* padded) {
  const int64_t in_sample = g.c * g.h * g.w, plane = sp.plane() * g.c;
  at::parallel_for(0, nb, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      if (planes) {
        pad_pixel_phases_from_planes(x + (n0 + s) * in_sample, g, sp, padded + s * plane);
      } else {
        pad_pixel_phases(x + (n0 + s) * in_sample, g, sp, padded + s * plane);
      }
    }
  });
}

// Where output j of block sample s reads its first tap: s's plane, plus j's place in it.
inline std::vector<int64_t> padded_block_rows(const Conv2dGeometry& g, const ShiftedPlanes& sp, int64_t nb) {
  const std::vector<int64_t> pixels = output_pixels(g, sp, g.c);
  std::vector<int64_t> rows(nb * g.col_cols());
  for (int64_t s = 0; s < nb; ++s) {
    for (int64_t j = 0; j < g.col_cols(); ++j) rows[s * g.col_cols() + j] = s * sp.plane() * g.c + pixels[j];
  }
  return rows;
}

// y = conv(x, W) + b by the filters of w (filter_segments: W's own, or when `transposed` those of its
// transposed convolution, g being that convolution), x and y NCHW when `planes`, else NHWC.
template <typename T>
void conv_forward_pixel_rows(const T* x, const at::Tensor& w, bool transposed, const T* b, T* y,
                             const Conv2dGeometry& g, bool planes = true) {
  const int64_t k = g.taps() * g.c, p = g.col_cols(), out_sample = g.f * p;
  const FilterSegments<T> filters = filter_segments<T>(w, transposed, g);
  const auto to_planes = [&](const T* out, int64_t n0, int64_t nb) {  // [pixels x F] -> y[n][F][pixels]
    at::parallel_for(0, nb, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        cpu::transpose_matrix(out + s * p * g.f, g.f, p, g.f, y + (n0 + s) * out_sample, p);
      }
    });
  };
  const int64_t fg = g.f_per_group(), cg = g.c_per_group();
  // group grp's product: its segments (a tap each, cg channels from a_grp + the tap's shift), its
  // filters, its fg columns of the [pixels x F] result (NHWC's y itself, when not `planes`)
  const auto products = [&](int64_t m, const T* a, int64_t lda, int64_t group_step, const int64_t* shift,
                            const int64_t* rows, T* out) {
    for_each_group(g, [&](int64_t grp) {
      std::vector<const T*> taps(g.taps());
      for (int64_t t = 0; t < g.taps(); ++t) taps[t] = a + grp * group_step + shift[t];
      cpu::GemmEpilogue<T> ep;
      ep.col_bias = b ? b + grp * fg : nullptr;
      cpu::gemm_segments<T>(m, taps.data(), lda, filters.groups[grp], out + grp * fg, g.f, ep, rows);
    });
  };
  std::vector<int64_t> shift(g.taps());
  if (pixel_rows_padded(g, planes)) {
    const ShiftedPlanes sp = shifted_planes(g);
    const int64_t nb_max = padded_rows_block(g, sp);
    T* padded = cpu::thread_scratch<T>(cpu::Scratch::kRows, nb_max * sp.plane() * g.c);
    T* out = planes ? cpu::thread_scratch<T>(cpu::Scratch::kOut, nb_max * p * g.f) : nullptr;
    const std::vector<int64_t> rows = padded_block_rows(g, sp, nb_max);
    for (int64_t t = 0; t < g.taps(); ++t) shift[t] = shifted_offset(g, sp, t) * g.c;
    for (int64_t n0 = 0; n0 < g.n; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, g.n - n0);
      pad_block(x, n0, nb, g, sp, planes, padded);
      products(nb * p, padded, g.c, cg, shift.data(), rows.data(), planes ? out : y + n0 * out_sample);
      if (planes) to_planes(out, n0, nb);
    }
    return;
  }
  const int64_t nb_max = pixel_rows_block(g);
  T* rows = cpu::thread_scratch<T>(cpu::Scratch::kRows, nb_max * p * k);
  T* out = cpu::thread_scratch<T>(cpu::Scratch::kOut, nb_max * p * g.f);
  for (int64_t t = 0; t < g.taps(); ++t) shift[t] = t * cg;  // build_pixel_rows' (grp, t, c) columns
  for (int64_t n0 = 0; n0 < g.n; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, g.n - n0);
    build_pixel_rows(x, n0, nb, g, planes, rows);
    products(nb * p, rows, k, g.taps() * cg, shift.data(), nullptr, planes ? out : y + n0 * out_sample);
    if (planes) to_planes(out, n0, nb);
  }
}

// The pitch of dY's rows [pixels x F] as the d_W products read them: F, plus a cache line where F's rows
// would lie a multiple of 512 bytes apart. There a block of the rows (the product's B, kc rows of 64
// columns) falls into a few of L1's sets, which repeat every 4 KiB, and streams from L2: with the pitch,
// d_W + forward of (16, 512, 8, 8) 3 x 3 28.7 -> 26.9 ms, 32 groups of 32 9.3 -> 7.6.
template <typename T>
inline int64_t dy_rows_pitch(const Conv2dGeometry& g) {
  return g.f * sizeof(T) % 512 == 0 ? g.f + 64 / sizeof(T) : g.f;
}

// [pixels x F] of samples [n0, n0 + nb) of dy, `pitch` apart (dy_rows_pitch): NHWC's dY itself where the
// pitch is F, else copied (NHWC) or transposed (NCHW) into dy_t.
template <typename T>
const T* dy_pixel_rows(const T* dy, int64_t n0, int64_t nb, const Conv2dGeometry& g, bool planes, int64_t pitch,
                       T* dy_t) {
  const int64_t p = g.col_cols(), out_sample = g.f * p;
  if (!planes && pitch == g.f) return dy + n0 * out_sample;
  at::parallel_for(0, nb, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const T* src = dy + (n0 + s) * out_sample;
      T* dst = dy_t + s * p * pitch;
      if (planes) {  // dY[n][F][pixels] -> [pixels x F]
        cpu::transpose_matrix(src, p, g.f, p, dst, pitch);
      } else {
        for (int64_t j = 0; j < p; ++j) std::copy(src + j * g.f, src + (j + 1) * g.f, dst + j * pitch);
      }
    }
  });
  return dy_t;
}

// d_W by pixel rows on AVX-512 (float32), from a block's padded planes (pad_block) with neither
// operand copied: d_Wᵀ [(t, c) x F] += col(x)ᵀ · dY (cpu::gemm_gather_a: row (t, c) starts at its tap's
// shift of the block, column j adds output j's place), the rows split among the threads; then
// transposed into W's order. From 8 x 8 outputs on ((16, 256, 8, 8) 3 x 3: 3.1-4.1 -> 2.8-3.2 ms); at
// 4 x 4 the padded planes are 2.25 times the outputs and it lost to packing (3.2-4.2 -> 4.1-5.7 ms).
// Grouped layers take it at every size: a group's packed product is too small to pay for its packing
// ((16, 1024, 7, 7), 32 groups: 7.0-8.9 -> 4.2-6.1 ms; (16, 1024, 4, 4): 2.1-3.0 -> 1.5-1.7).
constexpr int64_t kMinGatheredPixels = 64;
// With groups, each group's d_W_gᵀ [(t, c) x Fg] is its own product (its channels' rows, its columns of
// dY), the parts of every group spread over the threads.
template <typename T>
void conv_weight_grad_padded_block(const T* dy, const T* x, T* dw, const Conv2dGeometry& g, bool planes) {
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t fg = g.f_per_group(), cg = g.c_per_group(), kg = g.taps() * cg, p = g.col_cols(),
                nb_max = padded_rows_block(g, sp);
  T* padded = cpu::thread_scratch<T>(cpu::Scratch::kRows, nb_max * sp.plane() * g.c);
  const int64_t pitch = dy_rows_pitch<T>(g);
  T* dy_t = cpu::thread_scratch<T>(cpu::Scratch::kGrad, nb_max * p * pitch);
  T* dw_t = cpu::thread_scratch<T>(cpu::Scratch::kPartial, kg * g.f);  // group after group, d_W_gᵀ [kg x fg]
  const std::vector<int64_t> rows = padded_block_rows(g, sp, nb_max);
  std::vector<const T*> a_row(g.groups * kg);  // group grp's rows from grp * kg
  for (int64_t grp = 0; grp < g.groups; ++grp) col_rows_from<T>(padded + grp * cg, g, sp, cg, a_row.data() + grp * kg);
  constexpr int64_t kUnit = 24;  // rows a part: whole tiles of every shape
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), kg / kUnit));
  for (int64_t n0 = 0; n0 < g.n; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, g.n - n0);
    pad_block(x, n0, nb, g, sp, planes, padded);
    const T* dy_rows = dy_pixel_rows(dy, n0, nb, g, planes, pitch, dy_t);
    at::parallel_for(0, g.groups * parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t grp = item / parts, part = item % parts;
        const int64_t i0 = part * kg / parts / kUnit * kUnit,
                      i1 = part + 1 == parts ? kg : (part + 1) * kg / parts / kUnit * kUnit;
        cpu::GemmEpilogue<T> ep;
        ep.accumulate = n0 > 0;
        cpu::gemm_gather_a(i1 - i0, fg, nb * p, a_row.data() + grp * kg + i0, rows.data(), dy_rows + grp * fg, pitch,
                           dw_t + grp * kg * fg + i0 * fg, fg, ep);
      }
    });
  }
  weight_grad_from_transposed(dw_t, dw, g, planes);
}

// d_W into dw (W's shape; NCHW memory when `planes`, else channels_last), from dy and x (NCHW when
// `planes`, else NHWC). A 1 x 1 layer's rows are its input's pixels, copied once, and its packed product
// ran 1.1-1.3 times faster than the gathered one: d_W + forward of (16, 512, 8, 8) -> 1024 10.9 -> 9.0 ms,
// (16, 1024, 16, 16) -> 2048 stride 2 47.5 -> 36.9 (oneDNN 7.6, 37.1).
template <typename T>
void conv_weight_grad_pixel_rows(const T* dy, const T* x, T* dw, const Conv2dGeometry& g, bool planes = true) {
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::gather_a_available() && ((g.col_cols() >= kMinGatheredPixels && g.taps() > 1) || g.groups > 1)) {
      return conv_weight_grad_padded_block(dy, x, dw, g, planes);
    }
  }
  const int64_t k = g.taps() * g.c, p = g.col_cols(), nb_max = pixel_rows_block(g), fg = g.f_per_group(),
                kg = g.taps() * g.c_per_group();
  T* rows = cpu::thread_scratch<T>(cpu::Scratch::kRows, nb_max * p * k);
  T* dy_t = cpu::thread_scratch<T>(cpu::Scratch::kGrad, nb_max * p * g.f);
  // The rows' columns in dw's own order: (t, c) for channels_last, (c, t) for NCHW, so that the product
  // lands in dw as it lies. Built taps-major and then reordered, NCHW's d_W cost a pass over W-sized
  // memory ((16, 512, 4, 4) 3 x 3: 9.4 MB read and written) on top of the product.
  for (int64_t n0 = 0; n0 < g.n; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, g.n - n0);
    if (planes) {
      build_pixel_rows_channels_major(x, n0, nb, g, rows);
    } else {
      build_pixel_rows(x, n0, nb, g, planes, rows);
    }
    const T* dy_rows = dy_pixel_rows(dy, n0, nb, g, planes, g.f, dy_t);  // packed: no pitch needed
    cpu::GemmEpilogue<T> ep;
    ep.accumulate = n0 > 0;
    for (int64_t grp = 0; grp < g.groups; ++grp) {  // a group's columns of the rows are one run (of kg)
      cpu::gemm<T>(fg, kg, nb * p, {dy_rows + grp * fg, 1, g.f}, cpu::MatrixView<T>{rows + grp * kg, k, 1},
                   dw + grp * fg * kg, kg, ep);
    }
  }
}

// ------------------------------------------------------------------ d_x of strided layers by phases
// d_x of a strided layer (dilation 1) by the stride's phases, for the layers the pixel kernels run
// (conv2d_shifted.h: input_phases derives it, PhasePixels lays it out): dY padded into pixels once, each
// phase's transposed convolution a gemm_segments over it whose rows are only its outputs that land in the
// image. Each phase's filters are W's taps of the phase reordered once (phase_filters), so that they pack
// by runs of channels. One sample a product from kMinPixelsPerSample outputs; below, a block of samples'
// padded dY side by side (as the pixel rows). dy and dx are NHWC, or NCHW when `planes` (transposed per
// sample, in cache).
template <typename T>
void conv_input_grad_phases(const T* dy, const at::Tensor& w, T* dx, const Conv2dGeometry& g, bool planes) {
  const PhasePixels pp(g);
  const size_t np = pp.phases.size();
  const int64_t fg = g.f_per_group(), cg = g.c_per_group(), pixels = g.h * g.w;
  const int64_t in_sample = g.c * pixels, out_sample = g.f * g.col_cols(), dy_plane = pp.sp.plane() * g.f;
  const std::vector<at::Tensor> taps_of = phase_filters<T>(w, pp.phases);
  std::vector<FilterSegments<T>> filters;
  for (size_t q = 0; q < np; ++q) {
    filters.push_back(filter_segments<T>(taps_of[q], /*transposed=*/true, pp.phases[q].t, /*own_storage=*/true));
  }
  // rows[q] for a block of nb samples, in elements: sample s's rows one dY_pad further on
  const auto block_rows = [&](int64_t nb) {
    std::vector<std::vector<int64_t>> rows(np);
    for (size_t q = 0; q < np; ++q) {
      for (int64_t s = 0; s < nb; ++s) {
        for (const int64_t r : pp.rows[q]) rows[q].push_back(s * dy_plane + r * g.f);
      }
    }
    return rows;
  };
  // out = the products for a block of samples padded dy_plane apart from dy_pad, phase after phase
  const auto products = [&](const T* dy_pad, const std::vector<std::vector<int64_t>>& rows, T* out) {
    for (size_t q = 0; q < np; ++q) {
      for_each_group(g, [&](int64_t grp) {  // dY's channels of the group; d_x's columns
        std::vector<const T*> segments;
        for (const int64_t shift : pp.taps[q]) segments.push_back(dy_pad + shift * g.f + grp * fg);
        cpu::gemm_segments<T>(rows[q].size(), segments.data(), g.f, filters[q].groups[grp], out + grp * cg, g.c, {},
                              rows[q].data());
      });
      out += rows[q].size() * g.c;
    }
  };
  const auto store = [&](const T* out, int64_t nb, int64_t s, int64_t n) {  // sample s of a block is sample n
    if (!planes) return pp.put(out, nb, s, dx + n * in_sample, g);
    T* dx_t = cpu::thread_scratch<T>(cpu::Scratch::kGrad, in_sample);  // [pixels x C] -> dx[n][C][pixels]
    pp.put(out, nb, s, dx_t, g);
    cpu::transpose_matrix(dx_t, g.c, pixels, g.c, dx + n * in_sample, pixels);
  };

  if (channels_last_direct(g)) {  // a sample a GEMM, the samples cut among the threads
    const std::vector<std::vector<int64_t>> rows = block_rows(1);
    const int64_t chunks = chunk_count(g);
    for_chunks(chunks, [&](int64_t cb, int64_t ce) {
      T* dy_pad = cpu::thread_scratch<T>(cpu::Scratch::kPadded, dy_plane);
      T* out = cpu::thread_scratch<T>(cpu::Scratch::kOut, in_sample);
      for (int64_t n = chunk_begin(cb, chunks, g.n); n < chunk_begin(ce, chunks, g.n); ++n) {
        if (planes) {
          pad_pixels_from_planes(dy + n * out_sample, pp.t0, pp.sp, dy_pad);
        } else {
          pad_pixels(dy + n * out_sample, pp.t0, pp.sp, dy_pad);
        }
        products(dy_pad, rows, out);
        store(out, 1, 0, n);
      }
    });
    return;
  }
  // Small images: a block's padded dY side by side, each GEMM split among the threads.
  const int64_t nb_max = samples_per_block(pp.t0, dy_plane);
  T* padded = cpu::thread_scratch<T>(cpu::Scratch::kRows, nb_max * dy_plane);
  T* out = cpu::thread_scratch<T>(cpu::Scratch::kOut, nb_max * in_sample);
  for (int64_t n0 = 0; n0 < g.n; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, g.n - n0);
    pad_block(dy, n0, nb, pp.t0, pp.sp, planes, padded);
    products(padded, block_rows(nb), out);
    at::parallel_for(0, nb, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) store(out, nb, s, n0 + s);
    });
  }
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
