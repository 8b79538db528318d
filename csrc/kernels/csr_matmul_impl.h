// CSR sparse x dense linear layer, stored as SELL-8 (see linear_args.h): the kernel body.
// Included once per SIMD path, inside namespace sparseprune::SP_ISA_NS, by
// csr_matmul_{generic,avx2,avx2_w16,avx512}.cpp.
//
//   W: SellView (chunk_ptr[n_chunks + 1], perm[8 n_chunks], row_len[8 n_chunks],
//      indices[n_entries], values[n_entries])
//   x[batch, n_cols] through strides, bias[n_rows] or null, y[batch, n_rows]
//
// batch == 1: per chunk, 8 row sums side by side; each vector loads kVec weights (kVec / 8 steps
//             of the chunk) and gathers kVec x.
// batch > 1 : x is packed channel-major (xt[n_cols, ldx], ldx = batch rounded up to kVec), and
//             each nonzero scales a contiguous run of up to 64 batch values held in registers;
//             batch tile by tile, column panel by column panel (linear_args.h), so the inputs
//             read stay in L1/L2 (768x3072 at 90%, batch 64-256, 1 thread on Zen 4: 20-25%
//             faster than one pass over all 3072 columns).
// Chunks are split among threads by stored entries.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernels/channel_major.h"
#include "kernels/linear_args.h"
#include "kernels/partition.h"
#include "kernels/scratch.h"
#include "kernels/simd.h"

#ifndef SP_HW_GATHER
#define SP_HW_GATHER 0
#endif

namespace sparseprune {
namespace SP_ISA_NS {

namespace csr_detail {

// x[i[0..lanes<V>)] as one vector (x contiguous).
template <class V, class Index>
inline V gather(const float* __restrict x, const Index* __restrict i) {
#if defined(__AVX2__) && SP_HW_GATHER
  if constexpr (lanes<V> == 16) {
#if defined(__AVX512F__)
    __m512i vi;
    if constexpr (sizeof(Index) == 2) {
      vi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(i)));
    } else {
      vi = _mm512_loadu_si512(i);
    }
    return reinterpret_cast<V>(_mm512_i32gather_ps(vi, x, 4));
#endif
  }
#endif
#if defined(__AVX2__)
  // 8 lanes at a time. Scalar loads inserted lane by lane beat vgatherdps on CPUs whose gather is
  // microcoded at about one element per cycle (AMD Zen 2-4): SP_HW_GATHER picks the hardware
  // gather instead.
  auto gather8 = [&](const Index* j) -> __m256 {
#if SP_HW_GATHER
    __m256i vi;
    if constexpr (sizeof(Index) == 2) {
      vi = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(j)));
    } else {
      vi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(j));
    }
    return _mm256_i32gather_ps(x, vi, 4);
#else
    __m128 lo = _mm_load_ss(x + j[0]);
    __m128 hi = _mm_load_ss(x + j[4]);
    lo = _mm_insert_ps(lo, _mm_load_ss(x + j[1]), 0x10);
    hi = _mm_insert_ps(hi, _mm_load_ss(x + j[5]), 0x10);
    lo = _mm_insert_ps(lo, _mm_load_ss(x + j[2]), 0x20);
    hi = _mm_insert_ps(hi, _mm_load_ss(x + j[6]), 0x20);
    lo = _mm_insert_ps(lo, _mm_load_ss(x + j[3]), 0x30);
    hi = _mm_insert_ps(hi, _mm_load_ss(x + j[7]), 0x30);
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
#endif
  };
  if constexpr (lanes<V> == 8) {
    return reinterpret_cast<V>(gather8(i));
  } else {
#if defined(__AVX512F__)
    return reinterpret_cast<V>(_mm512_insertf32x8(_mm512_castps256_ps512(gather8(i)), gather8(i + 8), 1));
#else
    V v;
    const __m256 lo = gather8(i), hi = gather8(i + 8);
    __builtin_memcpy(&v, &lo, 32);
    __builtin_memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
    return v;
#endif
  }
