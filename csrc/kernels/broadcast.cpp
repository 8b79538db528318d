#include "kernels/broadcast.h"

#include <algorithm>
#include <cstring>

#include "kernels/broadcast_entries.h"
#include "kernels/cpu_features.h"
#include "kernels/partition.h"
#include "kernels/tensor_ops_entries.h"

namespace sparseprune {

namespace {

// An output walked as nested loops: dims[0] outermost, dims.back() the contiguous row; stride[k][d]
// is operand k's step along dim d (0: broadcast). Every operand's row stride is 0 or 1.
struct Loops {
  std::vector<int64_t> dims;
  std::vector<std::vector<int64_t>> stride;
};

// The loops of [batch, out] reading each operand (per-sample shape, broadcast to out): size-1
// dims dropped, neighbours merged where every operand steps through them as one dim.
Loops broadcast_loops(const std::vector<int64_t>& out, const std::vector<std::vector<int64_t>>& operands,
                      int64_t batch) {
  const size_t rank = out.size() + 1;
  std::vector<int64_t> full{batch};
  full.insert(full.end(), out.begin(), out.end());
  std::vector<std::vector<int64_t>> full_stride;
  for (const auto& s : operands) {
    std::vector<int64_t> padded(rank - s.size(), 1);
    padded.insert(padded.end(), s.begin(), s.end());
    padded[0] = batch;
    std::vector<int64_t> st(rank, 0);
    int64_t step = 1;
    for (size_t d = rank; d-- > 0;) {
      st[d] = padded[d] == full[d] ? step : 0;
      step *= padded[d];
    }
    full_stride.push_back(st);
  }
  Loops l;
  l.stride.resize(operands.size());
  for (size_t d = 0; d < rank; ++d) {
    if (full[d] == 1) continue;
    bool merge = !l.dims.empty();
    for (size_t k = 0; merge && k < operands.size(); ++k)  // the previous dim steps over all of this one
      merge = l.stride[k].back() == full_stride[k][d] * full[d];
    if (merge) {
      l.dims.back() *= full[d];
      for (size_t k = 0; k < operands.size(); ++k) l.stride[k].back() = full_stride[k][d];
    } else {
      l.dims.push_back(full[d]);
      for (size_t k = 0; k < operands.size(); ++k) l.stride[k].push_back(full_stride[k][d]);
    }
  }
  if (l.dims.empty()) {  // one element in all
    l.dims.push_back(1);
    for (auto& s : l.stride) s.push_back(0);
  }
  return l;
}

// Runs row(row index, column begin, column end, operand offsets) over the loops' rows, split into
// `parts` contiguous pieces of work (whole rows, or pieces of one long row when there are fewer
// rows than parts); each piece computes its offsets once and then steps them row by row.
template <class Row>
void for_rows(const Loops& l, int threads, Row&& row) {
  const int rank = static_cast<int>(l.dims.size());
  const int64_t n = l.dims.back();
  int64_t rows = 1;
  for (int d = 0; d + 1 < rank; ++d) rows *= l.dims[d];
  const size_t k_ops = l.stride.size();
  // Pieces per row: 1, unless rows are too few to feed the threads.
  const int64_t per_row = rows >= threads ? 1 : std::min<int64_t>((threads + rows - 1) / rows, (n + 7) / 8);
  const int64_t items = rows * per_row;
#pragma omp parallel num_threads(threads) if (threads > 1)
  for_each_part(threads, [&](int t) {
    const int64_t i0 = items * t / threads, i1 = items * (t + 1) / threads;
    if (i0 >= i1) return;
    std::vector<int64_t> idx(rank, 0), off(k_ops, 0);
    int64_t r = i0 / per_row;
    for (int d = rank - 2; d >= 0; --d) {  // the first row's index and offsets
      idx[d] = r % l.dims[d];
      r /= l.dims[d];
      for (size_t k = 0; k < k_ops; ++k) off[k] += idx[d] * l.stride[k][d];
    }
    int64_t row_index = i0 / per_row;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p = i % per_row;
      // Pieces start on whole vectors, so each element meets the same code whatever the split.
      const int64_t c0 = std::min(n, (n + 7) / 8 * p / per_row * 8), c1 = std::min(n, (n + 7) / 8 * (p + 1) / per_row * 8);
      row(row_index, c0, c1, off.data());
      if (p + 1 < per_row) continue;
      ++row_index;
      for (int d = rank - 2; d >= 0; --d) {  // odometer step to the next row
        for (size_t k = 0; k < k_ops; ++k) off[k] += l.stride[k][d];
        if (++idx[d] < l.dims[d]) break;
        for (size_t k = 0; k < k_ops; ++k) off[k] -= l.stride[k][d] * l.dims[d];
        idx[d] = 0;
      }
    }
  });
}

int64_t numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

}  // namespace

