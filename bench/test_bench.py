"""The bench cases as pytest-benchmark benchmarks: one per case and provider.

    pytest bench/ --benchmark-only                      # full-size cases (minutes)
    pytest bench/ --benchmark-only --bench-scale 0.1 --bench-sizes mlp,synthetic

``python -m bench.run`` is the primary tool: it interleaves the providers of a
case and reports ratios to torch fused and to the floor. This file serves
pytest-benchmark's workflow instead (saved runs, --benchmark-compare across
commits), so each benchmark runs its provider alone.
"""

from __future__ import annotations

import pytest
import torch

from bench import cases, providers
from bench.run import DTYPES, default_providers

_ROUNDS, _WARMUP = 10, 2


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case_provider" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    names, _ = default_providers(torch.device(cfg.getoption("bench_device")))
    sizes = [s for s in cfg.getoption("bench_sizes").split(",") if s]
    # Case-major order, so one case's tensors are built once and freed before the next.
    pairs = [(c, p) for c in sizes for p in names]
    metafunc.parametrize("case_provider", pairs, ids=[f"{c}-{p}" for c, p in pairs])


_cache: dict[tuple, tuple] = {}


def _case_tensors(name: str, scale: float, dtype: torch.dtype, device: torch.device):
    """The case and its base tensors, keeping only the most recent case alive."""
    key = (name, scale, dtype, device)
    if key not in _cache:
        _cache.clear()
        case = cases.build([name], scale)[0]
        _cache[key] = (case, *providers.make_base(case.shapes, dtype, device))
    return _cache[key]


def test_adamw_step(benchmark, case_provider, request: pytest.FixtureRequest) -> None:
    case_name, name = case_provider
    cfg = request.config
    device = torch.device(cfg.getoption("bench_device"))
    dtype = DTYPES[cfg.getoption("bench_dtype")]
    case, base, grads = _case_tensors(case_name, cfg.getoption("bench_scale"), dtype, device)
    if name == providers.FLOOR:
        provider = providers.floor(case.num_params, dtype, device, amsgrad=False)
    elif name in providers.TORCH_VARIANTS:
        provider = providers.torch_adamw(name, base, grads, amsgrad=False)
    elif name == providers.DEEPSPEED:
        provider = providers.deepspeed_adamw(base, grads, amsgrad=False)
    else:
        provider = providers.fusedwd_adamw(name[len(providers.FUSEDWD_PREFIX):], base, grads, amsgrad=False)
    step = provider.step
    if device.type == "cuda":
        def step() -> None:
            provider.step()
            torch.cuda.synchronize(device)
    bpp = providers.bytes_per_param(dtype, amsgrad=False)
    benchmark.extra_info.update(num_tensors=case.num_tensors, num_params=case.num_params, bytes_per_param=bpp,
                                description=provider.description)
    benchmark.pedantic(step, rounds=_ROUNDS, warmup_rounds=_WARMUP, iterations=1)
