"""AdamWR's anytime performance, and normalized vs raw weight decay across budgets.

Two claims of Loshchilov & Hutter (2019), on the digits task of ``_digits``
(noisy labels, an MLP with LayerNorm), AdamW with the paper's decay
(``decay="independent"``: ``p <- p - eta_t * lambda * p``), 8 seeds:

1. *Anytime performance* (the paper's AdamWR experiments): with warm restarts
   (:class:`fusedwd.schedules.WarmRestarts`, T_0 = 10 epochs, T_mult = 2, so
   restarts at 10, 30, 70 and 150 epochs) a run is at a good point at every
   restart, close to a run annealed to exactly that budget. Compared at those
   points: a constant lr, one cosine to the full 150 epochs, AdamWR (each one
   run: the lr and lambda_norm whose mean error over the four points is
   lowest), and one cosine to each budget tuned for that budget (what a run
   that knows its budget reaches).
2. *Normalized weight decay* (App. B.1): with ``lambda = lambda_norm *
   sqrt(b / (B T))`` the best lambda_norm should not depend on the budget T,
   while the best raw lambda shrinks as 1/sqrt(T). One cosine to each of
   T = 10, 40 and 160 epochs (a factor 4 apart, so that keeping the raw lambda
   moves lambda_norm exactly one grid step of 2), over a grid of lambda_norm x
   three learning rates. Measured: the best lambda per budget (refined by a
   parabola through the grid's minimum and its neighbours, in log2), the slope
   of log2(best raw lambda) against log2(T) (-0.5 is what normalization
   assumes; 0 would mean raw lambda transfers; -1 would mean the decay's time
   constant should be a fixed fraction of training, as Wang & Aitchison's
   EMA view suggests), and the regret of tuning lambda at 10 epochs and
   keeping either the raw lambda or lambda_norm for the longer budgets.

Under restarts the decay is normalized per period, recomputed at each
restart, as the paper's AdamWR; a constant lr normalizes over the whole run.
"""

from __future__ import annotations

import math
import statistics

from . import _digits
from ._common import progress, table

SEEDS = 8
# lrs from the heatmap's decay regime (2^-9 to 2^-4 at 60 epochs) and one above it, so that decay
# has memorization to regulate at the longer budgets; at lower lrs a run stops before it memorizes
# and decay hardly matters (the heatmap's low-lr rows)
LOG2_LR = (-7, -5, -3)
LOG2_LAMBDA_NORM = tuple(range(-4, 6))  # a factor 2 a cell
T_0, T_MULT, HORIZON = 10, 2, 150  # restarts at 10, 30, 70, 150 epochs
BUDGETS = (10, 40, 160)  # part 2: a factor 4 apart
OPTIMIZER, DECAY = "adamw", "independent"


def restart_points(t_0: float, t_mult: float, horizon: float) -> list[float]:
    """Epochs at which WarmRestarts' periods end, up to ``horizon``."""
    points, end, length = [], 0, t_0
    while end + length <= horizon:
        end += length
        points.append(end)
        length *= t_mult
    return points


