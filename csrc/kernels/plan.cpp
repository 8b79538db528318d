#include "kernels/plan.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>

#include "kernels/attention.h"
#include "kernels/broadcast.h"
#include "kernels/gemm.h"
#include "kernels/partition.h"
#include "kernels/scratch.h"

namespace sparseprune {

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

// An embedding id as the user wrote it: an integer without decimals, else the float.
std::string id_str(float v) {
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15f) return std::to_string(static_cast<int64_t>(v));
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return std::to_string(v);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

std::string sym_str(const SymShape& s, const std::vector<DimRange>& dims) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    out += i ? ", " : "";
    if (s[i].dim < 0) out += std::to_string(s[i].k);
    else out += (s[i].k == 1 ? "" : std::to_string(s[i].k) + "*") + dims[s[i].dim].name;
  }
  return out + ")";
}

int64_t pool_out(int64_t in, int k, int s, int p) { return (in + 2 * p - k) / s + 1; }

constexpr int64_t kMaxSize = int64_t{1} << 31;  // a per-sample dimension (the validator's MAX_DIM)

int64_t product(std::vector<int64_t>::const_iterator a, std::vector<int64_t>::const_iterator b) {
  return std::accumulate(a, b, int64_t{1}, std::multiplies<int64_t>());
}

bool is_binary(OpKind k) { return k == OpKind::add || k == OpKind::sub || k == OpKind::mul || k == OpKind::div; }

// Elementwise ops may write over an input (the very same elements; see add_op and check_op).
bool runs_in_place(OpKind k) { return k == OpKind::activation || is_binary(k) || k == OpKind::affine; }

// Buffers the op reads.
std::vector<int> reads(const PlanOp& op) {
  if (op.kind == OpKind::constant) return {};
  std::vector<int> r{op.in};
  if (op.in2 >= 0) r.push_back(op.in2);
  if (op.in3 >= 0) r.push_back(op.in3);
  if (op.in4 >= 0) r.push_back(op.in4);
  if (op.in5 >= 0) r.push_back(op.in5);
  if (op.kind == OpKind::cat) r = op.ins;
  return r;
}

}  // namespace

Activation parse_activation(const std::string& name) {
  if (name.empty() || name == "none") return Activation::none;
  if (name == "relu") return Activation::relu;
  if (name == "relu6") return Activation::relu6;
  if (name == "gelu") return Activation::gelu;
  if (name == "silu") return Activation::silu;
  if (name == "sigmoid") return Activation::sigmoid;
  if (name == "tanh") return Activation::tanh;
  if (name == "hardswish") return Activation::hardswish;
  if (name == "gelu_tanh") return Activation::gelu_tanh;
  if (name == "hardsigmoid") return Activation::hardsigmoid;
  if (name == "sqrt") return Activation::sqrt;
  if (name == "rsqrt") return Activation::rsqrt;
  if (name == "exp") return Activation::exp;
  fail("unknown activation '" + name + "'");
}

std::shared_ptr<const DenseWeights> DenseWeights::make(int64_t rows, int64_t cols, const float* weight,
                                                       const float* bias) {
  if (rows < 1 || cols < 1) fail("dense weight must have at least one row and column");
  auto w = std::make_shared<DenseWeights>();
  w->rows = rows;
  w->cols = cols;
  w->packed.resize(static_cast<size_t>(packed_b_size(cols, rows)));
  gemm_pack_b(weight, cols, rows, 1, cols, w->packed.data());  // B(k, n) = W[n, k]
  if (bias) w->bias.assign(bias, bias + rows);
  return w;
}

std::shared_ptr<const DenseWeights> DenseWeights::from_sparse(const PackedLinear& sparse) {
  const int64_t rows = sparse.n_rows(), cols = sparse.n_cols();
  const int64_t br = sparse.block_rows(), bc = sparse.block_cols();
  const std::vector<int64_t> ptr = sparse.indptr(), idx = sparse.indices();
  const std::vector<float> val = sparse.values();
  std::vector<float> weight(static_cast<size_t>(rows * cols), 0.0f);
  // Block row r holds blocks [ptr[r], ptr[r + 1]), block j at block column idx[j] with br x bc
  // values (row-major); CSR is the 1 x 1 case. The last block row / column may overhang.
  for (int64_t r = 0; r + 1 < static_cast<int64_t>(ptr.size()); ++r)
    for (int64_t j = ptr[r]; j < ptr[r + 1]; ++j)
      for (int64_t i = 0; i < br; ++i)
        for (int64_t k = 0; k < bc; ++k) {
          const int64_t row = r * br + i, col = idx[j] * bc + k;
          if (row < rows && col < cols) weight[row * cols + col] += val[(j * br + i) * bc + k];
        }
  return make(rows, cols, weight.data(), sparse.has_bias() ? sparse.bias().data() : nullptr);
}

void Plan::set_dims(std::vector<DimRange> dims) {
  if (finalized_ || !sym_shapes_.empty()) fail("dims must be set before the buffers");
  if (dims.size() > static_cast<size_t>(kMaxDims)) fail("at most " + std::to_string(kMaxDims) + " dims");
  for (size_t i = 0; i < dims.size(); ++i) {
    const DimRange& d = dims[i];
    if (d.name.empty()) fail("dims[" + std::to_string(i) + "] has no name");
    for (size_t j = 0; j < i; ++j)
      if (dims[j].name == d.name) fail("dim '" + d.name + "' is declared twice");
    if (d.min < 1 || d.max < d.min || d.max > kMaxSize)
      fail("dim '" + d.name + "' needs 1 <= min <= max <= 2**31, got " + std::to_string(d.min) + ".." +
           std::to_string(d.max));
  }
  dims_ = std::move(dims);
}

