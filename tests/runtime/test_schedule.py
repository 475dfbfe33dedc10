"""Searched static schedules (docs/methods.md section 12): ScheduleConfig and its policy,
the proxy of the schedule search, and the search itself.

* the config: validation, derived fields, dict round trip, ``from_steps``;
* a uniform-order plan is bitwise TaylorSeer with the same ``compute_steps`` (every
  family); a mixed-order plan forecasts each step with its own order (fixed inputs per
  step, so the history is the same whatever the plan: step s equals the uniform plan of
  its order);
* the step announced by the caller (planned on the host) gives bitwise the device
  schedule's outputs and timeline (every family); 0 host reads eager; under
  torch.compile(fullgraph) no cond, no recompilation across steps and runs, and 0 host
  reads from fastcache or inductor's generated code under inductor;
* the proxy: its error of a plan equals the teacher-forced error of the real
  taylor ops on recorded features; the DP is the optimum of the proxy (brute force);
* the search: budget met, the plan replays exactly, stored in the profile and loaded
  back; refusals with clear messages.
"""

import contextlib
import itertools
import math

import pytest
import torch
from support import direct_inputs
from support.hostreads import HostReadMode
from support.zoo import CASES, CORE, reference_dit_case
from torch._dynamo.testing import CompileCounterWithBackend

import fastcache
from fastcache import ScheduleConfig, ops
from fastcache.tuning import schedule_proxy as proxy
from fastcache.tuning.schedule_search import evaluate_schedule


# ----------------------------------------------------------------------------- config
def test_config_validation_and_fields():
    c = ScheduleConfig(plan="cc1C20c1")
    assert c.plan == "CC1C20C1" and c.num_steps == 8 and c.budget == 4 and c.order == 2
    assert c.compute_steps == (0, 1, 3, 6)
    assert [c.computes(s) for s in range(10)] == [True, True, False, True, False, False, True, False, True, True]
    assert [c.order_at(s) for s in range(8)] == [0, 0, 1, 0, 2, 0, 0, 1]
    assert fastcache.CacheConfig.from_dict(c.to_dict()) == c
    assert ScheduleConfig.from_steps((0, 2, 5), 7, order=2).plan == "C2C22C2"
    for bad, msg in (
        ("", "non-empty"),
        ("1CC", "must start with 'C'"),
        ("CX1", "holds 'X'"),
        ("C15", "holds '5'"),
        (None, "non-empty"),
    ):
        with pytest.raises(ValueError, match=msg):
            ScheduleConfig(plan=bad)
    with pytest.raises(ValueError, match="lie in"):
        ScheduleConfig.from_steps((0, 9), 5)
    assert ScheduleConfig(plan="C").order == 0  # all computed


def test_mixed_orders_forecast_each_step_with_its_own_order():
    """Fixed inputs per step: the computed steps see the same inputs whatever the plan,
    so the history is the same, and a step forecast with order k equals the uniform
    order-k plan at that step."""
    m = reference_dit_case().model
    y = torch.tensor([1, 2])
    xs, ts = direct_inputs(9)
    plan = "CC1C20C21"
    outs = {}
    with torch.no_grad():
        for p in [plan] + [ScheduleConfig.from_steps((0, 1, 3, 6), 9, k).plan for k in (0, 1, 2)]:
            with fastcache.patched(m, ScheduleConfig(plan=p)):
                outs[p] = [m(x, t, y) for x, t in zip(xs, ts)]
    for s, c in enumerate(plan):
        ref = outs[ScheduleConfig.from_steps((0, 1, 3, 6), 9, 0 if c == "C" else int(c)).plan][s]
        assert torch.equal(outs[plan][s], ref), s
    assert not torch.equal(outs[plan][4], outs["CC1C11C11"][4])  # order 2 differs from order 1


