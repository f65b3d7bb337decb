// pybind11 only: validate the arrays, take their pointers, release the GIL, dispatch the dtype.
// Each optimizer is one `def_optimizer` line; its kernel header says which arrays it takes.
#include <pthread.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "kernels/adagrad.hpp"
#include "kernels/adam.hpp"
#include "kernels/common.hpp"
#include "kernels/finite.hpp"
#include "kernels/lion.hpp"
#include "kernels/norm.hpp"
#include "kernels/rmsprop.hpp"
#include "kernels/roofline.hpp"
#include "kernels/sgd.hpp"

namespace py = pybind11;
using fusedopt::Index;
using fusedopt::Role;

namespace {

// Threads for the kernels, shared by every Python thread (omp_set_num_threads would only set the
// calling thread's count). 0 means OpenMP's default, which honours OMP_NUM_THREADS.
std::atomic<int> num_threads{0};

// Calls of fewer elements run on the calling thread: below it, opening a parallel region costs
// more than it saves. `python bench/run.py --threshold [--gap 0.002]` measures it: on 2 cores
// parallel Adam won from 4 Ki elements back to back and from 8 Ki with the threads asleep
// between calls, clearly (>= 20 %) from 16 Ki in both. Settable for that measurement.
std::atomic<Index> parallel_min{Index{1} << 14};

// GNU libgomp cannot open a parallel region in a child forked after the parent opened one: the
// child inherits the thread pool's bookkeeping but not its threads, and waits for them forever.
// Such a child runs the kernels on its calling thread instead (same results, one core). The flags
// are this module's: the package runs every kernel through one module.
std::atomic<bool> opened_parallel_region{false};
std::atomic<bool> serial_after_fork{false};

void after_fork_in_child() {
  if (opened_parallel_region.load()) serial_after_fork.store(true);
}

int threads_for_kernels() {
#ifdef _OPENMP
  if (serial_after_fork.load(std::memory_order_relaxed)) return 1;
  const int n = num_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
#else
  return 1;
#endif
}

// Threads for a call of `total` elements: one below the parallel threshold.
int threads_for_call(Index total) {
  if (total < parallel_min.load(std::memory_order_relaxed)) return 1;
  const int threads = threads_for_kernels();
  if (threads > 1) opened_parallel_region.store(true, std::memory_order_relaxed);
  return threads;
}

// Releases the GIL for the lifetime of this object, for calls of at least the parallel
// threshold: a smaller call runs on the calling thread for a few microseconds, about what
// releasing and taking back the GIL costs, so it keeps the GIL.
class ReleaseGilIfWorthIt {
 public:
  explicit ReleaseGilIfWorthIt(Index total) {
    if (total >= parallel_min.load(std::memory_order_relaxed)) release_.emplace();
  }

 private:
  std::optional<py::gil_scoped_release> release_;
};

// type(obj).__name__, as Python's own messages say it.
std::string type_name(py::handle obj) {
  return py::type::handle_of(obj).attr("__name__").cast<std::string>();
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    s += std::to_string(a.shape(d));
    if (a.ndim() == 1 || d + 1 < a.ndim()) s += d + 1 < a.ndim() ? ", " : ",";
  }
  return s + ")";
}

bool is_list(py::handle obj) { return PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr()); }

// Names one array of a call in messages: "grad", or "grad[3]" in a list call. Built into a
// string only when a message needs it, so a valid call allocates no strings.
struct Label {
  const char* role;
  py::ssize_t index;  // -1 in a single-array call

  std::string str() const {
    return index < 0 ? role : std::string(role) + "[" + std::to_string(index) + "]";
  }
};

// The arrays of one call, checked: a pointer per (tensor, role), nullptr where an optional role
// is absent, and each tensor's element count.
struct Checked {
  bool is_double = false;
  std::size_t roles = 0;
  std::vector<void*> data;  // tensor i, role r at i * roles + r
  std::vector<Index> sizes;
};

