// Argument checks shared by the bindings: strict dtypes, no silent conversion, messages that
// name the argument. All of them run with the GIL held, before any kernel starts.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

namespace sparseprune {
namespace bindings {

namespace py = pybind11;

inline std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

template <class T>
inline void require_dtype(const py::array& a, const char* name, const char* expected) {
  // equal(), not is(): an unpickled array carries an equal but distinct dtype object.
  if (!a.dtype().equal(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + " must have dtype " + expected + ", got " + dtype_name(a));
}

inline void require_ndim(const py::array& a, const char* name, py::ssize_t ndim) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got " +
                          std::to_string(a.ndim()) + "-D");
}

inline void require_c_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous");
}

// numpy arrays may start at any byte (np.frombuffer(buf, offset=1), a view into a uint8 buffer),
// but the kernels read elements through typed pointers, and a misaligned float or int64 load is
// undefined behaviour. Policy: every array a binding takes is checked here and refused; the
// Python API (Executable, SparseLinear, SparseConv2d, formats.pack) passes aligned copies.
// numpy's ALIGNED flag covers the data address and the strides of every axis longer than 1.
inline void require_aligned(const py::array& a, const char* name) {
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    const std::string bytes = std::to_string(a.dtype().attr("alignment").cast<int>());
    throw py::value_error(std::string(name) + " is not aligned: its address and strides must be multiples of " +
                          bytes + " bytes for dtype " + dtype_name(a) + " (pass an aligned copy, e.g. a.copy())");
  }
}

// Element stride of axis `axis`; byte strides that are not whole floats are refused.
inline int64_t element_stride(const py::array& a, const char* name, int axis) {
  const py::ssize_t s = a.strides(axis);
  if (s % static_cast<py::ssize_t>(sizeof(float)) != 0)
    throw py::value_error(std::string(name) + " has a stride that is not a whole number of elements");
  return static_cast<int64_t>(s / static_cast<py::ssize_t>(sizeof(float)));
}

}  // namespace bindings
}  // namespace sparseprune
