// The sparse convolution compute body, compiled once per SIMD path (CMakeLists.txt: SP_ISA_NS and SP_VEC_WIDTH per path).
#include "kernels/sparse_conv_impl.h"

namespace sparseprune {
namespace SP_ISA_NS {
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
}  // namespace SP_ISA_NS
}  // namespace sparseprune
