"""fusedwd.param_groups: which parameters go without weight decay."""

import pytest
import torch
from torch import nn

import fusedwd
from fusedwd import _ext
from fusedwd.groups import param_groups

from _helpers import assert_close


class LlamaRMSNorm(nn.Module):
    """A custom RMSNorm as model code writes them: found by its class name."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Scale2d(nn.Module):
    """A 2-D gain inside a norm-like module: only the module type can exempt it."""

    def __init__(self):
        super().__init__()
        self.ln_x = nn.LayerNorm(4, elementwise_affine=True)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 8)
        self.ln_1 = nn.LayerNorm(8)
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Linear(8, 8, bias=False)
        self.rms = LlamaRMSNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.wte.weight  # tied
        self.frozen = nn.Linear(2, 2)
        for p in self.frozen.parameters():
            p.requires_grad_(False)


def _names(groups):
    return {g["weight_decay"]: sorted(g["param_names"]) for g in groups}


def test_default_rule():
    by_wd = _names(param_groups(Tiny(), weight_decay=0.1))
    assert by_wd[0.1] == ["attn.weight", "conv.weight", "mlp.weight", "wte.weight"]
    assert by_wd[0.0] == sorted([
        "attn.bias", "bn.bias", "bn.weight", "conv.bias", "gn.bias", "gn.weight",
        "ln_1.bias", "ln_1.weight", "rms.weight",
    ])


def test_norm_by_type_not_shape():
    # a 2-D LayerNorm gain is exempt because of the module type, not its shape
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm((2, 2)))
    by_wd = _names(param_groups(m))
    assert by_wd[0.0] == ["0.bias", "1.bias", "1.weight"] and by_wd[0.01] == ["0.weight"]
    if hasattr(nn, "RMSNorm"):
        assert _names(param_groups(nn.Sequential(nn.RMSNorm((2, 3)))))[0.0] == ["0.weight"]


def test_embeddings_optional():
    by_wd = _names(param_groups(Tiny(), no_decay_embeddings=True))
    assert "wte.weight" in by_wd[0.0] and "wte.weight" not in by_wd.get(0.01, [])


def test_patterns_and_callable_override():
    by_wd = _names(param_groups(Tiny(), no_decay=["*.bias", "wte.*"]))
    assert by_wd[0.0] == ["attn.bias", "bn.bias", "conv.bias", "gn.bias", "ln_1.bias", "wte.weight"]
    only_conv = _names(param_groups(Tiny(), no_decay=lambda name, p, m: isinstance(m, nn.Conv2d)))
    assert only_conv[0.0] == ["conv.bias", "conv.weight"]


def test_group_options_and_errors():
    groups = param_groups(Tiny(), weight_decay=0.05, lr=3e-4, betas=(0.9, 0.95))
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.9, 0.95) for g in groups)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(Tiny(), weight_decay=-1)
    with pytest.raises(TypeError, match="no_decay"):
        param_groups(Tiny(), no_decay="*.bias")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(frozen)


def test_groups_drive_fusedwd_and_torch_alike():
    torch.manual_seed(0)
    model, twin = Tiny(), Tiny()
    twin.load_state_dict(model.state_dict())
    opt = fusedwd.AdamW(param_groups(model, weight_decay=0.5), lr=1e-2)
    ref = torch.optim.AdamW(param_groups(twin, weight_decay=0.5), lr=1e-2, foreach=False)
    assert len({b.dtype for b in opt._current_plan()}) == 1 and len(opt._current_plan()) == 1, "one bucket, one pass"
    for _ in range(5):
        x = torch.randint(0, 10, (6,))
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            h = m.ln_1(m.wte(x))
            out = m.head(m.rms(m.attn(h) + m.mlp(h)))
            out.pow(2).mean().backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), name, scale=1.0)
    # no-decay parameters without gradient signal stay exactly where they were
    assert torch.equal(model.gn.weight, torch.ones(8))


def test_400_param_groups_step_in_one_pass(monkeypatch):
    # per-segment hyperparameter rows: 400 groups with different lr and weight decay
    # still make one bucket and one kernel call per step, with torch's results
    pytest.importorskip("fusedwd._C")
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(7, 5)) for _ in range(400)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    groups = lambda ps: [dict(params=[p], lr=1e-3 * (1 + k % 7), weight_decay=0.01 * (k % 5))  # noqa: E731
                         for k, p in enumerate(ps)]
    opt = fusedwd.AdamW(groups(params))
    ref = torch.optim.AdamW(groups(twins), foreach=False)
    calls = []
    C = _ext.cpu()
    step = C.step
    monkeypatch.setattr(C, "step", lambda *a, **k: calls.append(1) or step(*a, **k))
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(7, 5)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert len(opt._current_plan()) == 1 and len(calls) == 3, (len(opt._current_plan()), len(calls))
    for p, q in zip(params, twins):
        assert_close(p.detach(), q.detach(), "param", scale=1.0)
