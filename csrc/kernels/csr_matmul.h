// CSR sparse x dense linear layer, y = relu?(x W^T + b): the entry point that picks the SIMD
// path for this CPU. The body is in csr_matmul_impl.h.
#pragma once

#include <cstdint>

#include "kernels/linear_args.h"

namespace sparseprune {

// Index is uint16_t (n_cols <= 65536: half the index bytes, which is most of what batch 1
// reads) or int32_t. Preconditions (established once, when the weight is packed): chunk_ptr
// monotone from 0 in steps of 8 * (longest row of the chunk), perm a permutation of the rows
// (-1 past n_rows), every index in [0, n_cols), and x/y sized as in LinearArgs.
template <class Index>
void csr_linear(const SellView<Index>& w, const LinearArgs& args);

}  // namespace sparseprune
