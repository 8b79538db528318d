// The per-SIMD-path entry points defined at the end of tensor_ops_impl.h, declared once for the
// dispatchers (tensor_ops.cpp, depthwise_conv.cpp).
#pragma once

#include <cstdint>

#include "kernels/isa_variants.h"
#include "kernels/tensor_ops.h"

namespace sparseprune {

SP_DECLARE_ISA_VARIANTS(
    void activation_map_entry(const float* src, float* dst, int64_t n, float scale, float shift, Activation a);
    void softmax_row_entry(const float* src, float* dst, int64_t n_valid, int64_t len);
    void layernorm_row_entry(const float* src, float* dst, int64_t len, const float* gamma, const float* beta,
                             float eps);
    void pool_plane_entry(const float* src, float* dst, int64_t H, int64_t W, int64_t OH, int64_t OW, int kh,
                          int kw, int sh, int sw, int ph, int pw, bool is_max);
    void depthwise_plane_entry(const float* padded, int64_t padded_w, const int32_t* taps, const float* values,
                               int64_t n_taps, int kernel_w, int dil_h, int dil_w, int stride_h, int stride_w,
                               int64_t out_h, int64_t out_w, float bias, float* out);)

}  // namespace sparseprune
