// vla_edge.kernels._core: the pybind11 module. Each kernel lives in its own .cpp and registers
// itself through a register_* function declared in kernels.hpp.
#include <pybind11/pybind11.h>

#include <string>

#include "kernels.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "vla-edge C++ kernels: multi-view image composition and constrained token decoding";
  m.def("build_info", []() {
    return std::string("vla-edge kernels, C++") + std::to_string(__cplusplus / 100 % 100);
  }, "Describe how the extension was built.");
  vla_edge::register_resample(m);
  vla_edge::register_tokens(m);
  vla_edge::register_stopwire(m);
}