@pytest.mark.parametrize("name", sorted(CORE))
def test_uniform_plan_is_taylorseer_and_the_planned_step_equals_the_device_step(name):
    case = CASES[name]()
    m = case.model
    cs = (0, 1, 3, 6)
    with fastcache.patched(m, fastcache.TaylorSeerConfig(compute_steps=cs, order=1)):
        ts = case.sample(steps=8)
    with fastcache.patched(m, ScheduleConfig.from_steps(cs, 8, 1)):
        uni = case.sample(steps=8)
    assert torch.equal(uni, ts)
    plan = "CC1C20C1"
    with fastcache.patched(m, ScheduleConfig(plan=plan)):
        dev = case.sample(steps=8)
        tl_dev = fastcache.stats(m)["contexts"]["default"]["timeline"]
    with fastcache.patched(m, ScheduleConfig(plan=plan)):
        host = case.sample(steps=8, context=lambda i: fastcache.context(m, "default", step_index=i))
        st = fastcache.stats(m)["contexts"]["default"]
    assert torch.equal(host, dev)
    assert tl_dev == st["timeline"] == [c == "C" for c in plan]
    assert st["computed"] == 4 and st["skipped"] == 4 and st["plan"] == plan
    assert not torch.equal(dev, uni)


def test_host_reads_planned_none_device_one_flag_per_step():
    case = reference_dit_case()
    m = case.model
    for announce, expected in ((True, 0), (False, 8)):
        with fastcache.patched(m, ScheduleConfig(plan="CC1C20C1")):
            mode = HostReadMode()
            ctx = (lambda i: fastcache.context(m, "default", step_index=i)) if announce else None
            with mode:
                case.sample(steps=8, context=ctx)
        ours = [r for r in mode.reads if r is not None]
        assert len(ours) == expected, ours


@pytest.mark.compile
@pytest.mark.parametrize("name", ["diffusers-flux", "fastcache-dit"])
def test_compiled_planned_steps_no_cond_no_recompiles(name):
    """The host-planned steps compiled. What is the family's in these graphs (its blocks'
    interior programs run by the TraceExecutor to compute and store the Taylor history, or from
    a forecast) is what TaylorSeer's device step traces in its two cond branches, compiled on
    every core family by tests/runtime/test_taylorseer.py; the planned path's own code (the
    Python branch on the host's decision, the order as a device value) is the same for every
    family: here on the reference DiT and on Flux (two streams, two block lists)."""
    case = CASES[name]()
    m = case.model
    ctx = lambda i: fastcache.context(m, "default", step_index=i)  # noqa: E731
    with fastcache.patched(m, ScheduleConfig(plan="CC1C20C1")):
        eager = case.sample(steps=8, context=ctx)
        fastcache.reset(m)
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(m, fullgraph=True, backend=cnt)
        frames = []
        mode = HostReadMode()
        count = lambda i, o: frames.append(cnt.frame_count)  # noqa: E731
        with mode:
            out = case.sample(model=compiled, steps=8, context=ctx, per_step=count)
            case.sample(model=compiled, steps=8, context=ctx, per_step=count)
        tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
    # the first call (allocates the history), a computed step, a forecast step: 3 graphs
    assert max(frames) == 3 and frames[2:] == [3] * 14, frames
    assert not mode.conds
    assert tl == [c == "C" for c in "CC1C20C1"] * 2
    assert torch.equal(out, eager)


@pytest.mark.compile
def test_inductor_planned_steps_read_nothing():
    case = reference_dit_case()
    m = case.model
    ctx = lambda i: fastcache.context(m, "default", step_index=i)  # noqa: E731
    with fastcache.patched(m, ScheduleConfig(plan="CC1C20C1")):
        eager = case.sample(steps=8, context=ctx)
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True)
        case.sample(model=compiled, steps=8, context=ctx)  # compile outside the counted run
        # without the announcement: one cond per step, lowered to a read; the first call
        # after a reset allocates the history and has none
        for announce, expected in ((True, 0), (False, 7)):
            fastcache.reset(m)
            mode = HostReadMode()
            with mode:
                out = case.sample(model=compiled, steps=8, context=ctx if announce else None)
            ours = [r for r in mode.reads if r is not None]
            assert len(ours) == expected, ours
            assert all(r.startswith("inductor:") for r in ours), ours
            torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_wrong_step_count_refused_past_the_end_computed_repeated_call_keeps_history():
    case = reference_dit_case()
    m = case.model
    y = torch.tensor([1, 2])
    xs, ts = direct_inputs(6)
    with fastcache.patched(m, ScheduleConfig(plan="CC1C1")):
        with pytest.raises(ValueError, match="plans 5 steps but the run has 7"):
            with fastcache.context(m, "default", step_index=0, num_steps=7):
                pass
        with pytest.raises(ValueError, match="plans 5 steps"):
            fastcache.get_patch(m).set_num_steps(9)
    with fastcache.patched(m, ScheduleConfig(plan="CC1C1")):
        with torch.no_grad():
            once = []
            for i in range(6):
                with fastcache.context(m, "default", step_index=i):
                    once.append(m(xs[i], ts[i], y))
            fastcache.reset(m)
            twice = []
            for i in range(6):
                with fastcache.context(m, "default", step_index=i):
                    a = m(xs[i], ts[i], y)
                    b = m(xs[i], ts[i], y)  # a second evaluation of the same step (Heun)
                assert torch.equal(a, b), i
                twice.append(a)
        st = fastcache.stats(m)["contexts"]["default"]
    assert all(torch.equal(a, b) for a, b in zip(once, twice))
    assert st["timeline"][-1] is True  # step 5: past the plan's end, computed


