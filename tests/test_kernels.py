"""The compiled CPU kernel against fusedwd.reference.

Every rule, structural switch, decay mode and dtype, on every instruction set
this CPU runs; parameters and every state compared every step.
"""

import pytest
import torch

import fusedwd
from fusedwd import _ext

from _helpers import AWKWARD_SHAPES, clone_params, compare_optimizers, make_params, random_grads
from _rules import CONFIGS

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason="fusedwd._C is not built")

STEPS = 25
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DECAYS = ["decoupled", "independent", "l2"]

@pytest.fixture(params=_ext.cpu().supported_isas() if _ext.has_cpu() else ["none"])
def isa(request):
    C = _ext.cpu()
    before = C.isa()
    C.set_isa(request.param)
    yield request.param
    C.set_isa(before)


def _pair(name, dtype, decay, shapes=AWKWARD_SHAPES, groups=True):
    cls, kw, states = CONFIGS[name]
    a = make_params(shapes, dtype)
    b = clone_params(a)

    def grouped(params):
        if not groups:
            return params
        # a second group with its own numbers shares the bucket (one pass, per-segment rows)
        return [{"params": params[::2]}, {"params": params[1::2], "lr": kw["lr"] * 0.5, "weight_decay": 0.05}]

    opt_a = cls(grouped(a), decay=decay, backend="cpu", **kw)
    opt_b = cls(grouped(b), decay=decay, backend="reference", **kw)
    return opt_a, a, opt_b, b, states


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cpu_kernel_matches_reference(name, decay, dtype, isa):
    opt_a, a, opt_b, b, states = _pair(name, dtype, decay)
    assert {bk.backend for bk in opt_a._current_plan()} == {"cpu"}
    compare_optimizers(opt_a, a, opt_b, b, states, STEPS, lambda t: random_grads(a, t))


@pytest.mark.parametrize("name", ["adamw", "sgdw-has_momentum", "rmspropw-centered-has_momentum", "lion"])
def test_many_tensors_one_bucket(name):
    # 300 tensors of assorted sizes (0 included) in one pass, with per-segment rows
    sizes = [(n,) for n in ([0, 1, 2, 3, 63, 64, 65, 127, 129] * 30 + [1000] * 30)]
    opt_a, a, opt_b, b, states = _pair(name, torch.float32, "decoupled", sizes)
    assert len(opt_a._current_plan()) == 1
    compare_optimizers(opt_a, a, opt_b, b, states, 10, lambda t: random_grads(a, t))


def test_params_without_grad_are_skipped_and_untouched():
    opt_a, a, opt_b, b, states = _pair("adamw", torch.float32, "decoupled")
    frozen = {1, 3}

    def grads(t):
        gs = random_grads(a, t)
        # the same tensors go without a gradient every other step
        return [None if (k in frozen and t % 2) else g for k, g in enumerate(gs)]

    before = {k: a[k].detach().clone() for k in frozen}
    for t in range(6):
        gs = grads(t)
        for params in (a, b):
            for p, g in zip(params, gs):
                p.grad = None if g is None else g.clone()
        snap = {k: (a[k].detach().clone(), {n: v.clone() for n, v in opt_a.state[a[k]].items()}) for k in frozen}
        opt_a.step()
        opt_b.step()
        for k in frozen:
            if gs[k] is None:
                assert torch.equal(a[k].detach(), snap[k][0]), "a parameter without grad moved"
                for n, v in opt_a.state[a[k]].items():
                    assert torch.equal(v, snap[k][1][n]), f"state {n} of a parameter without grad changed"
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa.detach(), pb.detach(), rtol=0, atol=1e-5)
    assert not torch.equal(a[1].detach(), before[1])


def test_state_appears_on_first_step_like_torch():
    p, q = make_params([(5,), (7,)])
    opt = fusedwd.AdamW([p, q], backend="cpu")
    assert len(opt.state) == 0
    p.grad = torch.randn(5)
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} and float(opt.state[p]["step"]) == 1
    assert q not in opt.state or len(opt.state[q]) == 0


