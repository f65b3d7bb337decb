// Runs the kernels of one SIMD level (csrc/level.cpp, compiled into this program) on the inputs
// make_golden.py wrote and compares every byte with fusedopt.reference's outputs. No Python: it
// runs where only a cross compiler and an emulator are available (aarch64 under qemu-user).
// Each case runs twice: in one call over all elements, and split in two at the place two
// threads would split it; both must give the golden bits.
//
//     golden_driver DIR     (DIR/cases.txt from make_golden.py); exit status 0 iff all match
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/table.hpp"

extern "C" const fusedopt::KernelTable* fusedopt_kernel_table();

namespace {

using fusedopt::DType;
using fusedopt::Index;

struct Kernel {
  std::size_t index = 0;
  const fusedopt::ArrayDecl* arrays = nullptr;
  std::size_t roles = 0;
  const fusedopt::Hyperparameter* hyper = nullptr;
  std::size_t n_hyper = 0;
};

template <typename... Decls>
std::map<std::string, Kernel> kernels_by_name(fusedopt::List<Decls...>) {
  std::map<std::string, Kernel> found;
  std::size_t index = 0;
  ((found[Decls::name] = Kernel{index++, Decls::arrays.data(), Decls::arrays.size(),
                                Decls::hyperparameters.data(), Decls::hyperparameters.size()}),
   ...);
  return found;
}

std::size_t size_of(DType t) {
  switch (t) {
    case DType::float64: return 8;
    case DType::float32: return 4;
    default: return 2;  // bfloat16, float16
  }
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: golden_driver DIR\n";
    return 2;
  }
  const std::string dir = argv[1];
  const fusedopt::KernelTable& table = *fusedopt_kernel_table();
  const auto kernels = kernels_by_name(fusedopt::Kernels{});
  std::ifstream cases(dir + "/cases.txt");
  std::string line;
  int passed = 0, failed = 0, two_pass = 0;
  while (std::getline(cases, line)) {
    std::istringstream fields(line);
    std::string id, name;
    std::size_t row = 0, tensors = 0, roles = 0, n_values = 0;
    std::int64_t step = 0;
    fields >> id >> name >> row >> step >> tensors;
    std::vector<Index> starts{0};
    for (std::size_t t = 0; t < tensors; ++t) {
      Index n = 0;
      fields >> n;
      starts.push_back(starts.back() + n);
    }
    fields >> roles;
    std::vector<int> present(roles);
    for (int& p : present) fields >> p;
    const Kernel& kernel = kernels.at(name);
    if (roles != kernel.roles) {
      std::cerr << id << ": " << name << " has " << kernel.roles << " arrays here\n";
      return 2;
    }
    // The call's values in the declaration's order: given ones, else defaults (fixed included).
    std::vector<fusedopt::Value> values(kernel.n_hyper);
    for (std::size_t h = 0; h < kernel.n_hyper; ++h) {
      values[h].number = kernel.hyper[h].default_value;
      if (kernel.hyper[h].kind == fusedopt::Kind::step) values[h].count = step;
    }
    fields >> n_values;
    for (std::size_t v = 0; v < n_values; ++v) {
      std::string item;
      fields >> item;
      const std::size_t eq = item.find('=');
      const std::string key = item.substr(0, eq);
      std::size_t h = 0;
      while (h < kernel.n_hyper && key != kernel.hyper[h].name) ++h;
      if (h == kernel.n_hyper) {
        std::cerr << id << ": " << name << " has no hyperparameter " << key << "\n";
        return 2;
      }
      values[h].number = std::strtod(item.c_str() + eq + 1, nullptr);
    }
    const fusedopt::StorageRow storage = fusedopt::kStorageRows[row];
    const std::vector<char> input = read_file(dir + "/" + id + ".in");
    const std::vector<char> golden = read_file(dir + "/" + id + ".out");
    const fusedopt::RoundingRequest request{false, 0, static_cast<std::uint64_t>(step)};
    if (table.reduce[kernel.index][row] != nullptr) {
      // a two-pass kernel (LAMB): its per-tensor sums are added by the binding, which this
      // driver does not link; the suite checks it on x86 at every level
      ++two_pass;
      continue;
    }
    bool ok = input.size() == golden.size();
    for (int split = 0; split < 2 && ok; ++split) {
      std::vector<char> data = input;
      std::vector<void*> pointers(tensors * roles, nullptr);
      std::size_t offset = 0;
      for (std::size_t t = 0; t < tensors; ++t) {
        for (std::size_t r = 0; r < roles; ++r) {
          if (!present[r]) continue;
          pointers[t * roles + r] = data.data() + offset;
          offset += static_cast<std::size_t>(starts[t + 1] - starts[t]) *
                    size_of(storage.of(kernel.arrays[r].part));
        }
      }
      if (offset != data.size()) {
        std::cerr << id << ": " << data.size() << " bytes in " << id << ".in, expected " << offset
                  << "\n";
        return 2;
      }
      const fusedopt::TensorSet set{pointers.data(), starts.data(), tensors, roles};
      const fusedopt::UpdateFn update = table.update[kernel.index][row];
      if (split == 0) {
        update(values.data(), request, set, nullptr, 0, set.total(), nullptr);
      } else {  // as two threads would: each from its chunk-aligned start
        const Index middle = fusedopt::thread_begin(set, 1, 2);
        update(values.data(), request, set, nullptr, 0, middle, nullptr);
        update(values.data(), request, set, nullptr, middle, set.total(), nullptr);
      }
      if (data != golden) {
        std::size_t at = 0;
        while (data[at] == golden[at]) ++at;
        std::cerr << id << " " << name << " row " << row << (split ? " (split)" : "")
                  << ": first differing byte at " << at << "\n";
        ok = false;
      }
    }
    (ok ? passed : failed) += 1;
  }
  std::printf(
      "level %s (%s): %d cases bit-identical to fusedopt.reference, %d differ "
      "(%d of two-pass kernels not run)\n",
      table.level, table.instructions, passed, failed, two_pass);
  return failed == 0 && passed > 0 ? 0 : 1;
}
