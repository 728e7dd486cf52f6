"""int8 post-training quantization of weights trained with AdamW vs Adam + L2.

A seed article claims AdamW's steady shrinkage makes weights
"quantization-friendlier": a smaller accuracy drop after rounding them to
8-bit integers. Checked here, not assumed.

Setup: an MLP (20 -> 128 -> 128 -> 10, ReLU) on a synthetic 10-class task
(Gaussian class centres in 20 dimensions, 2,000 training and 5,000 test
points), trained with each optimizer over its own weight-decay sweep, several
seeds. Then every weight matrix is quantized per tensor, symmetric int8
(scale = max|w|/127, round to nearest): we report test accuracy before and
after, the relative weight error |W - Q(W)| / |W| and max|w| / rms(w) (the
outlier ratio that sets a per-tensor scale's resolution), and, as a stress
test, the accuracy after rounding the same weights to int4.
"""

from __future__ import annotations

import statistics

import torch

import fusedwd
from fusedwd.groups import param_groups

from ._common import progress, table

DIM, CLASSES, N_TRAIN, N_TEST = 20, 10, 2000, 5000


def _data(gen: torch.Generator):
    # overlapping classes (about 75% accuracy), so the weights carry fine structure
    centres = torch.randn(CLASSES, DIM, generator=gen) * 0.5

    def draw(n):
        y = torch.randint(0, CLASSES, (n,), generator=gen)
        return centres[y] + torch.randn(n, DIM, generator=gen), y

    return draw(N_TRAIN), draw(N_TEST)


def _quantize_(model: torch.nn.Module, bits: int = 8) -> tuple[float, float]:
    """Round every weight matrix to per-tensor symmetric ``bits``-bit integers, in place;
    returns (relative error, max/rms), averaged over the matrices."""
    levels = 2 ** (bits - 1) - 1
    errors, ratios = [], []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                scale = w.abs().max() / levels
                q = torch.clamp(torch.round(w / scale), -levels, levels) * scale
                errors.append(((w - q).norm() / w.norm()).item())
                ratios.append((w.abs().max() / w.pow(2).mean().sqrt()).item())
                w.copy_(q)
    return statistics.fmean(errors), statistics.fmean(ratios)


def _run_one(decay: str, wd: float, seed: int, steps: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    (x, y), (xt, yt) = _data(gen)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, CLASSES))
    opt = fusedwd.AdamW(param_groups(model, weight_decay=wd), lr=2e-3, decay=decay)
    for _ in range(steps):
        idx = torch.randint(0, N_TRAIN, (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def accuracy() -> float:
        with torch.no_grad():
            return (model(xt).argmax(1) == yt).float().mean().item()

    before = accuracy()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    error, ratio = _quantize_(model, 8)
    int8 = accuracy()
    # int4 as a stress test: the same weights on a 16x coarser grid
    model.load_state_dict(trained)
    _quantize_(model, 4)
    return {"acc": before, "acc_int8": int8, "acc_int4": accuracy(), "weight_error": error, "max_over_rms": ratio}


def run(quick: bool = False, seed: int = 0) -> dict:
    steps = 300 if quick else 3000
    seeds = range(seed, seed + (1 if quick else 5))
    sweeps = {
        "decoupled": (0.0, 0.1) if quick else (0.0, 0.01, 0.1, 0.3, 1.0),
        "l2": (0.0, 0.01) if quick else (0.0, 1e-4, 1e-3, 1e-2, 3e-2),
    }
    rows = []
    for decay, wd in progress([(d, w) for d, ws in sweeps.items() for w in ws], desc="quantization"):
        runs = [_run_one(decay, wd, s, steps) for s in seeds]
        row = {"decay": decay, "weight_decay": wd, "seeds": len(runs)}
        for key in ("acc", "acc_int8", "acc_int4", "weight_error", "max_over_rms"):
            row[key] = statistics.fmean(r[key] for r in runs)
        row["drop"] = statistics.fmean(r["acc"] - r["acc_int8"] for r in runs)
        row["drop_std"] = statistics.pstdev([r["acc"] - r["acc_int8"] for r in runs])
        rows.append(row)
    return {"steps": steps, "train": N_TRAIN, "test": N_TEST, "runs": rows}


def report(result: dict) -> str:
    return table(
        ["optimizer", "wd", "test acc", "int8 acc", "int8 drop", "± std", "|W-Q|/|W|", "max/rms", "int4 acc"],
        [("AdamW" if r["decay"] == "decoupled" else "Adam + L2", r["weight_decay"], r["acc"], r["acc_int8"],
          r["drop"], r["drop_std"], r["weight_error"], r["max_over_rms"], r["acc_int4"]) for r in result["runs"]],
    )


def figure(result: dict):
    from ._common import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for decay, label in (("decoupled", "AdamW"), ("l2", "Adam + L2")):
        rows = [r for r in result["runs"] if r["decay"] == decay]
        axes[0].plot([r["acc"] for r in rows], [r["drop"] for r in rows], marker="o", label=label)
        axes[1].plot([r["max_over_rms"] for r in rows], [r["weight_error"] for r in rows], marker="o", label=label)
    axes[0].set_xlabel("test accuracy (fp32)")
    axes[0].set_ylabel("accuracy lost to int8")
    axes[1].set_xlabel("max|w| / rms(w)")
    axes[1].set_ylabel("|W - Q(W)| / |W|")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("int8 per-tensor weight quantization: each point one weight decay, mean over seeds", fontsize=10)
    return fig