# ----------------------------------------------------------------------------- proxy
@pytest.fixture(scope="module")
def small_profile():
    case = reference_dit_case()
    prof = fastcache.calibrate(case.model, lambda: [case.sample(steps=7, seed=s) for s in (1, 2)], progress=False)
    return case, prof


def test_proxy_equals_the_teacher_forced_error_of_the_taylor_ops():
    """plan_cost's quadratic forms in the Gram against forecasting recorded features with
    the real ops (exact Gram: every slot is smaller than gram_dim)."""
    case = reference_dit_case()
    from fastcache.tuning.calibration import CalibrationConfig

    feats = []
    h = fastcache.patch(case.model, CalibrationConfig(priors=True))
    orig = h.policy._accumulate
    h.policy._accumulate = lambda st, outs: (feats.append([f.detach().double().clone() for f in outs]), orig(st, outs))
    try:
        case.sample(steps=7)
    finally:
        h.remove()
    prof = fastcache.calibrate(case.model, lambda: case.sample(steps=7), progress=False)
    W = proxy.step_weights(prof.step_gram.numpy(), "relative")
    for plan in ("CC1C21C", "C0000C2", "C12C120", "CC2C2C2"):
        hist = [torch.zeros((3, *f.shape), dtype=torch.float64) for f in feats[0]]
        valid = torch.zeros(1)
        last, err = 0, 0.0
        for s, c in enumerate(plan):
            dx = torch.tensor([float(s - last)])
            if c == "C":
                for hk, f in zip(hist, feats[s]):
                    ops.taylor_update(hk, f, dx, valid, torch.ones((), dtype=torch.bool))
                valid = (valid + 1).clamp(max=3)
                last = s
            else:
                k = int(c)
                for hk, f in zip(hist, feats[s]):
                    fh = ops.taylor_forecast(hk[: k + 1], dx)
                    err += float((fh - f).pow(2).sum() / f.pow(2).sum()) / len(feats[s])
        assert math.isclose(proxy.plan_cost(W, plan), err, rel_tol=1e-6), plan


def test_dp_is_the_proxy_optimum(small_profile):
    _, prof = small_profile
    W = proxy.step_weights(prof.step_gram.numpy(), "relative")
    solve = proxy.proxy_dp(W, [0, 1, 2], 4)
    for K in (2, 3, 4):
        best = math.inf
        for comp in itertools.combinations(range(1, 7), K - 1):
            for orders in itertools.product("012", repeat=7 - K):
                it = iter(orders)
                plan = "".join("C" if s == 0 or s in comp else next(it) for s in range(7))
                best = min(best, proxy.plan_cost(W, plan))
        plan, cost = solve(K)
        assert plan.count("C") == K and plan[0] == "C"
        assert math.isclose(cost, best, rel_tol=1e-9) and math.isclose(proxy.plan_cost(W, plan), cost, rel_tol=1e-9)
    cfg, cost = proxy.schedule_from_profile(prof, speedup=2.0, methods=("taylor1",))
    assert cfg.budget == 4 and set(cfg.plan) <= {"C", "1"}


def test_fixed_interval_plan():
    assert proxy.fixed_interval_plan(10, 50, 1)[:3] == "CCC" and proxy.fixed_interval_plan(10, 50, 1)[-1] == "C"
    for K in (1, 3, 10, 13, 17, 25, 50):
        assert proxy.fixed_interval_plan(K, 50, 2).count("C") == K
    assert proxy.fixed_interval_plan(4, 5, 0) == "CCC0C"


