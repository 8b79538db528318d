// The private extension module sparseprune._C: the module definition and build_info only.
#include <pybind11/pybind11.h>

#include "kernels/cpu_features.h"

namespace py = pybind11;

namespace sparseprune {
namespace bindings {
void bind_linear(py::module_& m);
void bind_runtime(py::module_& m);
void bind_conv(py::module_& m);
void bind_plan(py::module_& m);
}  // namespace bindings
}  // namespace sparseprune

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparseprune native kernels (private: use the sparseprune package)";
  sparseprune::bindings::bind_linear(m);
  sparseprune::bindings::bind_runtime(m);
  sparseprune::bindings::bind_conv(m);
  sparseprune::bindings::bind_plan(m);
  m.def("build_info", [] {
    py::dict info;
    info["compiler"] = SP_COMPILER;
    info["cxx_flags"] = SP_CXX_FLAGS;
    info["build_type"] = SP_BUILD_TYPE;
    info["openmp"] = sparseprune::openmp_enabled();
    info["simd_paths_compiled"] = SP_SIMD_PATHS;
    info["simd_path_active"] = sparseprune::isa_name(sparseprune::active_isa());
    // Paths compiled in but unable to run on this CPU, with the reason (the fallback is silent).
    py::dict skipped;
    for (int i = 0; i < sparseprune::kIsaCount; ++i) {
      const auto isa = static_cast<sparseprune::Isa>(i);
      if (const char* why = sparseprune::isa_unavailable_reason(isa)) skipped[sparseprune::isa_name(isa)] = why;
    }
    info["simd_paths_unavailable"] = skipped;
    return info;
  });
}
