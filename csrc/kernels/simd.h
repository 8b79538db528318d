// Eight-float vectors through GCC/Clang vector extensions: one source compiles to SSE2 in the
// baseline objects and to AVX2/FMA in the objects built with -mavx2 -mfma.
// Only kernel bodies include this, with SP_ISA_NS defined: every inline function lands in that
// path's own namespace, so the linker can never swap an AVX2 copy into the baseline path.
#pragma once
#ifndef SP_ISA_NS
#error "simd.h is for kernel bodies: define SP_ISA_NS first"
#endif

#include <cstdint>
#if defined(__SSE2__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace sparseprune {

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf8_unaligned __attribute__((vector_size(32), aligned(4)));
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf4_unaligned __attribute__((vector_size(16), aligned(4)));

namespace SP_ISA_NS {

inline vf8 load8(const float* p) { return *reinterpret_cast<const vf8_unaligned*>(p); }
inline vf8 load8_aligned(const float* p) { return *reinterpret_cast<const vf8*>(p); }
inline vf8 splat8(float v) { return vf8{v, v, v, v, v, v, v, v}; }
inline vf8 relu8(vf8 v) {
  const vf8 zero = splat8(0.0f);
  // Keeps NaN as in torch.relu: NaN > 0 is false, so select by (v < 0) instead.
  return v < zero ? zero : v;
}

typedef int32_t vi8 __attribute__((vector_size(32)));

inline vf8 min8(vf8 a, vf8 b) { return a < b ? a : b; }
inline vf8 max8(vf8 a, vf8 b) { return a > b ? a : b; }
inline float hsum8(vf8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
inline float hmax8(vf8 v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// e^x to ~2 ulp for x in [-87, 88] (Cephes' expf polynomial after x = n ln2 + r); below -87
// the result flushes towards 0, above 88 it saturates at e^88. NaN stays NaN.
inline vf8 exp8(vf8 x) {
  const vf8 hi = splat8(88.0f), lo = splat8(-87.0f);
  // NaN compares false and becomes lo here (a NaN must never reach the float -> int conversion
  // below: that is undefined behaviour); the last line puts it back.
  const vf8 xc = x < hi ? (x > lo ? x : lo) : hi;
  const vf8 t = xc * splat8(1.44269504088896341f) + splat8(0.5f);
  vi8 n = __builtin_convertvector(t, vi8);           // truncation...
  vf8 fn = __builtin_convertvector(n, vf8);
  n = fn > t ? n - 1 : n;                            // ...made floor
  fn = __builtin_convertvector(n, vf8);
  const vf8 r = xc - fn * splat8(0.693359375f) + fn * splat8(2.12194440e-4f);
  vf8 p = splat8(1.9875691500e-4f);
  p = p * r + splat8(1.3981999507e-3f);
  p = p * r + splat8(8.3334519073e-3f);
  p = p * r + splat8(4.1665795894e-2f);
  p = p * r + splat8(1.6666665459e-1f);
  p = p * r + splat8(5.0000001201e-1f);
  p = p * r * r + r + splat8(1.0f);
  const vi8 bits = (n + 127) << 23;
  vf8 scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const vf8 y = p * scale;
  return x != x ? x : y;
}

// Lane-wise IEEE square root (sqrt of a negative is NaN, of -0 is -0).
inline vf8 sqrt8(vf8 x) {
#if defined(__AVX__)
  return reinterpret_cast<vf8>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x)));
#elif defined(__SSE2__)
  const vf4 lo = reinterpret_cast<vf4>(_mm_sqrt_ps(reinterpret_cast<__m128>(__builtin_shufflevector(x, x, 0, 1, 2, 3))));
  const vf4 hi = reinterpret_cast<vf4>(_mm_sqrt_ps(reinterpret_cast<__m128>(__builtin_shufflevector(x, x, 4, 5, 6, 7))));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7);
#else
  vf8 y;
  for (int i = 0; i < 8; ++i) y[i] = __builtin_sqrtf(x[i]);  // -fno-math-errno: no errno branch
  return y;
#endif
}

// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), odd-extended.
inline vf8 erf8(vf8 x) {
  const vf8 ax = x < splat8(0.0f) ? -x : x;
  const vf8 t = splat8(1.0f) / (splat8(1.0f) + splat8(0.3275911f) * ax);
  vf8 p = splat8(1.061405429f);
  p = p * t + splat8(-1.453152027f);
  p = p * t + splat8(1.421413741f);
  p = p * t + splat8(-0.284496736f);
  p = p * t + splat8(0.254829592f);
  const vf8 y = splat8(1.0f) - p * t * exp8(-ax * ax);
  return x < splat8(0.0f) ? -y : y;
}

constexpr int64_t kVec = 8;         // floats per vector
constexpr int64_t kAlign = 64;      // bytes; one cache line

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace SP_ISA_NS

}  // namespace sparseprune