# ----------------------------------------------------------------------------- search
def test_search_replays_is_stored_and_loads_back(small_profile, tmp_path):
    case, prof = small_profile
    runs = [lambda s=s: case.sample(steps=7, seed=s) for s in (1, 2)]
    res = fastcache.search_schedule(case.model, runs, 3, profile=prof, max_evals=6, progress=False)
    assert res.budget == 3 and res.config.budget == 3 and res.num_steps == 7
    assert len(res.trace) <= 6 and res.chosen.psnr_db == max(e.psnr_db for e in res.trace)
    assert res.model_calls == 7 * 2 * (1 + len(res.trace))
    assert all(e.timelines_match for e in res.trace)
    psnr, ok = evaluate_schedule(case.model, res.config, runs)
    assert ok and math.isclose(psnr, res.calibration_psnr, rel_tol=1e-12)  # replays exactly
    assert "of 7 steps computed" in str(res) and "<- chosen" in str(res)
    back = fastcache.Profile.load(res.store(prof).save(tmp_path / "p.safetensors"))
    assert back.schedule(3) == res.config and torch.equal(back.step_gram, prof.step_gram)
    assert back.schedules[3]["calibration_psnr_db"] == round(res.calibration_psnr, 4)
    with pytest.raises(KeyError, match="no schedule for 5 computed steps"):
        back.schedule(5)
    # the proxy alone, from the profile
    alone = fastcache.search_schedule(back, budget=3)
    assert alone.config.budget == 3 and alone.model_calls == 0


def test_search_without_a_profile_calibrates_and_beats_nothing_worse_than_its_starts():
    case = reference_dit_case()
    runs = [lambda: case.sample(steps=7, seed=4)]
    res = fastcache.search_schedule(
        case.model, runs, speedup=2.0, methods=("reuse", "taylor1"), max_evals=5, progress=False
    )
    assert res.budget == 4 and set(res.plan) <= {"C", "0", "1"}
    starts = [e for e in res.trace if e.source != "move"]
    assert proxy.fixed_interval_plan(4, 7, 1) in {e.plan for e in starts}  # TaylorSeer's usual placement
    assert res.chosen.psnr_db >= max(e.psnr_db for e in starts)


def test_search_refusals(small_profile):
    case, prof = small_profile
    run = lambda: case.sample(steps=7)  # noqa: E731
    with pytest.raises(ValueError, match="exactly one of budget"):
        fastcache.search_schedule(case.model, run, progress=False)
    with pytest.raises(ValueError, match=r"budget=9 must be an integer in \[1, 7\]"):
        fastcache.search_schedule(case.model, run, 9, profile=prof, progress=False)
    with pytest.raises(ValueError, match="unknown method 'taylor3'"):
        fastcache.search_schedule(case.model, run, 3, methods=("taylor3",), profile=prof, progress=False)
    with pytest.raises(ValueError, match="runs is required"):
        fastcache.search_schedule(case.model, None, 3)
    with pytest.raises(ValueError, match="pass runs=None"):
        fastcache.search_schedule(prof, run, 3)
    old = fastcache.Profile(prof.prior, prof.slots, prof.meta)  # as a format-2 file loads
    with pytest.raises(ValueError, match="no step_gram"):
        fastcache.search_schedule(old, budget=3)
    with pytest.raises(ValueError, match="no step_gram"):
        fastcache.search_schedule(case.model, run, 3, profile=old, progress=False)
    with pytest.raises(TypeError, match="must return its output tensor"):
        fastcache.search_schedule(case.model, lambda: None, 3, profile=prof, progress=False)
    from fastcache.models import DiT

    other = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="profile was made for"):
        fastcache.search_schedule(other, run, 3, profile=prof, progress=False)


