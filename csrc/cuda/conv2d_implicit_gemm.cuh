// Conv2d on CUDA as implicit GEMMs: each of the convolution's three products is a tiled GEMM whose operand
// tiles are gathered straight from the images as they are loaded, so no column buffer is ever written or
// read back (the im2col route of cuda/conv2d.cu spends most of its time on that buffer).
//
// Per group g (Cg = C/groups input and Fg = F/groups output channels, taps (t_h, t_w), i = o*s - p + t*d):
//     forward   y[(n,o_h,o_w), f]  = Σ_{(c,t_h,t_w)} x[n, c, i_h, i_w] · W[f, (c,t_h,t_w)]      M = N·oH·oW
//     d_input   dx[(n,i_h,i_w), c] = Σ_{(f,t_h,t_w)} dY[n, f, o_h, o_w] · W[f, (c,t_h,t_w)]     M = N·H·W
//               where o = (i + p - t*d) / s must be a whole number in [0, O) (conv_out_index)
//     d_weight  dW[f, (c,t_h,t_w)] = Σ_{(n,o_h,o_w)} dY[n, f, o_h, o_w] · x[n, c, i_h, i_w]     K = N·oH·oW
//
// One kernel computes D[m, n] = Σ_k A(m, k) · B(k, n) for all three; an operand "loader" says where A(m, k)
// or B(k, n) lives (below), an epilogue where D goes. A block computes a tile of D, 128 x 128 (or 256 x 64
// and 64 x 256 for products with 64 columns or rows: TileShape), in stages of 16 along k: its 256 threads
// gather the next stage into registers while the warps multiply the current one from shared memory (two
// buffers, one barrier per stage). A filter tap's offsets come from a small table (Tap) built once per
// call, so a gathered value costs a table read, two unsigned bounds tests and a load: positions are 32-bit,
// decoded once per block or stage with fixed-point divisions (common/int_divider.h), and d_input with a
// stride divides by it that way too, the inverse map's. Two kinds of arithmetic share that skeleton:
//   MmaTf32  tensor cores, mma.sync m16n8k8 with TF32 inputs (10-bit mantissas, rounded to nearest, ties
//            away, as cvt.rna does) and float32 accumulation: what torch's cuDNN convolutions do for
//            float32 when torch.backends.cudnn.allow_tf32 is on (its default), and exact for float16 and
//            bfloat16 inputs, whose values TF32 holds;
//   SimtFma  float32 fused multiply-adds on the CUDA cores, for float32 when TF32 is off (and below sm_80).
// Operands are read in their dtype (T: float, c10::Half, c10::BFloat16) and converted to float as loaded.
// d_weight sums over all N·oH·oW positions, so it is split along k into chunks that fill the GPU; each
// chunk writes its own partial sum and a second kernel adds them in a fixed order: no atomics, the
// result is deterministic.
//
// This file is plain CUDA with no torch type in it: cuda/conv2d.cu calls it with tensors' pointers, and
// tests/cuda_emulation/ compiles it for the CPU (TORCH_CS231N_CUDA_EMULATION), with the warp's MMA and the
// block's barriers emulated, so that its indexing is tested on machines without a GPU.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/conv2d_index.h"
#include "common/int_divider.h"
#include "cuda/emulatable.cuh"

namespace torch_cs231n {
namespace cuda {
namespace implicit_gemm {

// ------------------------------------------------------------------------------------------- the tiles
constexpr int kBK = 16;        // depth of one stage (k)
constexpr int kThreads = 256;  // 8 warps, each computing 64 x 32 of the block's tile
constexpr int kWarpM = 64, kWarpN = 32;

// A block's tile of D, kBM x kBN, its 8 warps kBM/64 along m by kBN/32 along n. Square by default; a product
// with only 64 columns (forward or d_input of a 64-channel layer) takes Tall, one with only 64 rows
// (d_weight of 64 filters) Wide, so that no half of a tile multiplies zeros.
template <int kRows, int kCols>
struct TileShape {
  static constexpr int kBM = kRows, kBN = kCols;
  static constexpr int kWarpsM = kRows / kWarpM;
  static_assert(kWarpsM * (kCols / kWarpN) * 32 == kThreads, "8 warps of 64 x 32 cover the tile");
};
using Square = TileShape<128, 128>;
using Tall = TileShape<256, 64>;
using Wide = TileShape<64, 256>;

// A shared tile is stored k-major, tile[k][mn], mn along the operand's side of the block's tile (its
// extent: kBM for A, kBN for B; the tensor-core arithmetic permutes mn within groups of 8: MmaTf32::column). Its rows
// are padded by 8 floats (row lengths 72, 136 and 264 are all 8 mod 32) so that the 32 lanes of an MMA fragment read
// (rows k..k+3, columns mn..mn+7) hit 32 banks.
template <int kExtent>
using Tile = float[kBK][kExtent + 8];
// The kernels align their shared tiles to 16 bytes, and so are the rows (kExtent + 8 floats, a multiple of
// 4), for store_stage's 16-byte stores.

// Each operand's stage is kBK x extent values, kBK * extent / 256 per thread. Which ones depends on which
// way the operand is contiguous in memory, so that neighbouring threads read neighbouring addresses:
//   along m (or n)  thread t takes column mn = t % extent and rows k = t / extent + i * (256 / extent);
//   along k         thread t takes row k = t % 16 and columns mn = t / 16 + 16i.
template <int kExtent>
constexpr int kPerThread = kBK * kExtent / kThreads;
template <bool kAlongK, int kExtent>
struct TileMap {
  static __host__ __device__ int k(int t, int i) { return kAlongK ? t % kBK : t / kExtent + i * (kThreads / kExtent); }
  static __host__ __device__ int mn(int t, int i) { return kAlongK ? t / kBK + i * (kThreads / kBK) : t % kExtent; }
  // A k in the same group of 4 rows as k(t, i), which is all a tile's column permutation depends on
  // (MmaTf32::column). Along m it is known at compile time: k = t / extent + i * 256/extent with t / extent
  // below 256/extent, which divides 4, so k / 4 = (i * 256/extent) / 4 and the store addresses are a few
  // registers plus constants (324 instructions a stage become 292 in the 128 x 128 forward).
  static __host__ __device__ int k_for_column(int t, int i) {
    return kAlongK ? t % kBK : (i * (kThreads / kExtent)) & ~3;
  }
};

// A filter tap's part of a gathered address, built for k = (channel, t_h, t_w) by tap_table_kernel: the
// shift (dh, dw) of its tap, and the offset of its value from the tap-0 position of the thread's pixel:
// channel * plane, plus dh * width + dw where the loader folds the shift in (all but d_input with a
// stride, which divides the shifted position first). Offsets are within one sample and group of an image
// (below 2^30, fits()), computed modulo 2^32: a position outside the image may wrap, but is never read.
struct alignas(16) Tap {
  uint32_t offset;
  int32_t dh, dw;
  int32_t unused;  // 16 bytes: one load
};

// Tap tables are padded to a multiple of kTapPadding entries (every tile's extent, and kBK) with taps that
// fall outside every image, so that a loader reads zeros past the matrix's end along k, or past its
// columns, without a bounds test: kOutside is below every position a real tap gives (fits() bounds those
// by 2^26), and its sum with any of them is negative (hence a huge unsigned number) without overflowing.
constexpr int kTapPadding = 256;
constexpr int32_t kOutside = -(1 << 30);
constexpr int64_t kPositionLimit = int64_t(1) << 24;  // image sizes, paddings, strided and dilated extents
constexpr int64_t kIndexLimit = int64_t(1) << 30;     // 32-bit positions m, k and offsets within a sample

// ---------------------------------------------------------------------------------- operand loaders
// A loader holds the call's arguments; start() adds what one thread needs for its tile (decoded once per
// block), and gather() finds the thread's values of the stage that begins at k0: it calls
// put(i, address, inside) for the thread's i-th value (or, for a loader with kVector = 4, its i-th run of 4
// values side by side in memory, read in one 16-byte load: cuda/conv2d_implicit_gemm_nhwc.cuh), which is
// *address when inside, else 0 (outside the
// matrix: k >= k_end, a tap in the padding; the address is then not to be read). put() either reads the
// value into a register (load(): the kernel stores it into shared memory a stage later) or copies it
// straight into shared memory (the async kernel's cp.async). Rows and columns past the matrix's end are read
// clamped to its last one: they only feed the tile's rows and columns past the end of D, which the epilogue
// never writes. Positions are 32-bit (fits()); a thread's base pointer holds the 64-bit offset of its sample.

// A gathered image (x, or dY for d_input): its plane, and its elements per sample and per group of channels.
struct Planes {
  int32_t h, w;
  int64_t sample_stride, group_stride;
};

// Where a row r of the pixel grid a loader runs over reads its first tap: r * step - shift along each axis
// (conv_in_index at tap 0: the stride and the padding for x; 1 and 0 for d_input's own grid).
struct Steps {
  int32_t step_h, step_w, shift_h, shift_w;
  __device__ int32_t h(uint32_t r) const { return conv_in_index<int32_t>(r, 0, step_h, shift_h, 1); }
  __device__ int32_t w(uint32_t r) const { return conv_in_index<int32_t>(r, 0, step_w, shift_w, 1); }
};

// i, or the last of `count` positions when i is past them (count >= 1)
__device__ __forceinline__ int32_t clamped(int32_t i, int32_t count) { return i < count ? i : count - 1; }

// p, as a value the compiler cannot take apart: it would otherwise fold a base pointer's sample offset
// into every gathered address, src + (offset + at) in 64 bits (four instructions), where p + at is one
// multiply-add (IMAD.WIDE.U32).
template <typename T>
__device__ __forceinline__ const T* opaque(const T* p) {
#if defined(__CUDA_ARCH__)
  asm("" : "+l"(p));
#endif
  return p;
}

// *p as a float, through the read-only data cache (ld.global.nc: the operands do not change during a
// kernel), which also tells the compiler that an opaque pointer is a global one.
template <typename T>
__device__ __forceinline__ float read_only(const T* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) {
    return __ldg(reinterpret_cast<const float*>(p));
  } else {
    static_assert(sizeof(T) == sizeof(unsigned short), "float, or a 16-bit float type");
    const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(p));
    T value;
    __builtin_memcpy(&value, &bits, sizeof value);
    return static_cast<float>(value);
  }
#else
  return static_cast<float>(*p);
#endif
}

// p[0..3] into v[0..3] in one 16-byte load through the read-only cache, or zeros when !inside (p is then
// not read). p must be 16-byte aligned: the emulation checks it, as a GPU would fault.
__device__ __forceinline__ void read_only4(const float* p, bool inside, float* v) {
#if defined(__CUDA_ARCH__)
  const float4 q = inside ? __ldg(reinterpret_cast<const float4*>(p)) : make_float4(0.f, 0.f, 0.f, 0.f);
  v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
#else
#if defined(TORCH_CS231N_CUDA_EMULATION)
  if (inside && reinterpret_cast<uintptr_t>(p) % 16 != 0) ::cuda_emulation::fault("a 16-byte load", p);
#endif
  for (int r = 0; r < 4; ++r) v[r] = inside ? p[r] : 0.f;
#endif
}

// v[0..3] into dst[0..3] in one 16-byte store (dst 16-byte aligned, as read_only4's p).
__device__ __forceinline__ void store4(float* dst, float v0, float v1, float v2, float v3) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(dst) = make_float4(v0, v1, v2, v3);
#else
#if defined(TORCH_CS231N_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) ::cuda_emulation::fault("a 16-byte store", dst);
#endif
  dst[0] = v0, dst[1] = v1, dst[2] = v2, dst[3] = v3;
#endif
}

