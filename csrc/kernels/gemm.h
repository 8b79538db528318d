// Dense single-precision GEMM for the whole-model plan: dense Linear layers, matmul between
// activations and the two products inside attention. Not a BLAS: one register-tiled kernel
// (6 rows x 16 columns of C in registers, B packed into 16-column panels) that keeps the plan
// free of external libraries and of libtorch.
#pragma once

#include <cstdint>
#include <vector>

namespace sparseprune {

constexpr int64_t kGemmPanel = 16;  // columns of B per packed panel

// Floats a packed B of K rows and N columns needs: ceil(N / 16) panels of K x 16.
inline int64_t packed_b_size(int64_t K, int64_t N) { return (N + kGemmPanel - 1) / kGemmPanel * kGemmPanel * K; }

// Packs B, whose element (k, n) is b[k * stride_k + n * stride_n], into packed[packed_b_size(K, N)]:
// panel p holds columns [16p, 16p + 16) as K rows of 16 floats, zero padded past N.
void gemm_pack_b(const float* b, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n, float* packed);

// c[m * ldc + n] = alpha * sum_k a[m * lda + k] * B(k, n) + (bias ? bias[n] : 0)
// + (row_bias ? row_bias[m] : 0), for m < M and columns of panels [panel_begin, panel_end) below
// N. a[M rows of lda >= K], packed from gemm_pack_b, c[M rows of ldc >= N]. Runs on the calling
// thread.
void gemm_panels(const float* a, int64_t lda, const float* packed, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* bias, float* c, int64_t ldc, int64_t panel_begin, int64_t panel_end,
                 const float* row_bias = nullptr);

// The same over all panels, split among up to n_threads OpenMP threads (by panels, or by rows
// when there are few panels).
void gemm(const float* a, int64_t lda, const float* packed, int64_t M, int64_t N, int64_t K, float alpha,
          const float* bias, float* c, int64_t ldc, int n_threads);

}  // namespace sparseprune