int Plan::add_buffer(const SymShape& shape, int alias_of) {
  if (finalized_ || !bounds_.empty()) fail("buffers must be added before the ops");
  const std::string where = "buffer " + std::to_string(sym_shapes_.size());
  if (shape.empty() || shape.size() > 8) fail(where + " must have 1 to 8 dimensions");
  // Sizes at the dims' max values; the element count as coef * prod(dim ** power), so aliases
  // are compared for every value of the dims.
  int64_t n = 1, coef = 1;
  std::vector<int> power(dims_.size(), 0);
  for (const SymDim& d : shape) {
    if (d.dim < -1 || d.dim >= static_cast<int>(dims_.size())) fail(where + " names an unknown dim");
    const int64_t hi = d.dim < 0 ? 1 : dims_[d.dim].max;
    if (d.k < 1 || d.k > kMaxSize || hi > kMaxSize / d.k)
      fail(where + " has a bad dimension in " + sym_str(shape, dims_));
    const int64_t size = d.k * hi;
    if (n > kMaxSampleElements / size) fail(where + " " + sym_str(shape, dims_) + " is too large");  // checked before n * size can overflow
    n *= size;
    coef *= d.k;  // <= n
    if (d.dim >= 0) ++power[d.dim];
  }
  if (alias_of < 0) {
    if (storage_per_sample_ > kMaxSampleElements - n)
      fail(where + ": the buffers need more than " + std::to_string(kMaxSampleElements) + " elements per sample");
    storage_per_sample_ += n;
  }
  if (alias_of >= static_cast<int>(sym_shapes_.size())) fail(where + ": alias_of must name an earlier buffer");
  if (alias_of >= 0) {
    int64_t coef_a = 1;
    std::vector<int> power_a(dims_.size(), 0);
    for (const SymDim& d : sym_shapes_[alias_of]) {
      coef_a *= d.k;
      if (d.dim >= 0) ++power_a[d.dim];
    }
    if (coef_a != coef || power_a != power)
      fail(where + ": alias of buffer " + std::to_string(alias_of) + " must have the same element count");
  }
  sym_shapes_.push_back(shape);
  alias_.push_back(alias_of < 0 ? -1 : alias_of);
  return static_cast<int>(sym_shapes_.size()) - 1;
}

std::string Plan::dims_str(const std::vector<int64_t>& values) const {
  std::string out;
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + dims_[i].name + "=" + std::to_string(values[i]);
  return out;
}

PlanInstance::PlanInstance(const Plan& plan, std::vector<int64_t> dims) : plan_(&plan), dims_(std::move(dims)) {
  for (const SymShape& sym : plan.sym_shapes_) {
    std::vector<int64_t> shape;
    for (const SymDim& d : sym) shape.push_back(d.dim < 0 ? d.k : d.k * dims_[d.dim]);  // <= the size at max
    numel_.push_back(product(shape.begin(), shape.end()));
    shapes_.push_back(std::move(shape));
  }
}

void Plan::check_buffer(int id, const std::string& what) const {
  if (id < 0 || id >= static_cast<int>(sym_shapes_.size()))
    fail(what + " = " + std::to_string(id) + " is not a buffer id (0.." +
         std::to_string(static_cast<int>(sym_shapes_.size()) - 1) + ")");
}

