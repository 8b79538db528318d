// Run-time switches: which SIMD path the kernels take, and what OpenMP offers.
#include <pybind11/pybind11.h>

#include <string>

#include "kernels/cpu_features.h"

namespace sparseprune {
namespace bindings {

namespace py = pybind11;

namespace {

Isa parse_isa(const std::string& name) {
  if (name == "baseline" || name == "generic") return Isa::baseline;
  if (name == "avx2" || name == "avx2+fma") return Isa::avx2;
  if (name == "avx2_w16") return Isa::avx2_w16;
  if (name == "avx512") return Isa::avx512;
  throw py::value_error("isa must be 'auto', 'baseline', 'avx2', 'avx2_w16' or 'avx512', got '" + name + "'");
}

}  // namespace

void bind_runtime(py::module_& m) {
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); },
        "The SIMD path the kernels use now.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        if (name == "auto") {
          reset_isa();
          return;
        }
        const Isa isa = parse_isa(name);
        if (const char* why = isa_unavailable_reason(isa)) throw py::value_error(std::string("isa '") + name + "' cannot run here: " + why);
        set_isa(isa);
      },
      py::arg("isa"),
      "Force a SIMD path: 'baseline', 'avx2', 'avx2_w16' (the 16-lane body built for AVX2, a test path) or "
      "'avx512'; 'auto' picks the best (avx512 > avx2 > baseline).");
  m.def(
      "simd_paths",
      [] {
        py::list out;
        for (int i = 0; i < kIsaCount; ++i) {
          const Isa isa = static_cast<Isa>(i);
          const char* why = isa_unavailable_reason(isa);
          out.append(py::make_tuple(isa_name(isa), why ? py::object(py::str(why)) : py::object(py::none())));
        }
        return out;
      },
      "Every SIMD path as (name, None if it can run here else the reason it cannot).");
  m.def("cpu_has_avx2_fma", &cpu_has_avx2_fma);
  m.def("cpu_has_avx512", &cpu_has_avx512);
  m.def("openmp_enabled", &openmp_enabled);
  m.def("max_threads", &max_threads, "OpenMP's default thread count (1 without OpenMP).");
}

}  // namespace bindings
}  // namespace sparseprune
