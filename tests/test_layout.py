"""Python and C++ agree on the segment-table and hyperparameter layouts.

The kernels read raw int64/float64 tables that Python fills, so a column that
drifts in one language would silently feed the wrong numbers to the other.
"""

import pytest

from fusedwd import _buckets
from fusedwd.optim import SGDW, AdamW, RMSpropW
from fusedwd._buckets import DTYPE_CODES

_C = pytest.importorskip("fusedwd._C", reason="fusedwd._C is not built")


def test_segment_columns():
    for name in ("SEG_P", "SEG_G", "SEG_S0", "SEG_S1", "SEG_S2", "SEG_STEP", "SEG_N", "SEG_HP", "SEG_INDEX", "SEG_COLS"):
        assert getattr(_buckets, name) == getattr(_C, name), name


@pytest.mark.parametrize("cls", [AdamW, SGDW, RMSpropW])
def test_hyperparameter_columns(cls):
    table = getattr(_C, cls.RULE.name.upper() + "_HP")
    assert table == {name: i for i, name in enumerate(cls.RULE.columns)}
    assert getattr(_C, cls.RULE.name.upper() + "_HP_COLS") == len(cls.RULE.columns)


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


def test_dtype_codes():
    assert {str(dt).removeprefix("torch."): code for dt, code in DTYPE_CODES.items()} == _C.DTYPES


def test_cuda_module_agrees():
    # both modules read the same tables: their layouts must be one
    K = pytest.importorskip("fusedwd._C_cuda", reason="fusedwd._C_cuda is not built")
    for name in ("SEG_P", "SEG_G", "SEG_S0", "SEG_S1", "SEG_S2", "SEG_STEP", "SEG_N", "SEG_HP", "SEG_INDEX", "SEG_COLS"):
        assert getattr(K, name) == getattr(_C, name), name
    assert K.DTYPES == _C.DTYPES
    for cls in (AdamW, SGDW, RMSpropW):
        assert getattr(K, cls.RULE.name.upper() + "_HP_COLS") == len(cls.RULE.columns)
        assert hasattr(K, cls.RULE.name + "_step")
