// Python binding of Plan: reads the JSON spec and the weight arrays, checks every field while
// holding the GIL, and runs the whole plan with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/checks.h"
#include "kernels/plan.h"
#include "kernels/scratch.h"

namespace sparseprune {
namespace bindings {

namespace {

class SpecError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A JSON int as int64; ints beyond int64 (Python has no bound) are a SpecError, not a cast error.
int64_t as_int64(py::handle v, const std::string& where) {
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0 || (x == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    throw SpecError(where + " is out of range");
  }
  return static_cast<int64_t>(x);
}

py::object field(const py::dict& d, const char* key, const std::string& where) {
  if (!d.contains(key)) throw SpecError(where + " has no field '" + key + "'");
  return d[key];
}

int64_t int_field(const py::dict& d, const char* key, const std::string& where) {
  py::object v = field(d, key, where);
  if (!py::isinstance<py::int_>(v) || py::isinstance<py::bool_>(v))
    throw SpecError(where + "." + key + " must be an int");
  return as_int64(v, where + "." + key);
}

std::array<int, 2> pair_field(const py::dict& d, const char* key, const std::string& where) {
  py::object v = field(d, key, where);
  if (!py::isinstance<py::list>(v) || py::len(v) != 2) throw SpecError(where + "." + key + " must be a list of 2 ints");
  std::array<int, 2> out{};
  for (int i = 0; i < 2; ++i) {
    py::object e = v.cast<py::list>()[i];
    if (!py::isinstance<py::int_>(e) || py::isinstance<py::bool_>(e)) throw SpecError(where + "." + key + " must hold ints");
    const int64_t x = as_int64(e, where + "." + key);
    if (x < 0 || x > (1 << 20)) throw SpecError(where + "." + key + " is out of range");
    out[i] = static_cast<int>(x);
  }
  return out;
}

std::string str_field(const py::dict& d, const char* key, const std::string& where) {
  py::object v = field(d, key, where);
  if (!py::isinstance<py::str>(v)) throw SpecError(where + "." + key + " must be a string");
  return v.cast<std::string>();
}

float number_field(const py::dict& d, const char* key, const std::string& where) {
  py::object v = field(d, key, where);
  if (py::isinstance<py::bool_>(v) || !(py::isinstance<py::float_>(v) || py::isinstance<py::int_>(v)))
    throw SpecError(where + "." + key + " must be a number");
  const double x = PyFloat_AsDouble(v.ptr());  // a huge int sets OverflowError
  if (x == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw SpecError(where + "." + key + " is out of range");
  }
  if (!std::isfinite(x) || std::abs(x) > static_cast<double>(std::numeric_limits<float>::max()))
    throw SpecError(where + "." + key + " must be a finite float32");
  return static_cast<float>(x);
}

bool bool_field(const py::dict& d, const char* key, const std::string& where) {
  py::object v = field(d, key, where);
  if (!py::isinstance<py::bool_>(v)) throw SpecError(where + "." + key + " must be true or false");
  return v.cast<bool>();
}

std::vector<int> int_list_field(const py::dict& d, const char* key, const std::string& where, int64_t hi) {
  py::object v = field(d, key, where);
  if (!py::isinstance<py::list>(v) || py::len(v) > 64) throw SpecError(where + "." + key + " must be a list of ints");
  std::vector<int> out;
  for (py::handle e : v) {
    if (!py::isinstance<py::int_>(e) || py::isinstance<py::bool_>(e)) throw SpecError(where + "." + key + " must hold ints");
    const int64_t x = as_int64(e, where + "." + key);
    if (x < 0 || x > hi) throw SpecError(where + "." + key + " holds an out-of-range value");
    out.push_back(static_cast<int>(x));
  }
  return out;
}

std::string activation_field(const py::dict& d, const std::string& where) {
  if (!d.contains("activation") || d["activation"].is_none()) return "none";
  if (!py::isinstance<py::str>(d["activation"])) throw SpecError(where + ".activation must be a string or null");
  return d["activation"].cast<std::string>();
}

py::array array_named(const py::dict& arrays, const std::string& name) {
  if (!arrays.contains(name.c_str())) throw SpecError("array '" + name + "' is missing");
  py::object a = arrays[name.c_str()];
  if (!py::isinstance<py::array>(a)) throw py::type_error("array '" + name + "' must be a numpy array");
  py::array arr = a.cast<py::array>();
  require_aligned(arr, ("array '" + name + "'").c_str());
  return arr;
}

py::array_t<int64_t> index_vector(const py::dict& arrays, const std::string& name) {
  py::array a = array_named(arrays, name);
  require_ndim(a, name.c_str(), 1);
  if (!(a.dtype().is(py::dtype::of<int64_t>()) || a.dtype().is(py::dtype::of<int32_t>())))
    throw py::type_error("array '" + name + "' must be int64 or int32, got " + dtype_name(a));
  return py::array_t<int64_t, py::array::c_style | py::array::forcecast>(a);
}

py::array_t<float> float_matrix(const py::dict& arrays, const std::string& name, int64_t rows, int64_t cols) {
  py::array a = array_named(arrays, name);
  require_ndim(a, name.c_str(), 2);
  require_dtype<float>(a, name.c_str(), "float32");
  if ((rows >= 0 && a.shape(0) != rows) || (cols >= 0 && a.shape(1) != cols))
    throw SpecError("array '" + name + "' must have shape (" + std::to_string(rows) + ", " + std::to_string(cols) + ")");
  if (a.shape(0) < 1 || a.shape(1) < 1) throw SpecError("array '" + name + "' must not be empty");
  return py::array_t<float, py::array::c_style>(a);
}

py::array_t<float> float_vector(const py::dict& arrays, const std::string& name) {
  py::array a = array_named(arrays, name);
  require_ndim(a, name.c_str(), 1);
  require_dtype<float>(a, name.c_str(), "float32");
  return py::array_t<float, py::array::c_style>(a);
}

// A bias is optional: absent means none.
std::optional<py::array_t<float>> optional_float_vector(const py::dict& arrays, const std::string& name) {
  if (!arrays.contains(name.c_str())) return std::nullopt;
  return float_vector(arrays, name);
}

std::shared_ptr<const PackedLinear> make_linear(const py::dict& op, const py::dict& arrays, const std::string& where) {
  const std::string w = str_field(op, "weight", where);
  const std::string fmt = str_field(op, "format", where);
  const auto block = pair_field(op, "block", where);
  const int64_t rows = int_field(op, "rows", where), cols = int_field(op, "cols", where);
  if (fmt == "dense") return nullptr;  // see make_dense
  const auto ptr = index_vector(arrays, w + ".indptr");
  const auto idx = index_vector(arrays, w + ".indices");
  const auto val = float_vector(arrays, w + ".values");
  const auto bias = optional_float_vector(arrays, w + ".bias");
  const bool has_bias = bias.has_value();
  if (has_bias && bias->shape(0) != rows) throw SpecError("array '" + w + ".bias' must have " + std::to_string(rows) + " entries");
  if (ptr.shape(0) == 0) throw SpecError("array '" + w + ".indptr' must not be empty");
  SparseFormat format;
  if (fmt == "csr") format = SparseFormat::csr;
  else if (fmt == "bsr") format = SparseFormat::bsr;
  else throw SpecError(where + ".format must be 'csr' or 'bsr'");
  return std::make_shared<const PackedLinear>(PackedLinear::make(format, block[0], block[1], rows, cols, ptr.data(),
                                                                 ptr.shape(0), idx.data(), idx.shape(0), val.data(),
                                                                 val.shape(0), has_bias ? bias->data() : nullptr));
}

std::shared_ptr<const DenseWeights> make_dense(const py::dict& op, const py::dict& arrays, const std::string& where) {
  const std::string w = str_field(op, "weight", where);
  const int64_t rows = int_field(op, "rows", where), cols = int_field(op, "cols", where);
  if (rows < 1 || cols < 1 || rows > (int64_t{1} << 31) || cols > (int64_t{1} << 31)) throw SpecError(where + ": bad rows/cols");
  const auto weight = float_matrix(arrays, w + ".weight", rows, cols);
  const auto bias = optional_float_vector(arrays, w + ".bias");
  if (bias && bias->shape(0) != rows) throw SpecError("array '" + w + ".bias' must have " + std::to_string(rows) + " entries");
  return DenseWeights::make(rows, cols, weight.data(), bias ? bias->data() : nullptr);
}

ConvShape conv_shape(const py::dict& op, const std::string& where) {
  ConvShape s;
  s.in_channels = int_field(op, "in_channels", where);
  s.out_channels = int_field(op, "out_channels", where);
  const auto k = pair_field(op, "kernel", where), st = pair_field(op, "stride", where);
  const auto pd = pair_field(op, "padding", where), dl = pair_field(op, "dilation", where);
  s.kernel_h = k[0]; s.kernel_w = k[1];
  s.stride_h = st[0]; s.stride_w = st[1];
  s.pad_h = pd[0]; s.pad_w = pd[1];
  s.dilation_h = dl[0]; s.dilation_w = dl[1];
  const int64_t groups = int_field(op, "groups", where);
  if (groups < 1 || groups > (1 << 20)) throw SpecError(where + ".groups is out of range");
  s.groups = static_cast<int>(groups);
  return s;
}

std::shared_ptr<const DenseConv> make_dense_conv(const py::dict& op, const py::dict& arrays, const std::string& where) {
  const std::string w = str_field(op, "weight", where);
  const ConvShape s = conv_shape(op, where);
  if (s.in_channels < 1 || s.out_channels < 1 || s.in_channels % s.groups || s.out_channels % s.groups)
    throw SpecError(where + ": groups must divide in_channels and out_channels");
  py::array a = array_named(arrays, w + ".weight");
  require_ndim(a, (w + ".weight").c_str(), 4);
  require_dtype<float>(a, (w + ".weight").c_str(), "float32");
  const std::vector<py::ssize_t> want{static_cast<py::ssize_t>(s.out_channels),
                                      static_cast<py::ssize_t>(s.in_channels / s.groups), s.kernel_h, s.kernel_w};
  for (int d = 0; d < 4; ++d)
    if (a.shape(d) != want[d]) throw SpecError("array '" + w + ".weight' must have shape (out, in / groups, kh, kw)");
  const auto weight = py::array_t<float, py::array::c_style>(a);
  const auto bias = optional_float_vector(arrays, w + ".bias");
  if (bias && bias->shape(0) != s.out_channels) throw SpecError("array '" + w + ".bias' must have out_channels entries");
  return DenseConv::make(s, weight.data(), bias ? bias->data() : nullptr);
}

std::shared_ptr<const PackedConv> make_conv(const py::dict& op, const py::dict& arrays, const std::string& where,
                                            bool use_patterns) {
  const std::string w = str_field(op, "weight", where);
  const ConvShape s = conv_shape(op, where);
  const auto ptr = index_vector(arrays, w + ".row_ptr");
  const auto taps = index_vector(arrays, w + ".taps");
  const auto val = float_vector(arrays, w + ".values");
  const auto bias = optional_float_vector(arrays, w + ".bias");
  const bool has_bias = bias.has_value();
  if (has_bias && bias->shape(0) != s.out_channels) throw SpecError("array '" + w + ".bias' must have out_channels entries");
  if (ptr.shape(0) == 0) throw SpecError("array '" + w + ".row_ptr' must not be empty");
  auto conv = std::make_unique<PackedConv>(PackedConv::make(s, ptr.data(), ptr.shape(0), taps.data(), taps.shape(0),
                                                            val.data(), val.shape(0), has_bias ? bias->data() : nullptr,
                                                            use_patterns));
  return std::shared_ptr<const PackedConv>(std::move(conv));
}

// dense_from (optional, linear / conv2d stored sparse): the input rows (linear) or images
// (conv2d) from which the op runs its dense kernel; 0 when absent.
int64_t dense_from_field(const py::dict& op, const std::string& where, bool stored_sparse) {
  if (!op.contains("dense_from")) return 0;
  if (!stored_sparse) throw SpecError(where + ".dense_from needs a sparse format (the dense weights are built from it)");
  const int64_t v = int_field(op, "dense_from", where);
  if (v < 2 || v > (int64_t{1} << 31)) throw SpecError(where + ".dense_from must be an int in [2, 2**31]");
  return v;
}

// The dense weights built for dense_from switches stay within kMaxDenseSwitchFactor x the bytes of
// all the arrays (the Python validator's MAX_DENSE_SWITCH_FACTOR): a file cannot make load
// allocate more than a fixed multiple of its own size. Counted before each switch is built.
constexpr double kMaxDenseSwitchFactor = 64;

struct SwitchBudget {
  double stored_bytes = 0, dense_bytes = 0;
  explicit SwitchBudget(const py::dict& arrays) {
    for (auto item : arrays)
      if (py::isinstance<py::array>(item.second)) stored_bytes += static_cast<double>(item.second.cast<py::array>().nbytes());
  }
  // Adds a switch's dense weight of `elements` floats; throws SpecError beyond the budget.
  void add(double elements) {
    dense_bytes += 4 * elements;
    if (dense_bytes > kMaxDenseSwitchFactor * stored_bytes)
      throw SpecError("the dense_from switches need more than " + std::to_string(static_cast<int64_t>(kMaxDenseSwitchFactor)) +
                      " x the " + std::to_string(static_cast<int64_t>(stored_bytes)) + " bytes of the file's arrays in dense weights");
  }
};

// spec.dims (optional): {name: {"min": int, "max": int}}, in the spec's order.
std::vector<DimRange> parse_dims(const py::dict& spec) {
  std::vector<DimRange> dims;
  if (!spec.contains("dims")) return dims;
  py::object v = spec["dims"];
  if (!py::isinstance<py::dict>(v) || py::len(v) > kMaxDims)
    throw SpecError("spec.dims must be an object of at most " + std::to_string(kMaxDims) + " dims");
  for (auto item : v.cast<py::dict>()) {
    if (!py::isinstance<py::str>(item.first)) throw SpecError("spec.dims names must be strings");
    DimRange d;
    d.name = item.first.cast<std::string>();
    const std::string where = "spec.dims." + d.name;
    if (!py::isinstance<py::dict>(item.second)) throw SpecError(where + " must be an object");
    const py::dict r = item.second.cast<py::dict>();
    d.min = int_field(r, "min", where);
    d.max = int_field(r, "max", where);
    if (d.min < 1 || d.max < d.min || d.max > (int64_t{1} << 31)) throw SpecError(where + ": needs 1 <= min <= max <= 2**31");
    dims.push_back(std::move(d));
  }
  return dims;
}

// A buffer shape entry: an int, a dim name, or [k, dim name] (k * dim).
SymDim parse_shape_entry(py::handle v, const std::vector<DimRange>& dims, const std::string& where) {
  auto dim_index = [&](py::handle name) {
    const std::string n = name.cast<std::string>();
    for (size_t i = 0; i < dims.size(); ++i)
      if (dims[i].name == n) return static_cast<int>(i);
    throw SpecError(where + " names '" + n + "', not a dim of spec.dims");
  };
  auto is_int = [](py::handle x) { return py::isinstance<py::int_>(x) && !py::isinstance<py::bool_>(x); };
  SymDim d;
  if (is_int(v)) {
    d.k = as_int64(v, where);
  } else if (py::isinstance<py::str>(v)) {
    d.dim = dim_index(v);
  } else if (py::isinstance<py::list>(v) && py::len(v) == 2 && is_int(v.cast<py::list>()[0]) &&
             py::isinstance<py::str>(v.cast<py::list>()[1])) {
    d.k = as_int64(v.cast<py::list>()[0], where);
    d.dim = dim_index(v.cast<py::list>()[1]);
  } else {
    throw SpecError(where + " must hold ints" + std::string(dims.empty() ? "" : ", dim names or [k, dim name]"));
  }
  return d;
}

OpKind parse_kind(const std::string& name, const std::string& where) {
  if (name == "linear") return OpKind::linear;
  if (name == "conv2d") return OpKind::conv2d;
  if (name == "activation") return OpKind::activation;
  if (name == "add") return OpKind::add;
  if (name == "mul") return OpKind::mul;
  if (name == "maxpool2d") return OpKind::maxpool2d;
  if (name == "avgpool2d") return OpKind::avgpool2d;
  if (name == "global_avgpool") return OpKind::global_avgpool;
  if (name == "softmax") return OpKind::softmax;
  if (name == "layernorm") return OpKind::layernorm;
  if (name == "affine") return OpKind::affine;
  if (name == "matmul") return OpKind::matmul;
  if (name == "attention") return OpKind::attention;
  if (name == "permute") return OpKind::permute;
  if (name == "cat") return OpKind::cat;
  if (name == "embedding") return OpKind::embedding;
  if (name == "constant") return OpKind::constant;
  if (name == "slice") return OpKind::slice;
  if (name == "sub") return OpKind::sub;
  if (name == "div") return OpKind::div;
  if (name == "reduce") return OpKind::reduce;
  if (name == "pad") return OpKind::pad;
  if (name == "expand") return OpKind::expand;
  throw SpecError(where + ".op '" + name + "' is not a known op");
}

std::unique_ptr<Plan> build_plan(const std::string& spec_json, const py::dict& arrays) {
  py::object parsed;
  try {
    parsed = py::module_::import("json").attr("loads")(spec_json);
  } catch (py::error_already_set& e) {
    throw SpecError(std::string("spec is not valid JSON: ") + e.what());
  }
  if (!py::isinstance<py::dict>(parsed)) throw SpecError("spec must be a JSON object");
  const py::dict spec = parsed.cast<py::dict>();
  if (!spec.contains("format") || !py::isinstance<py::str>(spec["format"]) ||
      spec["format"].cast<std::string>() != "sparseprune.executable")
    throw SpecError("spec.format must be 'sparseprune.executable'");
  if (int_field(spec, "version", "spec") != 1) throw SpecError("spec.version must be 1");
  auto plan = std::make_unique<Plan>();
  const std::vector<DimRange> dims = parse_dims(spec);
  plan->set_dims(dims);
  py::object buffers = field(spec, "buffers", "spec");
  if (!py::isinstance<py::list>(buffers)) throw SpecError("spec.buffers must be a list");
  // As spec.py's MAX_BUFFERS / MAX_OPS: the layout at finalize is quadratic in the buffers.
  constexpr size_t kMaxBuffers = 20000, kMaxOps = 20000;
  if (py::len(buffers) > kMaxBuffers)
    throw SpecError("spec.buffers has " + std::to_string(py::len(buffers)) + " entries, more than the " +
                    std::to_string(kMaxBuffers) + " allowed");
  int i = 0;
  for (py::handle h : buffers) {
    const std::string where = "buffers[" + std::to_string(i++) + "]";
    if (!py::isinstance<py::dict>(h)) throw SpecError(where + " must be an object");
    const py::dict b = h.cast<py::dict>();
    py::object shape = field(b, "shape", where);
    if (!py::isinstance<py::list>(shape) || py::len(shape) == 0 || py::len(shape) > 8)
      throw SpecError(where + ".shape must be a non-empty list of at most 8 ints");
    SymShape sym;
    for (py::handle d : shape) sym.push_back(parse_shape_entry(d, dims, where + ".shape"));
    int alias = -1;
    if (b.contains("alias_of") && !b["alias_of"].is_none()) {
      const int64_t a = int_field(b, "alias_of", where);
      if (a < 0 || a > (1 << 30)) throw SpecError(where + ".alias_of is out of range");
      alias = static_cast<int>(a);
    }
    plan->add_buffer(sym, alias);
  }
  auto id_list = [&](const char* key) {
    py::object v = field(spec, key, "spec");
    if (!py::isinstance<py::list>(v)) throw SpecError(std::string("spec.") + key + " must be a list");
    std::vector<int> ids;
    for (py::handle h : v) {
      if (!py::isinstance<py::int_>(h) || py::isinstance<py::bool_>(h)) throw SpecError(std::string("spec.") + key + " must hold ints");
      const int64_t x = as_int64(h, std::string("spec.") + key);
      if (x < 0 || x > (1 << 30)) throw SpecError(std::string("spec.") + key + " holds an out-of-range id");
      ids.push_back(static_cast<int>(x));
    }
    return ids;
  };
  plan->set_io(id_list("inputs"), id_list("outputs"));
  py::object ops = field(spec, "ops", "spec");
  if (!py::isinstance<py::list>(ops)) throw SpecError("spec.ops must be a list");
  if (py::len(ops) > kMaxOps)
    throw SpecError("spec.ops has " + std::to_string(py::len(ops)) + " entries, more than the " +
                    std::to_string(kMaxOps) + " allowed");
  i = 0;
  SwitchBudget budget(arrays);
  for (py::handle h : ops) {
    const std::string where = "ops[" + std::to_string(i++) + "]";
    if (!py::isinstance<py::dict>(h)) throw SpecError(where + " must be an object");
    const py::dict o = h.cast<py::dict>();
    PlanOp op;
    op.kind = parse_kind(str_field(o, "op", where), where);
    auto id = [&](const char* key) {
      const int64_t x = int_field(o, key, where);
      if (x < 0 || x > (1 << 30)) throw SpecError(where + "." + key + " is out of range");
      return static_cast<int>(x);
    };
    const bool binary = op.kind == OpKind::add || op.kind == OpKind::sub || op.kind == OpKind::mul || op.kind == OpKind::div;
    if (binary || op.kind == OpKind::matmul) {
      op.in = id("a");
      op.in2 = id("b");
    } else if (op.kind == OpKind::attention) {
      op.in = id("q");
      op.in2 = id("k");
      op.in3 = id("v");
      if (o.contains("key_mask")) op.in4 = id("key_mask");
      if (o.contains("mask") != o.contains("mask_kind")) throw SpecError(where + ": mask and mask_kind come together");
      if (o.contains("mask")) {
        op.in5 = id("mask");
        const std::string kind = str_field(o, "mask_kind", where);
        if (kind != "bool" && kind != "additive") throw SpecError(where + ".mask_kind must be 'bool' or 'additive'");
        op.mask_additive = kind == "additive";
      }
    } else if (op.kind == OpKind::cat) {
      op.ins = int_list_field(o, "inputs", where, 1 << 30);
    } else if (op.kind == OpKind::constant) {
      // reads nothing
    } else {
      op.in = id("in");
      if (op.kind == OpKind::conv2d && o.contains("residual")) op.in2 = id("residual");
    }
    op.out = id("out");
    try {
      const bool takes_activation = op.kind == OpKind::linear || op.kind == OpKind::conv2d || binary ||
                                  op.kind == OpKind::affine || op.kind == OpKind::activation;
    if (takes_activation) op.act = parse_activation(op.kind == OpKind::activation ? str_field(o, "kind", where)
                                                              : activation_field(o, where));
    } catch (const SpecError&) {
      throw;
    } catch (const std::invalid_argument& e) {
      throw SpecError(where + ": " + e.what());
    }
    switch (op.kind) {
      case OpKind::linear:
        op.linear = make_linear(o, arrays, where);
        if (!op.linear) op.dense = make_dense(o, arrays, where);
        op.dense_from = dense_from_field(o, where, op.linear != nullptr);
        if (op.dense_from) {
          budget.add(static_cast<double>(op.linear->n_rows()) * static_cast<double>(op.linear->n_cols()));
          op.dense = DenseWeights::from_sparse(*op.linear);
        }
        break;
      case OpKind::affine:
        op.scale = number_field(o, "scale", where);
        op.shift = number_field(o, "shift", where);
        break;
      case OpKind::matmul:
        op.transpose_b = bool_field(o, "transpose_b", where);
        op.scale = number_field(o, "scale", where);
        break;
      case OpKind::attention: {
        const std::string layout = str_field(o, "layout", where);
        if (layout != "sequence_first" && layout != "heads_first")
          throw SpecError(where + ".layout must be 'sequence_first' or 'heads_first'");
        op.sequence_first = layout == "sequence_first";
        const int64_t heads = int_field(o, "heads", where);
        if (heads < 1 || heads > (1 << 20)) throw SpecError(where + ".heads is out of range");
        op.heads = static_cast<int>(heads);
        op.scale = number_field(o, "scale", where);
        op.causal = bool_field(o, "causal", where);
        break;
      }
      case OpKind::permute: op.perm = int_list_field(o, "perm", where, 64); break;
      case OpKind::cat: {
        const int64_t axis = int_field(o, "axis", where);
        if (axis < 0 || axis > 64) throw SpecError(where + ".axis is out of range");
        op.axis = static_cast<int>(axis);
        break;
      }
      case OpKind::slice: {
        const int64_t axis = int_field(o, "axis", where), start = int_field(o, "start", where);
        const int64_t step = int_field(o, "step", where);
        if (axis < 0 || axis > 64) throw SpecError(where + ".axis is out of range");
        if (start < 0 || start > (int64_t{1} << 31) || step < 1 || step > (int64_t{1} << 31))
          throw SpecError(where + ".start/step is out of range");
        op.axis = static_cast<int>(axis);
        op.start = start;
        op.step = step;
        break;
      }
      case OpKind::reduce: {
        const std::string kind = str_field(o, "kind", where);
        if (kind != "mean" && kind != "sum") throw SpecError(where + ".kind must be 'mean' or 'sum'");
        op.reduce_mean = kind == "mean";
        op.axes = int_list_field(o, "axes", where, 64);  // order and range: checked with the shapes
        break;
      }
      case OpKind::pad: {
        py::object v = field(o, "pads", where);
        if (!py::isinstance<py::list>(v) || py::len(v) > 8) throw SpecError(where + ".pads must be a list of pairs");
        for (py::handle p : v) {
          if (!py::isinstance<py::list>(p) || py::len(p) != 2) throw SpecError(where + ".pads must hold [before, after] pairs");
          std::array<int64_t, 2> pair{};
          for (int k = 0; k < 2; ++k) {
            py::object e = p.cast<py::list>()[k];
            if (!py::isinstance<py::int_>(e) || py::isinstance<py::bool_>(e)) throw SpecError(where + ".pads must hold ints");
            pair[k] = as_int64(e, where + ".pads");
            if (pair[k] < 0 || pair[k] > (int64_t{1} << 31)) throw SpecError(where + ".pads holds an out-of-range value");
          }
          op.pads.push_back(pair);
        }
        op.pad_value = number_field(o, "value", where);
        break;
      }
      case OpKind::constant: {
        const auto v = float_vector(arrays, str_field(o, "weight", where) + ".value");
        op.table.assign(v.data(), v.data() + v.shape(0));
        if (o.contains("shape")) {  // the value's shape (out's at the dims' max values)
          for (int d : int_list_field(o, "shape", where, int64_t{1} << 30)) op.value_shape.push_back(d);
          if (op.value_shape.empty()) throw SpecError(where + ".shape must not be empty");
        }
        break;
      }
      case OpKind::embedding: {
        const std::string w = str_field(o, "weight", where);
        const auto t = float_matrix(arrays, w + ".table", -1, -1);
        op.table.assign(t.data(), t.data() + t.size());
        op.table_rows = t.shape(0);
        break;
      }
      case OpKind::conv2d: {
        const std::string format = o.contains("format") ? str_field(o, "format", where) : "sparse";
        if (format == "sparse" || format == "pattern") {
          op.conv = make_conv(o, arrays, where, format == "pattern");
        } else if (format == "depthwise") {
          op.conv = make_conv(o, arrays, where, false);  // validated as sparse first
          op.depthwise = DepthwiseConv::make(*op.conv);
        } else if (format == "dense") {
          op.dense_conv = make_dense_conv(o, arrays, where);
        } else {
          throw SpecError(where + ".format must be 'sparse', 'pattern', 'depthwise' or 'dense'");
        }
        op.dense_from = dense_from_field(o, where, op.conv != nullptr);
        if (op.dense_from) {
          const ConvShape& cs = op.conv->shape();
          budget.add(static_cast<double>(cs.out_channels) * static_cast<double>(cs.in_channels / cs.groups) *
                     cs.kernel_h * cs.kernel_w);
          op.dense_conv = DenseConv::from_sparse(*op.conv);
        }
        if (op.depthwise) op.conv = nullptr;  // the depthwise kernel runs it
        break;
      }
      case OpKind::maxpool2d:
      case OpKind::avgpool2d: {
        const auto k = pair_field(o, "kernel", where), st = pair_field(o, "stride", where), pd = pair_field(o, "padding", where);
        for (int d = 0; d < 2; ++d) { op.kernel[d] = k[d]; op.stride[d] = st[d]; op.padding[d] = pd[d]; }
        break;
      }
      case OpKind::layernorm: {
        const std::string w = str_field(o, "weight", where);
        const auto g = float_vector(arrays, w + ".gamma"), b = float_vector(arrays, w + ".beta");
        op.gamma.assign(g.data(), g.data() + g.shape(0));
        op.beta.assign(b.data(), b.data() + b.shape(0));
        op.eps = number_field(o, "eps", where);  // finite; > 0 is checked with the op
        break;
      }
      default: break;
    }
    plan->add_op(std::move(op));
  }
  if (plan->n_ops() == 0) throw SpecError("spec.ops must not be empty");
  plan->finalize();
  return plan;
}

std::vector<py::array_t<float>> run_plan(const Plan& plan, const std::vector<py::array>& inputs, int n_threads,
                                         const std::vector<int64_t>& dims, py::object op_seconds) {
  if (inputs.size() != plan.inputs().size())
    throw py::value_error("expected " + std::to_string(plan.inputs().size()) + " inputs, got " + std::to_string(inputs.size()));
  if (n_threads < 0) throw py::value_error("n_threads must be >= 0");
  // The plan at these dim values (range-checked, every op's shape rule checked, cached); the
  // inputs must have its shapes.
  std::shared_ptr<const PlanInstance> inst;
  try {
    inst = plan.instance(dims);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  std::vector<py::array_t<float, py::array::c_style>> held;
  std::vector<const float*> in_ptrs;
  int64_t batch = -1;
  for (size_t k = 0; k < inputs.size(); ++k) {
    const std::string name = "input " + std::to_string(k);
    require_dtype<float>(inputs[k], name.c_str(), "float32");
    require_aligned(inputs[k], name.c_str());
    const auto& want = inst->shape(plan.inputs()[k]);
    bool ok = inputs[k].ndim() == static_cast<py::ssize_t>(want.size()) + 1;
    for (size_t d = 0; ok && d < want.size(); ++d) ok = inputs[k].shape(static_cast<py::ssize_t>(d) + 1) == want[d];
    if (!ok) {
      std::string w = "(batch";
      for (int64_t d : want) w += ", " + std::to_string(d);
      throw py::value_error(name + " must have shape " + w + ")" + (dims.empty() ? "" : " at these dim values"));
    }
    if (batch >= 0 && inputs[k].shape(0) != batch) throw py::value_error("all inputs must have the same batch size");
    batch = inputs[k].shape(0);
    held.emplace_back(py::array_t<float, py::array::c_style>::ensure(inputs[k]));
    in_ptrs.push_back(held.back().data());
  }
  std::vector<py::array_t<float>> outs;
  std::vector<float*> out_ptrs;
  for (int b : plan.outputs()) {
    std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(batch)};
    for (int64_t d : inst->shape(b)) shape.push_back(static_cast<py::ssize_t>(d));
    outs.emplace_back(shape);
    out_ptrs.push_back(outs.back().mutable_data());
  }
  // Profiling: each op's seconds are added to op_seconds (float64, one entry per op).
  double* seconds = nullptr;
  py::array_t<double, py::array::c_style> seconds_array;
  if (!op_seconds.is_none()) {
    py::array arr = op_seconds.cast<py::array>();
    if (!arr.dtype().is(py::dtype::of<double>()) || arr.ndim() != 1 ||
        arr.shape(0) != static_cast<py::ssize_t>(plan.n_ops()) || !(arr.flags() & py::array::c_style) ||
        !arr.writeable())
      throw py::value_error("op_seconds must be a writable contiguous float64 array of n_ops entries");
    require_aligned(arr, "op_seconds");
    seconds_array = py::array_t<double, py::array::c_style>(arr);
    seconds = seconds_array.mutable_data();
  }
  if (batch > 0) {
    py::gil_scoped_release release;
    plan.run(*inst, in_ptrs, batch, out_ptrs, n_threads, seconds);
  }
  return outs;
}

// Shapes as the spec writes them: ints, dim names, [k, dim name].
py::list sym_shapes(const Plan& p, const std::vector<int>& buffers) {
  py::list out;
  for (int b : buffers) {
    py::list shape;
    for (const SymDim& d : p.sym_shape(b)) {
      if (d.dim < 0) shape.append(py::int_(d.k));
      else if (d.k == 1) shape.append(py::str(p.dims()[d.dim].name));
      else {
        py::list entry;
        entry.append(py::int_(d.k));
        entry.append(py::str(p.dims()[d.dim].name));
        shape.append(entry);
      }
    }
    out.append(shape);
  }
  return out;
}

}  // namespace

void bind_plan(py::module_& m) {
  py::register_exception<SpecError>(m, "SpecError", PyExc_ValueError);
  py::class_<Plan>(m, "Plan", "A whole model as one native plan (see sparseprune.runtime).")
      .def(py::init(&build_plan), py::arg("spec_json"), py::arg("arrays"))
      .def("run", &run_plan, py::arg("inputs"), py::arg("n_threads") = 0, py::arg("dims") = std::vector<int64_t>{},
           py::arg("op_seconds") = py::none(),
           "Run the whole plan in one call with the GIL released; returns the outputs. dims: one value "
           "per dim of the spec (in its order), which the inputs' shapes must match. op_seconds: a "
           "float64 array of n_ops entries to which each op's wall time is added (profiling).")
      .def_property_readonly("input_shapes", [](const Plan& p) { return sym_shapes(p, p.inputs()); })
      .def_property_readonly("output_shapes", [](const Plan& p) { return sym_shapes(p, p.outputs()); })
      .def_property_readonly("dims", [](const Plan& p) {
        std::vector<std::tuple<std::string, int64_t, int64_t>> out;
        for (const DimRange& d : p.dims()) out.emplace_back(d.name, d.min, d.max);
        return out;
      })
      .def_property_readonly("n_ops", &Plan::n_ops)
      .def(
          "runs_dense",
          [](const Plan& p, int64_t batch, const std::vector<int64_t>& dims) {
            if (batch < 0) throw py::value_error("batch must be >= 0");
            try {
              return p.runs_dense(*p.instance(dims), batch);
            } catch (const std::invalid_argument& e) {
              throw py::value_error(e.what());
            }
          },
          py::arg("batch"), py::arg("dims") = std::vector<int64_t>{},
          "Per op: whether it runs its dense kernel at this batch (a dense format, or its dense_from switch).")
      .def(
          "arena_floats_per_sample",
          [](const Plan& p, const std::vector<int64_t>& dims) {
            try {
              return p.instance(dims)->arena_floats_per_sample();
            } catch (const std::invalid_argument& e) {
              throw py::value_error(e.what());
            }
          },
          py::arg("dims") = std::vector<int64_t>{},
          "Floats per sample of the arena a run at these dim values lays out (computed, not run).");
  // The calling thread's scratch (kernel repacking and the plan arena); see
  // sparseprune/runtime/limits.py for the trim policy.
  m.def("thread_scratch_bytes", &thread_scratch_bytes, "Bytes of scratch the calling thread holds now.");
  m.def("release_thread_scratch", &release_thread_scratch, "Free the calling thread's scratch now.");
}

}  // namespace bindings
}  // namespace sparseprune
