// Runtime choice of the CPU ISA variant. Compiled with baseline flags: it only
// reads CPU features and forwards to the variant tables.
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "fusedwd/layout.h"
#include "kernels.h"

namespace fusedwd {
namespace cpu {

extern const Kernels baseline_kernels;
#if defined(FUSEDWD_HAVE_AVX2)
extern const Kernels avx2_kernels;
#endif
#if defined(FUSEDWD_HAVE_AVX512)
extern const Kernels avx512_kernels;
#endif

namespace {

bool cpu_has_avx2() {
#if defined(FUSEDWD_HAVE_AVX2)
  // __builtin_cpu_supports also checks that the OS saves the YMM state
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(FUSEDWD_HAVE_AVX512)
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// Runnable variants, slowest first.
std::vector<const Kernels*> runnable() {
  std::vector<const Kernels*> out{&baseline_kernels};
#if defined(FUSEDWD_HAVE_AVX2)
  if (cpu_has_avx2()) out.push_back(&avx2_kernels);
#endif
#if defined(FUSEDWD_HAVE_AVX512)
  if (cpu_has_avx512()) out.push_back(&avx512_kernels);
#endif
  return out;
}

const Kernels* find(const std::string& name) {
  for (const Kernels* k : runnable()) {
    if (name == k->name) return k;
  }
  return nullptr;
}

const Kernels* initial() {
  const char* env = std::getenv("FUSEDWD_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    const Kernels* k = find(env);
    if (k == nullptr) {
      throw std::invalid_argument(std::string("FUSEDWD_CPU_ISA=") + env +
                                  " is not a variant runnable on this CPU");
    }
    return k;
  }
  return runnable().back();
}

// set under the GIL (import, set_isa), read by passes that released it
std::atomic<const Kernels*> g_active{nullptr};

}  // namespace

const Kernels& active() {
  const Kernels* k = g_active.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = initial();
    g_active.store(k, std::memory_order_release);
  }
  return *k;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Kernels* k : runnable()) names.emplace_back(k->name);
  return names;
}

void set_isa(const std::string& name) {
  const Kernels* k = find(name);
  if (k == nullptr) {
    throw std::invalid_argument("unknown or unsupported CPU ISA variant: '" + name + "'");
  }
  g_active.store(k, std::memory_order_release);
}

std::vector<int64_t> segment_offsets(const int64_t* table, int64_t nseg, int64_t unit) {
  std::vector<int64_t> offs(static_cast<size_t>(nseg) + 1);
  offs[0] = 0;
  for (int64_t s = 0; s < nseg; ++s) offs[s + 1] = offs[s] + (table[s * SEG_COLS + SEG_N] + unit - 1) / unit;
  return offs;
}

}  // namespace cpu
}  // namespace fusedwd
