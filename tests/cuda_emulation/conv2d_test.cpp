// The CUDA convolution kernels that are written to be emulated (csrc/cuda/conv2d_implicit_gemm.cuh,
// conv2d_winograd.cuh, conv2d_few_channels.cuh and conv2d_depthwise.cuh), run on the CPU under
// cuda_emulation.h, against a float64 convolution
// written out loop by loop. tests/test_cuda_emulation.py compiles and runs it; it prints a line per product
// and case, and exits 1 if any is wrong.
//
// Errors are measured against the sum of |terms| of each output: one term missing or extra is off by about
// 1/K of it, while float32 sums stay near 1e-7 of it (the tolerance is 1e-5; 1e-12 in float64). The TF32
// kernels are compared with the float64 convolution of TF32-rounded inputs, so what is left is float32
// accumulation there too. The implicit GEMM runs once more with infinities in x and dY (poison()), where
// reading anything but zero past the end of a matrix would turn them into NaN; the test compiles with
// AddressSanitizer, so a read past a buffer fails too.
#include "cuda_emulation.h"
// clang-format off: the emulation header must come first
#include "cuda/conv2d_depthwise.cuh"
#include "cuda/conv2d_few_channels.cuh"
#include "cuda/conv2d_implicit_gemm.cuh"
#include "cuda/conv2d_implicit_gemm_nhwc.cuh"
#include "cuda/conv2d_winograd.cuh"
// clang-format on

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

namespace ig = torch_cs231n::cuda::implicit_gemm;
namespace dwc = torch_cs231n::cuda::depthwise;
namespace wc = torch_cs231n::cuda::winograd_conv;
namespace fc = torch_cs231n::cuda::few_channels;
using torch_cs231n::Conv2dGeometry;

namespace {

struct Case {
  int64_t n, c, h, w, f, kh, kw, sh, sw, ph, pw, dh, dw, groups;
};

Conv2dGeometry geometry(const Case& k) {
  Conv2dGeometry g{};
  g.n = k.n, g.c = k.c, g.h = k.h, g.w = k.w, g.f = k.f, g.kh = k.kh, g.kw = k.kw;
  g.sh = k.sh, g.sw = k.sw, g.ph = k.ph, g.pw = k.pw, g.dh = k.dh, g.dw = k.dw, g.groups = k.groups;
  g.oh = torch_cs231n::conv_out_size(k.h, k.kh, k.sh, k.ph, k.dh);
  g.ow = torch_cs231n::conv_out_size(k.w, k.kw, k.sw, k.pw, k.dw);
  return g;
}

template <typename T = float>
std::vector<T> random_values(size_t count, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<T> v(count);
  for (T& x : v) x = u(rng);
  return v;
}

std::vector<float> rounded(std::vector<float> v, bool tf32) {
  if (tf32) {
    for (float& x : v) x = ig::round_to_tf32(x);
  }
  return v;
}

// The float64 sums and sums of |terms| of the three products, by their definitions (common/conv2d_index.h).
struct Reference {
  std::vector<double> y, y_abs, dx, dx_abs, dw, dw_abs;
};

template <typename T>
Reference reference(const Conv2dGeometry& g, const std::vector<T>& x, const std::vector<T>& w, const std::vector<T>& b,
                    const std::vector<T>& dy) {
  Reference r;
  const int64_t cg = g.c_per_group(), fg = g.f_per_group();
  r.y.assign(g.n * g.f * g.oh * g.ow, 0.0);
  r.y_abs = r.y;
  r.dx.assign(x.size(), 0.0);
  r.dx_abs = r.dx;
  r.dw.assign(w.size(), 0.0);
  r.dw_abs = r.dw;
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t f = 0; f < g.f; ++f)
      for (int64_t oh = 0; oh < g.oh; ++oh)
        for (int64_t ow = 0; ow < g.ow; ++ow) {
          const int64_t yi = ((n * g.f + f) * g.oh + oh) * g.ow + ow;
          r.y[yi] = b[f];
          r.y_abs[yi] = std::fabs(b[f]);
          for (int64_t c = 0; c < cg; ++c)
            for (int64_t th = 0; th < g.kh; ++th)
              for (int64_t tw = 0; tw < g.kw; ++tw) {
                const int64_t ih = torch_cs231n::conv_in_index(oh, th, g.sh, g.ph, g.dh);
                const int64_t iw = torch_cs231n::conv_in_index(ow, tw, g.sw, g.pw, g.dw);
                if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
                const int64_t ci = (f / fg) * cg + c;
                const int64_t xi = ((n * g.c + ci) * g.h + ih) * g.w + iw;
                const int64_t wi = ((f * cg + c) * g.kh + th) * g.kw + tw;
                r.y[yi] += double(x[xi]) * w[wi];
                r.y_abs[yi] += std::fabs(double(x[xi]) * w[wi]);
                r.dx[xi] += double(dy[yi]) * w[wi];
                r.dx_abs[xi] += std::fabs(double(dy[yi]) * w[wi]);
                r.dw[wi] += double(dy[yi]) * x[xi];
                r.dw_abs[wi] += std::fabs(double(dy[yi]) * x[xi]);
              }
        }
  return r;
}

