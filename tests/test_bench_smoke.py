"""The benchmark pipeline runs end to end (tiny shapes; no timing is asserted)."""

import pytest


def test_bench_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.smoke import run_smoke

    results = run_smoke(tmp_path)
    assert {c["name"] for c in results["cases"]} == {"mlp", "synthetic"}


def test_precision_bench_smoke(tmp_path):
    pytest.importorskip("fusedwd._C")
    from bench.precision import smoke

    result = smoke(str(tmp_path))
    names = {r["provider"] for r in result["rows"]}
    assert {"fusedwd-master", "fusedwd-clip", "torch-clip+fused", "torch-fused"} <= names
    assert all(r["median_ms"] > 0 and r["pct_of_floor"] > 0 for r in result["rows"])
    assert (tmp_path / "precision.json").stat().st_size > 0
