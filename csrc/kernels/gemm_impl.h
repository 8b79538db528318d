// The GEMM compute body, compiled once per SIMD path (include with SP_ISA_NS defined, from exactly one
// source file per path: it also defines that path's entry points).
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/gemm.h"
#include "kernels/simd.h"

namespace sparseprune {
namespace SP_ISA_NS {

constexpr int kGemmRows = 6;  // rows of C per register tile: 6 x 2 accumulators + 2 B vectors + 1 A broadcast

// One tile: ROWS rows of C, one 16-column panel, n_valid (<= 16) of its columns stored.
template <int ROWS>
inline void gemm_tile(int64_t K, const float* a, int64_t lda, const float* panel, float alpha,
                      const float* bias, const float* row_bias, float* c, int64_t ldc, int n_valid) {
  vf8 acc[ROWS][2];
  for (int i = 0; i < ROWS; ++i) acc[i][0] = acc[i][1] = splat8(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const vf8 b0 = load8(panel + k * kGemmPanel);
    const vf8 b1 = load8(panel + k * kGemmPanel + 8);
    for (int i = 0; i < ROWS; ++i) {
      const vf8 av = splat8(a[i * lda + k]);
      acc[i][0] += av * b0;
      acc[i][1] += av * b1;
    }
  }
  float bias16[kGemmPanel] = {0};
  if (bias) std::copy(bias, bias + n_valid, bias16);
  const vf8 va = splat8(alpha), bb0 = load8(bias16), bb1 = load8(bias16 + 8);
  for (int i = 0; i < ROWS; ++i) {
    const vf8 rb = splat8(row_bias ? row_bias[i] : 0.0f);
    const vf8 r0 = acc[i][0] * va + bb0 + rb, r1 = acc[i][1] * va + bb1 + rb;
    float* row = c + i * ldc;
    if (n_valid == kGemmPanel) {
      *reinterpret_cast<vf8_unaligned*>(row) = r0;
      *reinterpret_cast<vf8_unaligned*>(row + 8) = r1;
    } else {
      float tmp[kGemmPanel];
      *reinterpret_cast<vf8_unaligned*>(tmp) = r0;
      *reinterpret_cast<vf8_unaligned*>(tmp + 8) = r1;
      std::copy(tmp, tmp + n_valid, row);
    }
  }
}

inline void gemm_panels_body(const float* a, int64_t lda, const float* packed, int64_t M, int64_t N, int64_t K,
                             float alpha, const float* bias, const float* row_bias, float* c, int64_t ldc, int64_t p0,
                             int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = packed + p * K * kGemmPanel;
    const int64_t n0 = p * kGemmPanel;
    const int n_valid = static_cast<int>(std::min<int64_t>(kGemmPanel, N - n0));
    const float* bp = bias ? bias + n0 : nullptr;
    int64_t m = 0;
    for (; m + kGemmRows <= M; m += kGemmRows)
      gemm_tile<kGemmRows>(K, a + m * lda, lda, panel, alpha, bp, row_bias ? row_bias + m : nullptr, c + m * ldc + n0, ldc, n_valid);
    switch (M - m) {
      case 5: gemm_tile<5>(K, a + m * lda, lda, panel, alpha, bp, row_bias ? row_bias + m : nullptr, c + m * ldc + n0, ldc, n_valid); break;
      case 4: gemm_tile<4>(K, a + m * lda, lda, panel, alpha, bp, row_bias ? row_bias + m : nullptr, c + m * ldc + n0, ldc, n_valid); break;
      case 3: gemm_tile<3>(K, a + m * lda, lda, panel, alpha, bp, row_bias ? row_bias + m : nullptr, c + m * ldc + n0, ldc, n_valid); break;
      case 2: gemm_tile<2>(K, a + m * lda, lda, panel, alpha, bp, row_bias ? row_bias + m : nullptr, c + m * ldc + n0, ldc, n_valid); break;
      case 1: gemm_tile<1>(K, a + m * lda, lda, panel, alpha, bp, row_bias ? row_bias + m : nullptr, c + m * ldc + n0, ldc, n_valid); break;
      default: break;
    }
  }
}

// The entry points the dispatcher (gemm.cpp) calls, one set per SIMD path.
void gemm_panels_entry(const float* a, int64_t lda, const float* packed, int64_t M, int64_t N, int64_t K,
                       float alpha, const float* bias, const float* row_bias, float* c, int64_t ldc, int64_t p0,
                       int64_t p1) {
  gemm_panels_body(a, lda, packed, M, N, K, alpha, bias, row_bias, c, ldc, p0, p1);
}

}  // namespace SP_ISA_NS
}  // namespace sparseprune