def test_command_line_budget_prints_stores_and_plots(tmp_path, capsys):
    import importlib

    cli = importlib.import_module("fastcache.tuning.cli")  # the `python -m fastcache.tuning` module
    out, png = tmp_path / "p.safetensors", tmp_path / "s.png"
    rc = cli.main(
        ["--steps", "8", "--runs", "1", "--batch", "2", "--budget", "4", "--held-out", "1", "--max-evals", "3"]
        + ["--methods", "reuse,taylor1", "--out", str(out), "--plot", str(png), "--no-progress"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "4 of 8 steps computed" in text and "held-out runs (1): searched" in text and "<- chosen" in text
    prof = fastcache.Profile.load(out)
    cfg = prof.schedule(4)
    assert cfg.budget == 4 and set(cfg.plan) <= {"C", "0", "1"} and f"plan='{cfg.plan}'" in text
    assert math.isfinite(prof.schedules[4]["held_out_psnr_db"])
    assert png.stat().st_size > 10_000


def test_copy_and_pickle_keep_the_plan():
    import copy
    import pickle

    case = reference_dit_case()
    m = case.model
    plan = "CC1C20C1"
    with fastcache.patched(m, ScheduleConfig(plan=plan)):
        ref = case.sample(steps=8, context=lambda i: fastcache.context(m, "default", step_index=i))
        twins = [copy.deepcopy(m), pickle.loads(pickle.dumps(m))]
    for twin in twins:
        assert fastcache.get_patch(twin).config.plan == plan
        out = case.sample(model=twin, steps=8, context=lambda i, t=twin: fastcache.context(t, "default", step_index=i))
        assert torch.equal(out, ref)
        assert fastcache.stats(twin)["contexts"]["default"]["timeline"][-8:] == [c == "C" for c in plan]


def _dit_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline
    from support.zoo import dit_case

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=4, layers_per_block=1
    ).eval()
    return DiTPipeline(transformer=dit_case(num_embeds_ada_norm=1000).model, vae=vae, scheduler=DDIMScheduler())


def test_announce_steps_on_a_diffusers_pipeline_reads_nothing():
    """diffusers' DiTPipeline, unchanged: announced, the schedule reads nothing inside the
    transformer calls and gives bitwise the device schedule's images; removal restores
    the scheduler and the one flag per step."""
    pipe = _dit_pipeline()
    m = pipe.transformer
    plan = "CC1C20C1"

    def sample():
        mode, n = HostReadMode(), [0]

        def pre(*_):
            mode.__enter__()
            n[0] += 1

        hooks = [m.register_forward_pre_hook(pre), m.register_forward_hook(lambda *_: mode.__exit__(None, None, None))]
        try:
            out = pipe(
                class_labels=[1, 2],
                num_inference_steps=8,
                guidance_scale=4.0,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
            ).images
        finally:
            for h in hooks:
                h.remove()
        return out, [r for r in mode.reads if r is not None], n[0]

    with fastcache.patched(m, ScheduleConfig(plan=plan)):
        dev, dev_reads, calls = sample()
    with fastcache.patched(m, ScheduleConfig(plan=plan)):
        with fastcache.announce_steps(pipe) as ann:
            with pytest.raises(ValueError, match="already announced"):
                fastcache.announce_steps(pipe)
            host, host_reads, _ = sample()
            host2, _, _ = sample()  # a second pipeline call: set_timesteps starts the run again
            st = fastcache.stats(m)["contexts"]["default"]
            assert ann.index is None and ann.num_steps == 8  # the run is over: nothing announced after it
        assert "step" not in pipe.scheduler.__dict__ and fastcache.get_patch(m).announcer is None
        again, again_reads, _ = sample()
    assert calls == 8 and len(dev_reads) == 8 and host_reads == [] and len(again_reads) == 8
    assert torch.equal(host, dev) and torch.equal(host2, dev) and torch.equal(again, dev)
    assert st["timeline"] == [c == "C" for c in plan] * 2
    with pytest.raises(ValueError, match="is not patched"):
        fastcache.announce_steps(pipe)
    # removing the patch removes the announcer too
    with fastcache.patched(m, ScheduleConfig(plan=plan)):
        fastcache.announce_steps(pipe)
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__
    # every static schedule places announced steps on the host: FORA, TaylorSeer
    for cfg in (fastcache.FORAConfig(interval=3), fastcache.TaylorSeerConfig(interval=2, order=1)):
        with fastcache.patched(m, cfg), fastcache.announce_steps(pipe):
            _, reads, _ = sample()
            assert reads == [] and not all(fastcache.stats(m)["contexts"]["default"]["timeline"])


@pytest.mark.compile
def test_announced_cache_context_reaches_a_compiled_transformer():
    """A Flux-style loop (the transformer call inside ``cache_context``, the scheduler's
    steps announced): the step is planned at context entry, outside the compiled region,
    so an inductor-compiled transformer runs with 0 host reads and no recompilation."""
    from support.zoo import flux_case

    case = flux_case()
    m = case.model
    plan = "CC1C20C1"

    def loop(model, sch, mode=None):
        sch.set_timesteps(8)
        x = case.latents(torch.Generator().manual_seed(1))
        with torch.no_grad():
            for t in sch.timesteps:
                kw = case.inputs(x, t)
                with m.cache_context("cond"), mode or contextlib.nullcontext():  # count the model calls only
                    out = case.output(model(**kw))
                x = sch.step(out, t, x).prev_sample
        return x

    with fastcache.patched(m, ScheduleConfig(plan=plan)):
        sch = case.scheduler()
        with fastcache.announce_steps(sch, m):
            eager = loop(m, sch)
            torch._dynamo.reset()
            cnt = CompileCounterWithBackend("inductor")
            compiled = torch.compile(m, fullgraph=True, backend=cnt)
            loop(compiled, sch, HostReadMode())  # compile outside the counted run (same dispatch-mode guards)
            fastcache.reset(m)
            mode = HostReadMode()
            out = loop(compiled, sch, mode)
            st = fastcache.stats(m)["contexts"]["cond"]
    ours = [r for r in mode.reads if r is not None]
    assert ours == [] and not mode.conds, ours
    assert cnt.frame_count <= 3
    assert st["timeline"] == [c == "C" for c in plan]
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.compile
def test_announced_pipeline_without_cache_context_compiles_once():
    """DiTPipeline calls a compiled transformer outside any context: the announcement is
    not read in traced code (it would be guarded on and recompile every step), the
    device schedule runs: one cond per step, no recompilation across steps."""
    pipe = _dit_pipeline()
    m = pipe.transformer
    with fastcache.patched(m, ScheduleConfig(plan="CC1C20C1")), fastcache.announce_steps(pipe.scheduler, m):
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        pipe.transformer = torch.compile(m, fullgraph=True, backend=cnt)
        try:
            for _ in range(2):
                pipe(class_labels=[1, 2], num_inference_steps=8, output_type="pt")
        finally:
            pipe.transformer = m
        st = fastcache.stats(m)["contexts"]["default"]
    assert cnt.frame_count <= 2, cnt.frame_count  # the first call (allocation) and the cond step
    assert st["timeline"][-8:] == [c == "C" for c in "CC1C20C1"]


# ----------------------------------------------------------------------------- EOC filler
def test_eoc_steps_equal_eoc_on_fora_and_mix_with_taylor(small_profile):
    """ "E" = EOC's corrected reuse (Eq. E4) from the last computed step: a plan of C/E
    on FORA's timeline is bitwise EOCConfig(FORA, w=1, every reused block corrected);
    a mixed plan gives the same images announced and on the device schedule."""
    case, _ = small_profile
    m = case.model
    prof = fastcache.calibrate(m, lambda: [case.sample(steps=8, seed=s) for s in (1, 2)], progress=False)
    eoc = fastcache.EOCConfig(
        base=fastcache.FORAConfig(interval=2), profile=prof, weight=1.0, regulation=0, threshold=0
    )
    with fastcache.patched(m, eoc):
        ref = case.sample(steps=8, seed=5)
        st = fastcache.stats(m)["contexts"]["default"]
    assert st["corrected"] > 0
    plan = "".join("C" if c else "E" for c in st["timeline"])
    with fastcache.patched(m, ScheduleConfig(plan=plan, profile=prof)):
        assert torch.equal(case.sample(steps=8, seed=5), ref)
    with fastcache.patched(m, ScheduleConfig(plan=plan.replace("E", "0"))):
        assert not torch.equal(case.sample(steps=8, seed=5), ref)  # the correction does something
    mixed = "CC1CE0C2"
    with fastcache.patched(m, ScheduleConfig(plan=mixed, profile=prof)):
        dev = case.sample(steps=8, seed=5)
    with fastcache.patched(m, ScheduleConfig(plan=mixed, profile=prof)):
        host = case.sample(steps=8, seed=5, context=lambda i: fastcache.context(m, "default", step_index=i))
    assert torch.equal(dev, host)
    with pytest.raises(ValueError, match="give the model's profile"):
        ScheduleConfig(plan="CCE")
    with pytest.raises(ValueError, match="recorded over 8-step runs"):
        ScheduleConfig(plan="CCE", profile=prof)
    # the search may place it (the end-to-end stage: the proxy counts it as reuse)
    runs = [lambda: case.sample(steps=8, seed=4)]
    res = fastcache.search_schedule(m, runs, 3, methods=("eoc",), profile=prof, max_evals=4, progress=False)
    assert set(res.plan) <= {"C", "E"} and res.config.profile is prof and res.methods == ("eoc",)
    assert evaluate_schedule(m, res.config, runs)[1]
