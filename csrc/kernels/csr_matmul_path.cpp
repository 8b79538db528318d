// The CSR kernel body, compiled once per SIMD path (CMakeLists.txt: SP_ISA_NS and SP_VEC_WIDTH per path).
#include "kernels/csr_matmul_impl.h"

namespace sparseprune {
namespace SP_ISA_NS {
template void csr_linear<uint16_t>(const SellView<uint16_t>&, const LinearArgs&, const int64_t*, int,
                                        ScratchBuffer&);
template void csr_linear<int32_t>(const SellView<int32_t>&, const LinearArgs&, const int64_t*, int,
                                        ScratchBuffer&);
}  // namespace SP_ISA_NS
}  // namespace sparseprune
