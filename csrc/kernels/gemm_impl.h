// The GEMM compute body, compiled once per SIMD path (include with SP_ISA_NS defined, from exactly one
// source file per path: it also defines that path's entry points).
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/gemm.h"
#include "kernels/simd.h"

namespace sparseprune {
namespace SP_ISA_NS {

// Register tile: 6 rows of C by one 16-column panel, i.e. 6 x kPanelVecs accumulators (12 of 8
// lanes or 6 of 16) + the panel row's vectors + 1 A broadcast. The 16-column panel is the packed
// format of B, shared by every SIMD path (B is packed once, whichever path runs it later).
constexpr int kGemmRows = 6;
constexpr int kPanelVecs = static_cast<int>(kGemmPanel / kVec);
static_assert(kPanelVecs * kVec == kGemmPanel, "a panel is whole vectors");

// One tile: ROWS rows of C, one 16-column panel, n_valid (<= 16) of its columns stored.
template <int ROWS>
inline void gemm_tile(int64_t K, const float* a, int64_t lda, const float* panel, float alpha,
                      const float* bias, const float* row_bias, float* c, int64_t ldc, int n_valid) {
  vf acc[ROWS][kPanelVecs];
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < kPanelVecs; ++v) acc[i][v] = splat(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    vf b[kPanelVecs];
#pragma GCC unroll 2
    for (int v = 0; v < kPanelVecs; ++v) b[v] = load(panel + k * kGemmPanel + v * kVec);
    for (int i = 0; i < ROWS; ++i) {
      const vf av = splat(a[i * lda + k]);
#pragma GCC unroll 2
      for (int v = 0; v < kPanelVecs; ++v) acc[i][v] += av * b[v];
    }
  }
  float bias16[kGemmPanel] = {0};
  if (bias) std::copy(bias, bias + n_valid, bias16);
  const vf va = splat(alpha);
  vf bb[kPanelVecs];
#pragma GCC unroll 2
  for (int v = 0; v < kPanelVecs; ++v) bb[v] = load(bias16 + v * kVec);
  for (int i = 0; i < ROWS; ++i) {
    const vf rb = splat(row_bias ? row_bias[i] : 0.0f);
    float* row = c + i * ldc;
    float tmp[kGemmPanel];
    float* out = n_valid == kGemmPanel ? row : tmp;
#pragma GCC unroll 2
    for (int v = 0; v < kPanelVecs; ++v) store(out + v * kVec, acc[i][v] * va + bb[v] + rb);
    if (n_valid != kGemmPanel) std::copy(tmp, tmp + n_valid, row);
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
