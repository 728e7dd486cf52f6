// The table layouts, dtype codes and rules, exported the same way by fusedwd._C
// and fusedwd._C_cuda: both modules read the tables fusedwd/_buckets.py fills,
// so Python sees one definition (tests/test_layout.py holds all three
// together, and checks every rule against its Python spec).
#pragma once

#include <pybind11/pybind11.h>

#include <set>
#include <string>
#include <typeinfo>
#include <vector>

#include "fusedwd/common.h"
#include "fusedwd/layout.h"
#include "fusedwd/rules.h"

namespace fusedwd {

// "lr, beta1, beta2" -> ["lr", "beta1", "beta2"] ("" -> []).
inline std::vector<std::string> split_names(const char* names) {
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

// A rule as the bindings take it: its id in rules.h and the widths a call is checked against.
struct RuleInfo {
  int id;
  int hp_cols;
  int switches;
  int sums;  // a two-phase rule's per-segment sums (rule.h kSums), 0 for an elementwise rule
};

// The rule named `name` ("adamw"), or a ValueError naming the known ones.
inline RuleInfo find_rule(const std::string& name) {
  RuleInfo found{-1, 0, 0, 0};
  std::string known;
  for (int id = 0; id < static_cast<int>(RuleId::kCount); ++id) {
    with_rule(id, [&](auto rule) {
      using R = decltype(rule);
      known += (known.empty() ? "" : ", ") + std::string(R::kName);
      if (name == R::kName) {
        found = {id, R::Col::kCount, static_cast<int>(split_names(R::kSwitchNames).size()), kSumsOf<R>};
      }
    });
  }
  if (found.id < 0) throw pybind11::value_error("unknown rule '" + name + "' (known: " + known + ")");
  return found;
}

// A call's switches (one bool per switch of the rule, in its order) as the kernels' bits.
inline unsigned switch_bits(const RuleInfo& rule, const std::string& name, const std::vector<bool>& switches) {
  if (static_cast<int>(switches.size()) != rule.switches) {
    throw pybind11::value_error("rule '" + name + "' takes " + std::to_string(rule.switches) +
                                " switches, got " + std::to_string(switches.size()));
  }
  unsigned bits = 0;
  for (size_t k = 0; k < switches.size(); ++k) bits |= switches[k] ? 1u << k : 0u;
  return bits;
}

// RULES[name] = {"id": its position in rules.h, "columns": (...), "switches": (...), "signed": (s0, s1, s2),
// "states": {switch values: (S0 used, S1 used, S2 used)}, "kernels": the number of distinct
// Rule types its switches select, "sums": a two-phase rule's per-segment sums (else 0)}:
// what the kernels compile.
inline void export_rules(pybind11::module_& m) {
  namespace py = pybind11;
  py::dict rules;
  for (int id = 0; id < static_cast<int>(RuleId::kCount); ++id) {
    with_rule(id, [&](auto rule) {
      using R = decltype(rule);
      const std::vector<std::string> switch_names = split_names(R::kSwitchNames);
      py::dict info, states;
      py::tuple signs;
      std::set<std::string> kernels;
      for (unsigned bits = 0; bits < (1u << switch_names.size()); ++bits) {
        py::tuple key(switch_names.size());
        for (size_t k = 0; k < switch_names.size(); ++k) key[k] = py::bool_((bits >> k) & 1u);
        R::template with_switches<DType::F32>(bits, [&](auto r) {
          using K = decltype(r);
          states[key] = py::make_tuple(K::kS0, K::kS1, K::kS2);
          signs = py::make_tuple(K::kSigned0, K::kSigned1, K::kSigned2);
          kernels.insert(typeid(K).name());
        });
      }
      info["id"] = id;
      info["columns"] = py::tuple(py::cast(split_names(R::Col::names())));
      info["switches"] = py::tuple(py::cast(switch_names));
      info["signed"] = signs;
      info["states"] = states;
      info["kernels"] = kernels.size();
      info["sums"] = kSumsOf<R>;
      rules[R::kName] = info;
    });
  }
  m.attr("RULES") = rules;
}

inline void export_layout(pybind11::module_& m) {
  m.attr("SEG_P") = static_cast<int>(SEG_P);
  m.attr("SEG_G") = static_cast<int>(SEG_G);
  m.attr("SEG_S0") = static_cast<int>(SEG_S0);
  m.attr("SEG_S1") = static_cast<int>(SEG_S1);
  m.attr("SEG_S2") = static_cast<int>(SEG_S2);
  m.attr("SEG_STEP") = static_cast<int>(SEG_STEP);
  m.attr("SEG_N") = static_cast<int>(SEG_N);
  m.attr("SEG_HP") = static_cast<int>(SEG_HP);
  m.attr("SEG_INDEX") = static_cast<int>(SEG_INDEX);
  m.attr("SEG_MASTER") = static_cast<int>(SEG_MASTER);
  m.attr("SEG_SALT") = static_cast<int>(SEG_SALT);
  m.attr("SEG_A0") = static_cast<int>(SEG_A0);
  m.attr("SEG_A1") = static_cast<int>(SEG_A1);
  m.attr("SEG_A2") = static_cast<int>(SEG_A2);
  m.attr("SEG_COLS") = static_cast<int>(SEG_COLS);
  m.attr("CTL_INV_SCALE") = static_cast<int>(CTL_INV_SCALE);
  m.attr("CTL_FOUND_INF") = static_cast<int>(CTL_FOUND_INF);
  m.attr("CTL_CLIP") = static_cast<int>(CTL_CLIP);
  m.attr("CTL_SIZE") = static_cast<int>(CTL_SIZE);

  pybind11::dict dtypes;
  dtypes["float32"] = static_cast<int>(DType::F32);
  dtypes["float16"] = static_cast<int>(DType::F16);
  dtypes["bfloat16"] = static_cast<int>(DType::BF16);
  dtypes["float64"] = static_cast<int>(DType::F64);
  m.attr("DTYPES") = dtypes;

  export_rules(m);
}

}  // namespace fusedwd
