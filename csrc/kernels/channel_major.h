// Moving activations between the caller's batch-major layout and the channel-major layout the
// sparse kernels want (each nonzero weight scales one contiguous run of batch values).
// Kernel bodies include this with SP_ISA_NS defined (see simd.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/simd.h"

namespace sparseprune {
namespace SP_ISA_NS {

// dst[k * ldx + b] = x[b, k] for k < n_cols, b < batch; zeros for batch <= b < ldx and for
// n_cols <= k < n_cols_padded, so kernels may run whole vectors and whole blocks.
// Called inside a parallel region: the work is shared with an orphaned `omp for`.
inline void pack_channel_major(const float* __restrict x, int64_t batch, int64_t stride_b,
                               int64_t stride_k, int64_t n_cols, int64_t n_cols_padded,
                               int64_t ldx, float* __restrict dst) {
  constexpr int64_t kTile = 32;  // square tiles keep both reads and writes in cache
  const int64_t k_tiles = (n_cols_padded + kTile - 1) / kTile;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int64_t k0 = kt * kTile;
    const int64_t k1 = std::min(k0 + kTile, n_cols_padded);
    for (int64_t b0 = 0; b0 < ldx; b0 += kTile) {
      const int64_t b1 = std::min(b0 + kTile, ldx);
      for (int64_t k = k0; k < k1; ++k) {
        float* out = dst + k * ldx;
        if (k >= n_cols) {
          for (int64_t b = b0; b < b1; ++b) out[b] = 0.0f;
          continue;
        }
        const float* in = x + k * stride_k;
        for (int64_t b = b0; b < b1; ++b) out[b] = b < batch ? in[b * stride_b] : 0.0f;
      }
    }
  }
}

// y[b, r] = yt[r * ldx + b] for rows [r0, r1) and b < batch: the channel-major result back to
// the caller's batch-major layout, in square tiles (a direct strided store per value would hit
// one L1 set over and over when the row stride is a multiple of 4 KiB).
inline void unpack_channel_major(const float* __restrict yt, int64_t ldx, int64_t r0, int64_t r1,
                                 int64_t batch, float* __restrict y, int64_t y_stride) {
  constexpr int64_t kTile = 32;
  for (int64_t b0 = 0; b0 < batch; b0 += kTile) {
    const int64_t b1 = std::min(b0 + kTile, batch);
    for (int64_t rr = r0; rr < r1; rr += kTile) {
      const int64_t rr1 = std::min(rr + kTile, r1);
      for (int64_t b = b0; b < b1; ++b) {
        float* out = y + b * y_stride;
        for (int64_t r = rr; r < rr1; ++r) out[r] = yt[r * ldx + b];
      }
    }
  }
}

// unpack_channel_major for all n_rows rows, shared by the threads of the enclosing parallel
// region (an orphaned `omp for`).
inline void unpack_channel_major_parallel(const float* __restrict yt, int64_t ldx, int64_t n_rows,
                                          int64_t batch, float* __restrict y, int64_t y_stride) {
  constexpr int64_t kRowsPerTask = 64;
  const int64_t tasks = (n_rows + kRowsPerTask - 1) / kRowsPerTask;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
  for (int64_t t = 0; t < tasks; ++t)
    unpack_channel_major(yt, ldx, t * kRowsPerTask, std::min(n_rows, (t + 1) * kRowsPerTask), batch, y,
                         y_stride);
}

// Stores NV accumulator vectors as one row of the channel-major result.
template <int NV>
inline void store_row_tile(const vf8 (&acc)[NV], float* __restrict yt_row) {
  for (int v = 0; v < NV; ++v) *reinterpret_cast<vf8*>(yt_row + v * kVec) = acc[v];
}

// Batch-tile width in floats for the `remaining` (padded) batch columns, given that one output
// row may hold at most max_vectors accumulator vectors in registers.
inline int pick_tile_vectors(int64_t remaining, int max_vectors) {
  int nv = max_vectors;
  while (nv > 1 && remaining < nv * kVec) nv /= 2;
  return nv;
}

}  // namespace SP_ISA_NS
}  // namespace sparseprune
