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
#include "layout_bindings.h"
#include "fusedwd/layout.h"
#include "fusedwd/partition.h"
#include "fusedwd/precision.h"
#include "fusedwd/quant.h"

namespace py = pybind11;

namespace fusedwd {
namespace {

// Tensor attributes and methods read in gather's hot loop, resolved once to
// the C functions behind torch._C.TensorBase's descriptors. Calling those
// directly skips attribute lookup and, above all, the argument tuple of each
// METH_VARARGS call: tuples are GC-tracked, and the 60,000 a gather of 10,000
// parameters would allocate keep triggering collections that walk every live
// tensor (a quarter of gather's time, measured). The C function is the one
// Python itself would call, so semantics (torch_function handling included)
// are unchanged; it is used only on types that resolve the name to that same
// descriptor, anything else takes the generic path.
struct Member {
  PyObject* name = nullptr;   // interned
  PyObject* descr = nullptr;  // TensorBase's descriptor, or nullptr: generic path only
  getter get = nullptr;       // a getset's getter
  void* closure = nullptr;
  PyCFunction fn = nullptr;   // a method's C function
  int flags = 0;              // its calling convention
};

struct Members {
  Member grad, dtype, is_cpu, data_ptr, is_contiguous, numel;
};
Members g_m;
PyObject* g_empty_tuple = nullptr;

// Types known to resolve every member to TensorBase's descriptor (true) or not.
constexpr int kTypeCacheSize = 8;
PyTypeObject* g_types[kTypeCacheSize] = {};
bool g_types_plain[kTypeCacheSize] = {};
int g_types_used = 0;

PyObject* intern(const char* s) {
  PyObject* o = PyUnicode_InternFromString(s);
  if (o == nullptr) throw py::error_already_set();
  return o;  // immortal for the process: the module is never unloaded
}

// Binds m to TensorBase's descriptor of m.name when it is a plain getset or a
// method with a calling convention handled below; otherwise leaves it generic.
void bind_member(PyObject* tensor_base, Member& m) {
  PyObject* d = PyObject_GetAttr(tensor_base, m.name);
  if (d == nullptr) {
    PyErr_Clear();
    return;
  }
  if (Py_IS_TYPE(d, &PyGetSetDescr_Type)) {
    PyGetSetDef* def = reinterpret_cast<PyGetSetDescrObject*>(d)->d_getset;
    if (def->get != nullptr) {
      m.get = def->get;
      m.closure = def->closure;
      m.descr = d;  // kept: the module is never unloaded
      return;
    }
  } else if (Py_IS_TYPE(d, &PyMethodDescr_Type)) {
    PyMethodDef* def = reinterpret_cast<PyMethodDescrObject*>(d)->d_method;
    const int flags = def->ml_flags & (METH_VARARGS | METH_KEYWORDS | METH_NOARGS);
    if (flags == METH_NOARGS || flags == METH_VARARGS || flags == (METH_VARARGS | METH_KEYWORDS)) {
      m.fn = def->ml_meth;
      m.flags = flags;
      m.descr = d;
      return;
    }
  }
  Py_DECREF(d);
}

// Resolved at the first gather (torch is imported by then: it passed tensors).
void bind_members() {
  static bool bound = false;
  if (bound) return;
  bound = true;
  g_empty_tuple = PyTuple_New(0);
  PyObject* torch_c = PyImport_ImportModule("torch._C");
  PyObject* base = torch_c ? PyObject_GetAttrString(torch_c, "TensorBase") : nullptr;
  if (base != nullptr && g_empty_tuple != nullptr) {
    for (Member* m : {&g_m.grad, &g_m.dtype, &g_m.is_cpu, &g_m.data_ptr, &g_m.is_contiguous,
                      &g_m.numel}) {
      bind_member(base, *m);
    }
  }
  PyErr_Clear();  // an older torch without TensorBase: every member stays generic
  Py_XDECREF(base);
  Py_XDECREF(torch_c);
}

// Whether type t resolves every member to TensorBase's descriptor (torch.Tensor,
// nn.Parameter, and subclasses that override none of them).
bool is_plain(PyTypeObject* t) {
  for (int k = 0; k < g_types_used; ++k) {
    if (g_types[k] == t) return g_types_plain[k];
  }
  bool plain = true;
  for (const Member* m : {&g_m.grad, &g_m.dtype, &g_m.is_cpu, &g_m.data_ptr,
                          &g_m.is_contiguous, &g_m.numel}) {
    PyObject* d = PyObject_GetAttr(reinterpret_cast<PyObject*>(t), m->name);
    if (d == nullptr) PyErr_Clear();
    plain = plain && m->descr != nullptr && d == m->descr;
    Py_XDECREF(d);
  }
  if (g_types_used < kTypeCacheSize) {
    g_types[g_types_used] = t;
    g_types_plain[g_types_used] = plain;
    ++g_types_used;
  }
  return plain;
}

// obj.<m> or obj.<m>(): a new reference, or nullptr with a Python error set.
PyObject* get(PyObject* obj, const Member& m, bool plain) {
  if (plain) {
    if (m.get != nullptr) return m.get(obj, m.closure);
    switch (m.flags) {
      case METH_NOARGS:
        return m.fn(obj, nullptr);
      case METH_VARARGS:
        return m.fn(obj, g_empty_tuple);
      case METH_VARARGS | METH_KEYWORDS:
        return reinterpret_cast<PyCFunctionWithKeywords>(reinterpret_cast<void (*)(void)>(m.fn))(
            obj, g_empty_tuple, nullptr);
    }
  }
  if (m.fn == nullptr && m.get != nullptr) return PyObject_GetAttr(obj, m.name);
  if (m.fn == nullptr && m.descr == nullptr) {
    // unresolved member: attribute or method, decided by what the object holds
    PyObject* a = PyObject_GetAttr(obj, m.name);
    if (a == nullptr || !PyCallable_Check(a)) return a;
    PyObject* r = PyObject_CallNoArgs(a);
    Py_DECREF(a);
    return r;
  }
  PyObject* args[1] = {obj};
  return PyObject_VectorcallMethod(m.name, args, 1, nullptr);
}

// obj.<m>[()] as an int64; false on any exception.
bool get_i64(PyObject* obj, const Member& m, bool plain, int64_t* out) {
  PyObject* r = get(obj, m, plain);
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

// obj.<m>[()] is expected (identity); false on any exception.
bool get_is(PyObject* obj, const Member& m, bool plain, PyObject* expected) {
  PyObject* r = get(obj, m, plain);
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
  const bool p_plain = is_plain(Py_TYPE(p));
  const bool g_plain = is_plain(Py_TYPE(g));
  if (!get_is(g, g_m.dtype, g_plain, grad_dtype)) return false;
  if (expect_cpu && !get_is(g, g_m.is_cpu, g_plain, Py_True)) return false;
  int64_t p_addr = 0;
  if (!get_i64(p, g_m.data_ptr, p_plain, &p_addr) || p_addr != row_in[SEG_P]) return false;
  int64_t numel = 0;
  if (!get_i64(g, g_m.numel, g_plain, &numel) || numel != row_in[SEG_N]) return false;
  // sparse gradients raise here, which counts as a failed check
  if (!get_is(p, g_m.is_contiguous, p_plain, Py_True) ||
      !get_is(g, g_m.is_contiguous, g_plain, Py_True)) {
    return false;
  }
  return get_i64(g, g_m.data_ptr, g_plain, g_addr);
}

// For gradients re-homed into a bucket's flat buffer: the index of the first
// parameter from start on whose .grad is no longer the view handed out
// (views[i], identity), or whose own address or its view's address moved away
// from the table; len(params) when every parameter is as left. Any Python
// exception counts as a moved parameter. Three reads per parameter, against
// gather's eight, since a view we own needs no dtype/size/layout checks.
int64_t check_views(py::list params, py::list views, int64_t start, uintptr_t table) {
  if (start < 0) throw py::value_error("check_views: start must be >= 0");
  if (PyList_GET_SIZE(views.ptr()) != PyList_GET_SIZE(params.ptr())) {
    throw py::value_error("check_views: params and views differ in length");
  }
  bind_members();
  // the table is an int64 tensor owned by the caller, passed by address
  const int64_t* rows = reinterpret_cast<const int64_t*>(table);
  PyObject* list = params.ptr();
  PyObject* view_list = views.ptr();
  for (int64_t i = start; i < PyList_GET_SIZE(list); ++i) {
    PyObject* p = PyList_GET_ITEM(list, i);
    PyObject* view = PyList_GET_ITEM(view_list, i);
    Py_INCREF(p);  // keep p alive even if the list is mutated under us
    PyObject* g = get(p, g_m.grad, is_plain(Py_TYPE(p)));
    bool ok = g == view;
    Py_XDECREF(g);
    if (g == nullptr) PyErr_Clear();
    const int64_t* row = rows + i * SEG_COLS;
    int64_t addr = 0;
    ok = ok && get_i64(p, g_m.data_ptr, is_plain(Py_TYPE(p)), &addr) && addr == row[SEG_P];
    ok = ok && get_i64(view, g_m.data_ptr, is_plain(Py_TYPE(view)), &addr) && addr == row[SEG_G];
    Py_DECREF(p);
    if (!ok) return i;
  }
  return static_cast<int64_t>(PyList_GET_SIZE(list));
}

std::tuple<int64_t, int64_t> gather(py::list params, int64_t start, uintptr_t table_in,
                                    uintptr_t table_out, int64_t n_out, py::object grad_dtype,
                                    bool expect_cpu) {
  if (start < 0) throw py::value_error("gather: start must be >= 0");
  if (n_out < 0) throw py::value_error("gather: n_out must be >= 0");
  // the tables are int64 tensors owned by the caller, passed by address
  const int64_t* in = reinterpret_cast<const int64_t*>(table_in);
  int64_t* out = reinterpret_cast<int64_t*>(table_out);
  bind_members();
  PyObject* list = params.ptr();
  PyObject* dtype = grad_dtype.ptr();
  // the size is re-read each iteration: attribute calls run Python code
  for (int64_t i = start; i < PyList_GET_SIZE(list); ++i) {
    PyObject* p = PyList_GET_ITEM(list, i);
    Py_INCREF(p);  // keep p alive even if the list is mutated under us
    PyObject* g = get(p, g_m.grad, is_plain(Py_TYPE(p)));
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

// The precision options of a step: how p, its master copy and the states are stored.
struct Precision {
  int state_dtype;   // -1: the parameter's dtype
  bool master;       // fp32 master copy at SEG_MASTER
  bool stochastic;   // stochastic rounding of bf16 p
  uintptr_t ctl;     // address of the float32 control block (layout.h Ctl), or 0
  uint64_t seed;     // stochastic rounding seed
  bool quantized;    // 8-bit blockwise states (quant.h); state_dtype is then ignored
};

// Runs one rule's pass over the bucket with the GIL released.
template <typename Pass>
void run_step(uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype, int num_threads,
              const Precision& pr, Pass pass) {
  check_step_args(nseg, dtype, num_threads);
  const int state_dtype = pr.state_dtype < 0 ? dtype : pr.state_dtype;
  if (pr.quantized) {
    check_q8_layout(dtype, pr.master, pr.stochastic);
  } else {
    check_layout(dtype, state_dtype, pr.master, pr.stochastic);
  }
  if (nseg == 0) return;
  py::gil_scoped_release release;
  // the tables are int64 / float64 tensors owned by the caller, passed by address
  const int64_t* rows = reinterpret_cast<const int64_t*>(table);
  // 8-bit states split the work between threads by whole blocks
  const std::vector<int64_t> offs = cpu::segment_offsets(rows, nseg, pr.quantized ? kQuantBlock : 1);
  const cpu::StepArgs args{rows, nseg, reinterpret_cast<const double*>(hyper), offs.data(),
                           dtype, num_threads, state_dtype, pr.master, pr.stochastic,
                           reinterpret_cast<const float*>(pr.ctl), pr.seed, pr.quantized};
  pass(cpu::active(), args);
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

  g_m.grad.name = intern("grad");
  g_m.dtype.name = intern("dtype");
  g_m.is_cpu.name = intern("is_cpu");
  g_m.data_ptr.name = intern("data_ptr");
  g_m.is_contiguous.name = intern("is_contiguous");
  g_m.numel.name = intern("numel");
  // pick the ISA variant now, so a bad FUSEDWD_CPU_ISA fails the import loudly
  try {
    cpu::active();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }

  export_layout(m);

  py::dict adamw_hp;
  adamw_hp["lr"] = static_cast<int>(ADAMW_LR);
  adamw_hp["beta1"] = static_cast<int>(ADAMW_BETA1);
  adamw_hp["beta2"] = static_cast<int>(ADAMW_BETA2);
  adamw_hp["eps"] = static_cast<int>(ADAMW_EPS);
  adamw_hp["decay_mult"] = static_cast<int>(ADAMW_DECAY_MULT);
  adamw_hp["l2"] = static_cast<int>(ADAMW_L2);
  adamw_hp["grad_sign"] = static_cast<int>(ADAMW_GRAD_SIGN);
  m.attr("ADAMW_HP") = adamw_hp;

  py::dict sgdw_hp;
  sgdw_hp["lr"] = static_cast<int>(SGDW_LR);
  sgdw_hp["momentum"] = static_cast<int>(SGDW_MOMENTUM);
  sgdw_hp["dampening"] = static_cast<int>(SGDW_DAMPENING);
  sgdw_hp["decay_mult"] = static_cast<int>(SGDW_DECAY_MULT);
  sgdw_hp["l2"] = static_cast<int>(SGDW_L2);
  sgdw_hp["grad_sign"] = static_cast<int>(SGDW_GRAD_SIGN);
  m.attr("SGDW_HP") = sgdw_hp;

  py::dict rmspropw_hp;
  rmspropw_hp["lr"] = static_cast<int>(RMSPROPW_LR);
  rmspropw_hp["alpha"] = static_cast<int>(RMSPROPW_ALPHA);
  rmspropw_hp["eps"] = static_cast<int>(RMSPROPW_EPS);
  rmspropw_hp["momentum"] = static_cast<int>(RMSPROPW_MOMENTUM);
  rmspropw_hp["decay_mult"] = static_cast<int>(RMSPROPW_DECAY_MULT);
  rmspropw_hp["l2"] = static_cast<int>(RMSPROPW_L2);
  rmspropw_hp["grad_sign"] = static_cast<int>(RMSPROPW_GRAD_SIGN);
  m.attr("RMSPROPW_HP") = rmspropw_hp;


  m.def(
      "adamw_step",
      [](uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype, bool amsgrad,
         int num_threads, int state_dtype, bool master, bool stochastic_rounding, uintptr_t ctl,
         uint64_t seed, bool quantized) {
        run_step(table, nseg, hyper, dtype, num_threads,
                 {state_dtype, master, stochastic_rounding, ctl, seed, quantized},
                 [=](const cpu::Kernels& k, const cpu::StepArgs& a) { k.adamw(a, amsgrad); });
      },
      py::arg("table"), py::arg("nseg"), py::arg("hyper"), py::arg("dtype"), py::arg("amsgrad"),
      py::arg("num_threads"), py::kw_only(), py::arg("state_dtype") = -1, py::arg("master") = false,
      py::arg("stochastic_rounding") = false, py::arg("ctl") = 0, py::arg("seed") = 0,
      py::arg("quantized") = false,
      "One AdamW step over nseg segments (addresses of the int64 segment table and the\n"
      "float64 hyper table); advances every segment's step count by one.\n"
      "state_dtype (-1: dtype), master (fp32 master copies at SEG_MASTER), stochastic_rounding\n"
      "(bf16 params), ctl (address of the float32 control block: 1/grad_scale, found_inf, clip\n"
      "coefficient; a nonzero found_inf skips the step, step counts included), seed, and\n"
      "quantized (8-bit blockwise states: S0..S2 hold uint8 codes, SEG_A0..SEG_A2 fp32 absmax).");
  m.def(
      "sgdw_step",
      [](uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype, bool has_momentum,
         bool nesterov, int num_threads, int state_dtype, bool master, bool stochastic_rounding,
         uintptr_t ctl, uint64_t seed, bool quantized) {
        run_step(table, nseg, hyper, dtype, num_threads,
                 {state_dtype, master, stochastic_rounding, ctl, seed, quantized},
                 [=](const cpu::Kernels& k, const cpu::StepArgs& a) {
                   k.sgdw(a, has_momentum, nesterov);
                 });
      },
      py::arg("table"), py::arg("nseg"), py::arg("hyper"), py::arg("dtype"),
      py::arg("has_momentum"), py::arg("nesterov"), py::arg("num_threads"), py::kw_only(), py::arg("state_dtype") = -1, py::arg("master") = false,
      py::arg("stochastic_rounding") = false, py::arg("ctl") = 0, py::arg("seed") = 0,
      py::arg("quantized") = false,
      "One SGDW step over nseg segments; advances every segment's step count by one.\n"
      "Precision keywords as for adamw_step.");
  m.def(
      "rmspropw_step",
      [](uintptr_t table, int64_t nseg, uintptr_t hyper, int dtype, bool centered,
         bool has_momentum, int num_threads, int state_dtype, bool master,
         bool stochastic_rounding, uintptr_t ctl, uint64_t seed, bool quantized) {
        run_step(table, nseg, hyper, dtype, num_threads,
                 {state_dtype, master, stochastic_rounding, ctl, seed, quantized},
                 [=](const cpu::Kernels& k, const cpu::StepArgs& a) {
                   k.rmspropw(a, centered, has_momentum);
                 });
      },
      py::arg("table"), py::arg("nseg"), py::arg("hyper"), py::arg("dtype"), py::arg("centered"),
      py::arg("has_momentum"), py::arg("num_threads"), py::kw_only(), py::arg("state_dtype") = -1, py::arg("master") = false,
      py::arg("stochastic_rounding") = false, py::arg("ctl") = 0, py::arg("seed") = 0,
      py::arg("quantized") = false,
      "One RMSpropW step over nseg segments; advances every segment's step count by one.\n"
      "Precision keywords as for adamw_step.");

  m.def("gather", &gather, py::arg("params"), py::arg("start"), py::arg("table_in"),
        py::arg("table_out"), py::arg("n_out"), py::arg("grad_dtype"), py::arg("expect_cpu"),
        "Copies the rows of params[start:] whose .grad can be taken as is into table_out\n"
        "(SEG_G set to the gradient's address), skipping None gradients. Stops at the\n"
        "first parameter that fails a check. Returns (index reached, rows in table_out).");

  m.def("check_views", &check_views, py::arg("params"), py::arg("views"), py::arg("start"),
        py::arg("table"),
        "Index of the first parameter from start on whose .grad is not views[i] or whose\n"
        "address or its view's address differs from the table's SEG_P / SEG_G; len(params)\n"
        "when all are as left (gradients re-homed into a flat buffer).");

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
