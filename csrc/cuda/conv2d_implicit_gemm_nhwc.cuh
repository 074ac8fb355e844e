// The implicit GEMMs of cuda/conv2d_implicit_gemm.cuh over channels-last copies of the images: a candidate,
// TORCH_CS231N_CUDA_CONV_LAYOUT=nhwc (cuda/conv2d_implicit_gemm.cu), for float32 layers whose channels and
// filters per group are multiples of 4.
//
// Why. In NCHW, a k = (c, t_h, t_w) of the forward's A is one value of one plane, so each value a thread
// gathers costs a tap-table read, two bounds tests, an address and a 4-byte load: at 8 to 16 values a
// thread per stage, that is most of the 270-580 instructions a warp issues per stage for its 32 MMAs
// (tools/sass_loop_report.py), and the H200 ran the TF32 kernel at 0.37 instructions a cycle per scheduler
// (docs/benchmarks.md). In NHWC a pixel's channels lie side by side: with k ordered (t_h, t_w, c), 4
// neighbouring k are 4 channels of one tap, one 16-byte load under one tap read and one bounds test. So
//     forward   y[(n,o_h,o_w), f]  = Σ_{(t_h,t_w,c)} x'[n, i_h, i_w, c] · W[f, c, t_h, t_w]
//     d_input   dx[(n,i_h,i_w), c] = Σ_{(t_h,t_w,f)} dY'[n, o_h, o_w, f] · W[f, c, t_h, t_w]
//     d_weight  dW[f, (t_h,t_w,c)] = Σ_{(n,o_h,o_w)} dY'[n, o_h, o_w, f] · x'[n, i_h, i_w, c]
// with the index maps of the NCHW kernels (i = o*s - p + t*d), where x' and dY' are channels-last copies made
// by to_nhwc, which also rounds them to TF32 for the tensor cores (so the loaders' values are ready, and
// the copies cost one pass over each image: a few percent of a 3x3 layer's step). The transposed weights'
// rows and the tap tables follow k's order (KOrder::kTapMajor); the products are written by the NCHW
// kernels' epilogues (d_weight's columns reordered as its partial sums are added). The tiles, the
// arithmetic and the kernel are the register kernel's; loaders that read runs of 4 (kVector = 4) place them
// by RunMap, and store_stage stores a run along m or n with one 16-byte store.
#pragma once

#include "cuda/conv2d_implicit_gemm.cuh"

namespace torch_cs231n {
namespace cuda {
namespace implicit_gemm {

// Where a thread's runs of a stage lie in a shared tile (value i is element i % 4 of run i / 4):
//   along k   a pixel's channels: thread t takes column mn = t % extent and the runs of rows 4q..4q+3 with
//             q = t / extent + (i / 4) * (256 / extent), so that the 32 lanes of a warp store into 32
//             neighbouring columns of one row (32 banks);
//   along mn  a row's neighbours: thread t takes columns 4 (t % (extent/4)) .. +3 of row k = t / (extent/4)
//             + (i / 4) * (1024 / extent), so that a warp reads 512 contiguous bytes of a row.
template <bool kAlongK, int kExtent>
struct RunMap {
  static constexpr int kRunsPerRow = kExtent / 4, kRowsPerPass = kThreads / kRunsPerRow;  // along mn
  static __host__ __device__ int k(int t, int i) {
    return kAlongK ? 4 * (t / kExtent + (i / 4) * (kThreads / kExtent)) + i % 4
                   : t / kRunsPerRow + (i / 4) * kRowsPerPass;
  }
  static __host__ __device__ int mn(int t, int i) { return kAlongK ? t % kExtent : 4 * (t % kRunsPerRow) + i % 4; }
  static __host__ __device__ int k_for_column(int t, int i) { return k(t, i); }
};

// The first of a run of 4 at i, or the last run of `count` (a multiple of 4) when i is past it.
__device__ __forceinline__ int32_t clamped_run(int32_t i, int32_t count) { return i < count ? i : count - 4; }

// A channels-last image (x', or dY' for d_input): its plane, its values per pixel (all groups' channels),
// per sample, and the first channel of group 1.
struct PixelPlanes {
  int32_t h, w, pitch;
  int64_t sample_stride, group_stride;
};
inline PixelPlanes input_pixels(const Conv2dGeometry& g) {
  return {static_cast<int32_t>(g.h), static_cast<int32_t>(g.w), static_cast<int32_t>(g.c), g.h * g.w * g.c,
          g.c_per_group()};
}
inline PixelPlanes output_pixels(const Conv2dGeometry& g) {
  return {static_cast<int32_t>(g.oh), static_cast<int32_t>(g.ow), static_cast<int32_t>(g.f), g.oh * g.ow * g.f,
          g.f_per_group()};
}

// A(m, k) for forward and d_input: m = (n, r_h, r_w) a pixel of the grid, k = (t_h, t_w, ch). The run is
// src[n, h, w, ch..ch+3] (in the group's channels) with h = steps.h(r_h) + tap.dh (and w alike), then, for
// d_input with a stride, divided by it when it divides (kDivide), as PatchAlongM does in NCHW. The tap
// offsets are ch plus the shift folded as (w * pitch, pitch) (ch alone with kDivide). Its fields and start()
// mirror PatchAlongM's, which is left as it ran on the H200 until this candidate has run there too.
template <int kExtent, bool kDivide>
struct PixelRunsAlongK {
  static constexpr bool kAlongK = true;
  static constexpr int kVector = 4;
  static constexpr int kTileExtent = kExtent;
  static constexpr bool kReady = true;  // to_nhwc rounded the copy for the arithmetic
  using Map = RunMap<true, kExtent>;
  using Element = float;
  const float* src;
  const Tap* taps;
  int32_t rows;                     // M
  IntDivider row_plane, row_width;  // row_h*row_w and row_w: m = (sample, r_h, r_w)
  PixelPlanes image;                // src's
  Steps steps;
  IntDivider stride_h, stride_w;  // kDivide: the stride, and s*image.h, s*image.w the bounds of s*o
  uint32_t limit_h, limit_w;
  // per thread
  const float* base;
  int32_t h0, w0;  // the position tap 0 reads
  uint32_t pixel;  // (h0*image.w + w0) * image.pitch, modulo 2^32