// The bytes of one array of a call; `slot` is tensor * roles + role, for the message.
struct Extent {
  const char* begin;
  const char* end;
  std::size_t slot;
  bool written;
};

// No array that is written may share a byte with any other array of the call: the kernel reads
// and writes chunk by chunk, so aliasing would silently give wrong results. Returns the slots
// of an overlapping pair, or nothing. Extents stay small so that sorting a long list is cheap.
std::optional<std::pair<std::size_t, std::size_t>> find_overlap(std::vector<Extent>& extents) {
  std::sort(extents.begin(), extents.end(),
            [](const Extent& a, const Extent& b) { return a.begin < b.begin; });
  const Extent* furthest = nullptr;          // of all extents so far, the one ending last
  const Extent* furthest_written = nullptr;  // likewise among written ones
  for (const Extent& e : extents) {
    const Extent* hit = nullptr;
    if (furthest_written != nullptr && e.begin < furthest_written->end) {
      hit = furthest_written;
    } else if (e.written && furthest != nullptr && e.begin < furthest->end) {
      hit = furthest;
    }
    if (hit != nullptr) return std::make_pair(hit->slot, e.slot);
    if (furthest == nullptr || e.end > furthest->end) furthest = &e;
    if (e.written && (furthest_written == nullptr || e.end > furthest_written->end)) {
      furthest_written = &e;
    }
  }
  return std::nullopt;
}

std::string dtype_name(const py::dtype& dtype) { return py::str(dtype).cast<std::string>(); }

// Exactly this dtype, byte order included (a byte-swapped float32 is not float32).
bool same_dtype(const py::dtype& a, const py::dtype& b) {
  return py::detail::npy_api::get().PyArray_EquivTypes_(a.ptr(), b.ptr());
}

// Checks one array against its tensor's param (`ref`, or nullptr when it is the param) and the
// call's dtype, so that nothing is ever converted or copied: a copy would be updated instead of
// the caller's array. `dtype_owner` names the array the call's dtype comes from.
void check_array(const Label& label, py::handle obj, const py::array* ref,
                 const py::dtype& dtype, const std::string& dtype_owner, bool written) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(label.str() + ": expected a numpy.ndarray, got " + type_name(obj));
  }
  const auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!same_dtype(arr.dtype(), dtype)) {
    const bool other_tensor = label.index > 0;
    throw py::type_error(label.str() + ": expected dtype " + dtype_name(dtype) + " like " +
                         dtype_owner + ", got " + dtype_name(arr.dtype()) +
                         (other_tensor ? " (one call takes one dtype)" : ""));
  }
  const bool c_order = (arr.flags() & py::array::c_style) != 0;
  const bool f_order = (arr.flags() & py::array::f_style) != 0;
  if (!c_order && !f_order) {
    throw py::value_error(label.str() +
                          ": expected a C- or F-contiguous array, got a strided view "
                          "(it cannot be updated in place without a copy)");
  }
  if (ref != nullptr) {
    bool same_shape = arr.ndim() == ref->ndim();
    for (py::ssize_t d = 0; same_shape && d < arr.ndim(); ++d) {
      same_shape = arr.shape(d) == ref->shape(d);
    }
    if (!same_shape) {
      throw py::value_error(label.str() + ": expected shape " + shape_str(*ref) +
                            " like param, got " + shape_str(arr));
    }
    const bool ref_c = (ref->flags() & py::array::c_style) != 0;
    if (!(ref_c ? c_order : f_order)) {
      throw py::value_error(label.str() + ": expected the memory layout of param (" +
                            (ref_c ? "C" : "F") + "-contiguous), got " + (c_order ? "C" : "F") +
                            "-contiguous");
    }
  }
  if (written && !arr.writeable()) {
    throw py::value_error(label.str() + ": array is read-only");
  }
}

