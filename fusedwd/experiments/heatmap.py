"""Learning rate x weight decay: the paper's Figure 2 in small, on scikit-learn's digits.

Loshchilov & Hutter (2019, Fig. 2) train a ResNet on CIFAR-10 over a grid of
initial learning rate x weight decay and find that (1) AdamW reaches a lower
test error than Adam + L2, and (2) with decoupled decay the good region is
larger and *separable*: the best decay hardly moves with the learning rate,
while under L2 it lies on a diagonal. Here the same grid, 11 x 11 cells a
factor 2 apart, for Adam + L2 vs AdamW and SGD + L2 vs SGDW (momentum 0.9),
on the digits task of ``_digits`` (noisy labels, an MLP with LayerNorm, one
cosine to zero over 60 epochs), 5 seeds.

Axes. Decoupled decay uses ``decay="independent"``: the paper's Alg. 1-2,
``p <- p - eta_t * lambda * p``, where the decay follows the schedule but not
the lr, and its axis is the paper's normalized lambda_norm
(``lambda = lambda_norm * sqrt(b / (B T))``; at one budget a constant factor,
1/24.5 here). That is the parametrization the paper's separability claim is
about; torch's ``"decoupled"`` (``p <- p - lr_t * wd * p``) runs the same cells
relabelled ``wd = lambda / lr``, a shear of the grid (``slope_torch_units``
gives the best decay's slope in those units). The L2 axis is torch's
``weight_decay``. Each pair shares its lr axis; each wd axis has the same
number of cells, placed so that both the under- and the over-regularized
edges are in the grid. The decay-free run is the same for L2 and decoupled
(it is trained once per family and reported as ``no_decay``).

Reported per panel: the best cell (mean test error over seeds, and its
standard deviation), the *basin* -- the fraction of the grid's cells whose
mean error is within ``pts`` percentage points of the best cell's (2 points
is the headline; 1 and 5 are in the JSON) -- and the best decay of each lr
row with its slope against the lr (log2 on both axes; 0 is separable), over
the rows where decay matters (its best cell at least ``DECAY_MATTERS`` points
below the row's no-decay error). A basin touching the grid's edge is a lower
bound. On this task the lowest errors lie where a small lr stops the run
before it memorizes the noisy labels, and there decay hardly matters; so the
best cell and basin are also given for the *decay regime*, the rows where
decay matters.
"""

from __future__ import annotations

import math
import statistics

from . import _digits
from ._common import progress, table

EPOCHS = 60
SEEDS = 5
BASIN_POINTS = (1.0, 2.0, 5.0)  # percentage points of test error above the best cell
HEADLINE_POINTS = 2.0
DECAY_MATTERS = 2.0  # a row's best decay beats its no-decay error by this many points

# key: (label, optimizer, decay, family); a family shares its lr axis and its no-decay run
PANELS = {
    "adam_l2": ("Adam + L2", "adamw", "l2", "adam"),
    "adamw": ("AdamW", "adamw", "independent", "adam"),
    "sgd_l2": ("SGD + L2", "sgdw", "l2", "sgd"),
    "sgdw": ("SGDW", "sgdw", "independent", "sgd"),
}
LOG2_LR = {"adam": range(-14, -3), "sgd": range(-11, 0)}
LOG2_WD = {"l2": range(-9, 2), "independent": range(-6, 5)}  # torch weight_decay; lambda_norm
WD_LABEL = {"l2": "L2 factor (torch weight_decay)", "independent": "normalized decay lambda_norm"}


def _slope(xs: list[float], ys: list[float]):
    if len(xs) < 3:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else None