// The largest |got - want| / (sum of |terms| + rounding * |want|), and whether every element is within
// tolerance; `rounding` is the output dtype's (float16 and bfloat16 round each result once more). Where
// want is Inf or NaN, got must be the same Inf, or a NaN.
template <typename T>
bool compare(const char* what, const std::vector<T>& got, const std::vector<double>& want,
             const std::vector<double>& scale, double tolerance, double rounding = 0.0) {
  double worst = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double value = static_cast<double>(got[i]);
    if (!std::isfinite(want[i])) {  // an Inf or NaN input reached it: the same Inf, or a NaN
      const bool same = std::isnan(want[i]) ? std::isnan(value) : value == want[i];
      worst = same ? worst : INFINITY;
      continue;
    }
    const double e = std::fabs(value - want[i]) / (scale[i] + rounding / tolerance * std::fabs(want[i]) + 1e-30);
    worst = std::isnan(e) || e > worst ? (std::isnan(e) ? INFINITY : e) : worst;
  }
  const bool ok = worst <= tolerance;
  std::printf("  %-10s worst relative error %.2e %s\n", what, worst, ok ? "ok" : "WRONG");
  return ok;
}

void describe(const char* what, const Case& k, const char* extra) {
  std::printf("%s n=%ld c=%ld %ldx%ld f=%ld k=%ldx%ld s=%ld,%ld p=%ld,%ld d=%ld,%ld groups=%ld%s\n", what, long(k.n),
              long(k.c), long(k.h), long(k.w), long(k.f), long(k.kh), long(k.kw), long(k.sh), long(k.sw), long(k.ph),
              long(k.pw), long(k.dh), long(k.dw), long(k.groups), extra);
}

// ------------------------------------------------------------------------------------ implicit GEMM
// Infinities where a kernel that reads past the end of its matrix, or a padded tap table's entry, as
// anything but zero would meet them, times the other operand's zero: a NaN where the reference has an Inf
// or a finite value. x: channel 0 of the last sample at the position that the last output pixel's tap 0
// reads (clamped into the image); dy: filter 0 at the last output pixel (k = N*oH*oW - 1, where d_weight's
// last chunk is clamped), if all its taps read inside the image. Never in the padding's way: the kernels,
// as the GEMMs of torch's im2col route, multiply a padding's zero by the other operand (so 0 * Inf is NaN)
// where the reference skips the term.
template <typename T>
void poison(const Conv2dGeometry& g, std::vector<T>& x, std::vector<T>& dy) {
  const int64_t h = (g.oh - 1) * g.sh - g.ph, v = (g.ow - 1) * g.sw - g.pw;
  x[((g.n - 1) * g.c * g.h + std::clamp<int64_t>(h, 0, g.h - 1)) * g.w + std::clamp<int64_t>(v, 0, g.w - 1)] =
      T(INFINITY);
  if (h >= 0 && v >= 0 && h + (g.kh - 1) * g.dh < g.h && v + (g.kw - 1) * g.dw < g.w) {
    dy[(g.n - 1) * g.f * g.oh * g.ow + g.oh * g.ow - 1] = T(-INFINITY);
  }
}

