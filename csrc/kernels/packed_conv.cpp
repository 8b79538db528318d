#include "kernels/packed_conv.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <tuple>
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
      bias_(std::move(other.bias_)),
      pattern_mode_(other.pattern_mode_),
      block_ptr_(std::move(other.block_ptr_)),
      value_ptr_(std::move(other.value_ptr_)),
      block_channel_(std::move(other.block_channel_)),
      block_pattern_(std::move(other.block_pattern_)),
      pattern_size_(std::move(other.pattern_size_)),
      pattern_taps_(std::move(other.pattern_taps_)),
      pattern_values_(std::move(other.pattern_values_)) {}

PackedConv PackedConv::make(const ConvShape& s, const int64_t* row_ptr, int64_t n_ptr,
                            const int64_t* taps, int64_t n_taps, const float* values,
                            int64_t n_values, const float* bias, bool use_patterns) {
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
  // Each channel's entries by tap, i.e. input channel first, for the kernel's input-channel
  // panels (a file may list them in any order).
  p.taps_.resize(static_cast<size_t>(n_taps));
  p.values_.resize(static_cast<size_t>(n_taps));
  std::vector<int64_t> order;
  for (int64_t o = 0; o < s.out_channels; ++o) {
    order.resize(static_cast<size_t>(row_ptr[o + 1] - row_ptr[o]));
    std::iota(order.begin(), order.end(), row_ptr[o]);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return taps[a] < taps[b]; });
    for (int64_t j = row_ptr[o]; j < row_ptr[o + 1]; ++j) {
      const int64_t from = order[static_cast<size_t>(j - row_ptr[o])];
      p.taps_[j] = static_cast<int32_t>(taps[from]);
      p.values_[j] = values[from];
    }
  }
  if (bias) p.bias_.assign(bias, bias + s.out_channels);
  if (use_patterns) p.build_patterns();
  return p;
}

void PackedConv::build_patterns() {
  const ConvShape& s = shape_;
  const int64_t taps = static_cast<int64_t>(s.kernel_h) * s.kernel_w;
  if (taps > 64) fail("pattern mode needs kernels of at most 64 taps");
  const int64_t cin_g = s.in_channels / s.groups, cout_g = s.out_channels / s.groups;
  std::map<uint64_t, int32_t> pattern_id;
  block_ptr_.assign(1, 0);
  for (int64_t o = 0; o < s.out_channels; ++o) {
    // This channel's kernels: input channel -> (mask of taps, values by tap).
    std::map<int64_t, std::pair<uint64_t, std::vector<float>>> kernels;
    for (int64_t j = row_ptr_[o]; j < row_ptr_[o + 1]; ++j) {
      auto& k = kernels[taps_[j] / taps];
      if (k.second.empty()) k.second.assign(static_cast<size_t>(taps), 0.0f);
      k.first |= uint64_t{1} << (taps_[j] % taps);
      k.second[taps_[j] % taps] += values_[j];
    }
    std::vector<std::tuple<int32_t, int64_t, const std::vector<float>*>> blocks;  // (pattern, channel, values)
    for (auto& [ci, k] : kernels) {
      auto it = pattern_id.find(k.first);
      if (it == pattern_id.end()) {
        if (static_cast<int>(pattern_id.size()) >= kMaxPatterns)
          fail("more than " + std::to_string(kMaxPatterns) + " distinct kernel patterns: use the unstructured kernel");
        it = pattern_id.emplace(k.first, static_cast<int32_t>(pattern_id.size())).first;
        pattern_size_.push_back(0);
        pattern_taps_.resize(pattern_taps_.size() + static_cast<size_t>(taps), 0);
        const size_t base = static_cast<size_t>(it->second) * static_cast<size_t>(taps);
        for (int64_t t = 0; t < taps; ++t)
          if (k.first >> t & 1) pattern_taps_[base + static_cast<size_t>(pattern_size_.back()++)] = static_cast<int32_t>(t);
      }
      blocks.emplace_back(it->second, ci, &k.second);
    }
    std::sort(blocks.begin(), blocks.end(),
              [](const auto& a, const auto& b) { return std::make_pair(std::get<0>(a), std::get<1>(a)) <
                                                        std::make_pair(std::get<0>(b), std::get<1>(b)); });
    for (const auto& [pid, ci, vals] : blocks) {
      block_channel_.push_back(static_cast<int32_t>((o / cout_g) * cin_g + ci));
      block_pattern_.push_back(pid);
      value_ptr_.push_back(static_cast<int64_t>(pattern_values_.size()));
      for (int32_t k = 0; k < pattern_size_[pid]; ++k)
        pattern_values_.push_back((*vals)[pattern_taps_[static_cast<size_t>(pid) * taps + k]]);
    }
    block_ptr_.push_back(static_cast<int64_t>(block_channel_.size()));
  }
  pattern_mode_ = true;
}

PatternConvWeights PackedConv::pattern_view() const {
  PatternConvWeights w;
  w.block_ptr = block_ptr_.data();
  w.block_channel = block_channel_.data();
  w.block_pattern = block_pattern_.data();
  w.value_ptr = value_ptr_.data();
  w.values = pattern_values_.data();
  w.pattern_size = pattern_size_.data();
  w.pattern_taps = pattern_taps_.data();
  return w;
}

std::shared_ptr<const PatternOffsets> PackedConv::pattern_offsets_for(const ConvGeometry& g) const {
  const auto key = std::make_pair(g.in_h, g.in_w);
  std::lock_guard<std::mutex> lock(cache_mutex_);
  auto it = pattern_cache_.find(key);
  if (it != pattern_cache_.end()) return it->second;
  auto table = std::make_shared<const PatternOffsets>(pattern_offsets(shape_, g, pattern_view(), n_patterns()));
  if (pattern_cache_.size() >= 16) pattern_cache_.clear();
  pattern_cache_.emplace(key, table);
  return table;
}

std::shared_ptr<const ConvReadTable> PackedConv::read_table_for(const ConvGeometry& g) const {
  const auto key = std::make_pair(g.in_h, g.in_w);
  std::lock_guard<std::mutex> lock(cache_mutex_);
  auto it = read_table_cache_.find(key);
  if (it != read_table_cache_.end()) return it->second;
  const SparseConvWeights w{row_ptr_.data(), taps_.data(), values_.data()};
  auto table = std::make_shared<const ConvReadTable>(conv_read_table(shape_, g, w));
  if (read_table_cache_.size() >= 16) read_table_cache_.clear();  // bounded: inputs of many sizes
  read_table_cache_.emplace(key, table);
  return table;
}

void PackedConv::run(const ConvGeometry& g, ConvArgs args) const {
  args.bias = bias_.empty() ? nullptr : bias_.data();
  SparseConvWeights w{row_ptr_.data(), taps_.data(), values_.data()};
  if (pattern_mode_) {
    const auto off = pattern_offsets_for(g);
    const PatternConvWeights pw = pattern_view();
    sparse_conv2d(shape_, g, w, nullptr, args, &pw, off.get());
    return;
  }
  const auto table = read_table_for(g);
  w.n_panels = table->n_panels;
  w.panel_ptr = table->panel_ptr.data();
  sparse_conv2d(shape_, g, w, table->offsets.data(), args);
}

}  // namespace sparseprune
