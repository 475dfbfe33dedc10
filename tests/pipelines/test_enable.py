"""``fastcache.enable(pipe, ...)`` / ``disable(pipe)`` / ``report(...)`` on whole pipeline
calls of the tiny pipelines (support.pipelines): the same output as patching each denoiser
by hand and announcing the steps, bitwise; the uncached pipeline back bitwise after
``disable``; 0 host reads per step for static schedules; Wan 2.2's two experts each with
their own state; every config form; every refusal before anything is patched."""

from __future__ import annotations

import json

import pytest
import torch
from support import pipelines as P
from support.hostreads import HostReadMode

import fastcache
from fastcache.runtime import _find

STEPS = 6


def _call(name, pipe, steps=STEPS, **over):
    kw = P.call_kwargs(name, steps, **over)
    with torch.no_grad():
        return P.output(name, pipe(**kw))


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = P.build(name)
        return cache[name]

    return get


def _unpatched(pipe) -> bool:
    return all(_find(getattr(pipe, n)) is None for n in ("transformer", "transformer_2") if getattr(pipe, n, None))


@pytest.mark.parametrize("name", P.NAMES)
def test_enable_equals_the_hand_patched_announced_run_and_disable_restores(name, built):
    pipe = built(name)
    ref = _call(name, pipe)
    cfg = fastcache.FORAConfig(interval=2)
    fastcache.enable(pipe, cfg)
    try:
        out = _call(name, pipe)
        stats = {n: fastcache.stats(getattr(pipe, n)) for n in P.denoisers(name)}
    finally:
        fastcache.disable(pipe)
    assert _unpatched(pipe)
    assert torch.equal(_call(name, pipe), ref), "disable() must give back the uncached pipeline bitwise"
    skipped = sum(c["skipped"] for s in stats.values() for c in s["contexts"].values())
    assert skipped > 0 and not torch.equal(out, ref), "the FORA schedule must reuse something"
    # by hand: each denoiser patched, the scheduler's steps announced to each
    handles, announcers = [], []
    for n in P.denoisers(name):
        handles.append(fastcache.patch(getattr(pipe, n), cfg))
        announcers.append(fastcache.announce_steps(pipe, model=getattr(pipe, n)))
    try:
        hand = _call(name, pipe)
    finally:
        for a in announcers:
            a.remove()
        for h in handles:
            h.remove()
    assert torch.equal(out, hand)
    assert torch.equal(_call(name, pipe), ref)


def _fastcache_reads(pipe, name, cfg) -> tuple[int, int]:
    """(host reads made by fastcache's code during one enabled call, transformer calls)."""
    fastcache.enable(pipe, cfg)
    try:
        _call(name, pipe, steps=3)  # buffers allocated outside the measured call
        mode = HostReadMode()
        with mode:
            _call(name, pipe)
        stats = [fastcache.stats(getattr(pipe, n)) for n in P.denoisers(name)]
        calls = sum(c["steps"] for s in stats for c in s["contexts"].values())
    finally:
        fastcache.disable(pipe)
    # a read attributed to the line of fastcache's scheduler-method wrapper that calls the
    # scheduler's own method (set_timesteps / step) is the scheduler's, not fastcache's
    theirs = "runtime.py:wrapper:out = original(*args, **kwargs)"
    mine = [r for r in mode.reads if r is not None and not r.startswith("inductor") and r != theirs]
    return len(mine), calls


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_static_schedule_reads_nothing_on_the_host(name, built):
    pipe = built(name)
    reads, _ = _fastcache_reads(pipe, name, fastcache.TaylorSeerConfig(interval=2, order=1))
    assert reads == 0
    # the counter sees fastcache's reads: TeaCache decides on the device and reads its one flag per call
    reads, calls = _fastcache_reads(pipe, name, fastcache.TeaCacheConfig(threshold=0.3))
    assert reads >= STEPS and calls >= STEPS


def _timeline_computed(ctx: dict) -> list[bool]:
    return [bool(x) if not isinstance(x, str) else x.upper().startswith("C") for x in ctx["timeline"]]


def test_wan22_experts_keep_their_own_state_and_each_first_step_computes(built):
    pipe = built("wan22")
    fastcache.enable(pipe, fastcache.FORAConfig(interval=100))  # reuse everything a plan may reuse
    try:
        _call("wan22", pipe)
        high, low = (fastcache.stats(getattr(pipe, n)) for n in ("transformer", "transformer_2"))
        lines = fastcache.report(pipe).splitlines()
    finally:
        fastcache.disable(pipe)
    used = [{n: c for n, c in s["contexts"].items() if c["steps"]} for s in (high, low)]
    assert [sorted(u) for u in used] == [["cond", "uncond"]] * 2
    for u in used:
        for ctx in u.values():
            tl = _timeline_computed(ctx)
            assert tl and tl[0], "each expert's first call computes: nothing of the other expert's cache is used"
    calls = sum(c["steps"] for s in (high, low) for c in s["contexts"].values())
    assert calls == STEPS * P.cfg_calls("wan22")
    assert sum(line.startswith("transformer_2 [") for line in lines) == 2
    assert sum(line.startswith("transformer [") for line in lines) == 2


