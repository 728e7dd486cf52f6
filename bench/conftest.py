"""pytest-benchmark options for bench/; kept out of the test suite.

``pytest tests/`` never reaches this directory. A bare ``pytest`` from the
repository root would, so the benchmarks here only run when benchmarking is
asked for explicitly (``--benchmark-only`` or ``--benchmark-enable``).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fusedwd bench")
    group.addoption("--bench-scale", type=float, default=1.0,
                    help="multiply each case's layer/tensor count (see python -m bench.run --scale)")
    group.addoption("--bench-sizes", default="gpt2,resnet50,lora,mlp,synthetic", help="comma list of cases")
    group.addoption("--bench-device", default="cpu")
    group.addoption("--bench-dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False):
        return
    skip = pytest.mark.skip(reason="benchmark: run `pytest bench/ --benchmark-only`")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
