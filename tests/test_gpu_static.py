"""Every GPU kernel's machine code, checked without a GPU (bench/gpu_static.py).

One run of ``python -m bench.gpu_static --json`` (in a subprocess, without
TRITON_INTERPRET) compiles every Triton variant for sm_80 and sm_90 with
Triton's own ptxas and reads every kernel of the built fusedwd._C_cuda; each
test below then checks one kernel on one architecture: no spill, every buffer
of the aligned fast path moved at full vector width, no layout conversion
left in that fast path, and the PTX the rounding relies on.

The Triton kernels whose buffers have different widths (16-bit parameters
with fp32 masters or states, fp32 parameters with 16-bit or 8-bit states)
give every buffer one per-thread width (fusedwd/triton/_kernels.py
_vector_width), so their fast path has no layout conversion either, and
their 16-bit buffers move in 64-bit accesses (issue 14 defect 6).

Compiles are cached in build/gpu_static_cache (Triton's cache, keyed by the
kernels' source): the first run after a kernel change compiles 236 (118
variants x sm_80 and sm_90: 25 minutes on this project's 2-core machine at a
load average of 17; 192 without Lion took 7.5 minutes) and 128 of the
two-phase rules (both phases in 16 layouts x 2 archs: 385 s with 2 jobs, loaded
machine), later runs take about 20 s (this file: 36 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import fusedwd
from bench import gpu_static
from bench.gpu_static import RICHEST, RULES, SWITCHES, TWO_PHASE_RULES, Variant

from _layouts import LAYOUTS, Q8_LAYOUTS

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = gpu_static.ARCHS


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _variants() -> list[Variant]:
    """The Triton variants, from the test suite's own layout lists (gpu_static derives them from the
    launchers' checks; test_the_variants_are_every_layout compares the two)."""
    out = []
    for p, s, master, sr in LAYOUTS + Q8_LAYOUTS:
        every = (p == s and not (master or sr)) or (p == torch.float32 and s == torch.uint8)
        for rule in RULES:
            for switches in SWITCHES[rule] if every else [RICHEST[rule]]:
                out.append(Variant(rule, switches, _name(p), _name(s), master, sr))
    # the two-phase rules: both phases' kernels in every layout but 8-bit states
    out += [Variant(rule, (), _name(p), _name(s), master, sr, phase)
            for p, s, master, sr in LAYOUTS for rule in TWO_PHASE_RULES for phase in (1, 2)]
    return out


def _cuda_kernels() -> list[gpu_static.CudaKernel]:
    """One CUDA kernel per storage layout, whatever the rules (csrc/cuda/step.cuh step_kernel<L, Q8>), and one
    two-phase kernel per layout without 8-bit states (csrc/cuda/phases.cuh phases_kernel<L>)."""
    return ([gpu_static.CudaKernel(_name(p), _name(s), master, sr) for p, s, master, sr in LAYOUTS + Q8_LAYOUTS]
            + [gpu_static.CudaKernel(_name(p), _name(s), master, sr, phases=True) for p, s, master, sr in LAYOUTS])


TRITON = _variants()
CUDA = _cuda_kernels()
try:
    import fusedwd._C_cuda as _C_cuda

    CUDA_ARCHS = _C_cuda.ARCHS.split(";")
