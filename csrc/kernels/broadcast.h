// Shape-changing elementwise ops of the whole-model plan: binary ops with numpy broadcasting,
// expand (broadcast copy), reductions over axes (keepdim) and constant padding.
//
// Shapes are per sample (row-major, dense); `batch` samples lie one after the other. Every op
// first reduces its shapes to the fewest loops (size-1 dims dropped, dims that walk memory the
// same way merged), so the common cases run as long contiguous rows: [C,H,W] * [C,1,1] is C rows
// of H*W times a scalar, [S,D] + [D] is S rows of D, [H,S,S] + [1,1,S] is H*S rows of S. The
// index arithmetic is per row, never per element.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "kernels/tensor_ops.h"

namespace sparseprune {

enum class BinaryOp { add, sub, mul, div };

// numpy's broadcast of two shapes (right-aligned, size-1 dims stretch); false if they clash.
bool broadcast_shapes(const std::vector<int64_t>& a, const std::vector<int64_t>& b, std::vector<int64_t>* out);

// dst[batch, out] = act(a op b), a[batch, shape_a] and b[batch, shape_b] broadcast to shape_out
// (which must be their broadcast shape). dst may equal a or b when that operand has shape_out's
// element count (it is then not broadcast).
void broadcast_binary(const float* a, const std::vector<int64_t>& shape_a, const float* b,
                      const std::vector<int64_t>& shape_b, float* dst, const std::vector<int64_t>& shape_out,
                      int64_t batch, BinaryOp op, Activation act, int n_threads);

// dst[batch, shape_out] = src[batch, shape_in] broadcast (shape_in must broadcast to shape_out).
void broadcast_copy(const float* src, const std::vector<int64_t>& shape_in, float* dst,
                    const std::vector<int64_t>& shape_out, int64_t batch, int n_threads);

// dst[batch, shape_in with `axes` set to 1] = sum (or mean) of src[batch, shape_in] over the
// per-sample `axes` (sorted, unique, each < rank).
void reduce_axes(const float* src, const std::vector<int64_t>& shape_in, const std::vector<int>& axes, bool mean,
                 float* dst, int64_t batch, int n_threads);

// dst[batch, shape_in[d] + pads[d][0] + pads[d][1]] = src placed at offset pads[d][0] in every
// dim d, `value` around it.
void pad_constant(const float* src, const std::vector<int64_t>& shape_in,
                  const std::vector<std::array<int64_t, 2>>& pads, float value, float* dst, int64_t batch,
                  int n_threads);

}  // namespace sparseprune
