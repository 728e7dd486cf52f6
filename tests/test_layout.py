"""Python and C++ agree on the segment-table layout, the dtype codes and every rule.

The kernels read raw int64/float64 tables that Python fills, so a column that
drifts in one language would silently feed the wrong numbers to the other.
This is the one place where each rule's C++ side (csrc/include/fusedwd/<rule>.h,
listed in rules.h) is checked against its spec (fusedwd/rules/<rule>.py):
hyperparameter columns, switches, the states each switch combination keeps and
the signedness of their 8-bit codes.
"""

import pytest

from fusedwd import _buckets, rules
from fusedwd._buckets import DTYPE_CODES
from fusedwd.optim import SGDW, AdamW, RMSpropW

_C = pytest.importorskip("fusedwd._C", reason="fusedwd._C is not built")

SEG_NAMES = ("SEG_P", "SEG_G", "SEG_S0", "SEG_S1", "SEG_S2", "SEG_STEP", "SEG_N", "SEG_HP", "SEG_INDEX", "SEG_MASTER",
             "SEG_SALT", "SEG_A0", "SEG_A1", "SEG_A2", "SEG_COLS", "CTL_INV_SCALE", "CTL_FOUND_INF", "CTL_CLIP",
             "CTL_SIZE")


def test_segment_columns():
    for name in SEG_NAMES:
        assert getattr(_buckets, name) == getattr(_C, name), name


def test_dtype_codes():
    assert {str(dt).removeprefix("torch."): code for dt, code in DTYPE_CODES.items()} == _C.DTYPES


def test_the_compiled_rules_are_the_registered_ones():
    assert sorted(_C.RULES) == sorted(rules.RULES)


@pytest.mark.parametrize("name", sorted(rules.RULES))
def test_rule_matches_its_spec(name):
    spec, compiled = rules.get(name), _C.RULES[name]
    assert compiled["columns"] == spec.columns
    assert compiled["switches"] == tuple(s.name for s in spec.switches)
    padded = list(spec.states) + [None] * (3 - len(spec.states))
    for column, state in enumerate(padded):
        if state is not None:
            assert compiled["signed"][column] == state.signed, state.name
    assert set(compiled["states"]) == set(spec.structures())
    for structure, kept in compiled["states"].items():
        slots = spec.slots(structure) + (None,) * (3 - len(spec.states))
        assert kept == tuple(slot is not None for slot in slots), structure


@pytest.mark.parametrize("cls, group", [
    (AdamW, dict(lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2, decay="decoupled", maximize=True, lr_max=0.1)),
    (SGDW, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.2, decay="l2", maximize=False, lr_max=0.1)),
    (RMSpropW, dict(lr=0.1, alpha=0.9, eps=1e-6, momentum=0.5, weight_decay=0.2, decay="independent",
                    maximize=False, lr_max=0.2)),
])
def test_hyper_row_follows_the_names(cls, group):
    row = cls.RULE.hyper_row(group)
    named = dict(zip(cls.RULE.columns, row))
    assert named["lr"] == 0.1
    assert named["grad_sign"] == (-1.0 if group["maximize"] else 1.0)
    expected = {"decoupled": (1 - 0.1 * 0.2, 0.0), "l2": (1.0, 0.2), "independent": (1 - 0.5 * 0.2, 0.0)}
    assert (named["decay_mult"], named["l2"]) == pytest.approx(expected[group["decay"]])
    for key in ("momentum", "dampening", "alpha", "eps"):
        if key in named:
            assert named[key] == group[key]
    if "beta1" in named:
        assert (named["beta1"], named["beta2"]) == group["betas"]


def test_cuda_module_agrees():
    # both modules read the same tables and compile the same rules: their layouts must be one
    K = pytest.importorskip("fusedwd._C_cuda", reason="fusedwd._C_cuda is not built")
    for name in SEG_NAMES:
        assert getattr(K, name) == getattr(_C, name), name
    assert K.DTYPES == _C.DTYPES
    assert K.RULES == _C.RULES