constexpr double kInfinity = std::numeric_limits<double>::infinity();

// Hyperparameters: what each name accepts, checked in one place for the functions and the
// optimizer classes, with PyTorch's messages.
enum class Kind { real, step, flag };

struct Rule {
  const char* name;
  Kind kind;
  const char* label = nullptr;  // a real's name in messages
  double low = 0.0;
  double high = kInfinity;
  bool low_open = false;
  bool high_open = true;
};

constexpr Rule kRules[] = {
    {"lr", Kind::real, "learning rate"},
    {"eps", Kind::real, "epsilon value", 0.0, kInfinity, true},
    {"beta1", Kind::real, "beta parameter at index 0", 0.0, 1.0},
    {"beta2", Kind::real, "beta parameter at index 1", 0.0, 1.0},
    {"beta", Kind::real, "beta value", 0.0, 1.0},
    {"weight_decay", Kind::real, "weight_decay value"},
    {"momentum", Kind::real, "momentum value"},
    {"dampening", Kind::real, "dampening value", 0.0, 1.0, false, false},
    {"alpha", Kind::real, "alpha value", 0.0, 1.0, false, false},
    {"lr_decay", Kind::real, "lr_decay value"},
    {"initial_accumulator_value", Kind::real, "initial_accumulator_value"},
    {"factor", Kind::real, "factor"},
    {"step", Kind::step},
    {"maximize", Kind::flag},
    {"nesterov", Kind::flag},
    {"decoupled_weight_decay", Kind::flag},
    {"amsgrad", Kind::flag},
    {"centered", Kind::flag},
    {"skip_if_nonfinite", Kind::flag},
};
constexpr std::size_t kRuleCount = sizeof(kRules) / sizeof(kRules[0]);

std::string str_of(PyObject* value) { return py::str(value).cast<std::string>(); }

// int, float and NumPy's integer and floating scalars; not bool, str or anything else that
// float() would take.
bool is_real_number(PyObject* value) {
  if (PyBool_Check(value)) return false;
  if (PyFloat_Check(value) || PyLong_Check(value)) return true;
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::tuple> numpy_types;
  const py::tuple& types = numpy_types
                               .call_once_and_store_result([] {
                                 const auto numpy = py::module_::import("numpy");
                                 return py::make_tuple(numpy.attr("integer"),
                                                       numpy.attr("floating"));
                               })
                               .get_stored();
  const int is_numpy = PyObject_IsInstance(value, types.ptr());
  if (is_numpy < 0) throw py::error_already_set();
  return is_numpy == 1;
}

double parse_real(const Rule& rule, PyObject* value) {
  double v;
  if (PyFloat_CheckExact(value)) {  // the common case first: it runs several times per call
    v = PyFloat_AS_DOUBLE(value);
  } else {
    if (!is_real_number(value)) {
      throw py::type_error(std::string(rule.label) + " must be a real number, got " +
                           type_name(value));
    }
    v = PyFloat_AsDouble(value);
    if (v == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  }
  const bool above = rule.low_open ? rule.low < v : rule.low <= v;
  const bool below = rule.high_open ? v < rule.high : v <= rule.high;
  if (!(above && below)) {  // also rejects NaN
    throw py::value_error(std::string("Invalid ") + rule.label + ": " + str_of(value));
  }
  return v;
}

// The count of steps including this one, from 1: an integer (operator.index), not a bool.
std::int64_t parse_step(PyObject* value) {
  if (PyBool_Check(value)) throw py::type_error("step must be an integer, got bool");
  const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(value));
  if (!index) {
    PyErr_Clear();
    throw py::type_error("step must be an integer, got " + type_name(value));
  }
  int overflow = 0;
  const long long step = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0 || step < 1) {
    throw py::value_error("Invalid step: " + str_of(index.ptr()) +
                          (overflow > 0 ? " (at most 2**63 - 1)"
                                        : " (the count of steps including this one, from 1)"));
  }
  return step;
}

