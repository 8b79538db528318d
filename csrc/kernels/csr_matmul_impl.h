// CSR sparse x dense linear layer: the kernel body. Included once per SIMD path, inside
// namespace sparseprune::SP_ISA_NS, by csr_matmul_generic.cpp and csr_matmul_avx2.cpp.
//
//   W: CsrView (indptr[n_rows + 1], indices[nnz], values[nnz])
//   x[batch, n_cols] through strides, bias[n_rows] or null, y[batch, n_rows]
//
// batch == 1: one dot product per output row, gathering x by column index.
// batch > 1 : x is packed channel-major (xt[n_cols, ldx], ldx = batch rounded up to 8), and
//             each nonzero scales a contiguous run of up to 64 batch values held in registers.
// Rows are split among threads by nonzero count.
#pragma once

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "kernels/channel_major.h"
#include "kernels/linear_args.h"
#include "kernels/partition.h"
#include "kernels/scratch.h"
#include "kernels/simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sparseprune {
namespace SP_ISA_NS {

namespace csr_detail {

inline float apply_relu(float v, bool relu) { return (relu && v < 0.0f) ? 0.0f : v; }

// sum_j values[j] * x[indices[j]] for j in [begin, end); x is contiguous.
template <class Index>
inline float sparse_dot(const float* __restrict values, const Index* __restrict indices,
                        int64_t begin, int64_t end, const float* __restrict x) {
  int64_t j = begin;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  for (; j + 16 <= end; j += 16) {
    __m256i i0, i1;
    if constexpr (sizeof(Index) == 2) {
      i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(indices + j)));
      i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(indices + j + 8)));
    } else {
      i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(indices + j));
      i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(indices + j + 8));
    }
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(values + j), _mm256_i32gather_ps(x, i0, 4), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(values + j + 8), _mm256_i32gather_ps(x, i1, 4), acc1);
  }
  acc0 = _mm256_add_ps(acc0, acc1);
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
  const __m128 quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
  float s = _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)));
  float s1 = 0.0f;
#else
  float s = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  for (; j + 4 <= end; j += 4) {
    s += values[j] * x[indices[j]];
    s1 += values[j + 1] * x[indices[j + 1]];
    s2 += values[j + 2] * x[indices[j + 2]];
    s3 += values[j + 3] * x[indices[j + 3]];
  }
  s += s2;
  s1 += s3;
#endif
  for (; j + 2 <= end; j += 2) {
    s += values[j] * x[indices[j]];
    s1 += values[j + 1] * x[indices[j + 1]];
  }
  if (j < end) s += values[j] * x[indices[j]];
  return s + s1;
}

template <class Index>
void rows_batch1(const CsrView<Index>& w, const float* __restrict x, const LinearArgs& a,
                 int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float s = sparse_dot(w.values, w.indices, w.indptr[r], w.indptr[r + 1], x);
    if (a.bias) s += a.bias[r];
    a.y[r] = apply_relu(s, a.relu);
  }
}

// One tile of NV vectors (8 * NV batch columns starting at b0) for rows [r0, r1).
// U independent accumulator sets over consecutive nonzeros hide the FMA latency when the tile
// is narrow (NV * U >= 4 chains in flight); they are summed once per row.
template <int NV, int U, class Index>
void rows_tile(const CsrView<Index>& w, const float* __restrict xt, float* __restrict yt,
               int64_t ldx, const LinearArgs& a, int64_t b0, int64_t r0, int64_t r1) {
  const float* __restrict xb = xt + b0;
  for (int64_t r = r0; r < r1; ++r) {
    vf8 acc[U][NV];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[u][v] = splat8(0.0f);
    }
    int64_t j = w.indptr[r];
    const int64_t end = w.indptr[r + 1];
    for (; j + U <= end; j += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const vf8 wv = splat8(w.values[j + u]);
        const float* __restrict xr = xb + static_cast<int64_t>(w.indices[j + u]) * ldx;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[u][v] += wv * load8_aligned(xr + v * kVec);
      }
    }
    for (; j < end; ++j) {
      const vf8 wv = splat8(w.values[j]);
      const float* __restrict xr = xb + static_cast<int64_t>(w.indices[j]) * ldx;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[0][v] += wv * load8_aligned(xr + v * kVec);
    }
    const vf8 init = splat8(a.bias ? a.bias[r] : 0.0f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      vf8 sum = acc[0][v] + init;
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) sum += acc[u][v];
      acc[0][v] = a.relu ? relu8(sum) : sum;
    }
    store_row_tile<NV>(acc[0], yt + r * ldx + b0);
  }
}

// Rows [r0, r1) for the whole batch: xt[n_cols, ldx] in, yt[n_rows, ldx] as scratch, y out.
template <class Index>
void rows_batched(const CsrView<Index>& w, const float* __restrict xt, float* __restrict yt,
                  int64_t ldx, const LinearArgs& a, int64_t r0, int64_t r1) {
  for (int64_t b0 = 0; b0 < a.batch;) {
    static const int cap = getenv("SP_NV") ? atoi(getenv("SP_NV")) : 8;
    const int nv = pick_tile_vectors(ldx - b0, cap);
    switch (nv) {
      case 8: rows_tile<8, 1>(w, xt, yt, ldx, a, b0, r0, r1); break;
      case 4: rows_tile<4, 2>(w, xt, yt, ldx, a, b0, r0, r1); break;
      case 2: rows_tile<2, 4>(w, xt, yt, ldx, a, b0, r0, r1); break;
      default: rows_tile<1, 4>(w, xt, yt, ldx, a, b0, r0, r1); break;
    }
    b0 += nv * kVec;
  }
  unpack_channel_major(yt, ldx, r0, r1, a.batch, a.y, a.y_stride);
}

}  // namespace csr_detail

// bounds[threads + 1]: the row split from partition_rows_by_nnz (made by the dispatcher, so
// no std::vector code is compiled with this path's flags).
template <class Index>
void csr_linear(const CsrView<Index>& w, const LinearArgs& a, const int64_t* bounds, int threads,
                ScratchBuffer& scratch) {
  using namespace csr_detail;

  if (a.batch == 1) {
    const float* x = a.x;
    if (a.x_stride_k != 1) {  // gather needs unit stride: copy the one row (n_cols floats)
      float* packed = scratch.get(w.n_cols);
      for (int64_t k = 0; k < w.n_cols; ++k) packed[k] = a.x[k * a.x_stride_k];
      x = packed;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    for_each_part(threads, [&](int p) { rows_batch1(w, x, a, bounds[p], bounds[p + 1]); });
    return;
  }

  const int64_t ldx = round_up(a.batch, kVec);
  float* xt = scratch.get((w.n_cols + w.n_rows) * ldx);
  float* yt = xt + w.n_cols * ldx;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    pack_channel_major(a.x, a.batch, a.x_stride_b, a.x_stride_k, w.n_cols, w.n_cols, ldx, xt);
    // (the omp for inside pack_channel_major ends with a barrier: xt is complete here)
    for_each_part(threads, [&](int p) { rows_batched(w, xt, yt, ldx, a, bounds[p], bounds[p + 1]); });
  }
}

}  // namespace SP_ISA_NS
}  // namespace sparseprune
