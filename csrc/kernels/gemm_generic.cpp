// The GEMM body for the generic path.
#define SP_ISA_NS generic
#include "kernels/gemm_impl.h"
