"""The benchmark pipeline runs end to end (tiny shapes; no timing is asserted)."""

import pytest


def test_bench_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.smoke import run_smoke

    results = run_smoke(tmp_path)
    assert {c["name"] for c in results["cases"]} == {"mlp", "synthetic"}


def test_precision_bench_smoke(tmp_path):
    pytest.importorskip("fusedwd._C")
    from bench.precision import smoke

    result = smoke(str(tmp_path))
    names = {r["provider"] for r in result["rows"]}
    assert {"fusedwd-master", "fusedwd-clip", "torch-clip+fused", "torch-fused"} <= names
    assert all(r["median_ms"] > 0 and r["pct_of_floor"] > 0 for r in result["rows"])
    assert (tmp_path / "precision.json").stat().st_size > 0


def test_bench_threads_times_every_case_at_each_count(tmp_path, capsys):
    import torch

    from bench import providers, report
    from bench.run import parse_args, run

    before = torch.get_num_threads()
    args = parse_args(["--quick", "--sizes", "mlp", "--scale", "0.01", "--repeats", "2", "--warmup", "1",
                       "--threads", "1,2", "--optimizers", "fusedwd-cpu,torch-fused,floor", "--no-progress",
                       "--no-plot", "--out", str(tmp_path)])
    results = run(args, command=["test"])
    assert [(c["name"], c["threads"]) for c in results["cases"]] == [("mlp", 1), ("mlp", 2)]
    assert torch.get_num_threads() == before  # the run restores torch's count
    out = capsys.readouterr().out
    assert "mlp @1" in out and "mlp @2" in out
    scaling = report.scaling_table(results)
    assert "2/1 speedup" in scaling and providers.FLOOR in scaling and "torch-fused" in scaling
    with pytest.raises(SystemExit):
        parse_args(["--threads", "0"])


def test_deepspeed_provider_is_skipped_with_its_reason_or_runs(tmp_path):
    import torch

    from bench import providers
    from bench.run import default_providers

    names, why = default_providers(torch.device("cpu"))
    missing = providers.deepspeed_missing(torch.device("cpu"))
    if missing:
        assert providers.DEEPSPEED not in names and missing in why
        return
    assert providers.DEEPSPEED in names
    base, grads = providers.make_base([(300,), (7, 5)], torch.float32, torch.device("cpu"))
    provider = providers.deepspeed_adamw(base, grads, amsgrad=False)
    provider.step()
    # AdamW's first step moves every element by about lr: the provider really steps
    params = provider.step.__self__.param_groups[0]["params"]
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, base))


@pytest.mark.parametrize("rule", ["LAMB", "StableAdamW"])
def test_pure_torch_two_phase_provider_matches_the_reference(rule):
    # the bench's pure-torch rule is the rule: fusedwd's reference, step after step, to rounding
    # (it forms the update in another order: r by a reciprocal, the sums by torch._foreach_norm)
    import torch

    import fusedwd
    from bench import providers

    from _helpers import assert_close

    shapes = [(1,), (4097,), (33, 65), (6, 42, 12)]
    base, grads = providers.make_base(shapes, torch.float32, torch.device("cpu"), seed=3)
    gen = torch.Generator().manual_seed(5)
    hyper = dict(providers.TWO_PHASE_HYPERPARAMETERS[rule], lr=1e-2)
    ours = providers.FOREACH_RULES[rule](providers._copy_params(base, grads), **hyper)
    ref_params = providers._copy_params(base, grads)
    ref = getattr(fusedwd, rule)(ref_params, backend="reference", **hyper)
    clipped = 0
    for t in range(8):
        # gradients that grow: StableAdamW's RMS exceeds 1 and its clipping acts
        new = [torch.randn(s, generator=gen) * 1e-3 * (1 + t) ** 2 for s in shapes]
        for p, q, g in zip(ours.params, ref_params, new):
            p.grad, q.grad = g, g.clone()
        if rule == "StableAdamW":
            v_hat = [(0.99 * v + 0.01 * g * g) / (1 - 0.99 ** (t + 1)) for v, g in zip(ours.v, new)]
            clipped += sum(bool((g * g / vh.clamp_min(1e-12)).mean() > 1) for g, vh in zip(new, v_hat))
        ours.step()
        ref.step()
        for k, (p, q) in enumerate(zip(ours.params, ref_params)):
            assert_close(p.detach(), q.detach(), f"{rule} step {t}: parameter {k}", scale=1.0)
            assert_close(ours.m[k], ref.state[q]["exp_avg"], f"{rule} step {t}: exp_avg {k}")
            assert_close(ours.v[k], ref.state[q]["exp_avg_sq"], f"{rule} step {t}: exp_avg_sq {k}")
    if rule == "StableAdamW":
        assert clipped > 0, "the clipping never acted: the test would not see its RMS"
