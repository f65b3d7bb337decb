// The Python binding, compiled once: generic machinery driven by the kernels' declarations. For
// each call it parses and validates the hyperparameters and arrays, takes their pointers, splits
// the work across threads (releasing the GIL for large calls) and calls the kernel of the SIMD
// level loaded at import through the level's table of function pointers. Nothing here is
// specific to one optimizer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if !defined(_WIN32)
#include <pthread.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#include "kernels/quantize.hpp"
#include "kernels/table.hpp"
#include "parallel.hpp"

namespace py = pybind11;
using fusedopt::ArrayDecl;
using fusedopt::DType;
using fusedopt::Hyperparameter;
using fusedopt::Index;
using fusedopt::Kind;
using fusedopt::TensorSet;
using fusedopt::Value;

namespace {

// ------------------------------------------------------------------ threads, fork, GIL

// Threads for the kernels, shared by every Python thread (omp_set_num_threads would only set the
// calling thread's count). 0 means OpenMP's default, which honours OMP_NUM_THREADS.
std::atomic<int> num_threads{0};

// Calls of fewer elements run on the calling thread: below it, opening a parallel region costs
// more than it saves. `python bench/run.py --threshold [--gap 0.002]` measures the crossover;
// settable for that measurement.
std::atomic<Index> parallel_min{Index{1} << 14};

// After a fork, a child of a parent that opened a parallel region runs the kernels on its
// calling thread (parallel.hpp: libgomp would wait for the parent's threads forever).
using fusedopt::parallel::opened_region;
using fusedopt::parallel::serial_after_fork;

int threads_for_kernels() {
#ifdef _OPENMP
  if (serial_after_fork.load(std::memory_order_relaxed)) return 1;
  const int n = num_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
#else
  return 1;
#endif
}

// Cores that other threads hold. NumPy's OpenBLAS leaves its worker threads spinning after each
// matrix product for 2^28 timestamp-counter ticks, about 0.1 s, unless OPENBLAS_THREAD_TIMEOUT
// says less. A parallel region opened then waits for the scheduler to give its worker a core: a
// time slice, milliseconds, for a step of a model's worth of microseconds
// (bench/blas_threads.py). An idle worker can be as slow to wake on a VM. A region (the
// element-wise kernels', or the matrix code's, which the level library reports) whose last
// thread starts later than late_start_ns after it opened marks the cores busy. While they are,
// a call of the element-wise kernels or Adafactor runs on the calling thread where a lost time
// slice costs more than the other cores save: where one thread's time, times (p - 1) / p for p
// threads, is less than that of busy_parallel_min elements (about what one thread updates in a
// time slice: `bench/blas_threads.py --sizes`). Muon keeps its threads: its cost is not in
// proportion to its elements. Results do not depend on the threads, so this changes only the
// time. Settable for tests.
std::atomic<std::int64_t> late_start_ns{1'000'000};
std::atomic<std::int64_t> busy_base_ns{10'000'000};
constexpr int busy_doublings = 8;
std::atomic<Index> busy_parallel_min{Index{1} << 22};
std::atomic<std::int64_t> busy_until_ns{0};
std::atomic<int> late_probes_in_a_row{0};

using fusedopt::parallel::now_ns;

std::int64_t busy_for_ns() {
  return std::max<std::int64_t>(busy_until_ns.load(std::memory_order_relaxed) - now_ns(), 0);
}
bool cores_busy() { return busy_for_ns() > 0; }

// A probe is a region opened while the cores are not marked busy. A late one marks them busy
// for busy_base_ns, doubled for each probe before it that was late too (up to busy_doublings
// times); a probe in time ends the doubling. A late region while they are marked (a larger call,
// a call's second region, Muon's) starts that time again, not doubled; one in time tells
// nothing then: a worker that has just had its time slice holds its core a while.
void note_region_start(std::int64_t latest_start_delay_ns) {
  // a level library's region (Muon's) made libgomp's threads as the binding's do: a child forked
  // after it runs the kernels on its calling thread too
  opened_region.store(true, std::memory_order_relaxed);
  const bool probe = !cores_busy();
  if (latest_start_delay_ns <= late_start_ns.load(std::memory_order_relaxed)) {
    if (probe) late_probes_in_a_row.store(0, std::memory_order_relaxed);
    return;
  }
  const int doublings = probe ? late_probes_in_a_row.fetch_add(1, std::memory_order_relaxed)
                              : late_probes_in_a_row.load(std::memory_order_relaxed) - 1;
  const std::int64_t until = now_ns() + (busy_base_ns.load(std::memory_order_relaxed)
                                         << std::clamp(doublings, 0, busy_doublings));
  std::int64_t marked = busy_until_ns.load(std::memory_order_relaxed);
  while (until > marked &&
         !busy_until_ns.compare_exchange_weak(marked, until, std::memory_order_relaxed)) {
  }
}

// Threads for a call of `total` elements: one below the parallel threshold, and while the
// cores are busy, below busy_parallel_min p / (p - 1).
int threads_for_call(Index total) {
  if (total < parallel_min.load(std::memory_order_relaxed)) return 1;
  const int threads = threads_for_kernels();
  const Index busy_min = busy_parallel_min.load(std::memory_order_relaxed);
  if (threads > 1 && total / threads * (threads - 1) < busy_min && cores_busy()) return 1;
  if (threads > 1) opened_region.store(true, std::memory_order_relaxed);
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

// Runs body(begin, end) on each of `threads` OpenMP threads, in one parallel region, for its
// share of the chunks; threads <= 1 runs everything on the caller.
template <typename Body>
void split_across_threads(const TensorSet& set, int threads, const Body& body) {
#ifdef _OPENMP
  if (threads > 1) {
    fusedopt::parallel::RegionStart start;
#pragma omp parallel num_threads(threads)
    {
      start.thread_started();
      const Index team = omp_get_num_threads();
      const Index me = omp_get_thread_num();
      body(fusedopt::thread_begin(set, me, team), fusedopt::thread_begin(set, me + 1, team));
    }
    note_region_start(start.latest_delay_ns());
    return;
  }
#else
  (void)threads;
#endif
  body(Index{0}, set.total());
}

// ------------------------------------------------------------------ the kernels of one level

std::atomic<const fusedopt::KernelTable*> kernels{nullptr};

// Takes the kernels of a level: `address` is that library's fusedopt_kernel_table function,
// which fusedopt/_dispatch.py finds with ctypes. A library built from other declarations than
// this binding (a stale file left by an older install) would mix up the values: refused.
void use_kernels(std::uintptr_t address) {
  const auto get = reinterpret_cast<const fusedopt::KernelTable* (*)()>(address);
  const fusedopt::KernelTable* table = get();
  if (table->version != fusedopt::kTableVersion || table->fingerprint != fusedopt::kFingerprint) {
    throw py::import_error(std::string("fusedopt: the kernel library of level ") + table->level +
                           " was built from other sources than the binding: reinstall fusedopt");
  }
  table->observe_regions(&note_region_start);  // the matrix code's regions: Muon's, Adafactor's
  kernels.store(table);
}

const fusedopt::KernelTable& table() {
  const fusedopt::KernelTable* loaded = kernels.load(std::memory_order_acquire);
  if (loaded == nullptr) throw std::runtime_error("fusedopt: no kernels loaded");
  return *loaded;
}

// ------------------------------------------------------------------ messages

// type(obj).__name__, as Python's own messages say it.
std::string type_name(py::handle obj) {
  return py::type::handle_of(obj).attr("__name__").cast<std::string>();
}

std::string str_of(PyObject* value) { return py::str(value).cast<std::string>(); }

std::string shape_str(py::ssize_t ndim, const py::ssize_t* shape) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < ndim; ++d) {
    s += std::to_string(shape[d]);
    if (ndim == 1 || d + 1 < ndim) s += d + 1 < ndim ? ", " : ",";
  }
  return s + ")";
}

std::string shape_str(const py::array& a) { return shape_str(a.ndim(), a.shape()); }

std::string dtype_name(const py::dtype& dtype) { return py::str(dtype).cast<std::string>(); }

// Names one array of a call in messages: "grad", or "grad[3]" in a list call. Built into a
// string only when a message needs it, so a valid call allocates no strings.
struct Label {
  const char* role;
  py::ssize_t index;      // -1 in a single-array call
  const char* part = "";  // ".codes" or ".scales" of a quantized state

  std::string str() const {
    return (index < 0 ? role : std::string(role) + "[" + std::to_string(index) + "]") + part;
  }
};

// ------------------------------------------------------------------ declarations at run time

