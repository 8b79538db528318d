// Moving activations between the caller's batch-major layout and the channel-major layout the
// sparse kernels want (each nonzero weight scales one contiguous run of batch values).
// Kernel bodies include this with SP_ISA_NS defined (see simd.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/simd.h"

namespace sparseprune {
namespace SP_ISA_NS {

// Batch-tile width in floats at batch column b0, for kernels that hold at most max_vectors
// accumulator vectors per output row: max_vectors, max_vectors / 2, ... or 1 vectors of kVec
// columns (ldx is a multiple of kVec).
inline int64_t tile_width(int64_t ldx, int64_t b0, int max_vectors);

// Packs x channel-major, tile by tile: batch tile [b0, b0 + w) is one contiguous block
// dst[n_cols_padded * b0 + k * w + (b - b0)] = x[b, k], so a kernel working on one tile reads
// only that block (no gaps between rows: fewer cache lines, TLB entries and prefetch misses).
// Zeros fill b >= batch (up to ldx) and n_cols <= k < n_cols_padded.
// Called inside a parallel region: the work is shared with an orphaned `omp for`.
inline void pack_channel_major(const float* __restrict x, int64_t batch, int64_t stride_b,
                               int64_t stride_k, int64_t n_cols, int64_t n_cols_padded,
                               int64_t ldx, int max_vectors, float* __restrict dst) {
  constexpr int64_t kBlock = 32;  // input columns per task: reads of x stay within cache lines
  const int64_t k_blocks = (n_cols_padded + kBlock - 1) / kBlock;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    const int64_t k0 = kb * kBlock;
    const int64_t k1 = std::min(k0 + kBlock, n_cols_padded);
    for (int64_t b0 = 0; b0 < ldx;) {
      const int64_t w = tile_width(ldx, b0, max_vectors);
      float* tile = dst + n_cols_padded * b0;
      for (int64_t b = b0; b < b0 + w; ++b) {
        for (int64_t k = k0; k < k1; ++k) {
          tile[k * w + (b - b0)] = (b < batch && k < n_cols) ? x[b * stride_b + k * stride_k] : 0.0f;
        }
      }
      b0 += w;
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
template <int NV, class V>
inline void store_row_tile(const V (&acc)[NV], float* __restrict yt_row) {
  // Unaligned stores: the direct conv path writes straight into the caller's array.
  for (int v = 0; v < NV; ++v) store(yt_row + v * lanes<V>, acc[v]);
}

// Batch-tile width in vectors for the `remaining` (padded) batch columns, given that one output
// row may hold at most max_vectors accumulator vectors in registers.
inline int pick_tile_vectors(int64_t remaining, int max_vectors) {
  int nv = max_vectors;
  while (nv > 1 && remaining < nv * kVec) nv /= 2;
  return nv;
}

inline int64_t tile_width(int64_t ldx, int64_t b0, int max_vectors) {
  return pick_tile_vectors(ldx - b0, max_vectors) * kVec;
}

}  // namespace SP_ISA_NS
}  // namespace sparseprune