void Plan::set_io(const std::vector<int>& inputs, const std::vector<int>& outputs) {
  if (inputs.empty()) fail("inputs must not be empty");
  if (outputs.empty()) fail("outputs must not be empty");
  for (int b : inputs) check_buffer(b, "inputs[]");
  for (int b : outputs) check_buffer(b, "outputs[]");
  for (size_t i = 0; i < inputs.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (root(inputs[i]) == root(inputs[j])) fail("inputs must be distinct buffers");
  inputs_ = inputs;
  outputs_ = outputs;
}

void Plan::add_op(PlanOp op) {
  if (finalized_) fail("the plan is finalized");
  const std::string where = "ops[" + std::to_string(ops_.size()) + "]";
  if (op.kind == OpKind::cat) {
    if (op.ins.empty()) fail(where + ": cat needs at least one input");
    op.in = op.ins[0];
  }
  for (int b : reads(op)) check_buffer(b, where + ".in");
  check_buffer(op.out, where + ".out");
  if (is_binary(op.kind) || op.kind == OpKind::matmul) check_buffer(op.in2, where + ".b");
  if (op.kind == OpKind::attention) {
    check_buffer(op.in2, where + ".k");
    check_buffer(op.in3, where + ".v");
  }
  if (bounds_.empty()) {  // the buffers are complete: their shapes at the dims' min and max values
    std::vector<int64_t> lo, hi;
    for (const DimRange& d : dims_) lo.push_back(d.min), hi.push_back(d.max);
    bounds_.emplace_back(new PlanInstance(*this, lo));
    if (hi != lo) bounds_.emplace_back(new PlanInstance(*this, hi));
  }
  if (op.kind == OpKind::constant) {
    if (op.value_shape.empty()) {  // out's shape, which must be static
      for (const SymDim& d : sym_shapes_[op.out]) {
        if (d.dim >= 0) fail(where + ": a constant writing a buffer with dims needs its value's shape");
        op.value_shape.push_back(d.k);
      }
    }
    int64_t n = 1;
    for (int64_t d : op.value_shape) {
      if (d < 1 || d > kMaxSize || n > kMaxSampleElements / d) fail(where + ": bad constant shape");
      n *= d;
    }
    if (static_cast<int64_t>(op.table.size()) != n)
      fail(where + ": constant must hold " + std::to_string(n) + " values (one sample)");
    if (op.value_shape != bounds_.back()->shape(op.out))
      fail(where + ": the constant's shape must be out's shape at the dims' max values " +
           shape_str(bounds_.back()->shape(op.out)));
  }
  const bool elementwise = runs_in_place(op.kind);
  for (int b : reads(op))
    if (!elementwise && root(b) == root(op.out))
      fail(where + ": output must not share storage with an input (only elementwise ops run in place)");
  for (const auto& inst : bounds_) {
    try {
      inst->check_op(op, where);
    } catch (const std::invalid_argument& e) {
      if (dims_.empty()) throw;
      fail(std::string(e.what()) + " (with dims " + dims_str(inst->dims()) + ")");
    }
  }
  ops_.push_back(std::move(op));
}

void PlanInstance::check_op(const PlanOp& op, const std::string& where) const {
  if (op.kind == OpKind::constant) {  // out is the value's leading block
    const auto& so = shapes_[op.out];
    bool ok = so.size() == op.value_shape.size();
    for (size_t d = 0; ok && d < so.size(); ++d) ok = so[d] <= op.value_shape[d];
    if (!ok) fail(where + ": output " + shape_str(so) + " must fit in the constant " + shape_str(op.value_shape));
    return;
  }
  const auto& si = shapes_[op.in];
  const auto& so = shapes_[op.out];
  const bool elementwise = runs_in_place(op.kind);
  if (elementwise)  // in place only on the very same elements
    for (int b : reads(op))
      if (plan_->root(b) == plan_->root(op.out) && b != op.out && numel_[b] != numel_[op.out])
        fail(where + ": bad in-place operand");
  switch (op.kind) {
    case OpKind::linear: {
      // Sparse or dense weights; both only with a dense switch (the same weight, built from the sparse one).
      if (!op.linear && !op.dense) fail(where + ": linear needs sparse or dense weights");
      if ((op.linear && op.dense) != (op.dense_from > 0)) fail(where + ": linear has both weights exactly with dense_from");
      if (op.linear && op.dense && (op.dense->rows != op.linear->n_rows() || op.dense->cols != op.linear->n_cols()))
        fail(where + ": the dense switch's weight differs in shape");
      const int64_t rows = op.linear ? op.linear->n_rows() : op.dense->rows;
      const int64_t cols = op.linear ? op.linear->n_cols() : op.dense->cols;
      if (si.back() != cols) fail(where + ": input " + shape_str(si) + " must end in " + std::to_string(cols));
      std::vector<int64_t> want(si.begin(), si.end() - 1);
      want.push_back(rows);
      if (so != want) fail(where + ": output must have shape " + shape_str(want) + ", got " + shape_str(so));
      break;
    }
    case OpKind::conv2d: {
      // Exactly one of sparse, dense or depthwise weights, plus dense ones with a dense switch.
      if ((op.conv != nullptr) + (op.dense_conv != nullptr) + (op.depthwise != nullptr) != 1 + (op.dense_from > 0) ||
          (op.dense_from > 0 && !op.dense_conv))
        fail(where + ": conv2d needs exactly one of sparse, dense or depthwise weights (and dense ones with dense_from)");
      const ConvShape& cs = op.conv ? op.conv->shape() : op.dense_conv ? op.dense_conv->shape() : op.depthwise->shape();
      if (si.size() != 3 || si[0] != cs.in_channels)
        fail(where + ": input must be (" + std::to_string(cs.in_channels) + ", H, W), got " + shape_str(si));
      const ConvGeometry g = conv_geometry(cs, si[1], si[2]);
      const std::vector<int64_t> want{cs.out_channels, g.out_h, g.out_w};
      if (so != want) fail(where + ": output must have shape " + shape_str(want) + ", got " + shape_str(so));
      if (op.in2 >= 0 && shapes_[op.in2] != so)
        fail(where + ": residual must have the output's shape " + shape_str(so) + ", got " + shape_str(shapes_[op.in2]));
      break;
    }
    case OpKind::activation:
    case OpKind::affine:
      if (numel_[op.in] != numel_[op.out]) fail(where + ": input and output sizes differ");
      break;
    case OpKind::add:
    case OpKind::sub:
    case OpKind::mul:
    case OpKind::div: {  // numpy broadcasting; the in-place rule above keeps a broadcast operand apart from out
      std::vector<int64_t> want;
      if (!broadcast_shapes(si, shapes_[op.in2], &want))
        fail(where + ": operands " + shape_str(si) + " and " + shape_str(shapes_[op.in2]) + " do not broadcast");
      if (so != want) fail(where + ": output must have the broadcast shape " + shape_str(want) + ", got " + shape_str(so));
      break;
    }
    case OpKind::maxpool2d:
    case OpKind::avgpool2d: {
      for (int d = 0; d < 2; ++d) {
        if (op.kernel[d] < 1 || op.stride[d] < 1 || op.padding[d] < 0 || 2 * op.padding[d] > op.kernel[d])
          fail(where + ": bad kernel/stride/padding");
      }
      if (si.size() != 3) fail(where + ": input must be (C, H, W), got " + shape_str(si));
      const std::vector<int64_t> want{si[0], pool_out(si[1], op.kernel[0], op.stride[0], op.padding[0]),
                                      pool_out(si[2], op.kernel[1], op.stride[1], op.padding[1])};
      if (want[1] < 1 || want[2] < 1 || so != want)
        fail(where + ": output must have shape " + shape_str(want) + ", got " + shape_str(so));
      break;
    }
    case OpKind::global_avgpool:
      if (si.size() != 3 || so != std::vector<int64_t>{si[0], 1, 1})
        fail(where + ": global_avgpool maps (C, H, W) to (C, 1, 1)");
      break;
    case OpKind::softmax:
      if (si != so) fail(where + ": softmax keeps the shape");
      break;
    case OpKind::layernorm:
      if (si != so) fail(where + ": layernorm keeps the shape");
      if (static_cast<int64_t>(op.gamma.size()) != si.back() || op.beta.size() != op.gamma.size())
        fail(where + ": gamma and beta must have " + std::to_string(si.back()) + " entries");
      if (!(op.eps > 0.0f)) fail(where + ": eps must be > 0");
      break;
    case OpKind::matmul: {
      const auto& sb = shapes_[op.in2];
      if (si.size() < 2 || sb.size() != si.size()) fail(where + ": matmul operands need the same rank >= 2");
      if (!std::equal(si.begin(), si.end() - 2, sb.begin())) fail(where + ": matmul group dimensions differ");
      const int64_t M = si[si.size() - 2], K = si.back();
      const int64_t kb = op.transpose_b ? sb.back() : sb[sb.size() - 2];
      const int64_t N = op.transpose_b ? sb[sb.size() - 2] : sb.back();
      if (kb != K) fail(where + ": matmul inner dimensions differ: " + shape_str(si) + " and " + shape_str(sb));
      std::vector<int64_t> want(si.begin(), si.end() - 2);
      want.push_back(M);
      want.push_back(N);
      if (so != want) fail(where + ": output must have shape " + shape_str(want) + ", got " + shape_str(so));
      break;
    }
    case OpKind::attention: {
      const auto& sk = shapes_[op.in2];
      const auto& sv = shapes_[op.in3];
      if (op.sequence_first) {
        if (op.heads < 1) fail(where + ": heads must be >= 1");
        if (si.size() != 2 || sk.size() != 2 || sv.size() != 2) fail(where + ": sequence_first q, k, v must be (L, E)");
        if (si[1] % op.heads || sv[1] % op.heads || si[1] != sk[1] || sk[0] != sv[0])
          fail(where + ": q " + shape_str(si) + ", k " + shape_str(sk) + ", v " + shape_str(sv) +
               " do not fit " + std::to_string(op.heads) + " heads");
        if (so != std::vector<int64_t>{si[0], sv[1]}) fail(where + ": output must be (L, Ev)");
      } else {
        const size_t r = si.size();
        if (r < 2 || sk.size() != r || sv.size() != r) fail(where + ": q, k, v need the same rank >= 2");
        if (!std::equal(si.begin(), si.end() - 2, sk.begin()) || !std::equal(si.begin(), si.end() - 2, sv.begin()))
          fail(where + ": q, k, v group dimensions differ");
        if (si[r - 1] != sk[r - 1] || sk[r - 2] != sv[r - 2])
          fail(where + ": q " + shape_str(si) + ", k " + shape_str(sk) + ", v " + shape_str(sv) + " do not fit");
        std::vector<int64_t> want(si.begin(), si.end() - 1);
        want.push_back(sv.back());
        if (so != want) fail(where + ": output must have shape " + shape_str(want) + ", got " + shape_str(so));
      }
      if (!std::isfinite(op.scale)) fail(where + ": scale must be finite");
      if (op.in4 >= 0 && shapes_[op.in4] != std::vector<int64_t>{op.sequence_first ? sk[0] : sk[sk.size() - 2]})
        fail(where + ": key_mask must have one entry per key");
      if (op.in5 >= 0 && mask_strides(op).empty())
        fail(where + ": mask " + shape_str(shapes_[op.in5]) + " must broadcast to (heads, q rows, keys), each dim 1 or "
             "full (the head dims all 1 or all full)");
      break;
    }
    case OpKind::permute: {
      if (op.perm.size() != si.size()) fail(where + ": perm must list " + std::to_string(si.size()) + " dimensions");
      std::vector<bool> seen(si.size(), false);
      std::vector<int64_t> want;
      for (int p : op.perm) {
        if (p < 0 || p >= static_cast<int>(si.size()) || seen[p]) fail(where + ": perm is not a permutation");
        seen[p] = true;
        want.push_back(si[p]);
      }
      if (so != want) fail(where + ": output must have shape " + shape_str(want) + ", got " + shape_str(so));
      break;
    }
    case OpKind::cat: {
      if (op.axis < 0 || op.axis >= static_cast<int>(si.size())) fail(where + ": axis out of range");
      std::vector<int64_t> want = si;
      want[op.axis] = 0;
      for (int b : op.ins) {
        auto s = shapes_[b];
        if (s.size() != si.size()) fail(where + ": cat operands need the same rank");
        const int64_t along = s[op.axis];
        s[op.axis] = si[op.axis];
        if (s != si) fail(where + ": cat operands differ outside the axis");
        want[op.axis] += along;
      }
      if (so != want) fail(where + ": output must have shape " + shape_str(want) + ", got " + shape_str(so));
      break;
    }
    case OpKind::constant:
      break;  // handled above
    case OpKind::slice: {
      if (op.axis < 0 || op.axis >= static_cast<int>(si.size())) fail(where + ": axis out of range");
      if (op.step < 1) fail(where + ": step must be >= 1");
      if (so.size() != si.size()) fail(where + ": slice keeps the rank");
      for (size_t d = 0; d < si.size(); ++d)
        if (static_cast<int>(d) != op.axis && so[d] != si[d]) fail(where + ": slice changes only its axis");
      const int64_t len = so[op.axis];
      if (op.start < 0 || op.start >= si[op.axis] || op.start + (len - 1) * op.step >= si[op.axis])
        fail(where + ": slice start " + std::to_string(op.start) + ", step " + std::to_string(op.step) + ", length " +
             std::to_string(len) + " leaves the input's " + std::to_string(si[op.axis]) + " entries");
      break;
    }
    case OpKind::reduce: {
      if (op.axes.empty() || op.axes.size() > si.size()) fail(where + ": reduce needs 1 to rank axes");
      std::vector<int64_t> want = si;
      for (size_t i = 0; i < op.axes.size(); ++i) {
        if (op.axes[i] < 0 || op.axes[i] >= static_cast<int>(si.size()) || (i > 0 && op.axes[i] <= op.axes[i - 1]))
          fail(where + ": reduce axes must be sorted, unique and in range [0, " + std::to_string(si.size()) + ")");
        want[op.axes[i]] = 1;
      }
      if (so != want) fail(where + ": output must have shape " + shape_str(want) + ", got " + shape_str(so));
      break;
    }
    case OpKind::pad: {
      if (op.pads.size() != si.size()) fail(where + ": pads must hold one pair per dim (" + std::to_string(si.size()) + ")");
      std::vector<int64_t> want = si;
      for (size_t d = 0; d < si.size(); ++d) {
        if (op.pads[d][0] < 0 || op.pads[d][1] < 0 || op.pads[d][0] > (int64_t{1} << 31) || op.pads[d][1] > (int64_t{1} << 31))
          fail(where + ": pads out of range");
        want[d] += op.pads[d][0] + op.pads[d][1];
      }
      if (so != want) fail(where + ": output must have shape " + shape_str(want) + ", got " + shape_str(so));
      if (!std::isfinite(op.pad_value)) fail(where + ": pad value must be finite");
      break;
    }
    case OpKind::expand: {
      std::vector<int64_t> want;
      if (si.size() > so.size() || !broadcast_shapes(si, so, &want) || want != so)
        fail(where + ": input " + shape_str(si) + " does not broadcast to the output " + shape_str(so));
      break;
    }
    case OpKind::embedding: {
      if (op.table_rows < 1 || op.table.empty() || static_cast<int64_t>(op.table.size()) % op.table_rows)
        fail(where + ": bad embedding table");
      std::vector<int64_t> want = si;
      want.push_back(static_cast<int64_t>(op.table.size()) / op.table_rows);
      if (so != want) fail(where + ": output must have shape " + shape_str(want) + ", got " + shape_str(so));
      break;
    }
  }
}

std::vector<int64_t> PlanInstance::mask_strides(const PlanOp& op) const {
  // The target [groups..., L, S]; the mask right-aligned against it, each dim 1 or full, the
  // group dims all 1 or all full. Returns {sample, group, row, key} strides, empty if it does not fit.
  const auto& sq = shapes_[op.in];
  const auto& sk = shapes_[op.in2];
  const auto& sm = shapes_[op.in5];
  std::vector<int64_t> target;
  if (op.sequence_first) target = {op.heads, sq[0], sk[0]};
  else target.assign(sq.begin(), sq.end() - 1), target.push_back(sk[sk.size() - 2]);
  if (sm.size() > target.size()) return {};
  std::vector<int64_t> m(target.size() - sm.size(), 1);
  m.insert(m.end(), sm.begin(), sm.end());
  const size_t n_groups = target.size() - 2;
  bool lead_ones = true, lead_full = true;
  for (size_t d = 0; d < target.size(); ++d) {
    if (m[d] != 1 && m[d] != target[d]) return {};
    if (d < n_groups) lead_ones = lead_ones && m[d] == 1, lead_full = lead_full && m[d] == target[d];
  }
  if (!lead_ones && !lead_full) return {};
  const int64_t L = target[n_groups], S = target[n_groups + 1];
  const int64_t row = m[n_groups] == L && L > 1 ? m[n_groups + 1] : 0;  // a row of the mask: S or 1 floats
  const int64_t key = m[n_groups + 1] == S && S > 1 ? 1 : 0;
  const int64_t plane = m[n_groups] * m[n_groups + 1];
  return {numel_[op.in5], lead_full && !lead_ones ? plane : 0, row, key};
}

void Plan::finalize() {
  if (finalized_) return;
  if (ops_.empty()) fail("a plan needs at least one op");
  const int n = static_cast<int>(sym_shapes_.size());
  // Lifetime of each storage root in op steps: inputs from step -1, outputs to the end.
  first_.assign(n, -2);
  last_.assign(n, -2);
  std::vector<bool> written(n, false);
  for (int b : inputs_) written[root(b)] = true, first_[root(b)] = -1, last_[root(b)] = -1;
  const int end = static_cast<int>(ops_.size());
  for (int i = 0; i < end; ++i) {
    const PlanOp& op = ops_[i];
    for (int b : reads(op)) {
      if (!written[root(b)]) fail("ops[" + std::to_string(i) + "] reads buffer " + std::to_string(b) + " before any op writes it");
      last_[root(b)] = i;
    }
    const int o = root(op.out);
    if (!written[o]) first_[o] = i;
    written[o] = true;
    last_[o] = std::max(last_[o], i);
  }
  for (int b : outputs_) {
    if (!written[root(b)]) fail("output buffer " + std::to_string(b) + " is never written");
    last_[root(b)] = end;
  }
  for (const auto& inst : bounds_) inst->lay_out();
  finalized_ = true;
}

void PlanInstance::lay_out() {
  // Greedy interval placement, largest first: a root takes the lowest offset where it does not
  // overlap a placed root whose lifetime meets its own.
  const auto& first = plan_->first_;
  const auto& last = plan_->last_;
  const int n = static_cast<int>(shapes_.size());
  std::vector<int> roots;
  for (int b = 0; b < n; ++b)
    if (plan_->alias_[b] < 0 && first[b] != -2) roots.push_back(b);
  std::stable_sort(roots.begin(), roots.end(), [&](int a, int b) { return numel_[a] > numel_[b]; });
  offset_.assign(n, 0);
  std::vector<int> placed;
  arena_per_sample_ = 0;
  for (int b : roots) {
    const int64_t size = (numel_[b] + 15) / 16 * 16;
    std::vector<std::pair<int64_t, int64_t>> busy;
    for (int p : placed)
      if (!(last[p] < first[b] || last[b] < first[p])) busy.emplace_back(offset_[p], offset_[p] + (numel_[p] + 15) / 16 * 16);
    std::sort(busy.begin(), busy.end());
    int64_t at = 0;
    for (const auto& iv : busy) {
      if (iv.first >= at + size) break;
      at = std::max(at, iv.second);
    }
    offset_[b] = at;
    placed.push_back(b);
    arena_per_sample_ = std::max(arena_per_sample_, at + size);
  }
}

std::shared_ptr<const PlanInstance> Plan::instance(const std::vector<int64_t>& dims) const {
  if (!finalized_) fail("instance() before finalize()");
  if (dims.size() != dims_.size())
    fail("expected " + std::to_string(dims_.size()) + " dim values, got " + std::to_string(dims.size()));
  for (size_t i = 0; i < dims.size(); ++i)
    if (dims[i] < dims_[i].min || dims[i] > dims_[i].max)
      fail("dim '" + dims_[i].name + "' = " + std::to_string(dims[i]) + " is outside its range " +
           std::to_string(dims_[i].min) + ".." + std::to_string(dims_[i].max));
  for (const auto& inst : bounds_)  // never change after finalize: read without the lock
    if (inst->dims_ == dims) return inst;
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    for (auto it = cache_.begin(); it != cache_.end(); ++it)
      if ((*it)->dims_ == dims) {
        cache_.splice(cache_.begin(), cache_, it);
        return cache_.front();
      }
  }
  // A new assignment: every op's shape rule on its concrete shapes, then the arena (outside the
  // lock: other lengths keep running meanwhile).
  std::shared_ptr<PlanInstance> inst(new PlanInstance(*this, dims));
  for (size_t i = 0; i < ops_.size(); ++i) {
    try {
      inst->check_op(ops_[i], "ops[" + std::to_string(i) + "]");
    } catch (const std::invalid_argument& e) {
      fail(std::string(e.what()) + " (with dims " + dims_str(dims) + ")");
    }
  }
  inst->lay_out();
  std::lock_guard<std::mutex> lock(cache_mutex_);
  for (const auto& cached : cache_)  // made by another thread meanwhile: keep one
    if (cached->dims_ == dims) return cached;
  cache_.push_front(inst);
  if (cache_.size() > kInstanceCache) cache_.pop_back();
  return inst;
}

