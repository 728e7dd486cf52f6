"""Shared test scaffolding: parameters, gradients and step-by-step comparison."""

from __future__ import annotations

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
