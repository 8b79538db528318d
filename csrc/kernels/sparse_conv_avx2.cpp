// The sparse convolution compute body for the avx2 path (this file is built with -mavx2 -mfma).
#define SP_ISA_NS avx2
#include "kernels/sparse_conv_impl.h"

namespace sparseprune {
namespace avx2 {
void conv_task_entry(const SparseConvWeights& w, const int32_t* offsets, const float* xph,
                     const float* bias, bool relu, float* yt, int64_t grid_padded, int64_t p0,
                     int64_t width, int64_t o0, int64_t o1) {
  conv_task(w, offsets, xph, bias, relu, yt, grid_padded, p0, width, o0, o1);
}
void pattern_conv_task_entry(const PatternConvWeights& w, const PatternOffsets& off, int taps_per_kernel,
                             const float* xph, const float* bias, bool relu, float* yt, int64_t grid_padded,
                             int64_t p0, int64_t width, int64_t o0, int64_t o1) {
  pattern_conv_task(w, off, taps_per_kernel, xph, bias, relu, yt, grid_padded, p0, width, o0, o1);
}
}  // namespace avx2
}  // namespace sparseprune
