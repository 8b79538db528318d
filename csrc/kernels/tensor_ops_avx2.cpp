// The vectorised elementwise bodies for the avx2 path (this file is built with -mavx2 -mfma).
#define SP_ISA_NS avx2
#include "kernels/tensor_ops_impl.h"

namespace sparseprune {
namespace avx2 {
void activation_map_entry(const float* src, float* dst, int64_t n, float scale, float shift, Activation a) {
  activation_map_body(src, dst, n, scale, shift, a);
}
void softmax_row_entry(const float* src, float* dst, int64_t n_valid, int64_t len) {
  softmax_row_body(src, dst, n_valid, len);
}
void layernorm_row_entry(const float* src, float* dst, int64_t len, const float* gamma, const float* beta, float eps) {
  layernorm_row_body(src, dst, len, gamma, beta, eps);
}
}  // namespace avx2
}  // namespace sparseprune
