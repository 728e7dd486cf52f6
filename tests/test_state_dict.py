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


@pytest.mark.parametrize("backend", BACKENDS)
def test_fusedwd_roundtrip_is_exact(backend):
    ours = make_params(AWKWARD_SHAPES)
    opt = fusedwd.AdamW(ours, lr=1e-2, amsgrad=True, decay="independent", backend=backend)
    _train(opt, ours, 4)
    saved = _roundtrip(opt.state_dict())
    again = clone_params(ours)
    opt2 = fusedwd.AdamW(again, lr=1e-2, amsgrad=True, decay="independent", backend=backend)
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


# ------------------------------------------------ torch's decoupled_weight_decay key


@pytest.mark.parametrize("decay,key", [("decoupled", True), ("independent", True), ("l2", False)])
def test_adamw_groups_write_torchs_decoupled_weight_decay(decay, key):
    opt = fusedwd.AdamW(make_params([(3,)]), decay=decay)
    assert opt.state_dict()["param_groups"][0]["decoupled_weight_decay"] is key


@pytest.mark.parametrize("name,ours_cls,torch_cls,kw", [
    ("adam", fusedwd.AdamW, torch.optim.Adam, dict(decoupled_weight_decay=True)),
    ("sgd", fusedwd.SGDW, torch.optim.SGD, dict(momentum=0.9)),
    ("rmsprop", fusedwd.RMSpropW, torch.optim.RMSprop, dict(centered=True)),
])
def test_every_group_key_torch_writes_is_there(name, ours_cls, torch_cls, kw):
    ours = ours_cls(make_params([(3,)]), **{k: v for k, v in kw.items() if k != "decoupled_weight_decay"})
    theirs = torch_cls(make_params([(3,)]), **kw)
    missing = set(theirs.state_dict()["param_groups"][0]) - set(ours.state_dict()["param_groups"][0])
    assert not missing, f"{name}: fusedwd's param groups lack torch's keys {sorted(missing)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fusedwd_checkpoint_into_torch_adam_keeps_decoupled_decay(backend):
    """issue 13: torch.optim.Adam(decoupled_weight_decay=True) loading a fusedwd.AdamW checkpoint
    switched to L2 decay; it continues with decoupled decay."""
    kw = dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1)
    ours = make_params(AWKWARD_SHAPES)
    opt_f = fusedwd.AdamW(ours, **kw, backend=backend)
    _train(opt_f, ours, 5)
    theirs = clone_params(ours)
    opt_t = torch.optim.Adam(theirs, **kw, decoupled_weight_decay=True, foreach=False)
    opt_t.load_state_dict(_roundtrip(opt_f.state_dict()))
    assert opt_t.param_groups[0]["decoupled_weight_decay"] is True
    compare_optimizers(opt_t, theirs, opt_f, ours, ["step", "exp_avg", "exp_avg_sq"], 10,
                       lambda t: random_grads(ours, 100 + t))


@pytest.mark.parametrize("torch_decoupled,expected", [(True, "decoupled"), (False, "l2")])
def test_torch_adam_checkpoint_brings_its_decay_mode(torch_decoupled, expected):
    """A torch Adam checkpoint's decoupled_weight_decay decides the decay, whatever fusedwd was built with."""
    kw = dict(lr=1e-2, weight_decay=0.1)
    theirs = make_params(AWKWARD_SHAPES)
    opt_t = torch.optim.Adam(theirs, **kw, decoupled_weight_decay=torch_decoupled, foreach=False)
    _train(opt_t, theirs, 5)
    ours = clone_params(theirs)
    other = "l2" if expected == "decoupled" else "decoupled"
    opt_f = fusedwd.AdamW(ours, **kw, decay=other)
    opt_f.load_state_dict(_roundtrip(opt_t.state_dict()))
    assert opt_f.param_groups[0]["decay"] == expected
    assert opt_f.param_groups[0]["decoupled_weight_decay"] is torch_decoupled
    compare_optimizers(opt_f, ours, opt_t, theirs, ["step", "exp_avg", "exp_avg_sq"], 10,
                       lambda t: random_grads(ours, 100 + t))


