// fusedwd._C_cuda: the CUDA kernels behind a pybind11 module.
//
// Like fusedwd._C, no libtorch linkage: the segment table, the hyper table and
// the arrival word arrive as raw device addresses, torch's stream as its
// cudaStream_t handle (torch.cuda.current_stream().cuda_stream). cudart is
// linked statically, so the module imports on a machine without a driver or a
// GPU; device_count() is 0 there and a launch raises RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/kernels.h"
#include "fusedwd/common.h"
#include "fusedwd/launch.h"
#include "layout_bindings.h"
#include "fusedwd/layout.h"
#include "fusedwd/partition.h"
#include "fusedwd/precision.h"

#ifndef FUSEDWD_CUDA_ARCHS
#error "setup.py defines FUSEDWD_CUDA_ARCHS, the architectures the kernels were built for"
#endif

namespace py = pybind11;

namespace fusedwd {
namespace {

// "cudaErrorNoDevice: no CUDA-capable device is detected", prefixed with what failed.
std::string cuda_message(const std::string& what, cudaError_t err) {
  return what + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

void check(const std::string& what, cudaError_t err) {
  if (err != cudaSuccess) throw std::runtime_error(cuda_message(what, err));
}

// (device count, "" or the CUDA error that makes it 0). The error is cleared so
// that it does not surface in an unrelated later call.
std::pair<int, std::string> query_devices() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return {0, cuda_message("cudaGetDeviceCount", err)};
  }
  return {n, ""};
}

int64_t elem_size_of(int dtype) {
  switch (static_cast<DType>(dtype)) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::F64: return 8;
  }
  throw py::value_error("dtype must be one of DTYPES' values, got " + std::to_string(dtype));
}

void check_step_args(uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype, uintptr_t arrivals,
                     int64_t blocks) {
  if (nseg < 0) throw py::value_error("nseg must be >= 0, got " + std::to_string(nseg));
  elem_size_of(dtype);
  if (blocks < 0 || blocks > 0x7fffffff) {
    throw py::value_error("blocks must be in [0, 2^31), got " + std::to_string(blocks));
  }
  if (nseg > 0 && (table == 0 || hyper == 0 || arrivals == 0)) {
    throw py::value_error("table, hyper and arrivals must be device addresses, got 0");
  }
}

// The precision options of a step (as fusedwd._C's): how p, its master copy and
// the states are stored, the control block and the rounding seed.
struct Precision {
  int state_dtype;  // -1: the parameter's dtype
  bool master;      // fp32 master copy at SEG_MASTER
  bool stochastic;  // stochastic rounding of bf16 p
  uintptr_t ctl;    // device address of the float32 control block (layout.h Ctl), or 0
  uint64_t seed;    // stochastic rounding seed
  bool quantized;   // 8-bit blockwise states (quant.h); state_dtype is then ignored
  uintptr_t sums;   // two-phase rules: device address of float64 [nseg, sums], or 0 (in the scratch)
  int phases;       // two-phase rules: 3 both phases (two launches), 1 phase 1 only, 2 phase 2 only
  uintptr_t scratch;  // two-phase rules: device address of two_phase_scratch_bytes (arrivals: 1 + nseg words)
};

