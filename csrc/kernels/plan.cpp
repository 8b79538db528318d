#include "kernels/plan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace sparseprune {

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

float activate(float x, Activation a) {
  switch (a) {
    case Activation::none: return x;
    case Activation::relu: return x < 0.0f ? 0.0f : x;
    case Activation::relu6: return x < 0.0f ? 0.0f : (x > 6.0f ? 6.0f : x);
    case Activation::gelu: return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case Activation::silu: return x / (1.0f + std::exp(-x));
    case Activation::sigmoid: return 1.0f / (1.0f + std::exp(-x));
    case Activation::tanh: return std::tanh(x);
    case Activation::hardswish: {
      const float r = std::min(std::max(x + 3.0f, 0.0f), 6.0f);
      return x * r / 6.0f;
    }
  }
  return x;
}

void apply_activation(const float* src, float* dst, int64_t n, Activation a) {
  if (a == Activation::none) {
    if (src != dst) std::memmove(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = activate(src[i], a);
}

int64_t pool_out(int64_t in, int k, int s, int p) { return (in + 2 * p - k) / s + 1; }

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
  fail("unknown activation '" + name + "'");
}

int Plan::add_buffer(const std::vector<int64_t>& shape, int alias_of) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 1 || d > (int64_t{1} << 31)) fail("buffer " + std::to_string(shapes_.size()) + " has a bad dimension in " + shape_str(shape));
    n *= d;
    if (n > (int64_t{1} << 34)) fail("buffer " + std::to_string(shapes_.size()) + " is too large");
  }
  if (alias_of >= static_cast<int>(shapes_.size()))
    fail("buffer " + std::to_string(shapes_.size()) + ": alias_of must name an earlier buffer");
  if (alias_of >= 0 && numel_[alias_of] != n)
    fail("buffer " + std::to_string(shapes_.size()) + ": alias of buffer " + std::to_string(alias_of) +
         " must have the same element count");
  shapes_.push_back(shape);
  numel_.push_back(n);
  alias_.push_back(alias_of < 0 ? -1 : alias_of);
  return static_cast<int>(shapes_.size()) - 1;
}

void Plan::check_buffer(int id, const char* what) const {
  if (id < 0 || id >= static_cast<int>(shapes_.size()))
    fail(std::string(what) + " = " + std::to_string(id) + " is not a buffer id (0.." +
         std::to_string(static_cast<int>(shapes_.size()) - 1) + ")");
}

void Plan::set_io(const std::vector<int>& inputs, const std::vector<int>& outputs) {
  if (inputs.empty()) fail("inputs must not be empty");
  if (outputs.empty()) fail("outputs must not be empty");
  for (int b : inputs) check_buffer(b, "inputs[]");
  for (int b : outputs) check_buffer(b, "outputs[]");
  inputs_ = inputs;
  outputs_ = outputs;
}

void Plan::add_op(PlanOp op) {
  const std::string where = "ops[" + std::to_string(ops_.size()) + "]";
  check_buffer(op.in, (where + ".in").c_str());
  check_buffer(op.out, (where + ".out").c_str());
  const auto& si = shapes_[op.in];
  const auto& so = shapes_[op.out];
  const bool elementwise = op.kind == OpKind::activation || op.kind == OpKind::add || op.kind == OpKind::mul;
  if (!elementwise && root(op.in) == root(op.out))
    fail(where + ": output must not share storage with the input (only elementwise ops run in place)");
  switch (op.kind) {
    case OpKind::linear: {
      if (!op.linear) fail(where + ": linear without weights");
      const int64_t rows = op.linear->n_rows(), cols = op.linear->n_cols();
      if (si.back() != cols) fail(where + ": input " + shape_str(si) + " must end in " + std::to_string(cols));
      std::vector<int64_t> want(si.begin(), si.end() - 1);
      want.push_back(rows);
      if (so != want) fail(where + ": output must have shape " + shape_str(want) + ", got " + shape_str(so));
      break;
    }
    case OpKind::conv2d: {
      if (!op.conv) fail(where + ": conv2d without weights");
      if (si.size() != 3 || si[0] != op.conv->shape().in_channels)
        fail(where + ": input must be (" + std::to_string(op.conv->shape().in_channels) + ", H, W), got " + shape_str(si));
      const ConvGeometry g = op.conv->geometry(si[1], si[2]);
      const std::vector<int64_t> want{op.conv->shape().out_channels, g.out_h, g.out_w};
      if (so != want) fail(where + ": output must have shape " + shape_str(want) + ", got " + shape_str(so));
      break;
    }
    case OpKind::activation:
      if (numel_[op.in] != numel_[op.out]) fail(where + ": input and output sizes differ");
      break;
    case OpKind::add:
    case OpKind::mul:
      check_buffer(op.in2, (where + ".b").c_str());
      if (numel_[op.in] != numel_[op.out] || numel_[op.in2] != numel_[op.out])
        fail(where + ": operands and output must have the same size (no broadcasting)");
      break;
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
  }
  ops_.push_back(std::move(op));
}

