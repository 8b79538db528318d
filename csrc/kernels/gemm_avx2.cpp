// The GEMM body for the avx2 path (this file is built with -mavx2 -mfma).
#define SP_ISA_NS avx2
#include "kernels/gemm_impl.h"

namespace sparseprune {
namespace avx2 {
void gemm_panels_entry(const float* a, int64_t lda, const float* packed, int64_t M, int64_t N, int64_t K,
                       float alpha, const float* bias, const float* row_bias, float* c, int64_t ldc, int64_t p0,
                       int64_t p1) {
  gemm_panels_body(a, lda, packed, M, N, K, alpha, bias, row_bias, c, ldc, p0, p1);
}
}  // namespace avx2
}  // namespace sparseprune
