// The CPU convolution's bfloat16 routes on AMX (Intel's tile unit: Sapphire Rapids and later; the tiles
// and their blocks are cpu/amx_tiles.h). Products of bfloat16 values are summed in float32 as vdpbf16ps
// sums them (conv2d_bf16.h), so the two routes give the numbers of the float32 route on the same bfloat16
// operands, up to the order of the additions. On the 2-core Sapphire Rapids-class machine of
// docs/benchmarks.md a core runs 586 GFLOP/s of tdpbf16ps from L1, against 126 for AVX-512's float32 FMA
// and about the same for vdpbf16ps.
//
// The forms are conv2d_bf16.h's (per sample, Y'[pixel, f] = Σ_taps Σ_c x_pad[pixel + offset(t), c] ·
// W[f, c, t] over the padded planes split into the stride's phases, in the outputs' row pitch Wq), which
// suit the tiles: a tile load takes 16 rows of 64 bytes at any address and any row stride, so A, 16
// pixels' 32 channels under a tap, is read in place from x_pad, its channel pitch rounded up to 32 (zeros
// past C); B is conv2d_bf16.h's packed filters, whose 64-filter slivers hold, per (tap, channel pair),
// the pair layout a B tile wants: 16 pairs x 16 filters of a sliver a tile.
//
// Blocks (amx_block: 32 pixels x 32 filters) run over the pitch's pixels, the thrown-away columns of the
// padding included (3% at 56 x 56), and may run past the last output: x_pad and the rows' copies have 32
// zero pixels more (1 x 1 NHWC layers, read in place, copy the batch's last block); only real outputs are
// stored. Small images go by pixel rows, as in conv2d_bf16.h, the rows then taps * pitch values apart.
// Here: the forward and the stride-1 d_x (its transposed convolution), a strided layer's d_x by phases,
// and d_W (by taps for few channels; small images by blocks of samples). The stems' forward by windows
// runs its tiles in conv2d_bf16.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/amx_tiles.h"
#include "cpu/conv2d_bf16.h"
#include "cpu/cpu_features.h"

