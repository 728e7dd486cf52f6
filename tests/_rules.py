"""The test registry: one entry per rule, every test matrix generated from it (torch's optim_db).

A rule's tests are its entry here (the optimizer class, non-default numbers,
what turns each switch on) plus a hand-written check of its reference against
an independent formula (tests/test_reference.py). Everything else is derived
from the rule's spec (fusedwd/rules/<rule>.py): its structures, the states each
keeps and their 8-bit codes, its hyperparameter rows, and which suites run it
(rules x structures x decay modes x dtypes x backends x storage layouts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import fusedwd
from fusedwd import _buckets as B
from fusedwd import rules


@dataclass(frozen=True)
class RuleInfo:
    cls: type  # the optimizer
    hyperparameters: dict  # non-default numbers every configuration starts from
    switch_on: dict = field(default_factory=dict)  # per switch: the keyword arguments that turn it on
    small: tuple = ()  # states drawn small (|x| ~ 0.1; RMSprop's grad_avg, so that sq - ga^2 > 0)

    @property
    def rule(self) -> rules.Rule:
        return self.cls.RULE


INFOS = {
    "adamw": RuleInfo(fusedwd.AdamW, dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
                      switch_on={"amsgrad": dict(amsgrad=True)}),
    "sgdw": RuleInfo(fusedwd.SGDW, dict(lr=1e-2, weight_decay=0.3),
                     switch_on={"has_momentum": dict(momentum=0.8, dampening=0.25),
                                "nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True)}),
    "rmspropw": RuleInfo(fusedwd.RMSpropW, dict(lr=1e-3, alpha=0.9, eps=1e-5, weight_decay=0.1),
                         switch_on={"centered": dict(centered=True), "has_momentum": dict(momentum=0.6)},
                         small=("grad_avg",)),
    "lion": RuleInfo(fusedwd.Lion, dict(lr=3e-3, betas=(0.85, 0.98), weight_decay=0.3)),
    "lamb": RuleInfo(fusedwd.LAMB, dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                                        max_trust_ratio=5.0)),
    "stableadamw": RuleInfo(fusedwd.StableAdamW, dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
}
assert set(INFOS) == set(rules.RULES), "every rule of fusedwd.rules needs its entry in tests/_rules.py"
# The matrices below are the elementwise rules'. The two-phase rules (LAMB, StableAdamW: per-tensor
# sums) run on the CPU kernel and the reference only, without 8-bit states: their suite is
# tests/test_reductions.py.
TWO_PHASE = [n for n, info in INFOS.items() if info.rule.reduces]
NAMES = [n for n in INFOS if n not in TWO_PHASE]


def kwargs(name: str, structure: tuple, maximize: bool = False) -> dict[str, Any]:
    """The optimizer's keyword arguments for this structure: the entry's numbers, each switch's on-arguments."""
    info = INFOS[name]
    out = dict(info.hyperparameters)
    for switch, on in zip(info.rule.switches, structure):
        if on:
            out.update(info.switch_on[switch.name])
    if maximize:
        out["maximize"] = True
    return out


def structures(name: str) -> list[tuple]:
    """The rule's structures that a param group can have (SGDW's nesterov needs momentum)."""
    rule = INFOS[name].rule
    out = []
    for structure in rule.structures():
        group = rule.group(**kwargs(name, structure))
        if rule.structure(group) == structure:
            out.append(structure)
    return out


def richest(name: str) -> tuple:
    """The structure that keeps the most states (every switch on, where allowed)."""
    return max(structures(name), key=lambda s: (sum(x is not None for x in INFOS[name].rule.slots(s)), sum(s)))


def case_id(name: str, structure: tuple) -> str:
    on = [s.name for s, v in zip(INFOS[name].rule.switches, structure) if v]
    return "-".join([name] + on)


def state_names(name: str, structure: tuple, step: bool = True) -> list[str]:
    """The names in optimizer.state[p] after a step: the kept states, and ``step`` where torch keeps it."""
    rule = INFOS[name].rule
    names = [s for s in rule.slots(structure) if s is not None]
    return names + (["step"] if step and rule.step_in_state else [])


# (rule, structure) of every rule, and the richest structure of each
RULE_CASES = [(name, s) for name in NAMES for s in structures(name)]
RULE_CASE_IDS = [case_id(*c) for c in RULE_CASES]
RICHEST = [(name, richest(name)) for name in NAMES]
RICHEST_IDS = [case_id(*c) for c in RICHEST]
OTHER_CASES = [c for c in RULE_CASES if c not in RICHEST]
OTHER_CASE_IDS = [case_id(*c) for c in OTHER_CASES]

# config name -> (optimizer class, keyword arguments, state names compared): every structure of
# every rule, the richest maximizing
CONFIGS = {case_id(n, s): (INFOS[n].cls, kwargs(n, s, maximize=(n, s) in RICHEST), state_names(n, s))
           for n, s in RULE_CASES}
# one configuration per rule: the richest
RICH_CONFIGS = {n: CONFIGS[case_id(n, s)] for n, s in RICHEST}


# ---------------------------------------------------------------- kernel level
def used_states(name: str, structure: tuple) -> list[int]:
    """The segment-table state columns the rule reads and writes under these switches."""
    return [B.STATE_COLUMNS[k] for k, slot in enumerate(INFOS[name].rule.slots(structure)) if slot is not None]


def signed_state(name: str, column: int) -> bool:
    """Whether the state in this column takes the signed 8-bit code."""
    return INFOS[name].rule.states[column - B.SEG_S0].signed


def state_kind(name: str, column: int) -> str:
    """How a test draws the state in this column: "signed", "positive" (second moments) or "small"."""
    state = INFOS[name].rule.states[column - B.SEG_S0]
    if state.name in INFOS[name].small:
        return "small"
    return "signed" if state.signed else "positive"


def draw(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Random values of a state kind from standard normal ``x``."""
    return {"signed": x, "positive": x.abs() + 1.0, "small": 0.1 * x}[kind]


def hyper_rows(name: str, structure: tuple | None = None) -> torch.Tensor:
    """Two hyperparameter rows of non-default numbers (docs/design.md#hyperparameter-table):
    decoupled decay, then maximize with coupled L2 and other numbers."""
    info = INFOS[name]
    structure = richest(name) if structure is None else structure
    first = info.rule.group(**kwargs(name, structure), decay="decoupled")
    second = dict(first, decay="l2", maximize=True, weight_decay=0.05)
    for key, value in first.items():  # other numbers in the second row
        if key in ("lr", "eps") and isinstance(value, float):
            second[key] = value * 0.5
    return torch.tensor([info.rule.hyper_row(first), info.rule.hyper_row(second)], dtype=torch.float64)
