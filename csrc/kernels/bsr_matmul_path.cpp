// The block-sparse kernel body, compiled once per SIMD path (CMakeLists.txt: SP_ISA_NS and SP_VEC_WIDTH per path).
#include "kernels/bsr_matmul_impl.h"
#include "kernels/bsr_shapes.h"

namespace sparseprune {
namespace SP_ISA_NS {
#define SP_INSTANTIATE(R, C)                                                                    \
  template void bsr_linear<R, C, uint16_t>(const BsrView<uint16_t>&, const LinearArgs&,         \
                                           const int64_t*, int, ScratchBuffer&);                \
  template void bsr_linear<R, C, int32_t>(const BsrView<int32_t>&, const LinearArgs&,           \
                                          const int64_t*, int, ScratchBuffer&);
SP_FOR_EACH_BSR_SHAPE(SP_INSTANTIATE)
#undef SP_INSTANTIATE
}  // namespace SP_ISA_NS
}  // namespace sparseprune
