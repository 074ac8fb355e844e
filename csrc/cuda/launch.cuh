// Launch helpers shared by the CUDA kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

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

// ---- candidate kernels ----
// A new kernel that has not yet passed `make gpu-check` on a GPU is a candidate: the proven one stays the
// default and an environment variable chooses the candidate. Whether `name` does: unset, "" or `proven`
// say no, `candidate` says yes, anything else is an error that names both. Read at each call, so a test
// can switch it.
inline bool candidate_chosen(const char* name, const char* proven, const char* candidate) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0' || std::strcmp(env, proven) == 0) return false;
  TORCH_CHECK(std::strcmp(env, candidate) == 0, name, ": expected '", proven, "' (the default) or '", candidate,
              "', but got '", env, "'");
  return true;
}

}  // namespace cuda
}  // namespace torch_cs231n
