#include "kernels/depthwise_conv.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "kernels/cpu_features.h"
#include "kernels/partition.h"
#include "kernels/tensor_ops_entries.h"

namespace sparseprune {

std::shared_ptr<const DepthwiseConv> DepthwiseConv::make(const PackedConv& packed) {
  const ConvShape& s = packed.shape();
  if (!(s.groups == s.in_channels && s.in_channels == s.out_channels))
    throw std::invalid_argument("depthwise conv needs groups == in_channels == out_channels");
  if (static_cast<int64_t>(s.kernel_h) * s.kernel_w > 64)
    throw std::invalid_argument("depthwise conv needs kernels of at most 64 taps");
  auto d = std::make_shared<DepthwiseConv>();
  d->shape_ = s;
  d->tap_ptr_ = packed.row_ptr();  // one input channel per group: a tap is the kernel position
  const std::vector<int64_t> taps = packed.taps();
  d->tap_.assign(taps.begin(), taps.end());
  d->value_ = packed.values();
  d->bias_ = packed.bias();
  return d;
}

void DepthwiseConv::run(const ConvGeometry& g, const float* x, int64_t batch, float* y, int n_threads) const {
  const ConvShape& s = shape_;
  const int64_t planes = batch * s.out_channels;
  if (planes <= 0) return;
  const int64_t ph = g.in_h + 2 * s.pad_h, pw = g.in_w + 2 * s.pad_w;
  const int64_t work = static_cast<int64_t>(tap_.size()) * batch * g.out_h * g.out_w;
  const int threads = static_cast<int>(std::min<int64_t>(threads_for_work(n_threads, static_cast<double>(work)), planes));
  auto plane_fn = SP_ISA_PICK(depthwise_plane_entry);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> padded(static_cast<size_t>(ph * pw), 0.0f);  // per thread; the border stays zero
#pragma omp for schedule(static)
    for (int64_t p = 0; p < planes; ++p) {
      const int64_t c = p % s.out_channels;
      const float* src = x + p * g.in_h * g.in_w;
      for (int64_t r = 0; r < g.in_h; ++r)
        std::memcpy(padded.data() + (r + s.pad_h) * pw + s.pad_w, src + r * g.in_w, static_cast<size_t>(g.in_w) * sizeof(float));
      plane_fn(padded.data(), pw, tap_.data() + tap_ptr_[c], value_.data() + tap_ptr_[c], tap_ptr_[c + 1] - tap_ptr_[c],
               s.kernel_w, s.dilation_h, s.dilation_w, s.stride_h, s.stride_w, g.out_h, g.out_w,
               bias_.empty() ? 0.0f : bias_[c], y + p * g.out_h * g.out_w);
    }
  }
}

}  // namespace sparseprune
