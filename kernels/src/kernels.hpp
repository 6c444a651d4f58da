// Shared declarations of the vla-edge C++ kernels. Each kernel file registers its Python bindings
// through one register_* function, called from module.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace vla_edge {

// resample.cpp: PIL-exact resampling and multi-view composition (Composer).
void register_resample(pybind11::module_& m);

// tokens.cpp: action/proprio token codecs and the grammar-constrained decoder (ChunkGrammar).
void register_tokens(pybind11::module_& m);

// stopwire.cpp: the e-stop key's path to the actuators without the GIL (StopWire).
void register_stopwire(pybind11::module_& m);

}  // namespace vla_edge