bool parse_flag(PyObject* value) {
  const int truth = PyObject_IsTrue(value);
  if (truth < 0) throw py::error_already_set();
  return truth == 1;
}

// The rule of a keyword, by identity first: keywords written in Python source are interned, so
// the comparison of strings is only a fallback.
const Rule& rule_of(PyObject* keyword) {
  static const std::array<PyObject*, kRuleCount> names = [] {
    std::array<PyObject*, kRuleCount> interned{};
    for (std::size_t i = 0; i < kRuleCount; ++i) {
      interned[i] = PyUnicode_InternFromString(kRules[i].name);
    }
    return interned;
  }();
  for (std::size_t i = 0; i < kRuleCount; ++i) {
    if (names[i] == keyword) return kRules[i];
  }
  for (std::size_t i = 0; i < kRuleCount; ++i) {
    if (PyUnicode_Compare(names[i], keyword) == 0) return kRules[i];
  }
  throw py::type_error("unexpected hyperparameter " + str_of(keyword));
}

// The index in kRules of the rule named `name`, a string literal of a kernel's. Equal literals
// are normally merged into one object, so addresses are compared before the characters.
std::size_t rule_index(const char* name) {
  for (std::size_t i = 0; i < kRuleCount; ++i) {
    if (kRules[i].name == name) return i;
  }
  for (std::size_t i = 0; i < kRuleCount; ++i) {
    if (std::strcmp(kRules[i].name, name) == 0) return i;
  }
  throw py::type_error(std::string("no rule for hyperparameter ") + name);
}

// The keyword arguments of a call, parsed and validated before any array is looked at. The
// kernel then reads each by name; every one must be read exactly once: a missing or unread
// name is a programming error in the Python layer, not silently ignored.
class Hyper {
 public:
  Hyper(std::size_t count, PyObject* const* keywords, PyObject* const* values) : count_(count) {
    if (count > entries_.size()) throw py::type_error("too many hyperparameters");
    for (std::size_t i = 0; i < count; ++i) {
      Entry& e = entries_[i];
      e.rule = &rule_of(keywords[i]);
      e.value = values[i];
      switch (e.rule->kind) {
        case Kind::real: e.number = parse_real(*e.rule, values[i]); break;
        case Kind::step: e.number = static_cast<double>(e.step = parse_step(values[i])); break;
        case Kind::flag: e.number = parse_flag(values[i]) ? 1.0 : 0.0; break;
      }
      by_rule_[static_cast<std::size_t>(e.rule - kRules)] = &e;
    }
    const Entry* nesterov = lookup("nesterov");
    if (nesterov != nullptr && nesterov->number != 0.0) {
      const Entry* momentum = lookup("momentum");
      const Entry* dampening = lookup("dampening");
      if (momentum == nullptr || momentum->number <= 0.0 || dampening == nullptr ||
          dampening->number != 0.0) {
        throw py::value_error("Nesterov momentum requires a momentum and zero dampening");
      }
    }
  }

  double real(const char* name) const { return get(name, Kind::real).number; }
  bool flag(const char* name) const { return get(name, Kind::flag).number != 0.0; }
  std::int64_t integer(const char* name) const { return get(name, Kind::step).step; }
  // A flag that may be absent (then false).
  bool optional_flag(const char* name) const { return lookup(name) != nullptr && flag(name); }

  // Whether the option `name` is on: the hyperparameter is given and true or nonzero.
  bool option_on(const char* name) const {
    const Entry* e = lookup(name);
    if (e == nullptr) return false;
    e->read = true;
    return e->number != 0.0;
  }
  // "name=value", as the caller wrote it.
  std::string option_str(const char* name) const {
    const Entry* e = lookup(name);
    return std::string(name) + "=" + (e != nullptr ? str_of(e->value) : "None");
  }

