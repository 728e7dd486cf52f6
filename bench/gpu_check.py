"""The first GPU run, in one command: ``make gpu-check`` (docs/benchmarks.md#gpu-check).

    python -m bench.gpu_check                 # build _C_cuda for this GPU, then every check
    python -m bench.gpu_check --no-build      # the checks only (the module is already built for it)

Rebuilds ``fusedwd._C_cuda`` in place for the present GPU only
(``FUSEDWD_CUDA_ARCHS`` = its compute capability), then, on the ``cuda`` and
``triton`` backends, checks and prints one OK or BAD line each:

- correctness against ``torch.optim.AdamW(fused=True)`` and the CPU kernel:
  fp32, bf16, bf16 + master, int8 (fp32 and with masters), misaligned views
  (bitwise equal to aligned ones), empty and odd-sized tensors, 400 param
  groups, GradScaler with an injected inf (the skipped step leaves everything
  untouched), max_grad_norm (fp64 included);
- no host sync in a steady-state ``step()`` for each option
  (``torch.cuda.set_sync_debug_mode("error")``);
- ``opt.step()`` captured in a CUDA graph and replayed with a changing device
  lr, bitwise equal to eager steps, with same-sized pinned allocations made
  between replays; ``torch.compile(opt.step, mode="reduce-overhead")`` likewise;
- one tensor of more than 2^31 elements updated entirely;
- timing against torch fused and foreach on GPT-2 small and 10,000 x 1,000,
  fp32 and bf16 + master (and int8 + master), beside a device copy of the same
  bytes (the floor): ms/step, GB/s, % of floor, device launches per step, and
  the issue's targets as PASS/MISS lines;
- the two-phase rules (LAMB, StableAdamW) on GPT-2 small and the deep MLP, fp32:
  each backend's fused step against fusedwd's AdamW step on the same backend,
  the pure-torch rule (foreach ops + torch._foreach_norm, bench/providers.py)
  and a device copy of the rule's bytes, with issue 16's targets as PASS/MISS
  lines (a backend without a kernel for the rule yet is reported as such).

Writes everything to bench/results/gpu_check.json. Without a GPU it says so in
one line and exits 0. Every check is bounded so that the whole run, build
included, stays within 8 minutes on one H100. The correctness checks also run
on CPU tensors (``--device cpu``, the CPU backend against torch's fused CPU
AdamW): tests/test_gpu_check.py runs them that way.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check.json"
TIME_LIMIT_S = 8 * 60
HYPER = dict(lr=2e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05)
SHAPES = [(0,), (1,), (7,), (4097,), (1024, 33), (6, 42, 123), (257, 3)]
# per layout: parameter dtype and options; torch's fused AdamW keeps states in the parameter's dtype
LAYOUTS = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "bf16+master": (torch.bfloat16, dict(master_weights=True)),
    "int8": (torch.float32, dict(state_dtype="int8", min_8bit_numel=256)),
    "int8+master": (torch.bfloat16, dict(state_dtype="int8", master_weights=True, min_8bit_numel=256)),
}
# Units in the last place allowed against the CPU kernel: the test suite's table (tests/_tolerances.py);
# the bias corrections' double pow may differ in its last bit between libm and the device. Against
# torch's fused kernel, a different implementation (another operation order), TORCH_ULPS.
ULPS = {torch.float32: 32, torch.bfloat16: 2, torch.float64: 32, torch.float16: 2}
TORCH_ULPS = {dtype: 4 * u for dtype, u in ULPS.items()}
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52, torch.float16: 2.0**-10}


class Report:
    """OK / BAD lines as they come, and the JSON report."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.checks: list[dict[str, Any]] = []
        self.timing: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def record(self, name: str, ok: bool, detail: str = "", **data: Any) -> bool:
        print(f"{'OK ' if ok else 'BAD'} {name}" + (f": {detail}" if detail else ""), flush=True)
        self.checks.append(dict(name=name, ok=bool(ok), detail=detail, **data))
        return ok

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run one check; an exception is a BAD line with its message, and the next check runs."""
        if self.left() < 0:
            self.record(name, False, "skipped: out of time")
            return
        try:
            fn(self, *args, **kwargs)
        except Exception as exc:  # a failing check must not stop the others
            self.record(name, False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                        traceback=traceback.format_exc()[-3000:])

    @property
    def bad(self) -> int:
        return sum(not c["ok"] for c in self.checks)


# ---------------------------------------------------------------------- helpers
def _random(shapes, dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _grads(shapes, dtype, t: int, device, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1000003 + t)
    return [(torch.randn(s, generator=gen) * (0.1 + k % 3)).to(dtype).to(device) for k, s in enumerate(shapes)]


def _params(values, device) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(v.detach().to(device, copy=True)) for v in values]


def _states(opt, p) -> dict[str, torch.Tensor]:
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} if p in opt.state else {}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equality is bitwise (NaN equals its own bits, -0 differs from 0)."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a).cpu(), _bits(b).cpu())


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference in ulps of b's dtype, relative to each element's magnitude plus the
    tensor's largest (tests/_tolerances.py: a value left by cancellation keeps its large terms' error)."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = b.abs() + b.abs().max()
    diff = (a - b).abs()
    return (diff / torch.where(scale > 0, scale, 1.0)).max().item()


def _compare(opt_a, params_a, opt_b, params_b, dtype, ulps: Optional[dict] = None) -> tuple[bool, float, int, int]:
    """(within tolerance, worst difference in ulps, bitwise-equal tensors, tensors): parameters and
    every state both optimizers keep."""
    worst, same, total = 0.0, 0, 0
    for pa, pb in zip(params_a, params_b):
        pairs = [(pa, pb)]
        sa, sb = _states(opt_a, pa), _states(opt_b, pb)
        pairs += [(sa[k], sb[k]) for k in sa if k in sb and sa[k].dtype == sb[k].dtype]
        for x, y in pairs:
            total += 1
            same += _bitwise(x, y)
            if x.dtype.is_floating_point:
                worst = max(worst, _ulps(x, y) / EPS.get(y.dtype, EPS[torch.float32]))
            else:
                # 8-bit codes: a last-bit difference of the fp32 state (the device's pow) may move a
                # value across a code boundary: one level, rarely; anything more is wrong
                diff = (x.cpu().int() - y.cpu().int()).abs()
                if diff.numel() and (diff.max() > 1 or (diff > 0).double().mean() > 1e-3):
                    worst = math.inf
    return worst <= (ulps or ULPS)[dtype], worst, same, total


def _run_steps(opts_params: list, shapes, dtype, steps: int, devices: list, seed: int = 1,
               before: Optional[Callable[[int], None]] = None) -> None:
    for t in range(steps):
        grads = _grads(shapes, dtype, t, "cpu", seed)
        if before:
            before(t)
        for (opt, params), device in zip(opts_params, devices):
            for p, g in zip(params, grads):
                p.grad = g.to(device, copy=True)
            opt.step()


# ---------------------------------------------------------------------- correctness
def check_layouts(report: Report, device: str, backend: str, steps: int = 10) -> None:
    """Each layout against the CPU kernel and (where torch has the layout) torch's fused AdamW."""
    import fusedwd

    cpu_backend = "cpu" if fusedwd._ext.has_cpu() else "reference"
    for name, (dtype, options) in LAYOUTS.items():
        values = _random(SHAPES, dtype, seed=3)
        a, b = _params(values, device), _params(values, "cpu")
        opt_a = fusedwd.AdamW(a, backend=backend, **HYPER, **options)
        opt_b = fusedwd.AdamW(b, backend=cpu_backend, **HYPER, **options)
        runs = [(opt_a, a), (opt_b, b)]
        devices = [device, "cpu"]
        if not options:
            c = _params(values, device)
            runs.append((torch.optim.AdamW(c, fused=True, **HYPER), c))
            devices.append(device)
        _run_steps(runs, SHAPES, dtype, steps, devices)
        ok, worst, same, total = _compare(opt_a, a, opt_b, b, dtype)
        detail = f"{steps} steps, vs the CPU kernel: {same}/{total} tensors bitwise, worst {worst:.3g} ulp"
        if not options:
            ok_t, worst_t, _, _ = _compare(opt_a, a, runs[2][0], runs[2][1], dtype, TORCH_ULPS)
            ok = ok and ok_t
            detail += f"; vs torch fused: worst {worst_t:.3g} ulp"
        report.record(f"{backend} {name}", ok, detail, layout=name, worst_ulps=worst, bitwise=same, tensors=total)