// A loader's load(): its values of the stage at k0 into registers, as floats, 0 outside.
template <typename Loader, int kCount>
__device__ __forceinline__ void load_stage(const Loader& loader, int32_t k0, int32_t k_end, int t, float (&v)[kCount]) {
  if constexpr (Loader::kVector == 4) {
    loader.gather(k0, k_end, t, [&](int i, const float* p, bool inside) { read_only4(p, inside, v + 4 * i); });
  } else {
    loader.gather(k0, k_end, t,
                  [&](int i, const typename Loader::Element* p, bool inside) { v[i] = inside ? read_only(p) : 0.f; });
  }
}

// A(m, k) for forward and d_input: m = (n, r_h, r_w) an output (forward) or input (d_input) pixel, k = (ch,
// t_h, t_w). The value is src[n, ch, h, w] with h = steps.h(r_h) + tap.dh (and w alike), then,
// for d_input with a stride, divided by it when it divides (kDivide): the inverse map of conv_out_index.
template <typename T, int kExtent, bool kDivide>
struct PatchAlongM {
  static constexpr bool kAlongK = false;
  static constexpr int kVector = 1;
  static constexpr int kTileExtent = kExtent;
  static constexpr bool kReady = !std::is_same<T, float>::value;  // float16, bfloat16: TF32 values
  using Map = TileMap<false, kExtent>;
  using Element = T;
  const T* src;
  const Tap* taps;
  int32_t rows;                     // M
  IntDivider row_plane, row_width;  // row_h*row_w and row_w: m = (sample, r_h, r_w)
  Planes image;                     // src's
  Steps steps;
  IntDivider stride_h, stride_w;  // kDivide: the stride, and s*image.h, s*image.w the bounds of s*o
  uint32_t limit_h, limit_w;
  // per thread
  const T* base;
  int32_t h0, w0;  // the position tap 0 reads
  uint32_t pixel;  // h0*image.w + w0, modulo 2^32

  __device__ void start(int32_t m0, int32_t group, int t) {
    const int32_t m = clamped(m0 + Map::mn(t, 0), rows);
    const uint32_t n = row_plane.quotient(m), in_plane = m - n * row_plane.divisor;
    const uint32_t r_h = row_width.quotient(in_plane), r_w = in_plane - r_h * row_width.divisor;
    base = opaque(src + n * image.sample_stride + group * image.group_stride);
    h0 = steps.h(r_h);  // the tap adds tap.dh
    w0 = steps.w(r_w);
    pixel = static_cast<uint32_t>(h0) * static_cast<uint32_t>(image.w) + static_cast<uint32_t>(w0);
  }

  // (no test against k_end: past it, the padded tap table's taps fall outside the image)
  template <typename Put>
  __device__ __forceinline__ void gather(int32_t k0, int32_t, int t, Put&& put) const {
#pragma unroll
    for (int i = 0; i < kPerThread<kExtent>; ++i) {
      const Tap tap = taps[k0 + Map::k(t, i)];
      const int32_t h = h0 + tap.dh, w = w0 + tap.dw;
      const uint32_t hu = static_cast<uint32_t>(h), wu = static_cast<uint32_t>(w);
      bool inside;
      uint32_t at;
      if (kDivide) {  // o = (i + p - t*d) / s: h must be a multiple of s in [0, s*oH)
        const uint32_t oh = stride_h.quotient(hu), ow = stride_w.quotient(wu);
        inside = hu < limit_h && wu < limit_w && oh * stride_h.divisor == hu && ow * stride_w.divisor == wu;
        at = tap.offset + oh * static_cast<uint32_t>(image.w) + ow;
      } else {  // one unsigned test per axis: a negative position is a huge unsigned one
        inside = hu < static_cast<uint32_t>(image.h) && wu < static_cast<uint32_t>(image.w);
        at = pixel + tap.offset;
      }
      put(i, base + at, inside);
    }
  }
};

