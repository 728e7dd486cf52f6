"""Mixed-precision layouts and fused clipping on GPT-2 small shapes (issue 5).

    python -m bench.precision               # the table below, JSON under bench/results/
    python -m bench.precision --quick       # a smoke run, not a measurement

Each layout is timed beside the memory-traffic floor of ITS bytes (a
fusedwd._C.traffic_pass over 16-bit buffers moving the same bytes per
parameter), interleaved with torch's fused fp32 AdamW, in one run:

- fusedwd bf16 params and grads + fp32 master + fp32 states (30 B/param);
- the same with bf16 states (22 B/param);
- bf16 params, grads and states without a master, fusedwd and torch's fused
  AdamW (14 B/param; lossy: updates below half a bf16 ulp are lost);
- 8-bit states (``state_dtype="int8"``) with fp32 parameters (16 B/param) and
  with bf16 parameters + fp32 master (18 B/param), and their state memory;
- fp32: ``clip_grad_norm_`` + torch's fused step against fusedwd's
  ``max_grad_norm`` (one read of the gradients for the norm, the clip folded
  into the step);
- fusedwd's Lion in fp32 beside the floor of its own bytes: one state, so
  20 B/param (p, g, m read; p, m written) against AdamW's 28.
- when deepspeed imports, DeepSpeedCPUAdam in its two mixed-precision ways:
  ZeRO-Offload's (the step on fp32 masters with fp32 gradients, then the
  masters copied out to the bf16 parameters: 34 B/param, its op has no fused
  copy-out) against fusedwd's master weights, and bf16 parameters with fp32
  states (22 B/param) against fusedwd's same layout.

Targets (issue 5): the master-weight layout within 10% of its floor; clip +
step at least 1.25x faster than clip_grad_norm_ + torch fused. (Issue 6): fp32
master + 8-bit states at least 1.6x faster than torch fused fp32; state memory
at most 26% of fp32 states.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench import cases, measure, providers, report
from bench.providers import HYPERPARAMETERS, make_base

MAX_NORM = 1.0
PASS_BUFFERS = 8  # the most read (and write) buffers one fusedwd._C.traffic_pass takes (kMaxTrafficBuffers)
# (reads, writes) of 2-byte units per parameter: the floor of each layout
TRAFFIC = {
    "master-fp32-states": (8, 7),  # read p2 g2 master4 m4 v4; write p2 master4 m4 v4
    "master-bf16-states": (6, 5),  # read p2 g2 master4 m2 v2; write p2 master4 m2 v2
    "bf16": (4, 3),  # read p g m v; write p m v, all 2 B
    "fp32-int8": (5, 3),  # read p4 g4 m1 v1; write p4 m1 v1 (+ 8 B of absmax per 256)
    "master-int8": (5, 4),  # read p2 g2 master4 m1 v1; write p2 master4 m1 v1
    "bf16-fp32-states": (6, 5),  # read p2 g2 m4 v4; write p2 m4 v4
    # ZeRO-Offload's step: read master4 g4 m4 v4, write master4 m4 v4; then read master4, write p2
    "ds-master": (10, 7),
    "fp32": (8, 6),  # read p g m v; write p m v, all 4 B
    "lion-fp32": (6, 4),  # Lion: read p g m; write p m, all 4 B (20 B/param)
}


def _params(base, grads, dtype):
    params = [torch.nn.Parameter(b.to(dtype).clone()) for b in base]
    for p, g in zip(params, grads):
        p.grad = g.to(dtype).clone()
    return params


def _floor(num_params: int, layout: str, bufs: list):
    from fusedwd import _C

    reads, writes = TRAFFIC[layout]
    # every floor uses a prefix of the same buffers (the widest layout's), to save memory
    while len(bufs) < min(PASS_BUFFERS, max(reads, writes)):
        bufs.append(torch.empty(num_params, dtype=torch.int16).random_(-1000, 1000))
    # a layout moving more buffers than one pass takes is split into passes (ds-master: two, as its step)
    passes = []
    while reads or writes:
        r, w = min(reads, len(bufs)), min(writes, len(bufs))
        passes.append(([b.data_ptr() for b in bufs[:r]], [b.data_ptr() for b in bufs[:w]]))
        reads, writes = reads - r, writes - w

    def step():
        for read_addrs, write_addrs in passes:
            _C.traffic_pass(read_addrs, write_addrs, num_params, 2, torch.get_num_threads())

    return step


def build(case, quick: bool):
    """name -> (step, bytes per param, floor name, description), and what keeps buffers alive."""
    import fusedwd

    base, grads = make_base(case.shapes, torch.float32, torch.device("cpu"))
    steps, keep = {}, []

    def add(name, step, layout, description):
        steps[name] = (step, 2 * sum(TRAFFIC[layout]), "floor-" + layout, description)

    bf = torch.bfloat16
    add("fusedwd-master", fusedwd.AdamW(_params(base, grads, bf), master_weights=True, **HYPERPARAMETERS).step,
        "master-fp32-states", "bf16 p/g, fp32 master + states")
    add("fusedwd-master-bf16s", fusedwd.AdamW(_params(base, grads, bf), master_weights=True,
                                              state_dtype=bf, **HYPERPARAMETERS).step,
        "master-bf16-states", "bf16 p/g, fp32 master, bf16 states")
    int8 = fusedwd.AdamW(_params(base, grads, torch.float32), state_dtype="int8", **HYPERPARAMETERS)
    add("fusedwd-fp32-int8", int8.step, "fp32-int8", "fp32 p/g, 8-bit states")
    add("fusedwd-master-int8", fusedwd.AdamW(_params(base, grads, bf), master_weights=True, state_dtype="int8",
                                             **HYPERPARAMETERS).step,
        "master-int8", "bf16 p/g, fp32 master, 8-bit states")
    add("fusedwd-bf16", fusedwd.AdamW(_params(base, grads, bf), **HYPERPARAMETERS).step, "bf16",
        "bf16 p/g/states (lossy)")
    add("torch-fused-bf16", torch.optim.AdamW(_params(base, grads, bf), fused=True, **HYPERPARAMETERS).step, "bf16",
        "torch fused, bf16 p/g/states (lossy)")
    add("torch-fused", torch.optim.AdamW(_params(base, grads, torch.float32), fused=True, **HYPERPARAMETERS).step,
        "fp32", "torch fused fp32 (the baseline)")

    torch_params = _params(base, grads, torch.float32)
    torch_opt = torch.optim.AdamW(torch_params, fused=True, **HYPERPARAMETERS)

    def clip_then_step():
        torch.nn.utils.clip_grad_norm_(torch_params, MAX_NORM)
        torch_opt.step()

    add("torch-clip+fused", clip_then_step, "fp32", "clip_grad_norm_ + torch fused fp32")
    add("fusedwd-clip", fusedwd.AdamW(_params(base, grads, torch.float32), max_grad_norm=MAX_NORM,
                                      **HYPERPARAMETERS).step, "fp32", "fusedwd max_grad_norm, fp32")
    add("fusedwd-lion", fusedwd.Lion(_params(base, grads, torch.float32), lr=1e-4, weight_decay=0.1).step,
        "lion-fp32", "fusedwd Lion, fp32 p/g/m")
    add("fusedwd-bf16-fp32s", fusedwd.AdamW(_params(base, grads, bf), state_dtype=torch.float32,
                                            **HYPERPARAMETERS).step, "bf16-fp32-states",
        "bf16 p/g, fp32 states, no master")
    skipped = _add_deepspeed(add, base, grads)
    floors = {"floor-" + layout: _floor(case.num_params, layout, keep) for layout in TRAFFIC}
    return steps, floors, keep, int8, skipped


def _add_deepspeed(add, base, grads) -> dict[str, str]:
    """DeepSpeedCPUAdam's mixed-precision layouts, when deepspeed imports; else why not (one line)."""
    missing = providers.deepspeed_missing(torch.device("cpu"))
    names = ("deepspeed-master", "deepspeed-bf16-fp32s")
    if missing:
        return {n: missing for n in names}
    bf = torch.bfloat16
    try:
        # ZeRO-Offload: fp32 masters and fp32 gradients on the CPU, the step, then the copy to the
        # 16-bit parameters the GPU trains with
        masters = _params(base, grads, torch.float32)
        low = [m.detach().to(bf) for m in masters]
        ds_master = providers.deepspeed_cpu_adam(masters, amsgrad=False)

        def master_step():
            ds_master.step()
            torch._foreach_copy_(low, [m.detach() for m in masters])

        ds_mixed = providers.deepspeed_cpu_adam(_params(base, grads, bf), amsgrad=False)
    except Exception as exc:  # the op failed to build: report it, time the rest
        return {n: f"{type(exc).__name__}: {exc}" for n in names}
    add("deepspeed-master", master_step, "ds-master", "DS: fp32 master/g/states, copy to bf16")
    add("deepspeed-bf16-fp32s", ds_mixed.step, "bf16-fp32-states", "DS: bf16 p/g, fp32 states, no master")
    return {}