namespace torch_cs231n {
namespace conv2d_cpu {

// Whether the AMX route takes the layer (the same layers as bf16_direct, but not the few-channel stems,
// which conv2d_bf16.h takes by windows).
inline bool amx_forward(const Conv2dGeometry& g) { return cpu::cpu_amx() && bf16_direct(g) && !bf16_window_rows(g); }

// y = conv(x, w) + b on AMX (amx_forward), in the layouts and with the arguments of conv_forward_bf16.
inline void conv_forward_bf16_amx(const c10::BFloat16* x, const Bf16Filters& w, const float* b, c10::BFloat16* y,
                                  const Conv2dGeometry& g, bool planes) {
#if CS231N_X86
  const ShiftedPlanes sp = shifted_planes(g);
  const int64_t cp = (g.c + kAmxK - 1) / kAmxK * kAmxK, pairs = cp / 2, ksteps = cp / kAmxK, taps = g.taps();
  const std::vector<uint32_t> filters = pack_bf16_filters(w, g, pairs);
  const std::vector<uint8_t> used = bf16_used_phases(g, sp);
  const int64_t in_sample = g.c * g.h * g.w, outputs = g.col_cols(), out_sample = g.f * outputs;
  // One sample a block, its rows the pitch's pixels read in place from x_pad (with fewer samples than
  // threads, a sample's output rows in bands, each band's thread padding the sample itself); or, by rows,
  // as many samples as fit kBf16RowsBytes, their rows (each output's taps, one after the other) copied.
  const bool by_rows = bf16_pixel_rows(g);
  const SampleBands split(g.n, by_rows ? 1 : g.oh);
  const int64_t chunks = split.chunks;
  // By rows with fewer samples than threads (a batch of 1 on 7 x 7 images), the filters' blocks go among
  // the threads too, each building its samples' rows itself: one thread had run the whole layer.
  const int64_t f_blocks = (g.f + kAmxBlock - 1) / kAmxBlock;
  const int64_t f_parts = by_rows ? std::clamp<int64_t>(at::get_num_threads() / chunks, 1, f_blocks) : 1;
  const int64_t row_values = taps * cp;
  const int64_t block =
      by_rows ? std::clamp<int64_t>(kBf16RowsBytes / (outputs * row_values * 2), 1, (g.n + chunks - 1) / chunks) : 1;
  // A 1 x 1 layer of stride 1 without padding, in NHWC with C a multiple of 32, reads its rows, x's
  // pixels, in place: no padded copy (it had been a third of the time of (16, 256, 32, 32) -> 64).
  const bool in_place = !planes && taps == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 && cp == g.c;
  const int64_t x_end = g.n * in_sample;  // (a last block of rows read in place must not read past it)
  const std::vector<int64_t> in_pitch = output_pixels(g, sp, 1);  // output o's pixel in the pitch Wq
  std::vector<int64_t> offsets(taps), a_tap(taps);
  for (int64_t t = 0; t < taps; ++t) {
    offsets[t] = shifted_offset(g, sp, t);          // the tap's pixel from an output's
    a_tap[t] = by_rows ? t * cp : offsets[t] * cp;  // the tap's values from a row's start
  }
  // place[p]: where the blocks' row p (an output by rows, of the block's samples; else a pixel of the
  // pitch, -1 for a thrown-away column) puts its outputs in y from the block's first sample's: NHWC its F
  // values from y[place], NCHW filter f's at y[place + f * outputs]
  const auto place_of = [&](int64_t o) { return planes ? o : o * g.f; };  // output o's of filter 0
  std::vector<int64_t> place(by_rows ? block * outputs : sp.cols, -1);
  for (int64_t o = 0; o < outputs; ++o) place[by_rows ? o : in_pitch[o]] = place_of(o);
  for (int64_t p = outputs; by_rows && p < block * outputs; ++p) {  // by rows: the block's other samples
    place[p] = p / outputs * out_sample + place_of(p % outputs);
  }
  at::parallel_for(0, chunks * f_parts, 1, [&](int64_t cb, int64_t ce) {
    const AmxScope tiles;
    TileBuffer<uint16_t> x_pad(in_place ? 0 : (sp.plane() + kAmxBlock) * cp);
    TileBuffer<uint16_t> a_rows(by_rows && !in_place ? (block * outputs + kAmxBlock) * row_values : 0,
                                /*zeroed=*/false);
    TileBuffer<uint16_t> tail(in_place ? kAmxBlock * cp : 0);  // in place: the batch's last rows, copied
    alignas(64) float c[kAmxBlock * kAmxBlock];
    const int64_t a_row = by_rows ? row_values : cp;
    for (int64_t item = cb; item < ce; ++item) {
      const int64_t chunk = item / f_parts, part = item % f_parts;
      const int64_t j0 = chunk_begin(part, f_parts, f_blocks) * kAmxBlock;  // its filters [j0, j1)
      const int64_t j1 = std::min(g.f, chunk_begin(part + 1, f_parts, f_blocks) * kAmxBlock);
      int64_t n_begin, n_end, r0, r1;
      split.of(chunk, &n_begin, &n_end, &r0, &r1);
      for (int64_t n0 = n_begin; n0 < n_end; n0 += block) {
        const int64_t nb = std::min(block, n_end - n0);
        const auto* xb = reinterpret_cast<const uint16_t*>(x);
        const uint16_t* a = in_place ? xb + n0 * in_sample : by_rows ? a_rows.data() : x_pad.data();
        for (int64_t s = 0; s < nb && !in_place; ++s) {
          pad_bf16_pixels(x + (n0 + s) * in_sample, g, sp, cp, planes, used, x_pad.data(), /*zeroed=*/true);
          if (!by_rows) break;  // one sample a block
          for (int64_t o = 0; o < outputs; ++o) {
            uint16_t* row = a_rows.data() + (s * outputs + o) * row_values;
            for (int64_t t = 0; t < taps; ++t) {
              std::memcpy(row + t * cp, x_pad.data() + (in_pitch[o] + offsets[t]) * cp, cp * sizeof(uint16_t));
            }
          }
        }
        // the block's rows: its outputs (by rows), or the pitch's pixels of the band's output rows
        const int64_t i0 = by_rows ? 0 : r0 * sp.wq, m = by_rows ? nb * outputs : std::min(sp.cols, r1 * sp.wq);
        auto block_at = [&](int64_t i, int64_t j) {
          const int n = static_cast<int>(std::min<int64_t>(kAmxBlock, g.f - j));
          const uint32_t* sliver = filters.data() + (j / kBf16Nr) * taps * pairs * kBf16Nr + j % kBf16Nr;
          const int64_t rows = std::min<int64_t>(kAmxBlock, m - i);
          const uint16_t* a_block = a + i * a_row;
          if (in_place && a_block + kAmxBlock * a_row > xb + x_end) {  // the batch's last rows: copied
            std::memcpy(tail.data(), a_block, rows * a_row * sizeof(uint16_t));
            a_block = tail.data();
          }
          amx_block(taps, ksteps, a_block, a_row, a_tap.data(), sliver, pairs * kBf16Nr, kBf16Nr, c, kAmxBlock,
                    /*accumulate=*/false);
          const float* bias = b ? b + j : nullptr;
          if (planes) {
            amx_store_block_planes(c, place.data() + i, rows, n, bias, y + n0 * out_sample + j * outputs, outputs);
          } else {
            amx_store_block(c, place.data() + i, rows, n, bias, y + n0 * out_sample + j);
          }
        };
        // 1 x 1: a block of rows stays in L1 across the filters' blocks (6-13% faster at ResNet-50's 1 x 1
        // layers); with more taps a block's rows are taps times larger and a filter sliver stays instead
        if (taps == 1) {
          for (int64_t i = i0; i < m; i += kAmxBlock)
            for (int64_t j = j0; j < j1; j += kAmxBlock) block_at(i, j);
        } else {
          for (int64_t j = j0; j < j1; j += kAmxBlock)
            for (int64_t i = i0; i < m; i += kAmxBlock) block_at(i, j);
        }
      }
    }
  });
#else
  (void)x, (void)w, (void)b, (void)y, (void)g, (void)planes;
  TORCH_CHECK(false, "conv_forward_bf16_amx: AMX is an x86 instruction set");
#endif
}

// ---------------------------------------------------------------------------------------------- d_x
// A strided layer's d_x by the stride's phases (conv2d_bf16.h: conv_input_grad_bf16_phases), each phase's
// transposed convolution on the tiles. A phase's rows, its outputs that land in the image, are a rectangle
// of dY_pad's pitch Wp: the blocks run over the pitch from its first row to its last, and keep the rows in
// the rectangle. Same arguments as conv_input_grad_bf16_phases.
inline void conv_input_grad_bf16_phases_amx(const at::Tensor& dy, const at::Tensor& w, at::Tensor& dx,
                                            const Conv2dGeometry& g, bool planes) {
#if CS231N_X86
  const PhasePixels pp(g);
  const size_t np = pp.phases.size();
  // dY's channels are the transposed convolutions' input: their pitch rounded up to 32
  const int64_t cp = (g.f + kAmxK - 1) / kAmxK * kAmxK, pairs = cp / 2, ksteps = cp / kAmxK;
  const int64_t plane = pp.sp.plane(), pixels = g.h * g.w, in_sample = g.c * pixels;
  const int64_t out_sample = g.f * g.col_cols();
  const std::vector<std::vector<uint32_t>> filters = pack_bf16_phase_filters(pp, w, g, pairs);
  std::vector<std::vector<int64_t>> taps(np);   // phase q's taps: their shifts in dY_pad, in values
  std::vector<std::vector<int64_t>> place(np);  // phase q's row i of dY_pad's pitch: its place in `out`
  for (size_t q = 0; q < np; ++q) {
    for (const int64_t t : pp.taps[q]) taps[q].push_back(t * cp);
    const int64_t span = pp.rows[q].back() - pp.rows[q].front() + 1, nv = pp.phases[q].v1 - pp.phases[q].v0;
    for (int64_t i = 0; i < span; ++i) {  // (u - u0, v - v0) = divmod(i, Wp); columns from nv on are not its
      const int64_t col = i % pp.sp.wp;
      place[q].push_back(col < nv ? (i / pp.sp.wp * nv + col) * g.c : -1);
    }
  }
  const std::vector<uint8_t> used = bf16_used_phases(pp.t0, pp.sp);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.n, at::get_num_threads()));
  const int64_t block = bf16_phase_block(g, plane, cp, chunks);
  auto* dxp = dx.mutable_data_ptr<c10::BFloat16>();
  const auto* dyp = dy.const_data_ptr<c10::BFloat16>();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    const AmxScope tiles;
    TileBuffer<uint16_t> dy_pad((block * plane + kAmxBlock) * cp);  // 32 pixels more: a last block's reach
    std::vector<float> out(block * pixels * g.c), dx_pixels(in_sample), dx_planes(planes ? in_sample : 0);
    alignas(64) float c[kAmxBlock * kAmxBlock];
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t n_end = chunk_begin(chunk + 1, chunks, g.n);
      for (int64_t n0 = chunk_begin(chunk, chunks, g.n); n0 < n_end; n0 += block) {
        const int64_t nb = std::min(block, n_end - n0);
        for (int64_t s = 0; s < nb; ++s) {
          pad_bf16_pixels(dyp + (n0 + s) * out_sample, pp.t0, pp.sp, cp, planes, used, dy_pad.data() + s * plane * cp,
                          /*zeroed=*/true);
        }
        float* o = out.data();  // phase after phase, the block's rows of each
        for (size_t q = 0; q < np; ++q) {
          const int64_t rows = pp.rows[q].size(), first = pp.rows[q].front(), span = pp.rows[q].back() - first + 1;
          const int64_t ntaps = taps[q].size();
          for (int64_t s = 0; s < nb; ++s) {
            const uint16_t* a = dy_pad.data() + (s * plane + first) * cp;
            for (int64_t j = 0; j < g.c; j += kAmxBlock) {
              const int n = static_cast<int>(std::min<int64_t>(kAmxBlock, g.c - j));
              const uint32_t* sliver = filters[q].data() + (j / kBf16Nr) * ntaps * pairs * kBf16Nr + j % kBf16Nr;
              for (int64_t i = 0; i < span; i += kAmxBlock) {
                amx_block(ntaps, ksteps, a + i * cp, cp, taps[q].data(), sliver, pairs * kBf16Nr, kBf16Nr, c, kAmxBlock,
                          /*accumulate=*/false);
                amx_store_block(c, place[q].data() + i, std::min<int64_t>(kAmxBlock, span - i), n, nullptr,
                                o + s * rows * g.c + j);
              }
            }
          }
          o += nb * rows * g.c;
        }
        for (int64_t s = 0; s < nb; ++s) {
          round_bf16_phase_sample(pp, out.data(), nb, s, g, planes, dx_pixels.data(), dx_planes.data(),
                                  dxp + (n0 + s) * in_sample);
        }
      }
    }
  });
