// Argument bundles shared by the sparse linear kernels (CSR and block-sparse).
#pragma once

#include <cstdint>

namespace sparseprune {

// y[b, r] = relu?( sum_k W[r, k] * x[b, k] + bias[r] )
// x is read through element strides, so transposed and sliced inputs need no copy;
// y is written row-major with a row stride of y_stride (>= n_rows).
struct LinearArgs {
  const float* x = nullptr;       // x[batch, n_cols], element (b, k) at b * x_stride_b + k * x_stride_k
  int64_t batch = 0;
  int64_t x_stride_b = 0;
  int64_t x_stride_k = 1;
  const float* bias = nullptr;    // bias[n_rows], or null
  bool relu = false;
  float* y = nullptr;             // y[batch, n_rows], element (b, r) at b * y_stride + r
  int64_t y_stride = 0;
  int n_threads = 1;
};

// Compressed sparse rows of W[n_rows, n_cols]; a non-owning view.
template <class Index>
struct CsrView {
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  const int64_t* indptr = nullptr;  // indptr[n_rows + 1], monotone, indptr[0] == 0
  const Index* indices = nullptr;   // indices[nnz], each in [0, n_cols)
  const float* values = nullptr;    // values[nnz]
};

// CSR regrouped for SIMD ("SELL-8", sliced ELLPACK): rows are taken 8 at a time ("chunks"), and
// within a chunk the entries of its 8 rows are interleaved, so one vector load gives the l-th
// nonzero of 8 rows and 8 row sums build up side by side with no horizontal reduction, no
// per-row tail and no per-row loop exit. Rows are sorted by length within windows of
// kSellSortWindow rows, so the 8 rows of a chunk have similar lengths and padding stays small.
//   slot s = 8 * chunk + lane holds row perm[s] (-1 for the padding slots past n_rows);
//   entry l of slot s is at chunk_ptr[chunk] + 8 * l + lane, for l < row_len[s];
//   entries from row_len[s] to the chunk's longest row are padding (value 0, index 0).
//   Each row's entries are sorted by column, and cut into column panels of kSellPanelCols: the
//   entries l of slot s in panel p are [panel_start[s * (n_panels + 1) + p], ... + p + 1). At
//   batch > 1 the kernel runs panel by panel, so the packed inputs it reads (one panel's columns
//   for up to 64 batch values: 64 KiB) stay in L1/L2 instead of streaming the whole input width.
constexpr int kSellLanes = 8;
constexpr int kSellSortWindow = 256;
constexpr int64_t kSellPanelCols = 256;

template <class Index>
struct SellView {
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  int64_t n_chunks = 0;               // ceil(n_rows / 8)
  const int64_t* chunk_ptr = nullptr; // chunk_ptr[n_chunks + 1], multiples of 8
  const int32_t* perm = nullptr;      // perm[8 * n_chunks]
  const int32_t* row_len = nullptr;   // row_len[8 * n_chunks]
  const Index* indices = nullptr;     // indices[chunk_ptr[n_chunks]], each in [0, n_cols)
  const float* values = nullptr;      // values[chunk_ptr[n_chunks]]
  int64_t n_panels = 1;               // ceil(n_cols / kSellPanelCols), at least 1
  const int32_t* panel_start = nullptr;  // panel_start[8 * n_chunks * (n_panels + 1)]
};

// Block-sparse rows: W is cut into R x C blocks; a stored block keeps all R*C values.
// Blocks of block-row i are [indptr[i], indptr[i+1]); block j covers rows i*R .. i*R+R-1 and
// columns indices[j]*C .. indices[j]*C+C-1. Its value (r, c) is values[j*R*C + c*R + r]
// (column-major inside the block, so an R-tall column loads as one vector).
// Rows past n_rows and columns past n_cols inside edge blocks hold zeros.
template <class Index>
struct BsrView {
  int block_rows = 1;               // R
  int block_cols = 1;               // C
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  const int64_t* indptr = nullptr;  // indptr[ceil(n_rows / R) + 1]
  const Index* indices = nullptr;   // indices[n_blocks], each in [0, ceil(n_cols / C))
  const float* values = nullptr;    // values[n_blocks * R * C]
};

}  // namespace sparseprune