def summarize(mean: list[list[float]], log2_lr: list[int], log2_wd: list[int], no_decay: list[float]) -> dict:
    """Best cell, basin fractions and the best decay per lr row of one panel (errors in percent)."""
    cells = [(i, j) for i in range(len(log2_lr)) for j in range(len(log2_wd))]
    bi, bj = min(cells, key=lambda c: mean[c[0]][c[1]])
    best = mean[bi][bj]
    basin = {}
    for pts in BASIN_POINTS:
        inside = [(i, j) for i, j in cells if mean[i][j] <= best + pts]
        edge = any(i in (0, len(log2_lr) - 1) or j in (0, len(log2_wd) - 1) for i, j in inside)
        basin[f"{pts:g}"] = {"fraction": len(inside) / len(cells), "cells": len(inside), "touches_edge": edge}
    rows = []
    for i, lr in enumerate(log2_lr):
        j = min(range(len(log2_wd)), key=lambda j: mean[i][j])
        rows.append({"log2_lr": lr, "best_log2_wd": log2_wd[j], "error_pct": mean[i][j],
                     "no_decay_pct": no_decay[i], "decay_matters": mean[i][j] <= no_decay[i] - DECAY_MATTERS})
    used = [r for r in rows if r["decay_matters"]]
    slope = _slope([r["log2_lr"] for r in used], [r["best_log2_wd"] for r in used])
    # the same, restricted to the rows where decay matters: the regime the decay regularizes
    regime = None
    if used:
        rcells = [(i, j) for i, r in enumerate(rows) if r["decay_matters"] for j in range(len(log2_wd))]
        ri, rj = min(rcells, key=lambda c: mean[c[0]][c[1]])
        rbest = mean[ri][rj]
        regime = {"best_pct": rbest, "best_log2_lr": log2_lr[ri], "best_log2_wd": log2_wd[rj], "rows": len(used),
                  "basin": {f"{pts:g}": {"fraction": n / len(rcells), "cells": n} for pts in BASIN_POINTS
                            for n in [sum(mean[i][j] <= rbest + pts for i, j in rcells)]}}
    return {"best_pct": best, "best_log2_lr": log2_lr[bi], "best_log2_wd": log2_wd[bj], "basin": basin,
            "rows": rows, "slope": slope, "slope_rows": len(used), "decay_regime": regime}


def run(quick: bool = False, seed: int = 0) -> dict:
    epochs = 4 if quick else EPOCHS
    seeds = list(range(seed, seed + (1 if quick else SEEDS)))
    stride = 5 if quick else 1  # quick: a 3 x 3 corner-and-centre grid
    axes_lr = {f: list(r)[::stride] for f, r in LOG2_LR.items()}
    axes_wd = {d: list(r)[::stride] for d, r in LOG2_WD.items()}
    errors: dict[str, list] = {k: [] for k in PANELS}  # per seed: flat cell list, test error in %
    no_decay: dict[str, list] = {f: [] for f in LOG2_LR}
    jobs = [(key, s) for key in PANELS for s in seeds]
    data = {}
    with _digits.one_thread():
        for key, s in progress(jobs, desc="heatmap"):
            _, optimizer, decay, family = PANELS[key]
            lrs, wds = axes_lr[family], axes_wd[decay]
            cells = [(2.0**a, 2.0**b) for a in lrs for b in wds]
            if decay == "l2":  # wd = 0: the same run under either mode; once per family
                cells += [(2.0**a, 0.0) for a in lrs]
            if s not in data:
                data[s] = _digits.load(s)
            out = _digits.train(optimizer, decay, [c[0] for c in cells], [c[1] for c in cells], seed=s,
                                epochs=epochs, period=epochs, normalized=decay != "l2", data=data[s])
            test = [100 * e[-1] for e in out["test_error"]]
            n = len(lrs) * len(wds)
            errors[key].append(test[:n])
            if decay == "l2":
                no_decay[family].append(test[n:])
    panels = {}
    for key, (label, optimizer, decay, family) in PANELS.items():
        lrs, wds = axes_lr[family], axes_wd[decay]
        per_cell = list(zip(*errors[key]))
        mean = [[statistics.fmean(per_cell[i * len(wds) + j]) for j in range(len(wds))] for i in range(len(lrs))]
        std = [[statistics.pstdev(per_cell[i * len(wds) + j]) for j in range(len(wds))] for i in range(len(lrs))]
        free = [statistics.fmean(v) for v in zip(*no_decay[family])]
        summary = summarize(mean, lrs, wds, free)
        i, j = lrs.index(summary["best_log2_lr"]), wds.index(summary["best_log2_wd"])
        summary["best_std_pct"] = std[i][j]
        summary["no_decay_best_pct"] = min(free)
        if decay == "independent":  # torch's "decoupled" wd = lambda / lr: the slope in its units
            summary["slope_torch_units"] = None if summary["slope"] is None else summary["slope"] - 1
        panels[key] = {"label": label, "optimizer": optimizer, "decay": decay, "family": family,
                       "log2_lr": lrs, "log2_wd": wds, "wd_axis": WD_LABEL[decay],
                       "test_error_pct": mean, "test_error_std_pct": std, "no_decay_pct": free, **summary}
    return {
        "epochs": epochs, "seeds": seeds, "torch_threads": 1, "train": _digits.N_TRAIN, "batch": _digits.BATCH,
        "label_noise": _digits.LABEL_NOISE, "hidden": _digits.HIDDEN, "adam_betas": list(_digits.ADAM_BETAS),
        "sgd_momentum": _digits.SGD_MOMENTUM, "schedule": "one cosine to zero (WarmRestarts, T_0 = epochs)",
        "lambda_per_lambda_norm": math.sqrt(_digits.BATCH / (_digits.N_TRAIN * epochs)),
        "headline_points": HEADLINE_POINTS, "decay_matters_points": DECAY_MATTERS, "panels": panels,
    }


