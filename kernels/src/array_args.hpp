// Argument checks shared by the bindings: every bad array becomes a Python TypeError/ValueError that
// names the argument, never a crash.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

namespace vla_edge {

namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += std::to_string(a.shape(i));
    s += (a.ndim() == 1) ? "," : (i + 1 < a.ndim() ? ", " : "");
  }
  return s + ")";
}

// Return `obj` as a C-contiguous numpy array of element type T and `ndim` dimensions, or raise.
// No conversion or copy happens: a list, a wrong dtype or a strided view is the caller's mistake.
template <typename T>
py::array_t<T> require_array(py::handle obj, const char* name, int ndim) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + " must be a numpy array, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  auto arr = py::reinterpret_borrow<py::array>(obj);
  const py::dtype want = py::dtype::of<T>();
  const py::dtype got = arr.dtype();
  const bool native = got.byteorder() == '=' || got.byteorder() == '|' || got.byteorder() == '<';
  if (got.kind() != want.kind() || got.itemsize() != want.itemsize() || !native) {
    throw py::type_error(std::string(name) + " must have dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(arr.dtype())));
  }
  if (arr.ndim() != ndim) {
    throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) +
                          " dimension(s), got shape " + shape_str(arr));
  }
  if (!(arr.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be C-contiguous (use np.ascontiguousarray)");
  }
  return py::reinterpret_borrow<py::array_t<T>>(arr);
}

}  // namespace vla_edge