bool broadcast_shapes(const std::vector<int64_t>& a, const std::vector<int64_t>& b, std::vector<int64_t>* out) {
  const size_t rank = std::max(a.size(), b.size());
  out->assign(rank, 1);
  for (size_t i = 0; i < rank; ++i) {
    const int64_t x = i < a.size() ? a[a.size() - 1 - i] : 1, y = i < b.size() ? b[b.size() - 1 - i] : 1;
    if (x != y && x != 1 && y != 1) return false;
    (*out)[rank - 1 - i] = std::max(x, y);
  }
  return true;
}

void broadcast_binary(const float* a, const std::vector<int64_t>& shape_a, const float* b,
                      const std::vector<int64_t>& shape_b, float* dst, const std::vector<int64_t>& shape_out,
                      int64_t batch, BinaryOp op, Activation act, int n_threads) {
  if (batch <= 0) return;
  const Loops l = broadcast_loops(shape_out, {shape_a, shape_b}, batch);
  auto row_fn = SP_ISA_PICK(binary_row_entry);
  auto act_fn = SP_ISA_PICK(activation_map_entry);
  const int64_t n = l.dims.back(), sa = l.stride[0].back(), sb = l.stride[1].back();
  for_rows(l, threads_for_elements(n_threads, batch * numel(shape_out)), [&](int64_t r, int64_t c0, int64_t c1, const int64_t* off) {
    float* y = dst + r * n + c0;
    row_fn(a + off[0] + c0 * sa, sa, b + off[1] + c0 * sb, sb, y, c1 - c0, op);
    if (act != Activation::none) act_fn(y, y, c1 - c0, 1.0f, 0.0f, act);  // while the row is in cache
  });
}

void broadcast_copy(const float* src, const std::vector<int64_t>& shape_in, float* dst,
                    const std::vector<int64_t>& shape_out, int64_t batch, int n_threads) {
  if (batch <= 0) return;
  const Loops l = broadcast_loops(shape_out, {shape_in}, batch);
  const int64_t n = l.dims.back(), s = l.stride[0].back();
  for_rows(l, threads_for_elements(n_threads, batch * numel(shape_out)), [&](int64_t r, int64_t c0, int64_t c1, const int64_t* off) {
    float* y = dst + r * n + c0;
    if (s) std::memcpy(y, src + off[0] + c0, static_cast<size_t>(c1 - c0) * sizeof(float));
    else std::fill(y, y + (c1 - c0), src[off[0]]);
  });
}

