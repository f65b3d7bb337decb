// The vocabulary of an optimizer's declaration: its arrays, its hyperparameters with defaults
// and valid ranges, and the values a call passes to its kernel. Every optimizer header declares
// itself in these terms; the binding, the Python functions, the registry the tests are generated
// from, and the docs are all derived from the declarations. Pure C++, no Python.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fusedopt {

// What an array is to the optimizer. Its part decides its storage type: a call's row of the
// kernel table gives one dtype to the param, one to the grad and one to every state buffer.
enum class Part { param, grad, state };

// One array argument. `used_when` names the option that uses it: the buffer is required
// exactly when that hyperparameter is true or nonzero, and ignored otherwise. `old_name` is a
// keyword that still works, with a DeprecationWarning. A `nonnegative` state is never below zero
// (second moments, sums of squares): its int8 form may use unsigned codes, which have more range.
struct ArrayDecl {
  const char* name;
  Part part;
  bool written;
  const char* help;
  bool optional = false;
  const char* used_when = nullptr;
  const char* old_name = nullptr;
  bool nonnegative = false;

  constexpr ArrayDecl used_with(const char* option) const {
    ArrayDecl a = *this;
    a.optional = true;
    a.used_when = option;
    return a;
  }
  constexpr ArrayDecl formerly(const char* keyword) const {
    ArrayDecl a = *this;
    a.old_name = keyword;
    return a;
  }
  constexpr ArrayDecl may_be_absent() const {
    ArrayDecl a = *this;
    a.optional = true;
    return a;
  }
  constexpr ArrayDecl never_negative() const {
    ArrayDecl a = *this;
    a.nonnegative = true;
    return a;
  }
};

// The param (first of every optimizer's arrays, updated), the grad (second, read only) and a
// state buffer (updated).
constexpr ArrayDecl param_array() { return {"param", Part::param, true, "parameters"}; }
constexpr ArrayDecl grad_array() { return {"grad", Part::grad, false, "gradients"}; }
constexpr ArrayDecl state(const char* name, const char* help) {
  return {name, Part::state, true, help};
}

// real: a float in `range`; step: the count of steps including this one, from 1; flag: a bool;
// fixed: set by the declaration (AdamW's decoupled decay), not an argument of the function.
enum class Kind { real, step, flag, fixed };

inline constexpr double kInfinity = std::numeric_limits<double>::infinity();

struct Range {
  double low = 0.0;
  double high = kInfinity;
  bool low_open = false;
  bool high_open = true;
};

constexpr Range at_least(double low) { return {low, kInfinity, false, true}; }
constexpr Range above(double low) { return {low, kInfinity, true, true}; }
constexpr Range closed(double low, double high) { return {low, high, false, false}; }
constexpr Range half_open(double low, double high) { return {low, high, false, true}; }

struct Hyperparameter {
  const char* name;
  Kind kind;
  bool required;             // no default: the caller must give it
  double default_value;      // a flag's as 0/1
  Range range;               // reals only
  const char* label;         // in messages, as PyTorch words them: "Invalid learning rate: -1.0"
  const char* help;          // one line for the docs
  bool may_be_none = false;  // a real whose None (the default) the kernel derives: see below
};

constexpr Hyperparameter real(const char* name, double default_value, Range range,
                              const char* label, const char* help) {
  return {name, Kind::real, false, default_value, range, label, help};
}
constexpr Hyperparameter required_real(const char* name, Range range, const char* label,
                                       const char* help) {
  return {name, Kind::real, true, 0.0, range, label, help};
}
// A real that may be None, its default: the kernel then derives it from the others (its help
// says how). None is held as NaN, which no range admits from a caller (Values::given).
inline constexpr double kNone = std::numeric_limits<double>::quiet_NaN();
constexpr Hyperparameter real_or_none(const char* name, Range range, const char* label,
                                      const char* help) {
  Hyperparameter h{name, Kind::real, false, kNone, range, label, help};
  h.may_be_none = true;
  return h;
}
constexpr Hyperparameter flag(const char* name, bool default_value, const char* help) {
  return {name, Kind::flag, false, default_value ? 1.0 : 0.0, {}, name, help};
}

// Hyperparameters several optimizers share, each with the default its optimizer gives it.
namespace hp {
constexpr Hyperparameter step() {
  return {"step",
          Kind::step,
          true,
          0.0,
          {},
          "step",
          "number of steps taken including this one, from 1"};
}
constexpr Hyperparameter lr(double default_value) {
  return real("lr", default_value, at_least(0.0), "learning rate", "learning rate");
}
constexpr Hyperparameter lr() {
  return required_real("lr", at_least(0.0), "learning rate", "learning rate");
}
constexpr Hyperparameter eps(double default_value) {
  return real("eps", default_value, at_least(0.0), "epsilon value",
              "term added to the denominator for numerical stability");
}
constexpr Hyperparameter beta1(double default_value, const char* help) {
  return real("beta1", default_value, half_open(0.0, 1.0), "beta parameter at index 0", help);
}
constexpr Hyperparameter beta2(double default_value, const char* help) {
  return real("beta2", default_value, half_open(0.0, 1.0), "beta parameter at index 1", help);
}
constexpr Hyperparameter weight_decay(double default_value, const char* help) {
  return real("weight_decay", default_value, at_least(0.0), "weight_decay value", help);
}
constexpr Hyperparameter l2_weight_decay() {
  return weight_decay(0.0, "L2 penalty coefficient (added to the gradient)");
}
constexpr Hyperparameter maximize() {
  return flag("maximize", false, "ascend the objective instead of descending it");
}
}  // namespace hp

