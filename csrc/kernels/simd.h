// Eight-float vectors through GCC/Clang vector extensions: one source compiles to SSE2 in the
// baseline objects and to AVX2/FMA in the objects built with -mavx2 -mfma.
// Only kernel bodies include this, with SP_ISA_NS defined: every inline function lands in that
// path's own namespace, so the linker can never swap an AVX2 copy into the baseline path.
#pragma once
#ifndef SP_ISA_NS
#error "simd.h is for kernel bodies: define SP_ISA_NS first"
#endif

#include <cstdint>

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

constexpr int64_t kVec = 8;         // floats per vector
constexpr int64_t kAlign = 64;      // bytes; one cache line

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace SP_ISA_NS

}  // namespace sparseprune
