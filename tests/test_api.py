"""torch.optim behaviour users rely on: signatures, groups, schedulers, closure, zero_grad."""

import inspect

import pytest
import torch

import fusedwd
from fusedwd import _ext
from _helpers import AWKWARD_SHAPES, assert_close, clone_params, compare_optimizers, make_params, random_grads

BACKENDS = ["reference"] + (["cpu"] if _ext.has_cpu() else [])


@pytest.mark.parametrize(
    "ours, theirs",
    [(fusedwd.AdamW, torch.optim.AdamW), (fusedwd.SGDW, torch.optim.SGD), (fusedwd.RMSpropW, torch.optim.RMSprop)],
)
def test_signature_matches_torch(ours, theirs):
    mine = inspect.signature(ours.__init__).parameters
    torchs = inspect.signature(theirs.__init__).parameters
    for name, param in torchs.items():
        assert name in mine, f"{ours.__name__} lacks torch's argument {name}"
        assert mine[name].default == param.default, f"{ours.__name__}.{name} default differs from torch"
        assert mine[name].kind == param.kind, f"{ours.__name__}.{name} is {mine[name].kind}, torch's {param.kind}"
    assert mine["decay"].default == "decoupled" and mine["backend"].default == "auto"
    assert issubclass(ours, torch.optim.Optimizer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_changes_take_effect_at_once(backend):
    ours = make_params(AWKWARD_SHAPES)
    theirs = clone_params(ours)
    opt = fusedwd.AdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    lam = lambda t: 0.5 + 0.5 * torch.cos(torch.tensor(t * 0.3)).item()  # changes every step
    sched_ours = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    sched_ref = torch.optim.lr_scheduler.LambdaLR(ref, lam)

    def after(t):
        # called before each step: advance both schedulers from the second step on
        if t:
            sched_ours.step()
            sched_ref.step()

    compare_optimizers(opt, ours, ref, theirs, ["step", "exp_avg", "exp_avg_sq"], 20,
                       lambda t: random_grads(ours, t), before_step=after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr(backend):
    ours = make_params([(10,)])
    theirs = clone_params(ours)
    opt = fusedwd.AdamW(ours, lr=torch.tensor(0.01), backend=backend)
    ref = torch.optim.AdamW(theirs, lr=torch.tensor(0.01), foreach=False)
    compare_optimizers(opt, ours, ref, theirs, ["exp_avg"], 5, lambda t: random_grads(ours, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_mid_training(backend):
    ours, extra = make_params(AWKWARD_SHAPES[:3]), make_params([(17,), (5, 5)], seed=7)
    theirs, extra_t = clone_params(ours), clone_params(extra)
    opt = fusedwd.AdamW(ours, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    compare_optimizers(opt, ours, ref, theirs, ["step", "exp_avg"], 3, lambda t: random_grads(ours, t))
    opt.add_param_group({"params": extra, "lr": 3e-2, "amsgrad": True})
    ref.add_param_group({"params": extra_t, "lr": 3e-2, "amsgrad": True})
    assert opt.param_groups[1]["lr_max"] == 3e-2 and opt.param_groups[1]["decay"] == "decoupled"
    everyone, everyone_t = ours + extra, theirs + extra_t
    compare_optimizers(opt, everyone, ref, everyone_t, ["step", "exp_avg", "exp_avg_sq"], 5,
                       lambda t: random_grads(everyone, 10 + t))
    assert float(opt.state[ours[0]]["step"]) == 8 and float(opt.state[extra[0]]["step"]) == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure(backend):
    model = torch.nn.Linear(5, 2)
    opt = fusedwd.SGDW(model.parameters(), lr=0.1, backend=backend)
    x = torch.randn(8, 5)
    calls = []

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        calls.append(loss.item())
        return loss

    first = opt.step(closure)
    assert torch.is_tensor(first) and calls == [first.item()]
    for _ in range(10):
        opt.step(closure)
    assert calls[-1] < calls[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_loop_with_zero_grad_matches_torch(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    twin.load_state_dict(model.state_dict())
    opt = fusedwd.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, backend=backend)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for set_to_none in [True, False, True]:
        for _ in range(5):
            for m, o in ((model, opt), (twin, ref)):
                o.zero_grad(set_to_none=set_to_none)
                torch.nn.functional.cross_entropy(m(x), y).backward()
                o.step()
    for k, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        assert_close(p.detach(), q.detach(), f"parameter {k}", scale=1.0)


def test_one_bucket_per_dtype_and_structure():
    f32 = make_params([(4,), (5,)])
    bf16 = make_params([(6,)], dtype=torch.bfloat16)
    opt = fusedwd.AdamW([{"params": f32}, {"params": bf16}, {"params": make_params([(3,)]), "amsgrad": True}])
    keys = {(b.dtype, b.structure, len(b.params)) for b in opt._current_plan()}
    assert keys == {(torch.float32, (False,), 2), (torch.bfloat16, (False,), 1), (torch.float32, (True,), 1)}


def test_available_backends():
    assert fusedwd.available_backends("cpu")[-1] == "reference"
    assert ("cpu" in fusedwd.available_backends("cpu")) == _ext.has_cpu()
    assert fusedwd.available_backends("meta") == ["reference"]


def test_named_parameters_and_error_names_them():
    model = torch.nn.Linear(3, 2)
    opt = fusedwd.AdamW(model.named_parameters())
    model.bias.grad = torch.randn(2).to_sparse()
    with pytest.raises(RuntimeError, match="'bias'"):
        opt.step()


def test_duplicated_parameter_has_one_state_and_is_stepped_once():
    """docs/design.md#duplicated-parameters: torch warns and steps such a parameter twice (its
    implementations then disagree); fusedwd warns as torch does and steps it once."""
    import warnings

    for backend in BACKENDS:
        p, q = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
        q.data.copy_(p.data)
        with pytest.warns(UserWarning, match="duplicate parameters"):
            dup = fusedwd.AdamW([p, p], lr=1e-2, backend=backend)
        once = fusedwd.AdamW([q], lr=1e-2, backend=backend)
        for t in range(3):
            g = torch.randn(5)
            p.grad, q.grad = g.clone(), g.clone()
            dup.step()
            once.step()
        assert torch.equal(p, q), backend
        assert float(dup.state[p]["step"]) == 3.0
        assert all(torch.equal(dup.state[p][k], once.state[q][k]) for k in ("exp_avg", "exp_avg_sq"))
        ids = dup.state_dict()["param_groups"][0]["params"]
        assert len(ids) == 2 and ids[0] == ids[1], ids  # torch's state_dict: one index, listed twice

    # what torch 2.13 does, so the day it changes this test says so
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = {}
        for impl in (dict(foreach=False), dict(foreach=True), dict(fused=True)):
            p = torch.nn.Parameter(torch.ones(3))
            opt = torch.optim.Adam([p, p], lr=0.1, **impl)
            for _ in range(3):
                p.grad = torch.full((3,), 0.5)
                opt.step()
            assert float(opt.state[p]["step"]) == 6.0, "torch steps a duplicated parameter twice"
            results[str(impl)] = p[0].item()
        assert len(set(results.values())) == 3, f"torch's implementations agree now: {results}"