def test_empty_group_and_no_grads():
    p = make_params([(10,)])[0]
    opt = fusedwd.AdamW([{"params": []}, {"params": [p]}], backend="cpu")
    opt.step()  # nothing has a gradient: a no-op
    assert len(opt.state) == 0
    p.grad = torch.ones(10)
    opt.step()
    assert float(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_parameters(dtype):
    # a transposed weight and a strided slice: staged through contiguous copies
    base_a = torch.randn(64, 33).to(dtype)
    base_b = base_a.clone()
    pa = [torch.nn.Parameter(base_a.t()), torch.nn.Parameter(torch.randn(50).to(dtype))]
    pb = [torch.nn.Parameter(base_b.t()), torch.nn.Parameter(pa[1].detach().clone())]
    assert not pa[0].is_contiguous()
    opt_a = fusedwd.AdamW(pa, lr=1e-2, backend="cpu")
    opt_b = fusedwd.AdamW(pb, lr=1e-2, backend="reference")

    def grads(t):
        g = random_grads(pa, t)
        g[0] = g[0].t().contiguous().t()  # a non-contiguous gradient too, as for a transposed weight
        return g

    compare_optimizers(opt_a, pa, opt_b, pb, ["step", "exp_avg", "exp_avg_sq"], 8, grads, dtype)


def test_replaced_param_data_is_followed():
    p = make_params([(100,)])[0]
    q = torch.nn.Parameter(p.detach().clone())
    opt_a = fusedwd.AdamW([p], backend="cpu")
    opt_b = fusedwd.AdamW([q], backend="reference")
    for t in range(4):
        if t == 2:
            new = p.detach().clone()
            p.data = new  # same shape and dtype, new storage (as some wrappers do)
        g = torch.randn(100)
        p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        torch.testing.assert_close(p.detach(), q.detach())


# Where the replacement happens: the first tensor, one deep in the list (gather and
# check_views resume after a tensor they stop at), and the last.
REPLACED = (0, 611, 999)


def _replace(kind, p):
    if kind == "p.data":
        p.data = p.detach().clone()  # new storage, same values
    elif kind == "p.grad":
        p.grad = p.grad.clone()  # a new gradient tensor, same values
    else:
        p.grad.data = p.grad.detach().clone()  # the same gradient object re-pointed


@pytest.mark.parametrize("flat_grads", [False, True], ids=["plain", "flat"])
@pytest.mark.parametrize("kind", ["p.data", "p.grad", "p.grad.data"])
def test_replaced_tensors_are_detected_among_many(kind, flat_grads):
    """A p.data or p.grad replaced by a tensor at a new address, among 1,000 parameters, is
    followed: the step matches bit for bit a twin optimizer whose tensors stayed in place,
    on that step and the next ones (or, for a re-pointed flat-grads view, raises and
    writes nothing)."""
    import warnings

    from fusedwd.optim import _flat

    shapes = [(1 + (7 * k) % 23,) for k in range(1000)]
    a, b = make_params(shapes), make_params(shapes)
    opt_a = fusedwd.AdamW(a, lr=1e-2, weight_decay=0.1, backend="cpu", flat_grads=flat_grads)
    opt_b = fusedwd.AdamW(b, lr=1e-2, weight_decay=0.1, backend="cpu", flat_grads=flat_grads)
    old = {}
    for t in range(4):
        grads = random_grads(a, t)
        for params in (a, b):
            for p, g in zip(params, grads):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)  # keeps flat_grads' views
        if t == 2:
            for i in REPLACED:
                old[i] = (a[i].data_ptr(), a[i].grad.data_ptr())
                _replace(kind, a[i])
                assert (a[i].data_ptr(), a[i].grad.data_ptr()) != old[i], "the replacement has a new address"
            if flat_grads and kind == "p.grad.data":
                before = [p.detach().clone() for p in a]
                with pytest.raises(RuntimeError, match="re-pointed"):
                    opt_a.step()
                assert all(torch.equal(p, q) for p, q in zip(a, before)), "a step that raised wrote"
                return
        _flat._warned_replaced = True  # flat_grads' one warning for replaced gradients is tested elsewhere
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt_a.step()
        opt_b.step()
        for k, (p, q) in enumerate(zip(a, b)):
            assert torch.equal(p, q), f"step {t}: parameter {k} differs"
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt_a.state[p][name], opt_b.state[q][name]), f"step {t}: {name} of {k}"
    if kind == "p.data":
        for i in REPLACED:
            assert a[i].data_ptr() != old[i][0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_half_precision_matches_torch_fused(dtype, amsgrad):
    # torch's fused CPU AdamW also keeps 16-bit states and computes in fp32
    a = make_params(AWKWARD_SHAPES, dtype)
    b = clone_params(a)
    kw = dict(lr=1e-2, betas=(0.85, 0.98), weight_decay=0.1, amsgrad=amsgrad)
    opt_a = fusedwd.AdamW(a, **kw, backend="cpu")
    opt_b = torch.optim.AdamW(b, **kw, fused=True)
    names = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    compare_optimizers(opt_a, a, opt_b, b, names, 30, lambda t: random_grads(a, t))


class _CountingParameter(torch.nn.Parameter):
    """A Parameter subclass that overrides a member gather reads directly."""

    calls = 0

    def is_contiguous(self, *args, **kwargs):
        type(self).calls += 1
        return super().is_contiguous(*args, **kwargs)


def test_parameter_subclass_takes_the_generic_path():
    # gather calls TensorBase's C functions only on types that do not override them
    a = [_CountingParameter(torch.randn(40)), torch.nn.Parameter(torch.randn(7))]
    b = clone_params(a)
    opt_a = fusedwd.AdamW(a, backend="cpu")
    opt_b = fusedwd.AdamW(b, backend="reference")
    _CountingParameter.calls = 0
    compare_optimizers(opt_a, a, opt_b, b, ["exp_avg"], 3, lambda t: random_grads(a, t))
    assert _CountingParameter.calls >= 3, "the override was bypassed"


def test_small_buckets_run_on_one_thread(monkeypatch):
    # no thread gets fewer than GRAIN_SIZE elements (torch's parallel_for rule)
    from fusedwd.optim._runners import GRAIN_SIZE

    seen = []
    C = _ext.cpu()
    real = C.step
    # step(rule, table, nseg, hyper, dtype, switches, num_threads, **precision)
    monkeypatch.setattr(C, "step", lambda *a, **kw: (seen.append(a[6]), real(*a, **kw)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for numel in (100, GRAIN_SIZE * 4):
        p = torch.nn.Parameter(torch.randn(numel))
        opt = fusedwd.AdamW([p], backend="cpu")
        p.grad = torch.randn(numel)
        opt.step()
    assert seen == [1, 2]
