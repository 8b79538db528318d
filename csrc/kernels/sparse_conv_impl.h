// The compute part of the direct sparse convolution (see sparse_conv.h), included once per SIMD
// path inside namespace sparseprune::SP_ISA_NS by sparse_conv_generic.cpp / sparse_conv_avx2.cpp.
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

// Output channels [o0, o1) for grid pixels [p0, p0 + 8 * NV).
template <int NV, int U>
void channels_tile(const SparseConvWeights& w, const int32_t* __restrict offsets,
                   const float* __restrict xph, const float* __restrict bias, bool relu,
                   float* __restrict yt, int64_t grid_padded, int64_t p0, int64_t o0, int64_t o1) {
  const float* __restrict xb = xph + p0;
  for (int64_t o = o0; o < o1; ++o) {
    vf8 acc[U][NV];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[u][v] = splat8(0.0f);
    }
    int64_t j = w.row_ptr[o];
    const int64_t end = w.row_ptr[o + 1];
    for (; j + U <= end; j += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const vf8 wv = splat8(w.values[j + u]);
        const float* __restrict xr = xb + offsets[j + u];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[u][v] += wv * load8(xr + v * kVec);
      }
    }
    for (; j < end; ++j) {
      const vf8 wv = splat8(w.values[j]);
      const float* __restrict xr = xb + offsets[j];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[0][v] += wv * load8(xr + v * kVec);
    }
    const vf8 init = splat8(bias ? bias[o] : 0.0f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      vf8 sum = acc[0][v] + init;
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) sum += acc[u][v];
      acc[0][v] = relu ? relu8(sum) : sum;
    }
    store_row_tile<NV>(acc[0], yt + o * grid_padded + p0);
  }
}

}  // namespace conv_detail

// One task: grid pixels [p0, p0 + width) (width a multiple of 8, at most 64) for output channels
// [o0, o1) of one image.
inline void conv_task(const SparseConvWeights& w, const int32_t* offsets, const float* xph,
                      const float* bias, bool relu, float* yt, int64_t grid_padded, int64_t p0,
                      int64_t width, int64_t o0, int64_t o1) {
  using namespace conv_detail;
  for (int64_t p = p0; p < p0 + width;) {
    const int nv = pick_tile_vectors(p0 + width - p, 8);
    switch (nv) {
      case 8: channels_tile<8, 1>(w, offsets, xph, bias, relu, yt, grid_padded, p, o0, o1); break;
      case 4: channels_tile<4, 2>(w, offsets, xph, bias, relu, yt, grid_padded, p, o0, o1); break;
      case 2: channels_tile<2, 4>(w, offsets, xph, bias, relu, yt, grid_padded, p, o0, o1); break;
      default: channels_tile<1, 4>(w, offsets, xph, bias, relu, yt, grid_padded, p, o0, o1); break;
    }
    p += nv * kVec;
  }
}

}  // namespace SP_ISA_NS
}  // namespace sparseprune
