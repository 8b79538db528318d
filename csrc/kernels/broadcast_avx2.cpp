// The broadcast row kernels for the avx2 path (this file is built with -mavx2 -mfma).
#define SP_ISA_NS avx2
#include "kernels/broadcast_impl.h"
