"""The paper's exact statements, checked numerically in float64 with fusedwd's optimizers.

- Proposition 1 (Loshchilov & Hutter 2019): for SGD without momentum, weight
  decay lambda (the paper's form, ``p <- (1 - lambda) p - alpha g``, here
  ``decay="independent"`` at a constant lr) equals L2 regularization with
  ``lambda' = lambda / alpha`` (``decay="l2"``).
- Proposition 3: for an optimizer with a fixed preconditioner M,
  ``p <- p - alpha M (g + lambda' p)`` equals decoupled decay
  ``p <- (1 - lambda) p - alpha M g`` only when M = kI. Here M is RMSprop's
  ``1 / (sqrt(square_avg) + eps)`` frozen by ``alpha = 1``, with
  ``lambda = alpha k lambda'``.
- With Adam's adaptive preconditioner, ``"l2"`` and ``"decoupled"`` differ.
"""

from __future__ import annotations

from typing import Callable

import torch

import fusedwd

from ._common import progress, table

DIM, STEPS = 64, 200


def _grads(seed: int) -> Callable[[int], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # a quadratic's gradient plus noise, fixed in advance so every run sees the same sequence
    noise = torch.randn(STEPS, DIM, generator=gen, dtype=torch.float64)
    curvature = torch.rand(DIM, generator=gen, dtype=torch.float64) + 0.5
    return lambda p, t: curvature * p + noise[t]


def _train(opt_factory, p0: torch.Tensor, grad_fn, steps: int = STEPS, prepare=None) -> torch.Tensor:
    p = torch.nn.Parameter(p0.clone())
    opt = opt_factory([p])
    if prepare is not None:
        prepare(opt, p)
    for t in range(steps):
        p.grad = grad_fn(p.detach(), t)
        opt.step()
    return p.detach()


def _freeze_preconditioner(square_avg: torch.Tensor):
    def prepare(opt, p):
        # alpha = 1 keeps square_avg as loaded: a fixed diagonal preconditioner
        opt.load_state_dict({
            "state": {0: {"step": torch.tensor(0.0), "square_avg": square_avg.clone()}},
            "param_groups": opt.state_dict()["param_groups"],
        })

    return prepare


def _checks(p0: torch.Tensor, grad_fn, gen: torch.Generator) -> list[tuple[str, str, Callable[[], float]]]:
    """(claim, expected "equal" or "differ", a function returning max |p_a - p_b|)."""

    def diff(make_a, make_b, prepare=None) -> Callable[[], float]:
        return lambda: (_train(make_a, p0, grad_fn, prepare=prepare) - _train(make_b, p0, grad_fn, prepare=prepare)
                        ).abs().max().item()

    sgd_lr, lam = 0.05, 0.01
    checks = [
        ("Prop. 1: SGD decay == L2 (lambda' = lambda/alpha)", "equal", diff(
            lambda ps: fusedwd.SGDW(ps, lr=sgd_lr, weight_decay=lam, decay="independent"),
            lambda ps: fusedwd.SGDW(ps, lr=sgd_lr, weight_decay=lam / sgd_lr, decay="l2"))),
        ("SGD with momentum: decay vs L2", "differ", diff(
            lambda ps: fusedwd.SGDW(ps, lr=sgd_lr, momentum=0.9, weight_decay=lam, decay="independent"),
            lambda ps: fusedwd.SGDW(ps, lr=sgd_lr, momentum=0.9, weight_decay=lam / sgd_lr, decay="l2"))),
    ]
    # Proposition 3: a fixed preconditioner M = 1/(sqrt(s) + eps), equal to kI or not
    rms_lr, l2, eps = 0.01, 0.1, 1e-8
    k = 1.0 / (4.0**0.5 + eps)
    uniform = torch.full((DIM,), 4.0, dtype=torch.float64)
    varied = torch.rand(DIM, generator=gen, dtype=torch.float64) * 8 + 0.5
    kw = dict(lr=rms_lr, alpha=1.0, eps=eps)
    for label, s, expected in (("M = kI", uniform, "equal"), ("M diagonal, not kI", varied, "differ")):
        checks.append((f"Prop. 3: {label}, L2 vs decay lambda = alpha k lambda'", expected, diff(
            lambda ps: fusedwd.RMSpropW(ps, weight_decay=l2, decay="l2", **kw),
            lambda ps, s=s: fusedwd.RMSpropW(ps, weight_decay=rms_lr * k * l2, decay="independent", **kw),
            prepare=_freeze_preconditioner(s))))
    # Adam: L2 is divided by sqrt(v), decoupled decay is not
    checks.append(("Adam: L2 vs decoupled", "differ", diff(
        lambda ps: fusedwd.AdamW(ps, lr=1e-2, weight_decay=0.5, decay="l2"),
        lambda ps: fusedwd.AdamW(ps, lr=1e-2, weight_decay=0.5, decay="decoupled"))))
    return checks


def run(quick: bool = False, seed: int = 0) -> dict:
    """Every check in float64; ``quick`` changes nothing (they take a second)."""
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(DIM, generator=gen, dtype=torch.float64)
    results = []
    for claim, expected, measure in progress(_checks(p0, _grads(seed), gen), desc="propositions"):
        d = measure()
        # equalities hold to float64 rounding; differences are of the size of the updates
        holds = d < 1e-12 if expected == "equal" else d > 1e-3
        results.append({"claim": claim, "max_abs_difference": d, "expected": expected, "holds": holds})
    return {"dtype": "float64", "steps": STEPS, "dim": DIM, "checks": results}


def report(result: dict) -> str:
    return table(["claim", "max |difference|", "expected", "holds"],
                 [(r["claim"], r["max_abs_difference"], r["expected"], r["holds"]) for r in result["checks"]])


def figure(result: dict):
    from ._common import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = [r["claim"] for r in result["checks"]]
    diffs = [max(r["max_abs_difference"], 1e-18) for r in result["checks"]]
    colors = ["tab:green" if r["expected"] == "equal" else "tab:orange" for r in result["checks"]]
    ax.barh(range(len(names)), diffs, color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("max |p_a - p_b| after 200 steps (float64)")
    ax.set_title("Exact equalities (green) and differences (orange)")
    ax.invert_yaxis()
    return fig