// T: the tensors' dtype (float, or c10::Half and c10::BFloat16, whose values TF32 holds exactly).
// poisoned: with the infinities of poison(), which the results must propagate as the reference does.
// async: the async kernel (float32 only), whose copies run at once here: its stages' buffers and waits.
// nhwc: the kernels over channels-last copies (float32 only; cuda/conv2d_implicit_gemm_nhwc.cuh), the copies
// made by to_nhwc here too.
template <typename Math, typename T = float>
bool run_implicit_gemm(const Case& k, bool tf32, std::mt19937& rng, bool poisoned = false, bool async = false,
                       bool nhwc = false) {
  const Conv2dGeometry g = geometry(k);
  std::vector<T> x = random_values<T>(g.n * g.c * g.h * g.w, rng);
  const std::vector<T> w = random_values<T>(g.f * g.c_per_group() * g.kh * g.kw, rng);
  const std::vector<T> b = random_values<T>(g.f, rng);
  std::vector<T> dy = random_values<T>(g.n * g.f * g.oh * g.ow, rng);
  if (poisoned) poison(g, x, dy);
  Reference r;
  if constexpr (std::is_same_v<T, float>) {
    r = reference(g, rounded(x, tf32), rounded(w, tf32), b, rounded(dy, tf32));
  } else {
    r = reference(g, x, w, b, dy);
  }

  std::vector<T> y(r.y.size(), T(NAN)), dx(x.size(), T(NAN)), dw(w.size(), T(NAN));
  std::vector<T> wt(std::max(ig::forward_weight_size(g), ig::grad_input_weight_size(g)), T(NAN));
  std::vector<ig::Tap> taps(std::max(ig::grad_weight_taps(g), ig::grad_input_taps(g)));
  const ig::WeightSplit split = ig::grad_weight_split(g, /*blocks_wanted=*/16);
  std::vector<float> partials(ig::grad_weight_partials(g, split), NAN);
  if constexpr (std::is_same_v<T, float>) {
    if (nhwc) {
      std::vector<float> x_nhwc(x.size(), NAN), dy_nhwc(dy.size(), NAN);
      ig::to_nhwc<Math>(x.data(), x_nhwc.data(), g.n, g.c, g.h * g.w, nullptr);
      ig::to_nhwc<Math>(dy.data(), dy_nhwc.data(), g.n, g.f, g.oh * g.ow, nullptr);
      ig::forward_nhwc<Math>(x_nhwc.data(), w.data(), b.data(), y.data(), g, taps.data(), wt.data(), nullptr);
      ig::grad_input_nhwc<Math>(dy_nhwc.data(), w.data(), dx.data(), g, taps.data(), wt.data(), nullptr);
      ig::grad_weight_nhwc<Math>(dy_nhwc.data(), x_nhwc.data(), dw.data(), g, split, taps.data(), partials.data(),
                                 nullptr);
    }
  }
  if (!nhwc) {
    ig::forward<T, Math>(x.data(), w.data(), b.data(), y.data(), g, taps.data(), wt.data(), nullptr, async);
    ig::grad_input<T, Math>(dy.data(), w.data(), dx.data(), g, taps.data(), wt.data(), nullptr, async);
    ig::grad_weight<T, Math>(dy.data(), x.data(), dw.data(), g, split, taps.data(), partials.data(), nullptr, async);
  }

  char what[64], chunks[64];
  std::snprintf(what, sizeof what, "implicit GEMM%s, %s%s%s", async ? " (async)" : (nhwc ? " (nhwc)" : ""),
                std::is_same_v<T, float> ? "fp32" : (std::is_same_v<T, c10::Half> ? "fp16" : "bf16"),
                tf32 ? ", tf32" : "", poisoned ? ", with infinities" : "");
  std::snprintf(chunks, sizeof chunks, " (d_weight in %ld chunks)", long(split.splits));
  describe(what, k, chunks);
  // float16 and bfloat16 results are rounded once more, to 11 and 8 significant bits
  const double tolerance = 1e-5;
  const double rounding = std::is_same_v<T, float> ? 0.0 : (std::is_same_v<T, c10::Half> ? 0x1p-11 : 0x1p-8);
  bool ok = compare("forward", y, r.y, r.y_abs, tolerance, rounding);
  ok = compare("d_input", dx, r.dx, r.dx_abs, tolerance, rounding) && ok;
  ok = compare("d_weight", dw, r.dw, r.dw_abs, tolerance, rounding) && ok;
  return ok;
}

