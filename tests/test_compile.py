"""torch.compile of a step, and capturable=True (no host read of lr or step).

A compiled ``opt.step`` traces through the ``fusedwd::<rule>_step_`` custom ops
(fullgraph), with the lr a tensor input: a scheduler changing it every step
must not recompile, and the results must equal the eager fused step bitwise
(the same kernel runs either way). capturable=True builds the hyperparameter
rows on the device from the lr tensor; no ``aten._local_scalar_dense`` (what
``.item()``, ``float(t)`` and ``bool(t)`` dispatch to: a device sync on a GPU)
may run inside the step.
"""

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
from torch.utils._python_dispatch import TorchDispatchMode

import fusedwd

import _rules
from _helpers import assert_close

pytest.importorskip("fusedwd._C", reason="fusedwd._C is not built: the compiled path runs its ops")

# every rule in its richest structure (tests/_rules.py), the decay modes in turn; lr is the test's
RULES = [(cls, {k: v for k, v in dict(kw, decay=["decoupled", "independent", "l2"][i % 3]).items() if k != "lr"})
         for i, (cls, kw, _) in enumerate(_rules.RICH_CONFIGS.values())]
RULE_IDS = list(_rules.RICH_CONFIGS)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 33), torch.nn.LayerNorm(33), torch.nn.GELU(), torch.nn.Linear(33, 5)
    ).to(dtype)


def _backward(model, t):
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randn(7, 12, generator=gen).to(next(model.parameters()).dtype)
    model.zero_grad()
    model(x).square().mean().backward()


def _lr(t):
    # a schedule: a new value every step
    return 1e-2 / (1 + t)


@pytest.mark.parametrize("cls,kw", RULES, ids=RULE_IDS)
def test_compiled_step_equals_eager_and_never_recompiles(cls, kw):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_model, compiled_model = _model(), _model()
    eager = cls(eager_model.parameters(), lr=torch.tensor(_lr(0), dtype=torch.float64), **kw)
    compiled = cls(compiled_model.parameters(), lr=torch.tensor(_lr(0), dtype=torch.float64), **kw)
    step = torch.compile(compiled.step, fullgraph=True)
    for t in range(6):
        for model in (eager_model, compiled_model):
            _backward(model, t)
        eager.step()
        step()
        for opt in (eager, compiled):
            opt.param_groups[0]["lr"].fill_(_lr(t + 1))
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            assert torch.equal(p, q), f"step {t}: compiled step differs from eager"
            for name, s in eager.state[p].items():
                assert torch.equal(s, compiled.state[q][name]), f"step {t}: state {name} differs"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


def test_compiled_training_step_with_a_scheduler():
    # the scheduler wraps opt.step in a function dynamo skips (as for torch.optim):
    # a whole training step compiles with graph breaks, and stays right
    torch._dynamo.reset()
    eager_model, compiled_model = _model(), _model()
    opts = [fusedwd.AdamW(m.parameters(), lr=torch.tensor(3e-3), weight_decay=0.1)
            for m in (eager_model, compiled_model)]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5) for o in opts]

    def train_step(model, opt, sched, t):
        _backward(model, t)
        opt.step()
        sched.step()

    compiled = torch.compile(train_step)
    for t in range(5):
        train_step(eager_model, opts[0], scheds[0], t)
        compiled(compiled_model, opts[1], scheds[1], t)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        assert_close(q, p, torch.float32)


def test_compiled_step_rejects_the_reference_backend():
    torch._dynamo.reset()
    model = _model()
    opt = fusedwd.AdamW(model.parameters(), lr=torch.tensor(1e-3), backend="reference")
    _backward(model, 0)
    with pytest.raises(Exception, match="backend 'cpu' or 'cuda'"):
        torch.compile(opt.step, fullgraph=True)()


class _HostReads(TorchDispatchMode):
    """Records every op that copies a tensor's value to a Python number."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls,kw", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capturable_step_reads_nothing_on_the_host(cls, kw, dtype):
    plain_model, capt_model = _model(dtype), _model(dtype)
    plain = cls(plain_model.parameters(), lr=torch.tensor(_lr(0)), **kw)
    capt = cls(capt_model.parameters(), lr=torch.tensor(_lr(0)), capturable=True, **kw)
    for t in range(5):
        for model in (plain_model, capt_model):
            _backward(model, t)
        plain.step()
        with _HostReads() as mode:
            capt.step()
        assert mode.reads == [], f"step {t}: capturable step read a tensor on the host"
        for opt in (plain, capt):
            opt.param_groups[0]["lr"].fill_(_lr(t + 1))
        for p, q in zip(plain_model.parameters(), capt_model.parameters()):
            assert torch.equal(p, q), f"step {t}: capturable step differs from the host-read step"


def test_capturable_independent_decay_with_zero_initial_lr():
    # lr_max = 0: decay at the full rate once lr > 0 (docs/math.md), without reading lr
    models = [_model(), _model()]
    opts = [fusedwd.AdamW(m.parameters(), lr=torch.tensor(0.0), weight_decay=0.1, decay="independent",
                          capturable=c) for m, c in zip(models, (False, True))]
    for t in range(3):
        for m in models:
            _backward(m, t)
        for o in opts:
            o.step()
            o.param_groups[0]["lr"].fill_(1e-2)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


def test_capturable_lr_checks():
    model = _model()
    with pytest.raises(ValueError, match="lr must be a number or a 1-element tensor"):
        fusedwd.AdamW(model.parameters(), lr=torch.ones(2), capturable=True)
    with pytest.raises(TypeError, match="lr must be a floating-point tensor"):
        fusedwd.AdamW(model.parameters(), lr=torch.tensor(1), capturable=True)
    with pytest.raises(TypeError, match="capturable must be a bool"):
        fusedwd.AdamW(model.parameters(), capturable="yes")


def test_capturable_state_dict_round_trip():
    model = _model()
    opt = fusedwd.AdamW(model.parameters(), lr=torch.tensor(1e-3), capturable=True)
    _backward(model, 0)
    opt.step()
    clone_model = copy.deepcopy(model)
    clone = fusedwd.AdamW(clone_model.parameters(), lr=torch.tensor(1e-3), capturable=True)
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save + torch.load would
    assert clone.param_groups[0]["capturable"] is True
    for m, o in ((model, opt), (clone_model, clone)):
        _backward(m, 1)
        o.step()
    for p, q in zip(model.parameters(), clone_model.parameters()):
        assert torch.equal(p, q)