  void check_all_read() const {
    for (std::size_t i = 0; i < count_; ++i) {
      if (!entries_[i].read) {
        throw py::type_error(std::string("unexpected hyperparameter ") + entries_[i].rule->name);
      }
    }
  }

 private:
  struct Entry {
    const Rule* rule;
    PyObject* value;  // borrowed: the caller's reference outlives the call
    double number;    // a real, a step, or a flag as 0/1
    std::int64_t step;
    mutable bool read;
  };

  const Entry* lookup(const char* name) const { return by_rule_[rule_index(name)]; }

  const Entry& get(const char* name, Kind kind) const {
    const Entry* e = lookup(name);
    if (e == nullptr) throw py::type_error(std::string("missing hyperparameter ") + name);
    if (e->rule->kind != kind) throw py::type_error(std::string("wrong kind of ") + name);
    e->read = true;
    return *e;
  }

  std::array<Entry, kRuleCount> entries_{};
  std::array<const Entry*, kRuleCount> by_rule_{};  // kRules' order; nullptr if not given
  std::size_t count_;
};

// Validates every argument of a call before anything is written. An argument is one array (then
// all are) or a list/tuple of arrays, one per tensor (then all are, of the same length); an
// absent optional argument is None. `hyper` says which options are on (nullptr: none).
template <std::size_t N>
Checked check_arguments(const std::array<Role, N>& roles, PyObject* const* args,
                        std::size_t nargs, const Hyper* hyper) {
  if (nargs != N) {
    throw py::type_error("expected " + std::to_string(N) + " array arguments, got " +
                         std::to_string(nargs));
  }
  const py::handle param = args[0];
  const bool single = py::isinstance<py::array>(param);
  if (!single && !is_list(param)) {
    throw py::type_error(std::string(roles[0].name) +
                         ": expected a numpy.ndarray or a list of them, got " + type_name(param));
  }
  const std::size_t count = single ? 1 : py::len(param);
  auto item = [&](py::handle obj, std::size_t i) -> py::handle {
    return single ? obj : py::handle(PySequence_Fast_GET_ITEM(obj.ptr(), i));
  };
  auto label = [&](std::size_t r, std::size_t i) {
    return Label{roles[r].name, single ? -1 : static_cast<py::ssize_t>(i)};
  };

  // The call's dtype is param's (or the first param's); it must be float32 or float64.
  py::dtype dtype = py::dtype::of<float>();
  bool is_double = false;
  if (count > 0) {
    const py::handle first = item(param, 0);
    if (!py::isinstance<py::array>(first)) {
      throw py::type_error(label(0, 0).str() + ": expected a numpy.ndarray, got " +
                           type_name(first));
    }
    const py::dtype first_dtype = py::reinterpret_borrow<py::array>(first).dtype();
    is_double = same_dtype(first_dtype, py::dtype::of<double>());
    if (!is_double && !same_dtype(first_dtype, dtype)) {
      throw py::type_error(label(0, 0).str() + ": expected dtype float32 or float64, got " +
                           dtype_name(first_dtype));
    }
    if (is_double) dtype = py::dtype::of<double>();
  }

  std::array<bool, N> present{};
  for (std::size_t r = 0; r < N; ++r) {
    const py::handle arg = args[r];
    const std::string name = roles[r].name;
    present[r] = !arg.is_none();
    if (roles[r].used_when != nullptr) {
      const bool used = hyper != nullptr && hyper->option_on(roles[r].used_when);
      if (used && !present[r]) {
        throw py::value_error(hyper->option_str(roles[r].used_when) + " needs the " + name +
                              " buffer, got None");
      }
      present[r] = present[r] && used;
    }
    if (!present[r]) {
      if (roles[r].optional) continue;
      throw py::type_error(name + ": expected " +
                           (single ? "a numpy.ndarray" : "a list of numpy.ndarray") +
                           ", got None");
    }
    if (single && !py::isinstance<py::array>(arg)) {
      throw py::type_error(name + ": expected a numpy.ndarray like param, got " + type_name(arg));
    }
    if (!single) {
      if (!is_list(arg)) {
        throw py::type_error(name + ": expected a list of arrays like param, got " +
                             type_name(arg));
      }
      if (py::len(arg) != count) {
        throw py::value_error(name + ": expected " + std::to_string(count) +
                              " arrays like param, got " + std::to_string(py::len(arg)));
      }
    }
  }

  Checked checked;
  checked.is_double = is_double;
  checked.roles = N;
  checked.data.assign(count * N, nullptr);
  checked.sizes.resize(count);
  std::vector<Extent> extents;
  extents.reserve(count * N);
  const std::string dtype_owner = label(0, 0).str();
  for (std::size_t i = 0; i < count; ++i) {
    check_array(label(0, i), item(param, i), nullptr, dtype, dtype_owner, roles[0].written);
    const auto p = py::reinterpret_borrow<py::array>(item(param, i));
    checked.sizes[i] = static_cast<Index>(p.size());
    for (std::size_t r = 0; r < N; ++r) {
      if (!present[r]) continue;
      const py::handle obj = item(args[r], i);
      if (r > 0) check_array(label(r, i), obj, &p, dtype, "param", roles[r].written);
      const auto arr = py::reinterpret_borrow<py::array>(obj);
      // Read-only arrays (a grad) are only read; the kernels take them as const.
      void* data = const_cast<void*>(arr.data());
      checked.data[i * N + r] = data;
      if (arr.nbytes() > 0) {
        const char* begin = static_cast<const char*>(data);
        extents.push_back({begin, begin + arr.nbytes(), i * N + r, roles[r].written});
      }
    }
  }
  if (const auto overlap = find_overlap(extents)) {
    const auto [first, second] = *overlap;
    throw py::value_error(label(first % N, first / N).str() + " and " +
                          label(second % N, second / N).str() +
                          " share memory; an array that is updated in place must not overlap "
                          "any other argument");
  }
  return checked;
}

