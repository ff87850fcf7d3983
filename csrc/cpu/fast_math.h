// Branch-free fp32 exp and log (Cephes, ≤ 2 ulp) whose loops vectorise, and the AVX2 clone
// attribute for the functions holding those loops; fp64 overloads call std::exp/std::log.
// Include it after `#pragma GCC optimize("no-trapping-math")`: without that flag GCC keeps the
// selects below as branches and the loops around them do not vectorise.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MARN_FAST_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MARN_FAST_VECTOR_CLONES
#endif

namespace marn_fast {

__attribute__((always_inline)) inline float bits_to_float(int32_t i) { float f; std::memcpy(&f, &i, sizeof f); return f; }
__attribute__((always_inline)) inline int32_t float_to_bits(float f) { int32_t i; std::memcpy(&i, &f, sizeof i); return i; }

// exp for fp32 (Cephes expf: 2^n·P(r), |r| ≤ ln2/2; ≤ 2 ulp); exactly 1 at 0, 0 below ln(2^−126).
__attribute__((always_inline)) inline float exp_(float x) {
  constexpr float lo = -87.33654475f, hi = 88.0f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  const float n = (xc * 1.44269504089f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float v = p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  return x < lo ? 0.0f : v;
}

// log for fp32 > 0 (Cephes logf: x = m·2^k, m ∈ [√½, √2), polynomial in m − 1; ≤ 2 ulp), subnormals
// rescaled first.
__attribute__((always_inline)) inline float log_(float x) {
  const bool sub = x < 1.17549435e-38f;
  const float xs = x * (sub ? 8388608.0f : 1.0f);
  const int32_t bits = float_to_bits(xs);
  float k = static_cast<float>(((bits >> 23) & 0xff) - 126) + (sub ? -23.0f : 0.0f);
  float m = bits_to_float((bits & 0x807fffff) | 0x3f000000);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  k -= small ? 1.0f : 0.0f;
  m = m * (small ? 2.0f : 1.0f) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += k * -2.12194440e-4f;
  y += -0.5f * z;
  return (m + y) + k * 0.693359375f;
}

// bf16 as its 16 bits: widening is exact (the bits on top of a float), narrowing rounds to nearest
// even (NaN stays a quiet NaN); both are branch-free so that the loops around them vectorise.
__attribute__((always_inline)) inline float bf16_to_float(uint16_t v) {
  return bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(v) << 16));
}
__attribute__((always_inline)) inline uint16_t float_to_bf16(float f) {
  const uint32_t bits = static_cast<uint32_t>(float_to_bits(f));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
}

inline double exp_(double x) { return std::exp(x); }
inline double log_(double x) { return std::log(x); }

}  // namespace marn_fast
