"""Weight sharing: L2's effective decay shrinks with the number of uses; decoupled decay does not.

A weight used at k positions (a convolution kernel sliding over k positions, an
RNN cell unrolled k steps) receives the sum of k per-use gradients, so its
gradient, and Adam's sqrt(v), grows with k. Under Adam + L2 the decay term
wd*w is divided by that sqrt(v): the more a weight is shared, the less it is
regularized. Under AdamW the decay is applied to the weight directly.

Setup: a 1-D convolution kernel w (width 8) applied at k positions of a random
signal, under a loss linear in the outputs with a fresh random upstream
gradient each step, ``sum_j r_j out_j``: the situation of a layer inside a
network, whose upstream gradients look random. The kernel's gradient is then a
sum of k uncorrelated per-position terms and pulls w nowhere in particular (a
squared-error target would add a restoring force growing with k and blur what
the decay does). Two runs per (optimizer, k) see the identical gradient
stream, one with weight decay and one without; the effective shrink per step
is the gap in log|w| between them per step, ``(log|w_no_decay| -
log|w_decay|) / T``, compared with lr*wd.
"""

from __future__ import annotations

import math

import torch

import fusedwd

from ._common import progress, table

WIDTH = 8


def _shrink(decay: str, uses: int, *, lr: float, wd: float, steps: int, seed: int) -> float:
    norms = []
    for weight_decay in (0.0, wd):
        gen = torch.Generator().manual_seed(seed)  # the same data and targets in both runs
        w = torch.nn.Parameter(torch.randn(WIDTH, generator=gen) / math.sqrt(WIDTH))
        opt = fusedwd.AdamW([w], lr=lr, weight_decay=weight_decay, decay=decay)
        for _ in range(steps):
            x = torch.randn(uses + WIDTH - 1, generator=gen)
            upstream = torch.randn(uses, generator=gen)
            out = torch.nn.functional.conv1d(x.view(1, 1, -1), w.view(1, 1, -1)).view(-1)  # k uses of w
            loss = (upstream * out).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        norms.append(w.detach().norm().item())
    return (math.log(norms[0]) - math.log(norms[1])) / steps


def run(quick: bool = False, seed: int = 0) -> dict:
    lr, wd = 1e-3, 0.1
    steps = 200 if quick else 2000
    uses = (1, 64) if quick else (1, 4, 16, 64, 256, 1024)
    runs = []
    cases = [(d, k) for d in ("decoupled", "l2") for k in uses]
    for decay, k in progress(cases, desc="sharing"):
        shrink = _shrink(decay, k, lr=lr, wd=wd, steps=steps, seed=seed)
        runs.append({"decay": decay, "uses": k, "shrink_per_step": shrink, "vs_lr_wd": shrink / (lr * wd)})
    return {"lr": lr, "weight_decay": wd, "steps": steps, "kernel_width": WIDTH, "runs": runs}


def report(result: dict) -> str:
    return f"lr*wd = {result['lr'] * result['weight_decay']:.3g}\n" + table(
        ["decay", "uses", "shrink/step", "shrink / (lr*wd)"],
        [(r["decay"], r["uses"], r["shrink_per_step"], r["vs_lr_wd"]) for r in result["runs"]],
    )


def figure(result: dict):
    from ._common import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for decay, label in (("decoupled", "AdamW"), ("l2", "Adam + L2")):
        rows = [r for r in result["runs"] if r["decay"] == decay]
        ax.plot([r["uses"] for r in rows], [r["vs_lr_wd"] for r in rows], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("uses of the shared weight per step")
    ax.set_ylabel("effective shrink per step / (lr*wd)")
    ax.set_title("Weight sharing dilutes L2, not decoupled decay", fontsize=10)
    ax.legend(fontsize=8)
    return fig
