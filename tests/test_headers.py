"""The per-element headers in csrc/include/fusedwd/ compile for the device too.

The CPU tests exercise their math; this compiles a tiny CUDA kernel that runs
every rule of csrc/include/fusedwd/rules.h, every switch combination, through
the device load/store of each dtype (fp16 and bf16 through cuda_fp16 /
cuda_bf16), so a host-only construct in a header fails here and not later in
the CUDA extension.
"""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "csrc" / "include"


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [pathlib.Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    found = shutil.which("nvcc")
    candidates += [pathlib.Path(found)] if found else []
    candidates += sorted(pathlib.Path("/usr/local").glob("cuda*/bin/nvcc"), reverse=True)
    return next((str(c) for c in candidates if c.is_file()), None)


KERNEL = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fusedwd/common.h"
#include "fusedwd/layout.h"
#include "fusedwd/partition.h"
#include "fusedwd/precision.h"
#include "fusedwd/quant.h"
#include "fusedwd/rules.h"

using namespace fusedwd;

// One rule's helpers (csrc/include/fusedwd/rule.h) on the device, every element through the
// device load/store of its dtype.
template <DType D, class Rule>
__global__ void one_rule(storage_t<D>* p, const storage_t<D>* g, storage_t<D>* s0, storage_t<D>* s1,
                         storage_t<D>* s2, const int64_t* offs, int64_t nseg, const double* hp, double t) {
  using M = math_t<D>;
  const int64_t begin = worker_begin(offs, nseg, blockIdx.x, gridDim.x);
  const int64_t end = worker_begin(offs, nseg, blockIdx.x + 1, gridDim.x);
  const typename Rule::Scalars sc = Rule::scalars(hp, t, 1.0);
  if constexpr (kSumsOf<Rule> > 0) {
    // a two-phase rule: phase 1's helpers, the per-segment scalars from sums, phase 2's
    double sums[kSumsOf<Rule>] = {};
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      M pi = Rule::moments_read_p(sc) ? load<D>(p, i) : M(0);
      M gi = load<D>(g, i);
      M x = load<D>(s0, i), y = load<D>(s1, i), z = load<D>(s2, i);
      Rule::moments(pi, gi, x, y, z, sc);
      double out[kSumsOf<Rule>];
      Rule::terms(pi, gi, as_stored<D>(x), as_stored<D>(y), as_stored<D>(z), sc, out);
      for (int j = 0; j < kSumsOf<Rule>; ++j) sums[j] += out[j];
      store<D>(s0, i, x);
      store<D>(s1, i, y);
    }
    const typename Rule::Apply ap = Rule::apply_scalars(hp, t, 1.0, sums, end - begin);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      M pi = load<D>(p, i);
      Rule::apply(pi, load<D>(s0, i), load<D>(s1, i), load<D>(s2, i), ap);
      store<D>(p, i, pi);
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      M pi = load<D>(p, i);
      M x = load<D>(s0, i), y = load<D>(s1, i), z = load<D>(s2, i);
      Rule::update(pi, load<D>(g, i), x, y, z, sc);
      store<D>(p, i, pi);
      store<D>(s0, i, x);
      store<D>(s1, i, y);
      store<D>(s2, i, z);
    }
  }
}

// Every rule of rules.h with every switch combination it selects (host code: compiled, never run).
template <DType D>
void all_rules(storage_t<D>* p, const storage_t<D>* g, storage_t<D>* s0, storage_t<D>* s1,
               storage_t<D>* s2, const int64_t* offs, int64_t nseg, const double* hp, double t) {
  for (int id = 0; id < static_cast<int>(RuleId::kCount); ++id) {
    with_rule(id, [&](auto r) {
      for (unsigned bits = 0; bits < 8u; ++bits) {
        decltype(r)::template with_switches<D>(bits, [&](auto rule) {
          one_rule<D, decltype(rule)><<<1, 32>>>(p, g, s0, s1, s2, offs, nseg, hp, t);
        });
      }
    });
  }
}

// fp16 / bf16 tensors arrive as __half / __nv_bfloat16; the headers store their bits.
__global__ void half_bits(__half* h, __nv_bfloat16* b) {
  uint16_t* hb = reinterpret_cast<uint16_t*>(h);  // same 16 bits, no conversion
  uint16_t* bb = reinterpret_cast<uint16_t*>(b);  // same 16 bits, no conversion
  store<DType::F16>(hb, 0, load<DType::F16>(hb, 0) * 2.0f);
  store<DType::BF16>(bb, 0, load<DType::BF16>(bb, 0) * 2.0f);
}

template void all_rules<DType::F32>(float*, const float*, float*, float*, float*, const int64_t*, int64_t,
                                    const double*, double);
template void all_rules<DType::F16>(uint16_t*, const uint16_t*, uint16_t*, uint16_t*, uint16_t*, const int64_t*,
                                    int64_t, const double*, double);
template void all_rules<DType::BF16>(uint16_t*, const uint16_t*, uint16_t*, uint16_t*, uint16_t*, const int64_t*,
                                     int64_t, const double*, double);
template void all_rules<DType::F64>(double*, const double*, double*, double*, double*, const int64_t*, int64_t,
                                    const double*, double);
"""


def test_headers_compile_with_nvcc(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    source = tmp_path / "headers.cu"
    source.write_text(KERNEL)
    obj = tmp_path / "headers.o"
    cmd = [nvcc, "-x", "cu", "-std=c++17", "-arch=sm_80", "-Werror", "all-warnings",
           f"-I{INCLUDE}", "-c", str(source), "-o", str(obj)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert obj.stat().st_size > 0
