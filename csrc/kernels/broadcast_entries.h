// The per-SIMD-path row kernels of broadcast.cpp (defined in broadcast_impl.h).
#pragma once

#include <cstdint>

#include "kernels/broadcast.h"
#include "kernels/isa_variants.h"

namespace sparseprune {

SP_DECLARE_ISA_VARIANTS(
    // dst[i] = a[i * sa] op b[i * sb] for i < n, with sa, sb in {0, 1} (0: one value for the row).
    void binary_row_entry(const float* a, int64_t sa, const float* b, int64_t sb, float* dst, int64_t n,
                          BinaryOp op);
    // Sum of src[0, n), in double over float lanes.
    double sum_row_entry(const float* src, int64_t n);
    // dst[j] = sum over r < rows of src[r * ld + j], for j < n.
    void sum_columns_entry(const float* src, int64_t rows, int64_t ld, int64_t n, float* dst);)

}  // namespace sparseprune
