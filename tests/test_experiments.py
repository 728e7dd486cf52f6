"""The experiments' exact claims (reduced versions; statistical experiments only run)."""

import json
import math

import pytest

from fusedwd.experiments import __main__ as cli
from fusedwd.experiments import equilibrium, heatmap, propositions, quantization, schedules, sharing, spurious


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


def test_heatmap_runs_to_completion():
    pytest.importorskip("sklearn", reason="the heatmap experiment needs scikit-learn (pip install scikit-learn)")
    result = heatmap.run(quick=True)
    assert set(result["panels"]) == {"adam_l2", "adamw", "sgd_l2", "sgdw"}
    for p in result["panels"].values():
        grid = p["test_error_pct"]
        assert len(grid) == len(p["log2_lr"]) and all(len(row) == len(p["log2_wd"]) for row in grid), p["label"]
        assert all(0.0 <= e <= 100.0 for row in grid for e in row), p["label"]
        assert p["best_pct"] == min(min(row) for row in grid)
        assert 0.0 < p["basin"]["2"]["fraction"] <= 1.0


def test_schedules_runs_to_completion():
    pytest.importorskip("sklearn", reason="the schedules experiment needs scikit-learn (pip install scikit-learn)")
    result = schedules.run(quick=True)
    points = result["restart_points"]
    assert points == schedules.restart_points(result["t_0"], result["t_mult"], result["horizon"]) and len(points) >= 2
    for key in ("constant", "cosine_full", "adamwr"):
        assert len(result["anytime"][key]["error_pct"]) == len(points)
        assert all(0.0 <= e <= 100.0 for e in result["anytime"][key]["error_pct"])
    for row in result["normalized"]:
        assert [b["epochs"] for b in row["budgets"]] == result["budgets"]
        assert math.isfinite(row["slope_raw"]) and row["slope_normalized"] == pytest.approx(row["slope_raw"] + 0.5)


def test_restart_points_follow_t_mult():
    assert schedules.restart_points(10, 2, 150) == [10, 30, 70, 150]
    assert schedules.restart_points(10, 1, 35) == [10, 20, 30]


def test_digits_without_sklearn_says_what_to_install(monkeypatch):
    import builtins

    from fusedwd.experiments import _digits

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match=r"fusedwd\[experiments\]"):
        _digits.load(0)


@pytest.mark.parametrize("module, package", [("matplotlib", "matplotlib"), ("sklearn", "scikit-learn")])
def test_a_missing_extra_is_named_before_any_experiment_runs(monkeypatch, capsys, module, package):
    # `pip install fusedwd` does not install them: the CLI says which extra does, not a bare
    # ModuleNotFoundError from deep inside an experiment
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # import fails, as if not installed
    with pytest.raises(ModuleNotFoundError, match=rf"needs {package}.*pip install \"fusedwd\[experiments\]\""):
        cli.main(["propositions", "--quick"])


def test_heatmap_trains_no_decay_once_for_both_modes():
    # heatmap.py reuses the L2 panels' wd = 0 cells as the decoupled panels' no-decay runs
    pytest.importorskip("sklearn", reason="the digits experiments need scikit-learn (pip install scikit-learn)")
    from fusedwd.experiments import _digits

    runs = [_digits.train("adamw", decay, [1e-2, 1e-3], [0.0, 0.0], seed=3, epochs=2, period=2,
                          normalized=decay != "l2", eval_epochs=[1, 2]) for decay in ("l2", "independent")]
    assert runs[0] == runs[1]
