// Direct sparse 2-D convolution (no im2col), for any kernel size, stride, padding, dilation and
// groups. Each image is repacked once: zero-padded and split into its stride phases, so that
// every nonzero weight (o, i, dy, dx) reads a *contiguous* run of the repacked input at a
// constant offset. The output is computed on a grid as wide as one phase row (a few columns
// wider than the output, cropped at the end), which turns the convolution into a sparse x dense
// product whose "columns" are those offsets, vectorised along output pixels (XNNPACK's
// channel-major sparse layout; a 1x1 convolution is exactly the CSR matmul on NCHW data).
#pragma once

#include <cstdint>
#include <vector>

namespace sparseprune {

struct ConvShape {
  int64_t in_channels = 0, out_channels = 0;
  int kernel_h = 1, kernel_w = 1;
  int stride_h = 1, stride_w = 1;
  int pad_h = 0, pad_w = 0;
  int dilation_h = 1, dilation_w = 1;
  int groups = 1;
};

// Where things are for one input size (in_h x in_w); all derived from ConvShape.
struct ConvGeometry {
  int64_t in_h = 0, in_w = 0;
  int64_t out_h = 0, out_w = 0;
  int64_t phase_h = 0, phase_w = 0;  // one stride phase of the padded input
  int64_t plane = 0;                 // phase_h * phase_w
  int64_t grid = 0;                  // out_h * phase_w: output pixels computed per channel
  int64_t grid_padded = 0;           // grid rounded up to whole vectors
  int64_t image_floats = 0;          // repacked input of one image, incl. zero tail
};

// Throws std::invalid_argument when the input is too small for the kernel.
ConvGeometry conv_geometry(const ConvShape& s, int64_t in_h, int64_t in_w);

// Sparse weight: per output channel o, entries [row_ptr[o], row_ptr[o+1]) with
// tap[j] = ((i * kernel_h) + dy) * kernel_w + dx, i the input channel *within o's group*.
// Each channel's entries are sorted by tap, i.e. by input channel (PackedConv::make sorts them),
// and cut into panels of input channels: panel q of channel o is entries [panel_ptr[o * (n_panels
// + 1) + q], ... + q + 1). The kernel runs panel by panel, so the input rows one pixel tile reads
// from a panel's channels stay in L1 while every output channel uses them (conv_read_table sizes
// the panels for the input size).
struct SparseConvWeights {
  const int64_t* row_ptr = nullptr;  // [out_channels + 1]
  const int32_t* tap = nullptr;      // [nnz]
  const float* values = nullptr;     // [nnz]
  int64_t n_panels = 1;
  const int64_t* panel_ptr = nullptr;  // [out_channels * (n_panels + 1)]
};

// The same weight grouped by kernel pattern ("pattern mode"): every non-empty k x k kernel (o, i)
// is a block whose nonzero positions form one of a few patterns. Per output channel o, blocks
// [block_ptr[o], block_ptr[o+1]) are sorted by pattern, so a run of same-pattern blocks executes
// one loop specialised for that pattern's tap count, with the tap offsets held in registers and
// one index read per kernel instead of one per weight.
struct PatternConvWeights {
  const int64_t* block_ptr = nullptr;      // [out_channels + 1]
  const int32_t* block_channel = nullptr;  // [n_blocks]: global input channel
  const int32_t* block_pattern = nullptr;  // [n_blocks]
  const int64_t* value_ptr = nullptr;      // [n_blocks]: values of block b start here
  const float* values = nullptr;           // values in pattern tap order
  const int32_t* pattern_size = nullptr;   // [n_patterns]: taps of each pattern
  const int32_t* pattern_taps = nullptr;   // [n_patterns * kernel_h * kernel_w]: tap indices
};

// Geometry-dependent read offsets of pattern mode: rel[p * taps_per_kernel + k] for tap k of
// pattern p, and the distance between input channels in the repacked image.
struct PatternOffsets {
  std::vector<int32_t> rel;
  int64_t channel_stride = 0;
};
PatternOffsets pattern_offsets(const ConvShape& s, const ConvGeometry& g, const PatternConvWeights& w,
                               int64_t n_patterns);

// offsets[j]: where entry j reads in the repacked image, relative to the output pixel.
// What the sparse kernel reads for one input size: offsets[j], where entry j reads the repacked
// image, and the input-channel panels (see SparseConvWeights), as many channels per panel as
// keep one tile's reads within kConvPanelBytes.
struct ConvReadTable {
  std::vector<int32_t> offsets;    // [nnz]
  int64_t n_panels = 1;
  std::vector<int64_t> panel_ptr;  // [out_channels * (n_panels + 1)]
};
// In L2, not L1: each panel re-reads and re-writes the tile's sums, which cost more than reading
// the input from L2 when panels are thin. Measured on Zen 4, 1 thread, 90% sparse ResNet-50
// layers: 16 KiB -> 64 KiB made the 7x7 and 14x14 layers 1.3-1.8x faster (512->2048 1x1 at 7x7:
// 0.86 -> 0.48 ms) and left 64@56x56 3x3 as it was; 128 and 512 KiB were no better.
constexpr int64_t kConvPanelBytes = 64 * 1024;
ConvReadTable conv_read_table(const ConvShape& s, const ConvGeometry& g, const SparseConvWeights& w);

struct ConvArgs {
  const float* x = nullptr;   // x[batch, in_channels, in_h, in_w] through element strides
  int64_t batch = 0;
  int64_t x_stride[4] = {0, 0, 0, 0};
  const float* bias = nullptr;  // [out_channels] or null
  bool relu = false;            // applied last, after the residual
  // residual[batch, out_channels, out_h, out_w] (contiguous, not overlapping y) or null: added to
  // the output, as a ResNet block's shortcut is, before the ReLU.
  const float* residual = nullptr;
  float* y = nullptr;         // y[batch, out_channels, out_h, out_w], contiguous
  int n_threads = 1;
};

// Preconditions (checked when the weight was packed / the call was bound): offsets made by
// conv_read_table's offsets for this geometry, taps within the kernel and group.
// pattern: null for the unstructured kernel, else pattern mode with its offsets.
void sparse_conv2d(const ConvShape& s, const ConvGeometry& g, const SparseConvWeights& w,
                   const int32_t* offsets, const ConvArgs& args,
                   const PatternConvWeights* pattern = nullptr, const PatternOffsets* pattern_off = nullptr);

}  // namespace sparseprune