void reduce_axes(const float* src, const std::vector<int64_t>& shape_in, const std::vector<int>& axes, bool mean,
                 float* dst, int64_t batch, int n_threads) {
  if (batch <= 0) return;
  // Groups of neighbouring dims that are all reduced or all kept (size-1 dims dropped; the batch
  // is kept): [kept?, reduced, kept?, reduced, ...].
  std::vector<int64_t> size{batch};
  std::vector<bool> reduced{false};
  int64_t count = 1;
  for (size_t d = 0; d < shape_in.size(); ++d) {
    const bool r = std::find(axes.begin(), axes.end(), static_cast<int>(d)) != axes.end();
    if (r) count *= shape_in[d];
    if (shape_in[d] == 1) continue;
    if (reduced.back() == r) size.back() *= shape_in[d];
    else size.push_back(shape_in[d]), reduced.push_back(r);
  }
  const auto finish = [&](float* y, int64_t n) {
    if (mean)
      for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(static_cast<double>(y[i]) / static_cast<double>(count));
  };
  const int64_t total_out = batch * numel(shape_in) / count;
  auto sum_row = SP_ISA_PICK(sum_row_entry);
  auto sum_cols = SP_ISA_PICK(sum_columns_entry);
  const int threads = threads_for_elements(n_threads, batch * numel(shape_in));
  if (size.size() == 1) {  // nothing reduced over more than one element: a copy
    std::memcpy(dst, src, static_cast<size_t>(total_out) * sizeof(float));
    return;
  }
  if (size.size() == 2) {  // [outer, R]: one sum per contiguous row (LayerNorm's mean, [C,H,W] -> [C,1,1])
    const int64_t rows = size[0], len = size[1];
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const double s = sum_row(src + r * len, len);
      dst[r] = static_cast<float>(mean ? s / static_cast<double>(count) : s);
    }
    return;
  }
  // The rest reduces one group at a time, innermost reduced group first; each step is
  // [outer, R, inner] -> [outer, inner] (a sum of R rows of inner contiguous floats: axis 0 of
  // [C, H, W] is [batch, C, H*W]). All steps but the last write a temporary.
  std::vector<float> tmp[2];
  const float* in = src;
  while (size.size() > 1) {
    int g = static_cast<int>(size.size()) - 1;
    while (!reduced[g]) --g;
    int64_t outer = 1, inner = 1;
    for (int d = 0; d < g; ++d) outer *= size[d];
    for (size_t d = g + 1; d < size.size(); ++d) inner *= size[d];
    const int64_t R = size[g];
    bool last = true;
    for (int d = 0; d < g; ++d) last = last && !reduced[d];
    float* out = dst;
    if (!last) {
      auto& t = tmp[in == tmp[0].data() ? 1 : 0];
      t.resize(static_cast<size_t>(outer * inner));
      out = t.data();
    }
    const int64_t per_outer = outer >= threads ? 1 : std::min<int64_t>((threads + outer - 1) / outer, (inner + 7) / 8);
    const int64_t items = outer * per_outer;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t o = i / per_outer, p = i % per_outer;
      const int64_t c0 = std::min(inner, (inner + 7) / 8 * p / per_outer * 8);
      const int64_t c1 = std::min(inner, (inner + 7) / 8 * (p + 1) / per_outer * 8);
      sum_cols(in + o * R * inner + c0, R, inner, c1 - c0, out + o * inner + c0);
      if (last) finish(out + o * inner + c0, c1 - c0);
    }
    in = out;
    size.erase(size.begin() + g);
    reduced.erase(reduced.begin() + g);
    if (g > 0 && g < static_cast<int>(size.size()) && reduced[g - 1] == reduced[g]) {  // kept neighbours merge
      size[g - 1] *= size[g];
      size.erase(size.begin() + g);
      reduced.erase(reduced.begin() + g);
    }
  }
}

void pad_constant(const float* src, const std::vector<int64_t>& shape_in,
                  const std::vector<std::array<int64_t, 2>>& pads, float value, float* dst, int64_t batch,
                  int n_threads) {
  if (batch <= 0) return;
  const int rank = static_cast<int>(shape_in.size());
  std::vector<int64_t> out(rank), in_stride(rank, 1);
  for (int d = 0; d < rank; ++d) out[d] = shape_in[d] + pads[d][0] + pads[d][1];
  for (int d = rank - 2; d >= 0; --d) in_stride[d] = in_stride[d + 1] * shape_in[d + 1];
  const int64_t n_in = numel(shape_in), n_out = numel(out);
  const int64_t len = shape_in[rank - 1], before = pads[rank - 1][0], after = pads[rank - 1][1];
  const int64_t rows = n_out / out[rank - 1];  // output rows per sample
  const int threads = threads_for_elements(n_threads, batch * n_out);
  // Each output row is written once: all `value` outside the input, else value | input row | value.
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t s = 0; s < batch; ++s) {
    float* y = dst + s * n_out;
    std::vector<int64_t> idx(rank, 0);  // output index over the outer dims
    int64_t outside = 0;                // how many outer dims lie in the padding
    int64_t src_off = 0;                // input row offset when outside == 0
    for (int d = 0; d + 1 < rank; ++d) {
      if (pads[d][0] > 0) ++outside;
      src_off -= pads[d][0] * in_stride[d];
    }
    for (int64_t r = 0; r < rows; ++r, y += out[rank - 1]) {
      if (outside) {
        std::fill(y, y + out[rank - 1], value);
      } else {
        std::fill(y, y + before, value);
        std::memcpy(y + before, src + s * n_in + src_off, static_cast<size_t>(len) * sizeof(float));
        std::fill(y + before + len, y + before + len + after, value);
      }
      for (int d = rank - 2; d >= 0; --d) {  // odometer step over the outer output dims
        const auto inside = [&](int64_t i) { return i >= pads[d][0] && i < pads[d][0] + shape_in[d]; };
        const bool was = inside(idx[d]);
        src_off += in_stride[d];
        if (++idx[d] < out[d]) {
          outside += was - inside(idx[d]);
          break;
        }
        src_off -= in_stride[d] * out[d];
        idx[d] = 0;
        outside += was - inside(0);
      }
    }
  }
}

}  // namespace sparseprune
