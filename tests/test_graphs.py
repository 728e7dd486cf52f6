"""CUDA-graph readiness without a GPU (fusedwd/optim/_graphs.py, docs/design.md#cuda-graphs).

The tables a GPU launch reads stay on the device and are uploaded only when
they change; under capture a change is a RuntimeError before anything runs.
On a machine without a GPU the Triton kernels run in Triton's interpreter on
CPU tensors (tests/test_triton.py's fixture), and a capture is simulated by
patching ``torch.cuda.is_current_stream_capturing``: the guard and the
resident tables are the same code either way.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedwd

from _helpers import assert_close, make_params, random_grads

# (skips without Triton; its fixture defines the kernels in the interpreter on a CPU machine, before
# anything imports triton: TRITON_INTERPRET is read then)
from test_triton import DEVICE, triton_kernels  # noqa: F401

RULES = [
    (fusedwd.AdamW, dict(lr=2e-2, betas=(0.8, 0.95), weight_decay=0.1), ["step", "exp_avg", "exp_avg_sq"]),
    (fusedwd.SGDW, dict(lr=1e-2, momentum=0.9, weight_decay=0.1), ["momentum_buffer"]),
    (fusedwd.RMSpropW, dict(lr=1e-3, centered=True, weight_decay=0.1), ["step", "square_avg", "grad_avg"]),
    # the two-phase rules: two launches over the same resident tables, their sums on the device
    (fusedwd.LAMB, dict(lr=2e-2, betas=(0.8, 0.95), weight_decay=0.1), ["step", "exp_avg", "exp_avg_sq"]),
    (fusedwd.StableAdamW, dict(lr=2e-2, betas=(0.8, 0.95), weight_decay=0.1), ["step", "exp_avg", "exp_avg_sq"]),
]
RULE_IDS = [cls.__name__ for cls, _, _ in RULES]
SHAPES = [(1,), (5, 7), (1030,), (0,)]


@pytest.fixture
def capture(monkeypatch):
    """Pretend the current CUDA stream is capturing a graph while the flag is set."""
    flag = {"on": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: flag["on"])
    return flag


def _params(dtype=torch.float32):
    return [torch.nn.Parameter(p.detach().to(DEVICE, copy=True)) for p in make_params(SHAPES, dtype)]


def _grads_in_place(params, t):
    """This step's gradients written into the tensors already there (their addresses stay)."""
    for p, g in zip(params, random_grads(params, t)):
        if p.grad is None:
            p.grad = g.to(DEVICE)
        else:
            p.grad.copy_(g)


def _snapshot(opt, params, states):
    return [p.detach().clone() for p in params] + [opt.state[p][n].clone() for p in params if p in opt.state
                                                   for n in states]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _uploads(opt):
    """Uploads so far: of each bucket's segment table, and of each device's hyperparameter table."""
    return ([b.tables.device_table.uploads for b in opt._current_plan()],
            [t.table.uploads for t in opt._hyper_tables.values()])


@pytest.mark.parametrize("cls, kw, states", RULES, ids=RULE_IDS)
def test_tables_are_uploaded_only_when_they_change(cls, kw, states, triton_kernels):
    params = _params()
    opt = cls(params, backend="triton", **kw)
    _grads_in_place(params, 0)
    opt.step()
    assert _uploads(opt) == ([1], [1])
    for t in range(1, 4):  # same gradient tensors, same lr: nothing to upload
        _grads_in_place(params, t)
        opt.step()
    assert _uploads(opt) == ([1], [1])
    opt.param_groups[0]["lr"] *= 0.5  # a scheduler's change: the hyperparameter table only
    opt.step()
    assert _uploads(opt) == ([1], [2])
    params[1].grad = params[1].grad.clone()  # a new gradient tensor: the segment table only
    opt.step()
    assert _uploads(opt) == ([2], [2])
    params[2].grad = None  # one segment fewer
    opt.step()
    assert _uploads(opt) == ([3], [2])
    bucket = opt._current_plan()[0]
    # after the image: one arrival counter per parameter (then a two-phase rule's float64 scratch)
    sums = len(cls.RULE.sums)
    room = triton_kernels.program_capacity(bucket.numels)
    head = triton_kernels.image_words(len(params), room)
    arrivals = bucket.tables.device_table.buffer[head: head + len(params)]
    assert arrivals.numel() == len(params) and not arrivals.any(), "the kernels leave every arrival counter at zero"
    assert bucket.tables.device_table.buffer.numel() == triton_kernels.buffer_words(len(params), room, sums)


