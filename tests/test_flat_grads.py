"""flat_grads=True: gradients re-homed into one flat buffer per bucket."""


import pytest
import torch

import fusedwd
from fusedwd import _ext
from fusedwd.optim._checks import Checks

from _helpers import make_params

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason="fusedwd._C is not built")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 33), torch.nn.LayerNorm(33), torch.nn.GELU(), torch.nn.Linear(33, 4))


def _train(model, opt, steps, zero=None):
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        (zero or opt.zero_grad)()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("cls, kw", [(fusedwd.AdamW, dict(amsgrad=True)), (fusedwd.SGDW, dict(momentum=0.9)),
                                     (fusedwd.RMSpropW, dict(centered=True, momentum=0.5))])
def test_same_results_as_gathered_gradients(cls, kw):
    a, b = _model(), _model()
    opt_a = cls(a.parameters(), lr=1e-2, weight_decay=0.1, flat_grads=True, **kw)
    opt_b = cls(b.parameters(), lr=1e-2, weight_decay=0.1, **kw)
    _train(a, opt_a, 8)
    _train(b, opt_b, 8)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q), "the same kernel on the same gradients must agree bit for bit"
    assert all(bk.grads is not None and bk.grads.views for bk in opt_a._current_plan())


def test_grads_are_views_of_one_buffer_and_zero_grad_keeps_them():
    model = _model()
    opt = fusedwd.AdamW(model.parameters(), flat_grads=True)
    _train(model, opt, 1)
    (bucket,) = opt._current_plan()
    views = [p.grad for p in model.parameters()]
    assert all(g.untyped_storage().data_ptr() == bucket.grads.buffer.untyped_storage().data_ptr() for g in views)
    opt.zero_grad()  # set_to_none=True by default: the views stay
    assert all(p.grad is v for p, v in zip(model.parameters(), views))
    assert all(torch.count_nonzero(v) == 0 for v in views)


def test_steady_state_skips_per_parameter_checks(monkeypatch):
    model = _model()
    opt = fusedwd.AdamW(model.parameters(), flat_grads=True)
    _train(model, opt, 2)
    calls = []
    monkeypatch.setattr(Checks, "check", lambda *a: calls.append(a))
    _train(model, opt, 3)
    assert calls == [], "with the views in place no parameter needs the Python path"


def test_replaced_gradients_are_copied_in_with_one_warning():
    a, b = _model(), _model()
    opt_a = fusedwd.AdamW(a.parameters(), lr=1e-2, flat_grads=True)
    opt_b = fusedwd.AdamW(b.parameters(), lr=1e-2)
    _train(a, opt_a, 1)
    _train(b, opt_b, 1)
    from fusedwd.optim import _flat

    _flat._warned_replaced = False
    with pytest.warns(RuntimeWarning, match="gradients were replaced"):
        _train(a, opt_a, 2, zero=lambda: a.zero_grad(set_to_none=True))
    _train(b, opt_b, 2, zero=lambda: b.zero_grad(set_to_none=True))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    (bucket,) = opt_a._current_plan()
    assert all(p.grad is v for p, v in zip(a.parameters(), bucket.grads.views)), "views handed out again"


def test_parameter_with_grad_none_is_skipped():
    params = make_params([(5,), (7,)])
    opt = fusedwd.AdamW(params, flat_grads=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = params[1].detach().clone()
    opt.zero_grad()
    params[0].grad.copy_(torch.randn(5))
    params[1].grad = None  # no gradient this step: skipped, as torch does
    opt.step()
    assert torch.equal(params[1].detach(), before)
    assert float(opt.state[params[1]]["step"]) == 1 and float(opt.state[params[0]]["step"]) == 2


def test_repointed_view_raises():
    params = make_params([(5,)])
    opt = fusedwd.AdamW(params, flat_grads=True)
    params[0].grad = torch.randn(5)
    opt.step()
    params[0].grad.data = torch.randn(5)  # the view now points elsewhere
    with pytest.raises(RuntimeError, match="re-pointed"):
        opt.step()


def test_non_contiguous_parameters_keep_gathered_gradients():
    p = torch.nn.Parameter(torch.randn(8, 3).t())
    q = torch.nn.Parameter(torch.randn(4))
    opt = fusedwd.AdamW([p, q], flat_grads=True)
    p.grad, q.grad = torch.randn(3, 8), torch.randn(4)
    opt.step()
    flat = {bk.flat_grads: [id(x) for x in bk.params] for bk in opt._current_plan()}
    assert flat == {True: [id(q)], False: [id(p)]}


def test_flat_grads_must_be_a_bool():
    with pytest.raises(TypeError, match="flat_grads"):
        fusedwd.AdamW(make_params([(3,)]), flat_grads="yes")