// One kernel's declaration, as the binding uses it: the arrays and hyperparameters with their
// keywords interned, the kernel's row in the table, and its cross-hyperparameter rule.
struct Descriptor {
  std::string function;  // the public name, for messages: "adam_"
  const ArrayDecl* arrays;
  std::size_t array_count;
  const Hyperparameter* hyper;
  std::size_t hyper_count;
  std::size_t kernel;
  const char* (*invalid)(const Value*);
  bool has_grad;           // role 1 is a grad: skip_if_nonfinite and stochastic rounding apply
  std::size_t step_index;  // of the "step" hyperparameter, or kNone
  std::vector<PyObject*> array_keywords;  // interned
  std::vector<PyObject*> hyper_keywords;
  std::vector<std::size_t> option_of;  // per array: index of its used_when hyperparameter
  std::size_t sums;  // doubles per chunk of a two-pass kernel's first pass (kSums); 0 for others
};

constexpr std::size_t kMaxArrays = 8;
constexpr std::size_t kMaxHyper = 16;
constexpr std::size_t kNone = static_cast<std::size_t>(-1);

PyObject* intern(const char* name) {
  return name == nullptr ? nullptr : PyUnicode_InternFromString(name);
}

template <typename Decl>
const char* invalid_values(const Value* values) {
  return Decl::invalid(fusedopt::Values<Decl>(values));
}

template <typename Decl>
Descriptor describe(std::size_t kernel, const char* suffix) {
  static_assert(Decl::arrays.size() <= kMaxArrays && Decl::hyperparameters.size() <= kMaxHyper);
  static_assert(fusedopt::well_formed<Decl>(), "a declaration is malformed: see well_formed");
  Descriptor d{std::string(Decl::name) + suffix,
               Decl::arrays.data(),
               Decl::arrays.size(),
               Decl::hyperparameters.data(),
               Decl::hyperparameters.size(),
               kernel,
               &invalid_values<Decl>,
               fusedopt::has_grad<Decl>(),
               kNone,
               {},
               {},
               {},
               fusedopt::kSums<Decl>};
  for (const ArrayDecl& a : Decl::arrays) d.array_keywords.push_back(intern(a.name));
  for (const Hyperparameter& h : Decl::hyperparameters) {
    if (h.kind == Kind::step) d.step_index = d.hyper_keywords.size();
    d.hyper_keywords.push_back(intern(h.name));
  }
  for (const ArrayDecl& a : Decl::arrays) {
    std::size_t option = kNone;
    for (std::size_t i = 0; a.used_when != nullptr && i < d.hyper_count; ++i) {
      if (std::strcmp(d.hyper[i].name, a.used_when) == 0) option = i;
    }
    d.option_of.push_back(option);
  }
  return d;
}

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::real: return "real";
    case Kind::step: return "step";
    case Kind::flag: return "flag";
    case Kind::fixed: return "fixed";
  }
  return "";
}

// The declaration as plain Python data, for fusedopt's Python layer to derive from.
py::dict declaration_data(const char* name, const char* summary, const Descriptor& d) {
  py::list arrays, hyper;
  for (std::size_t i = 0; i < d.array_count; ++i) {
    const ArrayDecl& a = d.arrays[i];
    py::dict entry;
    entry["name"] = a.name;
    entry["written"] = a.written;
    entry["help"] = a.help;
    entry["optional"] = a.optional;
    entry["used_when"] = a.used_when == nullptr ? py::object(py::none()) : py::str(a.used_when);
    entry["old_name"] = a.old_name == nullptr ? py::object(py::none()) : py::str(a.old_name);
    entry["nonnegative"] = a.nonnegative;
    arrays.append(entry);
  }
  for (std::size_t i = 0; i < d.hyper_count; ++i) {
    const Hyperparameter& h = d.hyper[i];
    py::dict entry;
    entry["name"] = h.name;
    entry["kind"] = kind_name(h.kind);
    entry["required"] = h.required;
    entry["may_be_none"] = h.may_be_none;
    if (h.required || h.may_be_none) {
      entry["default"] = py::none();
    } else if (h.kind == Kind::flag) {
      entry["default"] = py::bool_(h.default_value != 0.0);
    } else {
      entry["default"] = h.default_value;
    }
    entry["low"] = h.range.low;
    entry["high"] = h.range.high;
    entry["low_open"] = h.range.low_open;
    entry["high_open"] = h.range.high_open;
    entry["label"] = h.label;
    entry["help"] = h.help;
    hyper.append(entry);
  }
  py::dict data;
  data["name"] = name;
  data["summary"] = summary;
  data["arrays"] = py::tuple(arrays);
  data["hyperparameters"] = py::tuple(hyper);
  data["passes"] = d.sums > 0 ? 2 : 1;
  return data;
}

// ------------------------------------------------------------------ hyperparameters

// int, float and NumPy's integer and floating scalars; not bool, str or anything else that
// float() would take.
bool is_real_number(PyObject* value) {
  if (PyBool_Check(value)) return false;
  if (PyFloat_Check(value) || PyLong_Check(value)) return true;
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::tuple> numpy_types;
  const py::tuple& types =
      numpy_types
          .call_once_and_store_result([] {
            const auto numpy = py::module_::import("numpy");
            return py::make_tuple(numpy.attr("integer"), numpy.attr("floating"));
          })
          .get_stored();
  const int is_numpy = PyObject_IsInstance(value, types.ptr());
  if (is_numpy < 0) throw py::error_already_set();
  return is_numpy == 1;
}

