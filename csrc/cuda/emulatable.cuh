// What a kernel header needs so that tests/cuda_emulation/ can also compile it for the CPU: a launch that is
// `kernel<<<grid, threads, 0, stream>>>(args...)` under nvcc and an emulated launch there
// (TORCH_CS231N_CUDA_EMULATION, defined by tests/cuda_emulation/cuda_emulation.h). Such a header includes no
// torch header and uses only what the emulation provides: threadIdx and friends, __syncthreads, __shared__
// arrays, and the warp MMA of cuda/conv2d_implicit_gemm.cuh. `kernel` must be one name (a pointer to the
// kernel, taken beforehand when the kernel is a template with several arguments).
#pragma once

#if defined(TORCH_CS231N_CUDA_EMULATION)
#define TORCH_CS231N_LAUNCH(kernel, grid, threads, stream, ...) \
  ::cuda_emulation::launch(grid, dim3(threads), kernel, __VA_ARGS__)
#else
#define TORCH_CS231N_LAUNCH(kernel, grid, threads, stream, ...) kernel<<<grid, threads, 0, stream>>>(__VA_ARGS__)
#endif