// B(k, n) for forward and d_input: the weight transposed per group, src[g][k][n] (transpose_weight_kernel)
// with k = (c, t_h, t_w), n = f for the forward and k = (f, t_h, t_w), n = c for d_input, its rows padded
// with zeros to a multiple of kBK: no bounds test along k.
template <typename T, int kExtent>
struct MatrixAlongN {
  static constexpr bool kAlongK = false;
  static constexpr int kVector = 1;
  static constexpr int kTileExtent = kExtent;
  static constexpr bool kReady = true;  // transpose_weight_kernel wrote it ready for the arithmetic
  using Map = TileMap<false, kExtent>;
  using Element = T;
  const T* src;
  int32_t cols;
  uint32_t ld, group_stride;
  const T* base;

  __device__ void start(int32_t n0, int32_t group, int t) {
    base = opaque(src + group * group_stride + clamped(n0 + Map::mn(t, 0), cols));
  }
  template <typename Put>
  __device__ __forceinline__ void gather(int32_t k0, int32_t, int t, Put&& put) const {
#pragma unroll
    for (int i = 0; i < kPerThread<kExtent>; ++i) put(i, base + (k0 + Map::k(t, i)) * ld, true);
  }
};

// A(m, k) for d_weight: m = f, k = (n, o_h, o_w): dY[n, g*Fg + f, o_h, o_w]. The thread's k is decoded
// once per stage, its filters are a plane apart.
template <typename T, int kExtent>
struct PlanesAlongK {
  static constexpr bool kAlongK = true;
  static constexpr int kVector = 1;
  static constexpr int kTileExtent = kExtent;
  static constexpr bool kReady = !std::is_same<T, float>::value;  // float16, bfloat16: TF32 values
  using Map = TileMap<true, kExtent>;
  using Element = T;
  const T* src;
  int32_t rows;
  IntDivider plane;  // oH*oW
  int64_t image_stride, group_stride;
  const T* base;
  int32_t m0;

  __device__ void start(int32_t m0_, int32_t group, int) {
    m0 = m0_;
    base = src + group * group_stride;
  }
  template <typename Put>
  __device__ __forceinline__ void gather(int32_t k0, int32_t k_end, int t, Put&& put) const {
    const int32_t k = k0 + Map::k(t, 0);
    const uint32_t position = clamped(k, k_end), n = plane.quotient(position);
    const T* at = opaque(base + n * image_stride + (position - n * plane.divisor));
#pragma unroll
    for (int i = 0; i < kPerThread<kExtent>; ++i) {
      const uint32_t f = clamped(m0 + Map::mn(t, i), rows);
      put(i, at + f * plane.divisor, k < k_end);
    }
  }
};

// B(k, n) for d_weight: k = (n, o_h, o_w), n = (c, t_h, t_w): x[n, g*Cg + c, i_h, i_w]. The thread's
// output pixel is decoded once per stage; its columns are taps (the padded table: zeros past its end).
template <typename T, int kExtent>
struct PatchAlongK {
  static constexpr bool kAlongK = true;
  static constexpr int kVector = 1;
  static constexpr int kTileExtent = kExtent;
  static constexpr bool kReady = !std::is_same<T, float>::value;  // float16, bfloat16: TF32 values
  using Map = TileMap<true, kExtent>;
  using Element = T;
  const T* src;
  const Tap* taps;
  IntDivider out_plane, out_width;  // oH*oW and oW: k = (sample, o_h, o_w)
  Planes image;                     // x's
  Steps steps;                      // the stride and the padding
  const T* base;
  int32_t n0;

  __device__ void start(int32_t n0_, int32_t group, int) {
    n0 = n0_;
    base = src + group * image.group_stride;
  }
  template <typename Put>
  __device__ __forceinline__ void gather(int32_t k0, int32_t k_end, int t, Put&& put) const {
    const int32_t k = k0 + Map::k(t, 0);
    const uint32_t position = clamped(k, k_end), n = out_plane.quotient(position);
    const uint32_t in_plane = position - n * out_plane.divisor, o_h = out_width.quotient(in_plane);
    const int32_t h0 = steps.h(o_h), w0 = steps.w(in_plane - o_h * out_width.divisor);  // the tap adds tap.dh
    const uint32_t pixel = static_cast<uint32_t>(h0) * static_cast<uint32_t>(image.w) + static_cast<uint32_t>(w0);
    const T* sample = opaque(base + n * image.sample_stride);
#pragma unroll
    for (int i = 0; i < kPerThread<kExtent>; ++i) {
      const Tap tap = taps[n0 + Map::mn(t, i)];
      const uint32_t h = static_cast<uint32_t>(h0 + tap.dh), w = static_cast<uint32_t>(w0 + tap.dw);
      const bool inside = k < k_end && h < static_cast<uint32_t>(image.h) && w < static_cast<uint32_t>(image.w);
      put(i, sample + (pixel + tap.offset), inside);
    }
  }
};

// -------------------------------------------------------------------------------------------- epilogues
// D[m, n] of forward and d_input goes to an NCHW image: m = (sample, pixel), n = channel g*cols + n; the
// forward adds the bias.
template <typename T>
struct ToImage {
  T* dst;
  const T* bias;  // or nullptr
  int32_t cols;
  IntDivider plane;
  int64_t image_stride, group_stride;
  __device__ T* row(int32_t m, int32_t z) const {
    const uint32_t n = plane.quotient(m);
    return dst + n * image_stride + z * group_stride + (m - n * plane.divisor);
  }
  __device__ void put(T* row, int32_t z, int32_t n, float value) const {
    if (bias != nullptr) value += static_cast<float>(bias[z * cols + n]);
    row[n * plane.divisor] = static_cast<T>(value);
  }
};

// D[m, n] of one chunk of d_weight: a float32 slice of the partial sums, partial[z][m][n] with
// z = group * splits + chunk (blockIdx.z).
struct ToPartials {
  float* dst;
  int64_t rows, cols;
  __device__ float* row(int32_t m, int32_t z) const { return dst + (z * rows + m) * cols; }
  __device__ void put(float* row, int32_t, int32_t n, float value) const { row[n] = value; }
};

// ---------------------------------------------------------------------------------------------- the math
__device__ __forceinline__ uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  __builtin_memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

// x rounded to TF32 (8-bit exponent, 10-bit mantissa): to nearest, ties away from zero, as cvt.rna does.
__device__ __forceinline__ float round_to_tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
  return __uint_as_float(bits);
#elif defined(__CUDA_ARCH__)
  __trap();  // TF32 needs sm_80; cuda/conv2d.cu never chooses MmaTf32 below it
  return x;
#else
  uint32_t bits = float_bits(x);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;  // Inf and NaN stay
  float rounded;
  __builtin_memcpy(&rounded, &bits, sizeof rounded);
  return rounded;
#endif
}

// d += a · b for one warp: a 16 x 8 (row-major fragments), b 8 x 8 (column-major), d 16 x 8, as the PTX ISA
// lays them out over the lanes (lane = 4*group + index in group):
//     a[0..3] = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4];   b[0..1] = B[t][g], B[t+4][g];
//     d[0..3] = D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
__device__ __forceinline__ void mma_16x8x8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  __trap();  // as above
#elif defined(TORCH_CS231N_CUDA_EMULATION)
  ::cuda_emulation::mma_16x8x8_tf32(d, a, b);
#endif
}

