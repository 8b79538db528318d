// An owned, validated sparse convolution weight: packed once at conversion, run many times.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "kernels/sparse_conv.h"

namespace sparseprune {

class PackedConv {
 public:
  // row_ptr[out_channels + 1], taps[nnz] (tap = (i * kh + dy) * kw + dx, i within the group),
  // values[nnz], bias[out_channels] or null. Throws std::invalid_argument naming the argument.
  // use_patterns: also group the weight by kernel pattern (see PatternConvWeights) and run the
  // pattern kernel; throws std::invalid_argument when it has more than kMaxPatterns patterns.
  static PackedConv make(const ConvShape& shape, const int64_t* row_ptr, int64_t n_ptr,
                         const int64_t* taps, int64_t n_taps, const float* values, int64_t n_values,
                         const float* bias, bool use_patterns = false);

  static constexpr int kMaxPatterns = 64;
  bool pattern_mode() const { return pattern_mode_; }
  int64_t n_patterns() const { return static_cast<int64_t>(pattern_size_.size()); }

  // Geometry for an input size (throws std::invalid_argument if the input is too small).
  ConvGeometry geometry(int64_t in_h, int64_t in_w) const { return conv_geometry(shape_, in_h, in_w); }

  // args.x holds `batch` images of in_h x in_w; args.y has room for the output.
  void run(const ConvGeometry& g, ConvArgs args) const;

  const ConvShape& shape() const { return shape_; }
  const std::vector<int64_t>& row_ptr() const { return row_ptr_; }
  std::vector<int64_t> taps() const { return std::vector<int64_t>(taps_.begin(), taps_.end()); }
  const std::vector<float>& values() const { return values_; }
  const std::vector<float>& bias() const { return bias_; }

 private:
  // Read offsets depend on the input size; built on first use of a size and kept (shared,
  // immutable), so concurrent calls never see a half-built table.
  std::shared_ptr<const ConvReadTable> read_table_for(const ConvGeometry& g) const;
  std::shared_ptr<const PatternOffsets> pattern_offsets_for(const ConvGeometry& g) const;
  void build_patterns();
  PatternConvWeights pattern_view() const;

  ConvShape shape_;
  std::vector<int64_t> row_ptr_;
  std::vector<int32_t> taps_;  // sorted within each output channel (see SparseConvWeights)
  std::vector<float> values_;
  std::vector<float> bias_;
  // Pattern mode (optional): the same weight grouped by kernel pattern.
  bool pattern_mode_ = false;
  std::vector<int64_t> block_ptr_, value_ptr_;
  std::vector<int32_t> block_channel_, block_pattern_, pattern_size_, pattern_taps_;
  std::vector<float> pattern_values_;
  mutable std::mutex cache_mutex_;
  mutable std::map<std::pair<int64_t, int64_t>, std::shared_ptr<const PatternOffsets>> pattern_cache_;
  mutable std::map<std::pair<int64_t, int64_t>, std::shared_ptr<const ConvReadTable>> read_table_cache_;

 public:
  PackedConv() = default;
  PackedConv(PackedConv&& other) noexcept;
};

}  // namespace sparseprune
