// The compute part of the direct sparse convolution (see sparse_conv.h), included once per SIMD
// path inside namespace sparseprune::SP_ISA_NS by sparse_conv_{generic,avx2,avx2_w16,avx512}.cpp.
//
//   xph[image_floats]: one repacked image; yt[out_channels, grid_padded]: its output on the grid
//   entry j of output channel o reads xph[offsets[j] + p] for grid pixel p
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/channel_major.h"
#include "kernels/simd.h"
#include "kernels/sparse_conv.h"

namespace sparseprune {
namespace SP_ISA_NS {

namespace conv_detail {

// At most 8 accumulator vectors per output channel: 64 pixels on 8 lanes (AVX2 has 16 registers),
// 128 on 16 lanes (fewer weight and offset loads per FMA: 5-10% on ResNet-18 layers, Zen 4).
constexpr int kMaxTileVectors = 8;

// Output channels [o0, o1) for grid pixels [p0, p0 + NV * lanes<V>), panel by panel (see
// SparseConvWeights): the first panel starts each channel's sums from its bias, later ones add to
// what yt holds, the last applies the ReLU.
template <class V, int NV, int U>
void channels_tile(const SparseConvWeights& w, const int32_t* __restrict offsets,
                   const float* __restrict xph, const float* __restrict bias, bool relu,
                   float* __restrict yt, int64_t grid_padded, int64_t p0, int64_t o0, int64_t o1) {
  const float* __restrict xb = xph + p0;
  const int64_t n_starts = w.n_panels + 1;
  for (int64_t q = 0; q < w.n_panels; ++q) {
    const bool first = q == 0, last = q == w.n_panels - 1;
    for (int64_t o = o0; o < o1; ++o) {
      int64_t j = w.panel_ptr[o * n_starts + q];
      const int64_t end = w.panel_ptr[o * n_starts + q + 1];
      if (j == end && !first && !last) continue;  // adds nothing
      V acc[U][NV];
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[u][v] = splat<V>(0.0f);
      }
      for (; j + U <= end; j += U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          const V wv = splat<V>(w.values[j + u]);
          const float* __restrict xr = xb + offsets[j + u];
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[u][v] += wv * load<V>(xr + v * lanes<V>);
        }
      }
      for (; j < end; ++j) {
        const V wv = splat<V>(w.values[j]);
        const float* __restrict xr = xb + offsets[j];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[0][v] += wv * load<V>(xr + v * lanes<V>);
      }
      float* __restrict out = yt + o * grid_padded + p0;
      const V init = splat<V>(first && bias ? bias[o] : 0.0f);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        V sum = acc[0][v] + (first ? init : load<V>(out + v * lanes<V>));
#pragma GCC unroll 8
        for (int u = 1; u < U; ++u) sum += acc[u][v];
        acc[0][v] = last && relu ? relu_v(sum) : sum;
      }
      store_row_tile<NV>(acc[0], out);
    }
  }
}

template <class V, int K, int NV>
inline void pattern_run(const PatternConvWeights& w, const int32_t* __restrict rel, int64_t channel_stride,
                        const float* __restrict xb, int64_t b0, int64_t b1, V (&acc)[NV]) {
  int64_t r[K];  // this pattern's tap offsets, in registers for the whole run
#pragma GCC unroll 9
  for (int k = 0; k < K; ++k) r[k] = rel[k];
  // Accumulate in locals: through the reference the compiler would store them after every FMA.
  V a[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) a[v] = acc[v];
  for (int64_t b = b0; b < b1; ++b) {
    const float* __restrict base = xb + w.block_channel[b] * channel_stride;
    const float* __restrict wv = w.values + w.value_ptr[b];
#pragma GCC unroll 9
    for (int k = 0; k < K; ++k) {
      const V weight = splat<V>(wv[k]);
      const float* __restrict xk = base + r[k];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) a[v] += weight * load<V>(xk + v * lanes<V>);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = a[v];
}

template <class V, int NV>
inline void pattern_run_any(const PatternConvWeights& w, const int32_t* __restrict rel, int k_taps,
                            int64_t channel_stride, const float* __restrict xb, int64_t b0, int64_t b1,
                            V (&acc)[NV]) {
  switch (k_taps) {
    case 1: pattern_run<V, 1>(w, rel, channel_stride, xb, b0, b1, acc); return;
    case 2: pattern_run<V, 2>(w, rel, channel_stride, xb, b0, b1, acc); return;
    case 3: pattern_run<V, 3>(w, rel, channel_stride, xb, b0, b1, acc); return;
    case 4: pattern_run<V, 4>(w, rel, channel_stride, xb, b0, b1, acc); return;
    case 5: pattern_run<V, 5>(w, rel, channel_stride, xb, b0, b1, acc); return;
    case 6: pattern_run<V, 6>(w, rel, channel_stride, xb, b0, b1, acc); return;
    case 7: pattern_run<V, 7>(w, rel, channel_stride, xb, b0, b1, acc); return;
    case 8: pattern_run<V, 8>(w, rel, channel_stride, xb, b0, b1, acc); return;
    case 9: pattern_run<V, 9>(w, rel, channel_stride, xb, b0, b1, acc); return;
    default:
      for (int64_t b = b0; b < b1; ++b) {
        const float* __restrict base = xb + w.block_channel[b] * channel_stride;
        const float* __restrict wv = w.values + w.value_ptr[b];
        for (int k = 0; k < k_taps; ++k) {
          const V weight = splat<V>(wv[k]);
          for (int v = 0; v < NV; ++v) acc[v] += weight * load<V>(base + rel[k] + v * lanes<V>);
        }
      }
  }
}

template <class V, int NV>
void pattern_channels_tile(const PatternConvWeights& w, const PatternOffsets& off, int taps_per_kernel,
                           const float* __restrict xph, const float* __restrict bias, bool relu,
                           float* __restrict yt, int64_t grid_padded, int64_t p0, int64_t o0, int64_t o1) {
  const float* __restrict xb = xph + p0;
  for (int64_t o = o0; o < o1; ++o) {
    V acc[NV];
    const V init = splat<V>(bias ? bias[o] : 0.0f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = init;
    const int64_t end = w.block_ptr[o + 1];
    for (int64_t b = w.block_ptr[o]; b < end;) {
      const int32_t p = w.block_pattern[b];
      int64_t run_end = b + 1;
      while (run_end < end && w.block_pattern[run_end] == p) ++run_end;
      pattern_run_any<V, NV>(w, off.rel.data() + static_cast<int64_t>(p) * taps_per_kernel, w.pattern_size[p],
                          off.channel_stride, xb, b, run_end, acc);
      b = run_end;
    }
    if (relu) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = relu_v(acc[v]);
    }
    store_row_tile<NV>(acc, yt + o * grid_padded + p0);
  }
}

}  // namespace conv_detail