def report(result: dict) -> str:
    pts = f"{result['headline_points']:g}"
    rows = []
    for p in result["panels"].values():
        basin, regime = p["basin"][pts], p["decay_regime"]
        rows.append((p["label"], f"{p['best_pct']:.2f} ± {p['best_std_pct']:.2f}",
                     f"2^{p['best_log2_lr']}, 2^{p['best_log2_wd']}", f"{p['no_decay_best_pct']:.2f}",
                     f"{basin['cells']} ({100 * basin['fraction']:.1f}%){' edge' if basin['touches_edge'] else ''}",
                     "-" if regime is None else
                     f"{regime['best_pct']:.2f} (2^{regime['best_log2_lr']}, 2^{regime['best_log2_wd']})",
                     "-" if regime is None else
                     f"{regime['basin'][pts]['cells']} ({100 * regime['basin'][pts]['fraction']:.1f}% of "
                     f"{regime['rows']} rows)",
                     "-" if p["slope"] is None else f"{p['slope']:+.2f}"))
    head = (f"test error (%), mean of {len(result['seeds'])} seeds, {result['epochs']} epochs; "
            f"basin: cells within {pts} points of the best; decay regime: the lr rows where decay beats "
            f"no decay by {result['decay_matters_points']:g} points\n")
    main = table(["optimizer", "best error", "at lr, wd", "no decay", "basin", "decay regime best",
                  "its basin", "best-wd slope"], rows)
    per_row = table(
        ["log2 lr"] + [p["label"] for p in result["panels"].values()],
        [(f"{r_a['log2_lr']} / {r_s['log2_lr']}",) + tuple(
            f"{r['best_log2_wd']:+d}{'' if r['decay_matters'] else '*'} {r['error_pct']:.1f}"
            for r in (r_a, r_b, r_s, r_t))
         for r_a, r_b, r_s, r_t in zip(*(p["rows"] for p in result["panels"].values()))],
    )
    return (head + main + "\n\nbest log2 wd per lr row (Adam lr / SGD lr), its error; "
            "* decay does not beat no decay by the margin\n" + per_row)


def figure(result: dict):
    from ._common import pyplot

    plt = pyplot()
    from matplotlib.patches import Rectangle

    panels = result["panels"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 9))
    best = min(p["best_pct"] for p in panels.values())
    pts = result["headline_points"]
    for ax, p in zip(axes.flat, panels.values()):
        image = ax.imshow(p["test_error_pct"], origin="lower", cmap="viridis", vmin=best, vmax=best + 20,
                          aspect="auto")
        for i, row in enumerate(p["test_error_pct"]):
            for j, e in enumerate(row):
                if e <= p["best_pct"] + pts:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="white", lw=1.2))
        regime = p["decay_regime"]
        for i, r in enumerate(p["rows"]):
            for j, e in enumerate(p["test_error_pct"][i]):
                if regime is not None and r["decay_matters"] and e <= regime["best_pct"] + pts:
                    ax.add_patch(Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, ec="orange", lw=1.2, ls="--"))
        rows = [(i, p["log2_wd"].index(r["best_log2_wd"])) for i, r in enumerate(p["rows"]) if r["decay_matters"]]
        if rows:
            ax.plot([j for _, j in rows], [i for i, _ in rows], "o", color="red", ms=3)
        bi, bj = p["log2_lr"].index(p["best_log2_lr"]), p["log2_wd"].index(p["best_log2_wd"])
        ax.plot([bj], [bi], "*", color="red", ms=12, mec="white")
        ax.set_xticks(range(len(p["log2_wd"])), [str(w) for w in p["log2_wd"]], fontsize=7)
        ax.set_yticks(range(len(p["log2_lr"])), [str(lr) for lr in p["log2_lr"]], fontsize=7)
        ax.set_xlabel(f"log2 {p['wd_axis']}", fontsize=8)
        ax.set_ylabel("log2 initial learning rate", fontsize=8)
        basin = p["basin"][f"{pts:g}"]
        ax.set_title(f"{p['label']}: best {p['best_pct']:.1f}%, basin {basin['cells']} cells", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="test error (%), mean over seeds")
    fig.suptitle(f"digits, 20% noisy labels, {result['epochs']} epochs. White: within {pts:g} points of the "
                 "panel's best (star). Dots: best decay of each lr row where decay matters;\n"
                 f"orange dashed: within {pts:g} points of the best of those rows", fontsize=9)
    return fig