// ------------------------------------------------------------------------------------------ Winograd
// The forward and d_input by F(2x2, 3x3), its 16 GEMMs done here by a loop (cuBLAS on a GPU); tf32: with the
// GEMMs' operands rounded to TF32 first, as cuBLAS's TF32 tensor cores take them.
bool run_winograd(const Case& k, bool tf32, std::mt19937& rng) {
  const Conv2dGeometry g = geometry(k);
  const std::vector<float> x = random_values(g.n * g.c * g.h * g.w, rng);
  const std::vector<float> w = random_values(g.f * g.c * 9, rng);
  const std::vector<float> b = random_values(g.f, rng);
  const std::vector<float> dy = random_values(g.n * g.f * g.oh * g.ow, rng);
  const Reference r = reference(g, x, w, b, dy);
  // c[j] (m × n) = a[j] (m × depth) · b[j] (depth × n), or · b[j]ᵀ (b[j]: n × depth) when b_transposed, j < batch
  auto products = [tf32](int64_t m, int64_t n, int64_t depth, int64_t batch, const float* a, const float* bm,
                         bool b_transposed, float* c) {
    auto operand = [tf32](float x) { return tf32 ? ig::round_to_tf32(x) : x; };
    for (int64_t j = 0; j < batch; ++j) {
      const float *aj = a + j * m * depth, *bj = bm + j * depth * n;
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t l = 0; l < n; ++l) {
          float sum = 0.f;
          for (int64_t d = 0; d < depth; ++d) {
            sum += operand(aj[i * depth + d]) * operand(b_transposed ? bj[l * depth + d] : bj[d * n + l]);
          }
          c[(j * m + i) * n + l] = sum;
        }
      }
    }
  };
  auto gemm = [&products](int64_t m, int64_t n, int64_t depth, const float* a, const float* bm, float* c) {
    products(m, n, depth, wc::kPositions, a, bm, /*b_transposed=*/false, c);
  };
  std::vector<float> u(wc::filter_size(g), NAN), v(wc::input_size(g), NAN), m(wc::output_size(g), NAN);
  std::vector<float> y(r.y.size(), NAN), dx(x.size(), NAN);
  wc::forward(x.data(), w.data(), b.data(), y.data(), g, u.data(), v.data(), m.data(), gemm, nullptr);
  wc::grad_input(dy.data(), w.data(), dx.data(), g, u.data(), v.data(), m.data(), gemm, nullptr);
  describe(tf32 ? "winograd F(2x2, 3x3), fp32, tf32" : "winograd F(2x2, 3x3), fp32", k, "");
  // TF32 rounds the transformed values (10 bits), which the output transform's sums and differences can
  // leave ten times a direct TF32 sum's error: up to 5e-3 of the sum of |terms| was seen here
  const double tolerance = tf32 ? 1e-2 : 1e-5;
  bool ok = compare("forward", y, r.y, r.y_abs, tolerance);
  ok = compare("d_input", dx, r.dx, r.dx_abs, tolerance) && ok;

  // d_weight (a candidate), its products a[j] · b[j]ᵀ; in one chunk (of blocks rounded up to a multiple
  // of 4, the rest zeros), and in chunks of 4 blocks (the last one ragged where the blocks are not a multiple
  // of 4: the 6 of the fourth case)
  auto gemm_nt = [&products](int64_t m, int64_t n, int64_t depth, int64_t batch, const float* a, const float* bm,
                             float* c) { products(m, n, depth, batch, a, bm, /*b_transposed=*/true, c); };
  const int64_t blocks = wc::blocks_of(g.n, g.oh, g.ow).count();
  for (const wc::Chunks chunks : {wc::grad_weight_chunks(g, /*tiles_wanted=*/1), wc::Chunks{(blocks + 3) / 4, 4}}) {
    std::vector<float> vw(wc::grad_weight_input_size(g, chunks), NAN), z(wc::grad_weight_output_size(g, chunks), NAN);
    std::vector<float> partial(wc::grad_weight_partial_size(g, chunks), NAN), dw(w.size(), NAN);
    wc::grad_weight(dy.data(), x.data(), dw.data(), g, chunks, vw.data(), z.data(), partial.data(), gemm_nt, nullptr);
    char what[64];
    std::snprintf(what, sizeof what, "d_weight %ldx%ld", long(chunks.count), long(chunks.size));
    ok = compare(what, dw, r.dw, r.dw_abs, tolerance) && ok;
  }
  return ok;
}

// ------------------------------------------------------------------------------- few channels' d_input
// The gather of a stem's d_input (a candidate), W laid out [f][t_h][t_w][4] by hand as cuda/conv2d.cu does
// with tensor ops.
bool run_few_channels(const Case& k, std::mt19937& rng) {
  const Conv2dGeometry g = geometry(k);
  const std::vector<float> x = random_values(g.n * g.c * g.h * g.w, rng);
  const std::vector<float> w = random_values(g.f * g.c * g.kh * g.kw, rng);
  const std::vector<float> b = random_values(g.f, rng);
  const std::vector<float> dy = random_values(g.n * g.f * g.oh * g.ow, rng);
  const Reference r = reference(g, x, w, b, dy);
  std::vector<fc::Channels> w4(g.f * g.kh * g.kw);
  for (int64_t f = 0; f < g.f; ++f) {
    for (int64_t t = 0; t < g.kh * g.kw; ++t) {
      for (int c = 0; c < fc::kMaxChannels; ++c)
        w4[f * g.kh * g.kw + t].v[c] = c < g.c ? w[(f * g.c + c) * g.kh * g.kw + t] : 0.f;
    }
  }
  std::vector<float> dx(x.size(), NAN);
  fc::grad_input(dy.data(), w4.data(), dx.data(), g, nullptr);
  describe("few channels' d_input (gather), fp32", k, "");
  return compare("d_input", dx, r.dx, r.dx_abs, 1e-5);
}