double parse_real(const Hyperparameter& h, PyObject* value) {
  double v;
  if (PyFloat_CheckExact(value)) {  // the common case first: it runs several times per call
    v = PyFloat_AS_DOUBLE(value);
  } else {
    if (!is_real_number(value)) {
      throw py::type_error(std::string(h.label) + " must be a real number" +
                           (h.may_be_none ? " or None" : "") + ", got " + type_name(value));
    }
    v = PyFloat_AsDouble(value);
    if (v == -1.0 && PyErr_Occurred()) {
      if (!PyErr_ExceptionMatches(PyExc_OverflowError)) throw py::error_already_set();
      PyErr_Clear();  // an integer past double's range: infinite, which the range decides
      const int negative = PyObject_RichCompareBool(value, py::int_(0).ptr(), Py_LT);
      if (negative < 0) throw py::error_already_set();
      v = negative ? -HUGE_VAL : HUGE_VAL;
    }
  }
  const auto& r = h.range;
  const bool above = r.low_open ? r.low < v : r.low <= v;
  const bool below = r.high_open ? v < r.high : v <= r.high;
  if (!(above && below)) {  // also rejects NaN
    throw py::value_error(std::string("Invalid ") + h.label + ": " + str_of(value));
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

// Why a kernel without a step needs a seed where it draws random bits (fusedopt.reference says
// the same).
constexpr const char* kSeedNeeded =
    "seed is required: with no step argument, the random bits of stochastic rounding and of int8 "
    "state are a function of the seed alone, so pass a new one each call (e.g. the step count; "
    "the fusedopt.optim classes do)";

// The seed of stochastic rounding: an integer in [0, 2**64).
std::uint64_t parse_seed(PyObject* value) {
  if (PyBool_Check(value)) throw py::type_error("seed must be an integer, got bool");
  const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(value));
  if (!index) {
    PyErr_Clear();
    throw py::type_error("seed must be an integer, got " + type_name(value));
  }
  const unsigned long long seed = PyLong_AsUnsignedLongLong(index.ptr());
  if (seed == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error("Invalid seed: " + str_of(index.ptr()) + " (an integer in [0, 2**64))");
  }
  return seed;
}

// That an int8 state's scales are what the encoder writes, powers of two in [2**-126, 2**127]:
// a NaN, infinite, zero or negative scale would decode to NaN or to values the format cannot
// hold, and the step would write them with no error. One pass over n / kBlock floats.
void check_scale_values(const Label& label, const float* scales, Index blocks) {
  const auto invalid = [&](Index b) {  // sign or mantissa bits, or exponent field 0 or 255
    std::uint32_t bits;
    std::memcpy(&bits, scales + b, sizeof bits);
    return (bits & 0x807FFFFFU) | static_cast<std::uint32_t>((bits >> 23) - 1U >= 254U);
  };
  std::uint32_t any = 0;
  for (Index b = 0; b < blocks; ++b) any |= invalid(b);  // branch-free: vectorizes
  if (any == 0) return;
  Index b = 0;
  while (invalid(b) == 0) ++b;
  throw py::value_error(label.str() +
                        ": scales must be powers of two in [2**-126, 2**127], as the "
                        "encoder writes them; got " +
                        str_of(py::float_(scales[b]).ptr()) + " at " + std::to_string(b));
}

// A flag: a bool or NumPy's bool, never another object's truth (the string "False" is true).
bool parse_flag(const std::string& name, PyObject* value) {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> type;
  if (!PyBool_Check(value)) {
    const py::object& numpy_bool =
        type.call_once_and_store_result([] { return py::module_::import("numpy").attr("bool_"); })
            .get_stored();
    const int is_numpy_bool = PyObject_IsInstance(value, numpy_bool.ptr());
    if (is_numpy_bool < 0) throw py::error_already_set();
    if (is_numpy_bool == 0) throw py::type_error(name + " must be a bool, got " + type_name(value));
  }
  const int truth = PyObject_IsTrue(value);
  if (truth < 0) throw py::error_already_set();
  return truth == 1;
}

// Where a keyword goes: a hyperparameter, an array, or skip_if_nonfinite, which every kernel
// with a grad takes. (A renamed array's old keyword is mapped, with its warning, in Python.)
struct Slot {
  enum { hyper, array, skip, stochastic, seed, master } what;
  std::size_t index;
};

PyObject* skip_keyword() {
  static PyObject* const keyword = intern("skip_if_nonfinite");
  return keyword;
}
PyObject* stochastic_keyword() {
  static PyObject* const keyword = intern("stochastic_rounding");
  return keyword;
}
PyObject* seed_keyword() {
  static PyObject* const keyword = intern("seed");
  return keyword;
}
PyObject* master_keyword() {
  static PyObject* const keyword = intern("master");
  return keyword;
}

std::optional<Slot> find_slot(const Descriptor& d, PyObject* keyword) {
  // Keywords written in Python source are interned: identity first, characters as a fallback.
  for (int by_identity = 1; by_identity >= 0; --by_identity) {
    auto same = [&](PyObject* name) {
      return name != nullptr &&
             (by_identity ? name == keyword : PyUnicode_Compare(name, keyword) == 0);
    };
    for (std::size_t i = 0; i < d.hyper_count; ++i) {
      if (d.hyper[i].kind != Kind::fixed && same(d.hyper_keywords[i])) {
        return Slot{Slot::hyper, i};
      }
    }
    for (std::size_t i = 0; i < d.array_count; ++i) {
      if (same(d.array_keywords[i])) return Slot{Slot::array, i};
    }
    if (d.has_grad && same(skip_keyword())) return Slot{Slot::skip, 0};
    if (d.has_grad && same(stochastic_keyword())) return Slot{Slot::stochastic, 0};
    if (d.has_grad && same(seed_keyword())) return Slot{Slot::seed, 0};
    if (d.has_grad && same(master_keyword())) return Slot{Slot::master, 0};
  }
  if (PyErr_Occurred()) throw py::error_already_set();
  return std::nullopt;
}

// The arguments of one call, sorted into arrays and hyperparameter values, validated.
struct Arguments {
  std::array<PyObject*, kMaxArrays> arrays{};  // nullptr: not given
  std::array<Value, kMaxHyper> values{};
  std::array<PyObject*, kMaxHyper> given{};  // the caller's objects, for messages
  bool skip_if_nonfinite = false;
  bool stochastic_rounding = false;
  std::uint64_t seed = 0;
  bool seed_given = false;     // not None
  PyObject* master = nullptr;  // float32 master weights of a low-precision param, or nullptr

  bool option_on(const Descriptor& d, std::size_t array) const {
    const std::size_t option = d.option_of[array];
    return option != kNone && values[option].number != 0.0;
  }
};

Arguments parse_arguments(const Descriptor& d, PyObject* const* args, std::size_t nargs,
                          PyObject* kwnames) {
  Arguments a;
  if (nargs > d.array_count) {
    throw py::type_error(d.function + "() takes at most " + std::to_string(d.array_count) +
                         " positional arguments (" + std::to_string(nargs) + " given)");
  }
  std::copy(args, args + nargs, a.arrays.begin());
  const std::size_t nkw =
      kwnames == nullptr ? 0 : static_cast<std::size_t>(PyTuple_GET_SIZE(kwnames));
  for (std::size_t k = 0; k < nkw; ++k) {
    PyObject* keyword = PyTuple_GET_ITEM(kwnames, static_cast<Py_ssize_t>(k));
    PyObject* value = args[nargs + k];
    const std::optional<Slot> slot = find_slot(d, keyword);
    if (!slot) {
      throw py::type_error(d.function + "() got an unexpected keyword argument '" +
                           str_of(keyword) + "'");
    }
    if (slot->what == Slot::skip) {
      a.skip_if_nonfinite = parse_flag("skip_if_nonfinite", value);
    } else if (slot->what == Slot::stochastic) {
      a.stochastic_rounding = parse_flag("stochastic_rounding", value);
    } else if (slot->what == Slot::seed) {
      a.seed_given = value != Py_None;
      if (a.seed_given) a.seed = parse_seed(value);
    } else if (slot->what == Slot::master) {
      a.master = value == Py_None ? nullptr : value;
    } else if (slot->what == Slot::array) {
      if (a.arrays[slot->index] != nullptr) {
        throw py::type_error(d.function + "() got multiple values for argument '" +
                             d.arrays[slot->index].name + "'");
      }
      a.arrays[slot->index] = value;
    } else {
      const Hyperparameter& h = d.hyper[slot->index];
      Value& v = a.values[slot->index];
      switch (h.kind) {
        case Kind::real:
          v.number = h.may_be_none && value == Py_None ? h.default_value : parse_real(h, value);
          break;
        case Kind::step: v.count = parse_step(value); break;
        case Kind::flag: v.number = parse_flag(h.name, value) ? 1.0 : 0.0; break;
        case Kind::fixed: break;  // never a keyword: find_slot skips them
      }
      a.given[slot->index] = value;
    }
  }
  for (std::size_t i = 0; i < d.hyper_count; ++i) {
    if (a.given[i] != nullptr) continue;
    const Hyperparameter& h = d.hyper[i];
    if (h.required) {
      throw py::type_error(d.function + "() missing required keyword argument '" + h.name + "'");
    }
    a.values[i].number = h.default_value;
  }
  if (const char* message = d.invalid(a.values.data())) throw py::value_error(message);
  return a;
}

// ------------------------------------------------------------------ arrays

bool is_list(py::handle obj) { return PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr()); }

// Exactly this dtype, byte order included (a byte-swapped float32 is not float32).
bool same_dtype(const py::dtype& a, const py::dtype& b) {
  return py::detail::npy_api::get().PyArray_EquivTypes_(a.ptr(), b.ptr());
}

// bfloat16's NumPy dtype is ml_dtypes', None where ml_dtypes is missing.
constexpr std::size_t kDTypeCount = fusedopt::kFloatCount + 1;

// The NumPy dtype of each DType (int8: that of a quantized state's signed codes).
const std::array<py::object, kDTypeCount>& numpy_dtypes() {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<std::array<py::object, kDTypeCount>>
      dtypes;
  return dtypes
      .call_once_and_store_result([] {
        std::array<py::object, kDTypeCount> d;
        d[static_cast<std::size_t>(DType::int8)] = py::dtype("int8");
        d[static_cast<std::size_t>(DType::float32)] = py::dtype::of<float>();
        d[static_cast<std::size_t>(DType::float64)] = py::dtype::of<double>();
        d[static_cast<std::size_t>(DType::float16)] = py::dtype("float16");
        try {
          d[static_cast<std::size_t>(DType::bfloat16)] =
              py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
        } catch (py::error_already_set&) {  // without ml_dtypes no array is bfloat16
          d[static_cast<std::size_t>(DType::bfloat16)] = py::none();
        }
        return d;
      })
      .get_stored();
}

py::dtype numpy_dtype(DType dtype) {
  return py::reinterpret_borrow<py::dtype>(numpy_dtypes()[static_cast<std::size_t>(dtype)]);
}

const char* dtype_text(DType dtype) {
  switch (dtype) {
    case DType::float32: return "float32";
    case DType::float64: return "float64";
    case DType::bfloat16: return "bfloat16";
    case DType::float16: return "float16";
    case DType::int8: return "int8";
  }
  return "";
}

std::optional<DType> dtype_of(const py::dtype& dtype) {
  const auto& dtypes = numpy_dtypes();
  for (std::size_t d = 0; d < dtypes.size(); ++d) {
    if (!dtypes[d].is_none() && same_dtype(dtype, py::reinterpret_borrow<py::dtype>(dtypes[d]))) {
      return static_cast<DType>(d);
    }
  }
  return std::nullopt;
}

// The dtypes the rows allow for `part` with a `param` param (every param dtype of any row where
// `param` is nothing), in the rows' order.
std::vector<DType> allowed_dtypes(fusedopt::Part part, std::optional<DType> param) {
  std::vector<DType> allowed;
  for (const fusedopt::StorageRow& row : fusedopt::kStorageRows) {
    if (param && row.param != *param) continue;
    const DType d = row.of(part);
    if (std::find(allowed.begin(), allowed.end(), d) == allowed.end()) allowed.push_back(d);
  }
  return allowed;
}

// "float32 or bfloat16".
std::string dtypes_text(const std::vector<DType>& dtypes) {
  std::string text;
  for (std::size_t i = 0; i < dtypes.size(); ++i) {
    text += (i == 0 ? "" : i + 1 == dtypes.size() ? " or " : ", ");
    text += dtype_text(dtypes[i]);
    if (dtypes[i] == DType::int8) text += " (a fusedopt.quantize.QuantizedState)";
  }
  return text;
}

