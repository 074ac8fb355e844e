// Copies of 4-d tensors between channels_last (NHWC) and NCHW memory, for the CPU convolution's routes
// that run NCHW kernels on channels_last tensors. torch's permuting copy took 92 ms to turn a (32, 64,
// 112, 112) channels_last dY into NCHW (and 28 ms the other way), where a plain copy of it takes 13:
// here each sample is moved as [pixels x C] <-> [C x pixels] by the GEMM's 16 x 16 register transposes
// (cpu::transpose_matrix), a block of pixels an item, the items over the threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/gemm.h"

namespace torch_cs231n {
namespace cpu {

namespace layout_detail {

// Pixels a block: 256 (for C = 256, 256 KiB of float32 read and written in L2).
constexpr int64_t kPixels = 256;

// For every sample n and block of pixels [p0, p1): f(n, p0, p1), in parallel.
template <typename F>
void for_pixel_blocks(int64_t n, int64_t pixels, int64_t c, const F& f) {
  const int64_t blocks = (pixels + kPixels - 1) / kPixels;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, kPixels * c));
  at::parallel_for(0, n * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p0 = item % blocks * kPixels;
      f(item / blocks, p0, std::min(pixels, p0 + kPixels));
    }
  });
}

inline bool float_or_double(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

}  // namespace layout_detail

// t.contiguous(): NCHW memory, by the transposes when t is a channels_last float or double tensor.
inline at::Tensor contiguous_nchw(const at::Tensor& t) {
  if (t.dim() != 4 || t.is_contiguous() || !t.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      !layout_detail::float_or_double(t)) {
    return t.contiguous();
  }
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t c = t.size(1), pixels = t.size(2) * t.size(3);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "contiguous_nchw", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    layout_detail::for_pixel_blocks(t.size(0), pixels, c, [&](int64_t n, int64_t p0, int64_t p1) {
      // [p1 - p0 pixels x C] at pixel p0 of sample n -> columns p0.. of its [C x pixels]
      transpose_matrix(src + (n * pixels + p0) * c, c, p1 - p0, c, dst + n * c * pixels + p0, pixels);
    });
  });
  return out;
}

// dst.copy_(src) for an NCHW src and a channels_last dst of the same shape and dtype, by the transposes
// when they are float or double; torch's copy_ otherwise.
inline void copy_nchw_into(at::Tensor& dst, const at::Tensor& src) {
  if (src.dim() != 4 || !src.is_contiguous() || dst.is_contiguous() ||
      !dst.is_contiguous(at::MemoryFormat::ChannelsLast) || dst.scalar_type() != src.scalar_type() ||
      dst.sizes() != src.sizes() || !layout_detail::float_or_double(src)) {
    dst.copy_(src);
    return;
  }
  const int64_t c = src.size(1), pixels = src.size(2) * src.size(3);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "copy_nchw_into", [&] {
    const scalar_t* from = src.const_data_ptr<scalar_t>();
    scalar_t* to = dst.mutable_data_ptr<scalar_t>();
    layout_detail::for_pixel_blocks(src.size(0), pixels, c, [&](int64_t n, int64_t p0, int64_t p1) {
      // columns p0.. of sample n's [C x pixels] -> [p1 - p0 pixels x C]
      transpose_matrix(from + n * c * pixels + p0, pixels, c, p1 - p0, to + (n * pixels + p0) * c, c);
    });
  });
}

}  // namespace cpu
}  // namespace torch_cs231n
