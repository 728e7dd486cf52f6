// fusedwd._C: the CPU kernels behind a pybind11 module.
//
// No libtorch linkage: tensors arrive as raw addresses (Python ints) of the
// segment and hyperparameter tables built by fusedwd/_buckets.py. One entry
// point, step(rule, ...), runs every rule of csrc/include/fusedwd/rules.h; the
// gradient gathering is in csrc/gather.cpp.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"
#include "fusedwd/common.h"
#include "fusedwd/layout.h"
#include "fusedwd/partition.h"
#include "fusedwd/precision.h"
#include "fusedwd/quant.h"
#include "gather.h"
#include "layout_bindings.h"

namespace py = pybind11;

namespace fusedwd {
namespace {

void check_step_args(int64_t nseg, int dtype, int num_threads) {
  if (nseg < 0) throw py::value_error("nseg must be >= 0, got " + std::to_string(nseg));
  if (dtype < static_cast<int>(DType::F32) || dtype > static_cast<int>(DType::F64)) {
    throw py::value_error("dtype must be one of DTYPES' values, got " + std::to_string(dtype));
  }
  if (num_threads < 1) {
    throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
  }
}

// The precision options of a step: how p, its master copy and the states are stored.
struct Precision {
  int state_dtype;   // -1: the parameter's dtype
  bool master;       // fp32 master copy at SEG_MASTER
  bool stochastic;   // stochastic rounding of bf16 p
  uintptr_t ctl;     // address of the float32 control block (layout.h Ctl), or 0
  uint64_t seed;     // stochastic rounding seed
  bool quantized;    // 8-bit blockwise states (quant.h); state_dtype is then ignored
  uintptr_t sums;    // two-phase rules: address of float64 [nseg, sums], or 0 (scratch)
  int phases;        // two-phase rules: 3 both phases, 1 phase 1 only, 2 phase 2 only
};

// One step of a rule over the bucket, with the GIL released.
void step(const std::string& name, uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype,
          const std::vector<bool>& switches, int num_threads, const Precision& pr) {
  const RuleInfo rule = find_rule(name);
  const unsigned bits = switch_bits(rule, name, switches);
  check_step_args(nseg, dtype, num_threads);
  const int state_dtype = pr.state_dtype < 0 ? dtype : pr.state_dtype;
  if (pr.quantized) {
    check_q8_layout(dtype, pr.master, pr.stochastic);
  } else {
    check_layout(dtype, state_dtype, pr.master, pr.stochastic);
  }
  if (rule.sums > 0) {
    if (pr.quantized) {
      throw py::value_error("rule '" + name + "' does not take 8-bit states (quantized=True): its per-tensor "
                            "sums are not implemented on decoded codes");
    }
    if (pr.phases < 1 || pr.phases > 3) throw py::value_error("phases must be 1, 2 or 3, got " + std::to_string(pr.phases));
    if (pr.phases != 3 && pr.sums == 0) {
      throw py::value_error("phases=" + std::to_string(pr.phases) + " takes the sums buffer (sums=address)");
    }
  } else if (pr.sums != 0 || pr.phases != 3) {
    throw py::value_error("rule '" + name + "' is elementwise: it takes no sums and no phases");
  }
  if (nseg == 0) return;
  py::gil_scoped_release release;
  // the tables are int64 / float64 tensors owned by the caller, passed by address
  const int64_t* rows = reinterpret_cast<const int64_t*>(table);
  // 8-bit states split the work between threads by whole blocks
  const std::vector<int64_t> offs = cpu::segment_offsets(rows, nseg, pr.quantized ? kQuantBlock : 1);
  cpu::StepArgs args{rows, nseg, reinterpret_cast<const double*>(hyper), offs.data(),
                     dtype, num_threads, state_dtype, pr.master, pr.stochastic,
                     reinterpret_cast<const float*>(pr.ctl), pr.seed, pr.quantized};
  std::vector<int64_t> chunk_offs;
  std::vector<double> own_sums;
  if (rule.sums > 0) {
    // the chunks' sums: scratch kept by the calling thread, so a step allocates nothing
    // once the largest bucket has been stepped
    thread_local std::vector<double> partials;
    chunk_offs = cpu::segment_offsets(rows, nseg, cpu::kSumChunk);
    const size_t need = static_cast<size_t>(chunk_offs.back()) * rule.sums;
    if (partials.size() < need) partials.resize(need);
    if (pr.sums == 0) own_sums.resize(static_cast<size_t>(nseg) * rule.sums);
    args.phases = pr.phases;
    args.sums = pr.sums != 0 ? reinterpret_cast<double*>(pr.sums) : own_sums.data();
    args.partials = partials.data();
    args.chunk_offs = chunk_offs.data();
  }
  cpu::active().step(rule.id, args, bits);
}

// max_grad_norm's read pass: the sum of squares of the gradients of nseg segments.
double grad_sumsq(uintptr_t table, int64_t nseg, int dtype, int num_threads) {
  check_step_args(nseg, dtype, num_threads);
  if (nseg == 0) return 0.0;
  py::gil_scoped_release release;
  const int64_t* rows = reinterpret_cast<const int64_t*>(table);
  const std::vector<int64_t> offs = cpu::segment_offsets(rows, nseg);
  const cpu::StepArgs args{rows, nseg, nullptr, offs.data(), dtype, num_threads, dtype, false, false,
                           nullptr, 0, false};
  return cpu::active().sumsq(args);
}

void traffic_pass(const std::vector<uintptr_t>& reads, const std::vector<uintptr_t>& writes,
                  int64_t n, int elem_size, int num_threads) {
  if (n < 0) throw py::value_error("n must be >= 0");
  if (elem_size != 4 && elem_size != 2) throw py::value_error("elem_size must be 4 or 2");
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
  if (reads.size() > cpu::kMaxTrafficBuffers || writes.size() > cpu::kMaxTrafficBuffers) {
    throw py::value_error("traffic_pass takes at most " +
                          std::to_string(cpu::kMaxTrafficBuffers) + " read and write buffers");
  }
  if (n == 0) return;
  py::gil_scoped_release release;
  const cpu::TrafficArgs args{reads.data(),  static_cast<int64_t>(reads.size()),
                              writes.data(), static_cast<int64_t>(writes.size()),
                              n,             elem_size,
                              num_threads};
  cpu::active().traffic(args);
}

// Per worker: (begin, end, first_segment, offset_in_first_segment); begin/end
// are global element indices, first_segment is -1 for an empty range.
std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> thread_ranges(
    const std::vector<int64_t>& sizes, int num_threads) {
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
  const int64_t nseg = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> offs(sizes.size() + 1, 0);
  for (int64_t s = 0; s < nseg; ++s) {
    if (sizes[s] < 0) throw py::value_error("sizes must be >= 0");
    offs[s + 1] = offs[s] + sizes[s];
  }
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> out;
  for (int64_t k = 0; k < num_threads; ++k) {
    const int64_t begin = worker_begin(offs.data(), nseg, k, num_threads);
    const int64_t end = worker_begin(offs.data(), nseg, k + 1, num_threads);
    const int64_t first = begin < end ? segment_of(offs.data(), nseg, begin) : -1;
    out.emplace_back(begin, end, first, first < 0 ? 0 : begin - offs[first]);
  }
  return out;
}

}  // namespace
}  // namespace fusedwd