// Tensor cores. A warp's 64 x 32 is 4 x 4 MMA tiles of 16 x 8; each stage is two steps of k = 8.
// The thread's accumulators, seen as 8 rows by 8 columns: row r is m = 16*(r/2) + g + 8*(r%2) and column c
// is n = 8*(c/2) + 2t + c%2 of the warp's piece (the d layout above, tile by tile).
struct MmaTf32 {
  // Two blocks of 8 warps per multiprocessor, so that one multiplies while the other waits at its barrier
  // or for its loads. That caps a thread at 128 registers: ptxas spills 0-40 bytes (0-10 local accesses a
  // stage in the loop).
  template <typename Shape>
  static constexpr int blocks_per_multiprocessor() {
    return 2;
  }
  static constexpr bool kTf32 = true;  // operands rounded to TF32 (operand())
  struct Accumulators {
    float v[4][4][4];  // [m tile][n tile][fragment]
  };
  static __device__ float operand(float x) { return round_to_tf32(x); }
  // Where element (k, mn) of a shared tile is stored: its column XOR 2*((k/4) % 4), a permutation within
  // each group of 8 columns. With rows 8 banks apart, the fragment reads (4 rows of one group of 4, 8
  // columns) hit 32 banks either way, and so now do the stores of the operands loaded along k (16 rows, 2
  // columns), which without it fell 4 to a bank.
  static __device__ int column(int k, int mn) { return mn ^ (((k >> 2) & 3) << 1); }
  static __device__ float& at(Accumulators& acc, int r, int c) { return acc.v[r / 2][c / 2][(r % 2) * 2 + c % 2]; }
  static __device__ int row(int lane, int r) { return 16 * (r / 2) + lane / 4 + 8 * (r % 2); }
  static __device__ int col(int lane, int c) { return 8 * (c / 2) + 2 * (lane % 4) + c % 2; }

  // An operand's fragment value: its bits, rounded to TF32 here when the tile holds it unrounded (kRound:
  // the async kernel's float32 tiles, copied as they are in memory).
  template <bool kRound>
  static __device__ __forceinline__ uint32_t fragment(float x) {
    return float_bits(kRound ? round_to_tf32(x) : x);
  }

  template <bool kRoundA = false, bool kRoundB = false, typename TileA, typename TileB>
  static __device__ void multiply(const TileA& a_tile, const TileB& b_tile, int wm, int wn, int lane,
                                  Accumulators& acc) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int k = 0; k < kBK; k += 8) {
      // rows k..k+3 share their permutation, and k+4..k+7; as it permutes within groups of 8, column(k, base
      // + g) = base + column(k, g) for the multiples of 8 below: a register plus constants, per address
      const int g0 = column(k, g), g4 = column(k + 4, g);
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = wm + 16 * i;
        a[i][0] = fragment<kRoundA>(a_tile[k + t][m + g0]);
        a[i][1] = fragment<kRoundA>(a_tile[k + t][m + 8 + g0]);
        a[i][2] = fragment<kRoundA>(a_tile[k + t + 4][m + g4]);
        a[i][3] = fragment<kRoundA>(a_tile[k + t + 4][m + 8 + g4]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = wn + 8 * j;
        b[j][0] = fragment<kRoundB>(b_tile[k + t][n + g0]);
        b[j][1] = fragment<kRoundB>(b_tile[k + t + 4][n + g4]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16x8x8_tf32(acc.v[i][j], a[i], b[j]);
      }
    }
  }
};

// CUDA cores. The warp's lanes form 8 x 4; lane (lm, ln) computes rows 8*lm.. and columns 8*ln.. of the
// warp's piece, 64 fused multiply-adds per k.
struct SimtFma {
  // Two blocks per multiprocessor for the square tile, whose kernels fit 128 registers (d_weight's with 10
  // local accesses in a loop of 1285 instructions); one for the 256 x 64 and 64 x 256 tiles, which would
  // spill inside the loop.
  template <typename Shape>
  static constexpr int blocks_per_multiprocessor() {
    return Shape::kBM == Shape::kBN ? 2 : 1;
  }
  static constexpr bool kTf32 = false;
  struct Accumulators {
    float v[8][8];
  };
  static __device__ float operand(float x) { return x; }
  // Stored unpermuted: a thread reads 8 neighbouring columns of a row as two float4s.
  static __device__ int column(int, int mn) { return mn; }
  static __device__ float& at(Accumulators& acc, int r, int c) { return acc.v[r][c]; }
  static __device__ int row(int lane, int r) { return 8 * (lane / 4) + r; }
  static __device__ int col(int lane, int c) { return 8 * (lane % 4) + c; }

  template <bool = false, bool = false, typename TileA, typename TileB>  // (no rounding: float32 as it is)
  static __device__ void multiply(const TileA& a_tile, const TileB& b_tile, int wm, int wn, int lane,
                                  Accumulators& acc) {
    const int m = wm + row(lane, 0), n = wn + col(lane, 0);
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      float a[8], b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        a[i] = a_tile[k][m + i];
        b[i] = b_tile[k][n + i];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc.v[i][j] = fmaf(a[i], b[j], acc.v[i][j]);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------- the kernel
// A run of 4 values along mn (a loader with kVector = 4 that is contiguous along m or n) is one 16-byte store:
// its columns mn..mn+3 (mn a multiple of 4) are permuted by column() into base + (r ^ swap) for r < 4, as
// both kinds of arithmetic permute (MmaTf32 XORs bits 1 and 2 of a column, SimtFma none; the emulation
// checks it), so the store puts the pairs in swapped order where swap is 2.
template <typename Math, typename Loader, typename TileT>
__device__ __forceinline__ void store_runs(TileT& tile, const float (&v)[kPerThread<Loader::kTileExtent>], int t) {
  using Map = typename Loader::Map;
#pragma unroll
  for (int i = 0; i < kPerThread<Loader::kTileExtent>; i += 4) {
    const int k = Map::k(t, i), column = Math::column(k, Map::mn(t, i));
    const int base = column & ~3, swap = column & 3;
#if defined(TORCH_CS231N_CUDA_EMULATION)
    for (int r = 0; r < 4; ++r) {
      if (Math::column(k, Map::mn(t, i) + r) != base + (r ^ swap) || (swap != 0 && swap != 2)) {
        ::cuda_emulation::fault("a run of 4 columns that column() does not keep together", &tile[k][base]);
      }
    }
#endif
    float u[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) u[r] = Loader::kReady ? v[i + r] : Math::operand(v[i + r]);
    if (swap == 0) {
      store4(&tile[k][base], u[0], u[1], u[2], u[3]);
    } else {
      store4(&tile[k][base], u[2], u[3], u[0], u[1]);
    }
  }
}

// A loader's values into a shared tile, as the arithmetic takes them (Math::operand: float32 rounded to TF32
// for the tensor cores), unless the loader's values are ready as they are (kReady: float16 and bfloat16
// values are TF32 values; the transposed weights are written rounded).
template <typename Math, typename Loader, typename TileT>
__device__ void store_stage(TileT& tile, const float (&v)[kPerThread<Loader::kTileExtent>], int t) {
  using Map = typename Loader::Map;
  if constexpr (Loader::kVector == 4 && !Loader::kAlongK) {
    store_runs<Math, Loader>(tile, v, t);
  } else {
#pragma unroll
    for (int i = 0; i < kPerThread<Loader::kTileExtent>; ++i) {
      const int k = Map::k(t, i);  // (along k, k itself: the same value, which ptxas happens to schedule better)
      tile[k][Math::column(Loader::kAlongK ? k : Map::k_for_column(t, i), Map::mn(t, i))] =
          Loader::kReady ? v[i] : Math::operand(v[i]);
    }
  }
}

// The extent of D and of the sum: blockIdx = (m tile, n tile, group * splits + chunk); chunk c sums
// k in [c * k_chunk, min(k, (c + 1) * k_chunk)), k_chunk a multiple of kBK.
struct Extent {
  int32_t m, n, k, k_chunk;
  int32_t splits;
};

// Where a block's tile of D lies (blockIdx = (m tile, n tile, group * splits + chunk)), the part of the sum
// it adds (k in [k_begin, k_end)), and where the piece of its thread's warp lies in it.
template <typename Shape>
struct Place {
  int t, lane, wm, wn;
  int32_t m0, n0, z, group, k_begin, k_end;
  __device__ explicit Place(const Extent& e)
      : t(threadIdx.x),
        lane(t % 32),
        wm((t / 32 % Shape::kWarpsM) * kWarpM),
        wn((t / 32 / Shape::kWarpsM) * kWarpN),
        m0(static_cast<int32_t>(blockIdx.x) * Shape::kBM),
        n0(static_cast<int32_t>(blockIdx.y) * Shape::kBN),
        z(blockIdx.z),
        group(z / e.splits),
        k_begin((z - group * e.splits) * e.k_chunk),
        k_end(e.k - k_begin < e.k_chunk ? e.k : k_begin + e.k_chunk) {}
};

// A block's start: its loaders told where its tile lies, its accumulators zeroed.
template <typename Math, typename LoaderA, typename LoaderB, typename PlaceT>
__device__ __forceinline__ void start(LoaderA& a, LoaderB& b, const PlaceT& at, typename Math::Accumulators& acc) {
  a.start(at.m0, at.group, at.t);
  b.start(at.n0, at.group, at.t);
#pragma unroll
  for (int r = 0; r < 8; ++r) {
#pragma unroll
    for (int c = 0; c < 8; ++c) Math::at(acc, r, c) = 0.f;
  }
}

// A warp's piece of D, whose corner is (m0, n0), through the epilogue: the entries inside D only.
template <typename Math, typename Epilogue>
__device__ __forceinline__ void write_tile(const Epilogue& epilogue, typename Math::Accumulators& acc, const Extent& e,
                                           int32_t m0, int32_t n0, int32_t z, int32_t group, int lane) {
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    const int32_t m = m0 + Math::row(lane, r);
    if (m >= e.m) continue;
    auto* row = epilogue.row(m, z);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int32_t n = n0 + Math::col(lane, c);
      if (n < e.n) epilogue.put(row, group, n, Math::at(acc, r, c));
    }
  }
}

