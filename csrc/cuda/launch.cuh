// Launch helpers shared by the CUDA kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

namespace torch_cs231n {
namespace cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n items: enough to fill the GPU, never more than one per item.
inline unsigned int grid_for(int64_t n, int threads = kThreads) {
  const int64_t per_sm = 2048 / threads;
  const int64_t fill = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * per_sm * 4;
  const int64_t needed = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, fill)));
}

// ---- one warp per line ----
// A line is a run of consecutive elements whose other indices are shared: an image row in NCHW, a pixel's
// channels in NHWC. A kernel decodes those indices once per line, with the divisions that costs, and the
// warp's lanes walk the line, so neighbouring lanes touch neighbouring addresses and the per-element work
// is an add. Lines are spread over all the grid's warps.
constexpr int kWarp = 32;

inline unsigned int grid_for_lines(int64_t lines) { return grid_for(lines * kWarp); }

__device__ inline int64_t first_line() { return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; }
__device__ inline int64_t line_step() { return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp; }
__device__ inline int lane() { return static_cast<int>(threadIdx.x % kWarp); }

// ---- kernel choices ----
// Where two kernels can do one job, an environment variable may name one. A new kernel that has not yet
// passed `make gpu-check` on a GPU is never the default: only its variable chooses it (a candidate). One
// that has passed, and measured faster, becomes the default, and the kernel it replaced stays a choice.
// kernel_named(name, {a, b, ...}): the index of the value the variable `name` holds among the kernels' names,
// -1 when it is unset or empty (the layer's default); any other value is an error that names them all. Read at
// each call, so a test can switch it.
inline int kernel_named(const char* name, std::initializer_list<const char*> kernels) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return -1;
  int index = 0;
  std::string expected;
  for (const char* kernel : kernels) {
    if (std::strcmp(env, kernel) == 0) return index;
    expected += (index == 0 ? "'" : index + 1 == static_cast<int>(kernels.size()) ? " or '" : ", '");
    expected += std::string(kernel) + "'";
    ++index;
  }
  TORCH_CHECK(false, name, ": expected ", expected, " (or unset: the default), but got '", env, "'");
}

}  // namespace cuda
}  // namespace torch_cs231n