except ImportError:
    _C_cuda, CUDA_ARCHS = None, []


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """bench/gpu_static.py's JSON report: {(kind, variant name, arch): entry}."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    if gpu_static.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found (the CUDA toolkit's, or Triton's NVIDIA backend)")
    out = tmp_path_factory.mktemp("gpu_static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "bench.gpu_static", "--json", str(out), "--quiet"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=3600)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    return {(e["kind"], e["variant"], str(e["arch"])): e for e in data["entries"]}


def _entry(report, kind, variant, arch):
    key = (kind, variant.name, str(arch))
    assert key in report, f"{kind} {variant.name} sm_{arch} missing from the report"
    return report[key]


def test_the_variants_are_every_layout(report):
    assert {k[1] for k in report if k[0] == "triton"} == {v.name for v in TRITON}
    # every switch combination in the 4 single-dtype layouts and in 8-bit states of fp32 parameters,
    # the richest one in the 12 other layouts and the 5 other 8-bit ones (96 for three rules, 118 with Lion)
    # (96 for three rules, 118 with Lion), and both phases of each two-phase rule in the 16 layouts (64)
    combinations = sum(len(SWITCHES[rule]) for rule in RULES)
    assert len(TRITON) == (combinations * 4 + len(RULES) * 12 + combinations + len(RULES) * 5
                           + len(TWO_PHASE_RULES) * 2 * 16)
    # every rule of the registry, elementwise or two-phase
    assert set(RULES) == {n for n, r in fusedwd.rules.RULES.items() if not r.reduces}, "every rule is compiled"
    assert set(TWO_PHASE_RULES) == {n for n, r in fusedwd.rules.RULES.items() if r.reduces}
    # one CUDA kernel per storage layout (16 + 6), each with a path per rule and switch combination, and
    # one two-phase kernel per layout without 8-bit states (16), a path per two-phase rule and phase
    assert len(CUDA) == len(LAYOUTS) + len(Q8_LAYOUTS) + len(LAYOUTS) == 38
    assert {k.name for k in CUDA} == {k.name for k in gpu_static.cuda_kernels()}
    if _C_cuda is not None:
        assert {(k[1], k[2]) for k in report if k[0] == "cuda"} == {(v.name, a) for v in CUDA for a in CUDA_ARCHS}
        for (kind, _, _), entry in report.items():
            if kind == "cuda" and entry["variant"].startswith("phases "):
                assert entry["paths"] == 2 * len(TWO_PHASE_RULES)
            elif kind == "cuda":
                assert entry["paths"] == sum(len(SWITCHES[rule]) for rule in RULES)


def _triton_params():
    return [pytest.param(v, arch, id=f"{v.name.replace(' ', '-')}-sm{arch}") for v in TRITON for arch in ARCHS]


@pytest.mark.parametrize("variant, arch", _triton_params())
def test_triton_kernel_does_not_spill(report, variant, arch):
    assert gpu_static.problems(_entry(report, "triton", variant, arch))["spills"] == []


@pytest.mark.parametrize("variant, arch", _triton_params())
def test_triton_fast_path_moves_every_buffer_at_full_width(report, variant, arch):
    entry = _entry(report, "triton", variant, arch)
    # the check is never vacuous: every kernel reads and writes some buffer it must move in vectors;
    # only a mixed-width kernel whose stores are all 16-bit beside fp32 (phase 1 of fp32 parameters
    # with 16-bit states, phase 2 of 16-bit parameters with fp32 states) has no 128-bit store to make
    assert entry["expected_loads_128"] > 0
    assert entry["expected_stores_128"] > 0 or (entry["mixed_width"] and entry["phase"]
                                                and entry["expected_stores_64"] > 0)
    assert gpu_static.problems(entry)["vectors"] == []


@pytest.mark.parametrize("variant, arch", _triton_params())
def test_triton_fast_path_has_no_layout_conversion(report, variant, arch):
    assert gpu_static.problems(_entry(report, "triton", variant, arch))["conversions"] == []


@pytest.mark.parametrize("variant, arch", _triton_params())
def test_triton_ptx_rounds_as_the_cpu_kernel(report, variant, arch):
    assert gpu_static.problems(_entry(report, "triton", variant, arch))["ptx"] == []


def _cuda_params():
    return [pytest.param(v, arch, id=f"{v.name.replace(' ', '-')}-sm{arch}") for v in CUDA for arch in CUDA_ARCHS]


needs_cuda_module = pytest.mark.skipif(_C_cuda is None, reason="fusedwd._C_cuda is not built")


@needs_cuda_module
@pytest.mark.parametrize("variant, arch", _cuda_params())
def test_cuda_kernel_does_not_spill(report, variant, arch):
    assert gpu_static.problems(_entry(report, "cuda", variant, arch))["spills"] == []


@needs_cuda_module
@pytest.mark.parametrize("variant, arch", _cuda_params())
def test_cuda_vector_path_moves_every_buffer_at_full_width(report, variant, arch):
    entry = _entry(report, "cuda", variant, arch)
    if variant.q8:
        pytest.skip("8-bit states: one element per thread and quant block (test_cuda_ext checks the byte accesses)")
    if variant.phases:
        pytest.skip("the two-phase kernels: one element per access, a warp's lanes on consecutive elements")
    assert entry["expected_loads_128"] > 0 and entry["expected_stores_128"] > 0
    assert gpu_static.problems(entry)["vectors"] == []


def test_problems_catch_what_they_check():
    # the verdicts can fail: a spill, a missing vector, a conversion and bad PTX are each reported
    entry = dict(spill_bytes=8, stack_bytes=8, local_bytes=0, loads_128=3, expected_loads_128=4, stores_128=2,
                 expected_stores_128=2, buffers_read=["param:float32"], buffers_written=["param:float32"],
                 fast_path_conversions=["float32: #a -> #b"],
                 ptx=dict(approximate_math=["div.approx.f32"], fma=1, arrival=False, arithmetic_shift=True,
                          q8_encode=False, prologue_atomics=1, prologue_barriers=0))
    found = gpu_static.problems(entry)
    assert [len(found[k]) for k in ("spills", "vectors", "conversions", "ptx")] == [1, 1, 1, 6]
    clean = dict(entry, spill_bytes=0, stack_bytes=0, loads_128=4, fast_path_conversions=[],
                 ptx=dict(approximate_math=[], fma=0, arrival=True, arithmetic_shift=False, q8_encode=True,
                          prologue_atomics=0, prologue_barriers=0))
    assert all(v == [] for v in gpu_static.problems(clean).values())


def test_fast_path_conversions_are_read_from_the_fast_path_only():
    ttgir = "\n".join([
        "#blocked = #ttg.blocked<{sizePerThread = [8], threadsPerWarp = [32], warpsPerCTA = [4], order = [0]}>",
        "#blocked1 = #ttg.blocked<{sizePerThread = [4], threadsPerWarp = [32], warpsPerCTA = [4], order = [0]}>",
        "  scf.if %vector_54 {",
        "    %1 = ttg.convert_layout %m : tensor<1024xf32, #blocked> -> tensor<1024xf32, #blocked1> loc(#l)",
        "    %2 = scf.if %c -> (f64) {",
        "    } else {",
        "    }",
        "  } else {",
        "    %3 = ttg.convert_layout %v : tensor<1024xf32, #blocked> -> tensor<1024xf32, #blocked1> loc(#l)",
        "  }",
    ])
    assert gpu_static.fast_path_conversions(ttgir) == ["f32: #blocked(8/thread) -> #blocked1(4/thread)"]
    with pytest.raises(ValueError, match="FAST_PATH_CONDITION"):
        gpu_static.fast_path_conversions(ttgir.replace("%vector_54", "%other"))
    # a fast path that returns values (a two-phase rule's phase 1: its terms)
    returning = ttgir.replace("  scf.if %vector_54 {", "  %5:2 = scf.if %vector_54 -> (tensor<1024xf64, #blocked>, "
                                                       "tensor<1024xf64, #blocked>) {")
    assert gpu_static.fast_path_conversions(returning) == ["f32: #blocked(8/thread) -> #blocked1(4/thread)"]


def test_prologue_follows_the_control_flow_to_the_first_data_load():
    # the shortest path from the entry to the first vector load: the skipped branch and the masked
    # block laid out before the fast path are not counted; the barrier and atomic after it neither
    ptx = "\n".join([
        ".visible .entry k(",
        ")",
        "{",
        "\tld.global.b32 { %r1 }, [ %rd1 + 0 ];",
        "\tsetp.ne.b32 %p1, %r1, 0;",
        "\t@%p1 bra $L__BB0_9;",
        "\tld.global.b64 { %rd2 }, [ %rd3 + 0 ];",
        "\t@%p2 bra $L__BB0_4;",
        "\tbar.sync 0;",
        "\tld.global.b32 { %r2 }, [ %rd2 + 0 ];",
        "\tbra.uni $L__BB0_9;",
        "$L__BB0_4:",
        "\tadd.s64 %rd4, %rd2, 16;",
        "\t@%p3 ld.global.v4.b32 { %r3, %r4, %r5, %r6 }, [ %rd4 + 0 ];",
        "\tbar.sync 0;",
        "\tatom.global.gpu.release.add.u64 %rd5, [ %rd6 + 0 ], %rd7;",
        "$L__BB0_9:",
        "\tret;",
        "}",
    ])
    assert gpu_static._prologue(ptx) == dict(prologue_instructions=6, prologue_loads=2, prologue_atomics=0,
                                             prologue_barriers=0)
    # an atomic on the way is counted (problems() then reports it)
    early = ptx.replace("\tld.global.b64 { %rd2 }", "\tatom.global.gpu.acq_rel.add.u64 %rd8, [ %rd9 + 0 ], 1;\n"
                                                     "\tld.global.b64 { %rd2 }")
    assert gpu_static._prologue(early)["prologue_atomics"] == 1
