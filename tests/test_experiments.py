"""The experiments' exact claims (reduced versions; statistical experiments only run)."""

import json

import pytest

from fusedwd.experiments import __main__ as cli
import math

from fusedwd.experiments import equilibrium, propositions, quantization, sharing, spurious


def test_propositions_hold_exactly():
    result = propositions.run()
    for check in result["checks"]:
        assert check["holds"], check


def test_adamw_equilibrium_matches_the_formulas_within_2_percent():
    result = equilibrium.run(quick=True)
    for r in result["runs"]:
        assert r["angle_vs_predicted"] == pytest.approx(1.0, abs=0.02), r
        assert r["norm_vs_predicted"] == pytest.approx(1.0, abs=0.02), r
    # and independent of the gradient scale (1 vs 100)
    a, b = result["runs"]
    assert a["angle"] == pytest.approx(b["angle"], rel=1e-3) and a["norm"] == pytest.approx(b["norm"], rel=1e-3)


def test_adam_l2_equilibrium_depends_on_the_gradient_scale():
    kw = dict(dim=256, lr=0.01, wd=0.1, steps=4000)
    small = equilibrium.simulate("l2", 1.0, **kw)
    large = equilibrium.simulate("l2", 100.0, **kw)
    assert large[1] > 2 * small[1], (small, large)


def test_cli_writes_json_and_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("FUSEDWD_NO_PROGRESS", "1")
    assert cli.main(["propositions", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "propositions.json").read_text())
    assert data["meta"]["experiment"] == "propositions" and len(data["checks"]) == 5
    assert (tmp_path / "propositions.png").stat().st_size > 0


def test_sharing_runs_to_completion():
    # statistical: run, not asserted beyond a well-formed, finite result
    result = sharing.run(quick=True)
    assert {(r["decay"], r["uses"]) for r in result["runs"]} == {(d, k) for d in ("decoupled", "l2") for k in (1, 64)}
    assert all(math.isfinite(r["shrink_per_step"]) for r in result["runs"])


def test_spurious_runs_to_completion():
    result = spurious.run(quick=True)
    assert {r["decay"] for r in result["runs"]} == {"decoupled", "l2"}
    for r in result["runs"]:
        assert 0.0 <= r["spurious_share"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0, r


def test_quantization_runs_to_completion():
    result = quantization.run(quick=True)
    for r in result["runs"]:
        assert 0.0 <= r["acc_int8"] <= 1.0 and 0.0 < r["weight_error"] < 0.05, r