inline void pattern_conv_task(const PatternConvWeights& w, const PatternOffsets& off, int taps_per_kernel,
                              const float* xph, const float* bias, bool relu, float* yt, int64_t grid_padded,
                              int64_t p0, int64_t width, int64_t o0, int64_t o1) {
  using namespace conv_detail;
  for (int64_t p = p0; p < p0 + width;) {
    if (kVec > 8 && p0 + width - p < kVec) {  // the grid is whole 8-float vectors only
      pattern_channels_tile<vf8, 1>(w, off, taps_per_kernel, xph, bias, relu, yt, grid_padded, p, o0, o1);
      p += 8;
      continue;
    }
    const int nv = pick_tile_vectors(p0 + width - p, kMaxTileVectors);
    switch (nv) {
      case 8: pattern_channels_tile<vf, 8>(w, off, taps_per_kernel, xph, bias, relu, yt, grid_padded, p, o0, o1); break;
      case 4: pattern_channels_tile<vf, 4>(w, off, taps_per_kernel, xph, bias, relu, yt, grid_padded, p, o0, o1); break;
      case 2: pattern_channels_tile<vf, 2>(w, off, taps_per_kernel, xph, bias, relu, yt, grid_padded, p, o0, o1); break;
      default: pattern_channels_tile<vf, 1>(w, off, taps_per_kernel, xph, bias, relu, yt, grid_padded, p, o0, o1); break;
    }
    p += nv * kVec;
  }
}

// One task: grid pixels [p0, p0 + width) (width a multiple of 8, at most 64) for output channels
// [o0, o1) of one image. A 16-lane path runs a last 8 pixels as one 8-lane vector.
inline void conv_task(const SparseConvWeights& w, const int32_t* offsets, const float* xph,
                      const float* bias, bool relu, float* yt, int64_t grid_padded, int64_t p0,
                      int64_t width, int64_t o0, int64_t o1) {
  using namespace conv_detail;
  for (int64_t p = p0; p < p0 + width;) {
    if (kVec > 8 && p0 + width - p < kVec) {
      channels_tile<vf8, 1, 4>(w, offsets, xph, bias, relu, yt, grid_padded, p, o0, o1);
      p += 8;
      continue;
    }
    const int nv = pick_tile_vectors(p0 + width - p, kMaxTileVectors);
    switch (nv) {
      case 8: channels_tile<vf, 8, 1>(w, offsets, xph, bias, relu, yt, grid_padded, p, o0, o1); break;
      case 4: channels_tile<vf, 4, 2>(w, offsets, xph, bias, relu, yt, grid_padded, p, o0, o1); break;
      case 2: channels_tile<vf, 2, 4>(w, offsets, xph, bias, relu, yt, grid_padded, p, o0, o1); break;
      default: channels_tile<vf, 1, 4>(w, offsets, xph, bias, relu, yt, grid_padded, p, o0, o1); break;
    }
    p += nv * kVec;
  }
}

}  // namespace SP_ISA_NS
}  // namespace sparseprune