constexpr bool same_name(const char* a, const char* b) {
  while (*a != '\0' && *a == *b) {
    ++a;
    ++b;
  }
  return *a == *b;
}

// `list` with the hyperparameter `name` given another default, or fixed to `value`: for variants
// such as AdamW, which is Adam with decoupled decay fixed on and another default decay.
template <std::size_t N>
constexpr std::array<Hyperparameter, N> with_default(std::array<Hyperparameter, N> list,
                                                     const char* name, double value) {
  for (auto& h : list) {
    if (same_name(h.name, name)) h.default_value = value;
  }
  return list;
}
template <std::size_t N>
constexpr std::array<Hyperparameter, N> fixed(std::array<Hyperparameter, N> list, const char* name,
                                              double value) {
  for (auto& h : list) {
    if (same_name(h.name, name)) {
      h.kind = Kind::fixed;
      h.default_value = value;
    }
  }
  return list;
}

// One hyperparameter of a call, parsed and validated by the binding.
struct Value {
  double number = 0.0;     // a real, or a flag as 0/1
  std::int64_t count = 0;  // a step
};

// The values of one call in the order of Decl::hyperparameters, read by name. Equal string
// literals are normally one object, so addresses are compared before characters.
template <typename Decl>
class Values {
 public:
  explicit Values(const Value* values) : values_(values) {}

  double real(const char* name) const { return at(name).number; }
  // Whether a real_or_none was given (not None).
  bool given(const char* name) const { return !std::isnan(at(name).number); }
  bool flag(const char* name) const { return at(name).number != 0.0; }
  std::int64_t step(const char* name = "step") const { return at(name).count; }

 private:
  const Value& at(const char* name) const { return values_[index_of(name)]; }

  static std::size_t index_of(const char* name) {
    constexpr auto& list = Decl::hyperparameters;
    for (std::size_t i = 0; i < list.size(); ++i) {
      if (list[i].name == name) return i;
    }
    for (std::size_t i = 0; i < list.size(); ++i) {
      if (std::strcmp(list[i].name, name) == 0) return i;
    }
    std::abort();  // a kernel read a name its declaration lacks: the first test run shows it
  }

  const Value* values_;
};

// Whether a declaration has the shape the binding and the kernels rely on: the param first, the
// grad (if any) second, optional arrays after the required ones, each option the name of a
// hyperparameter, no name twice. Checked by static_assert wherever a declaration is used.
template <typename Decl>
constexpr bool well_formed() {
  constexpr auto& arrays = Decl::arrays;
  constexpr auto& hyper = Decl::hyperparameters;
  if (arrays.size() == 0 || arrays[0].part != Part::param || !arrays[0].written) return false;
  bool optional_seen = false;
  for (std::size_t i = 0; i < arrays.size(); ++i) {
    if (arrays[i].part == Part::grad && (i != 1 || arrays[i].written)) return false;
    if (i > 0 && arrays[i].part == Part::param) return false;
    if (optional_seen && !arrays[i].optional) return false;
    optional_seen = optional_seen || arrays[i].optional;
    if (arrays[i].used_when != nullptr) {
      bool found = false;
      for (const auto& h : hyper) found = found || same_name(h.name, arrays[i].used_when);
      if (!found) return false;
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (same_name(arrays[i].name, arrays[j].name)) return false;
    }
  }
  for (std::size_t i = 0; i < hyper.size(); ++i) {
    for (std::size_t j = 0; j < i; ++j) {
      if (same_name(hyper[i].name, hyper[j].name)) return false;
    }
    for (const auto& a : arrays) {
      if (same_name(hyper[i].name, a.name)) return false;
    }
  }
  return true;
}

// A kernel whose update needs reductions over whole tensors first (LAMB's norms) declares
// `static constexpr std::size_t sums`: the doubles its first pass reduces each chunk to. The
// binding adds them per tensor in chunk order, so they are bit-identical for any thread count,
// and passes each tensor's totals to the second pass, the update. 0 for one-pass kernels.
template <typename Decl, typename = void>
struct SumsOf : std::integral_constant<std::size_t, 0> {};
template <typename Decl>
struct SumsOf<Decl, std::void_t<decltype(Decl::sums)>>
    : std::integral_constant<std::size_t, Decl::sums> {};
template <typename Decl>
inline constexpr std::size_t kSums = SumsOf<Decl>::value;

// Whether role 1 is a grad, which skip_if_nonfinite scans.
template <typename Decl>
constexpr bool has_grad() {
  return Decl::arrays.size() > 1 && Decl::arrays[1].part == Part::grad;
}

// A list of declarations, for the type list of all optimizers.
template <typename... Decls>
struct List {};

template <typename... Lists>
struct Concat;
template <>
struct Concat<> {
  using type = List<>;
};
template <typename... A>
struct Concat<List<A...>> {
  using type = List<A...>;
};
template <typename... A, typename... B, typename... Rest>
struct Concat<List<A...>, List<B...>, Rest...> {
  using type = typename Concat<List<A..., B...>, Rest...>::type;
};

// A declaration's own rule across hyperparameters (Momentum's Nesterov rule): a message, or
// nullptr when the values are valid. Declarations without one inherit this.
struct NoCrossRule {
  template <typename V>
  static const char* invalid(const V&) {
    return nullptr;
  }
};

}  // namespace fusedopt
