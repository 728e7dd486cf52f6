"""The benchmark pipeline runs end to end (tiny shapes; no timing is asserted)."""

import pytest


def test_bench_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.smoke import run_smoke

    results = run_smoke(tmp_path)
    assert {c["name"] for c in results["cases"]} == {"mlp", "synthetic"}