  __device__ void start(int32_t m0, int32_t group, int t) {
    const int32_t m = clamped(m0 + Map::mn(t, 0), rows);
    const uint32_t n = row_plane.quotient(m), in_plane = m - n * row_plane.divisor;
    const uint32_t r_h = row_width.quotient(in_plane), r_w = in_plane - r_h * row_width.divisor;
    base = opaque(src + n * image.sample_stride + group * image.group_stride);
    h0 = steps.h(r_h);
    w0 = steps.w(r_w);
    pixel = (static_cast<uint32_t>(h0) * static_cast<uint32_t>(image.w) + static_cast<uint32_t>(w0)) *
            static_cast<uint32_t>(image.pitch);
  }

  // (no test against k_end: past it, the padded tap table's taps fall outside the image)
  template <typename Put>
  __device__ __forceinline__ void gather(int32_t k0, int32_t, int t, Put&& put) const {
#pragma unroll
    for (int j = 0; j < kPerThread<kExtent> / 4; ++j) {
      const Tap tap = taps[k0 + Map::k(t, 4 * j)];
      const uint32_t hu = static_cast<uint32_t>(h0 + tap.dh), wu = static_cast<uint32_t>(w0 + tap.dw);
      bool inside;
      uint32_t at;
      if (kDivide) {  // o = (i + p - t*d) / s: h must be a multiple of s in [0, s*oH)
        const uint32_t oh = stride_h.quotient(hu), ow = stride_w.quotient(wu);
        inside = hu < limit_h && wu < limit_w && oh * stride_h.divisor == hu && ow * stride_w.divisor == wu;
        at = tap.offset + (oh * static_cast<uint32_t>(image.w) + ow) * static_cast<uint32_t>(image.pitch);
      } else {
        inside = hu < static_cast<uint32_t>(image.h) && wu < static_cast<uint32_t>(image.w);
        at = pixel + tap.offset;
      }
      put(j, base + at, inside);
    }
  }
};

// B(k, n) for forward and d_input: the weight transposed per group with rows (t_h, t_w, ch) (transpose_weight
// in KOrder::kTapMajor), src[g][k][n], its rows padded with zeros to a multiple of kBK; runs along n.
template <int kExtent>
struct RunsAlongN {
  static constexpr bool kAlongK = false;
  static constexpr int kVector = 4;
  static constexpr int kTileExtent = kExtent;
  static constexpr bool kReady = true;  // transpose_weight_kernel wrote it ready for the arithmetic
  using Map = RunMap<false, kExtent>;
  using Element = float;
  const float* src;
  int32_t cols;  // a multiple of 4
  uint32_t ld, group_stride;
  const float* base;

