// Run-time switches: which SIMD path the kernels take, and what OpenMP offers.
#include <pybind11/pybind11.h>

#include "kernels/cpu_features.h"

namespace sparseprune {
namespace bindings {

namespace py = pybind11;

void bind_runtime(py::module_& m) {
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); },
        "The SIMD path the kernels use now.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        if (name == "auto") {
          reset_isa();
        } else if (name == "baseline") {
          set_isa(Isa::baseline);
        } else if (name == "avx2" || name == "avx2+fma") {
          if (!set_isa(Isa::avx2)) throw py::value_error("isa 'avx2' cannot run on this CPU or build");
        } else {
          throw py::value_error("isa must be 'auto', 'baseline' or 'avx2', got '" + name + "'");
        }
      },
      py::arg("isa"), "Force a SIMD path (tests use this to check every path); 'auto' picks the best.");
  m.def("cpu_has_avx2_fma", &cpu_has_avx2_fma);
  m.def("openmp_enabled", &openmp_enabled);
  m.def("max_threads", &max_threads, "OpenMP's default thread count (1 without OpenMP).");
}

}  // namespace bindings
}  // namespace sparseprune
