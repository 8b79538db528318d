// Data-movement and elementwise ops of the whole-model plan: permute, concatenate, embedding
// lookup, affine and activation maps. Plain loops; the elementwise ones split among threads.
#pragma once

#include <cstdint>
#include <vector>

namespace sparseprune {

// gelu_tanh: torch's gelu(approximate="tanh"); hardsigmoid: relu6(x + 3) / 6.
enum class Activation { none, relu, relu6, gelu, silu, sigmoid, tanh, hardswish, gelu_tanh, hardsigmoid, sqrt, rsqrt, exp };

// dst[i] = act(src[i] * scale + shift) for i < n (src may equal dst).
void affine_map(const float* src, float* dst, int64_t n, float scale, float shift, Activation a, int n_threads);

// dst[i] = act(a[i] + b[i]) or act(a[i] * b[i]).
void binary_map(const float* a, const float* b, float* dst, int64_t n, bool multiply, Activation act, int n_threads);

// Row-wise softmax: row r of src (stride ld_src) over its first valid(r) entries into dst
// (stride ld_dst), zeros after; valid(r) = len, or min(len, causal_offset + r + 1) when
// causal_offset >= 0. src may equal dst.
void softmax_rows(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows, int64_t len,
                  int64_t causal_offset, int n_threads);

// Layer norm over the last dimension (len) of rows x len, with gamma[len], beta[len].
void layernorm_rows(const float* src, float* dst, int64_t rows, int64_t len, const float* gamma, const float* beta,
                    float eps, int n_threads);

// Max or average pooling (count_include_pad) of `planes` planes H x W into OH x OW, with
// padding[d] <= kernel[d] / 2 (every window holds at least one input).
void pool2d_planes(const float* src, float* dst, int64_t planes, int64_t H, int64_t W, int64_t OH, int64_t OW,
                   const int kernel[2], const int stride[2], const int padding[2], bool is_max, int n_threads);

// Permutes the dimensions of a dense row-major tensor: out dimension d is in dimension perm[d].
// shape[rank] is the input's shape; out has shape[perm[0]], ..., shape[perm[rank - 1]].
void permute_copy(const float* src, float* dst, const std::vector<int64_t>& shape, const std::vector<int>& perm);

// Embedding lookup: ids[n] hold integer values (as floats) in [0, n_rows); dst[n x dim] receives
// the table rows. Returns the position of the first id that is not a valid row, or -1 (then
// nothing past it was written).
int64_t embedding_lookup(const float* ids, int64_t n, const float* table, int64_t n_rows, int64_t dim, float* dst);

}  // namespace sparseprune