  __device__ void start(int32_t n0, int32_t group, int t) {
    base = opaque(src + group * group_stride + clamped_run(n0 + Map::mn(t, 0), cols));
  }
  template <typename Put>
  __device__ __forceinline__ void gather(int32_t k0, int32_t, int t, Put&& put) const {
#pragma unroll
    for (int j = 0; j < kPerThread<kExtent> / 4; ++j) put(j, base + (k0 + Map::k(t, 4 * j)) * ld, true);
  }
};

// A(m, k) for d_weight: m = f, k = (n, o_h, o_w) a pixel of dY': dY'[k][g*Fg + f], a row of a matrix, so no
// position is decoded; runs along m (4 filters).
template <int kExtent>
struct FilterRunsAlongM {
  static constexpr bool kAlongK = false;
  static constexpr int kVector = 4;
  static constexpr int kTileExtent = kExtent;
  static constexpr bool kReady = true;  // to_nhwc rounded the copy
  using Map = RunMap<false, kExtent>;
  using Element = float;
  const float* src;
  int32_t rows;    // Fg, a multiple of 4
  uint32_t pitch;  // F: dY' values per pixel
  int32_t group_stride;
  const float* base;

  __device__ void start(int32_t m0, int32_t group, int t) {
    base = opaque(src + group * group_stride + clamped_run(m0 + Map::mn(t, 0), rows));
  }
  template <typename Put>
  __device__ __forceinline__ void gather(int32_t k0, int32_t k_end, int t, Put&& put) const {
#pragma unroll
    for (int j = 0; j < kPerThread<kExtent> / 4; ++j) {
      const int32_t k = k0 + Map::k(t, 4 * j);
      put(j, base + static_cast<size_t>(static_cast<uint32_t>(clamped(k, k_end))) * pitch, k < k_end);
    }
  }
};

// B(k, n) for d_weight: k = (n, o_h, o_w), n = (t_h, t_w, c): x'[n, i_h, i_w, g*Cg + c..c+3]. The thread's
// columns are fixed, so its tap is read once per block; each of its rows decodes its pixel.
template <int kExtent>
struct PatchRunsAlongN {
  static constexpr bool kAlongK = false;
  static constexpr int kVector = 4;
  static constexpr int kTileExtent = kExtent;
  static constexpr bool kReady = true;  // to_nhwc rounded the copy
  using Map = RunMap<false, kExtent>;
  using Element = float;
  const float* src;
  const Tap* taps;
  int32_t cols;                     // Cg*kh*kw, a multiple of 4
  IntDivider out_plane, out_width;  // oH*oW and oW: k = (sample, o_h, o_w)
  PixelPlanes image;                // x''s
  Steps steps;                      // the stride and the padding
  const float* base;
  Tap tap;

