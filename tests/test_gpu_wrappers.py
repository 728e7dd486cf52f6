"""The optimizers' GPU backends against the reference and the CPU kernel, on a GPU (skipped without one).

Every precision layout (masters, 16-bit and 8-bit states, stochastic
rounding), GradScaler, clipping, the CUDA-graph capture and its guard, and no
host sync in a steady-state step. The same paths run on the CPU in
tests/test_graphs.py (Triton's interpreter, a simulated capture) and
bench/gpu_check.py runs them at scale (`make gpu-check`).
"""

import copy
import warnings

import pytest
import torch

import fusedwd
from fusedwd import _cuda_ext

from _helpers import AWKWARD_SHAPES, assert_close, compare_optimizers, make_params, random_grads
from _rules import INFOS, RICH_CONFIGS, TWO_PHASE, state_names

GPU_BACKENDS = [b for b in fusedwd.available_backends("cuda") if b != "reference"] if torch.cuda.is_available() else []
pytestmark = pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device, or no GPU backend built")
BACKENDS = GPU_BACKENDS or ["none"]
CPU = "cpu" if fusedwd._ext.has_cpu() else "reference"

CONFIGS = list(RICH_CONFIGS.values())  # every rule in its richest structure (tests/_rules.py)
# (parameter dtype, options): every kind of layout the kernels take (docs/design.md#precision)
LAYOUTS = {
    "bf16-master": (torch.bfloat16, dict(master_weights=True)),
    "f16-master-bf16": (torch.float16, dict(master_weights=True, state_dtype=torch.bfloat16)),
    "f32-bf16-states": (torch.float32, dict(state_dtype=torch.bfloat16)),
    "bf16-sr": (torch.bfloat16, dict(stochastic_rounding=True)),
    "int8": (torch.float32, dict(state_dtype="int8", min_8bit_numel=1024)),
    "int8-master": (torch.bfloat16, dict(state_dtype="int8", master_weights=True, min_8bit_numel=1024)),
    "int8-sr": (torch.bfloat16, dict(state_dtype="int8", stochastic_rounding=True, min_8bit_numel=1024)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("decay", ["decoupled", "independent", "l2"])
@pytest.mark.parametrize("cls, kw, states", CONFIGS, ids=lambda c: getattr(c, "__name__", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_backend_matches_reference(backend, cls, kw, states, decay, dtype):
    gen = torch.Generator().manual_seed(0)
    host = [torch.randn(s, generator=gen).to(dtype) for s in AWKWARD_SHAPES]
    a = [torch.nn.Parameter(t.cuda()) for t in host]
    b = [torch.nn.Parameter(t.cuda()) for t in host]
    opt_a = cls(a, decay=decay, backend=backend, **kw)
    opt_b = cls(b, decay=decay, backend="reference", **kw)
    compare_optimizers(opt_a, a, opt_b, b, states, 20, lambda t: [g.cuda() for g in random_grads(host, t)])
    assert {bk.backend for bk in opt_a._current_plan()} == {backend}


def _tensors(opt, p):
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cls, kw, states", CONFIGS, ids=lambda c: getattr(c, "__name__", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_layout_matches_the_cpu_kernel(backend, cls, kw, states, layout):
    """Step by step against the CPU kernel from the same bytes: parameters, masters and float states to
    the tolerance table; 8-bit codes equal or one level apart in a few elements (a state an ulp apart,
    the device's double pow, lands on the other side of a boundary); every step resynchronized."""
    dtype, options = LAYOUTS[layout]
    _steps_against_the_cpu_kernel(backend, cls, kw, dtype, options, [(4097,), (1024, 3), (5, 7), (1,)])


def _steps_against_the_cpu_kernel(backend, cls, kw, dtype, options, shapes):
    base = make_params(shapes, dtype)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in base]
    cpu = [torch.nn.Parameter(p.detach().clone()) for p in base]
    opts = [cls(gpu, backend=backend, **kw, **options), cls(cpu, backend=CPU, **kw, **options)]
    for opt in opts:
        for group in opt.param_groups:
            group["sr_seed"] = 11
    for t in range(6):
        for pg, pc, g in zip(gpu, cpu, random_grads(base, t)):
            pg.grad, pc.grad = g.cuda(), g.clone()
        for opt in opts:
            opt.step()
        for k, (pg, pc) in enumerate(zip(gpu, cpu)):
            # stochastic rounding draws the same bits; an ulp apart in fp32 may still round to the other neighbour
            scale = 2.0 * pc.detach().abs().max().item() if options.get("stochastic_rounding") else 1.0
            assert_close(pg.detach().cpu(), pc.detach(), f"step {t} param {k}", scale=scale)
            sg, sc = _tensors(opts[0], pg), _tensors(opts[1], pc)
            assert sg.keys() == sc.keys()
            for name in sg:
                if name.endswith("_codes"):
                    diff = (sg[name].cpu().int() - sc[name].int()).abs()
                    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (t, k, name)
                elif name == "step":
                    assert float(sg[name]) == float(sc[name])
                else:
                    assert_close(sg[name].cpu(), sc[name], f"step {t} param {k} {name}",
                                 scale=max(1.0, sc[name].abs().max().item()))
            with torch.no_grad():
                pc.copy_(pg.cpu())
                for name in sg:
                    sc[name].copy_(sg[name].cpu())
    assert {bk.backend for bk in opts[0]._current_plan()} == {backend}


# The two-phase rules (LAMB, StableAdamW: per-tensor sums between two launches), every non-8-bit kind
# of layout, tensors of several blocks (and of one element), against the CPU kernel step by step
TWO_PHASE_LAYOUTS = {"f32": (torch.float32, {}), **{k: v for k, v in LAYOUTS.items() if "int8" not in k}}


@pytest.mark.parametrize("layout", list(TWO_PHASE_LAYOUTS))
@pytest.mark.parametrize("name", TWO_PHASE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_phase_rules_match_the_cpu_kernel(backend, name, layout):
    dtype, options = TWO_PHASE_LAYOUTS[layout]
    info = INFOS[name]
    _steps_against_the_cpu_kernel(backend, info.cls, info.hyperparameters, dtype, options,
                                  [(70_001,), (4097,), (1024, 3), (5, 7), (1,)])


@pytest.mark.parametrize("decay", ["decoupled", "independent", "l2"])
@pytest.mark.parametrize("name", TWO_PHASE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_phase_rules_match_the_reference(backend, name, decay):
    info = INFOS[name]
    gen = torch.Generator().manual_seed(0)
    host = [torch.randn(s, generator=gen) for s in AWKWARD_SHAPES]
    a = [torch.nn.Parameter(t.cuda()) for t in host]
    b = [torch.nn.Parameter(t.cuda()) for t in host]
    opt_a = info.cls(a, decay=decay, backend=backend, **info.hyperparameters)
    opt_b = info.cls(b, decay=decay, backend="reference", **info.hyperparameters)
    compare_optimizers(opt_a, a, opt_b, b, state_names(name, ()), 10,
                       lambda t: [g.cuda() for g in random_grads(host, t)])
    assert {bk.backend for bk in opt_a._current_plan()} == {backend}


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_skips_and_unscales_like_the_cpu_kernel(backend):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.LayerNorm(33), torch.nn.Linear(33, 5))
    models = [copy.deepcopy(base).cuda(), copy.deepcopy(base)]
    opts = [fusedwd.AdamW(m.parameters(), lr=1e-2, backend=b) for m, b in zip(models, (backend, CPU))]
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**12), torch.amp.GradScaler("cpu", init_scale=2.0**12)]
    gen = torch.Generator().manual_seed(5)
    for t in range(8):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        for m, o, s, dev in zip(models, opts, scalers, ("cuda", "cpu")):
            o.zero_grad()
            s.scale(torch.nn.functional.cross_entropy(m(x.to(dev)), y.to(dev))).backward()
            if t in (2, 5):
                next(m.parameters()).grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in models[0].parameters()] + [
            v.clone() for p in models[0].parameters() for v in _tensors(opts[0], p).values()]
        for o, s in zip(opts, scalers):
            s.step(o)
            s.update()
        if t in (2, 5):
            after = [p.detach() for p in models[0].parameters()] + [
                v for p in models[0].parameters() for v in _tensors(opts[0], p).values()]
            assert all(torch.equal(x_, y_) for x_, y_ in zip(before, after)), f"step {t}: a skipped step wrote"
        for pg, pc in zip(models[0].parameters(), models[1].parameters()):
            assert_close(pg.detach().cpu(), pc.detach(), f"step {t}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_matches_the_cpu_kernel(backend, dtype):
    base = make_params([(4097,), (33, 17), (3,)], dtype)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in base]
    cpu = [torch.nn.Parameter(p.detach().clone()) for p in base]
    kw = dict(lr=1e-2, max_grad_norm=0.5)
    opt_g, opt_c = fusedwd.AdamW(gpu, backend=backend, **kw), fusedwd.AdamW(cpu, backend=CPU, **kw)
    for t in range(5):
        for pg, pc, g in zip(gpu, cpu, random_grads(base, t, scale=3.0)):
            pg.grad, pc.grad = g.cuda(), g.clone()
        opt_g.step()
        opt_c.step()
        assert_close(opt_g.last_grad_norm.cpu(), opt_c.last_grad_norm, f"step {t} norm", torch.float32)
        for pg, pc in zip(gpu, cpu):
            # the clip coefficient is fp32 whatever the dtype
            assert_close(pg.detach().cpu(), pc.detach(), f"step {t}", torch.float32 if dtype == torch.float64 else None)


GRAPH_OPTIONS = {"plain": {}, "master": dict(master_weights=True), "clipping": dict(max_grad_norm=1.0),
                 "int8": dict(state_dtype="int8", min_8bit_numel=1024)}


@pytest.mark.parametrize("option", list(GRAPH_OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_captured_step_replays_bitwise_like_eager(backend, option):
    """opt.step() captured once and replayed with a new device lr and new gradient values each time, with
    pinned allocations of the tables' sizes in between: bitwise the eager steps of a twin."""
    options = GRAPH_OPTIONS[option]
    dtype = torch.bfloat16 if option == "master" else torch.float32
    base = make_params([(4097,), (1024, 3), (5, 7), (1,)], dtype)
    a = [torch.nn.Parameter(p.detach().cuda()) for p in base]
    b = [torch.nn.Parameter(p.detach().cuda()) for p in base]
    lr = torch.tensor(2e-3, dtype=torch.float64, device="cuda")
    graphed = fusedwd.AdamW(a, lr=lr, backend=backend, capturable=True, flat_grads=True, **options)
    eager = fusedwd.AdamW(b, lr=2e-3, backend=backend, **options)
    for t in range(2):
        for pa, pb, g in zip(a, b, random_grads(base, t)):
            if pa.grad is None:
                pa.grad = g.cuda()
            else:
                pa.grad.copy_(g)
            pb.grad = g.cuda()
        graphed.step()
        eager.step()
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    for t in range(2, 8):
        rate = 2e-3 / t
        lr.fill_(rate)
        eager.param_groups[0]["lr"] = rate
        for pa, pb, g in zip(a, b, random_grads(base, t)):
            pa.grad.copy_(g)
            pb.grad = g.cuda()
        pinned = [torch.empty(n, dtype=torch.int64, pin_memory=True).fill_(-1) for n in (64, 512, 4096, 32768)]
        graph.replay()
        eager.step()
        torch.cuda.synchronize()
        del pinned
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb), f"replay {t}"
            for (name, x), (_, y) in zip(sorted(_tensors(graphed, pa).items()), sorted(_tensors(eager, pb).items())):
                assert torch.equal(x, y), f"replay {t}: {name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_guard_on_a_gpu(backend):
    p = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    p.grad = torch.randn_like(p)
    for opt, why in ((fusedwd.AdamW([p], backend=backend), "capturable=False"),
                     (fusedwd.AdamW([p], lr=torch.tensor(1e-3, device="cuda"), backend=backend, capturable=True),
                      "changed")):
        opt.step()
        p.grad = torch.randn_like(p)  # a new gradient tensor: the segment table changed
        before = p.detach().clone()
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match=why):
            with torch.cuda.graph(graph):
                opt.step()
        assert torch.equal(p.detach(), before)


SYNC_OPTIONS = {"plain": {}, "capturable": dict(capturable=True), "device lr": {}, "amp": {},
                "clipping": dict(max_grad_norm=1.0),
                "int8": dict(state_dtype="int8", min_8bit_numel=1024), "master": dict(master_weights=True),
                "flat_grads": dict(flat_grads=True)}


@pytest.mark.parametrize("option", list(SYNC_OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_steady_state_step_never_syncs(backend, option):
    options = SYNC_OPTIONS[option]
    dtype = torch.bfloat16 if option == "master" else torch.float32
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params([(4097,), (33, 17)], dtype)]
    lr = torch.tensor(1e-3, device="cuda") if option in ("capturable", "device lr") else 1e-3
    opt = fusedwd.AdamW(params, lr=lr, backend=backend, **options)
    for t in range(4):
        for p, g in zip(params, random_grads(params, t)):
            if p.grad is None:
                p.grad = g.cuda()
            else:
                p.grad.copy_(g)
        if option == "amp":
            opt.grad_scale, opt.found_inf = torch.full((), 1024.0, device="cuda"), torch.zeros((), device="cuda")
        if option in ("capturable", "device lr"):
            opt.param_groups[0]["lr"].fill_(1e-3 / (t + 1))
        else:
            opt.param_groups[0]["lr"] = 1e-3 / (t + 1)  # a new hyperparameter table every step
        if t < 2:
            opt.step()
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cpu_lr_is_moved_to_the_device_once(backend):
    p = torch.nn.Parameter(torch.randn(100, device="cuda"))
    p.grad = torch.randn_like(p)
    lr = torch.tensor(1e-3)
    opt = fusedwd.AdamW([p], lr=lr, backend=backend, capturable=True)
    import fusedwd.optim._graphs as graphs

    graphs._warned_moved_lr = False
    with pytest.warns(UserWarning, match="CPU lr tensor"):
        opt.step()
    assert opt.param_groups[0]["lr"].device.type == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.param_groups[0]["lr"].fill_(2e-3)
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hyperparameter_table_per_device(backend):
    ps = [torch.nn.Parameter(torch.randn(100, device=f"cuda:{k}")) for k in range(2)]
    qs = [torch.nn.Parameter(p.detach().cpu().clone()) for p in ps]
    lr = torch.tensor(1e-3, device="cuda:0")
    opt = fusedwd.AdamW(ps, lr=lr, backend=backend, capturable=True)
    ref = fusedwd.AdamW(qs, lr=1e-3, backend="reference")
    for _ in range(3):
        for p, q in zip(ps, qs):
            g = torch.randn(100)
            p.grad, q.grad = g.to(p.device), g
        opt.step()
        ref.step()
    assert set(opt._hyper_tables) == {torch.device("cuda", 0), torch.device("cuda", 1)}
    for p, q in zip(ps, qs):
        assert_close(p.detach().cpu(), q.detach(), "two devices")


def test_auto_takes_the_cuda_kernels_where_they_hold_code_for_this_gpu():
    p = torch.nn.Parameter(torch.randn(10, device="cuda"))
    p.grad = torch.randn_like(p)
    plan = fusedwd.AdamW([p])._current_plan()
    assert plan[0].backend == ("cuda" if _cuda_ext.unusable(p.device) is None else "triton")
