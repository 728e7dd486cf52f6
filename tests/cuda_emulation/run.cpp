// Runs csrc/cuda/step.cuh's kernel on the host (cuda_runtime.h beside this file
// emulates the CUDA features it uses). Built as a shared library that
// tests/test_cuda_ext.py loads with ctypes; it exports two functions:
//
// fusedwd_emulation_self_check() checks, bit for bit, that a launch does what
// the shared helpers applied in order do: every element of every segment
// updated once with its own segment's scalars, every step count advanced once,
// the arrival counter left at zero. Aligned and misaligned buffers, empty
// segments, two table tiles, grids of 1 and 3. Prints one line per case and
// returns the number of differences.
//
// fusedwd_emulated_step() is one launch of the kernel the .cu files would
// launch for a rule, its switches and a storage layout (precision.h
// with_layout, or step.cuh with_q8_layout for 8-bit states), over a caller's
// table in host memory: the test runs it beside fusedwd._C on the same tables
// and compares every buffer bit for bit.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda/phases.cuh"

using namespace fusedwd;
using namespace fusedwd::cuda_kernels;

namespace {

// kCudaThreads threads that run the blocks of a launch one after another.
class Block {
 public:
  Block() : block_(kCudaThreads), start_(kCudaThreads + 1), done_(kCudaThreads + 1) {
    emulation::block_barrier = &block_;
    for (int w = 0; w < emulation::kWarpsPerBlock; ++w) {
      warps_.push_back(std::make_unique<std::barrier<>>(32));
      emulation::warp_barriers[w] = warps_.back().get();
    }
    for (unsigned t = 0; t < kCudaThreads; ++t) {
      threads_.emplace_back([this, t] {
        threadIdx.x = t;
        for (;;) {
          start_.arrive_and_wait();
          if (stop_) return;
          job_();
          done_.arrive_and_wait();
        }
      });
    }
  }

  ~Block() {
    stop_ = true;
    start_.arrive_and_wait();
    for (std::thread& t : threads_) t.join();
  }

  void run(const std::function<void()>& job) {
    job_ = job;
    start_.arrive_and_wait();
    done_.arrive_and_wait();
  }

 private:
  std::barrier<> block_, start_, done_;
  std::vector<std::unique_ptr<std::barrier<>>> warps_;
  std::vector<std::thread> threads_;
  std::function<void()> job_;
  bool stop_ = false;  // written before start_, read after it
};

Block* g_block = nullptr;

// One launch of layout L's kernel for the rule with this id and switch bits.
template <class L, bool Q8 = false>
void launch(int rule, unsigned switches, const int64_t* table, int64_t nseg, const double* hyper,
            unsigned* arrivals, unsigned grid, const float* ctl = nullptr, uint64_t seed = 0) {
  gridDim.x = grid;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    g_block->run([=] { step_kernel<L, Q8>(table, nseg, hyper, arrivals, ctl, seed, rule, switches); });
  }
}

// One launch of layout L's two-phase kernel, phase `phase`, for the rule with this id.
template <class L>
void launch_phase(int rule, unsigned switches, const int64_t* table, int64_t nseg, const double* hyper,
                  unsigned* arrivals, unsigned grid, const float* ctl, uint64_t seed, int phase, double* sums,
                  void* scratch) {
  gridDim.x = grid;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    g_block->run([=] {
      phases_kernel<L>(table, nseg, hyper, arrivals, ctl, seed, rule, switches, phase, sums, scratch);
    });
  }
}

// "lr, beta1" -> {"lr", "beta1"}
std::vector<std::string> split_names(const char* names) {
  std::vector<std::string> out;
  std::string current;
  for (const char* c = names; *c != '\0'; ++c) {
    if (*c == ',') {
      out.push_back(current);
      current.clear();
    } else if (*c != ' ') {
      current += *c;
    }
  }
  if (!current.empty()) out.push_back(current);
  return out;
}

