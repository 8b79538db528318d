// A whole model as one native plan: buffers planned ahead (shapes per sample, batch given at run
// time) and a list of ops over them, executed in one call. Everything is validated when the plan
// is built (see bindings/plan.cpp); run() does no checking beyond the batch size.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/packed_conv.h"
#include "kernels/packed_linear.h"

namespace sparseprune {

enum class Activation { none, relu, relu6, gelu, silu, sigmoid, tanh, hardswish };
Activation parse_activation(const std::string& name);  // throws std::invalid_argument

enum class OpKind { linear, conv2d, activation, add, mul, maxpool2d, avgpool2d, global_avgpool, softmax, layernorm };

struct PlanOp {
  OpKind kind = OpKind::activation;
  int in = -1, in2 = -1, out = -1;
  Activation act = Activation::none;
  std::shared_ptr<const PackedLinear> linear;
  std::shared_ptr<const PackedConv> conv;
  int kernel[2] = {1, 1}, stride[2] = {1, 1}, padding[2] = {0, 0};  // pools
  std::vector<float> gamma, beta;                                   // layernorm
  float eps = 1e-5f;
};

class Plan {
 public:
  // A buffer of `shape` per sample; alias_of >= 0 shares that buffer's storage (same count).
  int add_buffer(const std::vector<int64_t>& shape, int alias_of);
  void set_io(const std::vector<int>& inputs, const std::vector<int>& outputs);
  // Checks the op against the buffers' shapes; throws std::invalid_argument naming the problem.
  void add_op(PlanOp op);

  const std::vector<int64_t>& shape(int buffer) const { return shapes_[buffer]; }
  int64_t numel(int buffer) const { return numel_[buffer]; }
  const std::vector<int>& inputs() const { return inputs_; }
  const std::vector<int>& outputs() const { return outputs_; }
  size_t n_ops() const { return ops_.size(); }

  // inputs[k] holds batch * numel(inputs()[k]) floats, outputs[k] room for numel(outputs()[k]).
  // Scratch is allocated per call, so concurrent calls never share buffers.
  void run(const std::vector<const float*>& inputs, int64_t batch, const std::vector<float*>& outputs,
           int n_threads) const;

 private:
  int root(int buffer) const { return alias_[buffer] >= 0 ? root(alias_[buffer]) : buffer; }
  void check_buffer(int id, const char* what) const;

  std::vector<std::vector<int64_t>> shapes_;
  std::vector<int64_t> numel_;
  std::vector<int> alias_;
  std::vector<int> inputs_, outputs_;
  std::vector<PlanOp> ops_;
};

}  // namespace sparseprune
