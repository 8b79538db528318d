// CPU feature detection and the choice of SIMD path for the kernels.
#pragma once

namespace sparseprune {

// The compiled copies of the kernel bodies (see simd.h). Automatic choice: avx512 > avx2 >
// baseline. avx2_w16 (the 16-lane body compiled for AVX2) is a test path: only forced, never
// picked.
enum class Isa { baseline = 0, avx2 = 1, avx2_w16 = 2, avx512 = 3 };
constexpr int kIsaCount = 4;

// True when this CPU (and OS) can run the AVX2+FMA kernels and the build compiled them.
bool cpu_has_avx2_fma();

// True when this CPU has AVX-512 F, BW, DQ and VL (and FMA), the OS saves the ZMM registers
// (XCR0 opmask and ZMM state bits), and the build compiled the avx512 kernels.
bool cpu_has_avx512();

// Null when `isa` can run here; else why not (e.g. "avx512: CPU lacks AVX-512").
const char* isa_unavailable_reason(Isa isa);

// The path kernels use now: the best one available, unless forced with set_isa (tests use
// that to run every path on one machine).
Isa active_isa();

// Forces a path; returns false (and changes nothing) if the path cannot run here.
bool set_isa(Isa isa);
void reset_isa();

// "baseline", "avx2+fma", "avx2_w16", "avx512".
const char* isa_name(Isa isa);

// OpenMP facts, so a build without OpenMP can say so at run time.
bool openmp_enabled();
int max_threads();

}  // namespace sparseprune
