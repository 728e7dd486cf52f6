"""fusedwd.ops: the torch.library custom ops on CPU.

torch.library.opcheck checks each op's schema (every mutated list declared),
its fake implementation and its AOT-autograd tracing; the results are checked
against fusedwd.reference every step, params, states and step counts, with
the tolerance table. tests/test_cuda_ext.py runs the same problems through
the CUDA implementation when a GPU is present.
"""

import re

import pytest
import torch

import fusedwd.ops as ops
from fusedwd import _buckets, reference, rules
from fusedwd.optim import SGDW, AdamW, RMSpropW

import _rules
from _helpers import assert_close, max_abs

pytest.importorskip("fusedwd._C", reason="fusedwd._C is not built: the ops' CPU kernel is missing")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1,), (4097,), (33, 17), (2, 3, 5), (0,)]

CASES, CASE_IDS = _rules.RULE_CASES, _rules.RULE_CASE_IDS


class Problem:
    """One param group's tensors for a rule, drawn from a seed: two Problems with the
    same arguments start identical, one stepped by an op, the other by the reference."""

    def __init__(self, rule, switches, dtype, shapes=SHAPES, device="cpu", seed=0, decay="decoupled",
                 maximize=False, lr_max=None):
        gen = torch.Generator().manual_seed(seed)

        def draw(shape, kind="signed"):
            return _rules.draw(torch.randn(shape, generator=gen, dtype=torch.float64), kind).to(dtype).to(device)

        self.rule, self.switches, self.dtype, self.device = rule, switches, dtype, device
        self.spec = rules.get(rule)
        self.shapes = shapes
        self.params = [draw(s) for s in shapes]
        # the op's state lists, by argument name (exp_avgs, ...): empty where the switches keep none
        kept = self.spec.slots(switches)
        self.states = {state.name + "s": [draw(s, _rules.state_kind(rule, _buckets.SEG_S0 + k)) for s in shapes]
                       if kept[k] else [] for k, state in enumerate(self.spec.states)}
        # every tensor at its own step count; 0 is SGDW's first step
        self.steps = [torch.tensor(float(k), device=device) for k in torch.randint(0, 4, (len(shapes),), generator=gen)]
        self.hp = {k: v for k, v in _rules.kwargs(rule, switches).items() if k not in ("maximize",)}
        self.decay, self.maximize, self.lr_max = decay, maximize, lr_max

    def grads(self, step):
        gen = torch.Generator().manual_seed(1000 + step)
        return [(torch.randn(s, generator=gen, dtype=torch.float64) * (1 + k)).to(self.dtype).to(self.device)
                for k, s in enumerate(self.shapes)]

    def group(self):
        return self.spec.group(**self.hp, decay=self.decay, lr_max=self.lr_max, maximize=self.maximize)

    def hyper(self, device=None):
        return ops.hyper(self.rule, **self.hp, decay=self.decay, lr_max=self.lr_max, maximize=self.maximize,
                         device=device)

    def op_args(self, grads, hyper):
        return (self.params, grads, *self.states.values(), self.steps, hyper, *self.switches)

    def op(self):
        return getattr(torch.ops.fusedwd, f"{self.rule}_step_")

    def step_op(self, grads, hyper=None):
        self.op()(*self.op_args(grads, self.hyper() if hyper is None else hyper))

    def step_reference(self, grads):
        states = {state.name: self.states[state.name + "s"] for state in self.spec.states
                  if self.states[state.name + "s"]}
        self.spec.reference(self.group(), self.switches, self.params, grads, states, self.steps, reference.Precision())

    def tensors(self):
        """(name, tensor) of every parameter and used state."""
        out = [(f"param {k}", p) for k, p in enumerate(self.params)]
        for name, tensors in self.states.items():
            out += [(f"{name}[{k}]", t) for k, t in enumerate(tensors)]
        return out


