"""Rotational equilibrium of scale-invariant weights (Kosson et al. 2023).

A weight vector w in R^C whose loss depends only on w/|w| (any weight followed
by a normalization layer) gets gradients orthogonal to w, of size 1/|w|. Under
AdamW the gradient's scale cancels in m/sqrt(v), and the decay and the updates
balance at

    RMS angular update per step  = sqrt(2 lr wd (1 - b1) / (1 + b1))
    equilibrium norm             = sqrt(lr C / (2 wd))

whatever the gradient scale (to first order in lr*wd/(1-b1): at lr*wd = 5e-3
the norm comes out 5% high, at 1e-3 within 1%). Under Adam + L2 the decay term
wd*w enters m and v beside the gradient, so both depend on the gradient scale.
The gradients here are random directions in the tangent space (each step a
fresh u ~ N(0, I), projected), the "random walk" regime of the derivation.
"""

from __future__ import annotations

import math

import torch

import fusedwd

from ._common import progress, table

BETA1, BETA2 = 0.9, 0.999


def predicted(lr: float, wd: float, dim: int, beta1: float = BETA1) -> tuple[float, float]:
    """(RMS angular update per step, equilibrium norm) of AdamW."""
    return math.sqrt(2 * lr * wd * (1 - beta1) / (1 + beta1)), math.sqrt(lr * dim / (2 * wd))


def simulate(decay: str, grad_scale: float, *, dim: int, lr: float, wd: float, steps: int, seed: int = 0):
    """(RMS angular update, mean norm) over the second half of ``steps``.

    w starts at AdamW's predicted norm in a random direction, so the second half
    measures the equilibrium, not the approach to it (from |w| = sqrt(C) that
    takes several 1/(lr*wd) and biases short runs).
    """
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(dim, generator=gen)
    w = torch.nn.Parameter(start / start.norm() * predicted(lr, wd, dim)[1])
    opt = fusedwd.AdamW([w], lr=lr, betas=(BETA1, BETA2), weight_decay=wd, decay=decay)
    sq_angles, norms = 0.0, 0.0
    counted = 0
    for t in range(steps):
        before = w.detach().clone()
        norm = before.norm()
        unit = before / norm
        u = torch.randn(dim, generator=gen)
        # gradient of grad_scale * <u, w/|w|>: orthogonal to w, of size grad_scale/|w|
        w.grad = grad_scale * (u - (u @ unit) * unit) / norm
        opt.step()
        if t >= steps // 2:
            after = w.detach()
            cos = (before @ after) / (norm * after.norm())
            sq_angles += math.acos(min(1.0, cos.item())) ** 2
            norms += after.norm().item()
            counted += 1
    return math.sqrt(sq_angles / counted), norms / counted


def run(quick: bool = False, seed: int = 0) -> dict:
    dim, lr, wd = 1024, 0.01, 0.1
    steps = 10_000 if quick else 16_000  # >= 10 decay time constants 1/(lr*wd)
    scales = (1.0, 100.0) if quick else (0.01, 1.0, 100.0)
    decays = ("decoupled",) if quick else ("decoupled", "l2")
    angle_pred, norm_pred = predicted(lr, wd, dim)
    runs = []
    cases = [(d, s) for d in decays for s in scales]
    for decay, scale in progress(cases, desc="equilibrium"):
        angle, norm = simulate(decay, scale, dim=dim, lr=lr, wd=wd, steps=steps, seed=seed)
        runs.append({"decay": decay, "grad_scale": scale, "angle": angle, "norm": norm,
                     "angle_vs_predicted": angle / angle_pred, "norm_vs_predicted": norm / norm_pred})
    return {"dim": dim, "lr": lr, "weight_decay": wd, "betas": [BETA1, BETA2], "steps": steps,
            "predicted_angle": angle_pred, "predicted_norm": norm_pred, "runs": runs}


def report(result: dict) -> str:
    head = (f"predicted for AdamW: angle {result['predicted_angle']:.4g} rad/step, "
            f"norm {result['predicted_norm']:.4g} (C={result['dim']}, lr={result['lr']}, "
            f"wd={result['weight_decay']})\n")
    return head + table(
        ["decay", "grad scale", "angle", "angle/pred", "norm", "norm/pred"],
        [(r["decay"], r["grad_scale"], r["angle"], r["angle_vs_predicted"], r["norm"], r["norm_vs_predicted"])
         for r in result["runs"]],
    )


def figure(result: dict):
    from ._common import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, ax, label in (("angle_vs_predicted", axes[0], "RMS angular update / predicted"),
                           ("norm_vs_predicted", axes[1], "norm / predicted")):
        for decay, marker in (("decoupled", "o"), ("l2", "s")):
            rows = [r for r in result["runs"] if r["decay"] == decay]
            if rows:
                ax.plot([r["grad_scale"] for r in rows], [r[key] for r in rows], marker=marker,
                        label="AdamW" if decay == "decoupled" else "Adam + L2")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gradient scale")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Scale-invariant weights: AdamW's equilibrium ignores the gradient scale", fontsize=10)
    return fig