#else
  V v;
  for (int l = 0; l < lanes<V>; ++l) v[l] = x[i[l]];
  return v;
#endif
}

// The 8 row sums of chunk c at batch 1 (x contiguous). One vector covers kVec / 8 consecutive
// SELL steps of the chunk; their 8-lane pieces are added at the end.
template <class Index>
inline vf8 chunk_dot(const SellView<Index>& w, int64_t c, const float* __restrict x) {
  constexpr int64_t kSteps = kVec / kSellLanes;  // SELL steps per vector
  const int64_t begin = w.chunk_ptr[c];
  const int64_t steps = (w.chunk_ptr[c + 1] - begin) / kSellLanes;
  const float* __restrict val = w.values + begin;
  const Index* __restrict idx = w.indices + begin;
  // Two accumulators: consecutive steps do not wait on each other's FMA.
  vf acc0 = splat(0.0f), acc1 = splat(0.0f);
  int64_t l = 0;
  for (; l + 2 * kSteps <= steps; l += 2 * kSteps) {
    acc0 += load(val + 8 * l) * gather<vf>(x, idx + 8 * l);
    acc1 += load(val + 8 * l + kVec) * gather<vf>(x, idx + 8 * l + kVec);
  }
  for (; l + kSteps <= steps; l += kSteps) acc0 += load(val + 8 * l) * gather<vf>(x, idx + 8 * l);
  vf8 sums = fold8(acc0 + acc1);
  if constexpr (kSteps > 1) {
    if (l < steps) sums += load<vf8>(val + 8 * l) * gather<vf8>(x, idx + 8 * l);  // one step left
  }
  return sums;
}

template <class Index>
void chunks_batch1(const SellView<Index>& w, const float* __restrict x, const LinearArgs& a,
                   int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    const vf8 sums = chunk_dot(w, c, x);
    for (int i = 0; i < kSellLanes; ++i) {
      const int32_t r = w.perm[c * kSellLanes + i];
      if (r < 0) continue;
      float v = sums[i] + (a.bias ? a.bias[r] : 0.0f);
      a.y[r] = (a.relu && v < 0.0f) ? 0.0f : v;
    }
  }
}

// Chunks [c0, c1) for the NV * kVec batch columns starting at b0, the entries of column panel p
// only, one row at a time. U independent accumulator sets over consecutive nonzeros hide the FMA
// latency when the tile is narrow (NV * U >= 4 chains in flight); they are summed once per row.
// xtile[n_cols, kVec * NV] is the packed tile; the sums go to yt[r * ldy + b0 ...]: the first
// panel starts them from the bias, later ones add to them, the last applies the ReLU.
template <int NV, int U, class Index>
void chunks_tile(const SellView<Index>& w, const float* __restrict xtile, float* __restrict yt,
                 int64_t ldy, const LinearArgs& a, int64_t b0, int64_t c0, int64_t c1, int64_t p) {
  constexpr int64_t ldt = NV * kVec;
  const float* __restrict xb = xtile;
  const int64_t n_starts = w.n_panels + 1;
  const bool first = p == 0, last = p == w.n_panels - 1;
  for (int64_t s = c0 * kSellLanes; s < c1 * kSellLanes; ++s) {
    const int32_t r = w.perm[s];
    if (r < 0) continue;
    const int64_t l0 = w.panel_start[s * n_starts + p];
    const int64_t l1 = w.panel_start[s * n_starts + p + 1];
    if (l0 == l1 && !first && !last) continue;  // adds nothing
    const int64_t base = w.chunk_ptr[s / kSellLanes] + s % kSellLanes;
    const float* __restrict val = w.values + base;
    const Index* __restrict idx = w.indices + base;
    vf acc[U][NV];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[u][v] = splat(0.0f);
    }
    int64_t l = l0;
    for (; l + U <= l1; l += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const vf wv = splat(val[(l + u) * kSellLanes]);
        const float* __restrict xr = xb + static_cast<int64_t>(idx[(l + u) * kSellLanes]) * ldt;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[u][v] += wv * load_aligned(xr + v * kVec);
      }
    }
    for (; l < l1; ++l) {
      const vf wv = splat(val[l * kSellLanes]);
      const float* __restrict xr = xb + static_cast<int64_t>(idx[l * kSellLanes]) * ldt;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[0][v] += wv * load_aligned(xr + v * kVec);
    }
    float* __restrict yrow = yt + static_cast<int64_t>(r) * ldy + b0;
    const vf bias = splat(first && a.bias ? a.bias[r] : 0.0f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      vf sum = acc[0][v] + (first ? bias : load(yrow + v * kVec));
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) sum += acc[u][v];
      acc[0][v] = last && a.relu ? relu_v(sum) : sum;
    }
    store_row_tile<NV>(acc[0], yrow);
  }
}

