// Float exp, sigmoid and tanh that the compiler vectorises inside loops (std::exp is a call per element),
// for the C++ kernels of this folder; the double overloads (the tests' checks) use the library's.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace charlm_math {

// a * b + c: one fused multiply-add where the build targets a CPU with FMA (one rounding), else a multiply
// and an add, which vectorise on any CPU (std::fma without the instruction is a library call per element).
inline float madd(float a, float b, float c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp for float as Cephes' polynomial (about 1 ulp), written so that the compiler vectorises the loops
// that call it (std::exp would be a call per element): n = round(x / ln 2) by the 1.5 * 2^23 trick, 2^n
// put together in the exponent bits. Below -87.3 (where float's normal numbers end) it is exactly 0, so
// exp(-inf) = 0: a character scored -inf weighs nothing in a draw. (The compares vectorise with
// -fno-trapping-math, which build.py passes.) Doubles (the tests' checks) use the library's exp.
inline float fast_exp(float x) {
  const bool underflow = x < -87.3f;
  x = underflow ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return underflow ? 0.0f : y * scale;
}

template <typename S> inline S sigmoid(S x);
template <> inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }
template <> inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
template <typename S> inline S tanh_(S x);
template <> inline float tanh_(float x) { return 1.0f - 2.0f / (1.0f + fast_exp(2.0f * x)); }
template <> inline double tanh_(double x) { return std::tanh(x); }

}  // namespace charlm_math
