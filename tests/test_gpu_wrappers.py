"""The optimizers' GPU backends against the reference, on a GPU (skipped without one)."""

import pytest
import torch

import fusedwd

from _helpers import AWKWARD_SHAPES, compare_optimizers, random_grads
from _rules import RICH_CONFIGS

GPU_BACKENDS = [b for b in fusedwd.available_backends("cuda") if b != "reference"] if torch.cuda.is_available() else []
pytestmark = pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device, or no GPU backend built")

CONFIGS = list(RICH_CONFIGS.values())  # every rule in its richest structure (tests/_rules.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("decay", ["decoupled", "independent", "l2"])
@pytest.mark.parametrize("cls, kw, states", CONFIGS, ids=lambda c: getattr(c, "__name__", ""))
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
def test_gpu_backend_matches_reference(backend, cls, kw, states, decay, dtype):
    gen = torch.Generator().manual_seed(0)
    host = [torch.randn(s, generator=gen).to(dtype) for s in AWKWARD_SHAPES]
    a = [torch.nn.Parameter(t.cuda()) for t in host]
    b = [torch.nn.Parameter(t.cuda()) for t in host]
    opt_a = cls(a, decay=decay, backend=backend, **kw)
    opt_b = cls(b, decay=decay, backend="reference", **kw)
    compare_optimizers(opt_a, a, opt_b, b, states, 20, lambda t: [g.cuda() for g in random_grads(host, t)])
    assert {bk.backend for bk in opt_a._current_plan()} == {backend}
