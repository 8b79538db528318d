// The vectorised elementwise bodies for the generic path.
#define SP_ISA_NS generic
#include "kernels/tensor_ops_impl.h"

namespace sparseprune {
namespace generic {
void activation_map_entry(const float* src, float* dst, int64_t n, float scale, float shift, Activation a) {
  activation_map_body(src, dst, n, scale, shift, a);
}
void softmax_row_entry(const float* src, float* dst, int64_t n_valid, int64_t len) {
  softmax_row_body(src, dst, n_valid, len);
}
void layernorm_row_entry(const float* src, float* dst, int64_t len, const float* gamma, const float* beta, float eps) {
  layernorm_row_body(src, dst, len, gamma, beta, eps);
}
}  // namespace generic
}  // namespace sparseprune
