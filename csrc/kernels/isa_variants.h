// Declares a kernel entry point once per SIMD-path namespace (generic, avx2, avx2_w16, avx512), and
// picks the active path's copy, so each dispatcher names the compiled copies one way.
#pragma once

#include "kernels/cpu_features.h"
#include "kernels/scratch.h"

#define SP_DECLARE_ISA_VARIANTS(...) \
  namespace generic { __VA_ARGS__ }  \
  namespace avx2 { __VA_ARGS__ }     \
  namespace avx2_w16 { __VA_ARGS__ } \
  namespace avx512 { __VA_ARGS__ }

namespace sparseprune {

// The copy of one function for the path active_isa() names.
template <class F>
F pick_isa_variant(F generic_fn, F avx2_fn, F avx2_w16_fn, F avx512_fn) {
  switch (active_isa()) {
    case Isa::avx2: return avx2_fn;
    case Isa::avx2_w16: return avx2_w16_fn;
    case Isa::avx512: return avx512_fn;
    default: return generic_fn;
  }
}

}  // namespace sparseprune

// SP_ISA_PICK(fn) or SP_ISA_PICK(fn<T, U>): a pointer to the active path's copy of fn (called from
// inside namespace sparseprune, next to SP_DECLARE_ISA_VARIANTS).
#define SP_ISA_PICK(...) \
  ::sparseprune::pick_isa_variant(&generic::__VA_ARGS__, &avx2::__VA_ARGS__, &avx2_w16::__VA_ARGS__, &avx512::__VA_ARGS__)