#else
  (void)dy, (void)w, (void)dx, (void)g, (void)planes;
  TORCH_CHECK(false, "conv_input_grad_bf16_phases_amx: AMX is an x86 instruction set");
#endif
}

// ------------------------------------------------------------------------------------------------ d_W
// d_W[f, t, c] = Σ_p dY'[p, f] · x_pad[p + offset(t), c], k the pixel p of the pitch (dY' zero in the
// thrown-away columns, as conv2d_bf16.h's d_W), 32 pixels a tile step:
//   A: dy_planes[f * kp + p]        dY' as planes, filters the rows: 16 filters' 32 pixels a tile
//   B: x_pairs[p * cw + c]          = (x_pad[p, c], x_pad[p + 1, c]) for every pixel p, so that tap t's
//                                   pair q, (x_pad[2q + o, c], x_pad[2q + 1 + o, c]), is row q of a tile
//                                   read from pixel o = offset(t) on with a row stride of 2 pixels
// C, 32 filters x 32 channels of one tap, is loaded from the chunk's d_W, summed over the sample's
// pixels and stored back. Small images (bf16_pixel_rows) go in blocks of samples, their padded planes
// one after another as one longer plane, so that a load and store of C is spread over about
// kAmxGradPixels pixels rather than one small sample's (an output's taps stay inside its own sample's
// plane; between the samples dY' is zero). Layers of 32 channels or more, as the vdpbf16ps d_W with its
// pixel pairs, and large-image layers of few channels (a stem) by taps (below).
inline bool amx_weight_grad(const Conv2dGeometry& g) {
  return cpu::cpu_amx() && bf16_direct(g) && (2 * g.c >= kBf16Nr || bf16_weight_grad_by_taps(g));
}
constexpr int64_t kAmxGradPixels = 512;

