#include "kernels/partition.h"

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sparseprune {

std::vector<int64_t> partition_rows_by_nnz(const int64_t* indptr, int64_t n_rows, int n_parts) {
  std::vector<int64_t> bounds(static_cast<size_t>(n_parts) + 1, n_rows);
  bounds[0] = 0;
  const auto cost = [&](int64_t r) { return indptr[r] + r * kRowOverheadNnz; };
  const int64_t total = cost(n_rows);
  int64_t lo = 0;
  for (int t = 1; t < n_parts; ++t) {
    const int64_t target = total * t / n_parts;
    // First row r >= lo whose prefix cost reaches the target (cost is monotone).
    int64_t a = lo, b = n_rows;
    while (a < b) {
      const int64_t mid = a + (b - a) / 2;
      if (cost(mid) < target) a = mid + 1; else b = mid;
    }
    bounds[t] = a;
    lo = a;
  }
  return bounds;
}

int threads_for_work(int requested, double multiply_adds) {
  // Below ~20k multiply-adds (a few microseconds of work) a second thread costs more than it saves.
  constexpr double kMinWorkPerExtraThread = 20000.0;
#ifdef _OPENMP
  int n = requested > 0 ? requested : omp_get_max_threads();
  const int by_work = 1 + static_cast<int>(multiply_adds / kMinWorkPerExtraThread);
  n = std::min(n, by_work);
  return std::max(n, 1);
#else
  (void)requested;
  (void)multiply_adds;
  return 1;
#endif
}

}  // namespace sparseprune
