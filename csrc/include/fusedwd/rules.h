// Every rule, in one list. The CPU kernel table (csrc/cpu/loops.h), both
// modules' bindings and the CUDA kernels' paths (csrc/cuda/step.cuh
// with_elementwise_rule) are instantiated from it; a rule's id is its position here.
#pragma once

#include "fusedwd/adamw.h"
#include "fusedwd/lamb.h"
#include "fusedwd/lion.h"
#include "fusedwd/rmspropw.h"
#include "fusedwd/sgdw.h"
#include "fusedwd/stableadamw.h"

// X(Rule) for every rule struct (csrc/include/fusedwd/rule.h describes one).
#define FUSEDWD_RULES(X) \
  X(AdamW)               \
  X(Sgdw)                \
  X(Rmspropw)            \
  X(Lion)                \
  X(Lamb)                \
  X(StableAdamW)

FUSEDWD_NS_BEGIN

// A rule's id (its position in FUSEDWD_RULES), and the number of rules.
enum class RuleId : int {
#define FUSEDWD_RULE_ID(R) R,
  FUSEDWD_RULES(FUSEDWD_RULE_ID)
#undef FUSEDWD_RULE_ID
      kCount
};

template <class R>
constexpr int rule_id();
#define FUSEDWD_RULE_ID(R)             \
  template <>                          \
  constexpr int rule_id<R>() {         \
    return static_cast<int>(RuleId::R); \
  }
FUSEDWD_RULES(FUSEDWD_RULE_ID)
#undef FUSEDWD_RULE_ID

// f(R{}) for the rule with this id; false when the id names no rule.
template <typename F>
bool with_rule(int id, F&& f) {
#define FUSEDWD_RULE_CASE(R)   \
  if (id == rule_id<R>()) {    \
    f(R{});                    \
    return true;               \
  }
  FUSEDWD_RULES(FUSEDWD_RULE_CASE)
#undef FUSEDWD_RULE_CASE
  return false;
}

FUSEDWD_NS_END
