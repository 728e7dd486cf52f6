"""fusedwd under FSDP2 (``fully_shard``, DTensor parameters): 2 processes, gloo, loopback, bounded time.

One pair of ranks per backend runs every scenario in turn and writes full
(gathered) parameters, states and state_dict layouts to a file; the tests below
read that file. The model's shapes shard unevenly over 2 ranks (33 rows: 17 and
16; 5: 3 and 2) and one parameter of a single row leaves rank 1 an empty shard.

The two-phase rules (LAMB, StableAdamW) sum over each whole tensor: their runs
also step with the cross-rank reduction disabled (and StableAdamW with the
shard's element count for its mean), to show the comparison catches it.
"""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedwd
from fusedwd.groups import param_groups

from _helpers import assert_close

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
STEPS = 6
SPLIT = 3  # the checkpoint runs save after SPLIT steps and resume for the rest
BATCH = 16
TIMEOUT_S = 120
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-7, amsgrad=True)
STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
TWO_PHASE = ("LAMB", "StableAdamW")
TWO_PHASE_STATES = ("exp_avg", "exp_avg_sq")
TRITON_STEPS = 3  # the Triton runs step in Triton's interpreter


def _growth(t: int) -> float:
    """A loss scale that grows each step: gradients larger than v remembers, so StableAdamW's RMS
    exceeds 1 and its per-tensor clipping (a mean over the whole tensor) acts."""
    return float((1 + t) ** 2)


class _Gain(torch.nn.Module):
    """A (1, n) parameter: sharded on dim 0 over 2 ranks, rank 1 holds none of it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(1.0 + 0.5 * torch.randn(1, n))

    def forward(self, x):
        return x * self.weight


def _model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 33), torch.nn.LayerNorm(33), torch.nn.GELU(), torch.nn.Linear(33, 5), _Gain(5)
    )


def _batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 12, generator=gen), torch.randint(0, 5, (BATCH,), generator=gen)


def _fusedwd(model, backend, **kwargs):
    return fusedwd.AdamW(param_groups(model, weight_decay=0.1), **HYPER, backend=backend, **kwargs)


def _lion(model, backend):
    return fusedwd.Lion(param_groups(model, weight_decay=0.5), lr=1e-3, betas=(0.9, 0.95), backend=backend)


def _two_phase(name, model, backend):
    groups = param_groups(model, weight_decay=0.1)
    if name == "LAMB":  # always_adapt: the trust ratio scales the biases, norms and the empty shard's tensor too
        return fusedwd.LAMB(groups, lr=1e-2, betas=(0.9, 0.99), always_adapt=True, backend=backend)
    if name == "StableAdamW":
        return fusedwd.StableAdamW(groups, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, backend=backend)
    # AdamW with StableAdamW's numbers: where they differ, StableAdamW's clipping acted
    return fusedwd.AdamW(groups, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, backend=backend)


def _train(model, opt, steps, rank=None, scale=None) -> None:
    """Steps on the global batch; with ``rank``, on this rank's half (FSDP averages the halves)."""
    for t in steps:
        x, y = _batch(t)
        if rank is not None:
            half = BATCH // WORLD
            x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        (loss if scale is None else loss * scale(t)).backward()
        opt.step()


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()


def _gathered(model, opt) -> dict:
    """Full parameters and states (collectives: every rank calls this)."""
    params = [_full(p) for p in model.parameters()]
    states = [{k: _full(v) for k, v in opt.state[p].items()} for p in model.parameters()]
    return {"params": params, "states": states}


def _single_process(backend: str, steps) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = _fusedwd(model, backend)
    _train(model, opt, steps)
    return model, opt