// Its main loop issues about 270-580 instructions a warp per stage with MmaTf32 (32 of them MMAs), 1230-1480
// with SimtFma (1024 FMAs), in 128 registers a thread where two blocks share a multiprocessor
// (Math::blocks_per_multiprocessor), else 162-174 (sm_90): tools/sass_loop_report.py counts them.
template <typename Shape, typename Math, typename LoaderA, typename LoaderB, typename Epilogue>
__global__ void __launch_bounds__(kThreads, Math::template blocks_per_multiprocessor<Shape>())
    implicit_gemm_kernel(LoaderA a, LoaderB b, Epilogue epilogue, Extent e) {
  static_assert(LoaderA::kTileExtent == Shape::kBM && LoaderB::kTileExtent == Shape::kBN, "loaders fit the tile");
  alignas(16) __shared__ Tile<Shape::kBM> a_tiles[2];
  alignas(16) __shared__ Tile<Shape::kBN> b_tiles[2];
  const Place<Shape> at(e);
  const int t = at.t;
  typename Math::Accumulators acc;
  start<Math>(a, b, at, acc);
  float va[kPerThread<Shape::kBM>], vb[kPerThread<Shape::kBN>];
  const int32_t stages = at.k_end > at.k_begin ? (at.k_end - at.k_begin + kBK - 1) / kBK : 0;
  if (stages > 0) {
    load_stage(a, at.k_begin, at.k_end, t, va);
    load_stage(b, at.k_begin, at.k_end, t, vb);
    store_stage<Math, LoaderA>(a_tiles[0], va, t);
    store_stage<Math, LoaderB>(b_tiles[0], vb, t);
    __syncthreads();
  }
  for (int32_t s = 0; s < stages; ++s) {
    const int current = s % 2;
    const bool more = s + 1 < stages;
    if (more) {  // the next stage's loads are in flight while this one is multiplied
      load_stage(a, at.k_begin + (s + 1) * kBK, at.k_end, t, va);
      load_stage(b, at.k_begin + (s + 1) * kBK, at.k_end, t, vb);
    }
    Math::multiply(a_tiles[current], b_tiles[current], at.wm, at.wn, at.lane, acc);
    if (more) {  // the other buffer was last read before the previous barrier
      store_stage<Math, LoaderA>(a_tiles[1 - current], va, t);
      store_stage<Math, LoaderB>(b_tiles[1 - current], vb, t);
    }
    __syncthreads();
  }

  write_tile<Math>(epilogue, acc, e, at.m0 + at.wm, at.n0 + at.wn, at.z, at.group, at.lane);
}

// ------------------------------------------------------------------------------- the async kernel (a candidate)
// The same product with the operands copied global -> shared by cp.async (sm_80+), kAsyncStages stages deep:
// while the warps multiply stage s, the copies of stages s+1 .. s+3 are in flight, and no register holds
// them. The kernel above has one stage in flight, in registers, so a gather's latency must hide behind one
// stage's 32 MMAs a warp; at the H200's 69 TFLOP/s of TF32 (conv3x3_deep, 2026-11-30) a block spent about
// 2900 cycles a stage where its instructions need about 1200. float32 only (cp.async moves 4, 8 or 16
// bytes): the tiles hold the values as they are, so the TF32 rounding moves to the fragment reads
// (MmaTf32::fragment) for the operands that are not ready, which gives the same bits as the rounding at the
// stores. TORCH_CS231N_CUDA_CONV_LOADS=async chooses it (cuda/conv2d_implicit_gemm.cu). On the H200 it passed
// the convolution's tests but was faster only for some layers, and no faster with TF32 (docs/conv2d.md):
// the loop is bound by latency at two blocks a multiprocessor, and by the grid's last partial wave.
constexpr int kAsyncStages = 4;

template <typename Shape>
constexpr int async_shared_bytes() {
  return kAsyncStages * static_cast<int>(sizeof(Tile<Shape::kBM>) + sizeof(Tile<Shape::kBN>));
}

// *src into *dst (shared memory) without passing through a register, or 0 when !inside (zero-filled: nothing
// is read, and src is then any address the loader holds, so `fallback`, a valid one, is given instead).
__device__ __forceinline__ void copy_async(float* dst, const float* src, const float* fallback, bool inside) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(to), "l"(inside ? src : fallback),
               "r"(inside ? 4 : 0));
#elif defined(__CUDA_ARCH__)
  __trap();  // cp.async needs sm_80; cuda/conv2d_implicit_gemm.cu never chooses this kernel below it
#else
  (void)fallback;
  *dst = inside ? *src : 0.f;  // the emulation: at once
#endif
}
// Closes the group of copies issued since the last commit; waits until at most kPending groups are in flight.
__device__ __forceinline__ void commit_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int kPending>
__device__ __forceinline__ void wait_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// A loader's values of the stage at k0, copied into a shared tile where store_stage would put them.
template <typename Math, typename Loader, typename TileT>
__device__ __forceinline__ void copy_stage(const Loader& loader, int32_t k0, int32_t k_end, int t, TileT& tile) {
  static_assert(Loader::kVector == 1, "the async kernel copies single values");
  using Map = typename Loader::Map;
  loader.gather(k0, k_end, t, [&](int i, const float* p, bool inside) {
    const int k = Map::k(t, i);
    copy_async(&tile[k][Math::column(Loader::kAlongK ? k : Map::k_for_column(t, i), Map::mn(t, i))], p, loader.src,
               inside);
  });
}