def check_misaligned(report: Report, device: str, backend: str, steps: int = 5) -> None:
    """Parameters and gradients at odd offsets of their storages: the scalar path, bitwise equal to aligned."""
    import fusedwd

    for dtype in (torch.float32, torch.bfloat16):
        values = _random(SHAPES, dtype, seed=4)
        aligned = _params(values, device)
        storages = [torch.empty(v.numel() + 3, dtype=dtype, device=device) for v in values]
        odd = []
        for s, v in zip(storages, values):
            view = s[1: 1 + v.numel()].view(v.shape)
            view.copy_(v)
            odd.append(torch.nn.Parameter(view))
        opt_a = fusedwd.AdamW(aligned, backend=backend, **HYPER)
        opt_o = fusedwd.AdamW(odd, backend=backend, **HYPER)
        for t in range(steps):
            for pa, po, g in zip(aligned, odd, _grads(SHAPES, dtype, t, device)):
                pa.grad = g.clone()
                gs = torch.empty(g.numel() + 1, dtype=dtype, device=device)
                po.grad = gs[1:].view(g.shape)
                po.grad.copy_(g)
            opt_a.step()
            opt_o.step()
        same = all(_bitwise(x, y) for x, y in zip(aligned, odd)) and all(
            _bitwise(sa, so) for pa, po in zip(aligned, odd)
            for sa, so in zip(_states(opt_a, pa).values(), _states(opt_o, po).values()))
        report.record(f"{backend} misaligned views {str(dtype)[6:]}", same,
                      "bitwise equal to aligned copies" if same else "differ from aligned copies")


