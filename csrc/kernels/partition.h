// Splitting rows among threads by work (nonzeros), not by row count.
#pragma once

#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sparseprune {

// Per-row fixed cost, in units of one nonzero: loading the bias, storing the outputs.
// Keeps empty rows from all landing on one thread.
constexpr int64_t kRowOverheadNnz = 2;

// bounds[n_parts + 1]: part t owns rows [bounds[t], bounds[t+1]). indptr[n_rows + 1] is the
// (monotone) row pointer; the cost of rows [0, r) is indptr[r] + r * kRowOverheadNnz.
std::vector<int64_t> partition_rows_by_nnz(const int64_t* indptr, int64_t n_rows, int n_parts);

// How many threads a call should use: no more than asked, and one when the work is too small
// for a parallel region to pay (the region costs a few microseconds).
int threads_for_work(int requested, double multiply_adds);

// Elementwise maps below this many elements stay on one thread: a parallel region costs a few
// microseconds, about what 32k cheap elements take.
constexpr int64_t kParallelElements = 1 << 15;

// Threads for an elementwise map over `elements` values: one for small maps, else up to
// `requested`, at least kParallelElements / 2 elements each.
inline int threads_for_elements(int requested, int64_t elements) {
  if (requested <= 1 || elements < kParallelElements) return 1;
  const int64_t most = elements / (kParallelElements / 2);
  return static_cast<int>(requested < most ? requested : most);
}

}  // namespace sparseprune

namespace sparseprune {

// Inside a parallel region: runs body(p) for every part p in [0, n_parts) exactly once, even
// when the runtime gave the region fewer threads than asked. Outside one: runs them all.
template <class Body>
inline void for_each_part(int n_parts, Body&& body) {
#ifdef _OPENMP
  const int team = omp_get_num_threads();
  for (int p = omp_get_thread_num(); p < n_parts; p += team) body(p);
#else
  for (int p = 0; p < n_parts; ++p) body(p);
#endif
}

}  // namespace sparseprune
