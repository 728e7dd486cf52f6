"""The registry of update rules: every module of this package that defines ``RULE``.

A rule is one module here (its spec, reference and Triton helpers) plus its
C++ header and CUDA translation unit and its optimizer class
(docs/adding-a-rule.md). Modules are found, not listed, so a new rule's module
registers itself by existing; tests/test_layout.py checks that the compiled
modules know the same rules with the same columns.
"""

from __future__ import annotations

import importlib
import pkgutil

from ._rule import SHARED_COLUMNS, Rule, State, Switch

__all__ = ["RULES", "get", "Rule", "State", "Switch", "SHARED_COLUMNS"]


def _discover() -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        rule = getattr(importlib.import_module(f"{__name__}.{info.name}"), "RULE", None)
        if isinstance(rule, Rule):
            if rule.name != info.name:
                raise ImportError(f"fusedwd/rules/{info.name}.py defines the rule {rule.name!r}: name them alike")
            rules[rule.name] = rule
    return rules


# name -> Rule, in alphabetical order
RULES: dict[str, Rule] = _discover()


def get(name: str) -> Rule:
    """The rule called ``name`` ("adamw"), or a ValueError listing the known ones."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r} (known: {', '.join(RULES)})") from None
