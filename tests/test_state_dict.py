"""Checkpoints move between torch.optim and fusedwd mid-training, both ways.

Train a few steps with one, save, load into the other, and continue both the
original and the loaded copy on the same gradients: they must stay together.
"""

import copy
import io
import pickle

import pytest
import torch

import fusedwd
from fusedwd import _ext

import _rules
from _helpers import AWKWARD_SHAPES, assign_grads, clone_params, compare_optimizers, make_params, random_grads

BACKENDS = ["reference"] + (["cpu"] if _ext.has_cpu() else [])

# (fusedwd class, torch class, shared kwargs, fusedwd-only kwargs, state names)
PAIRS = {
    "adamw": (fusedwd.AdamW, torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1), {},
              ["step", "exp_avg", "exp_avg_sq"]),
    "adamw-amsgrad": (fusedwd.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True), {},
                      ["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    "adam-l2": (fusedwd.AdamW, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1), dict(decay="l2"),
                ["step", "exp_avg", "exp_avg_sq"]),
    "sgd-momentum": (fusedwd.SGDW, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.1),
                     dict(decay="l2"), ["momentum_buffer"]),
    "rmsprop-centered": (fusedwd.RMSpropW, torch.optim.RMSprop,
                         dict(lr=1e-3, momentum=0.5, centered=True, weight_decay=0.1), dict(decay="l2"),
                         ["step", "square_avg", "momentum_buffer", "grad_avg"]),
}


def _train(opt, params, steps, offset=0):
    for t in range(steps):
        assign_grads([params], random_grads(params, offset + t))
        opt.step()


