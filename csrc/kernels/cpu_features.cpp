#include "kernels/cpu_features.h"

#include <atomic>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <cpuid.h>
#define SP_X86_CPUID 1
#else
#define SP_X86_CPUID 0
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sparseprune {

namespace {

std::atomic<int> forced_isa{-1};

#if SP_X86_CPUID
// XCR0: which register states the OS saves on a context switch (only valid when OSXSAVE is set).
unsigned long long read_xcr0() {
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

bool detect_avx512() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12);
  if (!osxsave || !fma) return false;
  // SSE, AVX (YMM upper halves), opmask, ZMM upper halves of 0-15, ZMM 16-31.
  constexpr unsigned long long kZmmState = 0x2 | 0x4 | 0x20 | 0x40 | 0x80;
  if ((read_xcr0() & kZmmState) != kZmmState) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  return f && dq && bw && vl;
}
#endif

}  // namespace

bool cpu_has_avx2_fma() {
#if SP_HAVE_AVX2_PATH && SP_X86_CPUID
  // __builtin_cpu_supports also checks that the OS saves the YMM registers (XGETBV).
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if SP_HAVE_AVX512_PATH && SP_X86_CPUID
  static const bool has = detect_avx512();
  return has;
#else
  return false;
#endif
}

const char* isa_unavailable_reason(Isa isa) {
  switch (isa) {
    case Isa::baseline:
      return nullptr;
    case Isa::avx2:
    case Isa::avx2_w16:
      if (!SP_HAVE_AVX2_PATH) return "avx2: not compiled in this build (not an x86-64 target)";
      return cpu_has_avx2_fma() ? nullptr : "avx2: CPU lacks AVX2/FMA";
    case Isa::avx512:
      if (!SP_HAVE_AVX512_PATH) return "avx512: not compiled in this build (not x86-64, or the compiler lacks -mavx512f)";
      return cpu_has_avx512() ? nullptr : "avx512: CPU (or OS) lacks AVX-512 F/BW/DQ/VL with ZMM state";
  }
  return "unknown SIMD path";
}

Isa active_isa() {
  const int forced = forced_isa.load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<Isa>(forced);
  if (cpu_has_avx512()) return Isa::avx512;
  return cpu_has_avx2_fma() ? Isa::avx2 : Isa::baseline;
}

bool set_isa(Isa isa) {
  if (isa_unavailable_reason(isa) != nullptr) return false;
  forced_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

void reset_isa() { forced_isa.store(-1, std::memory_order_relaxed); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2+fma";
    case Isa::avx2_w16: return "avx2_w16";
    case Isa::avx512: return "avx512";
    default: return "baseline";
  }
}

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