template <typename T, std::size_t N>
std::vector<fusedopt::Tensor<T, N>> tensors_of(const Checked& checked) {
  std::vector<fusedopt::Tensor<T, N>> tensors(checked.sizes.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    for (std::size_t r = 0; r < N; ++r) {
      tensors[i].data[r] = static_cast<T*>(checked.data[i * N + r]);
    }
    tensors[i].size = checked.sizes[i];
  }
  return tensors;
}

Index total_size(const Checked& checked) {
  Index total = 0;
  for (const Index size : checked.sizes) total += size;
  return total;
}

// Runs Kernel over the checked arrays and returns true, or, with skip_if_nonfinite, returns
// false without writing anything when any grad (role 1) holds a NaN or an infinity.
template <template <typename> class Kernel, typename T, std::size_t N>
bool launch(const Checked& checked, const Hyper& hyper) {
  const bool skip_if_nonfinite = hyper.optional_flag("skip_if_nonfinite");
  const Kernel<T> kernel(hyper);
  hyper.check_all_read();
  const auto tensors = tensors_of<T, N>(checked);
  const int threads = threads_for_call(total_size(checked));
  const ReleaseGilIfWorthIt release(total_size(checked));
  if (skip_if_nonfinite &&
      fusedopt::any_chunk(tensors, threads, [](Index n, const std::array<T*, N>& chunk) {
        return fusedopt::has_nonfinite(n, chunk[1]);
      })) {
    return false;
  }
  fusedopt::for_each_chunk(tensors, threads, kernel);
  return true;
}

// Runs fn() and returns its result; a C++ exception becomes the Python exception it stands for
// and nullptr, as CPython expects of a function that raised.
template <typename Fn>
PyObject* python_call(const Fn& fn) noexcept {
  try {
    return fn();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "unknown C++ exception");
  }
  return nullptr;
}

