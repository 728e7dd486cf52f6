"""backend='auto' on CUDA tensors: the CUDA kernels where they hold code for the device, else Triton,
else the reference with one warning (fusedwd/_cuda_ext.py unusable, fusedwd/optim/_plan.py resolve_backend).

No GPU is needed: a parameter is only asked for its device, and the probes are patched.
"""

import types
import warnings

import pytest
import torch

from fusedwd import _cuda_ext, _ext
from fusedwd.optim import _plan

CUDA0 = torch.device("cuda", 0)
KERNEL_IMAGE = "cudaFuncGetAttributes on cuda:0: cudaErrorNoKernelImageForDevice: no kernel image is available"


@pytest.fixture
def device_probes(monkeypatch):
    """Patch what the CUDA module and Triton say about cuda:0; returns the dict to fill."""
    say = {"cuda": None, "triton": None}
    monkeypatch.setattr(_cuda_ext, "unusable", lambda device: say["cuda"])
    monkeypatch.setattr(_cuda_ext, "cuda", lambda: None)
    monkeypatch.setattr(_cuda_ext, "_warned_reference", False)
    monkeypatch.setattr(_ext, "has_triton", lambda: say["triton"] != "missing")
    monkeypatch.setattr(_ext, "triton_unusable", lambda device: say["triton"])
    monkeypatch.setattr(_ext, "triton", lambda device: None)
    return say


def _resolve(requested):
    return _plan.resolve_backend(requested, types.SimpleNamespace(device=CUDA0))


def test_auto_takes_the_cuda_kernels_where_they_run(device_probes):
    assert _resolve("auto") == "cuda"


def test_auto_falls_back_to_triton_on_a_gpu_without_cuda_code(device_probes):
    device_probes["cuda"] = "fusedwd._C_cuda holds no code for cuda:0 (compute capability 7.5)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Triton is a compiled kernel too: no warning
        assert _resolve("auto") == "triton"


@pytest.mark.parametrize("name", ["lamb", "stableadamw"])
def test_the_two_phase_rules_take_the_cuda_kernels_as_every_rule(device_probes, name):
    # the two-phase rules have a CUDA kernel (csrc/cuda/phases.cuh): CUDA where it runs, else Triton
    from fusedwd import rules

    p = types.SimpleNamespace(device=CUDA0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _plan.resolve_backend("auto", p, rules.get(name)) == "cuda"
        assert _plan.resolve_backend("cuda", p, rules.get(name)) == "cuda"
        device_probes["cuda"] = KERNEL_IMAGE
        assert _plan.resolve_backend("auto", p, rules.get(name)) == "triton"


@pytest.mark.parametrize("triton", ["missing", "backend='triton' needs a CUDA device"])
def test_auto_warns_once_when_a_cuda_bucket_takes_the_reference(device_probes, triton):
    device_probes["cuda"] = "fusedwd._C_cuda holds no code for cuda:0 (compute capability 7.0)"
    device_probes["triton"] = triton
    with pytest.warns(RuntimeWarning, match="no compiled kernel can step parameters on cuda:0.*compute capability 7.0"):
        assert _resolve("auto") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _resolve("auto") == "reference"  # once per process


def test_backend_cuda_on_a_gpu_without_code_is_a_clear_error(device_probes):
    device_probes["cuda"] = "fusedwd._C_cuda holds no code for cuda:0 (compute capability 7.5): rebuild with " \
                            "FUSEDWD_CUDA_ARCHS=75"
    with pytest.raises(RuntimeError, match="backend='cuda': .*FUSEDWD_CUDA_ARCHS=75"):
        _resolve("cuda")


def test_each_device_is_probed_once(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(device_count=lambda: 2, status=lambda: "", ARCHS="80;90",
                                 probe=lambda index: calls.append(index) or (KERNEL_IMAGE if index == 1 else ""))
    monkeypatch.setattr(_cuda_ext, "_cuda", fake)
    monkeypatch.setattr(_cuda_ext, "_probed", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    for _ in range(3):
        assert _cuda_ext.unusable(torch.device("cuda", 0)) is None
        reason = _cuda_ext.unusable(torch.device("cuda", 1))
    assert calls == [0, 1]
    assert "cuda:1 (compute capability 7.5)" in reason and "sm_80, sm_90" in reason
    assert "FUSEDWD_CUDA_ARCHS=75" in reason and "cudaErrorNoKernelImageForDevice" in reason


def test_the_module_says_why_without_a_gpu():
    if _cuda_ext.device_count() > 0:
        pytest.skip("a GPU is present")
    reason = _cuda_ext.unusable(CUDA0)
    assert reason is not None and ("failed to import" in reason or "no usable GPU" in reason)


def test_probe_never_raises():
    C = pytest.importorskip("fusedwd._C_cuda")
    if C.device_count() > 0:
        assert C.probe(0) in ("",) or "cudaError" in C.probe(0)
    else:
        assert "cudaFuncGetAttributes on cuda:0: cudaError" in C.probe(0)
