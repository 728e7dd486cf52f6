// fusedwd._C.gather and check_views: the gradient addresses of a step, read
// through the CPython API only (no libtorch linkage), apart from the kernels'
// bindings (csrc/bindings.cpp). docs/design.md#gathering-gradients.
#include "gather.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>

#include "fusedwd/layout.h"

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

}  // namespace

void export_gather(py::module_& m) {
  g_m.grad.name = intern("grad");
  g_m.dtype.name = intern("dtype");
  g_m.is_cpu.name = intern("is_cpu");
  g_m.data_ptr.name = intern("data_ptr");
  g_m.is_contiguous.name = intern("is_contiguous");
  g_m.numel.name = intern("numel");

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
}

}  // namespace fusedwd