def check_groups(report: Report, device: str, backend: str, groups: int = 400, steps: int = 5) -> None:
    """400 param groups with their own lr and weight decay, one bucket: against torch fused and the CPU kernel."""
    import fusedwd

    shapes = [(3 + k % 17, 5) for k in range(groups)]
    values = _random(shapes, torch.float32, seed=5)
    runs, devices = [], []
    for cls, dev, kw in ((fusedwd.AdamW, device, dict(backend=backend)),
                         (fusedwd.AdamW, "cpu", dict(backend="cpu" if fusedwd._ext.has_cpu() else "reference")),
                         (torch.optim.AdamW, device, dict(fused=True))):
        params = _params(values, dev)
        spec = [{"params": [p], "lr": 1e-3 * (1 + k / groups), "weight_decay": 0.1 * (k % 7) / 7}
                for k, p in enumerate(params)]
        runs.append((cls(spec, betas=HYPER["betas"], eps=HYPER["eps"], **kw), params))
        devices.append(dev)
    _run_steps(runs, shapes, torch.float32, steps, devices)
    ok_c, worst_c, same, total = _compare(*runs[0], *runs[1], torch.float32)
    ok_t, worst_t, _, _ = _compare(*runs[0], *runs[2], torch.float32, TORCH_ULPS)
    buckets = len(runs[0][0]._current_plan())
    report.record(f"{backend} {groups} param groups", ok_c and ok_t and buckets == 1,
                  f"{buckets} bucket; vs CPU kernel {same}/{total} bitwise, worst {worst_c:.3g} ulp; "
                  f"vs torch fused worst {worst_t:.3g} ulp")


def check_grad_scaler(report: Report, device: str, backend: str, steps: int = 6, inject: int = 2) -> None:
    """GradScaler with an inf injected at one step: that step changes nothing; the others match the CPU kernel."""
    import fusedwd

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.LayerNorm(33), torch.nn.Linear(33, 5))
    models = [copy.deepcopy(base).to(device), copy.deepcopy(base)]
    cpu_backend = "cpu" if fusedwd._ext.has_cpu() else "reference"
    opts = [fusedwd.AdamW(m.parameters(), backend=b, **HYPER) for m, b in zip(models, (backend, cpu_backend))]
    scalers = [torch.amp.GradScaler(torch.device(device).type, init_scale=2.0**12),
               torch.amp.GradScaler("cpu", init_scale=2.0**12)]
    gen = torch.Generator().manual_seed(5)
    untouched = None
    for t in range(steps):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        for m, o, s, dev in zip(models, opts, scalers, (device, "cpu")):
            o.zero_grad()
            s.scale(torch.nn.functional.cross_entropy(m(x.to(dev)), y.to(dev))).backward()
            if t == inject:
                next(m.parameters()).grad[0, 0] = float("inf")
        if t == inject:
            before = [p.detach().clone() for p in models[0].parameters()] + [
                v.clone() for p in models[0].parameters() for v in _states(opts[0], p).values()]
        for o, s in zip(opts, scalers):
            s.step(o)
            s.update()
        if t == inject:
            after = [p.detach() for p in models[0].parameters()] + [
                v for p in models[0].parameters() for v in _states(opts[0], p).values()]
            untouched = all(_bitwise(x_, y_) for x_, y_ in zip(before, after))
    ok, worst, same, total = _compare(opts[0], list(models[0].parameters()), opts[1], list(models[1].parameters()),
                                      torch.float32)
    report.record(f"{backend} GradScaler, inf injected", bool(untouched) and ok,
                  f"skipped step left everything untouched: {untouched}; vs CPU kernel {same}/{total} bitwise, "
                  f"worst {worst:.3g} ulp")