template <typename Shape, typename Math, typename LoaderA, typename LoaderB, typename Epilogue>
__global__ void __launch_bounds__(kThreads, Math::template blocks_per_multiprocessor<Shape>())
    implicit_gemm_async_kernel(LoaderA a, LoaderB b, Epilogue epilogue, Extent e) {
  static_assert(LoaderA::kTileExtent == Shape::kBM && LoaderB::kTileExtent == Shape::kBN, "loaders fit the tile");
  static_assert(
      std::is_same<typename LoaderA::Element, float>::value && std::is_same<typename LoaderB::Element, float>::value,
      "cp.async copies float32 operands");
  // operands the arithmetic takes rounded (TF32) that the loader does not give ready
  constexpr bool kRoundA = Math::kTf32 && !LoaderA::kReady, kRoundB = Math::kTf32 && !LoaderB::kReady;
  auto* a_tiles = dynamic_shared<Tile<Shape::kBM>>();  // [kAsyncStages], then b's
  auto* b_tiles = reinterpret_cast<Tile<Shape::kBN>*>(a_tiles + kAsyncStages);
  const Place<Shape> at(e);
  const int t = at.t;
  typename Math::Accumulators acc;
  start<Math>(a, b, at, acc);
  const int32_t stages = at.k_end > at.k_begin ? (at.k_end - at.k_begin + kBK - 1) / kBK : 0;
  // the first kAsyncStages - 1 stages in flight; one group per stage, empty past the last, so that the
  // count of groups in flight says which stage has landed
#pragma unroll
  for (int s = 0; s < kAsyncStages - 1; ++s) {
    if (s < stages) {
      copy_stage<Math>(a, at.k_begin + s * kBK, at.k_end, t, a_tiles[s]);
      copy_stage<Math>(b, at.k_begin + s * kBK, at.k_end, t, b_tiles[s]);
    }
    commit_copies();
  }
  int current = 0, refill = kAsyncStages - 1;  // the buffers of stage s and of stage s + kAsyncStages - 1
  for (int32_t s = 0; s < stages; ++s) {
    wait_copies<kAsyncStages - 2>();  // this thread's copies of stage s have landed
    __syncthreads();                  // and everyone's; everyone is done with stage s - 1, in buffer `refill`
    if (s + kAsyncStages - 1 < stages) {
      const int32_t k0 = at.k_begin + (s + kAsyncStages - 1) * kBK;
      copy_stage<Math>(a, k0, at.k_end, t, a_tiles[refill]);
      copy_stage<Math>(b, k0, at.k_end, t, b_tiles[refill]);
    }
    commit_copies();
    Math::template multiply<kRoundA, kRoundB>(a_tiles[current], b_tiles[current], at.wm, at.wn, at.lane, acc);
    current = current + 1 == kAsyncStages ? 0 : current + 1;
    refill = refill + 1 == kAsyncStages ? 0 : refill + 1;
  }
  write_tile<Math>(epilogue, acc, e, at.m0 + at.wm, at.n0 + at.wn, at.z, at.group, at.lane);
}

// ---------------------------------------------------------------------------------------- helper kernels
// How k numbers a product's (channel, tap) pairs: (ch, t_h, t_w) as the weight's rows in NCHW, or
// (t_h, t_w, ch) for the channels-last loaders (cuda/conv2d_implicit_gemm_nhwc.cuh), whose runs of 4 k are
// 4 channels of one tap, side by side in memory.
enum class KOrder { kChannelMajor, kTapMajor };

// taps[k] for k = (ch, t_h, t_w) or (t_h, t_w, ch) < count (of `channels` channels): the shift (first_h + t_h
// * step_h, first_w + t_w * step_w) and the offset ch * plane + shift_h * fold_h + shift_w * fold_w (fold =
// (width, 1) folds the shift into an NCHW offset, (width * C, C) into an NHWC one, (0, 0) does not);
// kOutside shifts for k in [count, padded).
__global__ void tap_table_kernel(Tap* taps, int64_t count, int64_t padded, int64_t kh, int64_t kw, int64_t channels,
                                 KOrder order, int64_t plane, int64_t first_h, int64_t step_h, int64_t first_w,
                                 int64_t step_w, int64_t fold_h, int64_t fold_w) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < padded;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (k >= count) {
      taps[k] = Tap{0, kOutside, kOutside, 0};
      continue;
    }
    const bool tap_major = order == KOrder::kTapMajor;
    const int64_t ch = tap_major ? k % channels : k / (kh * kw), tap = tap_major ? k / channels : k % (kh * kw);
    const int64_t dh = first_h + (tap / kw) * step_h, dw = first_w + (tap % kw) * step_w;
    taps[k] = Tap{static_cast<uint32_t>(ch * plane + dh * fold_h + dw * fold_w), static_cast<int32_t>(dh),
                  static_cast<int32_t>(dw), 0};
  }
}

// The weight w[g*Fg + f][c][t] transposed per group into the B of a product, wt[g][row][col], contiguous along
// its columns: row = (c, t) and col = f for the forward (rows_are_filters false), row = (f, t) and col = c
// for d_input (row = (t, c) and (t, f) in KOrder::kTapMajor); its rows padded with zeros from Cg*taps (or
// Fg*taps) to `depth`. kRound: float32 values rounded to TF32 once here, for the tensor cores, rather than
// as each block loads them.
template <typename T, bool kRound>
__global__ void transpose_weight_kernel(const T* __restrict__ w, T* __restrict__ wt, int64_t groups, int64_t fg,
                                        int64_t cg, int64_t taps, int64_t depth, bool rows_are_filters, KOrder order) {
  const int64_t cols = rows_are_filters ? cg : fg, rows = (rows_are_filters ? fg : cg) * taps;
  const int64_t per_tap = rows_are_filters ? fg : cg;  // rows of one tap in KOrder::kTapMajor
  const int64_t total = groups * depth * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t col = i % cols, row = (i / cols) % depth, group = i / (cols * depth);
    const bool tap_major = order == KOrder::kTapMajor;
    const int64_t channel = tap_major ? row % per_tap : row / taps, tap = tap_major ? row / per_tap : row % taps;
    const int64_t f = rows_are_filters ? channel : col, c = rows_are_filters ? col : channel;
    T value = row < rows ? w[((group * fg + f) * cg + c) * taps + tap] : T(0.f);
    if constexpr (kRound) value = round_to_tf32(value);
    wt[i] = value;
  }
}

// dw[g*Fg + f][n] = Σ_chunk partial[g * splits + chunk][f][n'], in chunk order (deterministic), where the
// partials' columns n' = (c, t) are dw's n, or n' = (t, c) in KOrder::kTapMajor (of cg channels and `taps`).
template <typename T>
__global__ void sum_partials_kernel(const float* __restrict__ partial, T* __restrict__ dw, int64_t groups,
                                    int64_t splits, int64_t per_group, int64_t cg, int64_t taps, KOrder order) {
  const int64_t total = groups * per_group, cols = cg * taps;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t group = i / per_group, j = i % per_group;
    const int64_t col = j % cols, c = col / taps, t = col % taps;
    const int64_t from = order == KOrder::kTapMajor ? j - col + t * cg + c : j;
    const float* p = partial + group * splits * per_group + from;
    float sum = 0.f;
    for (int64_t s = 0; s < splits; ++s) sum += p[s * per_group];
    dw[i] = static_cast<T>(sum);
  }
}

// ----------------------------------------------------------------------------------------------- the calls
// What a call needs besides the tensors (tap tables, d_input's transposed weight, d_weight's partial sums)
// is sized by the functions below; the caller allocates it on the device (cuda/conv2d_implicit_gemm.cu with
// torch's allocator, the emulation test with plain memory).
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// A divisor for a loader, computed here on the host; 1 for an empty extent (whose products are not launched).
inline IntDivider divider(int64_t d) { return IntDivider(static_cast<uint32_t>(d < 1 ? 1 : d)); }

