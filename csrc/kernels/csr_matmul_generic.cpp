// The CSR kernel body compiled for the generic path.
#define SP_ISA_NS generic
#include "kernels/csr_matmul_impl.h"

namespace sparseprune {
namespace generic {
template void csr_linear<uint16_t>(const SellView<uint16_t>&, const LinearArgs&, const int64_t*, int,
                                        ScratchBuffer&);
template void csr_linear<int32_t>(const SellView<int32_t>&, const LinearArgs&, const int64_t*, int,
                                        ScratchBuffer&);
}  // namespace generic
}  // namespace sparseprune
