// fusedwd._C: the CPU kernels behind a pybind11 module.
//
// No libtorch linkage: tensors arrive as raw addresses (Python ints) of the
// segment and hyperparameter tables built by fusedwd/_buckets.py, and gather()
// reads tensors through the CPython API only.
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

namespace py = pybind11;

namespace fusedwd {
namespace {

// Interned attribute names: PyObject_GetAttr / VectorcallMethod then hash and
// compare by pointer.
struct Names {
  PyObject* grad;
  PyObject* dtype;
  PyObject* is_cpu;
  PyObject* data_ptr;
  PyObject* is_contiguous;
  PyObject* numel;
};
Names g_names;

PyObject* intern(const char* s) {
  PyObject* o = PyUnicode_InternFromString(s);
  if (o == nullptr) throw py::error_already_set();
  return o;  // immortal for the process: the module is never unloaded
}

// obj.name() without creating a bound method; false on any exception.
bool call_method_i64(PyObject* obj, PyObject* name, int64_t* out) {
  PyObject* args[1] = {obj};
  PyObject* r = PyObject_VectorcallMethod(name, args, 1, nullptr);
  if (r == nullptr) {
    PyErr_Clear();
    return false;
  }
  const long long v = PyLong_Check(r) ? PyLong_AsLongLong(r) : -1;
  const bool ok = PyLong_Check(r) && !(v == -1 && PyErr_Occurred());
  Py_DECREF(r);
  if (!ok) PyErr_Clear();
  *out = static_cast<int64_t>(v);
  return ok;
}

// obj.name() is True; false on any exception.
bool call_method_true(PyObject* obj, PyObject* name) {
  PyObject* args[1] = {obj};
  PyObject* r = PyObject_VectorcallMethod(name, args, 1, nullptr);
  if (r == nullptr) {
    PyErr_Clear();
    return false;
  }
  const bool ok = r == Py_True;
  Py_DECREF(r);
  return ok;
}

// obj.name is expected (identity); false on any exception.
bool attr_is(PyObject* obj, PyObject* name, PyObject* expected) {
  PyObject* r = PyObject_GetAttr(obj, name);
  if (r == nullptr) {
    PyErr_Clear();
    return false;
  }
  const bool ok = r == expected;
  Py_DECREF(r);
  return ok;
}

// The checks gather() makes before taking p's gradient as is.
bool take_as_is(PyObject* p, PyObject* g, const int64_t* row_in, PyObject* grad_dtype,
                bool expect_cpu, int64_t* g_addr) {
  const Names& n = g_names;
  if (!attr_is(g, n.dtype, grad_dtype)) return false;
  if (expect_cpu && !attr_is(g, n.is_cpu, Py_True)) return false;
  int64_t p_addr = 0;
  if (!call_method_i64(p, n.data_ptr, &p_addr) || p_addr != row_in[SEG_P]) return false;
  int64_t numel = 0;
  if (!call_method_i64(g, n.numel, &numel) || numel != row_in[SEG_N]) return false;
  // sparse gradients raise here, which counts as a failed check
  if (!call_method_true(p, n.is_contiguous) || !call_method_true(g, n.is_contiguous)) return false;
  return call_method_i64(g, n.data_ptr, g_addr);
}

std::tuple<int64_t, int64_t> gather(py::list params, int64_t start, uintptr_t table_in,
                                    uintptr_t table_out, int64_t n_out, py::object grad_dtype,
                                    bool expect_cpu) {
  if (start < 0) throw py::value_error("gather: start must be >= 0");
  if (n_out < 0) throw py::value_error("gather: n_out must be >= 0");
  // the tables are int64 tensors owned by the caller, passed by address
  const int64_t* in = reinterpret_cast<const int64_t*>(table_in);
  int64_t* out = reinterpret_cast<int64_t*>(table_out);
  PyObject* list = params.ptr();
  PyObject* dtype = grad_dtype.ptr();
  // the size is re-read each iteration: attribute calls run Python code
  for (int64_t i = start; i < PyList_GET_SIZE(list); ++i) {
    PyObject* p = PyList_GET_ITEM(list, i);
    Py_INCREF(p);  // keep p alive even if the list is mutated under us
    PyObject* g = PyObject_GetAttr(p, g_names.grad);
    if (g == nullptr) {
      PyErr_Clear();
      Py_DECREF(p);
      return {i, n_out};
    }
    if (g == Py_None) {
      Py_DECREF(g);
      Py_DECREF(p);
      continue;
    }
    const int64_t* row_in = in + i * SEG_COLS;
    int64_t g_addr = 0;
    const bool ok = take_as_is(p, g, row_in, dtype, expect_cpu, &g_addr);
    Py_DECREF(g);
    Py_DECREF(p);
    if (!ok) return {i, n_out};
    int64_t* row_out = out + n_out * SEG_COLS;
    for (int c = 0; c < SEG_COLS; ++c) row_out[c] = row_in[c];
    row_out[SEG_G] = g_addr;
    ++n_out;
  }
  return {static_cast<int64_t>(PyList_GET_SIZE(list)), n_out};
}

void check_step_args(int64_t nseg, int dtype, int num_threads) {
  if (nseg < 0) throw py::value_error("nseg must be >= 0, got " + std::to_string(nseg));
  if (dtype < static_cast<int>(DType::F32) || dtype > static_cast<int>(DType::F64)) {
    throw py::value_error("dtype must be one of DTYPES' values, got " + std::to_string(dtype));
  }
  if (num_threads < 1) {
    throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
  }
}

// Runs one rule's pass over the bucket with the GIL released.
template <typename Pass>
void run_step(uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype, int num_threads,
              Pass pass) {
  check_step_args(nseg, dtype, num_threads);
  if (nseg == 0) return;
  py::gil_scoped_release release;
  // the tables are int64 / float64 tensors owned by the caller, passed by address
  const int64_t* rows = reinterpret_cast<const int64_t*>(table);
  const std::vector<int64_t> offs = cpu::segment_offsets(rows, nseg);
  const cpu::StepArgs args{rows, nseg, reinterpret_cast<const double*>(hyper), offs.data(),
                           dtype, num_threads};
  pass(cpu::active(), args);
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

  g_names = Names{intern("grad"),          intern("dtype"), intern("is_cpu"), intern("data_ptr"),
                  intern("is_contiguous"), intern("numel")};
  // pick the ISA variant now, so a bad FUSEDWD_CPU_ISA fails the import loudly
  try {
    cpu::active();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }

  m.attr("SEG_P") = static_cast<int>(SEG_P);
  m.attr("SEG_G") = static_cast<int>(SEG_G);
  m.attr("SEG_S0") = static_cast<int>(SEG_S0);
  m.attr("SEG_S1") = static_cast<int>(SEG_S1);
  m.attr("SEG_S2") = static_cast<int>(SEG_S2);
  m.attr("SEG_STEP") = static_cast<int>(SEG_STEP);
  m.attr("SEG_N") = static_cast<int>(SEG_N);
  m.attr("SEG_HP") = static_cast<int>(SEG_HP);
  m.attr("SEG_INDEX") = static_cast<int>(SEG_INDEX);
  m.attr("SEG_COLS") = static_cast<int>(SEG_COLS);

  py::dict adamw_hp;
  adamw_hp["lr"] = static_cast<int>(ADAMW_LR);
  adamw_hp["beta1"] = static_cast<int>(ADAMW_BETA1);
  adamw_hp["beta2"] = static_cast<int>(ADAMW_BETA2);
  adamw_hp["eps"] = static_cast<int>(ADAMW_EPS);
  adamw_hp["decay_mult"] = static_cast<int>(ADAMW_DECAY_MULT);
  adamw_hp["l2"] = static_cast<int>(ADAMW_L2);
  adamw_hp["grad_sign"] = static_cast<int>(ADAMW_GRAD_SIGN);
  m.attr("ADAMW_HP") = adamw_hp;
  m.attr("ADAMW_HP_COLS") = static_cast<int>(ADAMW_HP_COLS);

  py::dict sgdw_hp;
  sgdw_hp["lr"] = static_cast<int>(SGDW_LR);
  sgdw_hp["momentum"] = static_cast<int>(SGDW_MOMENTUM);
  sgdw_hp["dampening"] = static_cast<int>(SGDW_DAMPENING);
  sgdw_hp["decay_mult"] = static_cast<int>(SGDW_DECAY_MULT);
  sgdw_hp["l2"] = static_cast<int>(SGDW_L2);
  sgdw_hp["grad_sign"] = static_cast<int>(SGDW_GRAD_SIGN);
  m.attr("SGDW_HP") = sgdw_hp;
  m.attr("SGDW_HP_COLS") = static_cast<int>(SGDW_HP_COLS);

  py::dict rmspropw_hp;
  rmspropw_hp["lr"] = static_cast<int>(RMSPROPW_LR);
  rmspropw_hp["alpha"] = static_cast<int>(RMSPROPW_ALPHA);
  rmspropw_hp["eps"] = static_cast<int>(RMSPROPW_EPS);
  rmspropw_hp["momentum"] = static_cast<int>(RMSPROPW_MOMENTUM);
  rmspropw_hp["decay_mult"] = static_cast<int>(RMSPROPW_DECAY_MULT);
  rmspropw_hp["l2"] = static_cast<int>(RMSPROPW_L2);
  rmspropw_hp["grad_sign"] = static_cast<int>(RMSPROPW_GRAD_SIGN);
  m.attr("RMSPROPW_HP") = rmspropw_hp;
  m.attr("RMSPROPW_HP_COLS") = static_cast<int>(RMSPROPW_HP_COLS);

  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(DType::F32);
  dtypes["float16"] = static_cast<int>(DType::F16);
  dtypes["bfloat16"] = static_cast<int>(DType::BF16);
  dtypes["float64"] = static_cast<int>(DType::F64);
  m.attr("DTYPES") = dtypes;

  m.def(
      "adamw_step",
      [](uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype, bool amsgrad,
         int num_threads) {
        run_step(table, nseg, hyper, dtype, num_threads,
                 [=](const cpu::Kernels& k, const cpu::StepArgs& a) { k.adamw(a, amsgrad); });
      },
      py::arg("table"), py::arg("nseg"), py::arg("hyper"), py::arg("dtype"), py::arg("amsgrad"),
      py::arg("num_threads"),
      "One AdamW step over nseg segments (addresses of the int64 segment table and the\n"
      "float64 hyper table); advances every segment's step count by one.");
  m.def(
      "sgdw_step",
      [](uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype, bool has_momentum,
         bool nesterov, int num_threads) {
        run_step(table, nseg, hyper, dtype, num_threads,
                 [=](const cpu::Kernels& k, const cpu::StepArgs& a) {
                   k.sgdw(a, has_momentum, nesterov);
                 });
      },
      py::arg("table"), py::arg("nseg"), py::arg("hyper"), py::arg("dtype"),
      py::arg("has_momentum"), py::arg("nesterov"), py::arg("num_threads"),
      "One SGDW step over nseg segments; advances every segment's step count by one.");
  m.def(
      "rmspropw_step",
      [](uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype, bool centered,
         bool has_momentum, int num_threads) {
        run_step(table, nseg, hyper, dtype, num_threads,
                 [=](const cpu::Kernels& k, const cpu::StepArgs& a) {
                   k.rmspropw(a, centered, has_momentum);
                 });
      },
      py::arg("table"), py::arg("nseg"), py::arg("hyper"), py::arg("dtype"), py::arg("centered"),
      py::arg("has_momentum"), py::arg("num_threads"),
      "One RMSpropW step over nseg segments; advances every segment's step count by one.");

  m.def("gather", &gather, py::arg("params"), py::arg("start"), py::arg("table_in"),
        py::arg("table_out"), py::arg("n_out"), py::arg("grad_dtype"), py::arg("expect_cpu"),
        "Copies the rows of params[start:] whose .grad can be taken as is into table_out\n"
        "(SEG_G set to the gradient's address), skipping None gradients. Stops at the\n"
        "first parameter that fails a check. Returns (index reached, rows in table_out).");

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

  m.def("traffic_pass", &traffic_pass, py::arg("read_addrs"), py::arg("write_addrs"),
        py::arg("n"), py::arg("elem_size"), py::arg("num_threads"),
        "The memory-traffic floor: one parallel pass reading n elements of every read\n"
        "buffer and writing n elements of every write buffer.");
  m.def("thread_ranges", &thread_ranges, py::arg("sizes"), py::arg("num_threads"),
        "The partition of the concatenated segments between num_threads workers: per\n"
        "worker (begin, end, first_segment, offset_in_first_segment), begin/end global\n"
        "element indices; first_segment is -1 when the range is empty.");
}
