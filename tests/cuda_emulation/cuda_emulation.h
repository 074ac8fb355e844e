// A CPU stand-in for the few parts of CUDA that csrc/cuda/conv2d_implicit_gemm.cuh uses, so that its kernels
// run, and their indexing is tested, on machines without a GPU.
//
// A launch runs the grid's blocks one after another. A block's threads are fibers (ucontext) on one OS
// thread, each with its own stack, switched by a scheduler:
//   __syncthreads()     a fiber waits until every live thread of its block waits there too;
//   the warp's MMA      each lane posts its fragments and waits; when all 32 lanes of the warp have posted,
//                       the scheduler computes the product for them all, from the PTX ISA's fragment
//                       layout (the layout the kernel assumes is then checked against the one written here);
//   __shared__          a static local, shared by the block's fibers (blocks never overlap); the dynamic
//                       shared memory, a buffer of the launch's size;
//   cp.async            a copy at once (cuda/conv2d_implicit_gemm.cuh), so its waits have nothing to wait for.
// A barrier that some threads of a block never reach is a deadlock on a GPU; here it aborts with a message.
// Blocks run in order and threads of a block in a fixed order, so a run is reproducible; races that need
// two threads to interleave differently are not found, only wrong indices, wrong fragment layouts, and
// barriers out of place.
#pragma once

#define TORCH_CS231N_CUDA_EMULATION 1

#include <math.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace cuda_emulation {

enum class State { kReady, kAtBarrier, kAtMma, kDone };

struct Thread {
  ucontext_t context;
  State state = State::kReady;
  dim3 index;
  // the fragments this lane posted to the warp's MMA
  float* d = nullptr;
  const uint32_t* a = nullptr;
  const uint32_t* b = nullptr;
};

struct Scheduler {
  std::vector<Thread> threads;
  std::vector<char> stacks;
  ucontext_t home;
  size_t current = 0;
  dim3 block_index, block_dim, grid_dim;
  std::function<void()> body;
  std::vector<float> dynamic_shared;  // the launch's dynamic shared memory (its heap block: 16-byte aligned)
};

inline Scheduler& scheduler() {
  static Scheduler s;
  return s;
}

constexpr size_t kStack = 128 * 1024;
constexpr unsigned int kWarp = 32;

// The running fiber stops in `state` and hands control back to the scheduler.
inline void wait(State state) {
  Scheduler& s = scheduler();
  Thread& t = s.threads[s.current];
  t.state = state;
  swapcontext(&t.context, &s.home);
}

inline void entry() {
  Scheduler& s = scheduler();
  s.body();
  s.threads[s.current].state = State::kDone;  // uc_link returns to the scheduler
}

inline float from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// The warp's mma.sync.m16n8k8 (TF32 in, float32 out), with the PTX ISA's layout: lane = 4*g + t holds
//   a: A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4];  b: B[t][g], B[t+4][g];
//   d: D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
// The tensor core reads only a TF32 operand's top 19 bits.
inline void multiply_warp(Thread* lanes) {
  auto a = [&](int row, int k) {
    return from_bits(lanes[(row % 8) * 4 + k % 4].a[row / 8 + 2 * (k / 4)] & 0xffffe000u);
  };
  auto b = [&](int k, int col) { return from_bits(lanes[col * 4 + k % 4].b[k / 4] & 0xffffe000u); };
  float result[kWarp][4];
  for (unsigned int lane = 0; lane < kWarp; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r / 2), col = 2 * t + r % 2;
      float sum = lanes[lane].d[r];
      for (int k = 0; k < 8; ++k) sum += a(row, k) * b(k, col);
      result[lane][r] = sum;
    }
  }
  for (unsigned int lane = 0; lane < kWarp; ++lane) std::memcpy(lanes[lane].d, result[lane], sizeof result[lane]);
}

inline void mma_16x8x8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Scheduler& s = scheduler();
  Thread& t = s.threads[s.current];
  t.d = d;
  t.a = a;
  t.b = b;
  wait(State::kAtMma);
}

[[noreturn]] inline void deadlock(const char* why) {
  Scheduler& s = scheduler();
  std::fprintf(stderr, "cuda_emulation: block (%u, %u, %u): %s; thread states:", s.block_index.x, s.block_index.y,
               s.block_index.z, why);
  for (size_t i = 0; i < s.threads.size(); ++i) std::fprintf(stderr, " %d", static_cast<int>(s.threads[i].state));
  std::fprintf(stderr, "\n");
  std::abort();
}