// One step of a rule, launched with the GIL released; a CUDA error becomes RuntimeError.
void step(const std::string& name, uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype,
          const std::vector<bool>& switches, uintptr_t arrivals, uintptr_t stream, int64_t blocks,
          const Precision& pr) {
  const RuleInfo rule = find_rule(name);
  const unsigned bits = switch_bits(rule, name, switches);
  check_step_args(table, nseg, hyper, dtype, arrivals, blocks);
  if (rule.sums > 0) {
    if (pr.quantized) {
      throw py::value_error("rule '" + name + "' does not take 8-bit states (quantized=True): its per-tensor "
                            "sums are not implemented on decoded codes");
    }
    if (pr.phases < 1 || pr.phases > 3) throw py::value_error("phases must be 1, 2 or 3, got " + std::to_string(pr.phases));
    if (pr.phases != 3 && pr.sums == 0) {
      throw py::value_error("phases=" + std::to_string(pr.phases) + " takes the sums buffer (sums=address)");
    }
    if (nseg > 0 && pr.scratch == 0) {
      throw py::value_error("rule '" + name + "' takes scratch= (the device address of "
                            "two_phase_scratch_bytes(nseg, elements, sums) bytes; arrivals: 1 + nseg zero words)");
    }
  } else if (pr.sums != 0 || pr.phases != 3 || pr.scratch != 0) {
    throw py::value_error("rule '" + name + "' is elementwise: it takes no sums, no phases and no scratch");
  }
  const int state_dtype = pr.state_dtype < 0 ? dtype : pr.state_dtype;
  if (pr.quantized) {
    check_q8_layout(dtype, pr.master, pr.stochastic);
  } else {
    check_layout(dtype, state_dtype, pr.master, pr.stochastic);
  }
  if (nseg == 0) return;
  cudaError_t err;
  {
    py::gil_scoped_release release;
    // the caller owns these device buffers and the stream, passed by address / handle
    const cuda::LaunchArgs args{reinterpret_cast<const int64_t*>(table),
                                nseg,
                                reinterpret_cast<const double*>(hyper),
                                dtype,
                                state_dtype,
                                pr.master,
                                pr.stochastic,
                                reinterpret_cast<const float*>(pr.ctl),
                                pr.seed,
                                pr.quantized,
                                reinterpret_cast<unsigned int*>(arrivals),
                                blocks,
                                reinterpret_cast<cudaStream_t>(stream),
                                pr.phases,
                                reinterpret_cast<double*>(pr.sums),
                                reinterpret_cast<void*>(pr.scratch)};
    err = cuda::step(rule.id, args, bits);
  }
  check("fusedwd._C_cuda.step(" + name + ")", err);
}

// The chunks block `block` of `grid` updates, walked exactly as the kernel walks
// them (tile by tile, for_each_owned_chunk), with the tile prefix sums computed
// sequentially instead of by the block-wide scan. Returns the number of chunks
// and the first `limit` of them as (segment, chunk in segment, begin, end).
std::tuple<int64_t, std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>> block_chunks(
    const std::vector<int64_t>& sizes, int64_t elem_size, int64_t grid, int64_t block,
    int64_t limit) {
  if (elem_size != 2 && elem_size != 4 && elem_size != 8) {
    throw py::value_error("elem_size must be 2, 4 or 8");
  }
  if (grid < 1 || block < 0 || block >= grid) throw py::value_error("need 0 <= block < grid");
  const int64_t nseg = static_cast<int64_t>(sizes.size());
  const int64_t chunk = chunk_elems(elem_size);
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> out;
  int64_t count = 0;
  int64_t running = 0;
  int64_t starts[kCudaThreads + 1];
  for (int64_t base = 0; base < nseg; base += kCudaThreads) {
    const int64_t tile = nseg - base < kCudaThreads ? nseg - base : kCudaThreads;
    starts[0] = running;
    for (int64_t i = 0; i < tile; ++i) {
      if (sizes[base + i] < 0) throw py::value_error("sizes must be >= 0");
      starts[i + 1] = starts[i] + chunks_of(sizes[base + i], chunk);
    }
    for_each_owned_chunk(starts, tile, block, grid, [&](int64_t i, int64_t j) {
      if (limit < 0 || count < limit) {
        const ChunkRange r = chunk_range(sizes[base + i], chunk, j);
        out.emplace_back(base + i, j, r.begin, r.end);
      }
      ++count;
    });
    running = starts[tile];
  }
  return {count, out};
}

