// Max pooling on CUDA: one warp per line (cuda/launch.cuh) over the shared window math of
// common/max_pool2d.h.
//
//   forward   per output: pool::scan_window over its window, in the accumulation type (float for half
//             and bfloat16), writing the value and the flat index h*W + w.
//   backward  by default the flat kernels of cuda/max_pool2d_backward.cuh (a scatter, or a gather with
//             32-bit indices); with TORCH_CS231N_CUDA_POOL_BACKWARD=lines, per input a gather, rule (3),
//             over the outputs whose window can hold it (pool::candidate_outputs), adding dy[o] where
//             index[o] is this input. Either way each gradient is written once by one thread, in a fixed
//             order: deterministic, without atomics.
//
// Layouts are as on the CPU: the output, the indices and the gradient take torch's memory format (the
// input's suggested one), and inputs in any other layout are first copied into it. A line is a row (NCHW)
// or a pixel's channels (NHWC), so neighbouring lanes touch neighbouring addresses in both. All indexing
// is int64; the divisions that decode it are paid once per line.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "common/checks.h"
#include "common/max_pool2d.h"
#include "cuda/launch.cuh"
#include "cuda/max_pool2d_backward.cuh"

namespace torch_cs231n {
namespace {

// The geometry, by value into the kernels (the flat backward's struct: one definition).
using Params = cuda::max_pool::Params;

Params params_of(const MaxPool2dGeometry& g) {
  return {g.channels, g.height, g.width, g.out_h, g.out_w, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw};
}

// Lines (launch.cuh): a dense (N, C, rows, cols) tensor is walked one line at a time, the lanes of a warp
// on its innermost dimension: in NCHW line (n, c, h) holds the cols values w, in NHWC line (n, h, w) the C
// channels c. Element j of line `line` lies at memory offset line * inner + j.
template <bool kChannelsLast>
__host__ __device__ inline int64_t line_length(int64_t C, int64_t cols) {
  return kChannelsLast ? C : cols;
}

// (n, c, h, w) of element j of a line; the line's own indices are decoded once, by decode_line.
struct LineIndex {
  int64_t n, c, h, w;
};

template <bool kChannelsLast>
__device__ inline LineIndex decode_line(int64_t line, int64_t C, int64_t rows, int64_t cols) {
  LineIndex l{0, 0, 0, 0};
  if (kChannelsLast) {
    l.w = line % cols;
    line /= cols;
    l.h = line % rows;
    l.n = line / rows;
  } else {
    l.h = line % rows;
    line /= rows;
    l.c = line % C;
    l.n = line / C;
  }
  return l;
}

template <bool kChannelsLast>
__device__ inline LineIndex at_element(LineIndex l, int64_t j) {
  if (kChannelsLast) {
    l.c = j;
  } else {
    l.w = j;
  }
  return l;
}

// Memory offset of (n, c, h, w) in a dense (N, C, rows, cols) tensor in NCHW or NHWC (the flat backward's
// flat(), in int64).
template <bool kChannelsLast>
__device__ inline int64_t offset(int64_t n, int64_t c, int64_t h, int64_t w, int64_t C, int64_t rows, int64_t cols) {
  return cuda::max_pool::flat<int64_t, kChannelsLast>(n, c, h, w, C, rows, cols);
}

// Reads element (ih, iw) of one plane, whose pixels lie `step` elements apart (1 in NCHW, C in NHWC).
template <typename scalar_t>
struct PlaneLoad {
  const scalar_t* plane;
  int64_t width, step;
  C10_HOST_DEVICE scalar_t operator()(int64_t ih, int64_t iw) const { return plane[(ih * width + iw) * step]; }
};

template <typename scalar_t, bool kChannelsLast>
__global__ void max_pool2d_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                          int64_t* __restrict__ ind, int64_t lines, Params p) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  const int64_t inner = line_length<kChannelsLast>(p.channels, p.out_w);
  for (int64_t line = cuda::first_line(); line < lines; line += cuda::line_step()) {
    const LineIndex l = decode_line<kChannelsLast>(line, p.channels, p.out_h, p.out_w);
    for (int64_t j = cuda::lane(); j < inner; j += cuda::kWarp) {
      const LineIndex o = at_element<kChannelsLast>(l, j);
      const PlaneLoad<scalar_t> load{x + offset<kChannelsLast>(o.n, o.c, 0, 0, p.channels, p.height, p.width), p.width,
                                     kChannelsLast ? p.channels : 1};
      acc_t best;
      int64_t index;
      pool::scan_window<acc_t>(o.h, o.w, p.height, p.width, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw, load, &best,
                               &index);
      y[line * inner + j] = static_cast<scalar_t>(best);
      ind[line * inner + j] = index;
    }
  }
}

