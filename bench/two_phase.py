"""The two-phase rules' rows of ``make bench``: LAMB and StableAdamW on the CPU kernel, against
fusedwd's own AdamW step and the best pure-torch step, beside their byte floor (issue 16).

For each case (GPT-2 small, deep MLP) and rule, four providers are timed interleaved in one run:
``floor`` (two traffic passes moving the rule's bytes), ``adamw-fusedwd-cpu`` (fusedwd.AdamW),
``fusedwd-cpu`` (the rule's fused step) and ``torch-foreach`` (bench/providers.py). The rule's
row is judged against three targets: at most ``max_vs_adamw`` times AdamW's step, within
``max_over_floor`` of its floor, and at least ``min_vs_torch`` times faster than pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from bench import measure, providers, report

CASES = ("gpt2", "mlp")
ADAMW = "adamw-" + providers.FUSEDWD_PREFIX + "cpu"
RULE_ROW = providers.FUSEDWD_PREFIX + "cpu"


@dataclass(frozen=True)
class Target:
    """Issue 16's goals for a rule's fused step (fp32, full-size cases, this project's 2-core CPU)."""

    max_vs_adamw: float  # t_rule / t_adamw
    max_over_floor: float  # t_rule / t_floor - 1
    min_vs_torch: float  # t_torch / t_rule

    def describe(self) -> str:
        return (f"<={self.max_vs_adamw:g}x AdamW, <={self.max_over_floor:.0%} over floor, "
                f">={self.min_vs_torch:g}x torch")

    def met(self, row: dict) -> bool:
        vs_adamw, vs_floor, vs_torch = row["vs_adamw"], row["pct_of_floor"], row["speedup_vs_torch"]
        return (vs_adamw is not None and vs_adamw <= self.max_vs_adamw
                and vs_floor is not None and 100.0 / vs_floor - 1.0 <= self.max_over_floor
                and vs_torch is not None and vs_torch >= self.min_vs_torch)


TARGETS = {
    ("gpt2", "LAMB"): Target(1.5, 0.15, 3.0),
    ("mlp", "LAMB"): Target(1.5, 0.15, 5.0),
    ("gpt2", "StableAdamW"): Target(1.4, 0.15, 3.0),
    ("mlp", "StableAdamW"): Target(1.4, 0.15, 5.0),
}


def unavailable() -> str:
    """Why the two-phase rows cannot run here ("" when they can): they need the CPU kernel."""
    try:
        from fusedwd import _C  # noqa: F401
    except Exception as exc:
        return f"fusedwd._C is not built ({type(exc).__name__}: {exc})"
    return ""


def build(rule: str, case, dtype: torch.dtype) -> tuple[list[providers.Provider], dict[str, str]]:
    device = torch.device("cpu")
    base, grads = providers.make_base(case.shapes, dtype, device)
    makers = {
        providers.FLOOR: lambda: providers.two_phase_floor(rule, case.num_params, dtype, device),
        ADAMW: lambda: providers.fusedwd_adamw_rows("cpu", base, grads),
        RULE_ROW: lambda: providers.fusedwd_two_phase(rule, base, grads),
        providers.TORCH_FOREACH: lambda: providers.foreach_two_phase(rule, base, grads),
    }
    built, skipped = [], {}
    for name, make in makers.items():
        try:
            built.append(make())
        except Exception as exc:  # report it, time the rest
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return built, skipped


def run_rule(rule: str, case, args, dtype: torch.dtype, judge: bool) -> dict:
    """Time one rule on one case; its result, with ratios and the verdict."""
    bpp = providers.two_phase_bytes_per_param(rule, dtype)
    tqdm.write(f"{case.name} {rule}: {case.num_tensors} tensors, {case.num_params:,} params, {bpp} B/param")
    built, skipped = build(rule, case, dtype)
    device = torch.device("cpu")
    _, failed = measure.initialise({p.name: p.step for p in built}, device)
    skipped.update(failed)
    built = [p for p in built if p.name not in skipped]
    with measure.Contention() as contention:
        samples = measure.interleaved({p.name: p.step for p in built}, device, args.warmup, args.repeats,
                                      args.budget, args.min_repeats)
    # AdamW's row moves AdamW's bytes (16 B read + 12 B written per fp32 parameter)
    rows = {name: report.summarize(s, case.num_params,
                                   providers.bytes_per_param(dtype, False) if name == ADAMW else bpp)
            for name, s in samples.items()}
    target = TARGETS.get((case.name, rule)) if judge else None
    adamw, floor, pure = rows.get(ADAMW), rows.get(providers.FLOOR), rows.get(providers.TORCH_FOREACH)
    for p in built:
        row = rows[p.name]
        row["description"] = p.description
        row["vs_adamw"] = row["median_ms"] / adamw["median_ms"] if adamw else None
        row["pct_of_floor"] = 100.0 * floor["median_ms"] / row["median_ms"] if floor else None
        row["speedup_vs_torch"] = pure["median_ms"] / row["median_ms"] if pure else None
        row["target"], row["status"] = None, None
        if target is not None and p.name == RULE_ROW:
            row["target"] = target.describe()
            row["status"] = "PASS" if target.met(row) else "MISS"
    return {"name": case.name, "title": case.title, "rule": rule, "num_tensors": case.num_tensors,
            "num_params": case.num_params, "bytes_per_param": bpp, "providers": rows, "skipped": skipped,
            "other_cpu_share": contention.share}


COLUMNS = (("case", "<18"), ("provider", "<18"), ("n", ">3"), ("ms/step", ">9"), ("GB/s", ">6"),
           ("vs AdamW", ">8"), ("% floor", ">7"), ("vs torch", ">8"), ("target", "<46"), ("status", "<6"))


def _ratio(x: float | None, spec: str, unit: str) -> str:
    return "-" if x is None else format(x, spec) + unit


def table(results: list[dict]) -> str:
    lines = ["  ".join(format(h, spec) for h, spec in COLUMNS)]
    lines.append("-" * len(lines[0]))
    for case in results:
        first = True
        for name, r in case["providers"].items():
            cells = (f"{case['name']} {case['rule']}" if first else "", name, str(r["n"]), f"{r['median_ms']:.2f}",
                     f"{r['gb_per_s']:.1f}", _ratio(r["vs_adamw"], ".2f", "x"),
                     _ratio(r["pct_of_floor"], ".0f", "%"), _ratio(r["speedup_vs_torch"], ".1f", "x"),
                     r["target"] or "", r["status"] or "")
            lines.append("  ".join(format(c, spec) for c, (_, spec) in zip(cells, COLUMNS)).rstrip())
            first = False
        for name, why in case["skipped"].items():
            lines.append(f"{'':18}  {name:<18}  skipped: {why}")
    return "\n".join(lines)


def run(args, cases, dtype: torch.dtype, judge: bool) -> tuple[list[dict], list[str]]:
    """Every requested rule on the cases among CASES; prints the table; returns (results, misses)."""
    results = []
    for case in cases:
        if case.name not in CASES:
            continue
        for rule in args.rules:
            results.append(run_rule(rule, case, args, dtype, judge))
            tqdm.write(table(results[-1:]))  # as it comes: a long run that is cut short keeps its rows
    if not results:
        return [], []
    print()
    print("two-phase rules (issue 16): fusedwd-cpu is the rule's fused step, adamw-fusedwd-cpu fusedwd.AdamW's, "
          "torch-foreach the pure-torch rule; floor: the rule's bytes in two passes")
    print(table(results))
    misses = [f"{c['name']} {c['rule']}/{n}" for c in results for n, r in c["providers"].items()
              if r["status"] == "MISS"]
    return results, misses
