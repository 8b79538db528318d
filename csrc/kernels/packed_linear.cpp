#include "kernels/packed_linear.h"

#include <algorithm>
#include <limits>
#include <numeric>
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

  // A column stored twice in one row would be summed by the kernels but counted twice by the
  // non-finite fix-up; no pruned dense matrix has one, so refuse it.
  std::vector<int64_t> last_row(static_cast<size_t>(n_col_groups), -1);
  for (int64_t i = 0; i < n_row_groups; ++i) {
    for (int64_t j = indptr[i]; j < indptr[i + 1]; ++j) {
      if (last_row[indices[j]] == i)
        fail("indices has column " + std::to_string(indices[j]) + " twice in row " + std::to_string(i));
      last_row[indices[j]] = i;
    }
  }

  PackedLinear p;
  p.format_ = format;
  p.block_rows_ = block_rows;
  p.block_cols_ = block_cols;
  p.n_rows_ = n_rows;
  p.n_cols_ = n_cols;
  // 16-bit column indices halve the index bytes, which matter most at batch 1 (bandwidth-bound).
  p.narrow_ = n_col_groups <= 65536;
  if (bias) p.bias_.assign(bias, bias + n_rows);
  if (format == SparseFormat::csr) {
    p.build_sell(indptr, indices, values);
  } else {
    p.indptr_.assign(indptr, indptr + n_ptr);
    p.set_indices(indices, n_idx);
    p.values_.assign(values, values + n_val);
  }
  return p;
}

void PackedLinear::set_indices(const int64_t* indices, int64_t n) {
  if (narrow_) {
    indices16_.resize(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) indices16_[j] = static_cast<uint16_t>(indices[j]);
  } else {
    indices32_.resize(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) indices32_[j] = static_cast<int32_t>(indices[j]);
  }
}

int64_t PackedLinear::index_at(int64_t pos) const {
  return narrow_ ? indices16_[pos] : indices32_[pos];
}

void PackedLinear::build_sell(const int64_t* indptr, const int64_t* indices, const float* values) {
  const int64_t n_chunks = ceil_div(n_rows_, kSellLanes);
  const int64_t n_slots = n_chunks * kSellLanes;
  // Longest rows first within each window, so the 8 rows of a chunk have similar lengths.
  perm_.assign(static_cast<size_t>(n_slots), -1);
  std::vector<int32_t> order(static_cast<size_t>(n_rows_));
  std::iota(order.begin(), order.end(), 0);
  const auto length = [&](int32_t r) { return indptr[r + 1] - indptr[r]; };
  for (int64_t w0 = 0; w0 < n_rows_; w0 += kSellSortWindow) {
    const int64_t w1 = std::min<int64_t>(w0 + kSellSortWindow, n_rows_);
    std::stable_sort(order.begin() + w0, order.begin() + w1,
                     [&](int32_t a, int32_t b) { return length(a) > length(b); });
  }
  std::copy(order.begin(), order.end(), perm_.begin());
  row_len_.assign(static_cast<size_t>(n_slots), 0);
  indptr_.assign(static_cast<size_t>(n_chunks) + 1, 0);  // the chunk pointer
  for (int64_t c = 0; c < n_chunks; ++c) {
    int64_t longest = 0;
    for (int64_t s = c * kSellLanes; s < (c + 1) * kSellLanes; ++s) {
      if (perm_[s] >= 0) row_len_[s] = static_cast<int32_t>(length(perm_[s]));
      longest = std::max<int64_t>(longest, row_len_[s]);
    }
    indptr_[c + 1] = indptr_[c] + longest * kSellLanes;
  }
  const int64_t n_entries = indptr_[n_chunks];
  std::vector<int64_t> sell_indices(static_cast<size_t>(n_entries), 0);  // padding: column 0, value 0
  values_.assign(static_cast<size_t>(n_entries), 0.0f);
  const int64_t n_panels = std::max<int64_t>(1, ceil_div(n_cols_, kSellPanelCols));
  panel_start_.assign(static_cast<size_t>(n_slots * (n_panels + 1)), 0);
  std::vector<int64_t> order_in_row;
  for (int64_t s = 0; s < n_slots; ++s) {
    if (perm_[s] < 0) continue;
    const int64_t base = indptr_[s / kSellLanes] + s % kSellLanes;
    const int64_t src = indptr[perm_[s]];
    // by column, for the panels (a CSR row may list its columns in any order)
    order_in_row.resize(static_cast<size_t>(row_len_[s]));
    std::iota(order_in_row.begin(), order_in_row.end(), src);
    std::sort(order_in_row.begin(), order_in_row.end(), [&](int64_t a, int64_t b) { return indices[a] < indices[b]; });
    int32_t* starts = panel_start_.data() + s * (n_panels + 1);
    for (int64_t l = 0; l < row_len_[s]; ++l) {
      const int64_t j = order_in_row[static_cast<size_t>(l)];
      sell_indices[base + l * kSellLanes] = indices[j];
      values_[base + l * kSellLanes] = values[j];
      ++starts[indices[j] / kSellPanelCols + 1];
    }
    for (int64_t p = 0; p < n_panels; ++p) starts[p + 1] += starts[p];
  }
  set_indices(sell_indices.data(), n_entries);
}