// The convolution's input and output images, as loaders gather them, and the steps of its windows.
inline Steps window_steps(const Conv2dGeometry& g) {
  return {static_cast<int32_t>(g.sh), static_cast<int32_t>(g.sw), static_cast<int32_t>(g.ph),
          static_cast<int32_t>(g.pw)};
}
inline Planes input_planes(const Conv2dGeometry& g) {
  return {static_cast<int32_t>(g.h), static_cast<int32_t>(g.w), g.c * g.h * g.w, g.c_per_group() * g.h * g.w};
}
inline Planes output_planes(const Conv2dGeometry& g) {
  return {static_cast<int32_t>(g.oh), static_cast<int32_t>(g.ow), g.f * g.oh * g.ow, g.f_per_group() * g.oh * g.ow};
}

// The grid of a helper kernel's grid-stride loop over n items (at most 4096 blocks).
inline dim3 helper_grid(int64_t n) {
  const int64_t blocks = ceil_div(n, kThreads);
  return dim3(static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > 4096 ? 4096 : blocks)));
}

// Entries of the tap tables: forward's and d_weight's are over (c, t_h, t_w), d_input's over (f, t_h, t_w).
inline int64_t forward_taps(const Conv2dGeometry& g) { return round_up(g.c_per_group() * g.taps(), kTapPadding); }
inline int64_t grad_weight_taps(const Conv2dGeometry& g) { return forward_taps(g); }
inline int64_t grad_input_taps(const Conv2dGeometry& g) { return round_up(g.f_per_group() * g.taps(), kTapPadding); }
// Elements of the transposed weights: per group, Cg*kh*kw rows (forward) or Fg*kh*kw (d_input) rounded up to
// kBK, of Fg or Cg columns.
inline int64_t forward_weight_size(const Conv2dGeometry& g) {
  return g.groups * round_up(g.c_per_group() * g.taps(), kBK) * g.f_per_group();
}
inline int64_t grad_input_weight_size(const Conv2dGeometry& g) {
  return g.groups * round_up(g.f_per_group() * g.taps(), kBK) * g.c_per_group();
}
// The B of forward (rows_are_filters false) or d_input, ready for Math (MatrixAlongN::kReady).
template <typename T, typename Math>
void transpose_weight(const T* w, T* wt, const Conv2dGeometry& g, bool rows_are_filters, cudaStream_t stream,
                      KOrder order = KOrder::kChannelMajor) {
  const int64_t depth = round_up((rows_are_filters ? g.f_per_group() : g.c_per_group()) * g.taps(), kBK);
  constexpr bool kRound = Math::kTf32 && std::is_same<T, float>::value;  // float16, bfloat16: TF32 values
  auto* transpose = &transpose_weight_kernel<T, kRound>;
  TORCH_CS231N_LAUNCH(transpose, helper_grid(rows_are_filters ? grad_input_weight_size(g) : forward_weight_size(g)),
                      kThreads, stream, w, wt, g.groups, g.f_per_group(), g.c_per_group(), g.taps(), depth,
                      rows_are_filters, order);
}

// Whether a geometry fits the kernels' limits; otherwise the caller takes another route:
//   the grid's: y and z below 65536, with the narrowest tile side, 64;
//   32-bit positions: rows and sums N*H*W and N*oH*oW, a sample's elements, the weight's and the tap
//   tables' below kIndexLimit (2^30, so that a tile's edge past them does not overflow either);
//   image sizes, paddings and the strided and dilated extents at most kPositionLimit (2^24), so that a
//   position plus a tap's shift is exact in 32 bits and far above kOutside.
inline bool fits(const Conv2dGeometry& g) {
  const int64_t cg = g.c_per_group(), fg = g.f_per_group();
  const int64_t widest = fg > cg * g.taps() ? fg : cg * g.taps();
  const bool grid = ceil_div(widest, 64) < 65536 && ceil_div(cg, 64) < 65536 && g.groups < 65536;
  const int64_t counts[] = {g.n * g.h * g.w,           g.n * g.oh * g.ow,   g.c * g.h * g.w,
                            g.f * g.oh * g.ow,         g.f * cg * g.taps(), forward_weight_size(g),
                            grad_input_weight_size(g), forward_taps(g),     grad_input_taps(g)};
  const int64_t positions[] = {g.h, g.w, g.oh, g.ow, g.ph, g.pw, g.sh * g.oh, g.sw * g.ow, g.dh * g.kh, g.dw * g.kw};
  bool small = true;
  for (int64_t count : counts) small = small && count < kIndexLimit;
  for (int64_t position : positions) small = small && position <= kPositionLimit;
  return grid && small;
}

// One product on one tile shape: the grid covers D, blockIdx.z the groups (times the chunks of d_weight).
// async: the async kernel, for float32 operands read one value at a time (others take the kernel with
// registers).
template <typename Shape, typename Math, typename LoaderA, typename LoaderB, typename Epilogue>
void launch_gemm(const LoaderA& a, const LoaderB& b, const Epilogue& out, const Extent& e, int64_t z, bool async,
                 cudaStream_t stream) {
  if (e.m == 0 || e.n == 0) return;  // an empty product (an input plane of 0 rows, say): nothing to write
  const dim3 grid(static_cast<unsigned int>(ceil_div(e.m, Shape::kBM)),
                  static_cast<unsigned int>(ceil_div(e.n, Shape::kBN)), static_cast<unsigned int>(z));
  if constexpr (std::is_same<typename LoaderA::Element, float>::value && LoaderA::kVector == 1 &&
                LoaderB::kVector == 1) {
    if (async) {
      auto* kernel = &implicit_gemm_async_kernel<Shape, Math, LoaderA, LoaderB, Epilogue>;
      constexpr int bytes = async_shared_bytes<Shape>();  // above the 48 KB a kernel gets unasked
#if !defined(TORCH_CS231N_CUDA_EMULATION)
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);  // per device: every call
#endif
      TORCH_CS231N_LAUNCH_SHARED(kernel, grid, kThreads, bytes, stream, a, b, out, e);
      return;
    }
  }
  auto* kernel = &implicit_gemm_kernel<Shape, Math, LoaderA, LoaderB, Epilogue>;
  TORCH_CS231N_LAUNCH(kernel, grid, kThreads, stream, a, b, out, e);
}

// The area the tiles of a shape cover for a product of `rows` x `cols` (what the blocks multiply, zeros
// included).
template <typename Shape>
int64_t covered(int64_t rows, int64_t cols) {
  return ceil_div(rows, Shape::kBM) * Shape::kBM * ceil_div(cols, Shape::kBN) * Shape::kBN;
}

// f(Shape{}) with the tile shape that covers a product of `rows` x `cols` with the least idle area: Tall
// for 64 columns or fewer over many rows (forward and d_input of a 64-channel layer), Wide for the
// converse (d_weight of 64 filters), Square otherwise and on ties.
template <typename F>
void with_shape(int64_t rows, int64_t cols, F&& f) {
  const int64_t square = covered<Square>(rows, cols), tall = covered<Tall>(rows, cols);
  const int64_t wide = covered<Wide>(rows, cols);
  if (tall < square && tall <= wide) {
    f(Tall{});
  } else if (wide < square) {
    f(Wide{});
  } else {
    f(Square{});
  }
}

// The tap table of `count` real entries, padded to `padded` (tap_table_kernel); in KOrder::kTapMajor, k runs
// over `channels` channels of each tap.
inline void fill_taps(Tap* taps, int64_t count, int64_t padded, const Conv2dGeometry& g, int64_t plane, int64_t first_h,
                      int64_t step_h, int64_t first_w, int64_t step_w, int64_t fold_h, int64_t fold_w,
                      cudaStream_t stream, KOrder order = KOrder::kChannelMajor, int64_t channels = 1) {
  auto* table = &tap_table_kernel;
  TORCH_CS231N_LAUNCH(table, helper_grid(padded), kThreads, stream, taps, count, padded, g.kh, g.kw, channels, order,
                      plane, first_h, step_h, first_w, step_w, fold_h, fold_w);
}

