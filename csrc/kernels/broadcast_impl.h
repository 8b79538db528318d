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
inline vf apply_v(vf x, vf y) {
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
  const vf va0 = splat(a[0]), vb0 = splat(b[0]);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    const vf x = SA ? load(a + i) : va0, y = SB ? load(b + i) : vb0;
    store(dst + i, apply_v<Op>(x, y));
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
  vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;  // four chains: the adds overlap
  int64_t i = 0;
  for (; i + 4 * kVec <= n; i += 4 * kVec) {
    a0 += load(src + i);
    a1 += load(src + i + kVec);
    a2 += load(src + i + 2 * kVec);
    a3 += load(src + i + 3 * kVec);
  }
  for (; i + kVec <= n; i += kVec) a0 += load(src + i);
  double sum = (static_cast<double>(hsum(a0)) + hsum(a1)) + (static_cast<double>(hsum(a2)) + hsum(a3));
  for (; i < n; ++i) sum += src[i];
  return sum;
}

void sum_columns_entry(const float* src, int64_t rows, int64_t ld, int64_t n, float* dst) {
  // 4 * kVec columns in four registers down all rows (no accumulator traffic; the rows' pieces
  // stay in L1 for the next columns). Each column sums its rows in order, so the result does not
  // depend on how n is split, nor on the vector width.
  int64_t j = 0;
  for (; j + 4 * kVec <= n; j += 4 * kVec) {
    vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
    const float* p = src + j;
    for (int64_t r = 0; r < rows; ++r, p += ld) {
      a0 += load(p);
      a1 += load(p + kVec);
      a2 += load(p + 2 * kVec);
      a3 += load(p + 3 * kVec);
    }
    store(dst + j, a0);
    store(dst + j + kVec, a1);
    store(dst + j + 2 * kVec, a2);
    store(dst + j + 3 * kVec, a3);
  }
  for (; j + kVec <= n; j += kVec) {
    vf acc = splat(0.0f);
    for (int64_t r = 0; r < rows; ++r) acc += load(src + r * ld + j);
    store(dst + j, acc);
  }
  for (; j < n; ++j) {
    float acc = 0.0f;
    for (int64_t r = 0; r < rows; ++r) acc += src[r * ld + j];
    dst[j] = acc;
  }
}

}  // namespace SP_ISA_NS
}  // namespace sparseprune