def check_clipping(report: Report, device: str, backend: str, steps: int = 5) -> None:
    """max_grad_norm folded into the step, fp32 and fp64 (whose norm stays fp64), against the CPU kernel."""
    import fusedwd

    for dtype in (torch.float32, torch.float64):
        values = _random(SHAPES, dtype, seed=6)
        a, b = _params(values, device), _params(values, "cpu")
        kw = dict(HYPER, max_grad_norm=0.5)
        opt_a = fusedwd.AdamW(a, backend=backend, **kw)
        opt_b = fusedwd.AdamW(b, backend="cpu" if fusedwd._ext.has_cpu() else "reference", **kw)
        _run_steps([(opt_a, a), (opt_b, b)], SHAPES, dtype, steps, [device, "cpu"])
        # the clip coefficient is an fp32 number: fp32 ulps bound its effect in either dtype
        ok, worst, same, total = _compare(opt_a, a, opt_b, b, torch.float32)
        norms = (float(opt_a.last_grad_norm), float(opt_b.last_grad_norm))
        report.record(f"{backend} max_grad_norm {str(dtype)[6:]}", ok,
                      f"norm {norms[0]:.6g} vs {norms[1]:.6g}; {same}/{total} bitwise, worst {worst:.3g} ulp")


def correctness(report: Report, device: str, backends: list[str]) -> None:
    for backend in backends:
        for check in (check_layouts, check_misaligned, check_groups, check_grad_scaler, check_clipping):
            report.run(f"{backend} {check.__name__}", check, device, backend)


# ---------------------------------------------------------------------- GPU only
def _options() -> dict[str, dict[str, Any]]:
    return {
        "plain": {},
        "capturable": dict(capturable=True),
        "device lr": {},  # a GPU tensor lr without capturable: never read on the host either
        "amp": {},  # grad_scale and found_inf set as GradScaler sets them
        "clipping": dict(max_grad_norm=1.0),
        "int8": dict(state_dtype="int8", min_8bit_numel=256),
        "master": dict(master_weights=True),
        "flat_grads": dict(flat_grads=True),
    }


def check_no_sync(report: Report, backend: str) -> None:
    """A steady-state step makes no host-device sync, for each option (sync debug mode "error")."""
    import fusedwd

    for name, options in _options().items():
        dtype = torch.bfloat16 if name == "master" else torch.float32
        values = _random(SHAPES, dtype, seed=7)
        params = _params(values, "cuda")
        lr = torch.tensor(1e-3, device="cuda") if name in ("capturable", "device lr") else 1e-3
        opt = fusedwd.AdamW(params, backend=backend, **dict(HYPER, lr=lr), **options)
        error = None
        for t in range(4):
            for p, g in zip(params, _grads(SHAPES, dtype, t, "cuda")):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
            if name == "amp":
                opt.grad_scale = torch.full((), 2.0**10, device="cuda")
                opt.found_inf = torch.zeros((), device="cuda")
            if isinstance(lr, torch.Tensor):
                opt.param_groups[0]["lr"].fill_(1e-3 / (1 + t))
            else:
                opt.param_groups[0]["lr"] = 1e-3 / (1 + t)  # a scheduler: a new table upload each step
            if t < 2:
                opt.step()  # builds the plan, compiles, uploads: allowed to wait
                continue
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            except RuntimeError as exc:
                error = str(exc).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        report.record(f"{backend} no host sync: {name}", error is None, error or "steady-state steps never synchronize")


