#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/gemm.h"
#include "kernels/partition.h"
#include "kernels/tensor_ops.h"

namespace sparseprune {

namespace {

// Query rows per block: bounds the score scratch to kQueryBlock x S floats per thread.
constexpr int64_t kQueryBlock = 64;

struct GroupView {
  const float *q, *k, *v;
  float* out;
  int64_t ld_q, ld_k, ld_v, ld_out;
};

GroupView group_view(const AttentionArgs& a, int64_t g) {
  const int64_t b = g / a.heads, h = g % a.heads;
  if (a.sequence_first) {
    const int64_t e = a.heads * a.D, ev = a.heads * a.Dv;
    return {a.q + b * a.L * e + h * a.D, a.k + b * a.S * e + h * a.D, a.v + b * a.S * ev + h * a.Dv,
            a.out + b * a.L * ev + h * a.Dv, e, e, ev, ev};
  }
  return {a.q + g * a.L * a.D, a.k + g * a.S * a.D, a.v + g * a.S * a.Dv, a.out + g * a.L * a.Dv,
          a.D, a.D, a.Dv, a.Dv};
}

// Applies the mask to the scores of queries l0 .. l0 + rows - 1 of group g; dead[r] = row r has
// no finite-weight key left among those softmax will read (causal: keys s <= l).
void apply_mask(const AttentionArgs& a, int64_t g, int64_t l0, int64_t rows, float* scores, int64_t ld_s,
                std::vector<char>& dead) {
  dead.assign(static_cast<size_t>(rows), 0);
  const float* base = a.mask + (g / a.groups_per_sample) * a.mask_stride[0] + (g % a.groups_per_sample) * a.mask_stride[1];
  const int64_t cs = a.mask_stride[3];
  for (int64_t r = 0; r < rows; ++r) {
    const float* m = base + (l0 + r) * a.mask_stride[2];
    float* row = scores + r * ld_s;
    if (a.mask_additive) {
      for (int64_t s = 0; s < a.S; ++s) row[s] += m[s * cs];
    } else {
      for (int64_t s = 0; s < a.S; ++s) row[s] = m[s * cs] != 0.0f ? row[s] : -INFINITY;
    }
    const int64_t valid = a.causal ? std::min(a.S, l0 + r + 1) : a.S;
    bool all_inf = true;
    for (int64_t s = 0; s < valid && all_inf; ++s) all_inf = row[s] == -INFINITY;
    dead[static_cast<size_t>(r)] = all_inf;
  }
}

void attend_group(const AttentionArgs& a, int64_t g, std::vector<float>& kt, std::vector<float>& vp,
                  std::vector<float>& scores) {
  std::vector<char> dead;
  const GroupView w = group_view(a, g);
  kt.resize(static_cast<size_t>(packed_b_size(a.D, a.S)));
  vp.resize(static_cast<size_t>(packed_b_size(a.S, a.Dv)));
  const int64_t ld_s = (a.S + 15) / 16 * 16;
  scores.resize(static_cast<size_t>(std::min(kQueryBlock, a.L) * ld_s));
  gemm_pack_b(w.k, a.D, a.S, 1, w.ld_k, kt.data());  // K^T: element (d, s) = k[s, d]
  gemm_pack_b(w.v, a.S, a.Dv, w.ld_v, 1, vp.data());
  const int64_t s_panels = (a.S + kGemmPanel - 1) / kGemmPanel, v_panels = (a.Dv + kGemmPanel - 1) / kGemmPanel;
  for (int64_t l0 = 0; l0 < a.L; l0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, a.L - l0);
    gemm_panels(w.q + l0 * w.ld_q, w.ld_q, kt.data(), rows, a.S, a.D, a.scale, nullptr, scores.data(), ld_s, 0,
                s_panels);
    if (a.key_mask) {  // padding keys: -inf scores, so they get no weight (all masked: NaN, as in torch)
      const float* mask = a.key_mask + (g / a.groups_per_sample) * a.S;
      for (int64_t s = 0; s < a.S; ++s)
        if (mask[s] != 0.0f)
          for (int64_t r = 0; r < rows; ++r) scores[static_cast<size_t>(r * ld_s + s)] = -INFINITY;
    }
    if (a.mask) apply_mask(a, g, l0, rows, scores.data(), ld_s, dead);
    softmax_rows(scores.data(), ld_s, scores.data(), ld_s, rows, a.S, a.causal ? l0 : -1, 1);
    if (a.mask)
      for (int64_t r = 0; r < rows; ++r)
        if (dead[static_cast<size_t>(r)]) std::fill(scores.begin() + r * ld_s, scores.begin() + (r + 1) * ld_s, 0.0f);
    gemm_panels(scores.data(), ld_s, vp.data(), rows, a.Dv, a.S, 1.0f, nullptr, w.out + l0 * w.ld_out, w.ld_out, 0,
                v_panels);
  }
}

}  // namespace

void attention(const AttentionArgs& a) {
  const int64_t groups = a.batch * a.heads;
  if (groups <= 0 || a.L <= 0 || a.Dv <= 0) return;
  const double work = static_cast<double>(groups) * a.L * a.S * (a.D + a.Dv);
  const int threads = static_cast<int>(std::min<int64_t>(threads_for_work(a.n_threads, work), groups));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> kt, vp, scores;  // per thread, reused across its groups
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) attend_group(a, g, kt, vp, scores);
  }
}

}  // namespace sparseprune