// d_W of a layer of few channels (bf16_weight_grad_by_taps: a stem's 3) by taps: d_Wᵀ[(t, c), f] =
// Σ_p x_pad[p + offset(t), c] · dY'[p, f], the taps·C rows (t, c) in blocks of 32, k the pixel p:
//   A: rows[(t, c)][p - p0] = channel c's padded phases from pixel offset(t) + p0 on, copied for each chunk
//      of kAmxTapsChunk pixels (a tile's rows must lie at one stride; the (t, c) rows of x do not)
//   B: dy_pairs[q * fw + f] = (dY'[2q, f], dY'[2q + 1, f]), read in place
// A chunk's rows (160 x 512 values for the 7 x 7 stem) and dY pairs stay in L2; C is the chunk of samples'
// d_Wᵀ, loaded and stored by every block.
constexpr int64_t kAmxTapsChunk = 512;

inline at::Tensor conv_weight_grad_bf16_amx_by_taps(const c10::BFloat16* dy, const c10::BFloat16* x,
                                                    const Conv2dGeometry& g, bool planes) {
  at::Tensor dw = at::zeros({g.f, g.taps() * g.c}, at::TensorOptions().dtype(at::kFloat));
#if CS231N_X86
  const ShiftedPlanes sp = shifted_planes(g);
  const auto round_up = [](int64_t v, int64_t unit) { return (v + unit - 1) / unit * unit; };
  const int64_t taps = g.taps(), plane = sp.plane(), rows = taps * g.c;
  const int64_t rw = round_up(rows, kAmxBlock), fw = round_up(g.f, kAmxBlock), kp = round_up(sp.cols, kAmxTapsChunk);
  const int64_t xc_plane = plane + kAmxTapsChunk;  // a channel's phases and the last chunk's reach past them
  const int64_t outputs = g.col_cols(), in_sample = g.c * g.h * g.w, out_sample = g.f * outputs;
  const std::vector<uint8_t> used = bf16_used_phases(g, sp);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.n, at::get_num_threads()));
  std::vector<int64_t> offsets(taps);
  for (int64_t t = 0; t < taps; ++t) offsets[t] = shifted_offset(g, sp, t);
  const int64_t no_shift = 0;                   // A's one tap
  TileBuffer<float> partial(chunks * rw * fw);  // chunk's d_Wᵀ [(t, c)][f]
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    const AmxScope tiles;
    // x: channel planes, each its padded phases (from NCHW through x_pad; from NHWC directly)
    std::vector<uint16_t> x_pad(planes ? g.c * plane : 0), xc(g.c * xc_plane, 0);
    // dY' in the pitch Wq, its gaps and past it 0: as planes [F][kp] from NCHW, pixels [kp][F] from NHWC
    std::vector<uint16_t> dy_pitch(kp * g.f, 0);
    TileBuffer<uint16_t> a_rows(rw * kAmxTapsChunk);  // rows past taps·C stay 0
    TileBuffer<float> dy_pairs(kp / 2 * fw);          // 32-bit words (pairs of bfloat16), 0 past F
    const auto* dyb = reinterpret_cast<const uint16_t*>(dy);
    const auto* xb = reinterpret_cast<const uint16_t*>(x);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      float* part = partial.data() + chunk * rw * fw;
      for (int64_t n = chunk_begin(chunk, chunks, g.n); n < chunk_begin(chunk + 1, chunks, g.n); ++n) {
        const uint16_t* dy_n = dyb + n * out_sample;
        if (planes) {
          pad_planes(xb + n * in_sample, g, sp, x_pad.data());
          for (int64_t c = 0; c < g.c; ++c) {
            std::memcpy(xc.data() + c * xc_plane, x_pad.data() + c * plane, plane * sizeof(uint16_t));
          }
          for (int64_t f = 0; f < g.f; ++f) {
            for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
              std::memcpy(dy_pitch.data() + f * kp + o_h * sp.wq, dy_n + f * outputs + o_h * g.ow,
                          g.ow * sizeof(uint16_t));
            }
          }
          // a plane's pixel pairs are its 32-bit words: dy_pairs = the [F][kp/2] words transposed (the
          // transpose moves bits, whatever type it reads them as)
          cpu::transpose_matrix(reinterpret_cast<const float*>(dy_pitch.data()), kp / 2, g.f, kp / 2, dy_pairs.data(),
                                fw);
        } else {
          pad_bf16_channel_planes(x + n * in_sample, g, sp, used, xc.data(), xc_plane);
          for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
            std::memcpy(dy_pitch.data() + o_h * sp.wq * g.f, dy_n + o_h * g.ow * g.f, g.ow * g.f * sizeof(uint16_t));
          }
          auto* words = reinterpret_cast<uint32_t*>(dy_pairs.data());
          for (int64_t q = 0; q < kp / 2; ++q) {
            const uint16_t *even = dy_pitch.data() + 2 * q * g.f, *odd = even + g.f;
            for (int64_t f = 0; f < g.f; ++f) words[q * fw + f] = bf16_pair(even[f], odd[f]);
          }
        }
        for (int64_t p0 = 0; p0 < kp; p0 += kAmxTapsChunk) {
          for (int64_t k = 0; k < rows; ++k) {  // row (t, c) = (k / C, k % C)
            const uint16_t* src = xc.data() + (k % g.c) * xc_plane + offsets[k / g.c] + p0;
            std::memcpy(a_rows.data() + k * kAmxTapsChunk, src, kAmxTapsChunk * sizeof(uint16_t));
          }
          for (int64_t r0 = 0; r0 < rw; r0 += kAmxBlock) {
            for (int64_t f0 = 0; f0 < fw; f0 += kAmxBlock) {
              amx_block(1, kAmxTapsChunk / kAmxK, a_rows.data() + r0 * kAmxTapsChunk, kAmxTapsChunk, &no_shift,
                        reinterpret_cast<const uint32_t*>(dy_pairs.data()) + p0 / 2 * fw + f0, 0, fw,
                        part + r0 * fw + f0, fw, /*accumulate=*/true);
            }
          }
        }
      }
    }
  });
  float* out = dw.mutable_data_ptr<float>();
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {  // d_Wᵀ[k][f] -> d_W[f][k], in order
    const float* part = partial.data() + chunk * rw * fw;
    for (int64_t k = 0; k < rows; ++k) {
      for (int64_t f = 0; f < g.f; ++f) out[f * rows + k] += part[k * fw + f];
    }
  }