int64_t PackedLinear::nbytes() const {
  const int64_t index_bytes = narrow_ ? 2 * static_cast<int64_t>(indices16_.size())
                                      : 4 * static_cast<int64_t>(indices32_.size());
  return index_bytes + 8 * static_cast<int64_t>(indptr_.size()) +
         4 * static_cast<int64_t>(values_.size() + bias_.size() + perm_.size() + row_len_.size() +
                              panel_start_.size());
}

int64_t PackedLinear::n_stored() const {
  if (format_ == SparseFormat::bsr) return static_cast<int64_t>(values_.size());
  int64_t n = 0;
  for (int32_t len : row_len_) n += len;
  return n;
}

template <class Visit>
void PackedLinear::for_each_row(Visit&& visit) const {
  // visit(row, col, value) for every stored value, rows in order for BSR, slot order for CSR.
  if (format_ == SparseFormat::csr) {
    for (size_t s = 0; s < perm_.size(); ++s) {
      if (perm_[s] < 0) continue;
      const int64_t base = indptr_[s / kSellLanes] + s % kSellLanes;
      for (int64_t l = 0; l < row_len_[s]; ++l)
        visit(perm_[s], index_at(base + l * kSellLanes), values_[base + l * kSellLanes]);
    }
    return;
  }
  const int64_t block = static_cast<int64_t>(block_rows_) * block_cols_;
  for (size_t g = 0; g + 1 < indptr_.size(); ++g) {
    for (int64_t j = indptr_[g]; j < indptr_[g + 1]; ++j) {
      for (int64_t r = 0; r < block_rows_; ++r) {
        const int64_t row = static_cast<int64_t>(g) * block_rows_ + r;
        if (row >= n_rows_) break;
        for (int64_t c = 0; c < block_cols_; ++c) {
          const int64_t col = index_at(j) * block_cols_ + c;
          if (col < n_cols_) visit(row, col, values_[j * block + c * block_rows_ + r]);
        }
      }
    }
  }
}

std::vector<int64_t> PackedLinear::indptr() const {
  if (format_ == SparseFormat::bsr) return indptr_;
  std::vector<int64_t> out(static_cast<size_t>(n_rows_) + 1, 0);
  for (size_t s = 0; s < perm_.size(); ++s)
    if (perm_[s] >= 0) out[perm_[s] + 1] = row_len_[s];
  for (int64_t r = 0; r < n_rows_; ++r) out[r + 1] += out[r];
  return out;
}

std::vector<int64_t> PackedLinear::indices() const {
  if (format_ == SparseFormat::bsr) {
    std::vector<int64_t> out(narrow_ ? indices16_.size() : indices32_.size());
    for (size_t j = 0; j < out.size(); ++j) out[j] = index_at(static_cast<int64_t>(j));
    return out;
  }
  const std::vector<int64_t> ptr = indptr();
  std::vector<int64_t> out(static_cast<size_t>(ptr.back()));
  std::vector<int64_t> fill(ptr.begin(), ptr.end() - 1);
  for_each_row([&](int64_t row, int64_t col, float) { out[fill[row]++] = col; });
  return out;
}