def _scenarios(rank: int, out_dir: str, backend: str) -> dict:
    """Every scenario on this rank; rank 0's dict is the results file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    def sharded(model, per_layer=True):
        if per_layer:
            for layer in model:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer)
        fully_shard(model)
        return model

    def layout(model, opt) -> dict:
        """fqn -> state name -> (type, placements, global shape), as get_optimizer_state_dict gives it."""
        osd = get_optimizer_state_dict(model, opt)
        return {
            fqn: {k: (type(v).__name__, tuple(map(str, v.placements)) if isinstance(v, DTensor) else None,
                      tuple(v.shape)) for k, v in st.items()}
            for fqn, st in osd["state"].items()
        }

    out = {}
    # (a) one fused optimizer, however the modules are wrapped, and torch's AdamW on the same shards
    model = sharded(_model())
    opt = _fusedwd(model, backend)
    _train(model, opt, range(STEPS), rank)
    out["per_layer"] = _gathered(model, opt)
    out["layout"] = layout(model, opt)
    out["param_placements"] = {n: tuple(map(str, p.placements)) for n, p in model.named_parameters()}
    in_order = [p for group in opt.param_groups for p in group["params"]]  # state_dict's numbering
    out["state_types"] = [
        {k: (type(v).__name__, v.device_mesh == p.device_mesh and tuple(v.placements) == tuple(p.placements)
             and v.shape == p.shape if isinstance(v, DTensor) else None)
         for k, v in opt.state_dict()["state"][i].items()}
        for i, p in enumerate(in_order)
    ]

    root = sharded(_model(), per_layer=False)
    opt_root = _fusedwd(root, backend)
    _train(root, opt_root, range(STEPS), rank)
    out["root_only"] = _gathered(root, opt_root)

    ref = sharded(_model())
    opt_ref = torch.optim.AdamW(param_groups(ref, weight_decay=0.1), **HYPER)
    _train(ref, opt_ref, range(STEPS), rank)
    out["torch"] = _gathered(ref, opt_ref)
    out["torch_layout"] = layout(ref, opt_ref)

    # (b) distributed checkpoint after SPLIT steps, resumed in a fresh model and optimizer
    ckpt = os.path.join(out_dir, "checkpoint")
    model = sharded(_model())
    opt = _fusedwd(model, backend)
    _train(model, opt, range(SPLIT), rank)
    # the same states, replicated instead of sharded (a collective: taken before saving, on every rank)
    replicated = opt.state_dict()
    replicated["state"] = {
        i: {k: v.redistribute(v.device_mesh, [Replicate()]) if isinstance(v, DTensor) else v.clone()
            for k, v in st.items()}
        for i, st in replicated["state"].items()
    }
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=ckpt)
    model = sharded(_model(seed=1))  # other weights: the load must replace them
    opt = _fusedwd(model, backend)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    # replicated states load into sharded parameters (each rank keeps its shard)
    model_r = sharded(_model(seed=1))
    set_model_state_dict(model_r, sd["model"])  # before training: sd holds the resumed model's own tensors
    opt_r = _fusedwd(model_r, backend)
    opt_r.load_state_dict(replicated)
    _train(model, opt, range(SPLIT, STEPS), rank)
    out["resumed"] = _gathered(model, opt)
    _train(model_r, opt_r, range(SPLIT, STEPS), rank)
    out["from_replicated"] = _gathered(model_r, opt_r)

    # a gradient that is not sharded like its parameter: a clear error, and no state written
    bad_grads = {"plain": lambda p: torch.zeros(p.shape),
                 "replicated": lambda p: torch.randn_like(p).redistribute(p.device_mesh, [Replicate()])}
    out["bad_grad_errors"] = {}
    last = opt.param_groups[-1]["params"][-1]  # the bucket's last parameter: the others are gathered first
    for kind, make in bad_grads.items():
        before = _gathered(model, opt)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        last.grad = make(last)
        try:
            opt.step()
            message = None
        except RuntimeError as e:
            message = str(e)
        after = _gathered(model, opt)
        untouched = all(torch.equal(a, b) for a, b in zip(before["params"], after["params"])) and all(
            torch.equal(sa[k], sb[k]) for sa, sb in zip(before["states"], after["states"]) for k in sa
        )
        out["bad_grad_errors"][kind] = (message, untouched)

    # an unsharded checkpoint (plain tensors) resumes under FSDP2
    single, opt_single = _single_process(backend, range(SPLIT))
    model = _model()
    model.load_state_dict(single.state_dict())
    model = sharded(model)
    opt = _fusedwd(model, backend)
    opt.load_state_dict(opt_single.state_dict())
    _train(model, opt, range(SPLIT, STEPS), rank)
    out["from_unsharded"] = _gathered(model, opt)

    # torch's get_optimizer_state_dict steps a fresh optimizer once with lr=0 and zero gradients
    out["init_changes"] = {}
    for decay in ("decoupled", "independent", "l2"):
        model = sharded(_model())
        opt = _fusedwd(model, backend, decay=decay)
        before = [p.to_local().clone() for p in model.parameters()]
        get_optimizer_state_dict(model, opt)
        change = torch.tensor(max(
            (p.to_local() - b).abs().max().item() if b.numel() else 0.0
            for p, b in zip(model.parameters(), before)
        ))
        dist.all_reduce(change, op=dist.ReduceOp.MAX)  # both ranks' shards
        out["init_changes"][decay] = change.item()

    try:
        _fusedwd(model, backend, flat_grads=True)
        out["flat_grads_error"] = None
    except ValueError as e:
        out["flat_grads_error"] = str(e)

    # (h) every rule steps DTensor shards the same way: Lion, per-layer sharding
    model = sharded(_model())
    opt = _lion(model, backend)
    _train(model, opt, range(STEPS), rank)
    out["lion"] = _gathered(model, opt)

    # (i) the two-phase rules: each tensor's sums added over the ranks between the phases
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial

    from fusedwd.optim import _dtensor

    out["two_phase"], out["two_phase_errors"] = {}, {}
    variants = {"reduced": {}, "unreduced": {"reduce_sums": lambda sums, over: None},
                "shard_count": {"sum_scale": lambda rule, bucket: torch.ones(len(bucket.params), len(rule.sums),
                                                                            dtype=torch.float64)}}
    for name in TWO_PHASE:
        for variant, patches in variants.items():
            if variant == "shard_count" and name != "StableAdamW":
                continue  # LAMB's sums are no means
            saved = {attr: getattr(_dtensor, attr) for attr in patches}
            for attr, fake in patches.items():
                setattr(_dtensor, attr, fake)
            try:
                model = sharded(_model())
                opt = _two_phase(name, model, backend)
                _train(model, opt, range(STEPS), rank, scale=_growth)
                out["two_phase"][name, variant] = _gathered(model, opt)
            except ValueError as e:  # the reference backend refuses sharded parameters
                out["two_phase_errors"][name, variant] = str(e)
            finally:
                for attr, real in saved.items():
                    setattr(_dtensor, attr, real)
    # parameters whose sums cannot be added over the ranks: a Partial() placement, and elements
    # split over two mesh dimensions
    mesh, mesh2 = init_device_mesh("cpu", (WORLD,)), init_device_mesh("cpu", (1, WORLD))
    odd = {"partial": DTensor.from_local(torch.randn(4, 3), mesh, [Partial()], run_check=False),
           "two_dims": DTensor.from_local(torch.randn(4, 3), mesh2, [Shard(0), Shard(1)], run_check=False)}
    # other placements whose shards split the elements: columns (Shard(1)), and HSDP's
    # (Replicate(), Shard(0)) on a 2-D mesh (added over its second dimension only); the same
    # gradients as one process, so only the sums' association differs
    out["placements"] = {}
    # (with the ranks on the replicated dimension, adding over it would double StableAdamW's mean)
    splits = {"shard1": (mesh, [Shard(1)]), "hsdp": (mesh2, [Replicate(), Shard(0)]),
              "hsdp_replicas": (init_device_mesh("cpu", (WORLD, 1)), [Replicate(), Shard(0)])}
    for kind, (on, placements) in splits.items():
        gen = torch.Generator().manual_seed(7)
        full = [torch.randn(9, 130, generator=gen), torch.randn(5, 3, generator=gen)]
        grads = [[torch.randn(t.shape, generator=gen) for t in full] for _ in range(3)]
        for name in TWO_PHASE:
            got = [torch.nn.Parameter(distribute_tensor(t, on, placements)) for t in full]
            want = [torch.nn.Parameter(t.clone()) for t in full]
            opts = [getattr(fusedwd, name)(ps, lr=1e-2, weight_decay=0.1, backend=backend if ps is want else "cpu")
                    for ps in (got, want)]
            for step_grads in grads:
                for p, q, g in zip(got, want, step_grads):
                    p.grad, q.grad = distribute_tensor(g, on, placements), g.clone()
                for opt in opts:
                    opt.step()
            out["placements"][kind, name] = ([p.full_tensor() for p in got], [q.detach() for q in want])
    out["placement_errors"] = {}
    for kind, value in odd.items():
        p = torch.nn.Parameter(value)
        p.grad = torch.ones_like(p)
        try:
            fusedwd.LAMB([p], backend="cpu").step()
            out["placement_errors"][kind] = None
        except ValueError as e:
            out["placement_errors"][kind] = str(e)

    return out


def _two_phase_scenarios(rank: int, out_dir: str) -> dict:
    """LAMB and StableAdamW under FSDP2 on the Triton kernels (the interpreter, CPU tensors: the
    parent set TRITON_INTERPRET=1) and on the CPU kernel, and on Triton with the reduction disabled."""
    from torch.distributed.fsdp import fully_shard

    from fusedwd.optim import _dtensor

    out = {}
    for name in TWO_PHASE:
        for backend, variant in (("triton", "reduced"), ("cpu", "reduced"), ("triton", "unreduced"),
                                 ("triton", "no_norm_grads"), ("cpu", "no_norm_grads")):
            saved = _dtensor.reduce_sums
            if variant == "unreduced":
                _dtensor.reduce_sums = lambda sums, over: None
            try:
                model = _model()
                for layer in model:
                    if any(True for _ in layer.parameters()):
                        fully_shard(layer)
                fully_shard(model)
                opt = _two_phase(name, model, backend)
                if variant == "no_norm_grads":
                    # the LayerNorm's parameters without gradients: the bucket's other rows are
                    # placed by parameter index around the collective
                    for p in model[1].parameters():
                        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
                _train(model, opt, range(TRITON_STEPS), rank, scale=_growth)
                out[name, backend, variant] = _gathered(model, opt)
            finally:
                _dtensor.reduce_sums = saved
    return out


def _in_rank(rank: int, out_dir: str, scenarios, *args) -> None:
    """A spawned rank: join the gloo group, run ``scenarios(rank, out_dir, *args)``, rank 0 writes its dict to
    results.pt; a failure goes to error<rank>.txt and a nonzero exit code."""
    try:
        torch.set_num_threads(1)
        store = "file://" + os.path.join(out_dir, "rendezvous")
        dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD)
        out = scenarios(rank, out_dir, *args)
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "results.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    # as in test_distributed.py: gloo's threads can abort at interpreter exit after the results are written
    os._exit(0)


def _worker(rank: int, backend: str, out_dir: str) -> None:
    _in_rank(rank, out_dir, _scenarios, backend)


def _two_phase_worker(rank: int, out_dir: str) -> None:
    _in_rank(rank, out_dir, _two_phase_scenarios)


def _spawn(worker, args, out_dir, what: str) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, *args, str(out_dir))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail(f"FSDP2 ({what}): a rank did not finish within {TIMEOUT_S} s")
    errors = [f.read_text() for f in out_dir.glob("error*.txt")]
    codes = [p.exitcode for p in procs]
    assert not errors and codes == [0] * WORLD, f"exit codes {codes}\n" + "\n".join(errors)


@pytest.fixture(scope="module", params=["cpu", "reference"])
def run(request, tmp_path_factory):
    backend = request.param
    if backend == "cpu" and "cpu" not in fusedwd.available_backends("cpu"):
        pytest.skip("fusedwd._C is not built")
    out_dir = tmp_path_factory.mktemp(f"fsdp_{backend}")
    _spawn(_worker, (backend,), out_dir, backend)
    model, opt = _single_process(backend, range(STEPS))
    single = {
        "params": [p.detach().clone() for p in model.parameters()],
        "states": [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
    }
    model = _model()
    opt = _lion(model, backend)
    _train(model, opt, range(STEPS))
    single["lion"] = {
        "params": [p.detach().clone() for p in model.parameters()],
        "states": [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
    }
    for name in (*TWO_PHASE, "AdamW"):
        model = _model()
        opt = _two_phase(name, model, backend)
        _train(model, opt, range(STEPS), scale=_growth)
        single[name] = {
            "params": [p.detach().clone() for p in model.parameters()],
            "states": [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
        }
    return backend, torch.load(out_dir / "results.pt"), single


def _assert_same_run(got: dict, expected: dict, what: str, exact: bool = False, states=STATES) -> None:
    for k, (a, b) in enumerate(zip(got["params"], expected["params"], strict=True)):
        if exact:
            assert torch.equal(a, b), f"{what}: parameter {k} differs"
        else:
            # reduce-scatter sums the halves in another order than one process does: a few ulps per step
            assert_close(a, b, f"{what}: parameter {k}", scale=1.0)
    for k, (sa, sb) in enumerate(zip(got["states"], expected["states"], strict=True)):
        assert set(sa) == set(sb) == {"step", *states}, f"{what}: parameter {k} states {set(sa)} vs {set(sb)}"
        assert float(sa["step"]) == float(sb["step"]) == STEPS, f"{what}: parameter {k} step count"
        for name in states:
            if exact:
                assert torch.equal(sa[name], sb[name]), f"{what}: parameter {k} state {name} differs"
            else:
                assert_close(sa[name], sb[name], f"{what}: parameter {k} state {name}", scale=1.0)


def test_matches_unsharded_whatever_the_wrapping(run):
    _, out, single = run
    _assert_same_run(out["per_layer"], single, "fully_shard per layer + root vs one process")
    _assert_same_run(out["root_only"], single, "fully_shard on the root only vs one process")


def test_lion_matches_unsharded(run):
    # the rule does not matter to the sharding: Lion's exp_avg shards like AdamW's states
    _, out, single = run
    got, expected = out["lion"], single["lion"]
    for k, (sa, sb) in enumerate(zip(got["states"], expected["states"], strict=True)):
        assert set(sa) == set(sb) == {"step", "exp_avg"}, f"parameter {k}: states {set(sa)}"
        # a sign update flips by a whole lr where a reduction's last bit flips a tiny direction:
        # compare the momentum, which carries no sign, and the parameters within a few lr
        assert_close(sa["exp_avg"], sb["exp_avg"], f"Lion under FSDP2: exp_avg {k}", scale=1.0)
    lr = 1e-3
    for k, (a, b) in enumerate(zip(got["params"], expected["params"], strict=True)):
        diff = (a - b).abs()
        assert diff.max() <= 2 * lr * STEPS + 1e-6, f"Lion under FSDP2: parameter {k} beyond a flip per step"
        assert (diff > 1e-6).float().mean() <= 0.01, f"Lion under FSDP2: parameter {k}: more than 1% flipped"


def test_matches_torch_adamw_under_fsdp2(run):
    _, out, _ = run
    _assert_same_run(out["per_layer"], out["torch"], "fusedwd vs torch.optim.AdamW, both under FSDP2")


def test_states_are_dtensors_sharded_like_their_parameters(run):
    _, out, _ = run
    for k, types in enumerate(out["state_types"]):
        assert types["step"] == ("Tensor", None), f"parameter {k}: step is {types['step']}"  # torch's layout
        for name in STATES:
            assert types[name] == ("DTensor", True), f"parameter {k}: {name} is {types[name]}"
    # get_optimizer_state_dict sees torch.optim.AdamW's structure: names, types, placements, shapes
    assert out["layout"] == out["torch_layout"]
    for fqn, states in out["layout"].items():
        for name in STATES:
            assert states[name][1] == out["param_placements"][fqn], (fqn, name)


def test_distributed_checkpoint_round_trip(run):
    _, out, _ = run
    # the same operations on the same numbers: identical to the uninterrupted run
    _assert_same_run(out["resumed"], out["per_layer"], "dcp.save + dcp.load mid-run vs uninterrupted", exact=True)


def test_replicated_states_load_into_sharded_parameters(run):
    _, out, _ = run
    _assert_same_run(out["from_replicated"], out["per_layer"], "Replicate() states loaded mid-run", exact=True)


def test_gradient_sharded_otherwise_than_its_parameter_is_an_error(run):
    _, out, _ = run
    message, untouched = out["bad_grad_errors"]["plain"]
    assert message is not None and "is a DTensor, but its gradient is a Tensor" in message, message
    assert untouched
    message, untouched = out["bad_grad_errors"]["replicated"]
    assert message is not None and "but its gradient as (Replicate(),)" in message, message
    assert untouched


def test_unsharded_checkpoint_resumes_under_fsdp2(run):
    _, out, single = run
    _assert_same_run(out["from_unsharded"], single, "a plain state_dict loaded into FSDP2 vs one process")


def test_get_optimizer_state_dict_initialization_leaves_parameters(run):
    _, out, _ = run
    assert out["init_changes"] == {"decoupled": 0.0, "independent": 0.0, "l2": 0.0}


def test_flat_grads_rejects_dtensor_parameters(run):
    _, out, _ = run
    assert out["flat_grads_error"] is not None and "flat_grads" in out["flat_grads_error"]


@pytest.mark.parametrize("name", TWO_PHASE)
def test_two_phase_rules_match_unsharded(run, name):
    # each rank sums its shard of every tensor; the bucket's sums are added over the ranks (one
    # all-gather, in rank order) between the kernel's phases. Not bitwise: FSDP2's reduce-scatter
    # already sums the gradients' halves in another order (as for AdamW above), and the two ranks'
    # partial sums are added as two terms where one process adds the tensor's chunk sums in one
    # sequence (docs/design.md#per-tensor-reductions)
    backend, out, single = run
    if backend == "reference":
        # the reference sums inside each tensor's step: it refuses sharded parameters of these rules
        message = out["two_phase_errors"][name, "reduced"]
        assert "is a sharded DTensor (FSDP2)" in message and "backend='cpu'" in message, message
        return
    _assert_same_run(out["two_phase"][name, "reduced"], single[name], f"{name} under FSDP2 vs one process",
                     states=TWO_PHASE_STATES)


@pytest.mark.parametrize("name", TWO_PHASE)
def test_two_phase_rules_unreduced_sums_train_differently(run, name):
    # the failure the reduction prevents: a shard's own sums give another step, and the comparison
    # above catches it (the same runs, the reduction disabled in the ranks)
    backend, out, single = run
    if backend == "reference":
        pytest.skip("the reference refuses sharded parameters of a two-phase rule")
    with pytest.raises(AssertionError):
        _assert_same_run(out["two_phase"][name, "unreduced"], single[name], f"{name}, shard sums",
                         states=TWO_PHASE_STATES)


def test_stableadamw_mean_is_over_the_whole_tensor(run):
    # StableAdamW's RMS is a mean: its added sum over the tensor's numel, not the shard's
    backend, out, single = run
    if backend == "reference":
        pytest.skip("the reference refuses sharded parameters of a two-phase rule")
    # its clipping acted in these runs: AdamW with the same numbers ends elsewhere
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-6)
               for a, b in zip(single["StableAdamW"]["params"], single["AdamW"]["params"]))
    with pytest.raises(AssertionError):
        _assert_same_run(out["two_phase"]["StableAdamW", "shard_count"], single["StableAdamW"],
                         "StableAdamW, the shard's count", states=TWO_PHASE_STATES)


def test_two_phase_rules_refuse_sums_they_cannot_add(run):
    _, out, _ = run
    partial, two_dims = out["placement_errors"]["partial"], out["placement_errors"]["two_dims"]
    assert partial is not None and "(Partial(sum),)" in partial and "holds addends" in partial, partial
    assert two_dims is not None and "split over several mesh dimensions" in two_dims, two_dims
    assert "LAMB: parameter 0 of param group 0" in partial, partial


@pytest.mark.parametrize("name", TWO_PHASE)
@pytest.mark.parametrize("kind", ["shard1", "hsdp", "hsdp_replicas"])
def test_two_phase_rules_on_other_splits(run, kind, name):
    # Shard(1) splits each row; HSDP replicates over one mesh dimension and shards over the other:
    # the sums are added over the sharding dimension only (over both, each would count twice)
    _, out, _ = run
    got, want = out["placements"][kind, name]
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_close(a, b, f"{name}, {kind}: parameter {k}", scale=1.0)


@pytest.fixture(scope="module")
def triton_run(tmp_path_factory):
    from _helpers import interpreted_triton

    with interpreted_triton() as why:
        if why is not None:
            pytest.skip(why)
        if "cpu" not in fusedwd.available_backends("cpu"):
            pytest.skip("fusedwd._C is not built")
        out_dir = tmp_path_factory.mktemp("fsdp_triton")
        _spawn(_two_phase_worker, (), out_dir, "triton")  # the ranks inherit TRITON_INTERPRET=1
    return torch.load(out_dir / "results.pt")


@pytest.mark.parametrize("name", TWO_PHASE)
def test_two_phase_rules_on_triton_add_the_sums_over_the_ranks(triton_run, name):
    # the Triton runner adds its launch buffer's segment sums over the ranks between its two launches
    # with the CPU runner's collective; each rank's sums are the CPU kernel's bits, so the runs agree
    # bit for bit, and without the reduction they do not
    reduced, cpu = triton_run[name, "triton", "reduced"], triton_run[name, "cpu", "reduced"]
    for k, (a, b) in enumerate(zip(reduced["params"], cpu["params"], strict=True)):
        assert torch.equal(a, b), f"{name}: parameter {k} differs between the Triton and CPU kernels under FSDP2"
    for k, (sa, sb) in enumerate(zip(reduced["states"], cpu["states"], strict=True)):
        assert float(sa["step"]) == float(sb["step"]) == TRITON_STEPS
        for state in TWO_PHASE_STATES:
            assert torch.equal(sa[state], sb[state]), f"{name}: parameter {k} state {state}"
    partial, partial_cpu = triton_run[name, "triton", "no_norm_grads"], triton_run[name, "cpu", "no_norm_grads"]
    for k, (a, b) in enumerate(zip(partial["params"], partial_cpu["params"], strict=True)):
        assert torch.equal(a, b), f"{name}, some parameters without gradients: parameter {k} differs"
    assert all(not st for st in partial["states"][2:4]), "the LayerNorm's parameters were never stepped"
    unreduced = triton_run[name, "triton", "unreduced"]
    assert any(not torch.equal(a, b) for a, b in zip(unreduced["params"], cpu["params"])), \
        "the shards' own sums must step otherwise"
