// The broadcast row kernels for the generic path.
#define SP_ISA_NS generic
#include "kernels/broadcast_impl.h"