def test_report_one_line_per_denoiser_context_and_method(built):
    pipe = built("flux")
    fastcache.enable(pipe, "first_block")
    try:
        _call("flux", pipe)
        text = fastcache.report(pipe)
        st = fastcache.stats(pipe.transformer)
        by_model = fastcache.report(pipe.transformer)
    finally:
        fastcache.disable(pipe)
    lines = [line for line in text.splitlines() if not line.startswith("    warning")]
    used = {n: c for n, c in st["contexts"].items() if c["steps"]}
    assert len(lines) == len(used) == 2  # cond and uncond: Flux's true CFG
    for line, (ctx, c) in zip(lines, used.items(), strict=True):
        assert line.startswith(f"transformer [{ctx}] first_block: {c['steps']} steps, {c['computed']} computed")
        assert "ideal speedup" in line and "cache" in line
    assert by_model.replace("FluxTransformer2DModel [", "transformer [") == text


def _search_profile(pipe, name, steps, budget):
    """A real profile of the pipeline's transformer with a schedule searched on its Gram
    (the proxy stage: no end-to-end evaluation needed)."""
    prof = fastcache.calibrate(pipe.transformer, lambda: _call(name, pipe, steps=steps), progress=False)
    return fastcache.search_schedule(prof, None, budget).store(prof)


def test_every_config_form_gives_the_same_run(built, tmp_path):
    name = "dit"
    pipe = built(name)
    cfg = fastcache.FirstBlockCacheConfig(threshold=0.2)
    outs = []
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    for form in (cfg, cfg.to_dict(), path, str(path), {"transformer": cfg.to_dict()}):
        fastcache.enable(pipe, form)
        try:
            outs.append(_call(name, pipe))
        finally:
            fastcache.disable(pipe)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    # a profile with a searched schedule, by object and by path, with budget=K
    prof = _search_profile(pipe, name, STEPS, 3)
    ppath = prof.save(tmp_path / "p.safetensors")
    runs = []
    for form in (prof, ppath):
        fastcache.enable(pipe, form, budget=3)
        try:
            runs.append(_call(name, pipe))
            assert fastcache.stats(pipe.transformer)["config"]["plan"] == prof.schedules[3]["plan"]
        finally:
            fastcache.disable(pipe)
    assert torch.equal(runs[0], runs[1])


def test_refusals_name_the_problem_and_patch_nothing(built, tmp_path):
    pipe = built("dit")
    with pytest.raises(TypeError, match="not a diffusers pipeline.*fastcache.patch"):
        fastcache.enable(pipe.transformer, "teacache")
    with pytest.raises(FileNotFoundError, match="neither a method name"):
        fastcache.enable(pipe, "tea_cache")
    with pytest.raises(ValueError, match="has no 'kind'"):
        fastcache.enable(pipe, {"threshold": 0.2})
    with pytest.raises(ValueError, match="config dict"):
        fastcache.enable(pipe, {"kind": "teacache", "threshhold": 0.2})
    with pytest.raises(ValueError, match="budget=3 picks a searched schedule from a profile"):
        fastcache.enable(pipe, fastcache.TeaCacheConfig(), budget=3)
    prof = fastcache.calibrate(pipe.transformer, lambda: _call("dit", pipe, steps=4), progress=False)
    with pytest.raises(ValueError, match="holds no searched schedule.*python -m fastcache calibrate --pipeline"):
        fastcache.enable(pipe, prof, budget=2)
    fastcache.search_schedule(prof, None, 2).store(prof)
    with pytest.raises(ValueError, match=r"pass budget=K, one of them"):
        fastcache.enable(pipe, prof)
    with pytest.raises(ValueError, match=r"budget=3: the profile .* holds schedules for budgets \[2\]"):
        fastcache.enable(pipe, prof, budget=3)
    other = built("pixart")
    with pytest.raises(ValueError, match="made for DiTTransformer2DModel"):
        fastcache.enable(other, prof, budget=2)
    assert _unpatched(pipe) and _unpatched(other)
    # a schedule for 4 steps run with 6: refused at the first step, before any cached math
    fastcache.enable(pipe, prof, budget=2)
    try:
        with pytest.raises(ValueError, match="plans 4 steps but the run has 6"):
            _call("dit", pipe, steps=6)
        with pytest.raises(RuntimeError, match="already enabled"):
            fastcache.enable(pipe, "teacache")
    finally:
        fastcache.disable(pipe)
    with pytest.raises(ValueError, match="is not enabled"):
        fastcache.disable(pipe)
    # a failure on the second expert leaves the first unpatched
    wan = built("wan22")
    with pytest.raises(ValueError, match="config dict"):
        fastcache.enable(wan, {"transformer": "teacache", "transformer_2": {"kind": "fora", "interval": 0}})
    with pytest.raises(ValueError, match=r"names \['transformer'\] but not \['transformer_2'\]"):
        fastcache.enable(wan, {"transformer": "teacache"})
    assert _unpatched(wan)
    fastcache.patch(wan.transformer_2, fastcache.TeaCacheConfig())
    try:
        with pytest.raises(RuntimeError, match="transformer_2 .* is already patched"):
            fastcache.enable(wan, "teacache")
        assert _find(wan.transformer) is None
    finally:
        fastcache.unpatch(wan.transformer_2)


def test_a_pipeline_without_a_transformer_is_refused():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(TypeError, match="has no denoiser fastcache can cache: unet .*a UNet"):
        fastcache.enable(pipe, "teacache")
