#include "kernels/packed_linear.h"

#include <stdexcept>

#include "kernels/bsr_matmul.h"
#include "kernels/csr_matmul.h"

namespace sparseprune {

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

PackedLinear PackedLinear::make(SparseFormat format, int block_rows, int block_cols,
                                int64_t n_rows, int64_t n_cols, const int64_t* indptr,
                                int64_t n_ptr, const int64_t* indices, int64_t n_idx,
                                const float* values, int64_t n_val, const float* bias) {
  if (n_rows < 0) fail("n_rows must be >= 0, got " + std::to_string(n_rows));
  if (n_cols < 0) fail("n_cols must be >= 0, got " + std::to_string(n_cols));
  if (n_cols > INT32_MAX) fail("n_cols must fit in 32 bits, got " + std::to_string(n_cols));
  if (format == SparseFormat::csr) {
    if (block_rows != 1 || block_cols != 1) fail("block shape must be 1x1 for CSR");
  } else if (!bsr_block_shape_supported(block_rows, block_cols)) {
    fail("block shape " + std::to_string(block_rows) + "x" + std::to_string(block_cols) +
         " has no compiled kernel (supported: 1x4, 4x1, 8x1)");
  }
  const int64_t n_row_groups = ceil_div(n_rows, block_rows);
  const int64_t n_col_groups = ceil_div(n_cols, block_cols);
  if (n_ptr != n_row_groups + 1)
    fail("indptr must have " + std::to_string(n_row_groups + 1) + " entries, got " +
         std::to_string(n_ptr));
  if (indptr[0] != 0) fail("indptr[0] must be 0, got " + std::to_string(indptr[0]));
  for (int64_t i = 0; i < n_row_groups; ++i) {
    if (indptr[i + 1] < indptr[i])
      fail("indptr must be non-decreasing (indptr[" + std::to_string(i + 1) + "] < indptr[" +
           std::to_string(i) + "])");
  }
  if (indptr[n_row_groups] != n_idx)
    fail("indptr[-1] must equal len(indices) = " + std::to_string(n_idx) + ", got " +
         std::to_string(indptr[n_row_groups]));
  const int64_t block = static_cast<int64_t>(block_rows) * block_cols;
  if (n_val != n_idx * block)
    fail("values must have " + std::to_string(n_idx * block) + " entries, got " +
         std::to_string(n_val));
  for (int64_t j = 0; j < n_idx; ++j) {
    if (indices[j] < 0 || indices[j] >= n_col_groups)
      fail("indices[" + std::to_string(j) + "] = " + std::to_string(indices[j]) +
           " is out of range [0, " + std::to_string(n_col_groups) + ")");
  }

  PackedLinear p;
  p.format_ = format;
  p.block_rows_ = block_rows;
  p.block_cols_ = block_cols;
  p.n_rows_ = n_rows;
  p.n_cols_ = n_cols;
  p.indptr_.assign(indptr, indptr + n_ptr);
  // 16-bit column indices halve the index bytes, which matter most at batch 1 (bandwidth-bound).
  p.narrow_ = n_col_groups <= 65536;
  if (p.narrow_) {
    p.indices16_.resize(static_cast<size_t>(n_idx));
    for (int64_t j = 0; j < n_idx; ++j) p.indices16_[j] = static_cast<uint16_t>(indices[j]);
  } else {
    p.indices32_.resize(static_cast<size_t>(n_idx));
    for (int64_t j = 0; j < n_idx; ++j) p.indices32_[j] = static_cast<int32_t>(indices[j]);
  }
  p.values_.assign(values, values + n_val);
  if (bias) p.bias_.assign(bias, bias + n_rows);
  return p;
}

int64_t PackedLinear::nbytes() const {
  const int64_t index_bytes = narrow_ ? 2 * static_cast<int64_t>(indices16_.size())
                                      : 4 * static_cast<int64_t>(indices32_.size());
  return index_bytes + 8 * static_cast<int64_t>(indptr_.size()) +
         4 * static_cast<int64_t>(values_.size() + bias_.size());
}

std::vector<int64_t> PackedLinear::indices() const {
  if (narrow_) return std::vector<int64_t>(indices16_.begin(), indices16_.end());
  return std::vector<int64_t>(indices32_.begin(), indices32_.end());
}

namespace {

template <class Index>
void run_with(const PackedLinear& p, const Index* indices, LinearArgs args) {
  if (p.format() == SparseFormat::csr) {
    CsrView<Index> w;
    w.n_rows = p.n_rows();
    w.n_cols = p.n_cols();
    w.indptr = p.indptr().data();
    w.indices = indices;
    w.values = p.values().data();
    csr_linear(w, args);
  } else {
    BsrView<Index> w;
    w.block_rows = p.block_rows();
    w.block_cols = p.block_cols();
    w.n_rows = p.n_rows();
    w.n_cols = p.n_cols();
    w.indptr = p.indptr().data();
    w.indices = indices;
    w.values = p.values().data();
    bsr_linear(w, args);
  }
}

}  // namespace

void PackedLinear::run(const LinearArgs& args) const {
  LinearArgs a = args;
  a.bias = bias_.empty() ? nullptr : bias_.data();
  if (narrow_) run_with(*this, indices16_.data(), a);
  else run_with(*this, indices32_.data(), a);
}

}  // namespace sparseprune
