// The CSR kernel body compiled for the avx2 path (this file is built with -mavx2 -mfma).
#define SP_ISA_NS avx2
#include "kernels/csr_matmul_impl.h"

namespace sparseprune {
namespace avx2 {
template void csr_linear<uint16_t>(const SellView<uint16_t>&, const LinearArgs&, const int64_t*, int,
                                        ScratchBuffer&);
template void csr_linear<int32_t>(const SellView<int32_t>&, const LinearArgs&, const int64_t*, int,
                                        ScratchBuffer&);
}  // namespace avx2
}  // namespace sparseprune
