// Float vectors of SP_VEC_WIDTH lanes (8 or 16) through GCC/Clang vector extensions: one kernel
// body, its vector width a compile-time parameter, compiled once per SIMD path:
//   generic   (SSE2 baseline, 8 lanes)       avx2     (-mavx2 -mfma, 8 lanes)
//   avx512    (-mavx512f/bw/dq/vl -mfma, 16)  avx2_w16 (-mavx2 -mfma, 16 lanes: the compiler splits
//             each vector in two, so the 16-lane logic runs and is tested on any AVX2 machine).
// Only kernel bodies include this, with SP_ISA_NS (and SP_VEC_WIDTH) defined: every type and inline
// function lands in that path's own namespace, so the linker can never swap one path's copy into
// another.
//
// The helpers are templates on the vector type V (default: the path's full vector `vf`), so a
// body can also run an 8-float tail with `vf8` where its data comes in multiples of 8 only.
#pragma once
#ifndef SP_ISA_NS
#error "simd.h is for kernel bodies: define SP_ISA_NS first"
#endif
#ifndef SP_VEC_WIDTH
#define SP_VEC_WIDTH 8
#endif
#if SP_VEC_WIDTH != 8 && SP_VEC_WIDTH != 16
#error "SP_VEC_WIDTH must be 8 or 16"
#endif

#include <cstdint>
#if defined(__SSE2__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace sparseprune {
namespace SP_ISA_NS {

constexpr int64_t kVec = SP_VEC_WIDTH;  // floats per vector
constexpr int64_t kAlign = 64;          // bytes; one cache line

typedef float vf __attribute__((vector_size(4 * SP_VEC_WIDTH)));
typedef int32_t vi __attribute__((vector_size(4 * SP_VEC_WIDTH)));
typedef float vf8 __attribute__((vector_size(32)));  // 8 lanes: SELL-8 slots, tails of 8 floats

template <class V>
constexpr int lanes = static_cast<int>(sizeof(V) / sizeof(float));

template <class V = vf>
inline V splat(float v) {
  static_assert(lanes<V> == 8 || lanes<V> == 16, "8 or 16 lanes");
  if constexpr (lanes<V> == 8) {
    return V{v, v, v, v, v, v, v, v};
  } else {
    return V{v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v};
  }
}
template <class V = vf>
inline V load(const float* p) {  // unaligned
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <class V = vf>
inline V load_aligned(const float* p) { return *reinterpret_cast<const V*>(p); }
template <class V>
inline void store(float* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }  // unaligned

template <class V>
inline V relu_v(V v) {
  const V zero = splat<V>(0.0f);
  // Keeps NaN as in torch.relu: NaN > 0 is false, so select by (v < 0) instead.
  return v < zero ? zero : v;
}
template <class V>
inline V min_v(V a, V b) { return a < b ? a : b; }
template <class V>
inline V max_v(V a, V b) { return a > b ? a : b; }

// The 8-lane pieces of v added together (lane i: v[i] + v[i + 8] for 16 lanes).
template <class V>
inline vf8 fold8(V v) {
  if constexpr (lanes<V> == 8) {
    return v;
  } else {
    vf8 lo, hi;
    __builtin_memcpy(&lo, &v, 32);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
    return lo + hi;
  }
}

// Sum of all lanes, as a tree of halves (the same order at every call).
template <class V>
inline float hsum(V v) {
  const vf8 h = fold8(v);
  return ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]));
}
template <class V>
inline float hmax(V v) {
  float m = v[0];
  for (int i = 1; i < lanes<V>; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// e^x to ~2 ulp for x in [-87, 88] (Cephes' expf polynomial after x = n ln2 + r); below -87
// the result flushes towards 0, above 88 it saturates at e^88. NaN stays NaN.
inline vf exp_v(vf x) {
  const vf hi = splat(88.0f), lo = splat(-87.0f);
  // NaN compares false and becomes lo here (a NaN must never reach the float -> int conversion
  // below: that is undefined behaviour); the last line puts it back.
  const vf xc = x < hi ? (x > lo ? x : lo) : hi;
  const vf t = xc * splat(1.44269504088896341f) + splat(0.5f);
  vi n = __builtin_convertvector(t, vi);             // truncation...
  vf fn = __builtin_convertvector(n, vf);
  n = fn > t ? n - 1 : n;                            // ...made floor
  fn = __builtin_convertvector(n, vf);
  const vf r = xc - fn * splat(0.693359375f) + fn * splat(2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const vi bits = (n + 127) << 23;
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const vf y = p * scale;
  return x != x ? x : y;
}

// Lane-wise IEEE square root (sqrt of a negative is NaN, of -0 is -0), with the widest
// instruction the path has.
inline vf sqrt_v(vf x) {
#if defined(__AVX512F__) && SP_VEC_WIDTH == 16
  // (maskz with every lane kept: GCC 12's _mm512_sqrt_ps warns on its own undefined source)
  return reinterpret_cast<vf>(_mm512_maskz_sqrt_ps(static_cast<__mmask16>(0xFFFF), reinterpret_cast<__m512>(x)));
#elif defined(__AVX__)
  vf y;
  for (int i = 0; i < kVec; i += 8) {
    __m256 h;
    __builtin_memcpy(&h, reinterpret_cast<const float*>(&x) + i, 32);
    h = _mm256_sqrt_ps(h);
    __builtin_memcpy(reinterpret_cast<float*>(&y) + i, &h, 32);
  }
  return y;
#elif defined(__SSE2__)
  vf y;
  for (int i = 0; i < kVec; i += 4) {
    __m128 q;
    __builtin_memcpy(&q, reinterpret_cast<const float*>(&x) + i, 16);
    q = _mm_sqrt_ps(q);
    __builtin_memcpy(reinterpret_cast<float*>(&y) + i, &q, 16);
  }
  return y;
#else
  vf y;
  for (int i = 0; i < kVec; ++i) y[i] = __builtin_sqrtf(x[i]);  // -fno-math-errno: no errno branch
  return y;
#endif
}

// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), odd-extended.
inline vf erf_v(vf x) {
  const vf ax = x < splat(0.0f) ? -x : x;
  const vf t = splat(1.0f) / (splat(1.0f) + splat(0.3275911f) * ax);
  vf p = splat(1.061405429f);
  p = p * t + splat(-1.453152027f);
  p = p * t + splat(1.421413741f);
  p = p * t + splat(-0.284496736f);
  p = p * t + splat(0.254829592f);
  const vf y = splat(1.0f) - p * t * exp_v(-ax * ax);
  return x < splat(0.0f) ? -y : y;
}

// The even lanes of the 2 * kVec floats a then b: a stride-2 run of inputs as one vector.
inline vf even_lanes(vf a, vf b) {
#if SP_VEC_WIDTH == 8
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14);
#else
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
#endif
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace SP_ISA_NS

}  // namespace sparseprune