def _refined_min(xs: list[float], ys: list[float]) -> tuple[float, bool]:
    """(x of the minimum, interior?): a parabola through the grid minimum and its neighbours."""
    j = min(range(len(ys)), key=ys.__getitem__)
    if j in (0, len(ys) - 1):
        return xs[j], False
    a, b, c = ys[j - 1], ys[j], ys[j + 1]
    curvature = a - 2 * b + c
    offset = 0.5 * (a - c) / curvature if curvature > 0 else 0.0
    return xs[j] + max(-0.5, min(0.5, offset)) * (xs[j + 1] - xs[j]), True


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(quick: bool = False, seed: int = 0) -> dict:
    if quick:
        seeds, log2_lr, log2_ln = [seed], LOG2_LR[1:2], LOG2_LAMBDA_NORM[::4]
        t_0, horizon, budgets = 1, 3, (1, 4)
    else:
        seeds, log2_lr, log2_ln = list(range(seed, seed + SEEDS)), LOG2_LR, LOG2_LAMBDA_NORM
        t_0, horizon, budgets = T_0, HORIZON, BUDGETS
    points = restart_points(t_0, T_MULT, horizon)
    cells = [(a, b) for a in log2_lr for b in log2_ln]
    lrs, lns = [2.0**a for a, _ in cells], [2.0**b for _, b in cells]
    # (name, epochs, period, t_mult, eval epochs); "cosine T" doubles as the budget-T reference
    runs = [("constant", horizon, None, 1.0, points), ("adamwr", horizon, t_0, T_MULT, points)]
    runs += [(f"cosine {t}", t, t, 1.0, points if t == horizon else [t])
             for t in sorted(set(points) | set(budgets))]
    jobs = [(r, s) for s in seeds for r in runs]
    errors: dict[str, list] = {r[0]: [] for r in runs}  # per seed: [cell][eval] test error in %
    data = {}
    with _digits.one_thread():
        for (name, epochs, period, t_mult, evals), s in progress(jobs, desc="schedules"):
            if s not in data:
                data[s] = _digits.load(s)
            out = _digits.train(OPTIMIZER, DECAY, lrs, lns, seed=s, epochs=epochs, period=period, t_mult=t_mult,
                                normalized=True, eval_epochs=evals, data=data[s])
            errors[name].append([[100 * e for e in cell] for cell in out["test_error"]])
    mean = {name: [[statistics.fmean(v) for v in zip(*per_cell)] for per_cell in zip(*runs_)]
            for name, runs_ in errors.items()}
    std = {name: [[statistics.pstdev(v) for v in zip(*per_cell)] for per_cell in zip(*runs_)]
           for name, runs_ in errors.items()}

    # 1. anytime: each schedule with the one cell whose mean error over the restart points is
    # lowest (one run that should be good whenever it is stopped), then that run's curve
    anytime = {}
    for key, name in (("constant", "constant"), ("cosine_full", f"cosine {horizon}"), ("adamwr", "adamwr")):
        c = min(range(len(cells)), key=lambda c: statistics.fmean(mean[name][c]))
        anytime[key] = {"log2_lr": cells[c][0], "log2_lambda_norm": cells[c][1],
                        "error_pct": mean[name][c], "std_pct": std[name][c],
                        "tuned_per_point_pct": [min(m[k] for m in mean[name]) for k in range(len(points))]}
    per_budget = []
    for t in points:
        m = mean[f"cosine {t}"]
        c = min(range(len(cells)), key=lambda c: m[c][-1])  # its last evaluation is at t
        per_budget.append({"epochs": t, "error_pct": m[c][-1], "std_pct": std[f"cosine {t}"][c][-1],
                           "log2_lr": cells[c][0], "log2_lambda_norm": cells[c][1]})
    anytime["cosine_to_budget"] = per_budget

    # 2. the best lambda per budget, raw and normalized, per lr
    factor = {t: math.sqrt(_digits.BATCH / (_digits.N_TRAIN * t)) for t in budgets}  # lambda / lambda_norm
    by_lr = []
    for a in log2_lr:
        row = {"log2_lr": a, "budgets": []}
        for t in budgets:
            curve = [mean[f"cosine {t}"][cells.index((a, b))][-1] for b in log2_ln]
            curve_std = [std[f"cosine {t}"][cells.index((a, b))][-1] for b in log2_ln]
            best_ln, interior = _refined_min(list(log2_ln), curve)
            row["budgets"].append({
                "epochs": t, "error_pct": curve, "std_pct": curve_std, "best_pct": min(curve),
                "best_log2_lambda_norm": best_ln, "best_log2_lambda": best_ln + math.log2(factor[t]),
                "interior": interior,
            })
        b0 = row["budgets"]
        log2_t = [math.log2(t) for t in budgets]
        row["slope_raw"] = _slope(log2_t, [b["best_log2_lambda"] for b in b0])
        row["slope_normalized"] = row["slope_raw"] + 0.5
        # tune lambda at the shortest budget; keep lambda_norm, or keep the raw lambda
        j0 = min(range(len(log2_ln)), key=lambda j: b0[0]["error_pct"][j])
        transfer = []
        for b, t in zip(b0, budgets):
            shift = round(math.log2(math.sqrt(t / budgets[0])) / (log2_ln[1] - log2_ln[0])) if len(log2_ln) > 1 else 0
            raw_j = j0 + shift  # the same raw lambda is a larger lambda_norm at a longer budget
            transfer.append({
                "epochs": t, "best_pct": b["best_pct"],
                "keep_lambda_norm_pct": b["error_pct"][j0],
                "keep_raw_lambda_pct": b["error_pct"][raw_j] if 0 <= raw_j < len(log2_ln) else None,
            })
        row["transfer_from_shortest"] = transfer
        by_lr.append(row)
    return {
        "seeds": seeds, "torch_threads": 1, "train": _digits.N_TRAIN, "batch": _digits.BATCH,
        "label_noise": _digits.LABEL_NOISE,
        "hidden": _digits.HIDDEN, "optimizer": OPTIMIZER, "decay": DECAY, "adam_betas": list(_digits.ADAM_BETAS),
        "log2_lr": list(log2_lr), "log2_lambda_norm": list(log2_ln),
        "t_0": t_0, "t_mult": T_MULT, "horizon": horizon, "restart_points": points, "budgets": list(budgets),
        "anytime": anytime, "normalized": by_lr, "test_error_pct": mean,
    }


