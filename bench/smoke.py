"""A seconds-long run of the whole benchmark pipeline, for the test suite.

    from bench.smoke import run_smoke
    results = run_smoke(tmp_path)

It checks that the pipeline works (shape sets, providers, table, JSON, plot),
not how fast anything is: the shapes are tiny and the repeats few.
"""

from __future__ import annotations

import json
import math
import os

from bench import providers, two_phase
from bench.run import parse_args, run

SMOKE_ARGS = ["--quick", "--sizes", "mlp,synthetic", "--scale", "0.01", "--repeats", "2", "--warmup", "1",
              "--no-progress"]


def run_smoke(out_dir: str | os.PathLike) -> dict:
    """Run the benchmark on tiny shapes into ``out_dir``; return its results, raising AssertionError if malformed."""
    out_dir = os.fspath(out_dir)
    argv = SMOKE_ARGS + ["--out", out_dir]
    results = run(parse_args(argv), command=["python", "-m", "bench.run", *argv])
    requested = results["config"]["providers"]
    assert [c["name"] for c in results["cases"]] == ["mlp", "synthetic"], results["cases"]
    for case in results["cases"]:
        measured, skipped = set(case["providers"]), set(case["skipped"])
        assert measured | skipped == set(requested), (case["name"], measured, skipped, requested)
        # The torch baselines and the floor never depend on the fusedwd build.
        assert {*providers.TORCH_VARIANTS, providers.FLOOR} <= measured, (case["name"], case["skipped"])
        for name, row in case["providers"].items():
            assert row["n"] == 2 and all(s > 0 and math.isfinite(s) for s in row["samples_ms"]), (name, row)
            assert row["speedup_vs_torch_fused"] > 0 and row["pct_of_floor"] > 0, (name, row)
    # the two-phase rules' rows (bench/two_phase.py) on the mlp case, where the CPU kernel is built
    rows = {(c["name"], c["rule"]): c for c in results["two_phase"]}
    if not two_phase.unavailable():
        assert set(rows) == {("mlp", rule) for rule in providers.TWO_PHASE_RULES}, set(rows)
        for (_, rule), case in rows.items():
            assert set(case["providers"]) == {providers.FLOOR, two_phase.ADAMW, two_phase.RULE_ROW,
                                              providers.TORCH_FOREACH}, (rule, case["skipped"])
            for name, row in case["providers"].items():
                assert row["vs_adamw"] > 0 and row["pct_of_floor"] > 0 and row["speedup_vs_torch"] > 0, (name, row)
    with open(os.path.join(out_dir, "results.json")) as f:
        assert json.load(f)["cases"][0]["num_params"] == results["cases"][0]["num_params"]
    assert os.path.getsize(os.path.join(out_dir, "speedup.png")) > 0
    return results
