#include "kernels/csr_matmul.h"

#include "kernels/cpu_features.h"
#include "kernels/isa_variants.h"
#include "kernels/partition.h"
#include "kernels/scratch.h"

namespace sparseprune {

SP_DECLARE_ISA_VARIANTS(
    template <class Index>
    void csr_linear(const SellView<Index>& w, const LinearArgs& a, const int64_t* bounds,
                    int threads, ScratchBuffer& scratch);)

template <class Index>
void csr_linear(const SellView<Index>& w, const LinearArgs& args) {
  if (args.batch <= 0 || w.n_rows <= 0) return;
  const double work = static_cast<double>(w.chunk_ptr[w.n_chunks]) * args.batch + w.n_rows;
  const int threads = threads_for_work(args.n_threads, work);
  const std::vector<int64_t> bounds = partition_rows_by_nnz(w.chunk_ptr, w.n_chunks, threads);
  // Scratch for the channel-major copy of x belongs to the calling thread: concurrent calls
  // from several threads never share it, and repeated calls do not reallocate.
  ScratchBuffer& scratch = thread_scratch();
  SP_ISA_PICK(csr_linear<Index>)(w, args, bounds.data(), threads, scratch);
}

template void csr_linear<uint16_t>(const SellView<uint16_t>&, const LinearArgs&);
template void csr_linear<int32_t>(const SellView<int32_t>&, const LinearArgs&);

}  // namespace sparseprune
