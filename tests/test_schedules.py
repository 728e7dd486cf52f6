"""Warm restarts, normalized decay and lr-independent decay schedules."""

import math

import pytest
import torch

import fusedwd
from fusedwd.groups import param_groups
from fusedwd.schedules import WarmRestarts, WeightDecayScheduler, normalized_weight_decay

from _helpers import assert_close


def _opt(lr=0.1, wd=0.0, decay="independent", params=None):
    params = params if params is not None else [torch.nn.Parameter(torch.randn(7))]
    return fusedwd.SGDW(params, lr=lr, weight_decay=wd, decay=decay)


def test_normalized_weight_decay_formula():
    # App. B.1: lambda = lambda_norm * sqrt(b / (B*T))
    assert normalized_weight_decay(0.05, 128, 50_000, 100) == pytest.approx(0.05 * math.sqrt(128 / 5e6))
    with pytest.raises(ValueError, match="epochs"):
        normalized_weight_decay(0.05, 128, 50_000, 0)


@pytest.mark.parametrize("T_mult", [1, 2, 3])
def test_warm_restarts_match_torch_cosine_with_fractional_epochs(T_mult):
    steps_per_epoch, base = 4, 0.1
    ours = _opt(lr=base)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=base)
    sched = WarmRestarts(ours, T_0=2, T_mult=T_mult, eta_min=0.1, steps_per_epoch=steps_per_epoch)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(theirs, T_0=2, T_mult=T_mult, eta_min=0.1 * base)
    for step in range(60):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        ours.step()
        sched.step()
        ref.step((step + 1) / steps_per_epoch)


def test_restart_boundaries_and_periods():
    sched = WarmRestarts(_opt(), T_0=2, T_mult=2, steps_per_epoch=1)
    # periods of 2, 4, 8 epochs start at 0, 2, 6, 14
    assert [sched.period(e)[0] for e in (0, 1.9, 2, 5.9, 6, 13.99, 14)] == [0, 0, 1, 1, 2, 2, 3]
    assert sched.period(6)[2] == 8 and sched.period(7)[1] == 1


def test_independent_decay_follows_the_restart_multiplier():
    # zero gradients: only the decay acts, p_T = p_0 * prod_t (1 - eta_t * wd), the paper's Alg. 2
    p = torch.nn.Parameter(torch.randn(50))
    p0 = p.detach().clone()
    opt = _opt(lr=0.5, wd=0.05, params=[p])
    sched = WarmRestarts(opt, T_0=1, T_mult=2, eta_min=0.2, steps_per_epoch=3)
    expected = 1.0
    for _ in range(12):
        expected *= 1 - sched.multiplier() * 0.05
        p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    assert_close(p.detach(), p0 * expected, "decayed parameter")


def test_normalized_decay_recomputed_each_period_and_no_decay_group_kept():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = fusedwd.AdamW(param_groups(model, weight_decay=1.0), lr=1e-3, decay="independent")
    sched = WarmRestarts(opt, T_0=2, T_mult=2, steps_per_epoch=5, lambda_norm=0.05, batch_size=32, num_train=160)
    seen = []
    for _ in range(30):  # periods of 2 and 4 epochs: 10 and 20 steps
        seen.append((opt.param_groups[0]["weight_decay"], opt.param_groups[1]["weight_decay"]))
        opt.step()
        sched.step()
    assert seen[0][0] == pytest.approx(normalized_weight_decay(0.05, 32, 160, 2))
    assert seen[10][0] == pytest.approx(normalized_weight_decay(0.05, 32, 160, 4))
    assert all(no_decay == 0.0 for _, no_decay in seen)


def test_warm_restarts_compose_with_a_warmup():
    opt = _opt(lr=1.0)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4)
    restarts = WarmRestarts(opt, T_0=1, steps_per_epoch=4)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, restarts], milestones=[4])
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[3] == pytest.approx(0.775)
    assert lrs[4] == pytest.approx(1.0) and lrs[8] == pytest.approx(1.0)  # a restart every 4 steps
    assert lrs[6] == pytest.approx(0.5)


def test_weight_decay_schedule_leaves_lr_alone():
    opt = _opt(lr=0.3, wd=0.2, decay="decoupled")
    sched = WeightDecayScheduler(opt, "cosine", total_steps=10, warmup_steps=2)
    wds = []
    for _ in range(12):
        wds.append(opt.param_groups[0]["weight_decay"])
        assert opt.param_groups[0]["lr"] == 0.3
        opt.step()
        sched.step()
    assert wds[:2] == [0.0, 0.0], "no decay during warmup"
    assert wds[2] == pytest.approx(0.2) and wds[6] == pytest.approx(0.1) and wds[10] == pytest.approx(0.0)
    state = sched.state_dict()
    again = WeightDecayScheduler(opt, "cosine", total_steps=10, warmup_steps=2)
    again.load_state_dict(state)
    assert again.last_step == sched.last_step


def test_weight_decay_schedule_changes_the_step():
    # the kernel reads weight_decay every step: a schedule takes effect at once
    p = torch.nn.Parameter(torch.ones(5))
    opt = _opt(lr=0.5, wd=0.1, decay="decoupled", params=[p])
    WeightDecayScheduler(opt, lambda step: 0.0 if step == 0 else 1.0)
    p.grad = torch.zeros(5)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(5)), "multiplier 0: no decay"


def test_bad_arguments():
    with pytest.raises(ValueError, match="T_0"):
        WarmRestarts(_opt(), T_0=0)
    with pytest.raises(ValueError, match="T_mult"):
        WarmRestarts(_opt(), T_0=1, T_mult=0.5)
    with pytest.raises(ValueError, match="eta_min"):
        WarmRestarts(_opt(), T_0=1, eta_min=2.0)
    with pytest.raises(ValueError, match="go together"):
        WarmRestarts(_opt(), T_0=1, lambda_norm=0.05)
    with pytest.raises(ValueError, match="total_steps"):
        WeightDecayScheduler(_opt(), "cosine")
    with pytest.raises(ValueError, match="one callable per param group"):
        WeightDecayScheduler(_opt(), [lambda s: 1.0, lambda s: 1.0])