void Plan::run(const std::vector<const float*>& inputs, int64_t batch, const std::vector<float*>& outputs,
               int n_threads) const {
  // One arena per call: offsets of every storage-owning buffer, aliases share their root's.
  std::vector<int64_t> offset(shapes_.size(), 0);
  int64_t total = 0;
  for (size_t b = 0; b < shapes_.size(); ++b) {
    if (alias_[b] >= 0) continue;
    offset[b] = total;
    total += (batch * numel_[b] + 15) / 16 * 16;
  }
  std::vector<float> arena(static_cast<size_t>(std::max<int64_t>(total, 1)));
  auto buf = [&](int b) { return arena.data() + offset[root(b)]; };
  for (size_t k = 0; k < inputs_.size(); ++k)
    std::memcpy(buf(inputs_[k]), inputs[k], static_cast<size_t>(batch * numel_[inputs_[k]]) * sizeof(float));

  for (const PlanOp& op : ops_) {
    const float* x = buf(op.in);
    float* y = buf(op.out);
    const int64_t n_in = batch * numel_[op.in], n_out = batch * numel_[op.out];
    switch (op.kind) {
      case OpKind::linear: {
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
        if (!a.relu) apply_activation(y, y, n_out, op.act);
        break;
      }
      case OpKind::conv2d: {
        const auto& s = shapes_[op.in];
        ConvArgs a;
        a.x = x;
        a.batch = batch;
        a.x_stride[0] = numel_[op.in];
        a.x_stride[1] = s[1] * s[2];
        a.x_stride[2] = s[2];
        a.x_stride[3] = 1;
        a.relu = op.act == Activation::relu;
        a.y = y;
        a.n_threads = n_threads;
        op.conv->run(op.conv->geometry(s[1], s[2]), a);
        if (!a.relu) apply_activation(y, y, n_out, op.act);
        break;
      }
      case OpKind::activation:
        apply_activation(x, y, n_out, op.act);
        break;
      case OpKind::add:
      case OpKind::mul: {
        const float* x2 = buf(op.in2);
        for (int64_t i = 0; i < n_out; ++i) {
          const float v = op.kind == OpKind::add ? x[i] + x2[i] : x[i] * x2[i];
          y[i] = activate(v, op.act);
        }
        break;
      }
      case OpKind::maxpool2d:
      case OpKind::avgpool2d: {
        const auto& si = shapes_[op.in];
        const auto& so = shapes_[op.out];
        const int64_t planes = batch * si[0];
        const bool is_max = op.kind == OpKind::maxpool2d;
        const float area = static_cast<float>(op.kernel[0] * op.kernel[1]);
        for (int64_t p = 0; p < planes; ++p) {
          const float* src = x + p * si[1] * si[2];
          float* dst = y + p * so[1] * so[2];
          for (int64_t oh = 0; oh < so[1]; ++oh) {
            for (int64_t ow = 0; ow < so[2]; ++ow) {
              float acc = is_max ? -INFINITY : 0.0f;
              for (int kh = 0; kh < op.kernel[0]; ++kh) {
                const int64_t r = oh * op.stride[0] + kh - op.padding[0];
                if (r < 0 || r >= si[1]) continue;
                for (int kw = 0; kw < op.kernel[1]; ++kw) {
                  const int64_t c = ow * op.stride[1] + kw - op.padding[1];
                  if (c < 0 || c >= si[2]) continue;
                  const float v = src[r * si[2] + c];
                  acc = is_max ? (v > acc || v != v ? v : acc) : acc + v;
                }
              }
              dst[oh * so[2] + ow] = is_max ? acc : acc / area;  // count_include_pad=True
            }
          }
        }
        break;
      }
      case OpKind::global_avgpool: {
        const auto& si = shapes_[op.in];
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
        const int64_t len = shapes_[op.in].back();
        for (int64_t r = 0; r < n_in / len; ++r) {
          const float* src = x + r * len;
          float* dst = y + r * len;
          if (op.kind == OpKind::softmax) {
            float mx = -INFINITY;
            for (int64_t i = 0; i < len; ++i) mx = std::max(mx, src[i]);
            double sum = 0.0;
            for (int64_t i = 0; i < len; ++i) sum += (dst[i] = std::exp(src[i] - mx));
            const float inv = static_cast<float>(1.0 / sum);
            for (int64_t i = 0; i < len; ++i) dst[i] *= inv;
          } else {
            double mean = 0.0, var = 0.0;
            for (int64_t i = 0; i < len; ++i) mean += src[i];
            mean /= static_cast<double>(len);
            for (int64_t i = 0; i < len; ++i) var += (src[i] - mean) * (src[i] - mean);
            var /= static_cast<double>(len);
            const float inv = static_cast<float>(1.0 / std::sqrt(var + op.eps));
            for (int64_t i = 0; i < len; ++i)
              dst[i] = static_cast<float>(src[i] - mean) * inv * op.gamma[i] + op.beta[i];
          }
        }
        break;
      }
    }
  }
  for (size_t k = 0; k < outputs_.size(); ++k)
    std::memcpy(outputs[k], buf(outputs_[k]), static_cast<size_t>(batch * numel_[outputs_[k]]) * sizeof(float));
}

}  // namespace sparseprune