// One warp per line of the input gradient; each value gathers, rule (3), over the outputs whose window
// can hold it (pool::candidate_outputs: the rows once per line, the columns once per line in NHWC).
template <typename scalar_t, bool kChannelsLast>
__global__ void max_pool2d_backward_kernel(const scalar_t* __restrict__ dy, const int64_t* __restrict__ ind,
                                           scalar_t* __restrict__ dx, int64_t lines, Params p) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  const int64_t inner = line_length<kChannelsLast>(p.channels, p.width);
  for (int64_t line = cuda::first_line(); line < lines; line += cuda::line_step()) {
    const LineIndex l = decode_line<kChannelsLast>(line, p.channels, p.height, p.width);
    int64_t oh0, oh1, ow0 = 0, ow1 = 0;
    pool::candidate_outputs(l.h, p.out_h, p.kh, p.sh, p.ph, p.dh, &oh0, &oh1);
    if (kChannelsLast) pool::candidate_outputs(l.w, p.out_w, p.kw, p.sw, p.pw, p.dw, &ow0, &ow1);
    for (int64_t j = cuda::lane(); j < inner; j += cuda::kWarp) {
      const LineIndex i = at_element<kChannelsLast>(l, j);
      if (!kChannelsLast) pool::candidate_outputs(i.w, p.out_w, p.kw, p.sw, p.pw, p.dw, &ow0, &ow1);
      const int64_t target = i.h * p.width + i.w;
      acc_t sum = acc_t(0);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        for (int64_t ow = ow0; ow < ow1; ++ow) {
          const int64_t o = offset<kChannelsLast>(i.n, i.c, oh, ow, p.channels, p.out_h, p.out_w);
          if (ind[o] == target) sum += static_cast<acc_t>(dy[o]);
        }
      }
      dx[line * inner + j] = static_cast<scalar_t>(sum);
    }
  }
}

// The flat backward (cuda/max_pool2d_backward.cuh), the default since it passed `make gpu-check` on an H200
// (2x2 forward+backward 2.14 -> 0.92 ms): a scatter when windows do not overlap, a flat gather otherwise,
// both with 32-bit indexing where the tensors allow. TORCH_CS231N_CUDA_POOL_BACKWARD=lines chooses the
// line kernel above instead.
void flat_backward(const at::Tensor& dy, const at::Tensor& ind, at::Tensor& dx, int64_t batch, const Params& p,
                   bool nhwc, cudaStream_t stream) {
  if (cuda::max_pool::windows_disjoint(p)) dx.zero_();  // the scatter writes only the maxima
  const int64_t cap = cuda::grid_for(dx.numel());
  // 32-bit indices when every index the grid-stride loops form fits, the last step's overshoot included
  const bool narrow =
      std::max(dx.numel(), dy.numel()) + cap * cuda::max_pool::kThreads <= std::numeric_limits<int32_t>::max();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "max_pool2d_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const int64_t* ip = ind.const_data_ptr<int64_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    namespace mp = cuda::max_pool;
    if (nhwc) {
      narrow ? mp::backward<scalar_t, acc_t, true, int32_t>(dyp, ip, dxp, batch, p, cap, stream)
             : mp::backward<scalar_t, acc_t, true, int64_t>(dyp, ip, dxp, batch, p, cap, stream);
    } else {
      narrow ? mp::backward<scalar_t, acc_t, false, int32_t>(dyp, ip, dxp, batch, p, cap, stream)
             : mp::backward<scalar_t, acc_t, false, int64_t>(dyp, ip, dxp, batch, p, cap, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                                           at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPool2dGeometry g =
      max_pool2d_geometry(input, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d_forward");
  const c10::cuda::CUDAGuard guard(input.device());
  const auto opts = input.options().memory_format(g.format);
  at::Tensor output = at::empty(g.output_sizes(), opts);
  at::Tensor indices = at::empty(g.output_sizes(), opts.dtype(at::kLong));
  const int64_t total = output.numel();
  if (total == 0) return {output, indices};
  const int64_t lines = total / (g.format == at::MemoryFormat::ChannelsLast ? g.channels : g.out_w);
  const at::Tensor x = input.contiguous(g.format);
  const bool nhwc = g.format == at::MemoryFormat::ChannelsLast;
  const Params p = params_of(g);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_forward_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = output.mutable_data_ptr<scalar_t>();
    int64_t* ip = indices.mutable_data_ptr<int64_t>();
    if (nhwc) {
      max_pool2d_forward_kernel<scalar_t, true>
          <<<cuda::grid_for_lines(lines), cuda::kThreads, 0, stream>>>(xp, yp, ip, lines, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      max_pool2d_forward_kernel<scalar_t, false>
          <<<cuda::grid_for_lines(lines), cuda::kThreads, 0, stream>>>(xp, yp, ip, lines, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {output, indices};
}

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPool2dGeometry g =
      check_max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_input = at::empty(g.input_sizes(), input.options().memory_format(g.format));
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;
  const int64_t lines = total / (g.format == at::MemoryFormat::ChannelsLast ? g.channels : g.width);
  const at::Tensor dy = grad_output.contiguous(g.format);
  const at::Tensor ind = indices.contiguous(g.format);
  const bool nhwc = g.format == at::MemoryFormat::ChannelsLast;
  const Params p = params_of(g);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (cuda::kernel_named("TORCH_CS231N_CUDA_POOL_BACKWARD", {"flat", "lines"}) != 1) {
    flat_backward(dy, ind, grad_input, g.batch, p, nhwc, stream);
    return grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "max_pool2d_backward_cuda", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const int64_t* ip = ind.const_data_ptr<int64_t>();
    scalar_t* dxp = grad_input.mutable_data_ptr<scalar_t>();
    if (nhwc) {
      max_pool2d_backward_kernel<scalar_t, true>
          <<<cuda::grid_for_lines(lines), cuda::kThreads, 0, stream>>>(dyp, ip, dxp, lines, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      max_pool2d_backward_kernel<scalar_t, false>
          <<<cuda::grid_for_lines(lines), cuda::kThreads, 0, stream>>>(dyp, ip, dxp, lines, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_cs231n, CUDA, m) {
  m.impl("max_pool2d_forward", &max_pool2d_forward_cuda);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cuda);
}

}  // namespace torch_cs231n