// ------------------------------------------------------------------------------------ depthwise tiles
template <typename T, int KH, int KW>
bool run_depthwise(const Case& k, std::mt19937& rng) {
  const Conv2dGeometry g = geometry(k);
  const std::vector<T> x = random_values<T>(g.n * g.c * g.h * g.w, rng);
  const std::vector<T> w = random_values<T>(g.f * KH * KW, rng);
  const std::vector<T> b = random_values<T>(g.f, rng);
  const std::vector<T> dy = random_values<T>(g.n * g.f * g.oh * g.ow, rng);
  const Reference r = reference(g, x, w, b, dy);

  std::vector<T> y(r.y.size(), NAN), dx(x.size(), NAN), dw(w.size(), NAN);
  dwc::forward<T, T, KH, KW>(x.data(), w.data(), b.data(), y.data(), g, nullptr);
  const int64_t slices = dwc::grad_weight_slices(g, /*blocks_wanted=*/3 * g.f);
  std::vector<T> partial(g.f * slices * KH * KW, NAN);
  dwc::grad_weight<T, T, KH, KW>(dy.data(), x.data(), dw.data(), g, slices, partial.data(), nullptr);
  char extra[64];
  std::snprintf(extra, sizeof extra, " (d_weight in %ld slices)", long(slices));
  describe(sizeof(T) == 4 ? "depthwise, fp32" : "depthwise, fp64", k, extra);
  const double tolerance = sizeof(T) == 4 ? 1e-5 : 1e-12;
  bool ok = compare("forward", y, r.y, r.y_abs, tolerance);
  if (dwc::grad_input_tiles_fit(g)) {
    dwc::grad_input<T, T, KH, KW>(dy.data(), w.data(), dx.data(), g, nullptr);
    ok = compare("d_input", dx, r.dx, r.dx_abs, tolerance) && ok;
  }
  ok = compare("d_weight", dw, r.dw, r.dw_abs, tolerance) && ok;
  // The tall tiles (a candidate), with the grid's z at most 2 samples, so that the loop over the rest runs,
  // and d_weight in two numbers of slices (steps through the pairs with and without a carry into samples).
  if (dwc::tall_fit(g)) {
    for (const int64_t tall_slices : {dwc::tall_grad_weight_slices(g, 3 * g.f), int64_t(7)}) {
      std::vector<T> tall_partial(g.f * tall_slices * KH * KW, NAN);
      std::fill(dw.begin(), dw.end(), T(NAN));
      dwc::tall_grad_weight<T, T, KH, KW>(dy.data(), x.data(), dw.data(), g, tall_slices, tall_partial.data(), nullptr);
      ok = compare("tall d_weight", dw, r.dw, r.dw_abs, tolerance) && ok;
    }
    std::fill(y.begin(), y.end(), T(NAN));
    dwc::tall_forward<T, T, KH, KW>(x.data(), w.data(), b.data(), y.data(), g, nullptr, /*grid_z=*/2);
    ok = compare("tall forward", y, r.y, r.y_abs, tolerance) && ok;
    if (dwc::grad_input_tall_fit(g)) {
      std::fill(dx.begin(), dx.end(), T(NAN));
      dwc::tall_grad_input<T, T, KH, KW>(dy.data(), w.data(), dx.data(), g, nullptr, /*grid_z=*/2);
      ok = compare("tall d_input", dx, r.dx, r.dx_abs, tolerance) && ok;
    }
  }
  return ok;
}

template <typename T>
bool run_depthwise(const Case& k, std::mt19937& rng) {
  if (!dwc::tiles_fit(geometry(k))) {
    describe("depthwise: no tiles for", k, " (THE CASE IS WRONG)");
    return false;
  }
  return k.kh == 3 ? run_depthwise<T, 3, 3>(k, rng) : run_depthwise<T, 5, 5>(k, rng);
}

}  // namespace