bool PlanInstance::runs_dense(const PlanOp& op, int64_t batch) const {
  if (op.kind == OpKind::linear) {
    if (!op.linear) return true;
    return op.dense_from > 0 && batch * (numel_[op.in] / op.linear->n_cols()) >= op.dense_from;
  }
  if (op.kind == OpKind::conv2d) return !op.conv && !op.depthwise ? true : op.dense_from > 0 && batch >= op.dense_from;
  return false;
}

std::vector<bool> Plan::runs_dense(const PlanInstance& inst, int64_t batch) const {
  if (inst.plan_ != this) fail("runs_dense() with another plan's instance");
  std::vector<bool> out;
  for (const PlanOp& op : ops_) out.push_back(inst.runs_dense(op, batch));
  return out;
}

void PlanInstance::run_op(const PlanOp& op, float* const* buf, int64_t batch, int n_threads) const {
  if (op.kind == OpKind::constant) {  // the same values in every sample: the value's leading block
    const auto& so = shapes_[op.out];
    const int64_t n = numel_[op.out];
    float* y = buf[op.out];
    if (batch < 1) return;
    if (so == op.value_shape) {
      std::memcpy(y, op.table.data(), static_cast<size_t>(n) * sizeof(float));
    } else {  // row by row (rows of the last dim), the value's multi-index walked like an odometer
      const size_t r = so.size();
      const int64_t len = so.back();
      std::vector<int64_t> idx(r, 0);
      for (int64_t row = 0; row < n / len; ++row) {
        int64_t src = 0;
        for (size_t d = 0; d + 1 < r; ++d) src = src * op.value_shape[d] + idx[d];
        std::memcpy(y + row * len, op.table.data() + src * op.value_shape[r - 1], static_cast<size_t>(len) * sizeof(float));
        for (size_t d = r - 1; d-- > 0;) {
          if (++idx[d] < so[d]) break;
          idx[d] = 0;
        }
      }
    }
    for (int64_t b = 1; b < batch; ++b) std::memcpy(y + b * n, y, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const float* x = buf[op.in];
  float* y = buf[op.out];
  const int64_t n_in = batch * numel_[op.in], n_out = batch * numel_[op.out];
  const auto& si = shapes_[op.in];
  switch (op.kind) {
    case OpKind::linear: {
      if (runs_dense(op, batch)) {
        const int64_t rows = n_in / op.dense->cols;
        gemm(x, op.dense->cols, op.dense->packed.data(), rows, op.dense->rows, op.dense->cols, 1.0f,
             op.dense->bias.empty() ? nullptr : op.dense->bias.data(), y, op.dense->rows, n_threads);
        affine_map(y, y, n_out, 1.0f, 0.0f, op.act, n_threads);
        break;
      }
      LinearArgs a;
      a.x = x;
      a.batch = n_in / op.linear->n_cols();
      a.x_stride_b = op.linear->n_cols();
      a.x_stride_k = 1;
      a.relu = op.act == Activation::relu;
      a.y = y;
      a.y_stride = op.linear->n_rows();
      a.n_threads = n_threads;
      op.linear->run(a);
      if (!a.relu) affine_map(y, y, n_out, 1.0f, 0.0f, op.act, n_threads);
      break;
    }
    case OpKind::conv2d: {
      const float* residual = op.in2 >= 0 ? buf[op.in2] : nullptr;
      const bool dense = runs_dense(op, batch);
      if (dense || op.depthwise) {
        if (dense) op.dense_conv->run(op.dense_conv->geometry(si[1], si[2]), x, batch, y, n_threads);
        else op.depthwise->run(op.depthwise->geometry(si[1], si[2]), x, batch, y, n_threads);
        if (residual) binary_map(y, residual, y, n_out, false, op.act, n_threads);
        else affine_map(y, y, n_out, 1.0f, 0.0f, op.act, n_threads);
        break;
      }
      ConvArgs a;
      a.residual = residual;
      a.x = x;
      a.batch = batch;
      a.x_stride[0] = numel_[op.in];
      a.x_stride[1] = si[1] * si[2];
      a.x_stride[2] = si[2];
      a.x_stride[3] = 1;
      a.relu = op.act == Activation::relu;
      a.y = y;
      a.n_threads = n_threads;
      op.conv->run(op.conv->geometry(si[1], si[2]), a);
      if (!a.relu) affine_map(y, y, n_out, 1.0f, 0.0f, op.act, n_threads);
      break;
    }
    case OpKind::activation: affine_map(x, y, n_out, 1.0f, 0.0f, op.act, n_threads); break;
    case OpKind::affine: affine_map(x, y, n_out, op.scale, op.shift, op.act, n_threads); break;
    case OpKind::add:
    case OpKind::sub:
    case OpKind::mul:
    case OpKind::div: {
      const BinaryOp bop = op.kind == OpKind::add ? BinaryOp::add : op.kind == OpKind::sub ? BinaryOp::sub
                           : op.kind == OpKind::mul ? BinaryOp::mul : BinaryOp::div;
      broadcast_binary(x, si, buf[op.in2], shapes_[op.in2], y, shapes_[op.out], batch, bop, op.act, n_threads);
      break;
    }
    case OpKind::maxpool2d:
    case OpKind::avgpool2d: {
      const auto& so = shapes_[op.out];
      pool2d_planes(x, y, batch * si[0], si[1], si[2], so[1], so[2], op.kernel, op.stride, op.padding,
                    op.kind == OpKind::maxpool2d, n_threads);
      break;
    }
    case OpKind::global_avgpool: {
      const int64_t plane = si[1] * si[2];
      for (int64_t p = 0; p < batch * si[0]; ++p) {
        double acc = 0.0;
        for (int64_t i = 0; i < plane; ++i) acc += x[p * plane + i];
        y[p] = static_cast<float>(acc / static_cast<double>(plane));
      }
      break;
    }
    case OpKind::softmax:
    case OpKind::layernorm: {
      const int64_t len = si.back();
      if (op.kind == OpKind::softmax) softmax_rows(x, len, y, len, n_in / len, len, -1, n_threads);
      else layernorm_rows(x, y, n_in / len, len, op.gamma.data(), op.beta.data(), op.eps, n_threads);
      break;
    }
    case OpKind::matmul: {
      const auto& sb = shapes_[op.in2];
      const int64_t M = si[si.size() - 2], K = si.back();
      const int64_t N = op.transpose_b ? sb[sb.size() - 2] : sb.back();
      const int64_t groups = batch * product(si.begin(), si.end() - 2);
      const float* b = buf[op.in2];
      const int threads = std::max(1, std::min<int>(threads_for_work(n_threads, double(groups) * M * N * K),
                                                    static_cast<int>(std::min<int64_t>(groups, 1 << 20))));
      if (groups == 1) {  // one product: split it inside
        std::vector<float> packed(static_cast<size_t>(packed_b_size(K, N)));
        gemm_pack_b(b, K, N, op.transpose_b ? 1 : N, op.transpose_b ? K : 1, packed.data());
        gemm(x, K, packed.data(), M, N, K, op.scale, nullptr, y, N, n_threads);
        break;
      }
#pragma omp parallel num_threads(threads) if (threads > 1)
      {
        std::vector<float> packed(static_cast<size_t>(packed_b_size(K, N)));
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; ++g) {
          gemm_pack_b(b + g * K * N, K, N, op.transpose_b ? 1 : N, op.transpose_b ? K : 1, packed.data());
          gemm_panels(x + g * M * K, K, packed.data(), M, N, K, op.scale, nullptr, y + g * M * N, N, 0,
                      (N + kGemmPanel - 1) / kGemmPanel);
        }
      }
      break;
    }
    case OpKind::attention: {
      const auto& sk = shapes_[op.in2];
      const auto& sv = shapes_[op.in3];
      AttentionArgs a;
      a.q = x;
      a.k = buf[op.in2];
      a.v = buf[op.in3];
      a.out = y;
      a.sequence_first = op.sequence_first;
      if (op.sequence_first) {
        a.batch = batch;
        a.heads = op.heads;
        a.L = si[0];
        a.S = sk[0];
        a.D = si[1] / op.heads;
        a.Dv = sv[1] / op.heads;
      } else {
        a.batch = batch * product(si.begin(), si.end() - 2);
        a.heads = 1;
        a.L = si[si.size() - 2];
        a.S = sk[sk.size() - 2];
        a.D = si.back();
        a.Dv = sv.back();
      }
      a.scale = op.scale;
      a.causal = op.causal;
      a.groups_per_sample = op.sequence_first ? op.heads : product(si.begin(), si.end() - 2);
      if (op.in4 >= 0) a.key_mask = buf[op.in4];
      if (op.in5 >= 0) {
        const std::vector<int64_t> st = mask_strides(op);
        a.mask = buf[op.in5];
        std::copy(st.begin(), st.end(), a.mask_stride);
        a.mask_additive = op.mask_additive;
      }
      a.n_threads = n_threads;
      attention(a);
      break;
    }
    case OpKind::permute: {
      const int64_t per = numel_[op.in];
      for (int64_t s = 0; s < batch; ++s) permute_copy(x + s * per, y + s * per, si, op.perm);
      break;
    }
    case OpKind::cat: {
      const int64_t outer = product(si.begin(), si.begin() + op.axis);
      const int64_t out_chunk = numel_[op.out] / outer;
      for (int64_t s = 0; s < batch; ++s) {
        int64_t col = 0;
        for (int b : op.ins) {
          const int64_t chunk = numel_[b] / outer;
          const float* src = buf[b] + s * numel_[b];
          float* dst = y + s * numel_[op.out] + col;
          for (int64_t o = 0; o < outer; ++o)
            std::memcpy(dst + o * out_chunk, src + o * chunk, static_cast<size_t>(chunk) * sizeof(float));
          col += chunk;
        }
      }
      break;
    }
    case OpKind::constant:
      break;  // written above
    case OpKind::slice: {
      const int64_t outer = product(si.begin(), si.begin() + op.axis);
      const int64_t inner = product(si.begin() + op.axis + 1, si.end());
      const int64_t in_len = si[op.axis], out_len = shapes_[op.out][op.axis];
      for (int64_t s = 0; s < batch; ++s) {
        const float* src = x + s * numel_[op.in];
        float* dst = y + s * numel_[op.out];
        for (int64_t o = 0; o < outer; ++o)
          for (int64_t i = 0; i < out_len; ++i)
            std::memcpy(dst + (o * out_len + i) * inner, src + (o * in_len + op.start + i * op.step) * inner,
                        static_cast<size_t>(inner) * sizeof(float));
      }
      break;
    }
    case OpKind::reduce: reduce_axes(x, si, op.axes, op.reduce_mean, y, batch, n_threads); break;
    case OpKind::pad: pad_constant(x, si, op.pads, op.pad_value, y, batch, n_threads); break;
    case OpKind::expand: broadcast_copy(x, si, y, shapes_[op.out], batch, n_threads); break;
    case OpKind::embedding: {
      const int64_t dim = static_cast<int64_t>(op.table.size()) / op.table_rows;
      const int64_t bad = embedding_lookup(x, n_in, op.table.data(), op.table_rows, dim, y);
      if (bad >= 0)
        fail("(embedding): sample " + std::to_string(bad / numel_[op.in]) + " holds " + id_str(x[bad]) +
             " at index " + std::to_string(bad % numel_[op.in]) + ", not a row of the table [0, " +
             std::to_string(op.table_rows) + ")");
      break;
    }
  }
}

void Plan::run(const PlanInstance& inst, const std::vector<const float*>& inputs, int64_t batch,
               const std::vector<float*>& outputs, int n_threads, double* op_seconds) const {
  if (!finalized_) fail("run() before finalize()");
  if (inst.plan_ != this) fail("run() with another plan's instance");
  // The arena is the calling thread's own (concurrent calls never share it), kept between calls
  // so a service does not pay fresh page faults on every request; laid out per instance. Not
  // zero-filled: every op writes all of its output.
  float* base = thread_arena().get(std::max<int64_t>(batch * inst.arena_per_sample_, 16));
  const size_t n = sym_shapes_.size();
  std::vector<float*> buf(n);
  for (size_t b = 0; b < n; ++b) buf[b] = base + batch * inst.offset_[root(static_cast<int>(b))];
  for (size_t k = 0; k < inputs_.size(); ++k)
    std::memcpy(buf[inputs_[k]], inputs[k], static_cast<size_t>(batch * inst.numel_[inputs_[k]]) * sizeof(float));
  for (size_t k = 0; k < ops_.size(); ++k) {
    try {
      if (op_seconds == nullptr) {
        inst.run_op(ops_[k], buf.data(), batch, n_threads);
      } else {
        const auto t0 = std::chrono::steady_clock::now();
        inst.run_op(ops_[k], buf.data(), batch, n_threads);
        op_seconds[k] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
    } catch (const std::invalid_argument& e) {  // data no plan check can catch: name the op
      fail("ops[" + std::to_string(k) + "] " + e.what());
    }
  }
  for (size_t k = 0; k < outputs_.size(); ++k)
    std::memcpy(outputs[k], buf[outputs_[k]], static_cast<size_t>(batch * inst.numel_[outputs_[k]]) * sizeof(float));
}

}  // namespace sparseprune