std::vector<float> PackedLinear::values() const {
  if (format_ == SparseFormat::bsr) return values_;
  const std::vector<int64_t> ptr = indptr();
  std::vector<float> out(static_cast<size_t>(ptr.back()));
  std::vector<int64_t> fill(ptr.begin(), ptr.end() - 1);
  for_each_row([&](int64_t row, int64_t, float v) { out[fill[row]++] = v; });
  return out;
}

template <class Index>
void PackedLinear::run_with(const Index* indices, const LinearArgs& args) const {
  if (format_ == SparseFormat::csr) {
    SellView<Index> w;
    w.n_rows = n_rows_;
    w.n_cols = n_cols_;
    w.n_chunks = static_cast<int64_t>(indptr_.size()) - 1;
    w.chunk_ptr = indptr_.data();
    w.perm = perm_.data();
    w.row_len = row_len_.data();
    w.indices = indices;
    w.values = values_.data();
    w.n_panels = std::max<int64_t>(1, ceil_div(n_cols_, kSellPanelCols));  // as build_sell made them
    w.panel_start = panel_start_.data();
    csr_linear(w, args);
  } else {
    BsrView<Index> w;
    w.block_rows = block_rows_;
    w.block_cols = block_cols_;
    w.n_rows = n_rows_;
    w.n_cols = n_cols_;
    w.indptr = indptr_.data();
    w.indices = indices;
    w.values = values_.data();
    bsr_linear(w, args);
  }
}

namespace {

// True when x[b, :] holds a NaN or an infinity. 0 * v is NaN exactly for those, and the
// reduction lets the loop vectorise.
bool row_has_nonfinite(const float* x, int64_t n, int64_t stride) {
  float probe = 0.0f;
  if (stride == 1) {
#pragma omp simd reduction(+ : probe)
    for (int64_t k = 0; k < n; ++k) probe += x[k] * 0.0f;
  } else {
    for (int64_t k = 0; k < n; ++k) probe += x[k * stride] * 0.0f;
  }
  return probe != probe;
}

}  // namespace

// Dense math multiplies every input by every weight, zeros included, so a NaN or infinite input
// makes NaN of every output whose row does not store that column (0 * inf = NaN), and the SIMD
// layouts' padding must not decide the answer either. For the (rare) batch rows with a
// non-finite input, this recomputes the outputs exactly as dense math would.
void PackedLinear::fix_nonfinite_rows(const LinearArgs& a) const {
  std::vector<char> bad_col;
  std::vector<double> sum;
  std::vector<int64_t> covered;
  for (int64_t b = 0; b < a.batch; ++b) {
    const float* xb = a.x + b * a.x_stride_b;
    if (!row_has_nonfinite(xb, n_cols_, a.x_stride_k)) continue;
    bad_col.assign(static_cast<size_t>(n_cols_), 0);
    int64_t n_bad = 0;
    for (int64_t k = 0; k < n_cols_; ++k) {
      if (xb[k * a.x_stride_k] * 0.0f != 0.0f) { bad_col[k] = 1; ++n_bad; }
    }
    sum.assign(static_cast<size_t>(n_rows_), 0.0);
    covered.assign(static_cast<size_t>(n_rows_), 0);
    for_each_row([&](int64_t row, int64_t col, float v) {
      sum[row] += static_cast<double>(v) * xb[col * a.x_stride_k];
      covered[row] += bad_col[col];
    });
    for (int64_t r = 0; r < n_rows_; ++r) {
      float v = std::numeric_limits<float>::quiet_NaN();  // a zero weight met a non-finite input
      if (covered[r] == n_bad) {
        v = static_cast<float>(sum[r]) + (a.bias ? a.bias[r] : 0.0f);
        if (a.relu && v < 0.0f) v = 0.0f;
      }
      a.y[b * a.y_stride + r] = v;
    }
  }
}

void PackedLinear::run(const LinearArgs& args) const {
  LinearArgs a = args;
  a.bias = bias_.empty() ? nullptr : bias_.data();
  if (narrow_) run_with(indices16_.data(), a);
  else run_with(indices32_.data(), a);
  if (n_rows_ > 0) fix_nonfinite_rows(a);
}

}  // namespace sparseprune
