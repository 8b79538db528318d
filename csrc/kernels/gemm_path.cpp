// The GEMM body, compiled once per SIMD path (CMakeLists.txt: SP_ISA_NS and SP_VEC_WIDTH per path).
#include "kernels/gemm_impl.h"