#else
  (void)dy, (void)x, (void)g, (void)planes;
  TORCH_CHECK(false, "conv_weight_grad_bf16_amx_by_taps: AMX is an x86 instruction set");
#endif
  return dw;
}

// d_W (float32, [F][taps][C]) of an amx_weight_grad layer, from bfloat16 dy and x (NHWC, or NCHW when
// `planes`). Each chunk of samples sums into its own d_W; the chunks are then added in order, so the result
// does not depend on the threads' timing.
inline at::Tensor conv_weight_grad_bf16_amx(const c10::BFloat16* dy, const c10::BFloat16* x, const Conv2dGeometry& g,
                                            bool planes) {
  if (bf16_weight_grad_by_taps(g)) return conv_weight_grad_bf16_amx_by_taps(dy, x, g, planes);
  at::Tensor dw = at::empty({g.f, g.taps() * g.c}, at::TensorOptions().dtype(at::kFloat));  // (all written below)
#if CS231N_X86
  const ShiftedPlanes sp = shifted_planes(g);
  const auto round_up = [](int64_t v) { return (v + kAmxBlock - 1) / kAmxBlock * kAmxBlock; };
  const int64_t cp = g.c + (g.c & 1), cw = round_up(g.c), fw = round_up(g.f);
  const int64_t taps = g.taps(), plane = sp.plane(), ldc = taps * g.c, outputs = g.col_cols();
  const int64_t in_sample = g.c * g.h * g.w, out_sample = g.f * outputs;
  const std::vector<uint8_t> used = bf16_used_phases(g, sp);
  // Few pixels in the whole batch against many filters (1 x 1 layers of 1024-2048 filters on 4 x 4 images):
  // each chunk's partial d_W, and their sum, outweighed the products; there the filters go among the
  // threads instead, 32 a block, each thread summing every sample for its own (x's pairs made by each).
  const int64_t threads = at::get_num_threads();
  const bool by_filters = bf16_pixel_rows(g) && fw >= kAmxBlock * threads && g.n * plane * threads <= taps * fw;
  const int64_t chunks = by_filters ? 1 : std::max<int64_t>(1, std::min<int64_t>(g.n, threads));
  const int64_t f_parts = by_filters ? std::min<int64_t>(threads, fw / kAmxBlock) : 1;
  std::vector<int64_t> offsets(taps);
  for (int64_t t = 0; t < taps; ++t) offsets[t] = shifted_offset(g, sp, t);
  const int64_t no_shift = 0;                          // d_W's A has one tap, unshifted
  TileBuffer<float> partial(chunks * taps * fw * cw);  // chunk's [t][f][c]
  // samples a block: one, or (small images) enough for kAmxGradPixels, at most a chunk's
  const int64_t most = bf16_pixel_rows(g)
                           ? std::clamp<int64_t>((kAmxGradPixels + plane - 1) / plane, 1, (g.n + chunks - 1) / chunks)
                           : 1;
  const int64_t kp = round_up((most - 1) * plane + sp.cols);  // the pixels of a block's dY' rows
  at::parallel_for(0, chunks * f_parts, 1, [&](int64_t cb, int64_t ce) {
    const AmxScope tiles;
    std::vector<uint16_t> x_pad((most * plane + 1) * cp, 0);  // one zero pixel more: the last one's pair
    // the tiles read up to 32 pixels past the last plane (and past the pitch's last output): zeros, or
    // (a smaller block) an earlier block's pixels, which meet zeros of dY'
    TileBuffer<uint32_t> x_pairs((most * plane + kAmxBlock) * cw);
    TileBuffer<uint16_t> dy_planes(fw * kp);  // the thrown-away columns and the rows past F stay 0
    const auto* dyb = reinterpret_cast<const uint16_t*>(dy);
    for (int64_t item = cb; item < ce; ++item) {
      const int64_t chunk = item / f_parts, part = item % f_parts, f_blocks = fw / kAmxBlock;
      const int64_t fa = chunk_begin(part, f_parts, f_blocks) * kAmxBlock,
                    fb = chunk_begin(part + 1, f_parts, f_blocks) * kAmxBlock;
      const int64_t fe = std::min(fb, g.f);  // this item's filters [fa, fe), blocks [fa, fb)
      float* dw_chunk = partial.data() + chunk * taps * fw * cw;
      const int64_t n_begin = chunk_begin(chunk, chunks, g.n), count = chunk_begin(chunk + 1, chunks, g.n) - n_begin;
      const int64_t blocks = (count + most - 1) / most;
      for (int64_t block = 0; block < blocks; ++block) {  // even blocks of at most `most` samples
        const int64_t n0 = n_begin + chunk_begin(block, blocks, count);
        const int64_t nb = n_begin + chunk_begin(block + 1, blocks, count) - n0;
        for (int64_t s = 0; s < nb; ++s) {
          const int64_t n = n0 + s, first = s * plane;  // sample n's plane: from pixel `first` on
          pad_bf16_pixels(x + n * in_sample, g, sp, cp, planes, used, x_pad.data() + first * cp);
          const uint16_t* dy_n = dyb + n * out_sample;
          for (int64_t o_h = 0; o_h < g.oh; ++o_h) {
            uint16_t* row = dy_planes.data() + first + o_h * sp.wq;  // filter f's at row + f * kp
            if (planes) {
              for (int64_t f = fa; f < fe; ++f) {
                std::memcpy(row + f * kp, dy_n + f * outputs + o_h * g.ow, g.ow * sizeof(uint16_t));
              }
            } else {  // dst[f * kp + o_w] = src[o_w * F + f]
              planes_to_pixels(dy_n + o_h * g.ow * g.f + fa, g.f, g.ow, fe - fa, row + fa * kp, kp);
            }
          }
        }
        if (nb < most) {  // a smaller block: the samples past it are not in its sums
          for (int64_t f = fa; f < fe; ++f) {
            std::fill(dy_planes.data() + f * kp + nb * plane, dy_planes.data() + (f + 1) * kp, uint16_t(0));
          }
        }
        pair_pixels(x_pad.data(), nb * plane, cp, g.c, cw, x_pairs.data());
        const int64_t k = round_up((nb - 1) * plane + sp.cols);
        for (int64_t t = 0; t < taps; ++t) {
          for (int64_t f0 = fa; f0 < fb; f0 += kAmxBlock) {
            for (int64_t c0 = 0; c0 < cw; c0 += kAmxBlock) {
              // one "tap" of k pixels: A's rows are filters, B's pairs pixel pairs, its columns channels
              amx_block(1, k / kAmxK, dy_planes.data() + f0 * kp, kp, &no_shift, x_pairs.data() + offsets[t] * cw + c0,
                        0, 2 * cw, dw_chunk + (t * fw + f0) * cw + c0, cw, /*accumulate=*/true);
            }
          }
        }
      }
    }
  });
  // d_W = the chunks' partial sums added in chunk order (so the same whatever the threads' timing), the
  // filters among the threads: on one thread, after a zeroed d_W, the sum had been a sixth of (16, 256, 8,
  // 8) -> 1024 1 x 1's d_W, the other thread waiting. (A partial sum is never -0: the tiles add to +0.)
  float* out = dw.mutable_data_ptr<float>();
  at::parallel_for(0, g.f, 16, [&](int64_t f_begin, int64_t f_end) {
    for (int64_t f = f_begin; f < f_end; ++f) {
      for (int64_t t = 0; t < taps; ++t) {
        float* o = out + f * ldc + t * g.c;
        const float* part = partial.data() + (t * fw + f) * cw;  // chunk 0's
        std::copy(part, part + g.c, o);
        for (int64_t chunk = 1; chunk < chunks; ++chunk) {
          const float* more = part + chunk * taps * fw * cw;
          for (int64_t c = 0; c < g.c; ++c) o[c] += more[c];
        }
      }
    }
  });
#else
  (void)dy, (void)x, (void)g, (void)planes;
  TORCH_CHECK(false, "conv_weight_grad_bf16_amx: AMX is an x86 instruction set");
#endif
  return dw;
}

}  // namespace conv2d_cpu
}  // namespace torch_cs231n