// fusedopt.quantize.QuantizedState: an int8 state's codes and scales.
bool is_quantized(py::handle obj) {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> type;
  const py::object& quantized =
      type.call_once_and_store_result(
              [] { return py::module_::import("fusedopt.quantize").attr("QuantizedState"); })
          .get_stored();
  const int is = PyObject_IsInstance(obj.ptr(), quantized.ptr());
  if (is < 0) throw py::error_already_set();
  return is == 1;
}

// The checked arrays of one call: a pointer per (tensor, role), nullptr where an optional role
// is absent, each tensor's first element in the concatenation of all, and their storage. With
// masters, role 0 is the float32 master and the param follows the declared roles.
struct Checked {
  std::size_t storage = 0;  // the call's row of fusedopt::kStorageRows
  DType grad_dtype = DType::float32;
  DType param_copy = DType::float32;  // the param's dtype where role 0 holds its masters
  std::uint32_t unsigned_codes = 0;   // bit r: role r's int8 state has uint8 codes
  std::size_t roles = 0;
  std::vector<py::object> held;  // the call's own references: its lists as tuples, int8 arrays
  std::vector<void*> data;       // tensor t, role r at t * roles + r
  std::vector<void*> scales;     // likewise, the scales of int8 states (else nullptr)
  std::vector<Index> starts;     // tensors + 1 entries

  TensorSet set() const { return {data.data(), starts.data(), starts.size() - 1, roles}; }
};

// The bytes of one array of a call; `slot` is tensor * roles + role, for the message.
struct Extent {
  const char* begin;
  const char* end;
  std::size_t slot;
  bool written;
  const char* part = "";  // of a quantized state: ".codes" or ".scales"
};

// No array that is written may share a byte with any other array of the call: the kernel reads
// and writes chunk by chunk, so aliasing would silently give wrong results. Returns an
// overlapping pair, or nothing. Extents stay small so that sorting a long list is cheap.
std::optional<std::pair<Extent, Extent>> find_overlap(std::vector<Extent>& extents) {
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
    if (hit != nullptr) return std::make_pair(*hit, e);
    if (furthest == nullptr || e.end > furthest->end) furthest = &e;
    if (e.written && (furthest_written == nullptr || e.end > furthest_written->end)) {
      furthest_written = &e;
    }
  }
  return std::nullopt;
}

// What the checks read of one argument of a call: a NumPy array's dtype, shape and flags, or
// those of a tensor's borrowed memory.
struct ArrayFacts {
  py::dtype dtype;
  py::ssize_t ndim;
  const py::ssize_t* shape;
  bool c_order;
  bool f_order;
  bool writeable;
  bool aligned = true;
};

bool is_aligned(const py::array& arr) {
  return (arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0;
}

ArrayFacts facts_of(const py::array& arr) {
  return {arr.dtype(),
          arr.ndim(),
          arr.shape(),
          (arr.flags() & py::array::c_style) != 0,
          (arr.flags() & py::array::f_style) != 0,
          arr.writeable(),
          is_aligned(arr)};
}

// A view at an address that is not a multiple of its element size (np.frombuffer at an odd
// offset): the kernels' typed loads and stores would be undefined behaviour in C++.
std::string misaligned(const Label& label) {
  return label.str() +
         ": expected an array aligned to its element size, got a misaligned view (it cannot be "
         "used in place without a copy)";
}

// Checks one array against its tensor's param (`ref`, or nullptr when it is the param) and the
// call's dtype, so that nothing is ever converted or copied: a copy would be updated instead of
// the caller's array. `dtype_owner` names the array the call's dtype comes from.
template <typename Expected>
void check_facts(const Label& label, const ArrayFacts& arr, const py::array* ref,
                 const py::dtype& dtype, const Expected& expected, bool written) {
  if (!same_dtype(arr.dtype, dtype)) {
    throw py::type_error(label.str() + ": expected dtype " + expected() + ", got " +
                         dtype_name(arr.dtype) +
                         (label.index > 0 ? " (one call takes one dtype)" : ""));
  }
  if (!arr.c_order && !arr.f_order) {
    // a copy of an array that is only read would be a hidden one; of one written, a lost update
    throw py::value_error(label.str() +
                          ": expected a C- or F-contiguous array, got a strided view " +
                          (written ? "(it cannot be updated in place without a copy)"
                                   : "(fusedopt makes no hidden copies: pass a contiguous copy, "
                                     "e.g. np.ascontiguousarray)"));
  }
  if (!arr.aligned) throw py::value_error(misaligned(label));
  if (ref != nullptr) {
    bool same_shape = arr.ndim == ref->ndim();
    for (py::ssize_t d = 0; same_shape && d < arr.ndim; ++d) {
      same_shape = arr.shape[d] == ref->shape(d);
    }
    if (!same_shape) {
      throw py::value_error(label.str() + ": expected shape " + shape_str(*ref) +
                            " like param, got " + shape_str(arr.ndim, arr.shape));
    }
    const bool ref_c = (ref->flags() & py::array::c_style) != 0;
    if (!(ref_c ? arr.c_order : arr.f_order)) {
      throw py::value_error(label.str() + ": expected the memory layout of param (" +
                            (ref_c ? "C" : "F") + "-contiguous), got " + (arr.c_order ? "C" : "F") +
                            "-contiguous");
    }
  }
  if (written && !arr.writeable) {
    throw py::value_error(label.str() + ": array is read-only");
  }
}

template <typename Expected>
void check_array(const Label& label, py::handle obj, const py::array* ref, const py::dtype& dtype,
                 const Expected& expected, bool written) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(label.str() + ": expected a numpy.ndarray, got " + type_name(obj));
  }
  check_facts(label, facts_of(py::reinterpret_borrow<py::array>(obj)), ref, dtype, expected,
              written);
}

// ------------------------------------------------------------------ borrowed memory

// Memory of another library's objects (fusedopt.torch: new gradient tensors) lent to one list
// call, in place of a list of arrays, for an argument the kernel only reads: no NumPy array is
// made per tensor. _borrow makes it from objects whose data_ptr() is the address of their
// elements, laid out as C-contiguous arrays of `dtype` with the shapes of the arrays `like` (the
// call's params): the caller has checked that (fusedopt.torch with torch's own check of the
// tensors' kind, dtype, sizes and strides). The call then checks it as it checks an array: its
// row's dtype, its param's shape and layout, that it is not written, that nothing overlaps it.
struct Borrowed {
  py::list owners;  // the objects, held while the memory is lent
  DType dtype = DType::float32;
  std::vector<const void*> data;          // per tensor
  std::vector<py::ssize_t> nbytes;        // per tensor
  std::vector<py::ssize_t> dims;          // every tensor's shape, in turn
  std::vector<std::size_t> first_dim{0};  // tensor i's shape: dims[first_dim[i], first_dim[i + 1])
  std::vector<char> f_order;              // whether NumPy would flag it F-contiguous too

  ArrayFacts facts(std::size_t i) const {
    const auto ndim = static_cast<py::ssize_t>(first_dim[i + 1] - first_dim[i]);
    return {numpy_dtype(dtype), ndim, dims.data() + first_dim[i], true, f_order[i] != 0, false};
  }
};

// The Borrowed lent for an argument, or nullptr.
const Borrowed* borrowed_of(py::handle obj) {
  return py::isinstance<Borrowed>(obj) ? &obj.cast<const Borrowed&>() : nullptr;
}

PyObject* data_ptr_keyword() {
  static PyObject* const keyword = intern("data_ptr");
  return keyword;
}