// Two hyper rows of rule R: non-default numbers by column name, the second maximizing
// with coupled L2.
template <class R>
std::vector<double> hyper_rows() {
  const std::map<std::string, std::pair<double, double>> values = {
      {"lr", {3e-3, 1e-2}},         {"beta1", {0.8, 0.9}},        {"beta2", {0.95, 0.999}},
      {"eps", {1e-6, 1e-8}},        {"decay_mult", {0.9997, 1.0}}, {"l2", {0.0, 0.05}},
      {"grad_sign", {1.0, -1.0}},   {"momentum", {0.9, 0.8}},      {"dampening", {0.1, 0.0}},
      {"alpha", {0.9, 0.99}},
  };
  const std::vector<std::string> names = split_names(R::Col::names());
  std::vector<double> rows(2 * names.size());
  for (size_t c = 0; c < names.size(); ++c) {
    const auto found = values.find(names[c]);
    if (found == values.end()) {
      std::printf("no test value for column '%s' of %s\n", names[c].c_str(), R::kName);
      std::abort();
    }
    rows[c] = found->second.first;
    rows[names.size() + c] = found->second.second;
  }
  return rows;
}

// bits: the switch bits that select Rule (R::with_switches).
template <DType D, class R, class Rule>
int check(const char* name, unsigned bits, const std::vector<int64_t>& sizes, unsigned grid, bool misaligned) {
  using L = Layout<D, D, false, false>;
  using T = storage_t<D>;
  using M = math_t<D>;
  constexpr int kBuffers = 5;  // p, g, S0, S1, S2
  const int64_t nseg = static_cast<int64_t>(sizes.size());
  std::mt19937_64 rng(static_cast<uint64_t>(nseg * 131 + grid * 7 + misaligned));
  std::normal_distribution<double> normal;
  // each buffer its own allocation, used from a 16-byte boundary (+1 element when misaligned)
  std::vector<std::vector<T>> got(nseg * kBuffers);
  std::vector<int64_t> first(nseg * kBuffers);
  std::vector<float> steps(nseg);
  for (int64_t s = 0; s < nseg; ++s) {
    for (int k = 0; k < kBuffers; ++k) {
      std::vector<T>& v = got[s * kBuffers + k];
      v.resize(sizes[s] + 16);
      for (T& x : v) {
        // second moments positive; grad_avg small enough that square_avg - grad_avg^2 > 0
        const double r = normal(rng);
        const double value = k == 2 || k == 4 ? std::fabs(r) + 1.0 : (k == 3 ? 0.1 * r : r);
        store<D>(&x, 0, static_cast<M>(value));
      }
      int64_t i = 0;
      while (reinterpret_cast<uintptr_t>(v.data() + i) % kCudaVectorBytes != 0) ++i;
      first[s * kBuffers + k] = i + (misaligned ? 1 : 0);
    }
    steps[s] = static_cast<float>(rng() % 4);
  }
  std::vector<std::vector<T>> want = got;
  std::vector<float> want_steps = steps;
  const bool used[kBuffers] = {true, true, Rule::kS0, Rule::kS1, Rule::kS2};
  const int columns[kBuffers] = {SEG_P, SEG_G, SEG_S0, SEG_S1, SEG_S2};
  std::vector<int64_t> table(nseg * SEG_COLS, 0);
  for (int64_t s = 0; s < nseg; ++s) {
    int64_t* row = &table[s * SEG_COLS];
    for (int k = 0; k < kBuffers; ++k) {
      T* base = got[s * kBuffers + k].data() + first[s * kBuffers + k];
      row[columns[k]] = used[k] ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(base)) : 0;
    }
    row[SEG_STEP] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(&steps[s]));
    row[SEG_N] = sizes[s];
    row[SEG_HP] = s % 2;
    row[SEG_INDEX] = s;
  }
  const std::vector<double> hyper = hyper_rows<R>();
  unsigned arrivals = 0;
  int failures = 0;
  for (int step = 0; step < 2; ++step) {
    launch<L>(rule_id<R>(), bits, table.data(), nseg, hyper.data(), &arrivals, grid);
    for (int64_t s = 0; s < nseg; ++s) {
      const auto sc = Rule::scalars(&hyper[(s % 2) * Rule::kHpCols], double(want_steps[s]) + 1.0, 1.0);
      T* b[kBuffers];
      for (int k = 0; k < kBuffers; ++k) b[k] = want[s * kBuffers + k].data() + first[s * kBuffers + k];
      for (int64_t i = 0; i < sizes[s]; ++i) {
        M p = load<D>(b[0], i), x = load<D>(b[2], i), y = load<D>(b[3], i), z = load<D>(b[4], i);
        Rule::update(p, load<D>(b[1], i), x, y, z, sc);
        store<D>(b[0], i, p);
        if (Rule::kS0) store<D>(b[2], i, x);
        if (Rule::kS1) store<D>(b[3], i, y);
        if (Rule::kS2) store<D>(b[4], i, z);
      }
      want_steps[s] += 1.0f;
    }
    for (size_t k = 0; k < got.size(); ++k) {
      if (std::memcmp(got[k].data(), want[k].data(), got[k].size() * sizeof(T)) != 0) {
        if (failures < 3) std::printf("  launch %d: segment %zu buffer %zu differs\n", step, k / kBuffers, k % kBuffers);
        ++failures;
      }
    }
    if (steps != want_steps) ++failures;
    if (arrivals != 0) ++failures;
  }
  std::printf("%-28s %4lld segments, grid %u, %s: %s\n", name, static_cast<long long>(nseg), grid,
              misaligned ? "misaligned" : "aligned", failures ? "FAIL" : "ok");
  return failures;
}