def compare_every_step(a, b, steps, step_a, step_b):
    """Step a and b on the same gradients; params, states and step counts agree every step."""
    previous = {}
    for t in range(steps):
        grads = a.grads(t)
        step_a(grads)
        step_b([g.clone() for g in grads])
        for (name, x), (_, y) in zip(a.tensors(), b.tensors()):
            # a state may cancel towards zero: scale by the previous magnitude too
            assert_close(x.cpu(), y.cpu(), f"step {t} {name}", a.dtype, previous.get(name, 0.0))
            previous[name] = max_abs(y.cpu())
        assert [float(s) for s in a.steps] == [float(s) for s in b.steps], f"step {t}: step counts differ"


# ---------------------------------------------------------------- layout


def test_hyper_widths_match_the_kernel():
    import fusedwd._C as C

    assert ops.HP_COLS == {name: len(info["columns"]) for name, info in C.RULES.items()}


@pytest.mark.parametrize("rule", _rules.NAMES)
def test_schema_is_derived_from_the_rule(rule):
    """One list per state (mutated, its own alias set), one bool per switch, in the spec's order."""
    spec = rules.get(rule)
    schema = getattr(torch.ops.fusedwd, f"{rule}_step_").default._schema
    names = [a.name for a in schema.arguments]
    assert names == ["params", "grads", *[st.name + "s" for st in spec.states], "steps", "hyper",
                     *[sw.name for sw in spec.switches]]
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["params", *[st.name + "s" for st in spec.states], "steps"]
    sets = re.findall(r"Tensor\((\w+)!\)\[\]", str(schema))
    assert len(sets) == len(set(sets)) == len(mutated), str(schema)


@pytest.mark.parametrize("decay", ["decoupled", "independent", "l2"])
def test_hyper_rows_match_the_optimizers(decay):
    """ops.<rule>_hyper builds the row an optimizer builds for a group of the same numbers."""
    common = dict(lr=0.03, weight_decay=0.2, decay=decay, maximize=True)
    cases = [
        (AdamW, ops.adamw_hyper, dict(betas=(0.8, 0.9), eps=1e-6)),
        (SGDW, ops.sgdw_hyper, dict(momentum=0.9, dampening=0.1)),
        (RMSpropW, ops.rmspropw_hyper, dict(alpha=0.95, eps=1e-7, momentum=0.3)),
    ]
    for cls, build, extra in cases:
        opt = cls([torch.nn.Parameter(torch.ones(2))], **common, **extra)
        opt.param_groups[0]["lr_max"] = 0.1
        expected = cls.RULE.hyper_row(opt.param_groups[0])
        assert build(**common, **extra, lr_max=0.1).tolist() == expected, cls.__name__


# ---------------------------------------------------------------- opcheck


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rule,switches", CASES, ids=CASE_IDS)
def test_opcheck(rule, switches, dtype):
    prob = Problem(rule, switches, dtype, shapes=[(3,), (4, 5), (0,)])
    torch.library.opcheck(prob.op().default, prob.op_args(prob.grads(0), prob.hyper()))


# ---------------------------------------------------------------- results


