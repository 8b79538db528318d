#include "kernels/cpu_features.h"

#include <atomic>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sparseprune {

namespace {
std::atomic<int> forced_isa{-1};
}

bool cpu_has_avx2_fma() {
#if SP_HAVE_AVX2_PATH && (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  // __builtin_cpu_supports also checks that the OS saves the YMM registers (XGETBV).
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

Isa active_isa() {
  const int forced = forced_isa.load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<Isa>(forced);
  return cpu_has_avx2_fma() ? Isa::avx2 : Isa::baseline;
}

bool set_isa(Isa isa) {
  if (isa == Isa::avx2 && !cpu_has_avx2_fma()) return false;
  forced_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

void reset_isa() { forced_isa.store(-1, std::memory_order_relaxed); }

const char* isa_name(Isa isa) { return isa == Isa::avx2 ? "avx2+fma" : "baseline"; }

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace sparseprune
