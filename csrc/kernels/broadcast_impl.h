// Row kernels of the broadcast ops, compiled once per SIMD path (include with SP_ISA_NS defined,
// from exactly one source file per path: it also defines that path's entry points). Each
// element's arithmetic is one IEEE operation, so vector body and scalar tail agree exactly.
#pragma once

#include <cstdint>

#include "kernels/broadcast.h"
#include "kernels/simd.h"

namespace sparseprune {
namespace SP_ISA_NS {

template <BinaryOp Op>
inline vf8 apply8(vf8 x, vf8 y) {
  if constexpr (Op == BinaryOp::add) return x + y;
  if constexpr (Op == BinaryOp::sub) return x - y;
  if constexpr (Op == BinaryOp::mul) return x * y;
  return x / y;
}

template <BinaryOp Op>
inline float apply1(float x, float y) {
  if constexpr (Op == BinaryOp::add) return x + y;
  if constexpr (Op == BinaryOp::sub) return x - y;
  if constexpr (Op == BinaryOp::mul) return x * y;
  return x / y;
}

// SA, SB: 1 = a contiguous run, 0 = one value for the whole row.
template <BinaryOp Op, int SA, int SB>
inline void binary_row(const float* a, const float* b, float* dst, int64_t n) {
  const vf8 va0 = splat8(a[0]), vb0 = splat8(b[0]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const vf8 x = SA ? load8(a + i) : va0, y = SB ? load8(b + i) : vb0;
    *reinterpret_cast<vf8_unaligned*>(dst + i) = apply8<Op>(x, y);
  }
  for (; i < n; ++i) dst[i] = apply1<Op>(a[SA * i], b[SB * i]);
}

template <BinaryOp Op>
inline void binary_row_strided(const float* a, int64_t sa, const float* b, int64_t sb, float* dst, int64_t n) {
  if (sa && sb) binary_row<Op, 1, 1>(a, b, dst, n);
  else if (sa) binary_row<Op, 1, 0>(a, b, dst, n);
  else if (sb) binary_row<Op, 0, 1>(a, b, dst, n);
  else binary_row<Op, 0, 0>(a, b, dst, n);
}

void binary_row_entry(const float* a, int64_t sa, const float* b, int64_t sb, float* dst, int64_t n, BinaryOp op) {
  switch (op) {
    case BinaryOp::add: binary_row_strided<BinaryOp::add>(a, sa, b, sb, dst, n); break;
    case BinaryOp::sub: binary_row_strided<BinaryOp::sub>(a, sa, b, sb, dst, n); break;
    case BinaryOp::mul: binary_row_strided<BinaryOp::mul>(a, sa, b, sb, dst, n); break;
    case BinaryOp::div: binary_row_strided<BinaryOp::div>(a, sa, b, sb, dst, n); break;
  }
}

double sum_row_entry(const float* src, int64_t n) {
  vf8 a0 = splat8(0.0f), a1 = a0, a2 = a0, a3 = a0;  // four chains: the adds overlap
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 += load8(src + i);
    a1 += load8(src + i + 8);
    a2 += load8(src + i + 16);
    a3 += load8(src + i + 24);
  }
  for (; i + 8 <= n; i += 8) a0 += load8(src + i);
  double sum = (static_cast<double>(hsum8(a0)) + hsum8(a1)) + (static_cast<double>(hsum8(a2)) + hsum8(a3));
  for (; i < n; ++i) sum += src[i];
  return sum;
}

void sum_columns_entry(const float* src, int64_t rows, int64_t ld, int64_t n, float* dst) {
  // 32 columns in four registers down all rows (no accumulator traffic; the rows' 128-byte
  // pieces stay in L1 for the next 32 columns). Each column sums its rows in order, so the
  // result does not depend on how n is split.
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    vf8 a0 = splat8(0.0f), a1 = a0, a2 = a0, a3 = a0;
    const float* p = src + j;
    for (int64_t r = 0; r < rows; ++r, p += ld) {
      a0 += load8(p);
      a1 += load8(p + 8);
      a2 += load8(p + 16);
      a3 += load8(p + 24);
    }
    *reinterpret_cast<vf8_unaligned*>(dst + j) = a0;
    *reinterpret_cast<vf8_unaligned*>(dst + j + 8) = a1;
    *reinterpret_cast<vf8_unaligned*>(dst + j + 16) = a2;
    *reinterpret_cast<vf8_unaligned*>(dst + j + 24) = a3;
  }
  for (; j + 8 <= n; j += 8) {
    vf8 acc = splat8(0.0f);
    for (int64_t r = 0; r < rows; ++r) acc += load8(src + r * ld + j);
    *reinterpret_cast<vf8_unaligned*>(dst + j) = acc;
  }
  for (; j < n; ++j) {
    float acc = 0.0f;
    for (int64_t r = 0; r < rows; ++r) acc += src[r * ld + j];
    dst[j] = acc;
  }
}

}  // namespace SP_ISA_NS
}  // namespace sparseprune