def check_graph(report: Report, backend: str, replays: int = 8) -> None:
    """opt.step() captured once, replayed with a changing device lr and new gradients written into the
    same buffers, with same-sized pinned allocations between replays: bitwise equal to eager steps."""
    import fusedwd

    for name, options in (("fp32", {}), ("bf16+master", dict(master_weights=True)),
                          ("clipping", dict(max_grad_norm=1.0)), ("int8", dict(state_dtype="int8",
                                                                                min_8bit_numel=256))):
        dtype = torch.bfloat16 if options.get("master_weights") else torch.float32
        values = _random(SHAPES, dtype, seed=8)
        a, b = _params(values, "cuda"), _params(values, "cuda")
        lr = torch.tensor(2e-3, dtype=torch.float64, device="cuda")  # fill_ keeps the eager step's double
        graph_opt = fusedwd.AdamW(a, backend=backend, capturable=True, flat_grads=True, **dict(HYPER, lr=lr), **options)
        eager_opt = fusedwd.AdamW(b, backend=backend, **HYPER, **options)
        pinned = []
        for t in range(2):  # eager steps: plan, states, compiled kernels, tables on the device
            for pa, pb, g in zip(a, b, _grads(SHAPES, dtype, t, "cuda")):
                pa.grad.copy_(g) if pa.grad is not None else setattr(pa, "grad", g.clone())
                pb.grad = g.clone()
            graph_opt.step()
            eager_opt.step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph):
                graph_opt.step()
        torch.cuda.current_stream().wait_stream(side)
        worst = None
        for t in range(2, 2 + replays):
            rate = 2e-3 / (1 + t)
            lr.fill_(rate)
            eager_opt.param_groups[0]["lr"] = rate
            for pa, pb, g in zip(a, b, _grads(SHAPES, dtype, t, "cuda")):
                pa.grad.copy_(g)
                pb.grad = g.clone()
            # recycle whatever pinned blocks a captured copy could have read
            pinned = [torch.empty(n, dtype=torch.int64, pin_memory=True).fill_(-1)
                      for n in (64, 1024, 16384, 262144)]
            graph.replay()
            eager_opt.step()
            torch.cuda.synchronize()
            for pa, pb in zip(a, b):
                pairs = [(pa, pb)] + list(zip(_states(graph_opt, pa).values(), _states(eager_opt, pb).values()))
                if not all(_bitwise(x, y) for x, y in pairs):
                    worst = worst or f"replay {t - 1}: differs from the eager step"
        del pinned
        report.record(f"{backend} CUDA graph {name}", worst is None,
                      worst or f"{replays} replays with a new lr each, bitwise equal to eager steps")


def check_compiled(report: Report, backend: str, steps: int = 6) -> None:
    """torch.compile(opt.step, mode="reduce-overhead") with a tensor lr changed every step: bitwise equal to eager."""
    import fusedwd

    if backend != "cuda":
        report.record(f"{backend} torch.compile reduce-overhead", True, "skipped: the compiled step runs the custom "
                      "ops, which are backend 'cuda' (or 'cpu')")
        return
    values = _random(SHAPES, torch.float32, seed=9)
    a, b = _params(values, "cuda"), _params(values, "cuda")
    lr_a, lr_b = torch.tensor(2e-3, device="cuda"), torch.tensor(2e-3, device="cuda")
    opt_a = fusedwd.AdamW(a, backend=backend, capturable=True, **dict(HYPER, lr=lr_a))
    opt_b = fusedwd.AdamW(b, backend=backend, capturable=True, **dict(HYPER, lr=lr_b))
    step = torch.compile(opt_a.step, mode="reduce-overhead")
    differs = None
    for t in range(steps):
        for pa, pb, g in zip(a, b, _grads(SHAPES, torch.float32, t, "cuda")):
            pa.grad, pb.grad = g.clone(), g.clone()
        step()
        opt_b.step()
        for lr in (lr_a, lr_b):
            lr.fill_(2e-3 / (2 + t))
        torch.cuda.synchronize()
        if not all(_bitwise(x, y) for x, y in zip(a, b)):
            differs = differs or f"step {t}: differs from the eager step"
    report.record(f"{backend} torch.compile reduce-overhead", differs is None,
                  differs or f"{steps} steps with a changing tensor lr, bitwise equal to eager")


