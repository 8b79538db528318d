// The vectorised elementwise bodies for the avx2 path (this file is built with -mavx2 -mfma).
#define SP_ISA_NS avx2
#include "kernels/tensor_ops_impl.h"