// Which thread updates which elements of a chunk [begin, end), as the kernel
// assigns them: per element (thread, vectorized). Vectorized elements come in
// whole 16-byte vectors of one thread.
std::vector<std::tuple<int, bool>> thread_elements(int64_t begin, int64_t end, int64_t elem_size,
                                                   bool aligned) {
  if (elem_size != 2 && elem_size != 4 && elem_size != 8) {
    throw py::value_error("elem_size must be 2, 4 or 8");
  }
  if (end < begin || end - begin > chunk_elems(elem_size)) {
    throw py::value_error("a chunk holds at most chunk_elems(elem_size) elements");
  }
  const int64_t vec = vector_elems(elem_size);
  std::vector<std::tuple<int, bool>> owner(end - begin, {-1, false});
  auto claim = [&](int64_t e, int tid, bool vectorized) {
    auto& o = owner.at(e - begin);
    // a second owner is reported as thread -2, which the tests reject
    o = std::get<0>(o) == -1 ? std::make_tuple(tid, vectorized) : std::make_tuple(-2, vectorized);
  };
  const ChunkRange r{begin, end};
  for (int tid = 0; tid < kCudaThreads; ++tid) {
    if (aligned) {
      const ChunkRange v = thread_vector(r, tid, vec);
      for (int64_t e = v.begin; e < v.end; ++e) claim(e, tid, v.end - v.begin == vec);
    } else {
      for (int64_t k = 0; k < vec; ++k) {
        const int64_t e = thread_scalar(r, tid, k);
        if (e < r.end) claim(e, tid, false);
      }
    }
  }
  return owner;
}

}  // namespace
}  // namespace fusedwd