def check_huge(report: Report, backend: str) -> None:
    """One bf16 tensor of 2^31 + 4,097 elements: every element updated once (and its step count once)."""
    import fusedwd

    n = 2**31 + 4097
    free, _ = torch.cuda.mem_get_info()
    need = n * 2 * 4 + n  # p, g, m, v in bf16, and a bool for the check
    if free < need * 1.2:
        report.record(f"{backend} tensor over 2^31 elements", False, f"skipped: {need / 2**30:.1f} GiB needed, "
                      f"{free / 2**30:.1f} free")
        return
    p = torch.nn.Parameter(torch.full((n,), 1.0, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.full((n,), 0.5, dtype=torch.bfloat16, device="cuda")
    opt = fusedwd.AdamW([p], backend=backend, lr=1e-2, weight_decay=0.1)
    opt.step()
    # the same step on one element, by the reference
    q = torch.nn.Parameter(torch.full((1,), 1.0, dtype=torch.bfloat16))
    q.grad = torch.full((1,), 0.5, dtype=torch.bfloat16)
    fusedwd.AdamW([q], backend="reference", lr=1e-2, weight_decay=0.1).step()
    expected = q.detach().cuda()
    wrong = int((p.detach() != expected).sum())
    last = float(p.detach()[-1])
    steps = float(opt.state[p]["step"])
    del p, opt
    torch.cuda.empty_cache()
    report.record(f"{backend} tensor over 2^31 elements", wrong == 0 and steps == 1.0,
                  f"{n} elements, {wrong} not updated as the reference (last {last}), step {steps}")


# ---------------------------------------------------------------------- timing
def _launches(fn: Callable[[], None]) -> int:
    """Device kernels and copies one call launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _time(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call, interleaved, by CUDA events."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    for r in range(repeats):
        names = list(fns)
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def _bytes_per_param(layout: str) -> float:
    """Bytes an AdamW step reads and writes per parameter (docs/backends.md, REFERENCES)."""
    return {"fp32": 28.0, "bf16+master": 28.0, "int8+master": 16.0 + 2 * 2 * 4 / 256}[layout]


def timing(report: Report, backends: list[str], repeats: int = 20) -> None:
    """GPT-2 small and 10,000 x 1,000: fusedwd against torch fused / foreach and a device copy floor."""
    import fusedwd
    from bench import cases

    results = {}
    for case in (cases.gpt2_small(), cases.synthetic()):
        for layout in ("fp32", "bf16+master", "int8+master"):
            if report.left() < 30:
                report.record(f"timing {case.name} {layout}", False, "skipped: out of time")
                continue
            dtype, options = (torch.float32, {}) if layout == "fp32" else LAYOUTS[layout]
            shapes = case.shapes
            gen = torch.Generator(device="cuda").manual_seed(0)
            base = [torch.randn(s, device="cuda", generator=gen).mul_(0.02).to(dtype) for s in shapes]
            grads = [torch.randn(s, device="cuda", generator=gen).mul_(1e-3).to(dtype) for s in shapes]
            fns: dict[str, Callable[[], None]] = {}
            keep = []
            for backend in backends:
                params = [torch.nn.Parameter(x.clone()) for x in base]
                for p, g in zip(params, grads):
                    p.grad = g
                opt = fusedwd.AdamW(params, backend=backend, **HYPER, **options)
                fns[f"fusedwd-{backend}"] = opt.step
                keep.append(params)
            for variant, kw in (("torch-fused", dict(fused=True)), ("torch-foreach", dict(foreach=True))):
                if layout != "fp32" and variant == "torch-foreach":
                    continue
                # torch's reference point is always its fp32 step (it has neither masters nor 8-bit states)
                params = [torch.nn.Parameter(x.clone().float()) for x in base]
                for p, g in zip(params, grads):
                    p.grad = g.float()
                fns[variant] = torch.optim.AdamW(params, **HYPER, **kw).step
                keep.append(params)
            moved = int(_bytes_per_param(layout) * case.num_params)
            src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            # reads and writes moved/2 bytes each: the same bytes
            fns["floor"] = lambda dst=dst, src=src: dst.copy_(src)
            seconds = _time(fns, repeats)
            launches = {name: _launches(fn) for name, fn in fns.items()}
            for name, s in seconds.items():
                row = dict(case=case.name, layout=layout, provider=name, ms=s * 1e3, gb_s=moved / s / 1e9,
                           pct_of_floor=100 * seconds["floor"] / s, launches=launches[name],
                           speedup_vs_torch_fused=seconds.get("torch-fused", math.nan) / s)
                report.timing.append(row)
                print(f"    {case.name:9} {layout:12} {name:15} {row['ms']:8.3f} ms  {row['gb_s']:7.0f} GB/s  "
                      f"{row['pct_of_floor']:5.1f}% of floor  {row['launches']:5} launches  "
                      f"{row['speedup_vs_torch_fused']:5.2f}x torch fused", flush=True)
            results[(case.name, layout)] = seconds
            del keep, fns, src, dst
            torch.cuda.empty_cache()
    targets(report, results, backends)


def targets(report: Report, results: dict, backends: list[str]) -> None:
    """The issue's targets, PASS or MISS, for each backend."""
    def add(name, ok, detail):
        report.targets.append(dict(target=name, result="PASS" if ok else "MISS", detail=detail))
        print(f"{'PASS' if ok else 'MISS'} {name}: {detail}", flush=True)

    for backend in backends:
        key = f"fusedwd-{backend}"
        r = results.get(("gpt2", "fp32"))
        if r and key in r:
            add(f"{backend} GPT-2 fp32 within 10% of the copy floor", r[key] <= 1.1 * r["floor"],
                f"{r[key] * 1e3:.3f} ms vs floor {r['floor'] * 1e3:.3f} ms")
            add(f"{backend} GPT-2 fp32 >= 1.0x torch fused", r[key] <= r["torch-fused"],
                f"{r['torch-fused'] / r[key]:.2f}x")
        r = results.get(("synthetic", "fp32"))
        if r and key in r:
            add(f"{backend} 10,000 x 1,000 >= 3x torch fused", 3 * r[key] <= r["torch-fused"],
                f"{r['torch-fused'] / r[key]:.2f}x")
        r = results.get(("gpt2", "bf16+master"))
        if r and key in r:
            add(f"{backend} GPT-2 bf16 + master within 10% of its byte floor", r[key] <= 1.1 * r["floor"],
                f"{r[key] * 1e3:.3f} ms vs floor {r['floor'] * 1e3:.3f} ms")
        r = results.get(("gpt2", "int8+master"))
        if r and key in r:
            add(f"{backend} GPT-2 int8 + master >= 1.4x torch fused fp32", 1.4 * r[key] <= r["torch-fused"],
                f"{r['torch-fused'] / r[key]:.2f}x")


def timing_two_phase(report: Report, backends: list[str], repeats: int = 20) -> None:
    """LAMB and StableAdamW (fp32) on GPT-2 small and the deep MLP: each backend's fused step against
    its AdamW step, the pure-torch rule and a device copy of the rule's bytes (issue 16)."""
    import fusedwd
    from bench import cases, providers

    results = {}
    for case in (cases.gpt2_small(), cases.deep_mlp()):
        for rule in providers.TWO_PHASE_RULES:
            if report.left() < 30:
                report.record(f"timing {case.name} {rule}", False, "skipped: out of time")
                continue
            hyper = providers.TWO_PHASE_HYPERPARAMETERS[rule]
            gen = torch.Generator(device="cuda").manual_seed(0)
            base = [torch.randn(s, device="cuda", generator=gen).mul_(0.02) for s in case.shapes]
            grads = [torch.randn(s, device="cuda", generator=gen).mul_(1e-3) for s in case.shapes]
            fns: dict[str, Callable[[], None]] = {}
            keep = []

            def params(base=base, grads=grads, keep=keep):
                ps = [torch.nn.Parameter(x.clone()) for x in base]
                for p, g in zip(ps, grads):
                    p.grad = g
                keep.append(ps)
                return ps

            for backend in backends:
                try:
                    opt = getattr(fusedwd, rule)(params(), backend=backend, **hyper)
                    opt.step()  # the plan, where a backend without the rule's kernel says so
                    fns[f"fusedwd-{backend}"] = opt.step
                except RuntimeError as e:  # no kernel for the rule on this backend (yet)
                    report.record(f"timing {case.name} {rule} fusedwd-{backend}", True, f"not timed: {e}")
                fns[f"adamw-fusedwd-{backend}"] = fusedwd.AdamW(params(), backend=backend, **hyper).step
            fns["torch-foreach"] = providers.FOREACH_RULES[rule](params(), **hyper).step
            moved = providers.two_phase_bytes_per_param(rule, torch.float32) * case.num_params
            src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            fns["floor"] = lambda dst=dst, src=src: dst.copy_(src)  # reads and writes moved/2 bytes each
            seconds = _time(fns, repeats)
            launches = {name: _launches(fn) for name, fn in fns.items()}
            for name, s in seconds.items():
                row = dict(case=case.name, layout=f"{rule} fp32", provider=name, ms=s * 1e3, gb_s=moved / s / 1e9,
                           pct_of_floor=100 * seconds["floor"] / s, launches=launches[name],
                           speedup_vs_torch_foreach=seconds["torch-foreach"] / s)
                report.timing.append(row)
                print(f"    {case.name:5} {rule:12} {name:22} {row['ms']:8.3f} ms  {row['gb_s']:7.0f} GB/s  "
                      f"{row['pct_of_floor']:5.1f}% of floor  {row['launches']:5} launches  "
                      f"{row['speedup_vs_torch_foreach']:5.2f}x pure torch", flush=True)
            results[(case.name, rule)] = seconds
            del keep, fns, src, dst, params
            torch.cuda.empty_cache()
    two_phase_targets(report, results, backends)


# issue 16: (at most x AdamW's step, at most over the floor, at least x pure torch) per case and rule
TWO_PHASE_TARGETS = {("gpt2", "LAMB"): (1.5, 0.15, 3.0), ("mlp", "LAMB"): (1.5, 0.15, 5.0),
                     ("gpt2", "StableAdamW"): (1.4, 0.15, 3.0), ("mlp", "StableAdamW"): (1.4, 0.15, 5.0)}


def two_phase_targets(report: Report, results: dict, backends: list[str]) -> None:
    """Issue 16's targets for LAMB and StableAdamW, PASS or MISS, for each backend that stepped them."""
    def add(name, ok, detail):
        report.targets.append(dict(target=name, result="PASS" if ok else "MISS", detail=detail))
        print(f"{'PASS' if ok else 'MISS'} {name}: {detail}", flush=True)

    for (case, rule), (vs_adamw, over_floor, vs_torch) in TWO_PHASE_TARGETS.items():
        r = results.get((case, rule))
        title = {"gpt2": "GPT-2", "mlp": "deep MLP"}[case]
        for backend in backends:
            key, adamw = f"fusedwd-{backend}", f"adamw-fusedwd-{backend}"
            if not r or key not in r:
                continue
            add(f"{backend} {title} {rule} <= {vs_adamw:g}x the AdamW step", r[key] <= vs_adamw * r[adamw],
                f"{r[key] / r[adamw]:.2f}x")
            add(f"{backend} {title} {rule} within {over_floor:.0%} of its byte floor",
                r[key] <= (1 + over_floor) * r["floor"], f"{r[key] * 1e3:.3f} ms vs floor {r['floor'] * 1e3:.3f} ms")
            add(f"{backend} {title} {rule} >= {vs_torch:g}x pure torch", vs_torch * r[key] <= r["torch-foreach"],
                f"{r['torch-foreach'] / r[key]:.2f}x")


# ---------------------------------------------------------------------- driver
def no_gpu_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return None


def build_for_this_gpu() -> tuple[str, float]:
    """Rebuild fusedwd in place with _C_cuda for the present GPU only; (arch, seconds)."""
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    env = dict(os.environ, FUSEDWD_CUDA="1", FUSEDWD_CUDA_ARCHS=arch)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "-e",
                    str(ROOT)], env=env, check=True, cwd=ROOT)
    return arch, time.perf_counter() - t0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--no-build", action="store_true", help="skip the rebuild for this GPU")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="the JSON report")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: only the correctness checks, on the CPU backend (what the tests run)")
    ap.add_argument("--repeats", type=int, default=20, help="timed steps per provider")
    ap.add_argument("--skip", default="",
                    help="comma list of parts to skip: correctness,sync,graphs,huge,timing,two-phase")
    ap.add_argument("--build-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    start = time.perf_counter() - args.build_seconds
    if args.device == "cuda":
        reason = no_gpu_reason()
        if reason is not None:
            print(f"gpu-check: nothing to check, {reason} (run it on a machine with a GPU)")
            return 0
        if not args.no_build:
            arch, seconds = build_for_this_gpu()
            print(f"built fusedwd._C_cuda for sm_{arch} in {seconds:.0f} s", flush=True)
            # a fresh process imports the new module
            return subprocess.run([sys.executable, "-m", "bench.gpu_check", "--no-build", "--build-seconds",
                                   str(seconds), *(argv if argv is not None else sys.argv[1:])], cwd=ROOT).returncode
    import fusedwd

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    report = Report(deadline=start + TIME_LIMIT_S)
    if args.device == "cpu":
        backends = ["cpu"]
    else:
        backends = [b for b in fusedwd.available_backends("cuda") if b in ("cuda", "triton")]
        name = torch.cuda.get_device_name()
        print(f"gpu-check on {name} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), torch "
              f"{torch.__version__}, backends {backends}", flush=True)
        if "cuda" not in backends:
            report.record("backend cuda available", False, f"fusedwd.available_backends('cuda') = "
                          f"{fusedwd.available_backends('cuda')}")
    if "correctness" not in skip:
        correctness(report, args.device, backends)
    if args.device == "cuda":
        for backend in backends:
            if "sync" not in skip:
                report.run(f"{backend} check_no_sync", check_no_sync, backend)
            if "graphs" not in skip:
                report.run(f"{backend} check_graph", check_graph, backend)
                report.run(f"{backend} check_compiled", check_compiled, backend)
            if "huge" not in skip:
                report.run(f"{backend} check_huge", check_huge, backend)
        if "timing" not in skip:
            report.run("timing", timing, backends, args.repeats)
        if "two-phase" not in skip:
            report.run("timing two-phase rules", timing_two_phase, backends, args.repeats)
    seconds = time.perf_counter() - start
    summary = f"{len(report.checks) - report.bad} OK, {report.bad} BAD, " \
              f"{sum(t['result'] == 'MISS' for t in report.targets)} targets missed, {seconds:.0f} s"
    print(("gpu-check OK: " if not report.bad else "gpu-check BAD: ") + summary, flush=True)
    out = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), seconds=round(seconds, 1),
        device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, python=platform.python_version(), backends=backends,
        checks=report.checks, timing=report.timing, targets=report.targets,
    )
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"report: {args.out}")
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
