// Declares a kernel template once per SIMD-path namespace (generic, avx2), so the dispatcher can
// name each compiled copy.
#pragma once

#include "kernels/scratch.h"

#define SP_DECLARE_ISA_VARIANTS(...) \
  namespace generic { __VA_ARGS__ }  \
  namespace avx2 { __VA_ARGS__ }