PYBIND11_MODULE(_C_cuda, m) {
  using namespace fusedwd;
  m.doc() = "fusedwd CUDA kernels over segment tables (see docs/design.md, docs/backends.md)";

  export_layout(m);


  m.attr("THREADS") = kCudaThreads;
  m.attr("VECTOR_BYTES") = kCudaVectorBytes;
  m.attr("BLOCKS_PER_SM") = kCudaBlocksPerSm;
  m.attr("ARCHS") = std::string(FUSEDWD_CUDA_ARCHS);
  m.attr("CUDART_VERSION") = CUDART_VERSION;

  m.def(
      "step",
      [](const std::string& rule, uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype,
         const std::vector<bool>& switches, uintptr_t arrivals, uintptr_t stream, int64_t blocks,
         int state_dtype, bool master, bool stochastic_rounding, uintptr_t ctl, uint64_t seed,
         bool quantized, uintptr_t sums, int phases, uintptr_t scratch) {
        step(rule, table, nseg, hyper, dtype, switches, arrivals, stream, blocks,
             {state_dtype, master, stochastic_rounding, ctl, seed, quantized, sums, phases, scratch});
      },
      py::arg("rule"), py::arg("table"), py::arg("nseg"), py::arg("hyper"), py::arg("dtype"),
      py::arg("switches"), py::arg("arrivals"), py::arg("stream"), py::arg("blocks") = 0,
      py::kw_only(), py::arg("state_dtype") = -1, py::arg("master") = false,
      py::arg("stochastic_rounding") = false, py::arg("ctl") = 0, py::arg("seed") = 0,
      py::arg("quantized") = false, py::arg("sums") = 0, py::arg("phases") = 3, py::arg("scratch") = 0,
      "One step of `rule` (a name of RULES) over nseg segments, queued on `stream` (a\n"
      "cudaStream_t handle). table, hyper: device addresses of the int64 segment table and the\n"
      "float64 hyper table; switches: one bool per switch of the rule; arrivals: device address\n"
      "of one zero uint32 the launch uses and leaves zero (one per concurrently running\n"
      "launch); blocks: grid size, 0 for the persistent grid. Advances every segment's step\n"
      "count by one. state_dtype (-1: dtype), master (fp32 master copies at SEG_MASTER),\n"
      "stochastic_rounding (bf16 params), ctl (device address of the float32 control block:\n"
      "1/grad_scale, found_inf, clip coefficient; a nonzero found_inf skips the step, step\n"
      "counts included), seed and quantized (8-bit blockwise states: S0..S2 hold uint8 codes,\n"
      "SEG_A0..SEG_A2 fp32 absmax), as fusedwd._C.step. A two-phase rule (RULES[rule]['sums'] > 0)\n"
      "takes scratch (device address of two_phase_scratch_bytes(nseg, elements, sums) bytes) and\n"
      "1 + nseg zero words at arrivals (each segment's counter after the launch's; left zero), sums (device\n"
      "address of float64 [nseg, sums]: phase 1 writes each segment's sums, phase 2 reads them; 0:\n"
      "in the scratch) and phases (3: both, two launches; 1: phase 1 only, step counts unchanged;\n"
      "2: phase 2 only, from the sums buffer). No 8-bit states.");
  m.def("two_phase_scratch_bytes", &cuda::two_phase_scratch_bytes, py::arg("nseg"), py::arg("elements"),
        py::arg("sums"),
        "Bytes of a two-phase launch's scratch over nseg segments of at most `elements` elements in\n"
        "all, for a rule of `sums` sums per segment.");

  m.def(
      "device_count", [] { return query_devices().first; },
      "Number of CUDA devices; 0 without a driver or a GPU (never raises).");
  m.def(
      "status", [] { return query_devices().second; },
      "Empty when the CUDA runtime finds a device, else the CUDA error saying why not.");
  m.def(
      "probe",
      [](int device) {
        const cudaError_t err = cuda::probe(device);
        if (err == cudaSuccess) return std::string();
        (void)cudaGetLastError();  // not sticky: clear it so no later call reports it
        return cuda_message("cudaFuncGetAttributes on cuda:" + std::to_string(device), err);
      },
      py::arg("device"),
      "Empty when the kernels can run on CUDA device `device` (the module holds machine code\n"
      "or PTX for it), else the CUDA error that says why not (never raises).");
  m.def(
      "error_message",
      [](int code, const std::string& what) {
        return cuda_message(what, static_cast<cudaError_t>(code));
      },
      py::arg("code"), py::arg("what"),
      "The RuntimeError message a failed launch raises for CUDA error `code`.");

  m.def("vector_elems", [](int64_t elem_size) { return vector_elems(elem_size); },
        py::arg("elem_size"), "Elements per 16-byte vector.");
  m.def("chunk_elems", [](int64_t elem_size) { return chunk_elems(elem_size); },
        py::arg("elem_size"), "Elements per chunk (one vector per thread of a block).");
  m.def("chunks_of", &chunks_of, py::arg("n"), py::arg("chunk"),
        "Chunks of a segment of n elements.");
  m.def("first_owned_chunk", &first_owned_chunk, py::arg("begin"), py::arg("block"),
        py::arg("grid"), "The first chunk >= begin dealt to block of grid.");
  m.def("persistent_grid", &persistent_grid, py::arg("sm_count"), py::arg("max_blocks_per_sm"),
        "The grid a launch uses for this SM count and kernel occupancy.");
  m.def("vector_aligned", [](uint64_t address) { return vector_aligned(address); },
        py::arg("address"), "Whether a buffer address allows 16-byte vector access.");
  m.def("block_chunks", &block_chunks, py::arg("sizes"), py::arg("elem_size"), py::arg("grid"),
        py::arg("block"), py::arg("limit") = -1,
        "(count, [(segment, chunk_in_segment, begin, end), ...]): the chunks one block\n"
        "updates, walked as the kernel walks them; at most `limit` listed (-1: all).");
  m.def("thread_elements", &thread_elements, py::arg("begin"), py::arg("end"),
        py::arg("elem_size"), py::arg("aligned"),
        "Per element of the chunk [begin, end): (thread, vectorized) as the kernel assigns\n"
        "them; thread -1 means no thread, -2 more than one.");
}