// _borrow(objects, like, dtype): the memory of each object (its data_ptr()) as `dtype` shaped
// like the array of `like` at its index, or None if an object with elements to read reports
// address 0 (a tensor without storage) or one not aligned to `dtype`.
py::object borrow(const py::list& objects, const py::list& like, const py::dtype& dtype) {
  Borrowed b;
  // copies: an object's data_ptr is Python code, which may change the lists given
  b.owners = py::reinterpret_steal<py::list>(PySequence_List(objects.ptr()));
  if (!b.owners) throw py::error_already_set();
  const auto shapes = py::reinterpret_steal<py::tuple>(PySequence_Tuple(like.ptr()));
  if (!shapes) throw py::error_already_set();
  const std::size_t count = b.owners.size();
  if (count != shapes.size()) {
    throw py::value_error("_borrow: expected an array in like per object, got " +
                          std::to_string(shapes.size()) + " for " + std::to_string(count));
  }
  const std::optional<DType> kind = dtype_of(dtype);
  if (!kind || *kind == DType::int8) {
    throw py::type_error("_borrow: expected a floating dtype, got " + dtype_name(dtype));
  }
  b.dtype = *kind;
  b.data.reserve(count);
  b.nbytes.reserve(count);
  b.first_dim.reserve(count + 1);
  b.f_order.reserve(count);
  py::object method;  // the objects' type's data_ptr, looked up once per type (not per object)
  PyTypeObject* method_of = nullptr;
  for (std::size_t i = 0; i < count; ++i) {
    const py::handle shape_of = PyTuple_GET_ITEM(shapes.ptr(), static_cast<Py_ssize_t>(i));
    if (!py::isinstance<py::array>(shape_of)) {
      throw py::type_error("_borrow: like[" + std::to_string(i) +
                           "]: expected a numpy.ndarray, got " + type_name(shape_of));
    }
    const auto arr = py::reinterpret_borrow<py::array>(shape_of);
    PyObject* owner = PyList_GET_ITEM(b.owners.ptr(), static_cast<Py_ssize_t>(i));
    if (Py_TYPE(owner) != method_of) {
      method = py::reinterpret_steal<py::object>(
          PyObject_GetAttr(reinterpret_cast<PyObject*>(Py_TYPE(owner)), data_ptr_keyword()));
      if (!method) throw py::error_already_set();
      method_of = Py_TYPE(owner);
    }
    const auto address =
        py::reinterpret_steal<py::object>(PyObject_Vectorcall(method.ptr(), &owner, 1, nullptr));
    if (!address) throw py::error_already_set();
    const void* data = PyLong_AsVoidPtr(address.ptr());
    if (data == nullptr && PyErr_Occurred()) throw py::error_already_set();
    if (data == nullptr && arr.size() > 0) return py::none();
    // misaligned memory (a view at an odd byte offset): the checked path refuses it by name
    if (reinterpret_cast<std::uintptr_t>(data) % static_cast<std::uintptr_t>(dtype.itemsize()) !=
        0) {
      return py::none();
    }
    b.data.push_back(data);
    b.nbytes.push_back(arr.size() * dtype.itemsize());
    py::ssize_t wide = 0;  // dimensions of more than one element
    for (py::ssize_t d = 0; d < arr.ndim(); ++d) {
      b.dims.push_back(arr.shape(d));
      wide += arr.shape(d) > 1 ? 1 : 0;
    }
    b.first_dim.push_back(b.dims.size());
    b.f_order.push_back(wide <= 1 || arr.size() == 0 ? 1 : 0);
  }
  return py::cast(std::move(b));
}