PYBIND11_MODULE(_C, m) {
  using namespace fusedwd;
  m.doc() = "fusedwd CPU kernels over segment tables (see docs/design.md)";

  // pick the ISA variant now, so a bad FUSEDWD_CPU_ISA fails the import loudly
  try {
    cpu::active();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }

  export_layout(m);
  export_gather(m);

  m.def(
      "step",
      [](const std::string& rule, uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype,
         const std::vector<bool>& switches, int num_threads, int state_dtype, bool master,
         bool stochastic_rounding, uintptr_t ctl, uint64_t seed, bool quantized, uintptr_t sums, int phases) {
        step(rule, table, nseg, hyper, dtype, switches, num_threads,
             {state_dtype, master, stochastic_rounding, ctl, seed, quantized, sums, phases});
      },
      py::arg("rule"), py::arg("table"), py::arg("nseg"), py::arg("hyper"), py::arg("dtype"),
      py::arg("switches"), py::arg("num_threads"), py::kw_only(), py::arg("state_dtype") = -1,
      py::arg("master") = false, py::arg("stochastic_rounding") = false, py::arg("ctl") = 0,
      py::arg("seed") = 0, py::arg("quantized") = false, py::arg("sums") = 0, py::arg("phases") = 3,
      "One step of `rule` (a name of RULES) over nseg segments: addresses of the int64 segment\n"
      "table and the float64 hyper table (the rule's columns), the dtype code of p and g, the\n"
      "rule's switches (one bool each, RULES[rule]['switches']) and the thread count; advances\n"
      "every segment's step count by one. state_dtype (-1: dtype), master (fp32 master copies\n"
      "at SEG_MASTER), stochastic_rounding (bf16 params), ctl (address of the float32 control\n"
      "block: 1/grad_scale, found_inf, clip coefficient; a nonzero found_inf skips the step,\n"
      "step counts included), seed, and quantized (8-bit blockwise states: S0..S2 hold uint8\n"
      "codes, SEG_A0..SEG_A2 fp32 absmax). A two-phase rule (RULES[rule]['sums'] > 0) also takes\n"
      "sums (address of a float64 [nseg, sums] buffer: each segment's sums, written by phase 1 and\n"
      "read by phase 2; 0: scratch) and phases (3: both, in one parallel region; 1: phase 1\n"
      "only, the step counts unchanged; 2: phase 2 only, from the sums buffer).");

  m.def(
      "isa", [] { return std::string(cpu::active().name); },
      "Name of the CPU ISA variant in use.");
  m.def("supported_isas", &cpu::supported_isas,
        "ISA variants built into this module and runnable on this CPU, slowest first.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        try {
          cpu::set_isa(name);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
      },
      py::arg("name"), "Selects the CPU ISA variant by name (for tests and benchmarks).");

  m.def(
      "q_level_errors",
      [](bool is_signed, const std::vector<float>& thresholds) {
        const size_t levels = is_signed ? kSignedLevels : kUnsignedLevels;
        if (thresholds.size() != levels) {
          throw py::value_error("q_level_errors: thresholds must hold " + std::to_string(levels) +
                                " values (K of the code), got " + std::to_string(thresholds.size()));
        }
        for (size_t j = 0; j < levels; ++j) {
          const bool ok = thresholds[j] > 0.0f && thresholds[j] <= 1.0f &&
                          (j == 0 || thresholds[j] > thresholds[j - 1]);
          if (!ok) throw py::value_error("q_level_errors: thresholds must increase within (0, 1]");
        }
        uint32_t first = 0;
        int64_t errors = 0;
        {
          py::gil_scoped_release release;
          errors = cpu::active().q_level_errors(is_signed, thresholds.data(), &first);
        }
        return std::make_tuple(errors, first);
      },
      py::arg("signed"), py::arg("thresholds"),
      "For the tests: (count, bit pattern of the first) of the float32 y in [0, 1] that the\n"
      "active ISA variant's 8-bit encode (quant.h q_level) codes differently from the number\n"
      "of the given thresholds (fusedwd.quant.thresholds) y reaches; every such y is tried.");
  m.def(
      "convert_f16",
      [](uintptr_t src, uintptr_t dst, int64_t n, bool to_half) {
        if (n < 0) throw py::value_error("convert_f16: n must be >= 0");
        py::gil_scoped_release release;
        // raw addresses of caller-owned buffers of n elements
        if (to_half) {
          cpu::active().f32_to_f16(reinterpret_cast<const float*>(src), reinterpret_cast<uint16_t*>(dst), n);
        } else {
          cpu::active().f16_to_f32(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<float*>(dst), n);
        }
      },
      py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("to_half"),
      "For the tests: n fp16 values (bits) to float32 at dst, or n float32 to fp16 bits\n"
      "(to_half), by the active ISA variant's conversions as its loops run them.");
  m.def("grad_sumsq", &grad_sumsq, py::arg("table"), py::arg("nseg"), py::arg("dtype"),
        py::arg("num_threads"),
        "Sum of squares (in double) of the gradients of nseg segments of a segment table: the\n"
        "one read pass of max_grad_norm. Threads' sums are added in thread order.");
  m.def("traffic_pass", &traffic_pass, py::arg("read_addrs"), py::arg("write_addrs"),
        py::arg("n"), py::arg("elem_size"), py::arg("num_threads"),
        "The memory-traffic floor: one parallel pass reading n elements of every read\n"
        "buffer and writing n elements of every write buffer.");
  m.def("thread_ranges", &thread_ranges, py::arg("sizes"), py::arg("num_threads"),
        "The partition of the concatenated segments between num_threads workers: per\n"
        "worker (begin, end, first_segment, offset_in_first_segment), begin/end global\n"
        "element indices; first_segment is -1 when the range is empty.");
}
