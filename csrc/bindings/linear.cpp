// Python binding of PackedLinear: converts arguments, checks them, releases the GIL for the kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/checks.h"
#include "kernels/packed_linear.h"

namespace sparseprune {
namespace bindings {

namespace {

py::array_t<int64_t> index_array(const py::array& a, const char* name) {
  require_ndim(a, name, 1);
  require_aligned(a, name);
  if (a.dtype().is(py::dtype::of<int64_t>()) || a.dtype().is(py::dtype::of<int32_t>()) ||
      a.dtype().is(py::dtype::of<uint16_t>())) {
    // Widening an integer index array is exact; any other dtype is refused.
    return py::array_t<int64_t, py::array::c_style | py::array::forcecast>(a);
  }
  throw py::type_error(std::string(name) + " must have an integer dtype (int64, int32 or uint16), got " +
                       dtype_name(a));
}

py::array_t<float> float_vector(const py::array& a, const char* name) {
  require_dtype<float>(a, name, "float32");
  require_ndim(a, name, 1);
  require_c_contiguous(a, name);
  require_aligned(a, name);
  return py::array_t<float>(a);
}

SparseFormat parse_format(const std::string& format) {
  if (format == "csr") return SparseFormat::csr;
  if (format == "bsr") return SparseFormat::bsr;
  throw py::value_error("format must be 'csr' or 'bsr', got '" + format + "'");
}

PackedLinear make_packed(const std::string& format, int block_rows, int block_cols, int64_t n_rows,
                         int64_t n_cols, const py::array& indptr, const py::array& indices,
                         const py::array& values, const py::object& bias) {
  const auto ptr = index_array(indptr, "indptr");
  const auto idx = index_array(indices, "indices");
  const auto val = float_vector(values, "values");
  const float* bias_data = nullptr;
  py::array_t<float> b;
  if (!bias.is_none()) {
    b = float_vector(bias.cast<py::array>(), "bias");
    if (b.shape(0) != n_rows)
      throw py::value_error("bias must have n_rows = " + std::to_string(n_rows) + " entries, got " +
                            std::to_string(b.shape(0)));
    bias_data = b.data();
  }
  if (ptr.shape(0) == 0) throw py::value_error("indptr must not be empty");
  return PackedLinear::make(parse_format(format), block_rows, block_cols, n_rows, n_cols, ptr.data(),
                            ptr.shape(0), idx.data(), idx.shape(0), val.data(), val.shape(0),
                            bias_data);
}

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

// Byte range [first, last] an array's elements can touch (strides may be negative).
std::pair<const char*, const char*> byte_extent(const py::array& a) {
  const char* base = static_cast<const char*>(a.data());
  const char* lo = base;
  const char* hi = base;
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (a.shape(d) == 0) return {base, base - 1};  // empty: touches nothing
    const py::ssize_t span = (a.shape(d) - 1) * a.strides(d);
    if (span < 0) lo += span; else hi += span;
  }
  return {lo, hi + a.itemsize() - 1};
}

bool overlaps(const py::array& a, const py::array& b) {
  const auto ea = byte_extent(a), eb = byte_extent(b);
  return ea.first <= ea.second && eb.first <= eb.second && ea.first <= eb.second && eb.first <= ea.second;
}

py::array_t<float> forward(const PackedLinear& p, const py::array& x, bool relu, int n_threads,
                           const py::object& out) {
  require_dtype<float>(x, "x", "float32");
  require_ndim(x, "x", 2);
  require_aligned(x, "x");
  if (x.shape(1) != p.n_cols())
    throw py::value_error("x must have " + std::to_string(p.n_cols()) + " features (columns), got " +
                          std::to_string(x.shape(1)));
  if (n_threads < 0) throw py::value_error("n_threads must be >= 0 (0 means the OpenMP default)");
  const int64_t batch = x.shape(0);
  py::array_t<float> y;
  if (out.is_none()) {
    y = py::array_t<float>({static_cast<py::ssize_t>(batch), static_cast<py::ssize_t>(p.n_rows())});
  } else {
    const py::array given = out.cast<py::array>();
    // Check before wrapping: py::array_t<float> would silently convert another dtype to a copy.
    require_dtype<float>(given, "out", "float32");
    require_ndim(given, "out", 2);
    require_c_contiguous(given, "out");
    require_aligned(given, "out");
    y = py::array_t<float>::ensure(given);
    if (overlaps(x, y)) throw py::value_error("out must not share memory with x");
    if (y.shape(0) != batch || y.shape(1) != p.n_rows())
      throw py::value_error("out must have shape (" + std::to_string(batch) + ", " +
                            std::to_string(p.n_rows()) + ")");
    if (!y.writeable()) throw py::value_error("out must be writeable");
  }
  LinearArgs a;
  a.x = static_cast<const float*>(x.data());
  a.batch = batch;
  a.x_stride_b = element_stride(x, "x", 0);
  a.x_stride_k = element_stride(x, "x", 1);
  a.relu = relu;
  a.y = y.mutable_data();
  a.y_stride = p.n_rows();
  a.n_threads = n_threads;
  {
    py::gil_scoped_release release;
    p.run(a);
  }
  return y;
}

}  // namespace

void bind_linear(py::module_& m) {
  py::class_<PackedLinear>(m, "PackedLinear",
                           "A sparse weight (CSR or block-sparse) and bias, validated and packed once.")
      .def(py::init(&make_packed), py::arg("format"), py::arg("block_rows"), py::arg("block_cols"),
           py::arg("n_rows"), py::arg("n_cols"), py::arg("indptr"), py::arg("indices"),
           py::arg("values"), py::arg("bias") = py::none())
      .def("forward", &forward, py::arg("x"), py::arg("relu") = false, py::arg("n_threads") = 0,
           py::arg("out") = py::none(),
           "y = relu?(x @ W.T + bias) for x float32 [batch, n_cols] (any strides); the GIL is "
           "released while the kernel runs.")
      .def_property_readonly("format", [](const PackedLinear& p) {
        return p.format() == SparseFormat::csr ? "csr" : "bsr";
      })
      .def_property_readonly("block_shape", [](const PackedLinear& p) {
        return py::make_tuple(p.block_rows(), p.block_cols());
      })
      .def_property_readonly("shape", [](const PackedLinear& p) {
        return py::make_tuple(p.n_rows(), p.n_cols());
      })
      .def_property_readonly("n_stored", &PackedLinear::n_stored)
      .def_property_readonly("index_bits", &PackedLinear::index_bits)
      .def_property_readonly("nbytes", &PackedLinear::nbytes)
      .def_property_readonly("indptr", [](const PackedLinear& p) { return to_numpy(p.indptr()); })
      .def_property_readonly("indices", [](const PackedLinear& p) { return to_numpy(p.indices()); })
      .def_property_readonly("values", [](const PackedLinear& p) { return to_numpy(p.values()); })
      .def_property_readonly("bias", [](const PackedLinear& p) -> py::object {
        if (!p.has_bias()) return py::none();
        return to_numpy(p.bias());
      });
}

}  // namespace bindings
}  // namespace sparseprune