// Validates the arrays of a call before anything is written. An argument is one array (then all
// are) or a list/tuple of arrays, one per tensor (then all are, of the same length); an absent
// optional argument is None or not given. A buffer whose option is off is ignored.
Checked check_arrays(const ArrayDecl* roles, std::size_t n_roles, const Arguments& a,
                     const Descriptor* d) {
  PyObject* const* args = a.arrays.data();
  const py::handle param = args[0] == nullptr ? py::handle(Py_None) : py::handle(args[0]);
  const bool single = py::isinstance<py::array>(param);
  if (!single && !is_list(param)) {
    throw py::type_error(std::string(roles[0].name) +
                         ": expected a numpy.ndarray or a list of them, got " + type_name(param));
  }
  // A list call reads tuples of its lists made here, which the call holds: a list's __len__ may
  // misstate its size, and code the checks run (a QuantizedState subclass's attribute) may empty
  // a list, or another thread may while the GIL is released; neither can make the call read past
  // a list or use an array that was freed.
  Checked checked;
  std::array<py::handle, kMaxArrays + 1> lists{};  // the roles', then the masters'
  auto snapshot = [&](std::size_t slot, py::handle list) {
    auto items = py::reinterpret_steal<py::object>(PySequence_Tuple(list.ptr()));
    if (!items) throw py::error_already_set();
    lists[slot] = items;
    checked.held.push_back(std::move(items));
  };
  if (!single) snapshot(0, param);
  const std::size_t count = single ? 1 : static_cast<std::size_t>(PyTuple_GET_SIZE(lists[0].ptr()));
  auto item = [&](std::size_t slot, std::size_t i) -> py::handle {
    return single ? py::handle(slot == kMaxArrays ? a.master : args[slot])
                  : py::handle(PyTuple_GET_ITEM(lists[slot].ptr(), static_cast<Py_ssize_t>(i)));
  };
  auto label = [&](std::size_t r, std::size_t i) {
    return Label{roles[r].name, single ? -1 : static_cast<py::ssize_t>(i)};
  };

  if (count > 0 && !py::isinstance<py::array>(item(0, 0))) {
    throw py::type_error(label(0, 0).str() + ": expected a numpy.ndarray, got " +
                         type_name(item(0, 0)));
  }

  std::array<bool, kMaxArrays> present{};
  std::array<const Borrowed*, kMaxArrays> borrowed{};  // where memory is lent, not arrays
  for (std::size_t r = 0; r < n_roles; ++r) {
    const py::handle arg = args[r] == nullptr ? py::handle(Py_None) : py::handle(args[r]);
    const std::string name = roles[r].name;
    present[r] = !arg.is_none();
    if (roles[r].used_when != nullptr) {
      const bool used = d != nullptr && a.option_on(*d, r);
      if (used && !present[r]) {
        const std::size_t option = d->option_of[r];
        const std::string value = a.given[option] != nullptr
                                      ? str_of(a.given[option])
                                      : std::to_string(d->hyper[option].default_value);
        throw py::value_error(std::string(roles[r].used_when) + "=" + value + " needs the " + name +
                              " buffer, got None");
      }
      present[r] = present[r] && used;
    }
    if (!present[r]) {
      if (roles[r].optional) continue;
      throw py::type_error(name + ": expected " +
                           (single ? "a numpy.ndarray" : "a list of numpy.ndarray") + ", got None");
    }
    if (single && !py::isinstance<py::array>(arg) &&
        !(roles[r].part == fusedopt::Part::state && is_quantized(arg))) {
      throw py::type_error(name + ": expected a numpy.ndarray like param, got " + type_name(arg));
    }
    if (!single) {
      borrowed[r] = borrowed_of(arg);
      if (borrowed[r] != nullptr && roles[r].written) {
        throw py::type_error(name +
                             ": is updated in place: expected a list of arrays, got "
                             "borrowed memory (lent only to be read)");
      }
      if (!is_list(arg) && borrowed[r] == nullptr) {
        throw py::type_error(name + ": expected a list of arrays like param, got " +
                             type_name(arg));
      }
      if (borrowed[r] == nullptr && r > 0) snapshot(r, arg);
      const std::size_t given = borrowed[r] != nullptr
                                    ? borrowed[r]->data.size()
                                    : static_cast<std::size_t>(PyTuple_GET_SIZE(lists[r].ptr()));
      if (given != count) {
        throw py::value_error(name + ": expected " + std::to_string(count) +
                              " arrays like param, got " + std::to_string(given));
      }
    }
  }
  const py::handle master = a.master == nullptr ? py::handle() : py::handle(a.master);
  if (master) {
    if (single ? !py::isinstance<py::array>(master) : !is_list(master)) {
      throw py::type_error(std::string("master: expected ") +
                           (single ? "a numpy.ndarray like param" : "a list of arrays like param") +
                           ", got " + type_name(master));
    }
    if (!single) {
      snapshot(kMaxArrays, master);
      const auto given = static_cast<std::size_t>(PyTuple_GET_SIZE(lists[kMaxArrays].ptr()));
      if (given != count) {
        throw py::value_error("master: expected " + std::to_string(count) +
                              " arrays like param, got " + std::to_string(given));
      }
    }
  }

  // The call's row of the table: the first whose dtypes are those of the first tensor's arrays.
  // Every array of every tensor must then have its part's dtype. If none has them all, the
  // messages' row is the first that has the most of them (the param's at least): a bfloat16
  // exp_avg beside an int8 exp_avg_sq is then "expected bfloat16 like exp_avg" at exp_avg_sq,
  // not "expected float32" at exp_avg, which neither is.
  std::size_t storage = 0;
  DType checked_copy = DType::float32;
  if (count > 0) {
    auto dtype_at = [&](std::size_t r) -> std::optional<DType> {
      if (borrowed[r] != nullptr) return borrowed[r]->dtype;
      const py::handle obj = present[r] ? item(r, 0) : py::handle();
      if (obj && roles[r].part == fusedopt::Part::state && !py::isinstance<py::array>(obj) &&
          is_quantized(obj)) {
        return DType::int8;
      }
      if (!obj || !py::isinstance<py::array>(obj)) return std::nullopt;
      return dtype_of(py::reinterpret_borrow<py::array>(obj).dtype());
    };
    std::optional<DType> param_dtype = dtype_at(0);
    if (master) {  // the masters' row: a float32 param
      if (param_dtype != DType::bfloat16 && param_dtype != DType::float16) {
        throw py::type_error(
            "master: float32 master weights are for a bfloat16 or float16 param, got a " +
            dtype_name(py::reinterpret_borrow<py::array>(item(0, 0)).dtype()) + " param");
      }
      checked_copy = *param_dtype;
      param_dtype = DType::float32;
    }
    bool param_known = false;
    std::size_t most_matched = 0;
    for (std::size_t row = 0; row < fusedopt::kStorageCount; ++row) {
      if (param_dtype != fusedopt::kStorageRows[row].param) continue;
      std::size_t matched = 1;  // the roles whose dtypes the row has: the param's, and
      for (std::size_t r = 1; r < n_roles; ++r) {
        const std::optional<DType> dtype = dtype_at(r);
        matched += !dtype || dtype == fusedopt::kStorageRows[row].of(roles[r].part);
      }
      if (!param_known || matched > most_matched) storage = row;
      param_known = true;
      most_matched = std::max(most_matched, matched);
      if (matched == n_roles) break;
    }
    if (!param_known) {
      throw py::type_error(label(0, 0).str() + ": expected dtype " +
                           dtypes_text(allowed_dtypes(roles[0].part, std::nullopt)) + ", got " +
                           dtype_name(py::reinterpret_borrow<py::array>(item(0, 0)).dtype()));
    }
  }
  const fusedopt::StorageRow& row = fusedopt::kStorageRows[storage];

  const DType param_dtype = master ? checked_copy : row.param;

  checked.storage = storage;
  checked.grad_dtype = row.grad;
  checked.param_copy = checked_copy;
  checked.roles = n_roles + (master ? 1 : 0);
  const std::size_t roles_per_tensor = checked.roles;
  checked.data.assign(count * roles_per_tensor, nullptr);
  if (row.state == DType::int8) checked.scales.assign(count * roles_per_tensor, nullptr);
  checked.starts.assign(count + 1, 0);
  std::vector<Extent> extents;
  extents.reserve(count * roles_per_tensor * 2);
  struct Scales {
    Label label;  // its text is built only for an error
    const float* values;
    Index count;
  };
  std::vector<Scales> scale_values;  // checked last: overlapping arrays are named first
  auto add_extent = [&](const py::array& arr, std::size_t slot, bool written,
                        const char* part = "") {
    if (arr.nbytes() > 0) {
      const char* begin = static_cast<const char*>(arr.data());
      extents.push_back({begin, begin + arr.nbytes(), slot, written, part});
    }
  };
  std::optional<bool> codes_unsigned[kMaxArrays];
  for (std::size_t i = 0; i < count; ++i) {
    // messages: "float64 like param[0] (one call takes one dtype)", "float32 like param",
    // "bfloat16 or float32 for a bfloat16 param"
    check_array(
        label(0, i), item(0, i), nullptr, numpy_dtype(param_dtype),
        [&] { return std::string(dtype_text(param_dtype)) + " like " + label(0, 0).str(); },
        roles[0].written);
    const auto p = py::reinterpret_borrow<py::array>(item(0, i));
    checked.starts[i + 1] = checked.starts[i] + static_cast<Index>(p.size());
    if (master) {
      const py::handle obj = item(kMaxArrays, i);
      const Label where{"master", single ? -1 : static_cast<py::ssize_t>(i)};
      check_array(
          where, obj, &p, numpy_dtype(DType::float32), [] { return std::string("float32"); }, true);
      const auto m = py::reinterpret_borrow<py::array>(obj);
      checked.data[i * roles_per_tensor] = const_cast<void*>(m.data());
      checked.data[i * roles_per_tensor + n_roles] = const_cast<void*>(p.data());
      add_extent(m, i * roles_per_tensor + n_roles, true);
    }
    for (std::size_t r = 0; r < n_roles; ++r) {
      if (!present[r]) continue;
      const Borrowed* const lent = borrowed[r];
      const py::handle obj = lent != nullptr ? py::handle() : item(r, i);
      if (lent == nullptr && row.state == DType::int8 && roles[r].part == fusedopt::Part::state) {
        const Label where = label(r, i);
        const std::size_t slot = i * roles_per_tensor + r;
        if (!is_quantized(obj)) {
          throw py::type_error(
              where.str() +
              ": expected a fusedopt.quantize.QuantizedState (8-bit codes and float32 scales) "
              "like the call's other states, got " +
              (py::isinstance<py::array>(obj)
                   ? "an array of dtype " +
                         dtype_name(py::reinterpret_borrow<py::array>(obj).dtype())
                   : type_name(obj)));
        }
        // held for the call: the attributes may hold the only references
        const py::object codes = py::getattr(obj, "codes", py::none());
        const py::object scales = py::getattr(obj, "scales", py::none());
        checked.held.push_back(codes);
        checked.held.push_back(scales);
        const Label codes_label{roles[r].name, where.index, ".codes"};
        const Label scales_label{roles[r].name, where.index, ".scales"};
        if (!py::isinstance<py::array>(codes)) {
          throw py::type_error(codes_label.str() + ": expected a numpy.ndarray, got " +
                               type_name(codes));
        }
        const py::dtype codes_dtype = py::reinterpret_borrow<py::array>(codes).dtype();
        const bool is_uint8 = same_dtype(codes_dtype, py::dtype::of<std::uint8_t>());
        if (is_uint8 && !roles[r].nonnegative) {
          throw py::type_error(codes_label.str() +
                               ": uint8 (unsigned) codes are only for a state that is never "
                               "negative; " +
                               roles[r].name + " takes int8 codes");
        }
        if (!is_uint8 && !same_dtype(codes_dtype, numpy_dtype(DType::int8))) {
          throw py::type_error(codes_label.str() + ": expected dtype int8" +
                               (roles[r].nonnegative ? std::string(" or uint8") : "") + ", got " +
                               dtype_name(codes_dtype));
        }
        if (codes_unsigned[r] && *codes_unsigned[r] != is_uint8) {
          throw py::type_error(
              codes_label.str() + ": expected dtype " + (*codes_unsigned[r] ? "uint8" : "int8") +
              " like " + Label{roles[r].name, 0, ".codes"}.str() + " (one call takes one dtype)");
        }
        codes_unsigned[r] = is_uint8;
        check_array(
            codes_label, codes, &p, codes_dtype, [&] { return dtype_name(codes_dtype); }, true);
        const Index blocks =
            (static_cast<Index>(p.size()) + fusedopt::kBlock - 1) / fusedopt::kBlock;
        if (!py::isinstance<py::array>(scales)) {
          throw py::type_error(scales_label.str() + ": expected a numpy.ndarray, got " +
                               type_name(scales));
        }
        const auto sc = py::reinterpret_borrow<py::array>(scales);
        // built only for an error: a call checks one per tensor and state
        const auto expected_scales = [&] {
          return "float32 of shape (" + std::to_string(blocks) + ",) (one per " +
                 std::to_string(fusedopt::kBlock) + " elements)";
        };
        if (!same_dtype(sc.dtype(), numpy_dtype(DType::float32))) {
          throw py::type_error(scales_label.str() + ": expected " + expected_scales() + ", got " +
                               dtype_name(sc.dtype()));
        }
        if (sc.ndim() != 1 || sc.size() != blocks) {
          throw py::value_error(scales_label.str() + ": expected " + expected_scales() +
                                ", got shape " + shape_str(sc));
        }
        if ((sc.flags() & py::array::c_style) == 0) {
          throw py::value_error(scales_label.str() +
                                ": expected a contiguous array, got a strided view (it cannot "
                                "be updated in place without a copy)");
        }
        if (!is_aligned(sc)) throw py::value_error(misaligned(scales_label));
        if (!sc.writeable()) throw py::value_error(scales_label.str() + ": array is read-only");
        scale_values.push_back({scales_label, static_cast<const float*>(sc.data()), blocks});
        const auto c = py::reinterpret_borrow<py::array>(codes);
        checked.data[slot] = const_cast<void*>(c.data());
        checked.scales[slot] = const_cast<void*>(sc.data());
        add_extent(c, slot, true, ".codes");
        add_extent(sc, slot, true, ".scales");
        if (is_uint8) checked.unsigned_codes |= 1U << r;
        continue;
      }
      if (r > 0) {
        const DType expected = row.of(roles[r].part);
        auto expected_text = [&]() -> std::string {
          if (i > 0) return std::string(dtype_text(expected)) + " like " + label(r, 0).str();
          const std::vector<DType> allowed = allowed_dtypes(roles[r].part, row.param);
          const std::optional<DType> actual =
              lent != nullptr     ? std::optional<DType>(lent->dtype)
              : is_quantized(obj) ? std::optional<DType>(DType::int8)
                                  : dtype_of(py::reinterpret_borrow<py::array>(obj).dtype());
          if (actual && std::find(allowed.begin(), allowed.end(), *actual) != allowed.end()) {
            // allowed alone, not with the call's other arrays
            for (std::size_t q = 1; q < r; ++q) {
              if (present[q] && roles[q].part == roles[r].part) {
                return std::string(dtype_text(expected)) + " like " + roles[q].name;
              }
            }
            return std::string(dtype_text(expected)) + " with the call's other arrays";
          }
          if (allowed == std::vector<DType>{row.param}) return dtypes_text(allowed) + " like param";
          return dtypes_text(allowed) + " for a " + dtype_text(row.param) + " param";
        };
        if (lent != nullptr) {
          check_facts(label(r, i), lent->facts(i), &p, numpy_dtype(expected), expected_text,
                      roles[r].written);
          const char* begin = static_cast<const char*>(lent->data[i]);
          checked.data[i * roles_per_tensor + r] = const_cast<char*>(begin);
          if (lent->nbytes[i] > 0) {
            extents.push_back({begin, begin + lent->nbytes[i], i * roles_per_tensor + r, false});
          }
          continue;
        }
        if (!py::isinstance<py::array>(obj) && is_quantized(obj)) {
          throw py::type_error(label(r, i).str() + ": expected dtype " + expected_text() +
                               ", got a fusedopt.quantize.QuantizedState");
        }
        check_array(label(r, i), obj, &p, numpy_dtype(expected), expected_text, roles[r].written);
      }
      const auto arr = py::reinterpret_borrow<py::array>(obj);
      // Read-only arrays (a grad) are only read; the kernels take them as const.
      if (!(master && r == 0)) {
        checked.data[i * roles_per_tensor + r] = const_cast<void*>(arr.data());
      }
      add_extent(arr, i * roles_per_tensor + r, roles[r].written);
    }
  }
  if (const auto overlap = find_overlap(extents)) {
    const auto [first, second] = *overlap;
    auto name = [&](const Extent& e) {
      const std::size_t r = e.slot % roles_per_tensor, i = e.slot / roles_per_tensor;
      const auto index = single ? py::ssize_t{-1} : static_cast<py::ssize_t>(i);
      return Label{r == n_roles ? "master" : roles[r].name, index, e.part}.str();
    };
    throw py::value_error(name(first) + " and " + name(second) +
                          " share memory; an array that is updated in place must not overlap "
                          "any other argument");
  }
  for (const Scales& scales : scale_values) {
    check_scale_values(scales.label, scales.values, scales.count);
  }
  return checked;
}

