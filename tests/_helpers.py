"""Shared test scaffolding: parameters, gradients and step-by-step comparison."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import torch

from _tolerances import tol

AWKWARD_SHAPES = [(1,), (4097,), (1024, 33), (6, 42, 123), (7, 1, 3), (130,)]


def make_params(shapes: Sequence[tuple], dtype=torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def clone_params(params: Iterable[torch.Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def random_grads(params: Sequence[torch.Tensor], step: int, seed: int = 1, scale: float = 1.0) -> list[torch.Tensor]:
    # different magnitude per tensor and per step, so the adaptive terms matter
    gen = torch.Generator().manual_seed(seed * 100003 + step)
    out = []
    for k, p in enumerate(params):
        mag = scale * (0.1 + 2.0 * torch.rand((), generator=gen).item()) * (1 + k % 3)
        out.append((torch.randn(p.shape, generator=gen) * mag).to(p.dtype))
    return out


def assign_grads(param_lists: Sequence[Sequence[torch.Tensor]], grads: Sequence[torch.Tensor]) -> None:
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone()


def max_abs(x: torch.Tensor) -> float:
    return x.detach().abs().max().item() if x.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, dtype=None, scale: float = 0.0) -> None:
    """Within the tolerance table; ``scale`` adds the magnitude of the operands that produced ``expected``."""
    t = tol(dtype or expected.dtype, max(max_abs(expected), scale))
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, rtol=t["rtol"], atol=t["atol"], equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def compare_optimizers(
    opt_a: torch.optim.Optimizer,
    params_a: Sequence[torch.Tensor],
    opt_b: torch.optim.Optimizer,
    params_b: Sequence[torch.Tensor],
    state_names: Sequence[str],
    steps: int,
    grad_fn: Callable[[int], Sequence[torch.Tensor]],
    dtype=None,
    before_step: Callable[[int], None] | None = None,
) -> None:
    """Step both optimizers on identical gradients; compare params and states every step.

    A state's absolute error is bounded by ulps of its operands, which include its
    previous value (b*m + (1-b)*g can cancel to near zero), so each comparison is
    scaled by the previous step's magnitude too.
    """
    previous: dict[tuple[int, str], float] = {}
    for t in range(steps):
        grads = grad_fn(t)
        assign_grads([params_a, params_b], grads)
        if before_step is not None:
            before_step(t)
        opt_a.step()
        opt_b.step()
        for k, (pa, pb) in enumerate(zip(params_a, params_b)):
            if grads[k] is None:
                continue
            assert_close(pa.detach(), pb.detach(), f"step {t} param {k}", dtype, previous.get((k, "param"), 0.0))
            previous[(k, "param")] = max_abs(pb)
            sa, sb = opt_a.state[pa], opt_b.state[pb]
            for name in state_names:
                assert name in sa and name in sb, f"step {t} param {k}: state '{name}' missing"
                if name == "step":
                    assert float(sa[name]) == float(sb[name]), f"step {t} param {k}: step count differs"
                else:
                    what = f"step {t} param {k} state {name}"
                    assert_close(sa[name], sb[name], what, dtype, previous.get((k, name), 0.0))
                    previous[(k, name)] = max_abs(sb[name])


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (NaN included), any dtype."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def results_on_every_isa(build: Callable[[], tuple], steps: int,
                         grad_fn: Callable[[Sequence[torch.Tensor], int], Sequence[torch.Tensor]]) -> dict:
    """isa -> every parameter and state tensor after ``steps`` steps of ``build()``'s optimizer.

    ``build`` returns (optimizer, params); each CPU ISA variant the machine runs takes the
    same steps from the same start.
    """
    from fusedwd import _ext

    C = _ext.cpu()
    before = C.isa()
    out = {}
    try:
        for isa in C.supported_isas():
            C.set_isa(isa)
            opt, params = build()
            for t in range(steps):
                for p, g in zip(params, grad_fn(params, t)):
                    p.grad = g
                opt.step()
            out[isa] = [p.detach().clone() for p in params] + [
                v.detach().clone() for p in params for _, v in sorted(opt.state[p].items())
                if isinstance(v, torch.Tensor)]
    finally:
        C.set_isa(before)
    return out


def assert_isa_variants_bitwise_equal(results: dict) -> None:
    """Every variant's tensors carry the first variant's bits; skips where only one runs."""
    import pytest

    isas = list(results)
    if len(isas) == 1:
        pytest.skip("only one CPU variant runs here")
    for isa in isas[1:]:
        assert len(results[isa]) == len(results[isas[0]])
        for k, (a, b) in enumerate(zip(results[isas[0]], results[isa])):
            assert bitwise_equal(a, b), f"tensor {k}: {isa} differs from {isas[0]}"


def redefine_triton(module) -> None:
    """Define fusedwd.triton's kernels again, in the mode TRITON_INTERPRET now says: every module
    that defines kernels, in import order (the two-phase kernels call the generic kernel's helpers,
    and the launcher imports both)."""
    import importlib

    importlib.reload(module._kernels)
    importlib.reload(module._phases)
    importlib.reload(module._launch)
    importlib.reload(module)


@contextlib.contextmanager
def interpreted_triton():
    """fusedwd.triton defined for Triton's interpreter (CPU tensors) while the block runs.

    Triton reads TRITON_INTERPRET when the kernels are defined, i.e. when fusedwd.triton is
    first imported (tests/test_triton.py does the same). Yields why backend='triton' cannot
    step CPU tensors here, or None; where a GPU is there, the kernels are defined for it again
    afterwards, so no later test inherits the interpreter.
    """
    import importlib
    import importlib.util

    import pytest

    from fusedwd import _ext

    if importlib.util.find_spec("triton") is None:
        yield "Triton is not installed"
        return

    define = redefine_triton
    # set while the block runs too: Triton also reads it at launch (tests/test_triton.py keeps it so)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        module = _ext._load_triton()
        if module is not None and not module.INTERPRETED:
            define(module)
        try:
            yield _ext.triton_unusable(torch.device("cpu"))
        finally:
            if module is not None and torch.cuda.is_available():
                mp.delenv("TRITON_INTERPRET", raising=False)
                define(module)
