// An owned, validated sparse weight (CSR or block-sparse) plus bias: packed once when a layer is
// converted, then run many times without re-checking anything.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/linear_args.h"

namespace sparseprune {

enum class SparseFormat { csr, bsr };

class PackedLinear {
 public:
  // indptr[n_ptr], indices[n_idx] (any integer width; narrowed to 16 bits when columns allow),
  // values[n_val], bias[n_rows] or null. For CSR pass block_rows = block_cols = 1.
  // Throws std::invalid_argument naming the first argument that breaks the format.
  static PackedLinear make(SparseFormat format, int block_rows, int block_cols, int64_t n_rows,
                           int64_t n_cols, const int64_t* indptr, int64_t n_ptr,
                           const int64_t* indices, int64_t n_idx, const float* values,
                           int64_t n_val, const float* bias);

  // x, y and threads as in LinearArgs (x must have n_cols columns, y n_rows).
  void run(const LinearArgs& args) const;

  SparseFormat format() const { return format_; }
  int block_rows() const { return block_rows_; }
  int block_cols() const { return block_cols_; }
  int64_t n_rows() const { return n_rows_; }
  int64_t n_cols() const { return n_cols_; }
  int64_t n_stored() const;  // values the format stores (incl. block padding, not SELL padding)
  int index_bits() const { return narrow_ ? 16 : 32; }
  int64_t nbytes() const;  // bytes of weight data the kernel reads
  // The weight as given to make(): CSR/BSR row pointers, column (block) indices and values.
  std::vector<int64_t> indptr() const;
  std::vector<int64_t> indices() const;
  std::vector<float> values() const;
  const std::vector<float>& bias() const { return bias_; }
  bool has_bias() const { return !bias_.empty(); }

 private:
  void set_indices(const int64_t* indices, int64_t n);
  int64_t index_at(int64_t pos) const;
  void build_sell(const int64_t* indptr, const int64_t* indices, const float* values);
  template <class Index>
  void run_with(const Index* indices, const LinearArgs& args) const;
  template <class Visit>
  void for_each_row(Visit&& visit) const;
  void fix_nonfinite_rows(const LinearArgs& args) const;

  SparseFormat format_ = SparseFormat::csr;
  int block_rows_ = 1, block_cols_ = 1;
  int64_t n_rows_ = 0, n_cols_ = 0;
  bool narrow_ = false;
  // CSR is stored as SELL-8 (chunk_ptr_, perm_, row_len_); BSR as given (indptr_ per block row).
  std::vector<int64_t> indptr_;
  std::vector<int32_t> perm_;
  std::vector<int32_t> row_len_;
  std::vector<int32_t> panel_start_;  // see SellView
  std::vector<uint16_t> indices16_;
  std::vector<int32_t> indices32_;
  std::vector<float> values_;
  std::vector<float> bias_;
};

}  // namespace sparseprune