def report(result: dict) -> str:
    a = result["anytime"]

    def hp(r):
        return f"lr 2^{r['log2_lr']}, lambda_norm 2^{r['log2_lambda_norm']}"

    lines = [f"1. anytime: test error (%) at AdamWR's restarts, mean of {len(result['seeds'])} seeds; "
             "each schedule one run, the cell best on average over the points "
             f"(constant: {hp(a['constant'])}; cosine: {hp(a['cosine_full'])}; AdamWR: {hp(a['adamwr'])})"]
    lines.append(table(
        ["epochs", "constant", f"cosine to {result['horizon']}", "AdamWR", "cosine to this budget, tuned"],
        [(f"{t:g}", a["constant"]["error_pct"][k], a["cosine_full"]["error_pct"][k], a["adamwr"]["error_pct"][k],
          f"{b['error_pct']:.4g} ({hp(b)})") for k, (t, b) in enumerate(zip(result["restart_points"],
                                                                             a["cosine_to_budget"]))]))
    lines.append("\n2. best decay per budget (one cosine each): log2 of the best lambda_norm and raw lambda")
    rows = []
    for r in result["normalized"]:
        for b in r["budgets"]:
            rows.append((f"2^{r['log2_lr']}", b["epochs"], b["best_pct"],
                         f"{b['best_log2_lambda_norm']:+.2f}{'' if b['interior'] else ' (edge)'}",
                         f"{b['best_log2_lambda']:+.2f}"))
        rows.append(("", "slope vs log2 T", "", f"{r['slope_normalized']:+.2f}", f"{r['slope_raw']:+.2f}"))
    lines.append(table(["lr", "epochs", "best error", "log2 lambda_norm*", "log2 lambda*"], rows))
    lines.append("\ntuned at the shortest budget, then kept for longer ones: test error (%)")
    lines.append(table(
        ["lr", "epochs", "tuned for it", "keep lambda_norm", "keep raw lambda"],
        [(f"2^{r['log2_lr']}", t["epochs"], t["best_pct"], t["keep_lambda_norm_pct"],
          "off grid" if t["keep_raw_lambda_pct"] is None else t["keep_raw_lambda_pct"])
         for r in result["normalized"] for t in r["transfer_from_shortest"]]))
    return "\n".join(lines)


def figure(result: dict):
    from ._common import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    a, points = result["anytime"], result["restart_points"]
    for key, label, marker in (("constant", "constant lr", "s"),
                               ("cosine_full", f"one cosine to {result['horizon']}", "^"), ("adamwr", "AdamWR", "o")):
        axes[0].errorbar(points, a[key]["error_pct"], yerr=a[key]["std_pct"], marker=marker, capsize=2, label=label)
    axes[0].plot(points, [b["error_pct"] for b in a["cosine_to_budget"]], "k--", marker="x",
                 label="cosine to each budget, tuned")
    axes[0].set_xscale("log")
    axes[0].set_xticks(points, [f"{t:g}" for t in points])
    axes[0].set_xlabel("epochs")
    axes[0].set_ylabel("test error (%), ± std over seeds")
    axes[0].set_title("anytime: one run each, at AdamWR's restarts", fontsize=9)
    axes[0].legend(fontsize=7)
    # the lr whose best error at the longest budget is lowest
    row = min(result["normalized"], key=lambda r: r["budgets"][-1]["best_pct"])
    for b in row["budgets"]:
        xs = result["log2_lambda_norm"]
        shift = math.log2(math.sqrt(_digits.BATCH / (_digits.N_TRAIN * b["epochs"])))
        line = axes[1].plot([x + shift for x in xs], b["error_pct"], marker="o", ms=3, label=f"{b['epochs']} epochs")
        axes[2].plot(xs, b["error_pct"], marker="o", ms=3, color=line[0].get_color(), label=f"{b['epochs']} epochs")
        axes[1].axvline(b["best_log2_lambda"], color=line[0].get_color(), lw=0.8, ls=":")
        axes[2].axvline(b["best_log2_lambda_norm"], color=line[0].get_color(), lw=0.8, ls=":")
    for ax, what, slope in ((axes[1], "raw lambda", row["slope_raw"]),
                            (axes[2], "lambda_norm", row["slope_normalized"])):
        ax.set_xlabel(f"log2 {what}")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{what}, lr 2^{row['log2_lr']}: the best (dotted) moves\n{slope:+.2f} in log2 per "
                     "doubling of the budget T", fontsize=9)
        ax.legend(fontsize=7)
        top = max(b["best_pct"] for b in row["budgets"]) + 15
        ax.set_ylim(min(b["best_pct"] for b in row["budgets"]) - 2, top)
    fig.suptitle("AdamW (decay='independent') on digits with 20% noisy labels, mean over seeds", fontsize=10, y=1.06)
    return fig
