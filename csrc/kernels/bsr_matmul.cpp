#include "kernels/bsr_matmul.h"

#include <vector>

#include "kernels/bsr_shapes.h"
#include "kernels/cpu_features.h"
#include "kernels/isa_variants.h"
#include "kernels/partition.h"
#include "kernels/scratch.h"

namespace sparseprune {

SP_DECLARE_ISA_VARIANTS(
    template <int R, int C, class Index>
    void bsr_linear(const BsrView<Index>& w, const LinearArgs& a, const int64_t* bounds,
                    int threads, ScratchBuffer& scratch);)

bool bsr_block_shape_supported(int block_rows, int block_cols) {
#define SP_MATCH(R, C) if (block_rows == R && block_cols == C) return true;
  SP_FOR_EACH_BSR_SHAPE(SP_MATCH)
#undef SP_MATCH
  return false;
}

template <class Index>
void bsr_linear(const BsrView<Index>& w, const LinearArgs& args) {
  if (args.batch <= 0 || w.n_rows <= 0) return;
  const int64_t n_block_rows = (w.n_rows + w.block_rows - 1) / w.block_rows;
  const double work = static_cast<double>(w.indptr[n_block_rows]) * w.block_rows * w.block_cols *
                      args.batch + w.n_rows;
  const int threads = threads_for_work(args.n_threads, work);
  const std::vector<int64_t> bounds = partition_rows_by_nnz(w.indptr, n_block_rows, threads);
  ScratchBuffer& scratch = thread_scratch();
#define SP_CALL(R, C)                                                                  \
  if (w.block_rows == R && w.block_cols == C) {                                        \
    SP_ISA_PICK(bsr_linear<R, C, Index>)(w, args, bounds.data(), threads, scratch);    \
    return;                                                                            \
  }
  SP_FOR_EACH_BSR_SHAPE(SP_CALL)
#undef SP_CALL
}

template void bsr_linear<uint16_t>(const BsrView<uint16_t>&, const LinearArgs&);
template void bsr_linear<int32_t>(const BsrView<int32_t>&, const LinearArgs&);

}  // namespace sparseprune
