// CPU feature detection and the choice of SIMD path for the kernels.
#pragma once

namespace sparseprune {

enum class Isa { baseline = 0, avx2 = 1 };

// True when this CPU (and OS) can run the AVX2+FMA kernels and the build compiled them.
bool cpu_has_avx2_fma();

// The path kernels use now: the best one available, unless forced with set_isa (tests use
// that to run every path on one machine).
Isa active_isa();

// Forces a path; returns false (and changes nothing) if the path cannot run here.
bool set_isa(Isa isa);
void reset_isa();

const char* isa_name(Isa isa);

// OpenMP facts, so a build without OpenMP can say so at run time.
bool openmp_enabled();
int max_threads();

}  // namespace sparseprune