  __device__ void start(int32_t n0, int32_t group, int t) {
    base = src + group * image.group_stride;
    tap = taps[clamped_run(n0 + Map::mn(t, 0), cols)];
  }
  template <typename Put>
  __device__ __forceinline__ void gather(int32_t k0, int32_t k_end, int t, Put&& put) const {
#pragma unroll
    for (int j = 0; j < kPerThread<kExtent> / 4; ++j) {
      const int32_t k = k0 + Map::k(t, 4 * j);
      const uint32_t position = clamped(k, k_end), n = out_plane.quotient(position);
      const uint32_t in_plane = position - n * out_plane.divisor, o_h = out_width.quotient(in_plane);
      const int32_t h0 = steps.h(o_h), w0 = steps.w(in_plane - o_h * out_width.divisor);
      const uint32_t h = static_cast<uint32_t>(h0 + tap.dh), w = static_cast<uint32_t>(w0 + tap.dw);
      const bool inside = k < k_end && h < static_cast<uint32_t>(image.h) && w < static_cast<uint32_t>(image.w);
      const uint32_t pixel = (static_cast<uint32_t>(h0) * static_cast<uint32_t>(image.w) + static_cast<uint32_t>(w0)) *
                             static_cast<uint32_t>(image.pitch);
      put(j, opaque(base + n * image.sample_stride) + (pixel + tap.offset), inside);
    }
  }
};

// ----------------------------------------------------------------------------------------- the copies
// dst[n][p][c] = src[n][c][p] (p a pixel of the plane), rounded to TF32 when kRound: by tiles of 32 channels x
// 32 pixels through shared memory, so that the reads (along p) and the writes (along c) are both coalesced.
// blockIdx = (pixel tile, channel tile, first sample); the samples step by gridDim.z.
template <bool kRound>
__global__ void to_nhwc_kernel(const float* __restrict__ src, float* __restrict__ dst, int64_t samples,
                               int64_t channels, int64_t plane) {
  __shared__ float tile[32][33];  // 33: the column reads of the write hit 32 banks
  const int t = threadIdx.x, lane = t % 32, row = t / 32;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * 32, c0 = static_cast<int64_t>(blockIdx.y) * 32;
  for (int64_t n = blockIdx.z; n < samples; n += gridDim.z) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t c = c0 + row + 8 * i, p = p0 + lane;
      if (c < channels && p < plane) {
        const float value = src[(n * channels + c) * plane + p];
        tile[row + 8 * i][lane] = kRound ? round_to_tf32(value) : value;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t p = p0 + row + 8 * i, c = c0 + lane;
      if (c < channels && p < plane) dst[(n * plane + p) * channels + c] = tile[lane][row + 8 * i];
    }
    __syncthreads();  // before the next sample overwrites the tile
  }
}

// ----------------------------------------------------------------------------------------------- the calls
// Whether a geometry suits these kernels: the NCHW kernels' limits, runs of 4 channels (and filters) that
// stay within a group, and to_nhwc's grid (its y, tiles of 32 channels, below 65536).
inline bool nhwc_fits(const Conv2dGeometry& g) {
  return fits(g) && g.c_per_group() % 4 == 0 && g.f_per_group() % 4 == 0 && ceil_div(g.c, 32) < 65536 &&
         ceil_div(g.f, 32) < 65536;
}

// The channels-last copy of an NCHW float32 tensor (samples, channels, plane), as Math takes its operands.
template <typename Math>
void to_nhwc(const float* src, float* dst, int64_t samples, int64_t channels, int64_t plane, cudaStream_t stream) {
  if (samples == 0 || channels == 0 || plane == 0) return;
  auto* copy = &to_nhwc_kernel<Math::kTf32>;
  const dim3 grid(static_cast<unsigned int>(ceil_div(plane, 32)), static_cast<unsigned int>(ceil_div(channels, 32)),
                  static_cast<unsigned int>(samples < 65535 ? samples : 65535));
  TORCH_CS231N_LAUNCH(copy, grid, kThreads, stream, src, dst, samples, channels, plane);
}

// Forward from x' = to_nhwc(x): y (NCHW) = x ⋆ W (+ b). taps: forward_taps(g) entries; wt: forward_weight_size(g).
template <typename Math>
void forward_nhwc(const float* x_nhwc, const float* w, const float* bias, float* y, const Conv2dGeometry& g, Tap* taps,
                  float* wt, cudaStream_t stream) {
  const int64_t cg = g.c_per_group(), kg = cg * g.taps(), fg = g.f_per_group(), out_plane = g.oh * g.ow;
  // tap (t_h, t_w) shifts by (t_h·d_h, t_w·d_w), folded into the offset of x''s pixels
  fill_taps(taps, kg, forward_taps(g), g, 1, 0, g.dh, 0, g.dw, g.w * g.c, g.c, stream, KOrder::kTapMajor, cg);
  transpose_weight<float, Math>(w, wt, g, /*rows_are_filters=*/false, stream, KOrder::kTapMajor);
  const ToImage<float> out{y, bias, static_cast<int32_t>(fg), divider(out_plane), g.f * out_plane, fg * out_plane};
  const Extent e{static_cast<int32_t>(g.n * out_plane), static_cast<int32_t>(fg), static_cast<int32_t>(kg),
                 static_cast<int32_t>(kg), 1};
  auto run = [&](auto shape) {
    using Shape = decltype(shape);
    const PixelRunsAlongK<Shape::kBM, false> a{x_nhwc,          taps,           e.m, divider(out_plane), divider(g.ow),
                                               input_pixels(g), window_steps(g)};
    const RunsAlongN<Shape::kBN> b{wt, e.n, static_cast<uint32_t>(fg), static_cast<uint32_t>(round_up(kg, kBK) * fg)};
    launch_gemm<Shape, Math>(a, b, out, e, g.groups, /*async=*/false, stream);
  };
  if (fg <= 64) {
    run(Tall{});
  } else {
    run(Square{});
  }
}

// d_input (NCHW) from dY' = to_nhwc(dY). taps: grad_input_taps(g) entries; wt: grad_input_weight_size(g).
template <typename Math>
void grad_input_nhwc(const float* dy_nhwc, const float* w, float* dx, const Conv2dGeometry& g, Tap* taps, float* wt,
                     cudaStream_t stream) {
  const int64_t fg = g.f_per_group(), cg = g.c_per_group(), kg = fg * g.taps();
  const int64_t depth = round_up(kg, kBK);
  const bool unit_stride = g.sh == 1 && g.sw == 1;
  // o = (i + p - t*d) / s: the tap shifts i by p - t*d, folded into the offset when there is no division
  fill_taps(taps, kg, grad_input_taps(g), g, 1, g.ph, -g.dh, g.pw, -g.dw, unit_stride ? g.ow * g.f : 0,
            unit_stride ? g.f : 0, stream, KOrder::kTapMajor, fg);
  transpose_weight<float, Math>(w, wt, g, /*rows_are_filters=*/true, stream, KOrder::kTapMajor);
  const ToImage<float> out{dx, nullptr, static_cast<int32_t>(cg), divider(g.h * g.w), g.c * g.h * g.w, cg * g.h * g.w};
  const Extent e{static_cast<int32_t>(g.n * g.h * g.w), static_cast<int32_t>(cg), static_cast<int32_t>(kg),
                 static_cast<int32_t>(kg), 1};
  auto run = [&](auto shape, auto divide) {
    using Shape = decltype(shape);
    const PixelRunsAlongK<Shape::kBM, decltype(divide)::value> a{dy_nhwc,
                                                                 taps,
                                                                 e.m,
                                                                 divider(g.h * g.w),
                                                                 divider(g.w),
                                                                 output_pixels(g),
                                                                 Steps{1, 1, 0, 0},
                                                                 divider(g.sh),
                                                                 divider(g.sw),
                                                                 static_cast<uint32_t>(g.sh * g.oh),
                                                                 static_cast<uint32_t>(g.sw * g.ow)};
    const RunsAlongN<Shape::kBN> b{wt, e.n, static_cast<uint32_t>(cg), static_cast<uint32_t>(depth * cg)};
    launch_gemm<Shape, Math>(a, b, out, e, g.groups, /*async=*/false, stream);
  };
  if (cg <= 64) {
    unit_stride ? run(Tall{}, std::false_type{}) : run(Tall{}, std::true_type{});
  } else {
    unit_stride ? run(Square{}, std::false_type{}) : run(Square{}, std::true_type{});
  }
}

// d_weight from dY' and x'. taps: grad_weight_taps(g) entries; partials: grad_weight_partials(g, split) floats.
template <typename Math>
void grad_weight_nhwc(const float* dy_nhwc, const float* x_nhwc, float* dw, const Conv2dGeometry& g,
                      const WeightSplit& split, Tap* taps, float* partials, cudaStream_t stream) {
  const int64_t cg = g.c_per_group(), fg = g.f_per_group(), kg = cg * g.taps(), out_plane = g.oh * g.ow;
  fill_taps(taps, kg, grad_weight_taps(g), g, 1, 0, g.dh, 0, g.dw, g.w * g.c, g.c, stream, KOrder::kTapMajor, cg);
  const ToPartials out{partials, fg, kg};
  const Extent e{static_cast<int32_t>(fg), static_cast<int32_t>(kg), static_cast<int32_t>(g.n * out_plane),
                 static_cast<int32_t>(split.k_chunk), static_cast<int32_t>(split.splits)};
  with_shape(fg, kg, [&](auto shape) {
    using Shape = decltype(shape);
    const FilterRunsAlongM<Shape::kBM> a{dy_nhwc, e.m, static_cast<uint32_t>(g.f), static_cast<int32_t>(fg)};
    const PatchRunsAlongN<Shape::kBN> b{x_nhwc,          taps,           e.n, divider(out_plane), divider(g.ow),
                                        input_pixels(g), window_steps(g)};
    launch_gemm<Shape, Math>(a, b, out, e, g.groups * split.splits, /*async=*/false, stream);
  });
  auto* sum = &sum_partials_kernel<float>;
  TORCH_CS231N_LAUNCH(sum, helper_grid(g.groups * fg * kg), kThreads, stream, partials, dw, g.groups, split.splits,
                      fg * kg, cg, g.taps(), KOrder::kTapMajor);
}

}  // namespace implicit_gemm
}  // namespace cuda
}  // namespace torch_cs231n
