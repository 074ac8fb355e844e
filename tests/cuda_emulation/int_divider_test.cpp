// csrc/common/int_divider.h against the `/` operator: every divisor up to 2^12 with the numerators next to
// each multiple of it that matters (kd - 1, kd, kd + 1) and the largest, 2^31 - 1; divisors drawn at random
// up to 2^31 - 1 (the powers of two and their neighbours among them) with numerators drawn alike. A wrong
// magic number or shift is off by one for some n = kd - 1 or kd; the largest numerators test the bound.
// tests/test_cuda_emulation.py compiles and runs it; it exits 1 at the first wrong quotient.
#include "common/int_divider.h"

#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

constexpr uint32_t kLargest = (uint32_t(1) << 31) - 1;

bool check(uint32_t d, uint32_t n) {
  const torch_cs231n::IntDivider divider(d);
  if (divider.quotient(n) == n / d) return true;
  std::printf("%u / %u: %u, not %u (magic %u, shift %u)\n", n, d, divider.quotient(n), n / d, divider.magic,
              divider.shift);
  return false;
}

// n = kd - 1, kd, kd + 1 for k = 1, 2, ... up to `multiples` of them, the last multiples below 2^31, and 0.
bool check_around_multiples(uint32_t d, uint32_t multiples) {
  const uint32_t most = kLargest / d;
  std::vector<uint32_t> ks;
  for (uint32_t k = 1; k <= multiples && k <= most; ++k) ks.push_back(k);
  for (uint32_t k = most > multiples ? most - multiples : 1; k <= most; ++k) ks.push_back(k);
  if (!check(d, 0) || !check(d, kLargest)) return false;
  for (uint32_t k : ks) {
    const uint32_t n = k * d;
    if (!check(d, n - 1) || !check(d, n) || (n < kLargest && !check(d, n + 1))) return false;
  }
  return true;
}

}  // namespace

int main() {
  uint64_t tried = 0;
  for (uint32_t d = 1; d <= 4096; ++d) {
    if (!check_around_multiples(d, 64)) return 1;
    tried += 1;
  }
  std::mt19937 rng(231);
  std::vector<uint32_t> divisors;
  for (int s = 12; s <= 31; ++s) {  // the powers of two and their neighbours, then divisors at random
    const uint32_t p = uint32_t(1) << s;
    divisors.push_back(p - 1);
    if (s < 31) divisors.push_back(p), divisors.push_back(p + 1);
  }
  std::uniform_int_distribution<uint32_t> any(1, kLargest);
  for (int i = 0; i < 2000; ++i) divisors.push_back(any(rng));
  for (uint32_t d : divisors) {
    if (!check_around_multiples(d, 16)) return 1;
    for (int i = 0; i < 200; ++i) {
      if (!check(d, any(rng))) return 1;
    }
    tried += 1;
  }
  std::printf("%llu divisors: all cases agree\n", static_cast<unsigned long long>(tried));
  return 0;
}