@pytest.mark.parametrize("decay,maximize", [("decoupled", False), ("independent", True), ("l2", False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule,switches", CASES, ids=CASE_IDS)
def test_op_matches_reference(rule, switches, dtype, decay, maximize):
    kw = dict(decay=decay, maximize=maximize, lr_max=0.01)
    op, ref = Problem(rule, switches, dtype, **kw), Problem(rule, switches, dtype, **kw)
    compare_every_step(op, ref, 12, op.step_op, ref.step_reference)


@pytest.mark.parametrize("rule,switches", CASES, ids=CASE_IDS)
def test_strided_tensors_are_staged(rule, switches):
    """Transposed parameters and states are stepped through contiguous copies and written back."""
    shapes = [(7, 5), (64, 3)]
    op, ref = Problem(rule, switches, torch.float32, shapes), Problem(rule, switches, torch.float32, shapes)
    op.params = [p.t().contiguous().t() for p in op.params]
    op.states = {name: [t.t().contiguous().t() for t in ts] for name, ts in op.states.items()}
    assert not op.params[0].is_contiguous()
    compare_every_step(op, ref, 4, lambda g: op.step_op([x.t().contiguous().t() for x in g]), ref.step_reference)


def test_mixed_dtypes_in_one_call():
    """Tensors of different dtypes in one call: one kernel call per dtype, each right."""
    a32, r32 = (Problem("adamw", (True,), torch.float32, [(100,)], seed=3) for _ in range(2))
    a16, r16 = (Problem("adamw", (True,), torch.bfloat16, [(60,)], seed=4) for _ in range(2))
    for t in range(3):
        g32, g16 = a32.grads(t), a16.grads(t)
        st = {k: a32.states[k] + a16.states[k] for k in a32.states}
        torch.ops.fusedwd.adamw_step_(a32.params + a16.params, g32 + g16, *st.values(), a32.steps + a16.steps,
                                      a32.hyper(), True)
        r32.step_reference(g32)
        r16.step_reference(g16)
        for a, r in ((a32, r32), (a16, r16)):
            for (name, x), (_, y) in zip(a.tensors(), r.tensors()):
                assert_close(x, y, f"step {t} {name}", a.dtype, 4.0)


def test_empty_lists_are_a_no_op():
    torch.ops.fusedwd.sgdw_step_([], [], [], [], ops.sgdw_hyper(), True, False)
    torch.ops.fusedwd.adamw_step_([], [], [], [], [], [], ops.adamw_hyper(), True)


def test_strided_hyper_row():
    """A hyper row that is a strided view reads the same numbers."""
    a, b = (Problem("rmspropw", (True, True), torch.float32, [(50,)]) for _ in range(2))
    row = a.hyper()
    strided = torch.stack([row, torch.full_like(row, float("nan"))], dim=1)[:, 0]
    assert not strided.is_contiguous()
    grads = a.grads(0)
    a.step_op(grads, strided)
    b.step_op([g.clone() for g in grads], row)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a.tensors(), b.tensors()))


def test_bad_arguments_raise_value_error():
    prob = Problem("adamw", (False,), torch.float32, [(10,), (3,)])
    grads = prob.grads(0)
    hyper = prob.hyper()
    m, v = prob.states["exp_avgs"], prob.states["exp_avg_sqs"]
    bad_calls = [
        (prob.params, grads[:1], m, v, [], prob.steps, hyper, False),  # a missing gradient
        (prob.params, grads, m, v, [], prob.steps, hyper, True),  # amsgrad without max_exp_avg_sqs
        (prob.params, grads, m, v, [], prob.steps, hyper[:5], False),  # short hyper row
        (prob.params, grads, m, v, [], prob.steps, hyper.float(), False),  # float32 hyper row
        (prob.params, grads, m, v, [], [s.double() for s in prob.steps], hyper, False),  # float64 steps
        (prob.params, [g.double() for g in grads], m, v, [], prob.steps, hyper, False),  # gradient dtype
        (prob.params, grads, [t[:-1] for t in m], v, [], prob.steps, hyper, False),  # state shape
    ]
    before = [t.clone() for _, t in prob.tensors()]
    for args in bad_calls:
        with pytest.raises(ValueError):
            torch.ops.fusedwd.adamw_step_(*args)
    # nothing was touched by the rejected calls
    assert all(torch.equal(a, b) for a, (_, b) in zip(before, prob.tensors()))


def test_compiles_without_graph_breaks():
    """torch.compile traces a step through the op (fullgraph), lr as a tensor input."""
    compiled = torch.compile(
        lambda args: torch.ops.fusedwd.adamw_step_(*args), backend="aot_eager", fullgraph=True
    )
    a, r = (Problem("adamw", (True,), torch.float32, [(100,), (7, 3)]) for _ in range(2))
    for t, lr in enumerate((3e-3, 1e-3)):
        a.hp["lr"] = r.hp["lr"] = lr
        grads = a.grads(t)
        compiled(a.op_args(grads, a.hyper()))
        r.step_reference([g.clone() for g in grads])
        for (name, x), (_, y) in zip(a.tensors(), r.tensors()):
            assert_close(x, y, f"step {t} {name}", torch.float32, 4.0)
