// Dense conv2d for the whole-model plan: im2col one 16-pixel panel at a time, straight into the
// GEMM kernel's packed-B layout, then W x panel. For layers pruned too little for the sparse
// kernel to pay (compile times both and keeps the faster).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/packed_conv.h"
#include "kernels/sparse_conv.h"

namespace sparseprune {

class DenseConv {
 public:
  // weight[out_channels, in_channels / groups, kernel_h, kernel_w], bias[out_channels] or null.
  // Throws std::invalid_argument for a shape conv_geometry would refuse.
  static std::shared_ptr<const DenseConv> make(const ConvShape& shape, const float* weight, const float* bias);
  // The same filters from a validated sparse weight, for an op's dense switch.
  static std::shared_ptr<const DenseConv> from_sparse(const PackedConv& sparse);

  const ConvShape& shape() const { return shape_; }
  ConvGeometry geometry(int64_t in_h, int64_t in_w) const { return conv_geometry(shape_, in_h, in_w); }

  // x[batch, in_channels, in_h, in_w] and y[batch, out_channels, out_h, out_w], both contiguous.
  void run(const ConvGeometry& g, const float* x, int64_t batch, float* y, int n_threads) const;

 private:
  ConvShape shape_;
  std::vector<float> weight_;  // out_channels rows of in_channels / groups * kernel_h * kernel_w
  std::vector<float> bias_;
};

}  // namespace sparseprune
