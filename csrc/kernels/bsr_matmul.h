// Block-sparse x dense linear layer, y = relu?(x W^T + b), for weights pruned in small blocks.
// The body is in bsr_matmul_impl.h; this entry point picks the SIMD path.
#pragma once

#include <cstdint>

#include "kernels/linear_args.h"

namespace sparseprune {

// Block shapes with compiled kernels (rows x cols).
bool bsr_block_shape_supported(int block_rows, int block_cols);

// Preconditions (checked once, when the weight is packed): a supported block shape, indptr
// monotone from 0 to n_blocks, every block-column index in [0, ceil(n_cols / C)).
template <class Index>
void bsr_linear(const BsrView<Index>& w, const LinearArgs& args);

}  // namespace sparseprune