@pytest.mark.parametrize("cls, kw, states", RULES, ids=RULE_IDS)
def test_resident_tables_match_the_reference(cls, kw, states):
    # gradients replaced, dropped and kept, lr changed: the uploads follow every change
    params = _params()
    twins = [torch.nn.Parameter(p.detach().cpu().clone()) for p in params]
    opt = cls(params, backend="triton", **kw)
    ref = cls(twins, backend="reference", **kw)
    for t in range(6):
        grads = random_grads(twins, t)
        for k, (p, q, g) in enumerate(zip(params, twins, grads)):
            skip = t == 3 and k == 1
            q.grad = None if skip else g.clone()
            if skip:
                p.grad = None
            elif t % 2 and p.grad is not None:
                p.grad.copy_(g)  # same address
            else:
                p.grad = g.to(DEVICE)  # a new one
        for o in (opt, ref):
            o.param_groups[0]["lr"] = kw["lr"] / (1 + t)
            o.step()
        for p, q in zip(params, twins):
            assert_close(p.detach().cpu(), q.detach(), f"step {t}")
            for name in states:
                if q in ref.state:
                    assert_close(opt.state[p][name].cpu(), ref.state[q][name], f"step {t} {name}")


def test_capture_requires_capturable(capture):
    params = _params()
    opt = fusedwd.AdamW(params, lr=torch.tensor(1e-2), backend="triton")
    _grads_in_place(params, 0)
    opt.step()
    _grads_in_place(params, 1)
    before, uploads = _snapshot(opt, params, RULES[0][2]), _uploads(opt)
    capture["on"] = True
    with pytest.raises(RuntimeError, match="captured in a CUDA graph.*capturable=False"):
        opt.step()
    assert _same(_snapshot(opt, params, RULES[0][2]), before) and _uploads(opt) == uploads


def test_capture_requires_a_built_plan(capture):
    params = _params()
    opt = fusedwd.AdamW(params, lr=torch.tensor(1e-2), backend="triton", capturable=True)
    _grads_in_place(params, 0)
    before = [p.detach().clone() for p in params]
    capture["on"] = True
    with pytest.raises(RuntimeError, match="not built yet"):
        opt.step()
    assert opt._plan is None and not opt.state and _same([p.detach() for p in params], before)


@pytest.mark.parametrize("change", ["new gradient", "gradient dropped", "param group edited"])
def test_capture_rejects_a_change_before_any_launch(capture, change):
    params = _params()
    opt = fusedwd.AdamW(params, lr=torch.tensor(1e-2), backend="triton", capturable=True, weight_decay=0.1)
    _grads_in_place(params, 0)
    opt.step()
    _grads_in_place(params, 1)
    if change == "new gradient":
        params[2].grad = params[2].grad.clone()
    elif change == "gradient dropped":
        params[0].grad = None
    else:
        opt.param_groups[0]["betas"] = (0.5, 0.9)
    before, uploads = _snapshot(opt, params, RULES[0][2]), _uploads(opt)
    capture["on"] = True
    with pytest.raises(RuntimeError, match="captured in a CUDA graph.*changed"):
        opt.step()
    assert _same(_snapshot(opt, params, RULES[0][2]), before), "a rejected capture wrote something"
    assert _uploads(opt) == uploads, "a rejected capture uploaded a table"
    capture["on"] = False
    opt.step()  # eager again: the change is uploaded and the step taken
    assert _uploads(opt) != uploads


def test_capture_rejects_buckets_that_do_not_run_on_the_device(capture):
    params = _params()
    opt = fusedwd.AdamW([{"params": params[:2]}, {"params": params[2:], "backend": "reference"}],
                        lr=torch.tensor(1e-2), backend="triton", capturable=True)
    _grads_in_place(params, 0)
    opt.step()
    capture["on"] = True
    with pytest.raises(RuntimeError, match="'reference' backend"):
        opt.step()


@pytest.mark.parametrize("cls, kw, states", RULES, ids=RULE_IDS)
def test_captured_step_reads_only_resident_tables(capture, cls, kw, states):
    # what a replayed graph does: launch over the tables already on the device, with lr
    # changed in place; equal to the eager step bit for bit, nothing uploaded
    kw = dict(kw, lr=torch.tensor(kw["lr"], device=DEVICE))
    params, twins = _params(), _params()
    opt = cls(params, backend="triton", capturable=True, **kw)
    eager = cls(twins, backend="triton", capturable=True, **dict(kw, lr=kw["lr"].clone()))
    for t in range(5):
        _grads_in_place(params, t)
        _grads_in_place(twins, t)
        for o in (opt, eager):
            o.param_groups[0]["lr"].fill_(1e-2 / (1 + t))
        capture["on"] = t > 0
        uploads = _uploads(opt)
        opt.step()
        capture["on"] = False
        eager.step()
        if t:
            assert _uploads(opt) == uploads, f"step {t}: a captured step uploaded a table"
        for p, q in zip(params, twins):
            assert torch.equal(p, q), f"step {t}"
            for name in states:
                assert torch.equal(opt.state[p][name], eager.state[q][name]), (t, name)


