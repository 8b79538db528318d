// A whole model as one native plan: buffers planned ahead (shapes per sample, batch given at run
// time) and a list of ops over them, executed in one call. Everything is validated when the plan
// is built (see bindings/plan.cpp); run() checks only the data itself (embedding ids).
//
// Dynamic dims: a buffer shape entry is a static size or k * a named dim with a [min, max] range
// (a sequence length). The plan keeps the symbolic shapes; a PlanInstance is the plan at one
// assignment of the dims (concrete shapes, element counts, arena layout), checked op by op when
// it is made, and run() reads only an instance. Instances for recent assignments are cached.
#pragma once

#include <array>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
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
  // The same weight from a validated sparse one (CSR or block-sparse), for an op's dense switch.
  static std::shared_ptr<const DenseWeights> from_sparse(const PackedLinear& sparse);
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
  // linear / conv2d stored sparse: from this many input rows (linear: batch x rows per sample;
  // conv2d: images) on, run the dense kernel on `dense` / `dense_conv`, built from the sparse
  // weights at load (compile measured dense faster there); 0: never.
  int64_t dense_from = 0;
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
  // constant: the values' per-sample shape (out's shape at the dims' max values; empty = out's
  // static shape); a smaller out gets the leading block out[i, j, ..] = value[i, j, ..]
  std::vector<int64_t> value_shape;
};

// A per-sample shape entry: k (dim < 0), or k * the value of dim `dim`.
struct SymDim {
  int64_t k = 1;
  int dim = -1;
};
using SymShape = std::vector<SymDim>;

struct DimRange {
  std::string name;
  int64_t min = 1, max = 1;
};

// At most this many dims (the Python validator's MAX_DIMS).
constexpr int kMaxDims = 8;

// Per-sample float32 elements over all buffers that own storage (the same limit as the Python
// validator's MAX_SAMPLE_ELEMENTS): 1 GiB per sample; a hostile spec asking for more is refused.
constexpr int64_t kMaxSampleElements = int64_t{1} << 28;

class Plan;

// The plan at one assignment of its dims: every buffer's concrete shape and element count, and
// the arena layout. The per-op shape rules and the kernels read these, never the symbolic shapes.
class PlanInstance {
 public:
  const std::vector<int64_t>& dims() const { return dims_; }
  const std::vector<int64_t>& shape(int buffer) const { return shapes_[buffer]; }
  int64_t numel(int buffer) const { return numel_[buffer]; }
  int64_t arena_floats_per_sample() const { return arena_per_sample_; }
  // Whether a linear / conv2d op runs its dense kernel at this batch (its dense format, or its
  // dense switch: PlanOp::dense_from).
  bool runs_dense(const PlanOp& op, int64_t batch) const;

 private:
  friend class Plan;
  PlanInstance(const Plan& plan, std::vector<int64_t> dims);  // resolves the shapes
  // The op's shape rule on these shapes; throws std::invalid_argument naming the problem.
  void check_op(const PlanOp& op, const std::string& where) const;
  // Offsets in the arena, letting buffers whose lifetimes do not overlap share memory.
  void lay_out();
  void run_op(const PlanOp& op, float* const* buf, int64_t batch, int n_threads) const;
  // The attention mask's element strides over (batch, head, query, key) on these shapes; empty:
  // the mask does not broadcast to the scores.
  std::vector<int64_t> mask_strides(const PlanOp& op) const;

  const Plan* plan_;
  std::vector<int64_t> dims_;
  std::vector<std::vector<int64_t>> shapes_;
  std::vector<int64_t> numel_;
  std::vector<int64_t> offset_;  // per root buffer, in floats per sample (times batch at run time)
  int64_t arena_per_sample_ = 0;
};

class Plan {
 public:
  // The dims, before the first buffer (none: every shape is static).
  void set_dims(std::vector<DimRange> dims);
  // A buffer of `shape` per sample (sizes bounded at the dims' max values); alias_of >= 0
  // shares that buffer's storage (the same element count for every value of the dims).
  int add_buffer(const SymShape& shape, int alias_of);
  void set_io(const std::vector<int>& inputs, const std::vector<int>& outputs);
  // Checks the op against the buffers' shapes at the dims' min and max values; throws
  // std::invalid_argument naming the problem.
  void add_op(PlanOp op);
  // After the last add_op: checks every buffer is written before it is read and lays out the
  // arenas of the instances at the dims' min and max values.
  void finalize();

  const std::vector<DimRange>& dims() const { return dims_; }
  const SymShape& sym_shape(int buffer) const { return sym_shapes_[buffer]; }
  const std::vector<int>& inputs() const { return inputs_; }
  const std::vector<int>& outputs() const { return outputs_; }
  size_t n_ops() const { return ops_.size(); }
  // Per op: whether it runs its dense kernel at this batch (PlanInstance::runs_dense).
  std::vector<bool> runs_dense(const PlanInstance& inst, int64_t batch) const;

  // The instance for `dims` (one value per dim, inside its range): from a small cache of recent
  // assignments, else made (and every op checked) now. Thread-safe; the instance stays valid as
  // long as the caller holds it. Throws std::invalid_argument for a bad assignment or an op
  // whose shape rule fails at it.
  std::shared_ptr<const PlanInstance> instance(const std::vector<int64_t>& dims) const;

  // inputs[k] holds batch * inst.numel(inputs()[k]) floats, outputs[k] room for
  // inst.numel(outputs()[k]). Scratch is allocated per call, so concurrent calls never share
  // buffers. Throws std::invalid_argument for data no plan check can catch (an embedding id out
  // of range).
  // op_seconds (optional, n_ops() entries): each op's wall time is added to its entry (profiling;
  // the clock reads cost ~50 ns per op).
  void run(const PlanInstance& inst, const std::vector<const float*>& inputs, int64_t batch,
           const std::vector<float*>& outputs, int n_threads, double* op_seconds = nullptr) const;

 private:
  friend class PlanInstance;
  // Instances kept for recent assignments besides those at the dims' min and max (a service
  // sees few distinct lengths at a time; each instance is small: shapes and offsets).
  static constexpr size_t kInstanceCache = 16;

  int root(int buffer) const { return alias_[buffer] >= 0 ? root(alias_[buffer]) : buffer; }
  void check_buffer(int id, const std::string& what) const;
  std::string dims_str(const std::vector<int64_t>& values) const;

  std::vector<DimRange> dims_;
  std::vector<SymShape> sym_shapes_;
  std::vector<int> alias_;
  std::vector<int> inputs_, outputs_;
  std::vector<PlanOp> ops_;
  int64_t storage_per_sample_ = 0;  // sum over storage-owning buffers at the dims' max, for the limit above
  // Lifetime of each storage root in op steps (set by finalize; -2 = never written).
  std::vector<int> first_, last_;
  // The instances at the dims' min and max values (one when the plan has no dims): every op is
  // checked on them as it is added, and they are laid out by finalize.
  std::vector<std::shared_ptr<PlanInstance>> bounds_;
  mutable std::mutex cache_mutex_;
  mutable std::list<std::shared_ptr<const PlanInstance>> cache_;  // most recently used first
  bool finalized_ = false;
};

}  // namespace sparseprune
