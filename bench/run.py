"""Benchmark fusedwd.AdamW against torch.optim.AdamW and the memory-traffic floor.

    python -m bench.run                         # every case, every provider, fp32, CPU
    python -m bench.run --sizes gpt2,mlp --optimizers fusedwd-cpu,torch-fused,floor
    python -m bench.run --quick --sizes mlp --scale 0.05
    python -m bench.run --sizes gpt2,mlp --rules LAMB   # the two-phase rows: LAMB only

On the CPU, the GPT-2 and deep-MLP cases also time the two-phase rules (LAMB,
StableAdamW: bench/two_phase.py) against fusedwd's AdamW step and pure torch.

Prints a table, writes results.json and speedup.png under --out. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from tqdm import tqdm

from bench import cases as cases_mod
from bench import measure, providers, report, two_phase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Above this share of the CPUs used by other processes during a case, its times are flagged.
BUSY_SHARE = 0.05
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto",
                    help="auto (default: cuda when torch sees a GPU, else cpu), cpu or cuda")
    ap.add_argument("--sizes", type=_comma_list, default=list(cases_mod.BUILDERS),
                    help=f"comma list of cases: {','.join(cases_mod.BUILDERS)} (default: all)")
    ap.add_argument("--optimizers", type=_comma_list, default=None,
                    help="comma list of providers (default: every fusedwd backend of the device, "
                         f"{','.join(providers.TORCH_VARIANTS)},{providers.FLOOR})")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per provider (default 21; --quick 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps after the state-initialising one (default 2; --quick 1)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed steps per provider and case; slower providers get fewer "
                         "repeats, never fewer than --min-repeats (default 8; --quick 1)")
    ap.add_argument("--min-repeats", type=int, default=5)
    ap.add_argument("--threads", type=_comma_list, default=None,
                    help="comma list of thread counts, e.g. 1,2: every case is timed at each, one after the "
                         "other, with the same providers (default: torch's count, "
                         f"{torch.get_num_threads()} here); targets are judged at that default only")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--amsgrad", action="store_true", help="benchmark amsgrad=True (36 B/param in fp32)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply each case's layer/block/tensor count (widths unchanged); "
                         "the issue's targets are judged at 1 only")
    ap.add_argument("--out", default=DEFAULT_OUT, help="directory for results.json and speedup.png")
    ap.add_argument("--quick", action="store_true", help="few repeats: a smoke run, not a measurement")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--rules", type=_comma_list, default=list(providers.TWO_PHASE_RULES),
                    help=f"two-phase rules timed on the {','.join(two_phase.CASES)} cases (CPU), comma list of "
                         f"{','.join(providers.TWO_PHASE_RULES)}, or none (default: both)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    for flag, normal, quick in (("repeats", 21, 3), ("warmup", 2, 1), ("budget", 8.0, 1.0)):
        if getattr(args, flag) is None:
            setattr(args, flag, quick if args.quick else normal)
    if args.quick:
        args.min_repeats = min(args.min_repeats, args.repeats)
    if args.rules == ["none"]:
        args.rules = []
    if not set(args.rules) <= set(providers.TWO_PHASE_RULES):
        ap.error(f"unknown rule(s) {sorted(set(args.rules) - set(providers.TWO_PHASE_RULES))}; choose from "
                 f"{list(providers.TWO_PHASE_RULES)} or none")
    known = [providers.FUSEDWD_PREFIX + b for b in providers.FUSEDWD_BACKENDS]
    known += [providers.FUSEDWD_PREFIX + b + providers.FLAT_SUFFIX
              for b in providers.FUSEDWD_BACKENDS if b != "reference"]
    known += [*providers.TORCH_VARIANTS, providers.DEEPSPEED, providers.FLOOR]
    if args.optimizers is not None and not set(args.optimizers) <= set(known):
        ap.error(f"unknown provider(s) {sorted(set(args.optimizers) - set(known))}; choose from {known}")
    unknown = [s for s in args.sizes if s not in cases_mod.BUILDERS]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(cases_mod.BUILDERS)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda requested but torch.cuda.is_available() is False")
    if args.repeats < 1 or args.scale <= 0:
        ap.error("--repeats must be >= 1 and --scale > 0")
    default_threads = torch.get_num_threads()
    try:
        args.threads = [int(t) for t in args.threads] if args.threads else [default_threads]
    except ValueError:
        ap.error(f"--threads takes a comma list of positive integers, got {','.join(args.threads)}")
    if min(args.threads) < 1:
        ap.error("--threads: thread counts must be >= 1")
    args.default_threads = default_threads
    return args


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _git_dirty() -> bool | None:
    """Whether the working tree differs from HEAD: then the commit alone does not identify the code measured."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def _fusedwd_info() -> dict:
    try:
        import fusedwd
    except Exception as exc:
        return {"importable": False, "error": repr(exc)}
    info = {"importable": True, "version": getattr(fusedwd, "__version__", None), "cpu_isa": None}
    try:
        from fusedwd import _C

        info["cpu_isa"] = _C.isa()  # the variant the CPU kernel dispatches to (FUSEDWD_CPU_ISA overrides)
        info["cpu_isas_supported"] = list(_C.supported_isas())
    except Exception as exc:  # the extension failed to build or load: record why the ISA is unknown
        info["cpu_isa_error"] = repr(exc)
    return info


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_gb": None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fusedwd": _fusedwd_info(),
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
    }
    try:
        info["mem_total_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def default_providers(device: torch.device) -> tuple[list[str], str]:
    """The providers of a default run, and a note on what is missing (fusedwd, DeepSpeed)."""
    backends, why = providers.fusedwd_backends(device)
    names = [providers.FUSEDWD_PREFIX + b for b in backends]
    peers = []
    ds_missing = providers.deepspeed_missing(device)
    if ds_missing:
        why = "; ".join(w for w in (why, f"{providers.DEEPSPEED} skipped: {ds_missing}") if w)
    else:
        peers.append(providers.DEEPSPEED)
    return names + list(providers.TORCH_VARIANTS) + peers + [providers.FLOOR], why


def run_case(case, names, implicit_reference, judge, args, device, dtype, bar) -> list[dict]:
    """Build, time and summarize the providers of one case: one result per thread count.

    A function of its own so that the case's parameters and states (6 GB and
    more for GPT-2 small) are freed on return, before the next case allocates.
    """
    bpp = providers.bytes_per_param(dtype, args.amsgrad)
    tqdm.write(f"{case.name}: {case.title}, {case.num_tensors} tensors, {case.num_params:,} params, {bpp} B/param")
    n_opt = sum(n != providers.FLOOR for n in names)
    need, avail = providers.estimate_memory(case, dtype, n_opt, args.amsgrad), _mem_available()
    if avail is not None and need > 0.9 * avail:
        raise SystemExit(f"{case.name} needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available: "
                         "drop providers with --optimizers or cases with --sizes")
    bar.set_description(f"{case.name}: setup")
    built, skipped = providers.build(names, case, dtype, device, args.amsgrad)
    bar.set_description(f"{case.name}: first step")
    first_s, failed = measure.initialise({p.name: p.step for p in built}, device)
    skipped.update(failed)
    slow_s = args.budget / args.min_repeats
    for name in implicit_reference:
        if first_s.get(name, 0.0) > slow_s:
            # The reference is the executable spec, not a contender: by default it is timed only where cheap.
            skipped[name] = (f"first step took {first_s[name]:.1f} s > {slow_s:.1f} s (budget / min repeats); "
                             "name it in --optimizers to time it anyway")
    built = [p for p in built if p.name not in skipped]
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        # the targets are stated for this project's 2-core machine at its default thread count
        target = report.TARGETS.get(case.name) if judge and threads == args.default_threads else None
        label = f"{case.name} @{threads}" if len(args.threads) > 1 else case.name
        bar.set_description(f"{label}: warm-up")
        with measure.Contention() as contention:
            samples = measure.interleaved(
                {p.name: p.step for p in built}, device, args.warmup, args.repeats, args.budget, args.min_repeats,
                on_round=lambda label=label: (bar.update(1), bar.set_description(f"{label}: timing")),
            )
        # Rounds a case did not need (every provider over budget) still count towards the bar.
        bar.update(args.repeats - max((len(s) for s in samples.values()), default=0))
        rows = {name: report.summarize(s, case.num_params, bpp) for name, s in samples.items()}
        report.add_ratios(rows, target)
        for p in built:
            rows[p.name].update(description=p.description, notes=p.notes)
        results.append({
            "name": case.name,
            "title": case.title,
            "threads": threads,
            "num_tensors": case.num_tensors,
            "num_params": case.num_params,
            "bytes_per_param": bpp,
            "target": None if target is None else {"min_speedup": target.min_speedup,
                                                   "max_over_floor": target.max_over_floor},
            "providers": rows,
            "skipped": skipped,
            "other_cpu_share": contention.share,
        })
    torch.set_num_threads(args.default_threads)
    return results


def run(args: argparse.Namespace, command: list[str] | None = None) -> dict:
    """Measure every requested case and provider; print the table; write JSON and the plot; return the results."""
    t_start = time.perf_counter()
    device = torch.device(args.device)
    names, why_no_fusedwd = default_providers(device)
    if args.optimizers is not None:
        names = args.optimizers
    reference = providers.FUSEDWD_PREFIX + "reference"
    implicit_reference = [reference] if args.optimizers is None and reference in names else []
    cases = cases_mod.build(args.sizes, args.scale)
    dtype = DTYPES[args.dtype]
    results = {
        "machine": machine_info(device),
        "config": {
            "command": command if command is not None else [sys.executable, *sys.argv],
            "device": str(device),
            "dtype": args.dtype,
            "amsgrad": args.amsgrad,
            "hyperparameters": providers.HYPERPARAMETERS,
            "providers": names,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "budget_s": args.budget,
            "min_repeats": args.min_repeats,
            "scale": args.scale,
            "threads": args.threads,
            "quick": args.quick,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "cases": [],
    }
    if why_no_fusedwd:
        tqdm.write(f"note: no fusedwd provider: {why_no_fusedwd}")
    if device.type == "cpu":
        gpu = "a CUDA device is present: run with --device cuda" if torch.cuda.is_available() else \
            "no CUDA device (torch.cuda.is_available() is False)"
        tqdm.write(f"note: GPU providers (fusedwd-cuda, fusedwd-triton) skipped: {gpu}")
    # the targets are stated for this project's 2-core CPU machine
    judge = report.targets_apply(args.dtype, args.amsgrad, args.scale) and device.type == "cpu"
    bar = tqdm(total=len(cases) * len(args.threads) * args.repeats, unit="round", disable=args.no_progress,
               file=sys.stderr)
    for case in cases:
        results["cases"].extend(run_case(case, names, implicit_reference, judge, args, device, dtype, bar))
    bar.close()

    misses = [f"{report.case_label(c, results)}/{n}" for c in results["cases"] for n, r in c["providers"].items()
              if r["status"] == "MISS"]
    print(report.table(results))
    # the two-phase rules run on the CPU kernel only; their targets are stated for fp32 full-size cases
    why_not = "" if device.type == "cpu" else "they run on the CPU kernel only"
    why_not = why_not or two_phase.unavailable()
    results["config"]["rules"] = args.rules
    results["two_phase"], rule_misses = [], []
    if args.rules and why_not:
        print(f"note: two-phase rows ({', '.join(args.rules)}) skipped: {why_not}")
    elif args.rules:
        results["two_phase"], rule_misses = two_phase.run(args, cases, dtype,
                                                          judge and args.threads == [args.default_threads])
    misses += rule_misses
    results["misses"] = misses
    results["elapsed_s"] = time.perf_counter() - t_start
    if len(args.threads) > 1:
        print()
        print(report.scaling_table(results))
    short = [f"{report.case_label(c, results)}/{n} n={r['n']}" for c in results["cases"]
             for n, r in c["providers"].items() if r["n"] < args.repeats]
    if short:
        print(f"fewer than {args.repeats} repeats (time budget {args.budget:g} s per provider and case): "
              f"{', '.join(short)}")
    floors = {r["description"] for c in results["cases"] for n, r in c["providers"].items() if n == providers.FLOOR}
    for d in sorted(floors):
        print(f"floor: {d}")
    busy = [f"{report.case_label(c, results)} {c['other_cpu_share']:.0%}" for c in results["cases"]
            if c["other_cpu_share"] is not None and c["other_cpu_share"] > BUSY_SHARE]
    busy += [f"{c['name']} {c['rule']} {c['other_cpu_share']:.0%}" for c in results["two_phase"]
             if c["other_cpu_share"] is not None and c["other_cpu_share"] > BUSY_SHARE]
    if busy:
        print(f"WARNING: other processes used the CPUs while timing ({', '.join(busy)} of capacity): "
              "these times are not comparable; rerun on a quiet machine")
    if not judge:
        print("targets: not judged (they are stated for fp32 AdamW, amsgrad=False, full-size cases)")
    elif misses:
        print(f"targets missed: {', '.join(misses)}")
    report.ensure_dir(args.out)
    json_path = os.path.join(args.out, "results.json")
    report.write_json(results, json_path)
    written = [json_path]
    if not args.no_plot:
        png_path = os.path.join(args.out, "speedup.png")
        report.plot(results, png_path)
        written.append(png_path)
    print(f"wrote {', '.join(written)} ({results['elapsed_s']:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Record the command as typed: under -m, sys.argv[0] is the module's file path.
    launcher = ["-m", "bench.run"] if __package__ else sys.argv[:1]
    results = run(args, [sys.executable, *launcher, *(sys.argv[1:] if argv is None else argv)])
    return 1 if args.strict and results["misses"] else 0


if __name__ == "__main__":
    sys.exit(main())