def state_bytes(opt) -> int:
    """Bytes of an optimizer's states (step counts and master copies excluded)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
               if isinstance(v, torch.Tensor) and k not in ("step", "master_param"))


def run(args) -> dict:
    case = cases.BUILDERS[args.case](args.scale)
    steps, floors, keep, int8, skipped = build(case, args.quick)
    every = {**{n: s[0] for n, s in steps.items()}, **floors}
    _, failed = measure.initialise(every, torch.device("cpu"))
    if failed:
        raise SystemExit(f"a provider failed its first step: {failed}")
    with measure.Contention() as contention:
        samples = measure.interleaved(every, torch.device("cpu"), args.warmup, args.repeats, args.budget,
                                      args.min_repeats)
    med = {n: report.summarize(s, case.num_params, 1)["median_ms"] for n, s in samples.items()}
    rows = []
    for name, (_, bpp, floor, description) in steps.items():
        rows.append({
            "provider": name, "description": description, "bytes_per_param": bpp, "median_ms": med[name],
            "gb_per_s": bpp * case.num_params / med[name] / 1e6,
            "floor_ms": med[floor], "pct_of_floor": 100.0 * med[floor] / med[name],
            "vs_torch_fused_fp32": med["torch-fused"] / med[name],
        })
    by = {r["provider"]: r for r in rows}
    clip_speedup = med["torch-clip+fused"] / med["fusedwd-clip"]
    int8_memory = state_bytes(int8) / (2 * 4 * case.num_params)  # vs AdamW's two fp32 states
    int8_speedup = med["torch-fused"] / med["fusedwd-master-int8"]
    master_over = med["fusedwd-master"] / med["floor-master-fp32-states"] - 1.0
    judged = args.case == "gpt2" and args.scale == 1.0 and not args.quick
    targets = {
        "master_within_10pct_of_floor": {"value": master_over, "pass": master_over <= 0.10 if judged else None},
        "clip_step_1.25x": {"value": clip_speedup, "pass": clip_speedup >= 1.25 if judged else None},
        "master_int8_1.6x": {"value": int8_speedup, "pass": int8_speedup >= 1.6 if judged else None},
        "int8_state_memory_26pct": {"value": int8_memory, "pass": int8_memory <= 0.26},
    }
    result = {
        "case": {"name": case.name, "num_tensors": case.num_tensors, "num_params": case.num_params},
        "rows": rows, "targets": targets, "other_cpu_share": contention.share, "skipped": skipped,
        "config": {"repeats": args.repeats, "warmup": args.warmup, "scale": args.scale, "quick": args.quick,
                   "threads": torch.get_num_threads(),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    }
    print(f"{case.title} shapes: {case.num_tensors} tensors, {case.num_params:,} params; medians of {args.repeats} "
          "interleaved steps")
    print(f"{'provider':<21}{'layout':<38}{'B/param':>8}{'ms/step':>9}{'GB/s':>7}{'% floor':>8}{'vs fused fp32':>14}")
    for r in rows:
        print(f"{r['provider']:<21}{r['description']:<38}{r['bytes_per_param']:>8}{r['median_ms']:>9.1f}"
              f"{r['gb_per_s']:>7.1f}{r['pct_of_floor']:>8.0f}{r['vs_torch_fused_fp32']:>13.2f}x")
    print(f"clip + step: fusedwd max_grad_norm {by['fusedwd-clip']['median_ms']:.1f} ms vs clip_grad_norm_ + torch "
          f"fused {by['torch-clip+fused']['median_ms']:.1f} ms: {clip_speedup:.2f}x (target >= 1.25x)")
    print(f"master weights: {100 * master_over:+.0f}% over the floor of their 30 B/param (target <= +10%)")
    print(f"8-bit states: bf16 + fp32 master + 8-bit states {int8_speedup:.2f}x torch fused fp32 (target >= 1.6x); "
          f"fp32 params + 8-bit states {med['torch-fused'] / med['fusedwd-fp32-int8']:.2f}x; state memory "
          f"{100 * int8_memory:.1f}% of fp32 states (target <= 26%)")
    lion = by["fusedwd-lion"]
    print(f"Lion: {lion['median_ms']:.1f} ms, {lion['pct_of_floor']:.0f}% of the floor of its 20 B/param "
          f"({lion['vs_torch_fused_fp32']:.2f}x torch fused fp32 AdamW's 28 B/param step)")
    if "deepspeed-master" in by:
        master = by["deepspeed-master"]["median_ms"] / by["fusedwd-master"]["median_ms"]
        states = by["deepspeed-bf16-fp32s"]["median_ms"] / by["fusedwd-bf16-fp32s"]["median_ms"]
        print(f"DeepSpeedCPUAdam: fusedwd master weights {master:.2f}x ZeRO-Offload's step + copy-out; "
              f"bf16 p with fp32 states {states:.2f}x DeepSpeed's")
    for name, why in skipped.items():
        print(f"{name} skipped: {why}")
    if not judged:
        print("targets: not judged (they are stated for full-size GPT-2 shapes, without --quick)")
    if contention.share is not None and contention.share > 0.05:
        print(f"WARNING: other processes used {contention.share:.0%} of the CPUs while timing: "
              "rerun on a quiet machine")
    report.ensure_dir(args.out)
    path = os.path.join(args.out, "precision.json")
    report.write_json(result, path)
    print(f"wrote {path}")
    del keep
    return result


def main(argv=None) -> int:
    run(main_args(argv))
    return 0


def main_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per provider (default 11; --quick 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget", type=float, default=None, help="seconds per provider (default 6; --quick 1)")
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--case", choices=list(cases.BUILDERS), default="gpt2", help="shape set (default gpt2)")
    ap.add_argument("--scale", type=float, default=1.0, help="the case's layer count multiplier (targets judged at 1)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 11
    if args.budget is None:
        args.budget = 1.0 if args.quick else 6.0
    args.min_repeats = min(args.min_repeats, args.repeats)
    return args


def smoke(out_dir: str) -> dict:
    """A seconds-long run on tiny shapes for the test suite: the pipeline, not the speed."""
    return run(main_args(["--quick", "--case", "mlp", "--scale", "0.01", "--out", out_dir]))


if __name__ == "__main__":
    sys.exit(main())
