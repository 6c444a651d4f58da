// Action/proprio token codecs and the grammar-constrained greedy decoder (CONTRACT.md section 1).
//
// Bins: b = the n_bins ascending edges passed in (float64): numpy.linspace(-1, 1, 256) for LLaVA-VLA's
// default, or the reference's non-uniform "norm" table (vla_edge/edge/spec.py bin_edges).
//   encode: i = digitize(clip(x, -1, 1), b) in 1..n_bins, token id = V - i
//   decode: k = clip(V - id - 1, 0, n_bins - 2), x = (b[k] + b[k+1]) / 2
// Every formula keeps numpy's operation order in float64 (the build sets -ffp-contract=off), so the
// results equal kernels/reference.py bit for bit.
//
// The decoder works in *cut-head index space* (edge/spec.py TokenSpec): index j < n_bins is the bin
// token V - n_bins + j, index n_bins is <|im_end|>, n_bins+1..n_bins+4 are the directions
// forward, turn_left, turn_right, stop.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "array_args.hpp"
#include "kernels.hpp"

namespace vla_edge {
namespace {

constexpr int kDirections = 4;  // forward, turn_left, turn_right, stop (spec.DIRECTIONS order)
constexpr int kStop = 3;        // index of "stop" among the directions

void check_n_bins(int n_bins) {
  if (n_bins < 2 || n_bins > 65536) {
    throw py::value_error("n_bins must be in 2..65536, got " + std::to_string(n_bins));
  }
}

// numpy.linspace(-1.0, 1.0, n) for float64: y[i] = i * step + start, step = (stop - start) / (n - 1),
// and the last element is set to stop exactly.
std::vector<double> bin_edges(int n_bins) {
  check_n_bins(n_bins);
  const double start = -1.0, stop = 1.0;
  const double step = (stop - start) / static_cast<double>(n_bins - 1);
  std::vector<double> b(n_bins);
  for (int i = 0; i < n_bins; ++i) b[i] = static_cast<double>(i) * step + start;
  b[n_bins - 1] = stop;
  return b;
}

// The bin edges given by the caller: 1-D float64, 2..65536 finite values, strictly ascending.
std::vector<double> edges_arg(py::handle edges_obj) {
  auto e = require_array<double>(edges_obj, "edges", 1);
  const py::ssize_t n = e.shape(0);
  check_n_bins(static_cast<int>(std::min<py::ssize_t>(n, 1 << 20)));
  std::vector<double> b(e.data(), e.data() + n);
  for (py::ssize_t i = 0; i < n; ++i) {
    if (!std::isfinite(b[i]) || (i > 0 && !(b[i] > b[i - 1]))) {
      throw py::value_error("edges must be finite and strictly ascending (edges[" + std::to_string(i) + "])");
    }
  }
  return b;
}

// Normalised value in [-1, 1] of the bin whose token is `V - i - 1`, i.e. the centre of bin k.
inline double bin_centre(const std::vector<double>& b, int64_t k) { return (b[k] + b[k + 1]) / 2.0; }

// ---------------------------------------------------------------------------------------------
// Token codecs

py::array_t<double> detokenize_actions(py::handle token_ids_obj, int64_t vocab_base, py::handle lo_obj,
                                       py::handle hi_obj, py::handle edges_obj) {
  auto ids = require_array<int64_t>(token_ids_obj, "token_ids", 1);
  auto lo = require_array<double>(lo_obj, "lo", 1);
  auto hi = require_array<double>(hi_obj, "hi", 1);
  const auto b = edges_arg(edges_obj);
  const int n_bins = static_cast<int>(b.size());
  const py::ssize_t dims = lo.shape(0);
  if (dims == 0) throw py::value_error("lo must not be empty");
  if (hi.shape(0) != dims) {
    throw py::value_error("hi has " + std::to_string(hi.shape(0)) + " entries but lo has " +
                          std::to_string(dims));
  }
  const py::ssize_t n = ids.shape(0);
  if (n % dims != 0) {
    throw py::value_error("token_ids has " + std::to_string(n) + " entries, not a multiple of the " +
                          std::to_string(dims) + " action dimensions");
  }
  const int64_t first = vocab_base - n_bins, last = vocab_base - 1;
  const int64_t* id = ids.data();
  for (py::ssize_t i = 0; i < n; ++i) {
    if (id[i] < first || id[i] > last) {
      throw py::value_error("token_ids[" + std::to_string(i) + "] = " + std::to_string(id[i]) +
                            " is not an action bin token (expected " + std::to_string(first) + ".." +
                            std::to_string(last) + ")");
    }
  }
  py::array_t<double> out({n / dims, dims});
  double* a = out.mutable_data();
  const double* l = lo.data();
  const double* h = hi.data();
  {
    py::gil_scoped_release release;
    for (py::ssize_t i = 0; i < n; ++i) {
      const int64_t k = std::clamp<int64_t>(vocab_base - id[i] - 1, 0, n_bins - 2);
      const double x = bin_centre(b, k);
      const py::ssize_t d = i % dims;
      a[i] = (x + 1.0) / 2.0 * (h[d] - l[d]) + l[d];
    }
  }
  return out;
}

py::array_t<int64_t> tokenize_proprio(py::handle state_obj, py::handle mean_obj, py::handle std_obj,
                                      int64_t vocab_base, py::handle edges_obj) {
  auto state = require_array<double>(state_obj, "state", 1);
  auto mean = require_array<double>(mean_obj, "mean", 1);
  auto stdv = require_array<double>(std_obj, "std", 1);
  const auto b = edges_arg(edges_obj);
  const py::ssize_t dims = state.shape(0);
  if (mean.shape(0) != dims || stdv.shape(0) != dims) {
    throw py::value_error("state, mean and std must have the same length, got " +
                          std::to_string(dims) + ", " + std::to_string(mean.shape(0)) + ", " +
                          std::to_string(stdv.shape(0)));
  }
  const double* s = state.data();
  const double* m = mean.data();
  const double* sd = stdv.data();
  py::array_t<int64_t> out(dims);
  int64_t* ids = out.mutable_data();
  for (py::ssize_t d = 0; d < dims; ++d) {
    double x = ((s[d] - m[d]) / (sd[d] + 1e-5)) / 3.0;
    if (std::isnan(x)) {
      throw py::value_error("state[" + std::to_string(d) + "] is NaN after normalisation (state=" +
                            std::to_string(s[d]) + ", mean=" + std::to_string(m[d]) + ", std=" +
                            std::to_string(sd[d]) + "): a sensor fault, refusing to tokenize");
    }
    x = std::min(std::max(x, -1.0), 1.0);                     // np.clip
    const auto i = std::upper_bound(b.begin(), b.end(), x) - b.begin();  // np.digitize, right=False
    ids[d] = vocab_base - static_cast<int64_t>(i);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Grammar

// Which head indices may come next, as the half-open range [lo, hi) of the cut head.
class ChunkGrammar {
 public:
  ChunkGrammar(int n_bins, int chunk_tokens, bool navigation)
      : n_bins_(n_bins), chunk_(chunk_tokens), navigation_(navigation) {
    check_n_bins(n_bins);
    if (chunk_tokens < 1) {
      throw py::value_error("chunk_tokens must be >= 1, got " + std::to_string(chunk_tokens));
    }
  }

  int n_bins() const { return n_bins_; }
  int chunk_tokens() const { return chunk_; }
  bool navigation() const { return navigation_; }
  int width() const { return n_bins_ + 1 + kDirections; }
  int im_end() const { return n_bins_; }
  int position() const { return pos_; }
  int direction() const { return dir_; }
  bool done() const { return pos_ >= length(); }

  void reset() { pos_ = 0; dir_ = -1; }

  // (position, direction); direction is -1 until a navigation output has chosen one.
  std::pair<int, int> state() const { return {pos_, dir_}; }

  void set_state(std::pair<int, int> st) {
    const auto [pos, dir] = st;
    bool ok;
    if (!navigation_) {
      ok = dir == -1 && pos >= 0 && pos <= chunk_ + 1;
    } else if (pos == 0) {
      ok = dir == -1;
    } else {
      ok = dir >= 0 && dir < kDirections && pos >= 1 && pos <= length_for(dir);
    }
    if (!ok) {
      throw py::value_error("state (" + std::to_string(pos) + ", " + std::to_string(dir) +
                            ") is not a valid grammar state for this ChunkGrammar");
    }
    pos_ = pos;
    dir_ = dir;
  }

  // Allowed next head indices [lo, hi); (0, 0) once done.
  std::pair<int, int> allowed() const {
    if (done()) return {0, 0};
    const int bins_lo = 0, bins_hi = n_bins_, end_lo = n_bins_, end_hi = n_bins_ + 1;
    if (!navigation_) return pos_ < chunk_ ? std::make_pair(bins_lo, bins_hi) : std::make_pair(end_lo, end_hi);
    if (pos_ == 0) return {n_bins_ + 1, n_bins_ + 1 + kDirections};
    if (pos_ == 1) return {bins_lo, bins_hi};                           // VALUE
    if (dir_ == kStop && pos_ < 2 + chunk_) return {bins_lo, bins_hi};  // the action chunk
    return {end_lo, end_hi};
  }

  void advance(int head) {
    if (done()) throw py::value_error("grammar is done: no token may follow <|im_end|>");
    const auto [lo, hi] = allowed();
    if (head < lo || head >= hi) {
      throw py::value_error("head index " + std::to_string(head) + " is not allowed at position " +
                            std::to_string(pos_) + " (allowed " + std::to_string(lo) + ".." +
                            std::to_string(hi - 1) + ")");
    }
    if (navigation_ && pos_ == 0) dir_ = head - (n_bins_ + 1);
    ++pos_;
  }

  // Constrained argmax of one logits row (lowest index wins ties); raises on NaN in the allowed range.
  int choose(const float* row) const {
    const auto [lo, hi] = allowed();
    int best = lo;
    float best_v = row[lo];
    for (int j = lo; j < hi; ++j) {
      const float v = row[j];
      if (std::isnan(v)) return -1 - j;  // reported by the caller (the GIL may be released here)
      if (v > best_v) { best_v = v; best = j; }
    }
    return best;
  }

  int step(py::handle logits_obj) {
    auto logits = require_array<float>(logits_obj, "logits", 1);
    check_width(logits.shape(0));
    if (done()) throw py::value_error("grammar is done: call reset() before the next chunk");
    const int j = choose(logits.data());
    if (j < 0) throw_nan(-1 - j, -1);
    advance(j);
    return j;
  }

  py::array_t<int64_t> argmax_rows(py::handle logits_obj) const {
    auto logits = require_array<float>(logits_obj, "logits", 2);
    check_width(logits.shape(1));
    const py::ssize_t rows = logits.shape(0);
    py::array_t<int64_t> out(rows);
    int64_t* o = out.mutable_data();
    const float* data = logits.data();
    ChunkGrammar g = *this;
    py::ssize_t nan_row = -1;
    int nan_col = -1;
    {
      py::gil_scoped_release release;
      for (py::ssize_t r = 0; r < rows; ++r) {
        if (g.done()) { o[r] = -1; continue; }
        const int j = g.choose(data + r * width());
        if (j < 0) { nan_row = r; nan_col = -1 - j; break; }
        g.pos_ += 1;
        if (g.navigation_ && g.pos_ == 1) g.dir_ = j - (n_bins_ + 1);
        o[r] = j;
      }
    }
    if (nan_row >= 0) throw_nan(nan_col, nan_row);
    return out;
  }

 private:
  int length_for(int dir) const { return dir == kStop ? 3 + chunk_ : 3; }
  int length() const {
    if (!navigation_) return chunk_ + 1;
    return dir_ < 0 ? 3 : length_for(dir_);
  }
  void check_width(py::ssize_t w) const {
    if (w != width()) {
      throw py::value_error("logits must have " + std::to_string(width()) + " columns (n_bins + 5), got " +
                            std::to_string(w));
    }
  }
  [[noreturn]] static void throw_nan(int col, py::ssize_t row) {
    std::string where = row >= 0 ? "logits[" + std::to_string(row) + ", " + std::to_string(col) + "]"
                                 : "logits[" + std::to_string(col) + "]";
    throw py::value_error(where + " is NaN: the model output is corrupt");
  }

  int n_bins_, chunk_;
  bool navigation_;
  int pos_ = 0;
  int dir_ = -1;
};

// (direction index 0..3, value) of a navigation output [DIR, VALUE, ...] in head-index space.
// value = (x + 1) / 2 * full_scale with x the VALUE bin centre; stop gives 0.0.
std::pair<int, double> parse_navigation(py::handle heads_obj, py::handle edges_obj, double d_max_m,
                                        double theta_max_deg) {
  auto heads = require_array<int64_t>(heads_obj, "head_indices", 1);
  const auto b = edges_arg(edges_obj);
  const int n_bins = static_cast<int>(b.size());
  if (heads.shape(0) < 2) {
    throw py::value_error("head_indices must hold at least DIR and VALUE, got " +
                          std::to_string(heads.shape(0)) + " entries");
  }
  const int64_t dir = heads.data()[0] - (n_bins + 1);
  const int64_t value = heads.data()[1];
  if (dir < 0 || dir >= kDirections) {
    throw py::value_error("head_indices[0] = " + std::to_string(heads.data()[0]) +
                          " is not a direction (expected " + std::to_string(n_bins + 1) + ".." +
                          std::to_string(n_bins + kDirections) + ")");
  }
  if (value < 0 || value >= n_bins) {
    throw py::value_error("head_indices[1] = " + std::to_string(value) + " is not a bin (expected 0.." +
                          std::to_string(n_bins - 1) + ")");
  }
  if (dir == kStop) return {static_cast<int>(dir), 0.0};
  // head j is token V - n_bins + j, so k = clip(V - id - 1) = clip(n_bins - 1 - j).
  const int64_t k = std::clamp<int64_t>(n_bins - 1 - value, 0, n_bins - 2);
  const double x = bin_centre(b, k);
  const double full_scale = dir == 0 ? d_max_m : theta_max_deg;
  return {static_cast<int>(dir), (x + 1.0) / 2.0 * full_scale};
}

}  // namespace

void register_tokens(py::module_& m) {
  m.def("bin_edges", [](int n_bins) { return py::array_t<double>(py::cast(bin_edges(n_bins))); },
        py::arg("n_bins"), "numpy.linspace(-1, 1, n_bins) as tabulated by the C++ codecs (float64).");
  m.def("detokenize_actions", &detokenize_actions, py::arg("token_ids"), py::arg("vocab_base"),
        py::arg("lo"), py::arg("hi"), py::arg("edges"),
        "Action token ids (int64, chunk*D) -> de-normalised actions float64 (chunk, D).");
  m.def("tokenize_proprio", &tokenize_proprio, py::arg("state"), py::arg("mean"), py::arg("std"),
        py::arg("vocab_base"), py::arg("edges"),
        "State (float64, D) -> proprio token ids int64 (D,). Raises ValueError on NaN.");
  m.def("parse_navigation", &parse_navigation, py::arg("head_indices"), py::arg("edges"),
        py::arg("d_max_m"), py::arg("theta_max_deg"),
        "Navigation output [DIR, VALUE, ...] (head indices) -> (direction index, value).");

  py::class_<ChunkGrammar>(m, "ChunkGrammar",
                           "Grammar-constrained greedy decoding in cut-head index space.")
      .def(py::init<int, int, bool>(), py::arg("n_bins"), py::arg("chunk_tokens"), py::arg("navigation"))
      .def("reset", &ChunkGrammar::reset)
      .def("step", &ChunkGrammar::step, py::arg("logits"))
      .def("argmax_rows", &ChunkGrammar::argmax_rows, py::arg("logits"))
      .def("advance", &ChunkGrammar::advance, py::arg("head_index"))
      .def("allowed", &ChunkGrammar::allowed)
      .def("set_state", &ChunkGrammar::set_state, py::arg("state"))
      .def_property_readonly("state", &ChunkGrammar::state)
      .def_property_readonly("done", &ChunkGrammar::done)
      .def_property_readonly("position", &ChunkGrammar::position)
      .def_property_readonly("direction", &ChunkGrammar::direction)
      .def_property_readonly("width", &ChunkGrammar::width)
      .def_property_readonly("n_bins", &ChunkGrammar::n_bins)
      .def_property_readonly("chunk_tokens", &ChunkGrammar::chunk_tokens)
      .def_property_readonly("navigation", &ChunkGrammar::navigation)
      .def("__copy__", [](const ChunkGrammar& g) { return ChunkGrammar(g); });
}

}  // namespace vla_edge
