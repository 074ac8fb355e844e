// The flat max-pool backward kernels (csrc/cuda/max_pool2d_backward.cuh), run on the CPU under
// cuda_emulation.h, against rule (3) of common/max_pool2d.h written out loop by loop:
//     dx[i] = Σ_{o : o·s − p <= i <= o·s − p + (k−1)·d on both axes, ind[o] = i} dy[o]
// with the indices of a real forward (the first maximum of each window) and with arbitrary ones (outside
// the plane, outside the window, repeated), in NCHW and NHWC, with 32- and 64-bit indexing.
// tests/test_cuda_emulation.py compiles and runs it; it exits 1 if any case is wrong.
#include "cuda_emulation.h"
// clang-format off: the emulation header must come first
#include "cuda/max_pool2d_backward.cuh"
// clang-format on

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace mp = torch_cs231n::cuda::max_pool;

namespace {

struct Case {
  int64_t n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw;
  bool ceil_mode;
};

int64_t out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t span = d * (k - 1) + 1, num = in + 2 * p - span + (ceil_mode ? s - 1 : 0);
  int64_t out = num / s + 1;  // num >= 0 in the cases below
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// Offset of (n, c, h, w) in a dense (N, C, rows, cols) tensor.
int64_t at(bool nhwc, int64_t n, int64_t c, int64_t h, int64_t w, int64_t C, int64_t rows, int64_t cols) {
  return nhwc ? ((n * rows + h) * cols + w) * C + c : ((n * C + c) * rows + h) * cols + w;
}

template <bool kNhwc, typename index_t>
bool run(const Case& k, bool real_indices, std::mt19937& rng) {
  mp::Params p{k.c,
               k.h,
               k.w,
               out_size(k.h, k.kh, k.sh, k.ph, k.dh, k.ceil_mode),
               out_size(k.w, k.kw, k.sw, k.pw, k.dw, k.ceil_mode),
               k.kh,
               k.kw,
               k.sh,
               k.sw,
               k.ph,
               k.pw,
               k.dh,
               k.dw};
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> x(k.n * k.c * k.h * k.w), dy(k.n * k.c * p.out_h * p.out_w);
  for (float& v : x) v = u(rng);
  for (float& v : dy) v = u(rng);
  std::vector<int64_t> ind(dy.size());
  std::uniform_int_distribution<int64_t> any(-2, k.h * k.w + 1);
  for (int64_t n = 0; n < k.n; ++n)
    for (int64_t c = 0; c < k.c; ++c)
      for (int64_t oh = 0; oh < p.out_h; ++oh)
        for (int64_t ow = 0; ow < p.out_w; ++ow) {
          int64_t best = -1;
          float best_value = -INFINITY;
          for (int64_t th = 0; th < k.kh; ++th)
            for (int64_t tw = 0; tw < k.kw; ++tw) {
              const int64_t ih = oh * k.sh - k.ph + th * k.dh, iw = ow * k.sw - k.pw + tw * k.dw;
              if (ih < 0 || ih >= k.h || iw < 0 || iw >= k.w) continue;
              const float v = x[at(kNhwc, n, c, ih, iw, k.c, k.h, k.w)];
              if (best < 0 || v > best_value) best = ih * k.w + iw, best_value = v;
            }
          ind[at(kNhwc, n, c, oh, ow, k.c, p.out_h, p.out_w)] = real_indices ? best : any(rng);
        }
  // rule (3), in float64
  std::vector<double> want(x.size(), 0.0);
  for (int64_t n = 0; n < k.n; ++n)
    for (int64_t c = 0; c < k.c; ++c)
      for (int64_t oh = 0; oh < p.out_h; ++oh)
        for (int64_t ow = 0; ow < p.out_w; ++ow) {
          const int64_t o = at(kNhwc, n, c, oh, ow, k.c, p.out_h, p.out_w), i = ind[o];
          if (i < 0 || i >= k.h * k.w) continue;
          const int64_t ih = i / k.w, iw = i % k.w, rh = ih - (oh * k.sh - k.ph), rw = iw - (ow * k.sw - k.pw);
          if (rh < 0 || rh > (k.kh - 1) * k.dh || rw < 0 || rw > (k.kw - 1) * k.dw) continue;
          want[at(kNhwc, n, c, ih, iw, k.c, k.h, k.w)] += dy[o];
        }
  std::vector<float> dx(x.size(), mp::windows_disjoint(p) ? 0.f : NAN);  // the scatter needs zeros
  mp::backward<float, float, kNhwc, index_t>(dy.data(), ind.data(), dx.data(), k.n, p, /*cap=*/7, nullptr);
  double worst = 0.0;
  for (size_t i = 0; i < dx.size(); ++i) {
    const double e = std::fabs(dx[i] - want[i]);
    worst = std::isnan(e) ? INFINITY : (e > worst ? e : worst);
  }
  const bool ok = worst <= 1e-6;
  std::printf(
      "%s %s, int%d, %s indices: n=%ld c=%ld %ldx%ld k=%ldx%ld s=%ld,%ld p=%ld,%ld d=%ld,%ld%s: worst error %.1e %s\n",
      mp::windows_disjoint(p) ? "scatter" : "gather", kNhwc ? "NHWC" : "NCHW", int(8 * sizeof(index_t)),
      real_indices ? "real" : "arbitrary", long(k.n), long(k.c), long(k.h), long(k.w), long(k.kh), long(k.kw),
      long(k.sh), long(k.sw), long(k.ph), long(k.pw), long(k.dh), long(k.dw), k.ceil_mode ? " ceil" : "", worst,
      ok ? "ok" : "WRONG");
  return ok;
}

}  // namespace