def test_torch_style_group_chooses_its_decay_by_the_key():
    params = make_params([(3,), (4,)])
    opt = fusedwd.AdamW([{"params": params[:1], "decoupled_weight_decay": False}, {"params": params[1:]}])
    assert [g["decay"] for g in opt.param_groups] == ["l2", "decoupled"]
    assert [g["decoupled_weight_decay"] for g in opt.param_groups] == [False, True]


def test_contradicting_decay_keys_are_a_clear_error():
    params = make_params([(3,)])
    with pytest.raises(ValueError, match="decoupled_weight_decay=False contradicts decay='decoupled'"):
        fusedwd.AdamW([{"params": params, "decoupled_weight_decay": False, "decay": "decoupled"}])
    opt = fusedwd.AdamW(params)
    opt.param_groups[0]["decay"] = "l2"
    params[0].grad = torch.ones(3)
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match="decoupled_weight_decay=True contradicts decay='l2'"):
        opt.step()
    assert torch.equal(params[0], before), "a rejected step writes nothing"
    del opt.param_groups[0]["decoupled_weight_decay"]  # written again from decay
    opt.step()
    assert opt.param_groups[0]["decoupled_weight_decay"] is False
    with pytest.raises(TypeError, match="decoupled_weight_decay must be a bool"):
        fusedwd.AdamW([{"params": make_params([(3,)]), "decoupled_weight_decay": 1}])


@pytest.mark.parametrize("backend", BACKENDS)
def test_independent_decay_continues_in_torch_with_wd_over_lr_max(backend):
    """docs/design.md#decay-modes-in-checkpoints: "independent" writes decoupled_weight_decay=True;
    torch then decays by lr*wd, so weight_decay = wd/lr_max continues the same run, at any lr."""
    lr_max, wd = 2e-2, 1e-3
    ours = make_params(AWKWARD_SHAPES)
    opt_f = fusedwd.AdamW(ours, lr=lr_max, weight_decay=wd, decay="independent", backend=backend)
    sched_f = torch.optim.lr_scheduler.StepLR(opt_f, step_size=2, gamma=0.5)
    for t in range(5):
        assign_grads([ours], random_grads(ours, t))
        opt_f.step()
        sched_f.step()
    theirs = clone_params(ours)
    opt_t = torch.optim.Adam(theirs, lr=lr_max, decoupled_weight_decay=True, foreach=False)
    sched_t = torch.optim.lr_scheduler.StepLR(opt_t, step_size=2, gamma=0.5)
    opt_t.load_state_dict(_roundtrip(opt_f.state_dict()))
    sched_t.load_state_dict(sched_f.state_dict())
    assert opt_t.param_groups[0]["decoupled_weight_decay"] is True
    for group in opt_t.param_groups:
        group["weight_decay"] = group["weight_decay"] / group["lr_max"]

    def both_schedulers(t):
        if t:
            sched_f.step()
            sched_t.step()

    compare_optimizers(opt_t, theirs, opt_f, ours, ["step", "exp_avg", "exp_avg_sq"], 6,
                       lambda t: random_grads(ours, 100 + t), before_step=both_schedulers)
    assert opt_f.param_groups[0]["lr"] < lr_max / 2, "the lr moved, so lr*wd and (lr/lr_max)*wd were both tried"


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_keeps_max_grad_norm(backend):
    """torch's load_state_dict calls __setstate__ with state and param_groups only: max_grad_norm
    (an option, not a group key) was reset to None there, so a resumed run stopped clipping
    (found resuming a Lightning run, docs/recipes.md)."""
    ours = make_params(AWKWARD_SHAPES)
    opt = fusedwd.AdamW(ours, lr=1e-2, max_grad_norm=0.5, backend=backend)
    _train(opt, ours, 3)
    again = clone_params(ours)
    opt2 = fusedwd.AdamW(again, lr=1e-2, max_grad_norm=0.5, backend=backend)
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    assert opt2.max_grad_norm == 0.5
    for t in range(3):
        assign_grads([ours, again], random_grads(ours, 50 + t))
        opt.step()
        opt2.step()
        assert opt2.last_grad_norm is not None and float(opt2.last_grad_norm) > 0.5, "the test must clip"
        assert all(torch.equal(p, q) for p, q in zip(ours, again)), "a reloaded optimizer must continue bit for bit"
