// Scaled dot-product attention over activations: out = softmax(scale * Q K^T [+ causal mask]) V,
// per (sample, head) group, on the dense GEMM kernel.
#pragma once

#include <cstdint>

namespace sparseprune {

struct AttentionArgs {
  // Group g (of batch * heads) reads q[q_offset(g) + l * q_ld + d] for l < L, d < D; k likewise
  // with S rows and D columns, v with S rows and Dv columns; writes out (L rows, Dv columns).
  // Layouts: heads_first (per sample [heads, rows, cols], ld = cols) or sequence_first (per
  // sample [rows, heads * cols], ld = heads * cols, head h at column h * cols).
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  float* out = nullptr;
  int64_t batch = 0, heads = 1, L = 0, S = 0, D = 0, Dv = 0;
  bool sequence_first = false;
  float scale = 1.0f;
  bool causal = false;  // query l sees keys s <= l (torch's is_causal: top-left aligned)
  // key_mask[sample * S + s] != 0: key s of that sample is padding, seen by no query (torch's
  // key_padding_mask); null for none. Group g belongs to sample g / groups_per_sample.
  const float* key_mask = nullptr;
  int64_t groups_per_sample = 1;
  // mask: group g, query l, key s reads mask[(g / groups_per_sample) * mask_stride[0] +
  // (g % groups_per_sample) * mask_stride[1] + l * mask_stride[2] + s * mask_stride[3]] (a
  // stride of 0 broadcasts); null for none. Bool (mask_additive false): 0 = this query does not
  // attend this key (-inf score); additive: added to the scaled score. With a mask, a query row
  // left with only -inf scores gives zeros (torch's SDPA), not NaN.
  const float* mask = nullptr;
  int64_t mask_stride[4] = {0, 0, 0, 0};
  bool mask_additive = false;
  int n_threads = 0;
};

void attention(const AttentionArgs& args);

}  // namespace sparseprune