// A batch tile is at most 64 floats (8 vectors of 8, or 4 of 16) per output row in registers.
constexpr int kMaxTileVectors = static_cast<int>(64 / kVec);

// Chunks [c0, c1) for the whole batch: xt (tile-major, see pack_channel_major) in, yt[n_rows, ldx]
// out. Tile by tile, and within a tile panel by panel: the tile's panel of inputs (256 columns x
// 64 floats) is reused by every row, and each row's partial sums (64 floats) are read back once
// per panel.
template <class Index>
void chunks_batched(const SellView<Index>& w, const float* __restrict xt, float* __restrict yt,
                    int64_t ldx, const LinearArgs& a, int64_t c0, int64_t c1) {
  for (int64_t b0 = 0; b0 < ldx;) {
    const float* xtile = xt + w.n_cols * b0;
    const int nv = pick_tile_vectors(ldx - b0, kMaxTileVectors);
    for (int64_t p = 0; p < w.n_panels; ++p) {
      switch (nv) {
        case 8: chunks_tile<8, 1>(w, xtile, yt, ldx, a, b0, c0, c1, p); break;
        case 4: chunks_tile<4, 2>(w, xtile, yt, ldx, a, b0, c0, c1, p); break;
        case 2: chunks_tile<2, 4>(w, xtile, yt, ldx, a, b0, c0, c1, p); break;
        default: chunks_tile<1, 4>(w, xtile, yt, ldx, a, b0, c0, c1, p); break;
      }
    }
    b0 += nv * kVec;
  }
}

}  // namespace csr_detail

// bounds[threads + 1]: the chunk split from partition_rows_by_nnz (made by the dispatcher, so
// no std::vector code is compiled with this path's flags).
template <class Index>
void csr_linear(const SellView<Index>& w, const LinearArgs& a, const int64_t* bounds, int threads,
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
    for_each_part(threads, [&](int p) { chunks_batch1(w, x, a, bounds[p], bounds[p + 1]); });
    return;
  }

  const int64_t ldx = round_up(a.batch, kVec);
  float* xt = scratch.get((w.n_cols + w.n_rows) * ldx);
  float* yt = xt + w.n_cols * ldx;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    pack_channel_major(a.x, a.batch, a.x_stride_b, a.x_stride_k, w.n_cols, w.n_cols, ldx, kMaxTileVectors, xt);
    // (the omp for inside pack_channel_major ends with a barrier: xt is complete here)
    for_each_part(threads, [&](int p) { chunks_batched(w, xt, yt, ldx, a, bounds[p], bounds[p + 1]); });
    // A thread's chunks hold a permuted set of rows, so yt is complete only after all threads
    // finish; then the rows are unpacked in contiguous ranges (strided stores row by row would
    // thrash one L1 set).
#ifdef _OPENMP
#pragma omp barrier
#endif
    unpack_channel_major_parallel(yt, ldx, w.n_rows, a.batch, a.y, a.y_stride);
  }
}

}  // namespace SP_ISA_NS
}  // namespace sparseprune