// Forward: y = x ⋆ W (+ b), all NCHW and contiguous. taps: forward_taps(g) entries; wt: forward_weight_size(g)
// elements.
template <typename T, typename Math>
void forward(const T* x, const T* w, const T* bias, T* y, const Conv2dGeometry& g, Tap* taps, T* wt,
             cudaStream_t stream, bool async = false) {
  const int64_t kg = g.c_per_group() * g.taps(), fg = g.f_per_group(), out_plane = g.oh * g.ow;
  // tap (t_h, t_w) shifts by (t_h·d_h, t_w·d_w), folded into the offset
  fill_taps(taps, kg, forward_taps(g), g, g.h * g.w, 0, g.dh, 0, g.dw, g.w, 1, stream);
  transpose_weight<T, Math>(w, wt, g, /*rows_are_filters=*/false, stream);
  const ToImage<T> out{y, bias, static_cast<int32_t>(fg), divider(out_plane), g.f * out_plane, fg * out_plane};
  const Extent e{static_cast<int32_t>(g.n * out_plane), static_cast<int32_t>(fg), static_cast<int32_t>(kg),
                 static_cast<int32_t>(kg), 1};
  // rows are output pixels, never few: Tall or Square
  auto run = [&](auto shape) {
    using Shape = decltype(shape);
    // rows m over the output grid, gathered from x: h = o_h·s − p + tap.dh, no division (so the stride's
    // dividers and limits stay unset)
    const PatchAlongM<T, Shape::kBM, false> a{
        x, taps, e.m, divider(out_plane), divider(g.ow), input_planes(g), window_steps(g)};
    const MatrixAlongN<T, Shape::kBN> b{wt, e.n, static_cast<uint32_t>(fg),
                                        static_cast<uint32_t>(round_up(kg, kBK) * fg)};
    launch_gemm<Shape, Math>(a, b, out, e, g.groups, async, stream);
  };
  if (fg <= 64) {
    run(Tall{});
  } else {
    run(Square{});
  }
}

// d_input = dY ⋆ᵀ W. taps: grad_input_taps(g) entries; wt: grad_input_weight_size(g) elements.
template <typename T, typename Math>
void grad_input(const T* dy, const T* w, T* dx, const Conv2dGeometry& g, Tap* taps, T* wt, cudaStream_t stream,
                bool async = false) {
  const int64_t fg = g.f_per_group(), cg = g.c_per_group(), kg = fg * g.taps(), out_plane = g.oh * g.ow;
  const int64_t depth = round_up(kg, kBK);
  const bool unit_stride = g.sh == 1 && g.sw == 1;
  // o = (i + p - t*d) / s: the tap shifts i by p - t*d, folded into the offset when there is no division
  fill_taps(taps, kg, grad_input_taps(g), g, out_plane, g.ph, -g.dh, g.pw, -g.dw, unit_stride ? g.ow : 0,
            unit_stride ? 1 : 0, stream);
  transpose_weight<T, Math>(w, wt, g, /*rows_are_filters=*/true, stream);
  const ToImage<T> out{dx, nullptr, static_cast<int32_t>(cg), divider(g.h * g.w), g.c * g.h * g.w, cg * g.h * g.w};
  const Extent e{static_cast<int32_t>(g.n * g.h * g.w), static_cast<int32_t>(cg), static_cast<int32_t>(kg),
                 static_cast<int32_t>(kg), 1};
  auto run = [&](auto shape, auto divide) {
    using Shape = decltype(shape);
    constexpr bool kDivide = decltype(divide)::value;
    // rows m over the input grid, gathered from dY: o_h = (i_h + tap.dh) / s when it divides (tap.dh = p − t·d)
    const PatchAlongM<T, Shape::kBM, kDivide> a{dy,
                                                taps,
                                                e.m,
                                                divider(g.h * g.w),
                                                divider(g.w),
                                                output_planes(g),
                                                Steps{1, 1, 0, 0},
                                                divider(g.sh),
                                                divider(g.sw),
                                                static_cast<uint32_t>(g.sh * g.oh),
                                                static_cast<uint32_t>(g.sw * g.ow)};
    const MatrixAlongN<T, Shape::kBN> b{wt, e.n, static_cast<uint32_t>(cg), static_cast<uint32_t>(depth * cg)};
    launch_gemm<Shape, Math>(a, b, out, e, g.groups, async, stream);
  };
  // rows are input pixels, never few: Tall or Square; the division by the stride only where there is one
  if (cg <= 64) {
    unit_stride ? run(Tall{}, std::false_type{}) : run(Tall{}, std::true_type{});
  } else {
    unit_stride ? run(Square{}, std::false_type{}) : run(Square{}, std::true_type{});
  }
}

// d_weight = Σ dY · x-patches, split along N·oH·oW into chunks that give the GPU about `blocks_wanted` blocks
// (each chunk at least kMinChunk long, so that a block has work to amortise its start).
constexpr int64_t kMinChunk = 8 * kBK;
struct WeightSplit {
  int64_t splits, k_chunk;
};
inline WeightSplit grad_weight_split(const Conv2dGeometry& g, int64_t blocks_wanted) {
  const int64_t k = g.n * g.oh * g.ow, fg = g.f_per_group(), kg = g.c_per_group() * g.taps();
  int64_t tiles = 0;
  with_shape(fg, kg, [&](auto shape) {
    tiles = ceil_div(fg, decltype(shape)::kBM) * ceil_div(kg, decltype(shape)::kBN) * g.groups;
  });
  int64_t splits = ceil_div(blocks_wanted, tiles);
  const int64_t most = ceil_div(k, kMinChunk), grid_most = 65535 / g.groups;
  splits = splits < 1 ? 1 : (splits > most ? most : splits);
  splits = splits > grid_most ? grid_most : splits;
  const int64_t k_chunk = round_up(ceil_div(k, splits), kBK);
  return {ceil_div(k, k_chunk), k_chunk};
}
inline int64_t grad_weight_partials(const Conv2dGeometry& g, const WeightSplit& split) {
  return g.groups * split.splits * g.f_per_group() * g.c_per_group() * g.taps();
}

// taps: grad_weight_taps(g) entries; partials: grad_weight_partials(g, split) floats.
template <typename T, typename Math>
void grad_weight(const T* dy, const T* x, T* dw, const Conv2dGeometry& g, const WeightSplit& split, Tap* taps,
                 float* partials, cudaStream_t stream, bool async = false) {
  const int64_t fg = g.f_per_group(), kg = g.c_per_group() * g.taps(), out_plane = g.oh * g.ow;
  fill_taps(taps, kg, grad_weight_taps(g), g, g.h * g.w, 0, g.dh, 0, g.dw, g.w, 1, stream);  // as the forward's
  const ToPartials out{partials, fg, kg};
  const Extent e{static_cast<int32_t>(fg), static_cast<int32_t>(kg), static_cast<int32_t>(g.n * out_plane),
                 static_cast<int32_t>(split.k_chunk), static_cast<int32_t>(split.splits)};
  with_shape(fg, kg, [&](auto shape) {
    using Shape = decltype(shape);
    const PlanesAlongK<T, Shape::kBM> a{dy, e.m, divider(out_plane), g.f * out_plane, fg * out_plane};
    // columns (c, t_h, t_w), the sum over output pixels k, gathered from x as in the forward
    const PatchAlongK<T, Shape::kBN> b{x, taps, divider(out_plane), divider(g.ow), input_planes(g), window_steps(g)};
    launch_gemm<Shape, Math>(a, b, out, e, g.groups * split.splits, async, stream);
  });
  auto* sum = &sum_partials_kernel<T>;
  TORCH_CS231N_LAUNCH(sum, helper_grid(g.groups * fg * kg), kThreads, stream, partials, dw, g.groups, split.splits,
                      fg * kg, g.c_per_group(), g.taps(), KOrder::kChannelMajor);
}

}  // namespace implicit_gemm
}  // namespace cuda
}  // namespace torch_cs231n
