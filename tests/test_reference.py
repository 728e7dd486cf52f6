"""fusedwd.reference (through the wrappers, backend='reference') against torch.optim.

Where the rules coincide the results must agree every step; where the paper
says they differ (Adam: L2 vs decoupled), they must differ.
"""

import pytest
import torch

import fusedwd

from _helpers import AWKWARD_SHAPES, assert_close, clone_params, compare_optimizers, make_params, max_abs, random_grads

STEPS = 50


def _groups(params, extra):
    # two groups with their own numbers, to exercise per-group hyperparameters
    half = len(params) // 2
    return [{"params": params[:half]}, {"params": params[half:], **extra}]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adamw_matches_torch_adamw(amsgrad, maximize):
    ours = make_params(AWKWARD_SHAPES)
    theirs = clone_params(ours)
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    extra = {"lr": 1e-2, "weight_decay": 0.3}
    opt = fusedwd.AdamW(_groups(ours, extra), **kw, backend="reference")
    ref = torch.optim.AdamW(_groups(theirs, extra), **kw, foreach=False)
    names = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    compare_optimizers(opt, ours, ref, theirs, names, STEPS, lambda t: random_grads(ours, t))


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_l2_matches_torch_adam(amsgrad):
    ours = make_params(AWKWARD_SHAPES)
    theirs = clone_params(ours)
    kw = dict(lr=2e-2, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05, amsgrad=amsgrad)
    opt = fusedwd.AdamW(ours, **kw, decay="l2", backend="reference")
    ref = torch.optim.Adam(theirs, **kw, foreach=False)
    names = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    compare_optimizers(opt, ours, ref, theirs, names, STEPS, lambda t: random_grads(ours, t))


SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False),
    dict(momentum=0.9, dampening=0.0, nesterov=False),
    dict(momentum=0.8, dampening=0.3, nesterov=False),
    dict(momentum=0.9, dampening=0.0, nesterov=True),
]


@pytest.mark.parametrize("cfg", SGD_CONFIGS,
                         ids=lambda c: f"mom{c['momentum']}-damp{c['dampening']}-nest{c['nesterov']}")
@pytest.mark.parametrize("maximize", [False, True])
def test_sgdw_l2_matches_torch_sgd(cfg, maximize):
    ours = make_params(AWKWARD_SHAPES)
    theirs = clone_params(ours)
    kw = dict(lr=5e-3, weight_decay=0.2, maximize=maximize, **cfg)
    extra = {"lr": 1e-2, "weight_decay": 0.05}
    opt = fusedwd.SGDW(_groups(ours, extra), **kw, decay="l2", backend="reference")
    ref = torch.optim.SGD(_groups(theirs, extra), **kw, foreach=False)
    names = ["momentum_buffer"] if cfg["momentum"] else []
    compare_optimizers(opt, ours, ref, theirs, names, STEPS, lambda t: random_grads(ours, t))
    if not cfg["momentum"]:
        assert all(len(opt.state[p]) == 0 for p in ours), "SGD without momentum keeps no state, as torch"


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_rmspropw_l2_matches_torch_rmsprop(centered, momentum):
    ours = make_params(AWKWARD_SHAPES)
    theirs = clone_params(ours)
    kw = dict(lr=1e-3, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=momentum, centered=centered)
    opt = fusedwd.RMSpropW(ours, **kw, decay="l2", backend="reference")
    ref = torch.optim.RMSprop(theirs, **kw, foreach=False)
    names = ["step", "square_avg"] + (["momentum_buffer"] if momentum else []) + (["grad_avg"] if centered else [])
    compare_optimizers(opt, ours, ref, theirs, names, STEPS, lambda t: random_grads(ours, t))


