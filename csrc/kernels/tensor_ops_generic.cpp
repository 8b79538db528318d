// The vectorised elementwise bodies for the generic path.
#define SP_ISA_NS generic
#include "kernels/tensor_ops_impl.h"