class _Ops(TorchDispatchMode):
    """Counts the aten operations a step runs that compute something (views and aliases launch nothing)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_capturable_hyper_table_costs_the_same_for_any_number_of_groups(backend):
    # built once and updated in place: the device operations of a step do not grow with the groups
    if backend == "cpu" and not fusedwd._ext.has_cpu():
        pytest.skip("fusedwd._C is not built")
    counts = {}
    for groups in (2, 40):
        params = [torch.nn.Parameter(torch.randn(8, device=DEVICE)) for _ in range(groups)]
        lr = torch.tensor(1e-2, device=DEVICE)
        decays = ("decoupled", "independent", "l2")
        opt = fusedwd.AdamW([{"params": [p], "weight_decay": 0.01 * k, "decay": decays[k % 3]}
                             for k, p in enumerate(params)], lr=lr, backend=backend, capturable=True)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        with _Ops() as ops:
            opt.step()
        counts[groups] = ops.count
    assert counts[2] == counts[40], counts


def test_capturable_table_equals_the_host_table():
    # 9 groups: every decay mode, lr_max 0 ("independent" from lr=0), a float lr beside tensor ones
    def build(capturable):
        params = [torch.nn.Parameter(torch.randn(8, device=DEVICE)) for _ in range(9)]
        groups = []
        for k, p in enumerate(params):
            lr = torch.tensor(0.0 if k == 4 else 1e-2 * (k + 1), device=DEVICE) if k != 8 else 3e-3
            groups.append({"params": [p], "lr": lr, "weight_decay": 0.05 * (k + 1),
                           "decay": ("decoupled", "independent", "l2")[k % 3]})
        opt = fusedwd.AdamW(groups, backend="triton", capturable=capturable)
        for p in params:
            p.grad = torch.ones_like(p)
        return opt

    host, device = build(False), build(True)
    for t in range(3):
        for opt in (host, device):
            opt.step()
            for k, g in enumerate(opt.param_groups[:8]):
                g["lr"].fill_(1e-3 * (t + k + 1))
        tables = [o._hyper_tables[torch.device(DEVICE)].rows for o in (host, device)]
        assert torch.equal(tables[0].view(torch.int64), tables[1].view(torch.int64)), t


@pytest.mark.parametrize("options", [{}, dict(master_weights=True)], ids=["fp64", "master"])
def test_max_grad_norm_with_fp64_and_mixed_dtypes(options):
    # fp64 gradients keep their norm in fp64 (torch._foreach_norm refuses to narrow them)
    dtypes = [torch.float64] if not options else [torch.bfloat16, torch.float32, torch.float64]
    shapes = [(5, 7), (1030,), (3,)]
    base = [make_params([s], dtypes[k % len(dtypes)], seed=k)[0] for k, s in enumerate(shapes)]
    a = [torch.nn.Parameter(p.detach().to(DEVICE, copy=True)) for p in base]
    b = [torch.nn.Parameter(p.detach().clone()) for p in base]
    cpu = "cpu" if fusedwd._ext.has_cpu() else "reference"
    opt_a = fusedwd.AdamW(a, lr=1e-2, backend="triton", max_grad_norm=0.5, **options)
    opt_b = fusedwd.AdamW(b, lr=1e-2, backend=cpu, max_grad_norm=0.5, **options)
    for t in range(4):
        for pa, pb, g in zip(a, b, random_grads(b, t, scale=3.0)):
            pa.grad, pb.grad = g.to(DEVICE), g.clone()
        opt_a.step()
        opt_b.step()
        assert_close(opt_a.last_grad_norm.cpu(), opt_b.last_grad_norm, f"step {t} norm", dtype=torch.float32)
        for pa, pb in zip(a, b):
            # the clip coefficient is an fp32 number, formed from fp32 norms of the 16-bit and fp32
            # gradients here and from one double sum on the CPU backend: the updates agree to its ulps
            assert_close(pa.detach().cpu(), pb.detach(), f"step {t}", dtype=torch.float32 if options else None)


# ------------------------------------------------------------------ the custom ops
@pytest.mark.parametrize("rule", ["adamw", "sgdw", "rmspropw"])
def test_ops_are_kept_out_of_compiled_cuda_graphs(rule):
    # each call builds its table on the host: torch.compile's CUDA graphs must leave it out
    import fusedwd.ops  # noqa: F401  (registers the ops)

    op = getattr(torch.ops.fusedwd, f"{rule}_step_").default
    assert torch.Tag.cudagraph_unsafe in op.tags


def test_ops_refuse_a_capture_on_cuda(capture):
    from fusedwd import ops

    ops._refuse_capture("adamw", torch.device("cuda"))  # not capturing: nothing to refuse
    capture["on"] = True
    ops._refuse_capture("adamw", torch.device("cpu"))  # CPU work is never captured
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph.*capturable=True"):
        ops._refuse_capture("adamw", torch.device("cuda", 0))


def test_which_lr_tensors_are_never_read_on_the_host():
    from fusedwd._spec import device_lr

    gpu_like = torch.tensor(1e-3, device="meta")  # any device but the CPU: a read would wait for it
    assert device_lr({"lr": gpu_like}) and device_lr({"lr": gpu_like, "capturable": False})
    assert device_lr({"lr": torch.tensor(1e-3), "capturable": True})
    assert not device_lr({"lr": torch.tensor(1e-3)}) and not device_lr({"lr": 1e-3, "capturable": True})
