#include "kernels/tensor_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu_features.h"
#include "kernels/partition.h"
#include "kernels/tensor_ops_entries.h"

namespace sparseprune {


void affine_map(const float* src, float* dst, int64_t n, float scale, float shift, Activation a, int n_threads) {
  if (a == Activation::none && scale == 1.0f && shift == 0.0f) {
    if (src != dst) std::memmove(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  auto body = SP_ISA_PICK(activation_map_entry);
  const int threads = threads_for_elements(n_threads, n);
  if (threads == 1) return body(src, dst, n, scale, shift, a);
  // Whole vectors per thread (16 floats: whole vectors of every path), so every element meets the
  // same code path.
  const int64_t vecs = (n + 15) / 16;
#pragma omp parallel num_threads(threads)
  for_each_part(threads, [&](int t) {
    const int64_t i0 = std::min(n, vecs * t / threads * 16), i1 = std::min(n, vecs * (t + 1) / threads * 16);
    body(src + i0, dst + i0, i1 - i0, scale, shift, a);
  });
}

void softmax_rows(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows, int64_t len,
                  int64_t causal_offset, int n_threads) {
  auto row = SP_ISA_PICK(softmax_row_entry);
  const int threads = threads_for_elements(n_threads, rows * len);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t valid = causal_offset >= 0 ? std::min(len, causal_offset + r + 1) : len;
    row(src + r * ld_src, dst + r * ld_dst, valid, len);
  }
}

void layernorm_rows(const float* src, float* dst, int64_t rows, int64_t len, const float* gamma, const float* beta,
                    float eps, int n_threads) {
  auto row = SP_ISA_PICK(layernorm_row_entry);
  const int threads = threads_for_elements(n_threads, rows * len);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t r = 0; r < rows; ++r) row(src + r * len, dst + r * len, len, gamma, beta, eps);
}

void binary_map(const float* a, const float* b, float* dst, int64_t n, bool multiply, Activation act, int n_threads) {
  const int threads = threads_for_elements(n_threads, n);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] = multiply ? a[i] * b[i] : a[i] + b[i];
  if (act != Activation::none) affine_map(dst, dst, n, 1.0f, 0.0f, act, n_threads);
}

void pool2d_planes(const float* src, float* dst, int64_t planes, int64_t H, int64_t W, int64_t OH, int64_t OW,
                   const int kernel[2], const int stride[2], const int padding[2], bool is_max, int n_threads) {
  auto plane = SP_ISA_PICK(pool_plane_entry);
  const int threads = threads_for_elements(n_threads, planes * OH * OW * kernel[0] * kernel[1]);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t p = 0; p < planes; ++p)
    plane(src + p * H * W, dst + p * OH * OW, H, W, OH, OW, kernel[0], kernel[1], stride[0], stride[1], padding[0],
          padding[1], is_max);
}

void permute_copy(const float* src, float* dst, const std::vector<int64_t>& shape, const std::vector<int>& perm) {
  const int rank = static_cast<int>(shape.size());
  std::vector<int64_t> in_stride(rank, 1);
  for (int d = rank - 2; d >= 0; --d) in_stride[d] = in_stride[d + 1] * shape[d + 1];
  std::vector<int64_t> out_shape(rank), step(rank);
  int64_t total = 1;
  for (int d = 0; d < rank; ++d) {
    out_shape[d] = shape[perm[d]];
    step[d] = in_stride[perm[d]];
    total *= out_shape[d];
  }
  if (total == 0) return;
  // Walk the output in order with an odometer over its index; the innermost dimension is a
  // strided read of the input.
  std::vector<int64_t> idx(rank, 0);
  const int64_t inner = out_shape[rank - 1], inner_step = step[rank - 1];
  int64_t src_off = 0;
  for (int64_t o = 0; o < total; o += inner) {
    const float* s = src + src_off;
    float* d = dst + o;
    if (inner_step == 1) std::memcpy(d, s, static_cast<size_t>(inner) * sizeof(float));
    else for (int64_t i = 0; i < inner; ++i) d[i] = s[i * inner_step];
    for (int dim = rank - 2; dim >= 0; --dim) {
      src_off += step[dim];
      if (++idx[dim] < out_shape[dim]) break;
      src_off -= step[dim] * out_shape[dim];
      idx[dim] = 0;
    }
  }
}

int64_t embedding_lookup(const float* ids, int64_t n, const float* table, int64_t n_rows, int64_t dim, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = ids[i];
    // Checked here, on every call: the ids are data, not part of the validated plan.
    if (!(v >= 0.0f) || v >= static_cast<float>(n_rows) || v != std::floor(v)) return i;
    std::memcpy(dst + i * dim, table + static_cast<int64_t>(v) * dim, static_cast<size_t>(dim) * sizeof(float));
  }
  return -1;
}

}  // namespace sparseprune