// _byte_extents(items): the bytes of each NumPy array, [first, one past the last), as rows of an
// (n, 2) int64 array ((0, 0) for an empty one); a Borrowed item gives a row per tensor it lends.
// What the checks that span several calls sort to find memory shared (fusedopt/_overlap.py):
// in C++ because reading an address in Python costs microseconds per array.
py::array_t<std::int64_t> byte_extents(const py::list& items) {
  py::ssize_t rows = 0;
  for (std::size_t i = 0; i < items.size(); ++i) {
    const py::handle obj = items[i];
    if (py::isinstance<py::array>(obj)) {  // first: the cheaper test
      ++rows;
    } else if (const Borrowed* lent = borrowed_of(obj)) {
      rows += static_cast<py::ssize_t>(lent->data.size());
    } else {
      throw py::type_error("_byte_extents: expected numpy.ndarray or Borrowed items, got " +
                           type_name(obj) + " at index " + std::to_string(i));
    }
  }
  py::array_t<std::int64_t> out({rows, py::ssize_t{2}});
  auto at = out.mutable_unchecked<2>();
  const auto address = [](const void* p) {
    return static_cast<std::int64_t>(reinterpret_cast<std::intptr_t>(p));
  };
  py::ssize_t row = 0;
  for (std::size_t i = 0; i < items.size(); ++i) {
    const py::handle obj = items[i];
    if (!py::isinstance<py::array>(obj)) {  // a Borrowed: contiguous, nbytes each
      const Borrowed* lent = borrowed_of(obj);
      for (std::size_t t = 0; t < lent->data.size(); ++t, ++row) {
        const bool empty = lent->nbytes[t] == 0;
        at(row, 0) = empty ? 0 : address(lent->data[t]);
        at(row, 1) = empty ? 0 : address(lent->data[t]) + lent->nbytes[t];
      }
      continue;
    }
    const auto arr = py::reinterpret_borrow<py::array>(obj);
    std::int64_t low = 0, high = 0;
    if (arr.size() > 0) {
      low = high = address(arr.data());
      for (py::ssize_t d = 0; d < arr.ndim(); ++d) {
        const auto span = static_cast<std::int64_t>((arr.shape(d) - 1) * arr.strides(d));
        (span < 0 ? low : high) += span;
      }
      high += static_cast<std::int64_t>(arr.itemsize());
    }
    at(row, 0) = low;
    at(row++, 1) = high;
  }
  return out;
}

// ------------------------------------------------------------------ running the kernels

bool any_nonfinite(const TensorSet& set, std::size_t r, DType dtype, int threads) {
  std::atomic<bool> found{false};
  const fusedopt::ScanFn scan = table().nonfinite[static_cast<std::size_t>(dtype)];
  split_across_threads(set, threads,
                       [&](Index begin, Index end) { scan(set, r, begin, end, found); });
  return found.load();
}

// Where each tensor's chunks start in the list of all chunks of `set`: first_chunk[t] (tensors + 1
// entries, the last the count), for reductions that keep one partial result per chunk.
std::vector<Index> first_chunks(const TensorSet& set) {
  std::vector<Index> first_chunk(set.tensors + 1, 0);
  for (std::size_t t = 0; t < set.tensors; ++t) {
    const Index size = set.starts[t + 1] - set.starts[t];
    first_chunk[t + 1] = first_chunk[t] + (size + fusedopt::kChunk - 1) / fusedopt::kChunk;
  }
  return first_chunk;
}

// The first pass of a two-pass kernel: its d.sums sums per tensor, each the chunks' partial sums
// added in chunk order from zero, so the same bits for any thread count.
std::vector<double> tensor_sums(const Descriptor& d, const Checked& checked, const TensorSet& set,
                                const fusedopt::RoundingRequest& rounding, const Value* values,
                                void* const* scales, int threads) {
  const std::vector<Index> first_chunk = first_chunks(set);
  std::vector<double> partial(static_cast<std::size_t>(first_chunk.back()) * d.sums);
  const fusedopt::ReduceFn reduce = table().reduce[d.kernel][checked.storage];
  split_across_threads(set, threads, [&](Index begin, Index end) {
    reduce(values, rounding, set, scales, first_chunk.data(), begin, end, partial.data());
  });
  std::vector<double> sums(set.tensors * d.sums, 0.0);
  for (std::size_t t = 0; t < set.tensors; ++t) {
    for (auto c = static_cast<std::size_t>(first_chunk[t]);
         c < static_cast<std::size_t>(first_chunk[t + 1]); ++c) {
      for (std::size_t k = 0; k < d.sums; ++k) sums[t * d.sums + k] += partial[c * d.sums + k];
    }
  }
  return sums;
}

// Runs the kernel over the checked arrays and returns true, or, with skip_if_nonfinite, returns
// false without writing anything when any grad (role 1) holds a NaN or an infinity.
bool launch(const Descriptor& d, const Checked& checked, const Arguments& a) {
  const TensorSet set = checked.set();
  const fusedopt::UpdateFn update = table().update[d.kernel][checked.storage];
  const fusedopt::StorageRow& row = fusedopt::kStorageRows[checked.storage];
  // Without a step the random bits are a function of the seed alone: a default one would draw
  // the same bits every call, and stochastic rounding would not average out over steps.
  const bool draws_random_bits =
      row.state == DType::int8 ||
      (a.stochastic_rounding &&
       (row.param == DType::bfloat16 || row.param == DType::float16 ||
        row.state == DType::bfloat16 || checked.param_copy != DType::float32));
  if (d.step_index == kNone && draws_random_bits && !a.seed_given) {
    throw py::type_error(d.function + "(): " + kSeedNeeded);
  }
  const fusedopt::RoundingRequest rounding{
      a.stochastic_rounding, a.seed,
      d.step_index == kNone ? 0 : static_cast<std::uint64_t>(a.values[d.step_index].count),
      checked.param_copy, checked.unsigned_codes};
  void* const* scales = checked.scales.empty() ? nullptr : checked.scales.data();
  const ReleaseGilIfWorthIt release(set.total());
  // threads for each region: a late one sends the next to the calling thread
  if (a.skip_if_nonfinite &&
      any_nonfinite(set, 1, checked.grad_dtype, threads_for_call(set.total()))) {
    return false;
  }
  const Value* values = a.values.data();
  const std::vector<double> sums = d.sums > 0 ? tensor_sums(d, checked, set, rounding, values,
                                                            scales, threads_for_call(set.total()))
                                              : std::vector<double>();
  split_across_threads(set, threads_for_call(set.total()), [&](Index begin, Index end) {
    update(values, rounding, set, scales, begin, end, sums.empty() ? nullptr : sums.data());
  });
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

// fn(arrays..., **hyperparameters) -> bool. A vectorcall function of CPython's, not a pybind11
// one: the arguments arrive as a C array with no tuple or dict built, which is most of the cost
// of a call on a small tensor. `self` is a capsule holding the kernel's Descriptor.
PyObject* kernel_call(PyObject* self, PyObject* const* args, Py_ssize_t nargsf, PyObject* kwnames) {
  return python_call([&] {
    const auto& d = *static_cast<const Descriptor*>(PyCapsule_GetPointer(self, nullptr));
    const auto nargs =
        static_cast<std::size_t>(PyVectorcall_NARGS(static_cast<std::size_t>(nargsf)));
    const Arguments arguments = parse_arguments(d, args, nargs, kwnames);
    const Checked checked = check_arrays(d.arrays, d.array_count, arguments, &d);
    return py::bool_(launch(d, checked, arguments)).release().ptr();
  });
}

// The same arguments, checked as kernel_call checks them, nothing run: returns None. For a
// step of several calls, which checks every call before the first one writes
// (fusedopt/optim.py); the seed's check is launch's, which such a step always passes.
PyObject* kernel_check(PyObject* self, PyObject* const* args, Py_ssize_t nargsf,
                       PyObject* kwnames) {
  return python_call([&] {
    const auto& d = *static_cast<const Descriptor*>(PyCapsule_GetPointer(self, nullptr));
    const auto nargs =
        static_cast<std::size_t>(PyVectorcall_NARGS(static_cast<std::size_t>(nargsf)));
    const Arguments arguments = parse_arguments(d, args, nargs, kwnames);
    check_arrays(d.arrays, d.array_count, arguments, &d);
    return py::none().release().ptr();
  });
}

// A vectorcall function named `name` over the kernel that `d` describes: `call` is kernel_call
// or kernel_check. CPython keeps pointers to the definition and the descriptor for as long as
// the function lives: never freed.
py::object kernel_function(py::module_& m, const char* name, Descriptor* d, PyCFunction call) {
  auto* def = new PyMethodDef{name, call, METH_FASTCALL | METH_KEYWORDS, nullptr};
  const auto capsule = py::capsule(d);
  auto function = py::reinterpret_steal<py::object>(
      PyCFunction_NewEx(def, capsule.ptr(), m.attr("__name__").ptr()));
  if (!function) throw py::error_already_set();
  return function;
}

template <typename Fn>
PyCFunction as_method(Fn* fn) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn));
}