// An access a GPU would fault on (a 16-byte one at an address that is not a multiple of 16), or a layout
// that a kernel assumes and that does not hold: cuda/conv2d_implicit_gemm.cuh checks them here.
[[noreturn]] inline void fault(const char* what, const void* p) {
  Scheduler& s = scheduler();
  std::fprintf(stderr, "cuda_emulation: block (%u, %u, %u), thread %zu: %s at %p\n", s.block_index.x, s.block_index.y,
               s.block_index.z, s.current, what, p);
  std::abort();
}

// Releases what can be released once no thread can run: each warp whose live lanes all posted to the MMA,
// else the block barrier when every live thread waits at it. False when everyone has finished.
inline bool release() {
  Scheduler& s = scheduler();
  const size_t n = s.threads.size();
  bool any_live = false, released = false;
  for (size_t w = 0; w < n; w += kWarp) {
    size_t at_mma = 0, live = 0;
    for (size_t i = w; i < w + kWarp && i < n; ++i) {
      live += s.threads[i].state != State::kDone;
      at_mma += s.threads[i].state == State::kAtMma;
    }
    any_live = any_live || live > 0;
    if (at_mma == 0) continue;
    if (at_mma != kWarp) deadlock("an MMA that not all 32 lanes of a warp reached");
    multiply_warp(&s.threads[w]);
    for (size_t i = w; i < w + kWarp; ++i) s.threads[i].state = State::kReady;
    released = true;
  }
  if (released || !any_live) return any_live;
  for (const Thread& t : s.threads) {
    if (t.state != State::kDone && t.state != State::kAtBarrier) deadlock("a barrier that not every thread reached");
  }
  for (Thread& t : s.threads) {
    if (t.state == State::kAtBarrier) t.state = State::kReady;
  }
  return true;
}

inline void run_block() {
  Scheduler& s = scheduler();
  const size_t n = static_cast<size_t>(s.block_dim.x) * s.block_dim.y * s.block_dim.z;
  s.threads.assign(n, Thread{});
  if (s.stacks.size() < n * kStack) s.stacks.resize(n * kStack);
  for (size_t i = 0; i < n; ++i) {
    Thread& t = s.threads[i];
    t.index = dim3(static_cast<unsigned int>(i % s.block_dim.x),
                   static_cast<unsigned int>((i / s.block_dim.x) % s.block_dim.y),
                   static_cast<unsigned int>(i / (s.block_dim.x * s.block_dim.y)));
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = s.stacks.data() + i * kStack;
    t.context.uc_stack.ss_size = kStack;
    t.context.uc_link = &s.home;
    makecontext(&t.context, &entry, 0);
  }
  do {
    for (bool ran = true; ran;) {
      ran = false;
      for (size_t i = 0; i < n; ++i) {
        if (s.threads[i].state != State::kReady) continue;
        s.current = i;
        swapcontext(&s.home, &s.threads[i].context);
        ran = true;
      }
    }
  } while (release());
}

// kernel<<<grid, block, shared_bytes>>>(args...): each thread gets its own copy of the parameters, as on a
// GPU; the dynamic shared memory starts as NaNs, so that a value read before it was written shows.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(Params...), Args... args) {
  const std::tuple<Params...> params(args...);
  Scheduler& s = scheduler();
  s.dynamic_shared.assign((shared_bytes + sizeof(float) - 1) / sizeof(float), NAN);
  s.body = [&] { std::apply(kernel, params); };
  s.grid_dim = grid;
  s.block_dim = block;
  for (unsigned int z = 0; z < grid.z; ++z) {
    for (unsigned int y = 0; y < grid.y; ++y) {
      for (unsigned int x = 0; x < grid.x; ++x) {
        s.block_index = dim3(x, y, z);
        run_block();
      }
    }
  }
}

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::scheduler().threads[::cuda_emulation::scheduler().current].index)
#define blockIdx (::cuda_emulation::scheduler().block_index)
#define blockDim (::cuda_emulation::scheduler().block_dim)
#define gridDim (::cuda_emulation::scheduler().grid_dim)

inline void __syncthreads() { ::cuda_emulation::wait(::cuda_emulation::State::kAtBarrier); }
