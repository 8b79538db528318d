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

// dst[c * ldd + r] = src[r * lds + c] for r in [0, n_r), c in [0, n_c): 8x8 blocks transposed in
// registers. The side with the larger stride is walked 16 lines at a time in the outer loop, so
// its lines are read (or written) whole before the next ones; taking them one 8x8 block at a time
// through a 4 KiB-multiple stride (a 3072-float row) thrashed one L1 set: the 256-row pack and
// unpack of a BERT FFN layer took longer than its sparse product.
inline void transpose_8x8(const float* __restrict s, int64_t lds, float* __restrict d, int64_t ldd) {
  const vf8 r0 = load<vf8>(s), r1 = load<vf8>(s + lds), r2 = load<vf8>(s + 2 * lds), r3 = load<vf8>(s + 3 * lds);
  const vf8 r4 = load<vf8>(s + 4 * lds), r5 = load<vf8>(s + 5 * lds), r6 = load<vf8>(s + 6 * lds), r7 = load<vf8>(s + 7 * lds);
  // pairs of rows interleaved, then pairs of pairs, then halves: column j of the block
  const vf8 t0 = __builtin_shufflevector(r0, r1, 0, 8, 1, 9, 4, 12, 5, 13), t1 = __builtin_shufflevector(r0, r1, 2, 10, 3, 11, 6, 14, 7, 15);
  const vf8 t2 = __builtin_shufflevector(r2, r3, 0, 8, 1, 9, 4, 12, 5, 13), t3 = __builtin_shufflevector(r2, r3, 2, 10, 3, 11, 6, 14, 7, 15);
  const vf8 t4 = __builtin_shufflevector(r4, r5, 0, 8, 1, 9, 4, 12, 5, 13), t5 = __builtin_shufflevector(r4, r5, 2, 10, 3, 11, 6, 14, 7, 15);
  const vf8 t6 = __builtin_shufflevector(r6, r7, 0, 8, 1, 9, 4, 12, 5, 13), t7 = __builtin_shufflevector(r6, r7, 2, 10, 3, 11, 6, 14, 7, 15);
  const vf8 u0 = __builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13), u1 = __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
  const vf8 u2 = __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13), u3 = __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
  const vf8 u4 = __builtin_shufflevector(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13), u5 = __builtin_shufflevector(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
  const vf8 u6 = __builtin_shufflevector(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13), u7 = __builtin_shufflevector(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
  store(d, __builtin_shufflevector(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11));
  store(d + ldd, __builtin_shufflevector(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11));
  store(d + 2 * ldd, __builtin_shufflevector(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11));
  store(d + 3 * ldd, __builtin_shufflevector(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11));
  store(d + 4 * ldd, __builtin_shufflevector(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15));
  store(d + 5 * ldd, __builtin_shufflevector(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15));
  store(d + 6 * ldd, __builtin_shufflevector(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15));
  store(d + 7 * ldd, __builtin_shufflevector(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15));
}

inline void transpose(const float* __restrict src, int64_t lds, int64_t n_r, int64_t n_c,
                      float* __restrict dst, int64_t ldd) {
  const auto scalar = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = c0; c < c1; ++c) dst[c * ldd + r] = src[r * lds + c];
  };
  const int64_t r8 = n_r / 8 * 8, c8 = n_c / 8 * 8;
  if (lds >= ldd) {  // source rows, 16 at a time
    for (int64_t r0 = 0; r0 < r8; r0 += 16) {
      const int64_t rows = std::min<int64_t>(16, r8 - r0);
      for (int64_t c0 = 0; c0 < c8; c0 += 8)
        for (int64_t r = r0; r < r0 + rows; r += 8) transpose_8x8(src + r * lds + c0, lds, dst + c0 * ldd + r, ldd);
    }
  } else {  // destination rows (source columns), 16 at a time
    for (int64_t c0 = 0; c0 < c8; c0 += 16) {
      const int64_t cols = std::min<int64_t>(16, c8 - c0);
      for (int64_t r0 = 0; r0 < r8; r0 += 8)
        for (int64_t c = c0; c < c0 + cols; c += 8) transpose_8x8(src + r0 * lds + c, lds, dst + c * ldd + r0, ldd);
    }
  }
  scalar(0, r8, c8, n_c);   // the last columns of the 8-row blocks
  scalar(r8, n_r, 0, n_c);  // the last rows
}

// Packs x channel-major, tile by tile: batch tile [b0, b0 + w) is one contiguous block
// dst[n_cols_padded * b0 + k * w + (b - b0)] = x[b, k], so a kernel working on one tile reads
// only that block (no gaps between rows: fewer cache lines, TLB entries and prefetch misses).
// Zeros fill b >= batch (up to ldx) and n_cols <= k < n_cols_padded.
// Called inside a parallel region: the work is shared with an orphaned `omp for`.
inline void pack_channel_major(const float* __restrict x, int64_t batch, int64_t stride_b,
                               int64_t stride_k, int64_t n_cols, int64_t n_cols_padded,
                               int64_t ldx, int max_vectors, float* __restrict dst) {
  constexpr int64_t kBlock = 64;  // input columns per task
  const int64_t k_blocks = (n_cols_padded + kBlock - 1) / kBlock;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    const int64_t k0 = kb * kBlock;
    const int64_t k1 = std::min(k0 + kBlock, n_cols_padded);
    const int64_t k1_data = std::min(k1, std::max(n_cols, k0));  // end of the real columns
    for (int64_t b0 = 0; b0 < ldx;) {
      const int64_t w = tile_width(ldx, b0, max_vectors);
      float* tile = dst + n_cols_padded * b0;
      const int64_t b1_data = std::min(b0 + w, std::max(batch, b0));  // end of the real rows
      if (stride_k == 1) {
        transpose(x + b0 * stride_b + k0, stride_b, b1_data - b0, k1_data - k0, tile + k0 * w, w);
      } else {
        for (int64_t b = b0; b < b1_data; ++b)
          for (int64_t k = k0; k < k1_data; ++k) tile[k * w + (b - b0)] = x[b * stride_b + k * stride_k];
      }
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t b = (k < k1_data ? b1_data : b0); b < b0 + w; ++b) tile[k * w + (b - b0)] = 0.0f;
      b0 += w;
    }
  }
}

// y[b, r] = yt[r * ldx + b] for rows [r0, r1) and b < batch: the channel-major result back to
// the caller's batch-major layout.
inline void unpack_channel_major(const float* __restrict yt, int64_t ldx, int64_t r0, int64_t r1,
                                 int64_t batch, float* __restrict y, int64_t y_stride) {
  if (r1 > r0) transpose(yt + r0 * ldx, ldx, r1 - r0, batch, y + r0, y_stride);
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
