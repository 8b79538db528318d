// A whole model as one native plan: buffers planned ahead (shapes per sample, batch given at run
// time) and a list of ops over them, executed in one call. Everything is validated when the plan
// is built (see bindings/plan.cpp); run() checks only the data itself (embedding ids).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/dense_conv.h"
#include "kernels/depthwise_conv.h"
#include "kernels/packed_conv.h"
#include "kernels/packed_linear.h"
#include "kernels/tensor_ops.h"

namespace sparseprune {

Activation parse_activation(const std::string& name);  // throws std::invalid_argument

enum class OpKind {
  linear, conv2d, activation, add, mul, maxpool2d, avgpool2d, global_avgpool, softmax, layernorm,
  affine, matmul, attention, permute, cat, embedding, constant, slice, sub, div, reduce, pad, expand
};

// A dense Linear weight, packed once for the GEMM kernel (W^T in 16-column panels).
struct DenseWeights {
  int64_t rows = 0, cols = 0;
  std::vector<float> packed;  // gemm_pack_b of W^T: cols x rows
  std::vector<float> bias;    // rows entries, or empty
  static std::shared_ptr<const DenseWeights> make(int64_t rows, int64_t cols, const float* weight, const float* bias);
};

struct PlanOp {
  OpKind kind = OpKind::activation;
  // in2: add/sub/mul/div/matmul second operand, attention k, conv2d residual (optional); in3: attention v
  // in4: attention key mask (optional); in5: attention mask (optional)
  int in = -1, in2 = -1, in3 = -1, in4 = -1, in5 = -1, out = -1;
  std::vector<int> ins;                       // cat operands
  Activation act = Activation::none;
  std::shared_ptr<const PackedLinear> linear;  // linear: sparse weights, or
  std::shared_ptr<const DenseWeights> dense;   // dense weights
  std::shared_ptr<const PackedConv> conv;       // conv2d: sparse weights, or
  std::shared_ptr<const DenseConv> dense_conv;  // dense weights, or
  std::shared_ptr<const DepthwiseConv> depthwise;  // a depthwise layer's (sparse) weights
  int kernel[2] = {1, 1}, stride[2] = {1, 1}, padding[2] = {0, 0};  // pools
  std::vector<float> gamma, beta;                                   // layernorm
  float eps = 1e-5f;
  float scale = 1.0f, shift = 0.0f;  // affine; matmul/attention scale
  bool transpose_b = false;          // matmul
  bool causal = false, sequence_first = false;
  int heads = 1;                     // attention (sequence_first layout)
  bool mask_additive = false;        // attention mask (in5): additive, else bool
  std::vector<int> axes;             // reduce: per-sample axes, sorted, unique
  bool reduce_mean = false;          // reduce: mean, else sum
  std::vector<std::array<int64_t, 2>> pads;  // pad: [before, after] per per-sample dim
  float pad_value = 0.0f;
  std::vector<int> perm;             // permute, over per-sample dims
  int axis = 0;                      // cat, slice: over per-sample dims
  int64_t start = 0, step = 1;       // slice: out index i along axis reads in index start + i * step
  std::vector<float> table;          // embedding rows x dim; constant: one sample's values
  int64_t table_rows = 0;
};

// Per-sample float32 elements over all buffers that own storage (the same limit as the Python
// validator's MAX_SAMPLE_ELEMENTS): 1 GiB per sample; a hostile spec asking for more is refused.
constexpr int64_t kMaxSampleElements = int64_t{1} << 28;

class Plan {
 public:
  // A buffer of `shape` per sample; alias_of >= 0 shares that buffer's storage (same count).
  int add_buffer(const std::vector<int64_t>& shape, int alias_of);
  void set_io(const std::vector<int>& inputs, const std::vector<int>& outputs);
  // Checks the op against the buffers' shapes; throws std::invalid_argument naming the problem.
  void add_op(PlanOp op);
  // After the last add_op: checks every buffer is written before it is read and lays out the
  // arena, letting buffers whose lifetimes do not overlap share memory.
  void finalize();

  const std::vector<int64_t>& shape(int buffer) const { return shapes_[buffer]; }
  int64_t numel(int buffer) const { return numel_[buffer]; }
  const std::vector<int>& inputs() const { return inputs_; }
  const std::vector<int>& outputs() const { return outputs_; }
  size_t n_ops() const { return ops_.size(); }
  int64_t arena_floats_per_sample() const { return arena_per_sample_; }

  // inputs[k] holds batch * numel(inputs()[k]) floats, outputs[k] room for numel(outputs()[k]).
  // Scratch is allocated per call, so concurrent calls never share buffers. Throws
  // std::invalid_argument for data no plan check can catch (an embedding id out of range).
  void run(const std::vector<const float*>& inputs, int64_t batch, const std::vector<float*>& outputs,
           int n_threads) const;

 private:
  int root(int buffer) const { return alias_[buffer] >= 0 ? root(alias_[buffer]) : buffer; }
  void check_buffer(int id, const std::string& what) const;
  void run_op(const PlanOp& op, float* const* buf, int64_t batch, int n_threads) const;
  std::vector<int64_t> mask_strides(const PlanOp& op) const;  // attention mask; empty: does not fit

  std::vector<std::vector<int64_t>> shapes_;
  std::vector<int64_t> numel_;
  std::vector<int> alias_;
  std::vector<int> inputs_, outputs_;
  std::vector<PlanOp> ops_;
  std::vector<int64_t> offset_;  // per root buffer, in floats per sample (times batch at run time)
  int64_t arena_per_sample_ = 0;
  int64_t storage_per_sample_ = 0;  // sum over storage-owning buffers, for the limit above
  bool finalized_ = false;
};

}  // namespace sparseprune