// fn(arrays..., /, **hyperparameters) -> bool. A vectorcall function of CPython's, not a
// pybind11 one: the arguments arrive as a C array with no tuple or dict built, which is most of
// the cost of a call on a small tensor.
template <template <typename> class Kernel>
PyObject* optimizer_call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargsf,
                         PyObject* kwnames) {
  return python_call([&] {
    const auto nargs =
        static_cast<std::size_t>(PyVectorcall_NARGS(static_cast<std::size_t>(nargsf)));
    const auto nkw =
        kwnames == nullptr ? std::size_t{0} : static_cast<std::size_t>(PyTuple_GET_SIZE(kwnames));
    const Hyper hyper(nkw, nkw == 0 ? nullptr : PySequence_Fast_ITEMS(kwnames), args + nargs);
    constexpr auto& roles = Kernel<float>::roles;
    const Checked checked = check_arguments(roles, args, nargs, &hyper);
    const bool applied = checked.is_double ? launch<Kernel, double, roles.size()>(checked, hyper)
                                           : launch<Kernel, float, roles.size()>(checked, hyper);
    return py::bool_(applied).release().ptr();
  });
}

template <template <typename> class Kernel>
void def_optimizer(py::module_& m, const char* name) {
  // CPython keeps a pointer to the definition for as long as the function lives: never freed.
  auto* def = new PyMethodDef{name,
                              reinterpret_cast<PyCFunction>(
                                  reinterpret_cast<void (*)()>(&optimizer_call<Kernel>)),
                              METH_FASTCALL | METH_KEYWORDS, nullptr};
  auto function = py::reinterpret_steal<py::object>(PyCFunction_NewEx(def, nullptr, m.attr("__name__").ptr()));
  if (!function) throw py::error_already_set();
  m.add_object(name, function);
}

// Validates hyperparameters as the optimizer functions do, for the optimizer classes, which
// check theirs when they are constructed.
void check_hyperparameters(const py::kwargs& kwargs) {
  std::vector<PyObject*> keywords, values;
  for (const auto& [key, value] : kwargs) {
    keywords.push_back(key.ptr());
    values.push_back(value.ptr());
  }
  Hyper(keywords.size(), keywords.data(), values.data());
}

template <typename T>
bool all_finite(const Checked& checked) {
  const auto tensors = tensors_of<T, 1>(checked);
  const int threads = threads_for_call(total_size(checked));
  const ReleaseGilIfWorthIt release(total_size(checked));
  return !fusedopt::any_chunk(tensors, threads, [](Index n, const std::array<T*, 1>& chunk) {
    return fusedopt::has_nonfinite(n, chunk[0]);
  });
}

// Sum of squares of all elements, in double: per-chunk sums (fixed boundaries, fixed order
// within) added in chunk order, so bit-identical for any thread count.
template <typename T>
double sum_squares(const Checked& checked) {
  const auto tensors = tensors_of<T, 1>(checked);
  const int threads = threads_for_call(total_size(checked));
  const ReleaseGilIfWorthIt release(total_size(checked));
  std::vector<double> partial(static_cast<std::size_t>(fusedopt::chunk_count(tensors)));
  fusedopt::for_each_chunk_indexed(
      tensors, threads, [&](Index index, Index n, const std::array<T*, 1>& chunk) {
        partial[static_cast<std::size_t>(index)] = fusedopt::sum_squares(n, chunk[0]);
      });
  double total = 0;
  for (const double p : partial) total += p;
  return total;
}

// For tests of the 64-bit arithmetic: where each of `team` threads would start and stop on
// tensors of these sizes, without allocating them.
std::vector<std::pair<Index, Index>> thread_ranges(const std::vector<Index>& sizes, Index team) {
  std::vector<Index> starts(sizes.size() + 1, 0);
  for (std::size_t t = 0; t < sizes.size(); ++t) starts[t + 1] = starts[t] + sizes[t];
  std::vector<std::pair<Index, Index>> ranges;
  for (Index me = 0; me < team; ++me) {
    ranges.emplace_back(fusedopt::detail::thread_begin(starts, me, team),
                        fusedopt::detail::thread_begin(starts, me + 1, team));
  }
  return ranges;
}

}  // namespace