int main() {
  std::mt19937 rng(231);
  bool ok = true;
  // n, c, h, w, f, kh, kw, sh, sw, ph, pw, dh, dw, groups
  const Case dense[] = {
      {2, 3, 9, 9, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1},    // 3x3, padding 1; M = 162: two row tiles
      {2, 6, 11, 10, 4, 3, 2, 2, 2, 1, 0, 1, 1, 2},  // stride 2, a 3x2 filter, 2 groups
      {1, 4, 13, 12, 6, 3, 3, 1, 2, 2, 1, 2, 1, 1},  // dilation 2 along h, stride 2 along w
      {3, 8, 6, 7, 130, 1, 1, 1, 1, 0, 0, 1, 1, 1},  // 1x1, 130 filters: two column tiles
      {1, 130, 5, 5, 3, 1, 1, 1, 1, 0, 0, 1, 1, 1},  // 130 channels: d_input has two column tiles
      {2, 5, 20, 20, 3, 5, 5, 3, 3, 2, 2, 1, 1, 1},  // stride 3 (d_input skips two taps in three)
      {3, 6, 8, 8, 9, 4, 4, 2, 2, 1, 1, 1, 1, 3},    // 4x4 stride 2, 3 groups
      {4, 2, 12, 12, 3, 3, 3, 1, 1, 0, 0, 1, 1, 1},  // no padding; d_weight sums 400 positions in chunks
      {1, 40, 4, 4, 33, 3, 3, 1, 1, 1, 1, 1, 1, 1},  // k = 360 and 297: many stages, a ragged last one
      {1, 130, 7, 7, 3, 3, 3, 2, 2, 1, 1, 1, 1, 1},  // d_input on the square tile, with the stride's division
  };
  // Tile shapes (with_shape): forward and d_input take Tall up to 64 columns (filters, channels), Square
  // above (the 130 cases); d_weight takes Wide up to 64 filters, Square above (the 130 filters).
  for (const Case& k : dense) {
    ok = run_implicit_gemm<ig::MmaTf32>(k, /*tf32=*/true, rng) && ok;
    ok = run_implicit_gemm<ig::SimtFma>(k, /*tf32=*/false, rng) && ok;
    ok = run_implicit_gemm<ig::MmaTf32>(k, /*tf32=*/true, rng, /*poisoned=*/false, /*async=*/true) && ok;
    ok = run_implicit_gemm<ig::SimtFma>(k, /*tf32=*/false, rng, /*poisoned=*/false, /*async=*/true) && ok;
  }
  // Over channels-last copies (a candidate): channels and filters per group multiples of 4; the tile shapes
  // as above (Tall to 64 columns, Square past them: the 132 cases; d_weight Wide to 64 filters).
  const Case nhwc[] = {
      {2, 4, 9, 9, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1},       // 3x3, padding 1
      {2, 8, 11, 10, 8, 3, 2, 2, 2, 1, 0, 1, 1, 2},     // stride 2, a 3x2 filter, 2 groups of 4
      {1, 12, 13, 12, 4, 3, 3, 1, 2, 2, 1, 2, 1, 1},    // dilation 2 along h, stride 2 along w
      {3, 8, 6, 7, 132, 1, 1, 1, 1, 0, 0, 1, 1, 1},     // 1x1, 132 filters: two column tiles
      {1, 132, 5, 5, 4, 1, 1, 1, 1, 0, 0, 1, 1, 1},     // 132 channels: d_input has two column tiles
      {2, 4, 20, 20, 4, 5, 5, 3, 3, 2, 2, 1, 1, 1},     // stride 3 (d_input skips two taps in three)
      {3, 12, 8, 8, 12, 4, 4, 2, 2, 1, 1, 1, 1, 3},     // 4x4 stride 2, 3 groups
      {1, 40, 4, 4, 36, 3, 3, 1, 1, 1, 1, 1, 1, 1},     // k = 360 and 324: many stages, a ragged last one
      {1, 132, 7, 7, 4, 3, 3, 2, 2, 1, 1, 1, 1, 1},     // d_input on the square tile, with the stride's division
      {4, 4, 12, 12, 68, 3, 3, 1, 1, 0, 0, 1, 1, 1},    // 68 filters; d_weight sums 400 positions in chunks
      {2, 16, 15, 15, 260, 1, 1, 1, 1, 0, 0, 1, 1, 1},  // 260 filters: d_weight's Square rows past the end
      {2, 64, 12, 12, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1},   // exactly 64: two Tall row tiles, Wide d_weight in chunks
      {1, 256, 4, 4, 256, 3, 3, 1, 1, 1, 1, 1, 1, 2},   // 2 groups of exactly 128 on the Square tiles
      {2, 132, 9, 9, 8, 3, 3, 2, 2, 1, 1, 1, 1, 1},     // Square d_input with the division, two row tiles
  };
  for (const Case& k : nhwc) {
    if (!ig::nhwc_fits(geometry(k))) {
      describe("nhwc: does not fit", k, " (THE CASE IS WRONG)");
      ok = false;
      continue;
    }
    ok =
        run_implicit_gemm<ig::MmaTf32>(k, /*tf32=*/true, rng, /*poisoned=*/false, /*async=*/false, /*nhwc=*/true) && ok;
    ok =
        run_implicit_gemm<ig::SimtFma>(k, /*tf32=*/false, rng, /*poisoned=*/true, /*async=*/false, /*nhwc=*/true) && ok;
  }
  // float16 and bfloat16, always on the tensor cores (exact in TF32)
  for (const Case& k : {dense[0], dense[3], dense[6], dense[9]}) {
    ok = run_implicit_gemm<ig::MmaTf32, c10::Half>(k, /*tf32=*/true, rng) && ok;
    ok = run_implicit_gemm<ig::MmaTf32, c10::BFloat16>(k, /*tf32=*/true, rng) && ok;
  }
  // Winograd: 3x3, stride 1, one group; paddings 0, 1, 2 (d_input's 2, 1, 0), odd and even sizes (ragged blocks)
  const Case winograd[] = {
      {2, 5, 7, 9, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1},    // padding 1, odd sizes
      {1, 4, 6, 8, 3, 3, 3, 1, 1, 0, 0, 1, 1, 1},    // no padding (d_input's is 2)
      {3, 3, 5, 4, 7, 3, 3, 1, 1, 2, 2, 1, 1, 1},    // padding 2 (d_input's is 0)
      {1, 6, 3, 10, 2, 3, 3, 1, 1, 0, 2, 1, 1, 1},   // paddings 0 and 2
      {2, 33, 8, 8, 40, 3, 3, 1, 1, 1, 1, 1, 1, 1},  // more channels
  };
  for (const Case& k : winograd) {
    if (!wc::fits(geometry(k))) {
      describe("winograd: does not fit", k, " (THE CASE IS WRONG)");
      ok = false;
      continue;
    }
    ok = run_winograd(k, /*tf32=*/false, rng) && ok;
    ok = run_winograd(k, /*tf32=*/true, rng) && ok;
  }
  // Few channels' d_input: 1 to 4 channels, strides 1 to 4 (phases), paddings past the taps, sizes that are
  // no multiple of the stride or of a run (8), rows of taps of 1 to 7 (KMax 4 and 7)
  const Case few[] = {
      {2, 3, 15, 17, 5, 7, 7, 2, 2, 3, 3, 1, 1, 1},    // an RGB stem: 7x7 stride 2
      {1, 1, 9, 10, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1},     // one channel, 3x3
      {2, 4, 13, 11, 3, 5, 5, 2, 2, 2, 2, 1, 1, 1},    // four channels, 5x5 stride 2
      {1, 2, 16, 16, 6, 4, 4, 4, 4, 0, 0, 1, 1, 1},    // patches: 4x4 stride 4
      {2, 3, 12, 30, 5, 7, 7, 1, 1, 3, 3, 1, 1, 1},    // 7x7 stride 1 (7 taps a row: KMax 7)
      {1, 3, 23, 21, 4, 11, 11, 4, 4, 2, 2, 1, 1, 1},  // 11x11 stride 4
      {1, 3, 10, 9, 3, 3, 5, 1, 3, 0, 2, 1, 1, 1},     // 3x5, strides 1 and 3
      {1, 2, 6, 7, 3, 3, 3, 2, 1, 2, 2, 1, 1, 1},      // padding 2 of a 3x3 filter
  };
  for (const Case& k : few) {
    if (!fc::fits(geometry(k))) {
      describe("few channels: does not fit", k, " (THE CASE IS WRONG)");
      ok = false;
      continue;
    }
    ok = run_few_channels(k, rng) && ok;
  }
  const Case depthwise[] = {
      {2, 3, 9, 9, 3, 3, 3, 1, 1, 1, 1, 1, 1, 3},    // 3x3, padding 1, one tile a plane
      {1, 2, 20, 70, 4, 3, 3, 1, 1, 1, 1, 1, 1, 2},  // multiplier 2 (d_input sums 2 planes); 3x3 tiles a plane
      {2, 3, 17, 35, 3, 5, 5, 2, 2, 2, 2, 1, 1, 3},  // 5x5 stride 2 (no tiled d_input)
      {1, 2, 20, 20, 2, 3, 3, 1, 1, 2, 2, 2, 2, 2},  // dilation 2
      {3, 4, 8, 9, 4, 5, 5, 1, 1, 0, 0, 1, 1, 4},    // no padding (d_input's is 4)
      {1, 1, 6, 6, 1, 3, 3, 1, 1, 3, 3, 1, 1, 1},    // padding 3 > (k-1)d: d_input's is -1
      {3, 2, 33, 9, 6, 3, 3, 1, 2, 1, 0, 1, 1, 2},   // multiplier 3, stride (1, 2)
      {5, 2, 70, 40, 4, 3, 3, 1, 1, 1, 1, 1, 1, 2},  // tall tiles: 3 x 2 a plane, ragged; 5 samples, z of 2
      {1, 1, 70, 70, 1, 5, 5, 2, 2, 2, 2, 1, 1, 1},  // 5x5 stride 2: the tall region's 67 x 67
  };
  for (const Case& k : depthwise) {
    ok = run_depthwise<float>(k, rng) && ok;
    ok = run_depthwise<double>(k, rng) && ok;
  }
  // And drawn at random (a fixed seed): every argument in its small range, sizes that leave ragged tiles.
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  auto draw = [&](int lo, int hi) { return static_cast<int64_t>(lo + pick(rng) % (hi - lo + 1)); };
  for (int i = 0; i < 24; ++i) {
    Case k{};
    k.groups = draw(1, 3);
    k.c = k.groups * draw(1, 24), k.f = k.groups * draw(1, 24);
    k.kh = draw(1, 5), k.kw = draw(1, 5), k.sh = draw(1, 3), k.sw = draw(1, 3), k.dh = draw(1, 2), k.dw = draw(1, 2);
    k.ph = draw(0, 2), k.pw = draw(0, 2);
    // at least one output: h + 2p >= d(k-1) + 1
    k.h = std::max<int64_t>(1, k.dh * (k.kh - 1) + 1 - 2 * k.ph) + draw(0, 9);
    k.w = std::max<int64_t>(1, k.dw * (k.kw - 1) + 1 - 2 * k.pw) + draw(0, 9);
    k.n = draw(1, 3);
    ok = run_implicit_gemm<ig::MmaTf32>(k, /*tf32=*/true, rng) && ok;
    ok = run_implicit_gemm<ig::SimtFma>(k, /*tf32=*/false, rng) && ok;
    ok = run_implicit_gemm<ig::SimtFma>(k, /*tf32=*/false, rng, /*poisoned=*/true) && ok;
    // the same sizes over channels-last copies, with channels and filters per group made multiples of 4
    k.c = k.groups * 4 * ((k.c / k.groups + 3) / 4), k.f = k.groups * 4 * ((k.f / k.groups + 3) / 4);
    ok = run_implicit_gemm<ig::MmaTf32>(k, /*tf32=*/true, rng, /*poisoned=*/true, /*async=*/false, /*nhwc=*/true) && ok;
  }
  for (const Case& k : dense) {
    ok = run_implicit_gemm<ig::MmaTf32>(k, /*tf32=*/true, rng, /*poisoned=*/true) && ok;
    ok = run_implicit_gemm<ig::SimtFma>(k, /*tf32=*/false, rng, /*poisoned=*/true) && ok;
    ok = run_implicit_gemm<ig::MmaTf32>(k, /*tf32=*/true, rng, /*poisoned=*/true, /*async=*/true) && ok;
  }
  ok = run_implicit_gemm<ig::MmaTf32, c10::Half>(dense[1], /*tf32=*/true, rng, /*poisoned=*/true) && ok;
  for (int i = 0; i < 12; ++i) {
    Case k{};
    k.c = k.groups = draw(1, 4), k.f = k.c * draw(1, 3);
    k.kh = k.kw = draw(0, 1) ? 3 : 5, k.sh = draw(1, 2), k.sw = draw(1, 2), k.dh = draw(1, 2), k.dw = draw(1, 2);
    k.ph = draw(0, 3), k.pw = draw(0, 3);
    k.h = std::max<int64_t>(1, k.dh * (k.kh - 1) + 1 - 2 * k.ph) + draw(0, 40);
    k.w = std::max<int64_t>(1, k.dw * (k.kw - 1) + 1 - 2 * k.pw) + draw(0, 40);
    k.n = draw(1, 2);
    ok = run_depthwise<float>(k, rng) && ok;
  }
  std::printf(ok ? "all cases agree\n" : "SOME CASES ARE WRONG\n");
  return ok ? 0 : 1;
}