// Runtime rule id (csrc/include/fusedwd/rules.h) and switch bits -> one launch of layout L's
// kernel, which picks the rule's path itself (the rule is checked first, as the bindings do).
template <class L, bool Q8>
int launch_rule(int rule, unsigned switches, const int64_t* table, int64_t nseg, const double* hyper,
                unsigned* arrivals, unsigned grid, const float* ctl, uint64_t seed) {
  bool two_phase = false;
  const bool known = with_rule(rule, [&](auto r) { two_phase = kSumsOf<decltype(r)> > 0; });
  if (!known) return -1;
  if (two_phase) return -3;  // no CUDA kernel for a two-phase rule yet
  launch<L, Q8>(rule, switches, table, nseg, hyper, arrivals, grid, ctl, seed);
  return 0;
}

}  // namespace

// One launch over `table` (host addresses); returns 0, -1 for an unknown rule,
// -2 for a layout the kernels do not instantiate, -3 for a two-phase rule (no CUDA kernel yet). quantized: 8-bit states
// (state_dtype is then ignored).
extern "C" int fusedwd_emulated_step(int rule, unsigned switches, const int64_t* table,
                                     int64_t nseg, const double* hyper, int dtype,
                                     int state_dtype, int master, int stochastic,
                                     const float* ctl, uint64_t seed, unsigned grid,
                                     unsigned* arrivals, int quantized) {
  if (quantized ? !q8_layout_supported(dtype, master, stochastic)
                : !layout_supported(dtype, state_dtype, master, stochastic)) {
    return -2;
  }
  if (rule < 0 || rule >= static_cast<int>(RuleId::kCount)) return -1;
  if (nseg == 0) return 0;
  Block block;
  g_block = &block;
  const int result =
      quantized ? with_q8_layout(dtype, master != 0, stochastic != 0, [&](auto layout) {
        return launch_rule<decltype(layout), true>(rule, switches, table, nseg, hyper, arrivals, grid,
                                                   ctl, seed);
      })
                : with_layout(dtype, state_dtype, master != 0, stochastic != 0, [&](auto layout) {
                    return launch_rule<decltype(layout), false>(rule, switches, table, nseg, hyper,
                                                                arrivals, grid, ctl, seed);
                  });
  g_block = nullptr;
  return result;
}

