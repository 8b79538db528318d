#include "kernels/gemm.h"

#include <algorithm>

#include "kernels/cpu_features.h"
#include "kernels/isa_variants.h"
#include "kernels/partition.h"

namespace sparseprune {

SP_DECLARE_ISA_VARIANTS(
    void gemm_panels_entry(const float* a, int64_t lda, const float* packed, int64_t M, int64_t N, int64_t K,
                           float alpha, const float* bias, const float* row_bias, float* c, int64_t ldc, int64_t p0,
                           int64_t p1);)

void gemm_pack_b(const float* b, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n, float* packed) {
  const int64_t panels = (N + kGemmPanel - 1) / kGemmPanel;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = packed + p * K * kGemmPanel;
    const int64_t n0 = p * kGemmPanel, width = std::min<int64_t>(kGemmPanel, N - n0);
    for (int64_t k = 0; k < K; ++k) {
      const float* src = b + k * stride_k + n0 * stride_n;
      int64_t j = 0;
      if (stride_n == 1)
        for (; j < width; ++j) dst[k * kGemmPanel + j] = src[j];
      else
        for (; j < width; ++j) dst[k * kGemmPanel + j] = src[j * stride_n];
      for (; j < kGemmPanel; ++j) dst[k * kGemmPanel + j] = 0.0f;
    }
  }
}

void gemm_panels(const float* a, int64_t lda, const float* packed, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* bias, float* c, int64_t ldc, int64_t panel_begin, int64_t panel_end,
                 const float* row_bias) {
  if (M <= 0 || N <= 0) return;
  auto body = SP_ISA_PICK(gemm_panels_entry);
  body(a, lda, packed, M, N, K, alpha, bias, row_bias, c, ldc, panel_begin, panel_end);
}

void gemm(const float* a, int64_t lda, const float* packed, int64_t M, int64_t N, int64_t K, float alpha,
          const float* bias, float* c, int64_t ldc, int n_threads) {
  if (M <= 0 || N <= 0) return;
  const int64_t panels = (N + kGemmPanel - 1) / kGemmPanel;
  const int threads = threads_for_work(n_threads, static_cast<double>(M) * N * K);
  if (threads <= 1) {
    gemm_panels(a, lda, packed, M, N, K, alpha, bias, c, ldc, 0, panels);
    return;
  }
  // Split by panels when there are enough for every thread and B is the larger operand (each
  // thread then streams all of A and its own panels of B), else by blocks of rows (each thread
  // streams its rows of A and all of B). An im2col convolution (A: 3136 x 576, B: 576 x 64) split
  // by panels read A twice and ran no faster on 2 threads than on 1.
  const bool by_panels = panels >= 2 * threads && N >= M;
#pragma omp parallel num_threads(threads)
  for_each_part(threads, [&](int t) {
    if (by_panels) {
      gemm_panels(a, lda, packed, M, N, K, alpha, bias, c, ldc, panels * t / threads, panels * (t + 1) / threads);
    } else {
      const int64_t m0 = M * t / threads, m1 = M * (t + 1) / threads;
      gemm_panels(a + m0 * lda, lda, packed, m1 - m0, N, K, alpha, bias, c + m0 * ldc, ldc, 0, panels);
    }
  });
}

}  // namespace sparseprune