def _run(opt_cls, params, steps=STEPS, **kw):
    opt = opt_cls(params, backend="reference", **kw)
    for t in range(steps):
        for p, g in zip(params, random_grads(params, t)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def test_proposition_1_sgd_decay_equals_l2_without_momentum():
    # Loshchilov & Hutter, Prop. 1: p - lr*(g + wd*p) == (1 - lr*wd)*p - lr*g
    base = make_params(AWKWARD_SHAPES)
    dec = _run(fusedwd.SGDW, clone_params(base), lr=0.05, weight_decay=0.3, decay="decoupled")
    l2 = _run(fusedwd.SGDW, clone_params(base), lr=0.05, weight_decay=0.3, decay="l2")
    for k, (a, b) in enumerate(zip(dec, l2)):
        assert_close(a, b, f"param {k}", scale=max_abs(base[k]))


def test_sgd_decay_differs_from_l2_with_momentum():
    base = make_params(AWKWARD_SHAPES)
    kw = dict(lr=0.05, weight_decay=0.3, momentum=0.9)
    dec = _run(fusedwd.SGDW, clone_params(base), decay="decoupled", **kw)
    l2 = _run(fusedwd.SGDW, clone_params(base), decay="l2", **kw)
    assert max((a - b).abs().max().item() for a, b in zip(dec, l2)) > 1e-2


def test_adam_l2_and_decoupled_differ():
    base = make_params(AWKWARD_SHAPES)
    dec = _run(fusedwd.AdamW, clone_params(base), lr=1e-2, weight_decay=0.5, decay="decoupled")
    l2 = _run(fusedwd.AdamW, clone_params(base), lr=1e-2, weight_decay=0.5, decay="l2")
    # L2 decay is divided by sqrt(v): the decoupled run shrinks the weights far more
    norm = lambda ps: sum(p.norm() ** 2 for p in ps) ** 0.5  # noqa: E731
    assert norm(dec) < 0.95 * norm(l2)


def test_independent_decay_is_decoupled_divided_by_lr_max_at_constant_lr():
    # independent wd = paper's lambda; decoupled wd = lambda / lr_max (REFERENCES.md)
    base = make_params(AWKWARD_SHAPES)
    lr, lam = 1e-2, 1e-3
    ind = _run(fusedwd.AdamW, clone_params(base), lr=lr, weight_decay=lam, decay="independent")
    dec = _run(fusedwd.AdamW, clone_params(base), lr=lr, weight_decay=lam / lr, decay="decoupled")
    for k, (a, b) in enumerate(zip(ind, dec)):
        assert_close(a, b, f"param {k}", scale=max_abs(base[k]))


def test_independent_decay_follows_the_schedule_multiplier():
    # with zero gradients only the decay acts: p_T = p_0 * prod(1 - (lr_t/lr_max)*wd)
    p = torch.nn.Parameter(torch.randn(100))
    p0 = p.detach().clone()
    opt = fusedwd.SGDW([p], lr=0.5, weight_decay=0.1, decay="independent", backend="reference")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    expected = 1.0
    for _ in range(6):
        lr = opt.param_groups[0]["lr"]
        expected *= 1 - (lr / 0.5) * 0.1
        p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    assert_close(p.detach(), p0 * expected, "decayed parameter")


# ---------------------------------------------------------------- Lion
def _lion_by_hand(params, grads_per_step, exp_avgs, *, lr, beta1, beta2, weight_decay, decay, lr_max, maximize):
    """Lion written again from the paper (Chen et al. 2023, Program 1) in the form the common
    implementations take (lucidrains' lion-pytorch: decay, then the sign update, then the
    momentum, both interpolations with torch.lerp, as optimi; optimi's decouple_lr: the
    decay scaled by lr/max_lr), in float64, for a list of steps of gradients. Independent
    of fusedwd: plain tensor arithmetic, torch.lerp(m, g, w) written as its formula for a
    weight w below 0.5, m + w*(g - m) (torch's own kernel may fuse it into one FMA)."""
    for grads in grads_per_step:
        for p, g, m in zip(params, grads, exp_avgs):
            g = -g if maximize else g
            if decay == "l2":
                g = g + weight_decay * p
            elif decay == "decoupled":
                p.mul_(1.0 - lr * weight_decay)
            else:  # "independent"
                p.mul_(1.0 - (lr / lr_max) * weight_decay)
            assert 1.0 - beta1 < 0.5 and 1.0 - beta2 < 0.5, "the formula below is lerp's for such weights"
            update = m + (1.0 - beta1) * (g - m)
            p.sub_(lr * torch.sign(update))  # torch.sign(0) == 0
            m.add_((1.0 - beta2) * (g - m))


@pytest.mark.parametrize("decay", ["decoupled", "independent", "l2"])
@pytest.mark.parametrize("maximize", [False, True])
def test_lion_reference_matches_an_independent_formula(decay, maximize):
    ours = make_params(AWKWARD_SHAPES, torch.float64)
    theirs = [p.detach().clone() for p in ours]
    exp_avgs = [torch.zeros_like(p) for p in theirs]
    kw = dict(lr=3e-3, betas=(0.85, 0.97), weight_decay=0.4)
    opt = fusedwd.Lion(ours, **kw, decay=decay, maximize=maximize, backend="reference")
    grads = [random_grads(ours, t) for t in range(STEPS)]
    for t in range(STEPS):
        for p, g in zip(ours, grads[t]):
            p.grad = g.clone()
        opt.step()
    _lion_by_hand(theirs, grads, exp_avgs, lr=kw["lr"], beta1=0.85, beta2=0.97, weight_decay=0.4, decay=decay,
                  lr_max=kw["lr"], maximize=maximize)
    for k, (p, q, m) in enumerate(zip(ours, theirs, exp_avgs)):
        # the same IEEE float64 operations in the same order: equal
        assert torch.equal(p.detach(), q), f"parameter {k}"
        assert torch.equal(opt.state[p]["exp_avg"], m), f"exp_avg {k}"
        assert float(opt.state[p]["step"]) == STEPS


def test_lion_every_element_moves_by_exactly_lr():
    # the sign update: without decay every element with a nonzero direction moves by lr, no more
    params = [torch.nn.Parameter(torch.randint(-64, 64, (5000,)).double() / 64)]
    before = params[0].detach().clone()
    opt = fusedwd.Lion(params, lr=2.0**-10, backend="reference")
    params[0].grad = torch.randn(5000, dtype=torch.float64)
    opt.step()
    moved = (params[0].detach() - before).abs()
    assert torch.equal(moved, torch.full_like(moved, 2.0**-10))


def test_lion_sign_of_zero_is_zero_and_a_nan_propagates():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    opt = fusedwd.Lion([p], lr=0.1, backend="reference")
    p.grad = torch.tensor([0.0, -0.0, float("nan"), 1.0])
    opt.step()
    assert p[0].item() == 1.0 and p[1].item() == -2.0, "sign(0) = 0: no step"
    assert p[2].isnan(), "a NaN gradient makes a NaN parameter, as for every rule"
    assert p[3].item() == pytest.approx(0.4)
