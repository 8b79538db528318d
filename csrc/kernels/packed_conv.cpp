#include "kernels/packed_conv.h"

#include <stdexcept>
#include <string>

namespace sparseprune {

namespace {
[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }
}  // namespace

PackedConv::PackedConv(PackedConv&& other) noexcept
    : shape_(other.shape_),
      row_ptr_(std::move(other.row_ptr_)),
      taps_(std::move(other.taps_)),
      values_(std::move(other.values_)),
      bias_(std::move(other.bias_)) {}

PackedConv PackedConv::make(const ConvShape& s, const int64_t* row_ptr, int64_t n_ptr,
                            const int64_t* taps, int64_t n_taps, const float* values,
                            int64_t n_values, const float* bias) {
  if (s.in_channels < 1 || s.out_channels < 1) fail("in_channels and out_channels must be >= 1");
  if (s.kernel_h < 1 || s.kernel_w < 1) fail("kernel_size must be >= 1");
  if (s.stride_h < 1 || s.stride_w < 1) fail("stride must be >= 1");
  if (s.pad_h < 0 || s.pad_w < 0) fail("padding must be >= 0");
  if (s.dilation_h < 1 || s.dilation_w < 1) fail("dilation must be >= 1");
  if (s.groups < 1 || s.in_channels % s.groups || s.out_channels % s.groups)
    fail("groups must divide in_channels and out_channels");
  if (n_ptr != s.out_channels + 1)
    fail("row_ptr must have out_channels + 1 = " + std::to_string(s.out_channels + 1) + " entries");
  if (row_ptr[0] != 0) fail("row_ptr[0] must be 0");
  for (int64_t o = 0; o < s.out_channels; ++o)
    if (row_ptr[o + 1] < row_ptr[o]) fail("row_ptr must be non-decreasing");
  if (row_ptr[s.out_channels] != n_taps) fail("row_ptr[-1] must equal len(taps)");
  if (n_values != n_taps) fail("values must have as many entries as taps");
  const int64_t taps_per_out = (s.in_channels / s.groups) * s.kernel_h * s.kernel_w;
  for (int64_t j = 0; j < n_taps; ++j)
    if (taps[j] < 0 || taps[j] >= taps_per_out)
      fail("taps[" + std::to_string(j) + "] = " + std::to_string(taps[j]) + " is out of range [0, " +
           std::to_string(taps_per_out) + ")");
  PackedConv p;
  p.shape_ = s;
  p.row_ptr_.assign(row_ptr, row_ptr + n_ptr);
  p.taps_.assign(taps, taps + n_taps);
  p.values_.assign(values, values + n_values);
  if (bias) p.bias_.assign(bias, bias + s.out_channels);
  return p;
}

std::shared_ptr<const std::vector<int32_t>> PackedConv::offsets_for(const ConvGeometry& g) const {
  const auto key = std::make_pair(g.in_h, g.in_w);
  std::lock_guard<std::mutex> lock(cache_mutex_);
  auto it = offsets_cache_.find(key);
  if (it != offsets_cache_.end()) return it->second;
  SparseConvWeights w{row_ptr_.data(), taps_.data(), values_.data()};
  auto table = std::make_shared<const std::vector<int32_t>>(conv_offsets(shape_, g, w));
  if (offsets_cache_.size() >= 16) offsets_cache_.clear();  // bounded: inputs of many sizes
  offsets_cache_.emplace(key, table);
  return table;
}

void PackedConv::run(const ConvGeometry& g, ConvArgs args) const {
  const auto offsets = offsets_for(g);
  args.bias = bias_.empty() ? nullptr : bias_.data();
  SparseConvWeights w{row_ptr_.data(), taps_.data(), values_.data()};
  sparse_conv2d(shape_, g, w, offsets->data(), args);
}

}  // namespace sparseprune
