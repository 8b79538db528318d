// Depthwise conv2d (groups == in_channels == out_channels) for the whole-model plan: one plane at
// a time, zero-padded once into scratch, then each kept tap of the channel's k x k kernel adds a
// scaled, shifted copy of the plane to the output rows (vectorised along the row). Pruned taps
// are skipped, so it serves dense and sparse depthwise layers alike; the general sparse kernel
// and the im2col GEMM both spend most of their time on overhead when each output reads <= k*k inputs.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/packed_conv.h"

namespace sparseprune {

class DepthwiseConv {
 public:
  // From a validated sparse weight; throws std::invalid_argument unless it is depthwise with
  // kernels of at most 64 taps.
  static std::shared_ptr<const DepthwiseConv> make(const PackedConv& packed);

  const ConvShape& shape() const { return shape_; }
  ConvGeometry geometry(int64_t in_h, int64_t in_w) const { return conv_geometry(shape_, in_h, in_w); }

  // x[batch, C, in_h, in_w], y[batch, C, out_h, out_w], contiguous.
  void run(const ConvGeometry& g, const float* x, int64_t batch, float* y, int n_threads) const;

 private:
  ConvShape shape_;
  std::vector<int64_t> tap_ptr_;  // channel c's kept taps: [tap_ptr_[c], tap_ptr_[c + 1])
  std::vector<int32_t> tap_;      // position dy * kernel_w + dx
  std::vector<float> value_;
  std::vector<float> bias_;
};

}  // namespace sparseprune
