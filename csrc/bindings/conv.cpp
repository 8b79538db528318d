// Python binding of PackedConv: converts arguments, checks them, releases the GIL for the kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "bindings/checks.h"
#include "kernels/packed_conv.h"

namespace sparseprune {
namespace bindings {

namespace {

using Pair = std::array<int, 2>;

py::array_t<int64_t> int_vector(const py::array& a, const char* name) {
  require_ndim(a, name, 1);
  require_aligned(a, name);
  if (a.dtype().is(py::dtype::of<int64_t>()) || a.dtype().is(py::dtype::of<int32_t>()))
    return py::array_t<int64_t, py::array::c_style | py::array::forcecast>(a);
  throw py::type_error(std::string(name) + " must have dtype int64 or int32, got " + dtype_name(a));
}

std::unique_ptr<PackedConv> make_conv(int64_t in_channels, int64_t out_channels, Pair kernel, Pair stride,
                                      Pair padding, Pair dilation, int groups, const py::array& row_ptr,
                                      const py::array& taps, const py::array& values, const py::object& bias,
                                      bool use_patterns) {
  ConvShape s;
  s.in_channels = in_channels;
  s.out_channels = out_channels;
  s.kernel_h = kernel[0]; s.kernel_w = kernel[1];
  s.stride_h = stride[0]; s.stride_w = stride[1];
  s.pad_h = padding[0]; s.pad_w = padding[1];
  s.dilation_h = dilation[0]; s.dilation_w = dilation[1];
  s.groups = groups;
  const auto ptr = int_vector(row_ptr, "row_ptr");
  const auto tp = int_vector(taps, "taps");
  require_dtype<float>(values, "values", "float32");
  require_ndim(values, "values", 1);
  require_aligned(values, "values");
  const auto val = py::array_t<float, py::array::c_style>(values);
  py::array_t<float, py::array::c_style> b;
  const float* bias_data = nullptr;
  if (!bias.is_none()) {
    const py::array ba = bias.cast<py::array>();
    require_dtype<float>(ba, "bias", "float32");
    require_ndim(ba, "bias", 1);
    require_aligned(ba, "bias");
    b = py::array_t<float, py::array::c_style>(ba);
    if (b.shape(0) != out_channels) throw py::value_error("bias must have out_channels entries");
    bias_data = b.data();
  }
  if (ptr.shape(0) == 0) throw py::value_error("row_ptr must not be empty");
  return std::make_unique<PackedConv>(PackedConv::make(s, ptr.data(), ptr.shape(0), tp.data(), tp.shape(0),
                                                       val.data(), val.shape(0), bias_data, use_patterns));
}

py::array_t<float> conv_forward(const PackedConv& p, const py::array& x, bool relu, int n_threads) {
  require_dtype<float>(x, "x", "float32");
  require_ndim(x, "x", 4);
  require_aligned(x, "x");
  const ConvShape& s = p.shape();
  if (x.shape(1) != s.in_channels)
    throw py::value_error("x must have " + std::to_string(s.in_channels) + " channels (dim 1), got " +
                          std::to_string(x.shape(1)));
  if (n_threads < 0) throw py::value_error("n_threads must be >= 0 (0 means the OpenMP default)");
  const ConvGeometry g = p.geometry(x.shape(2), x.shape(3));
  py::array_t<float> y({static_cast<py::ssize_t>(x.shape(0)), static_cast<py::ssize_t>(s.out_channels),
                        static_cast<py::ssize_t>(g.out_h), static_cast<py::ssize_t>(g.out_w)});
  ConvArgs a;
  a.x = static_cast<const float*>(x.data());
  a.batch = x.shape(0);
  for (int d = 0; d < 4; ++d) a.x_stride[d] = element_stride(x, "x", d);
  a.relu = relu;
  a.y = y.mutable_data();
  a.n_threads = n_threads;
  {
    py::gil_scoped_release release;
    p.run(g, a);
  }
  return y;
}

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

}  // namespace

void bind_conv(py::module_& m) {
  py::class_<PackedConv>(m, "PackedConv", "A sparse Conv2d weight and bias, validated and packed once.")
      .def(py::init(&make_conv), py::arg("in_channels"), py::arg("out_channels"), py::arg("kernel_size"),
           py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("row_ptr"),
           py::arg("taps"), py::arg("values"), py::arg("bias") = py::none(), py::arg("use_patterns") = false)
      .def("forward", &conv_forward, py::arg("x"), py::arg("relu") = false, py::arg("n_threads") = 0,
           "y = relu?(conv2d(x)) for x float32 [N, C, H, W] (any strides); the GIL is released while the "
           "kernel runs.")
      .def("output_size", [](const PackedConv& p, int64_t h, int64_t w) {
        const ConvGeometry g = p.geometry(h, w);
        return py::make_tuple(g.out_h, g.out_w);
      })
      .def_property_readonly("in_channels", [](const PackedConv& p) { return p.shape().in_channels; })
      .def_property_readonly("out_channels", [](const PackedConv& p) { return p.shape().out_channels; })
      .def_property_readonly("kernel_size", [](const PackedConv& p) { return py::make_tuple(p.shape().kernel_h, p.shape().kernel_w); })
      .def_property_readonly("stride", [](const PackedConv& p) { return py::make_tuple(p.shape().stride_h, p.shape().stride_w); })
      .def_property_readonly("padding", [](const PackedConv& p) { return py::make_tuple(p.shape().pad_h, p.shape().pad_w); })
      .def_property_readonly("dilation", [](const PackedConv& p) { return py::make_tuple(p.shape().dilation_h, p.shape().dilation_w); })
      .def_property_readonly("pattern_mode", &PackedConv::pattern_mode)
      .def_property_readonly("n_patterns", &PackedConv::n_patterns)
      .def_property_readonly("groups", [](const PackedConv& p) { return p.shape().groups; })
      .def_property_readonly("nnz", [](const PackedConv& p) { return static_cast<int64_t>(p.values().size()); })
      .def_property_readonly("row_ptr", [](const PackedConv& p) { return to_numpy(p.row_ptr()); })
      .def_property_readonly("taps", [](const PackedConv& p) { return to_numpy(p.taps()); })
      .def_property_readonly("values", [](const PackedConv& p) { return to_numpy(p.values()); })
      .def_property_readonly("bias", [](const PackedConv& p) -> py::object {
        if (p.bias().empty()) return py::none();
        return to_numpy(p.bias());
      });
}

}  // namespace bindings
}  // namespace sparseprune