// One step of a two-phase rule over `table` (host addresses), as the .cu files launch it: phase 1
// then phase 2 (phases 3), or one of them; sums: float64 [nseg, sums] or nullptr (in the scratch);
// scratch: two_phase_scratch_bytes; arrivals: 1 + nseg zero words. Returns 0, -1 for an unknown rule, -2 for a
// layout without a kernel, -3 for an elementwise rule.
extern "C" int fusedwd_emulated_phases(int rule, unsigned switches, const int64_t* table, int64_t nseg,
                                       const double* hyper, int dtype, int state_dtype, int master,
                                       int stochastic, const float* ctl, uint64_t seed, unsigned grid,
                                       unsigned* arrivals, int phases, double* sums, void* scratch) {
  if (!layout_supported(dtype, state_dtype, master, stochastic)) return -2;
  bool two_phase = false;
  if (!with_rule(rule, [&](auto r) { two_phase = kSumsOf<decltype(r)> > 0; })) return -1;
  if (!two_phase) return -3;
  if (nseg == 0) return 0;
  Block block;
  g_block = &block;
  with_layout(dtype, state_dtype, master != 0, stochastic != 0, [&](auto layout) {
    for (int phase = 1; phase <= 2; ++phase) {
      if (phases & phase) {
        launch_phase<decltype(layout)>(rule, switches, table, nseg, hyper, arrivals, grid, ctl, seed, phase, sums,
                                       scratch);
      }
    }
    return 0;
  });
  g_block = nullptr;
  return 0;
}

template <DType D, class R>
int check_rule(const std::string& name, unsigned bits, const std::vector<int64_t>& sizes, unsigned grid,
               bool misaligned) {
  return R::template with_switches<D>(bits, [&](auto rule) {
    return check<D, R, decltype(rule)>(name.c_str(), bits, sizes, grid, misaligned);
  });
}

extern "C" int fusedwd_emulation_self_check() {
  Block block;
  g_block = &block;
  const std::vector<int64_t> mixed = {1, 4097, 0, 64, 63, 3000, 1000, 129, 0, 5, 2048, 2049};
  std::vector<int64_t> many;  // 300 segments: two table tiles, most of them tiny or empty
  for (int i = 0; i < 300; ++i) many.push_back(i % 7 == 0 ? 0 : (i * 37) % 90 + (i % 97 == 0 ? 5000 : 0));
  const std::pair<const std::vector<int64_t>*, unsigned> cases[] = {{&mixed, 1}, {&mixed, 3}, {&many, 3}};
  int failures = 0;
  for (const auto& [sizes, grid] : cases) {
    for (bool misaligned : {false, true}) {
      // every rule and switch combination, in a dtype that varies with them
      for (int id = 0; id < static_cast<int>(RuleId::kCount); ++id) {
        with_rule(id, [&](auto r) {
          using R = decltype(r);
          if constexpr (kSumsOf<R> == 0)  // a two-phase rule has no CUDA kernel yet
          for (unsigned bits = 0; bits < (1u << split_names(R::kSwitchNames).size()); ++bits) {
            const std::string name = std::string(R::kName) + " switches " + std::to_string(bits);
            switch ((id + bits) % 4) {
              case 0: failures += check_rule<DType::F32, R>(name, bits, *sizes, grid, misaligned); break;
              case 1: failures += check_rule<DType::BF16, R>(name + " bf16", bits, *sizes, grid, misaligned); break;
              case 2: failures += check_rule<DType::F16, R>(name + " f16", bits, *sizes, grid, misaligned); break;
              default: failures += check_rule<DType::F64, R>(name + " f64", bits, *sizes, grid, misaligned);
            }
          }
        });
      }
    }
  }
  std::printf(failures ? "FAILED\n" : "ALL OK\n");
  std::fflush(stdout);  // the test reads it from the file descriptor
  g_block = nullptr;
  return failures;
}