// What this CPU can run, by level name; only meaningful in the baseline module, which runs
// everywhere. __builtin_cpu_supports also checks that the OS saves the wide registers.
py::dict cpu_supports() {
  py::dict levels;
  levels["baseline"] = true;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2");
  levels["avx2"] = avx2;
  levels["avx512"] = avx2 && __builtin_cpu_supports("avx512f") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512dq");
#endif
  return levels;
}

std::string compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return "unknown";
#endif
}

PYBIND11_MODULE(FUSEDOPT_MODULE, m) {
  m.doc() = "fusedopt's compiled kernels; use the functions of the fusedopt package instead.";
  def_optimizer<fusedopt::Sgd>(m, "sgd");
  def_optimizer<fusedopt::Momentum>(m, "momentum");
  def_optimizer<fusedopt::Adam>(m, "adam");
  def_optimizer<fusedopt::Adagrad>(m, "adagrad");
  def_optimizer<fusedopt::Rmsprop>(m, "rmsprop");
  def_optimizer<fusedopt::Lion>(m, "lion");
  def_optimizer<fusedopt::Roofline>(m, "roofline");  // for bench/: traffic without arithmetic

  m.def("all_finite", [](const py::args& args) {
    static constexpr std::array<Role, 1> roles{{{"arrays", false, false}}};
    const Checked checked = check_arguments(roles, PySequence_Fast_ITEMS(args.ptr()), args.size(), nullptr);
    return checked.is_double ? all_finite<double>(checked) : all_finite<float>(checked);
  });
  m.def("sum_squares", [](const py::args& args) {
    static constexpr std::array<Role, 1> roles{{{"arrays", false, false}}};
    const Checked checked = check_arguments(roles, PySequence_Fast_ITEMS(args.ptr()), args.size(), nullptr);
    return checked.is_double ? sum_squares<double>(checked) : sum_squares<float>(checked);
  });
  def_optimizer<fusedopt::Scale>(m, "scale");
  m.def("check_hyperparameters", &check_hyperparameters);
  py::tuple hyperparameter_names(kRuleCount);
  for (std::size_t i = 0; i < kRuleCount; ++i) hyperparameter_names[i] = kRules[i].name;
  m.attr("HYPERPARAMETERS") = hyperparameter_names;
  m.def("_thread_ranges", &thread_ranges);
  pthread_atfork(nullptr, nullptr, after_fork_in_child);

  m.def("get_num_threads", &threads_for_kernels);
  m.def("set_num_threads", [](int threads) { num_threads.store(threads); });
  m.attr("CHUNK") = fusedopt::kChunk;
  m.def("get_parallel_min", [] { return parallel_min.load(); });
  m.def("set_parallel_min", [](Index n) { parallel_min.store(n); });
  m.attr("__version__") = FUSEDOPT_VERSION;
  m.attr("SIMD_LEVEL") = FUSEDOPT_SIMD_LEVEL;
  m.attr("SIMD_INSTRUCTIONS") = Eigen::SimdInstructionSetsInUse();
  m.attr("EIGEN_VERSION") = std::to_string(EIGEN_WORLD_VERSION) + "." +
                            std::to_string(EIGEN_MAJOR_VERSION) + "." +
                            std::to_string(EIGEN_MINOR_VERSION);
  m.attr("COMPILER") = compiler();
#ifdef _OPENMP
  m.attr("OPENMP") = _OPENMP;
#else
  m.attr("OPENMP") = py::none();
#endif
  m.def("cpu_supports", &cpu_supports);
}
