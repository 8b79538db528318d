// The vectorised elementwise bodies, compiled once per SIMD path (CMakeLists.txt: SP_ISA_NS and SP_VEC_WIDTH per path).
#include "kernels/tensor_ops_impl.h"