int main() {
  // n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode
  const Case cases[] = {
      {2, 3, 8, 10, 2, 2, 2, 2, 0, 0, 1, 1, false},  // 2x2 stride 2: the scatter
      {2, 3, 9, 11, 2, 2, 2, 2, 1, 1, 1, 1, true},   // with padding and ceil_mode: windows past the edge
      {1, 4, 13, 9, 2, 3, 3, 3, 1, 0, 2, 1, false},  // disjoint with dilation 2 along h (span 3 = stride)
      {2, 3, 9, 9, 3, 3, 2, 2, 1, 1, 1, 1, false},   // 3x3 stride 2 padding 1: overlapping, the gather
      {1, 5, 12, 7, 3, 2, 1, 1, 1, 0, 2, 1, true},   // stride 1, dilation 2: many windows a value
  };
  std::mt19937 rng(231);
  bool ok = true;
  for (const Case& k : cases) {
    for (bool real : {true, false}) {
      ok = run<false, int32_t>(k, real, rng) && ok;
      ok = run<true, int32_t>(k, real, rng) && ok;
      ok = run<false, int64_t>(k, real, rng) && ok;
      ok = run<true, int64_t>(k, real, rng) && ok;
    }
  }
  // And drawn at random (a fixed seed): kernel, stride, padding (at most half the kernel, as torch allows),
  // dilation and ceil_mode, over sizes that leave ragged windows.
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  auto draw = [&](int lo, int hi) { return static_cast<int64_t>(lo + pick(rng) % (hi - lo + 1)); };
  for (int i = 0; i < 16; ++i) {
    Case k{};
    k.kh = draw(1, 4), k.kw = draw(1, 4), k.sh = draw(1, 3), k.sw = draw(1, 3), k.dh = draw(1, 2), k.dw = draw(1, 2);
    k.ph = draw(0, k.kh / 2), k.pw = draw(0, k.kw / 2), k.ceil_mode = draw(0, 1) == 1;
    k.h = k.dh * (k.kh - 1) + 1 + draw(0, 9), k.w = k.dw * (k.kw - 1) + 1 + draw(0, 9);
    k.n = draw(1, 2), k.c = draw(1, 3);
    const bool real = draw(0, 1) == 1;
    ok = run<false, int32_t>(k, real, rng) && ok;
    ok = run<true, int32_t>(k, real, rng) && ok;
  }
  std::printf(ok ? "all cases agree\n" : "SOME CASES ARE WRONG\n");
  return ok ? 0 : 1;
}
