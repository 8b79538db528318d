// Block-sparse (BSR) x dense linear layer: the kernel body, included once per SIMD path inside
// namespace sparseprune::SP_ISA_NS (see csr_matmul_impl.h for the shared conventions).
//
//   W: BsrView with R x C blocks (indptr[n_block_rows + 1], indices[n_blocks],
//      values[n_blocks * R * C], column-major inside a block)
//   x[batch, n_cols] through strides, bias[n_rows] or null, y[batch, n_rows]
//
// An R x 1 block loads each x vector once and feeds R output rows; a 1 x C block reads C
// neighbouring inputs with one contiguous load instead of C gathers.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/channel_major.h"
#include "kernels/linear_args.h"
#include "kernels/partition.h"
#include "kernels/scratch.h"
#include "kernels/simd.h"

namespace sparseprune {
namespace SP_ISA_NS {

namespace bsr_detail {

template <int R, int C, class Index>
void block_rows_batch1(const BsrView<Index>& w, const float* __restrict x, const LinearArgs& a,
                       int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    float acc[R] = {};
    for (int64_t j = w.indptr[i]; j < w.indptr[i + 1]; ++j) {
      const float* __restrict blk = w.values + j * (R * C);
      const float* __restrict xs = x + static_cast<int64_t>(w.indices[j]) * C;
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r] += blk[c * R + r] * xs[c];
      }
    }
    const int64_t rows = std::min<int64_t>(R, w.n_rows - i * R);
    for (int64_t r = 0; r < rows; ++r) {
      float v = acc[r] + (a.bias ? a.bias[i * R + r] : 0.0f);
      if (a.relu && v < 0.0f) v = 0.0f;
      a.y[i * R + r] = v;
    }
  }
}

// Block rows [i0, i1) for the NV * kVec batch columns starting at b0.
// xtile[n_cols_padded, kVec * NV] is the packed tile; results go to yt[r * ldy + b0 ...].
template <int R, int C, int NV, class Index>
void block_rows_tile(const BsrView<Index>& w, const float* __restrict xtile, float* __restrict yt,
                     int64_t ldy, const LinearArgs& a, int64_t b0, int64_t i0, int64_t i1) {
  constexpr int64_t ldt = NV * kVec;
  const float* __restrict xb = xtile;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t rows = std::min<int64_t>(R, w.n_rows - i * R);
    vf acc[R][NV];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf init = splat((a.bias && r < rows) ? a.bias[i * R + r] : 0.0f);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = init;
    }
    for (int64_t j = w.indptr[i]; j < w.indptr[i + 1]; ++j) {
      const float* __restrict blk = w.values + j * (R * C);
      const float* __restrict xc = xb + static_cast<int64_t>(w.indices[j]) * C * ldt;
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        vf xv[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) xv[v] = load_aligned(xc + c * ldt + v * kVec);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const vf wv = splat(blk[c * R + r]);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[r][v] += wv * xv[v];
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (a.relu) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = relu_v(acc[r][v]);
      }
      store_row_tile<NV>(acc[r], yt + (i * R + r) * ldy + b0);
    }
  }
}

// Register budget: R rows x NV vectors of accumulators, at most 64 floats per block row's batch
// tile (8 vectors of 8 or 4 of 16), one vector per row at least.
template <int R>
constexpr int kMaxNV = R * kVec >= 64 ? 1 : static_cast<int>(64 / (R * kVec));

// Block rows [i0, i1) for the whole batch: xt in, yt[n_rows, ldx] as scratch, y out.
template <int R, int C, class Index>
void block_rows_batched(const BsrView<Index>& w, const float* __restrict xt, float* __restrict yt,
                        int64_t ldx, const LinearArgs& a, int64_t i0, int64_t i1) {
  const int64_t n_cols_padded = round_up(w.n_cols, C);
  for (int64_t b0 = 0; b0 < a.batch;) {
    const int nv = pick_tile_vectors(ldx - b0, kMaxNV<R>);
    const float* xtile = xt + n_cols_padded * b0;
    if constexpr (kMaxNV<R> >= 8) {
      if (nv == 8) { block_rows_tile<R, C, 8>(w, xtile, yt, ldx, a, b0, i0, i1); b0 += 8 * kVec; continue; }
    }
    if constexpr (kMaxNV<R> >= 4) {
      if (nv == 4) { block_rows_tile<R, C, 4>(w, xtile, yt, ldx, a, b0, i0, i1); b0 += 4 * kVec; continue; }
    }
    if constexpr (kMaxNV<R> >= 2) {
      if (nv == 2) { block_rows_tile<R, C, 2>(w, xtile, yt, ldx, a, b0, i0, i1); b0 += 2 * kVec; continue; }
    }
    block_rows_tile<R, C, 1>(w, xtile, yt, ldx, a, b0, i0, i1);
    b0 += kVec;
  }
  unpack_channel_major(yt, ldx, i0 * R, std::min<int64_t>(i1 * R, w.n_rows), a.batch, a.y, a.y_stride);
}

}  // namespace bsr_detail

// bounds[threads + 1]: the block-row split (see csr_matmul_impl.h).
template <int R, int C, class Index>
void bsr_linear(const BsrView<Index>& w, const LinearArgs& a, const int64_t* bounds, int threads,
                ScratchBuffer& scratch) {
  using namespace bsr_detail;
  const int64_t n_cols_padded = round_up(w.n_cols, C);
  if (a.batch == 1) {
    const float* x = a.x;
    if (a.x_stride_k != 1 || n_cols_padded != w.n_cols) {
      float* packed = scratch.get(n_cols_padded);
      for (int64_t k = 0; k < n_cols_padded; ++k) packed[k] = k < w.n_cols ? a.x[k * a.x_stride_k] : 0.0f;
      x = packed;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    for_each_part(threads, [&](int p) { block_rows_batch1<R, C>(w, x, a, bounds[p], bounds[p + 1]); });
    return;
  }
  const int64_t ldx = round_up(a.batch, kVec);
  float* xt = scratch.get((n_cols_padded + round_up(w.n_rows, R)) * ldx);
  float* yt = xt + n_cols_padded * ldx;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    pack_channel_major(a.x, a.batch, a.x_stride_b, a.x_stride_k, w.n_cols, n_cols_padded, ldx, kMaxNV<R>, xt);
    for_each_part(threads, [&](int p) { block_rows_batched<R, C>(w, xt, yt, ldx, a, bounds[p], bounds[p + 1]); });
  }
}

}  // namespace SP_ISA_NS
}  // namespace sparseprune
