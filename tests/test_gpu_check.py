"""bench/gpu_check.py (`make gpu-check`): what can be checked without a GPU.

Its correctness checks run on CPU tensors with the CPU backend (against torch's
fused CPU AdamW and the CPU kernel); without a GPU the command says so in one
line and exits 0. The GPU-only parts (no host sync, CUDA graphs, a tensor over
2^31 elements, timing) run where there is one: `make gpu-check`.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from bench import gpu_check

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "nothing to check" in lines[0] and "no CUDA GPU" in lines[0], done.stdout


def test_correctness_checks_pass_on_the_cpu_backend(tmp_path):
    pytest.importorskip("fusedwd._C")
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    names = [c["name"] for c in report["checks"]]
    assert all(c["ok"] for c in report["checks"]), [c for c in report["checks"] if not c["ok"]]
    for expected in ["cpu fp32", "cpu bf16", "cpu bf16+master", "cpu int8", "cpu int8+master",
                     "cpu misaligned views float32", "cpu misaligned views bfloat16", "cpu 400 param groups",
                     "cpu GradScaler, inf injected", "cpu max_grad_norm float32", "cpu max_grad_norm float64"]:
        assert expected in names, (expected, names)


def test_a_difference_is_reported_bad():
    import fusedwd

    values = gpu_check._random(gpu_check.SHAPES, torch.float32, seed=0)
    a, b = gpu_check._params(values, "cpu"), gpu_check._params(values, "cpu")
    opts = [fusedwd.AdamW(a, backend="reference"), fusedwd.AdamW(b, backend="reference")]
    gpu_check._run_steps(list(zip(opts, (a, b))), gpu_check.SHAPES, torch.float32, 2, ["cpu", "cpu"])
    assert gpu_check._compare(opts[0], a, opts[1], b, torch.float32)[0]
    with torch.no_grad():
        a[3][7] += 1e-4 * a[3][7].abs() + 1e-30  # a few hundred ulps
    ok, worst, same, total = gpu_check._compare(opts[0], a, opts[1], b, torch.float32)
    assert not ok and worst > gpu_check.ULPS[torch.float32] and same == total - 1


def test_targets_pass_and_miss():
    report = gpu_check.Report(deadline=float("inf"))
    fast = {"fusedwd-cuda": 1.0, "floor": 0.95, "torch-fused": 1.2}
    slow = {"fusedwd-cuda": 2.0, "floor": 0.95, "torch-fused": 1.2}
    gpu_check.targets(report, {("gpt2", "fp32"): fast, ("synthetic", "fp32"): slow, ("gpt2", "bf16+master"): fast,
                               ("gpt2", "int8+master"): slow}, ["cuda"])
    results = {t["target"]: t["result"] for t in report.targets}
    assert results == {
        "cuda GPT-2 fp32 within 10% of the copy floor": "PASS", "cuda GPT-2 fp32 >= 1.0x torch fused": "PASS",
        "cuda 10,000 x 1,000 >= 3x torch fused": "MISS",
        "cuda GPT-2 bf16 + master within 10% of its byte floor": "PASS",
        "cuda GPT-2 int8 + master >= 1.4x torch fused fp32": "MISS",
    }


def test_two_phase_targets_pass_and_miss():
    # issue 16's rows: a backend that steps the rule gets three lines per case and rule, one without
    # a kernel for it (no row) none
    report = gpu_check.Report(deadline=float("inf"))
    good = {"fusedwd-cuda": 1.2, "adamw-fusedwd-cuda": 1.0, "floor": 1.1, "torch-foreach": 6.1}
    slow = {"fusedwd-cuda": 1.6, "adamw-fusedwd-cuda": 1.0, "floor": 1.1, "torch-foreach": 4.0}
    gpu_check.two_phase_targets(report, {("gpt2", "LAMB"): good, ("mlp", "StableAdamW"): slow,
                                         ("mlp", "LAMB"): {"adamw-fusedwd-cuda": 1.0, "floor": 1.0,
                                                           "torch-foreach": 2.0}}, ["cuda"])
    results = {t["target"]: t["result"] for t in report.targets}
    assert results == {
        "cuda GPT-2 LAMB <= 1.5x the AdamW step": "PASS",
        "cuda GPT-2 LAMB within 15% of its byte floor": "PASS",
        "cuda GPT-2 LAMB >= 3x pure torch": "PASS",
        "cuda deep MLP StableAdamW <= 1.4x the AdamW step": "MISS",
        "cuda deep MLP StableAdamW within 15% of its byte floor": "MISS",
        "cuda deep MLP StableAdamW >= 5x pure torch": "MISS",
    }