def _roundtrip(state_dict):
    # what a user does: torch.save to disk, torch.load back
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _two_groups(params, lr):
    return [{"params": params[:3]}, {"params": params[3:], "lr": lr * 0.3}]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_torch_checkpoint_into_fusedwd(name, backend):
    ours_cls, torch_cls, kw, extra, states = PAIRS[name]
    theirs = make_params(AWKWARD_SHAPES)
    opt_t = torch_cls(_two_groups(theirs, kw["lr"]), **kw, foreach=False)
    _train(opt_t, theirs, 5)
    ours = clone_params(theirs)
    opt_f = ours_cls(_two_groups(ours, kw["lr"]), **kw, **extra, backend=backend)
    opt_f.load_state_dict(_roundtrip(opt_t.state_dict()))
    compare_optimizers(opt_f, ours, opt_t, theirs, states, 10, lambda t: random_grads(ours, 100 + t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_fusedwd_checkpoint_into_torch(name, backend):
    ours_cls, torch_cls, kw, extra, states = PAIRS[name]
    ours = make_params(AWKWARD_SHAPES)
    opt_f = ours_cls(_two_groups(ours, kw["lr"]), **kw, **extra, backend=backend)
    _train(opt_f, ours, 5)
    theirs = clone_params(ours)
    opt_t = torch_cls(_two_groups(theirs, kw["lr"]), **kw, foreach=False)
    opt_t.load_state_dict(_roundtrip(opt_f.state_dict()))
    compare_optimizers(opt_t, theirs, opt_f, ours, states, 10, lambda t: random_grads(ours, 100 + t))


@pytest.mark.parametrize("name", list(_rules.RICH_CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fusedwd_roundtrip_is_exact(backend, name):
    cls, kw, states = _rules.RICH_CONFIGS[name]
    ours = make_params(AWKWARD_SHAPES)
    opt = cls(ours, **kw, decay="independent", backend=backend)
    _train(opt, ours, 4)
    saved = _roundtrip(opt.state_dict())
    assert set(saved["state"][0]) == set(states), "torch's (or the common implementations') state names"
    again = clone_params(ours)
    opt2 = cls(again, **kw, decay="independent", backend=backend)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["decay"] == "independent"
    for t in range(5):
        grads = random_grads(ours, 50 + t)
        assign_grads([ours, again], grads)
        opt.step()
        opt2.step()
        for p, q in zip(ours, again):
            assert torch.equal(p, q), "a reloaded optimizer must continue bit for bit"


def test_state_dict_layout_is_torchs():
    ours = make_params([(3, 4), (5,)])
    opt = fusedwd.AdamW(ours, amsgrad=True)
    _train(opt, ours, 2)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sorted(sd["state"]) == [0, 1]
    entry = sd["state"][0]
    assert set(entry) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert entry["step"].dtype == torch.float32 and entry["step"].dim() == 0 and float(entry["step"]) == 2
    assert entry["exp_avg"].shape == (3, 4)
    assert sd["param_groups"][0]["params"] == [0, 1]


def test_state_tensors_are_views_of_flat_buffers():
    ours = make_params([(3, 4), (5,), (70,)])
    opt = fusedwd.AdamW(ours)
    _train(opt, ours, 1)
    bases = {opt.state[p]["exp_avg"].untyped_storage().data_ptr() for p in ours}
    assert len(bases) == 1, "exp_avg of one bucket lives in one buffer"
    assert all(opt.state[p]["exp_avg"].data_ptr() % 64 == 0 for p in ours), "each slice is 64-byte aligned"


def test_loading_state_for_a_changed_amsgrad_starts_the_new_state_at_zero():
    ours = make_params([(6,)])
    opt = fusedwd.AdamW(ours)
    _train(opt, ours, 3)
    opt.param_groups[0]["amsgrad"] = True
    _train(opt, ours, 1, offset=3)
    assert "max_exp_avg_sq" in opt.state[ours[0]]
    assert float(opt.state[ours[0]]["step"]) == 4


def test_bad_checkpoint_state_shape():
    ours = make_params([(6,)])
    opt = fusedwd.AdamW(ours)
    _train(opt, ours, 1)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(5)
    opt.load_state_dict(sd)
    ours[0].grad = torch.randn(6)
    with pytest.raises(RuntimeError, match="state 'exp_avg' of parameter 0 of param group 0 has shape"):
        opt.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_are_independent(how):
    ours = make_params([(6,), (9,)])
    opt = fusedwd.AdamW(ours, lr=1e-2)
    _train(opt, ours, 2)
    if how == "deepcopy":
        opt2, ours2 = copy.deepcopy((opt, ours))
    else:
        opt2, ours2 = pickle.loads(pickle.dumps((opt, ours)))
    before = [opt.state[p]["exp_avg"].clone() for p in ours]
    _train(opt2, ours2, 3, offset=2)
    for p, b in zip(ours, before):
        assert torch.equal(opt.state[p]["exp_avg"], b), "stepping a copy wrote into the original's state"
    _train(opt, ours, 3, offset=2)
    for p, q in zip(ours, ours2):
        assert torch.equal(p, q)


def test_a_lion_pytorch_checkpoint_continues():
    # lion-pytorch and optimi keep one state per parameter, exp_avg, and no step: such a
    # checkpoint loads into fusedwd.Lion, whose next step starts from that momentum
    params = make_params(AWKWARD_SHAPES, torch.float64)
    exp_avgs = [torch.randn(p.shape, dtype=torch.float64) for p in params]
    lr, betas, wd = 1e-3, (0.9, 0.99), 0.2
    saved = {"state": {k: {"exp_avg": m.clone()} for k, m in enumerate(exp_avgs)},
             "param_groups": [dict(lr=lr, betas=betas, weight_decay=wd, params=list(range(len(params))))]}
    opt = fusedwd.Lion(params, lr=lr, betas=betas, weight_decay=wd, backend="reference")
    opt.load_state_dict(saved)
    grads = random_grads(params, 0)
    expected = []
    for p, g, m in zip(params, grads, exp_avgs):
        c = m * betas[0] + g * (1 - betas[0])
        expected.append((p.detach() * (1 - lr * wd) - lr * torch.sign(c), m * betas[1] + g * (1 - betas[1])))
        p.grad = g
    opt.step()
    for k, (p, (p_expected, m_expected)) in enumerate(zip(params, expected)):
        assert torch.equal(p.detach(), p_expected), f"parameter {k}"
        assert torch.equal(opt.state[p]["exp_avg"], m_expected), f"exp_avg {k}"