void def_kernel(py::module_& m, const char* name, Descriptor* d) {
  m.add_object(name, kernel_function(m, name, d, as_method(&kernel_call)));
}

template <typename... Optimizers, typename... Helpers>
void def_kernels(py::module_& m, fusedopt::List<Optimizers...>, fusedopt::List<Helpers...>) {
  std::size_t kernel = 0;
  py::dict optimizers, checks;
  (
      [&] {
        auto* d = new Descriptor(describe<Optimizers>(kernel++, "_"));
        def_kernel(m, Optimizers::name, d);
        checks[Optimizers::name] =
            kernel_function(m, Optimizers::name, d, as_method(&kernel_check));
        optimizers[Optimizers::name] = declaration_data(Optimizers::name, Optimizers::summary, *d);
      }(),
      ...);
  ((def_kernel(m, Helpers::name, new Descriptor(describe<Helpers>(kernel++, "")))), ...);
  m.attr("OPTIMIZERS") = optimizers;
  m.attr("CHECKS") = checks;
}

// The checked arrays of a helper that takes one array or a list of them.
Checked one_role(const py::args& args) {
  static constexpr ArrayDecl roles[] = {{"arrays", fusedopt::Part::param, false, ""}};
  if (args.size() != 1) {
    throw py::type_error("expected 1 array argument, got " + std::to_string(args.size()));
  }
  Arguments a;
  a.arrays[0] = args[0].ptr();
  return check_arrays(roles, 1, a, nullptr);
}

bool all_finite(const py::args& args) {
  const Checked checked = one_role(args);
  const TensorSet set = checked.set();
  const int threads = threads_for_call(set.total());
  const ReleaseGilIfWorthIt release(set.total());
  return !any_nonfinite(set, 0, fusedopt::kStorageRows[checked.storage].param, threads);
}

// Sum of squares of all elements, in double: per-chunk sums (fixed boundaries, fixed order
// within) added in chunk order, so bit-identical for any thread count.
double sum_squares(const py::args& args) {
  const Checked checked = one_role(args);
  const TensorSet set = checked.set();
  const std::vector<Index> first_chunk = first_chunks(set);
  std::vector<double> partial(static_cast<std::size_t>(first_chunk.back()));
  const fusedopt::SumFn sum =
      table().sum_squares[static_cast<std::size_t>(fusedopt::kStorageRows[checked.storage].param)];
  const int threads = threads_for_call(set.total());
  {
    const ReleaseGilIfWorthIt release(set.total());
    split_across_threads(set, threads, [&](Index begin, Index end) {
      sum(set, first_chunk.data(), begin, end, partial.data());
    });
  }
  double total = 0;
  for (const double p : partial) total += p;
  return total;
}

// For tests of the 64-bit arithmetic: where each of `team` threads would start and stop on
// tensors of these sizes, without allocating them.
std::vector<std::pair<Index, Index>> thread_ranges(const std::vector<Index>& sizes, Index team) {
  std::vector<Index> starts(sizes.size() + 1, 0);
  for (std::size_t t = 0; t < sizes.size(); ++t) starts[t + 1] = starts[t] + sizes[t];
  const TensorSet set{nullptr, starts.data(), sizes.size(), 0};
  std::vector<std::pair<Index, Index>> ranges;
  for (Index me = 0; me < team; ++me) {
    ranges.emplace_back(fusedopt::thread_begin(set, me, team),
                        fusedopt::thread_begin(set, me + 1, team));
  }
  return ranges;
}

// What this CPU can run, by level name. __builtin_cpu_supports also checks that the OS saves
// the wide registers.
py::dict cpu_supports() {
  py::dict levels;
  levels["baseline"] = true;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
  levels["avx2"] = avx2;
  levels["avx512"] = avx2 && __builtin_cpu_supports("avx512f") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512dq");
#elif defined(__aarch64__) && defined(__linux__)
  levels["sve"] = (getauxval(AT_HWCAP) & HWCAP_SVE) != 0;  // and the kernel enabled it
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

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fusedopt's compiled binding; use the functions of the fusedopt package instead.";
  def_kernels(m, fusedopt::Optimizers{}, fusedopt::Helpers{});
  m.def("all_finite", &all_finite);
  m.def("sum_squares", &sum_squares);
  m.def("_use_kernels", &use_kernels);
  m.def("_thread_ranges", &thread_ranges);
  py::class_<Borrowed>(m, "Borrowed",
                       "Memory of objects lent to one list call as a read-only argument "
                       "(fusedopt.torch's new gradients); made by _borrow only.");
  m.def("_borrow", &borrow, py::arg("objects"), py::arg("like"), py::arg("dtype"));
  m.def("_byte_extents", &byte_extents, py::arg("arrays"));
  m.def("simd_level", [] { return std::string(table().level); });
  m.def("simd_instructions", [] { return std::string(table().instructions); });
#if !defined(_WIN32)
  pthread_atfork(nullptr, nullptr, fusedopt::parallel::after_fork_in_child);
#endif

  m.def("get_num_threads", &threads_for_kernels);
  m.def("set_num_threads", [](int threads) { num_threads.store(threads); });
  m.attr("CHUNK") = fusedopt::kChunk;
  py::list rows;  // (param, grad, state) dtype names of every storage row
  for (const fusedopt::StorageRow& row : fusedopt::kStorageRows) {
    rows.append(py::make_tuple(dtype_text(row.param), dtype_text(row.grad), dtype_text(row.state)));
  }
  m.attr("STORAGE_ROWS") = py::tuple(rows);
  m.def("get_parallel_min", [] { return parallel_min.load(); });
  m.def("set_parallel_min", [](Index n) { parallel_min.store(n); });
  m.def("threads_for_call", &threads_for_call, py::arg("total"));
  m.def("get_late_start_ns", [] { return late_start_ns.load(); });
  m.def("set_late_start_ns", [](std::int64_t ns) { late_start_ns.store(ns); });
  m.def("get_busy_base_ns", [] { return busy_base_ns.load(); });
  m.def("set_busy_base_ns", [](std::int64_t ns) { busy_base_ns.store(ns); });
  m.def("get_busy_parallel_min", [] { return busy_parallel_min.load(); });
  m.def("set_busy_parallel_min", [](Index n) { busy_parallel_min.store(n); });
  m.def("busy_for_ns", &busy_for_ns);
  m.def("late_probes", [] { return late_probes_in_a_row.load(); });
  m.def("set_busy", [](std::int64_t for_ns, int late_probes) {  // for tests: the rule's state
    busy_until_ns.store(for_ns > 0 ? now_ns() + for_ns : 0);
    late_probes_in_a_row.store(late_probes);
  });
  m.attr("__version__") = FUSEDOPT_VERSION;
  m.attr("EIGEN_VERSION") = std::to_string(EIGEN_WORLD_VERSION) + "." +
                            std::to_string(EIGEN_MAJOR_VERSION) + "." +
                            std::to_string(EIGEN_MINOR_VERSION);
  m.attr("COMPILER") = compiler();
#ifdef _OPENMP
  m.attr("OPENMP") = _OPENMP;
#else
  m.attr("OPENMP") = py::none();
#endif
  m.attr("THREADS") = FUSEDOPT_THREADS;  // how CMake built the threads (FUSEDOPT_OPENMP)
  m.def("cpu_supports", &cpu_supports);
}
