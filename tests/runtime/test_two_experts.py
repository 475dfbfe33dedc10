"""Wan 2.2 A14B runs two transformers in one sampling run: ``transformer`` (high noise) until
the boundary timestep, then ``transformer_2`` (low noise). Each expert is patched on its own;
caching continues correctly across the switch: nothing of one expert's cache reaches the
other (their states are separate), the first step on each expert computes, and at the
never-skip setting the run is bitwise the unpatched two-expert run."""

import copy

import pytest
import torch
from support.zoo import wan_case

import fastcache

STEPS, BOUNDARY = 8, 4  # the expert switches at step 4 (WanPipeline: t < boundary_ratio * 1000)


def _experts():
    case = wan_case()
    low = copy.deepcopy(case.model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in low.parameters():  # another expert: other weights, same class and shapes
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return case, case.model, low


def _run(case, high, low, latents=None, start=0):
    """The two-expert sampling loop of WanPipeline (its expert switch), on the zoo's inputs,
    from step ``start`` (``latents``: the latents entering it). Returns the final latents and
    those entering the switch."""
    sch = case.scheduler()
    sch.set_timesteps(STEPS)
    x = case.latents(torch.Generator().manual_seed(2)) if latents is None else latents
    at_switch = x
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            if i < start:
                sch.step(torch.zeros_like(x), t, x)  # keep the scheduler's own step count
                continue
            if i == BOUNDARY:
                at_switch = x
            model = high if i < BOUNDARY else low
            out = case.output(model(**case.inputs(x, t)))
            x = sch.step(out, t, x).prev_sample
    return x, at_switch


@pytest.mark.parametrize(
    "never,caching",
    [
        (fastcache.TeaCacheConfig(threshold=0.0), fastcache.TeaCacheConfig(threshold=10.0)),
        (fastcache.FORAConfig(interval=1), fastcache.FORAConfig(interval=2)),
        (fastcache.TaylorSeerConfig(interval=1), fastcache.TaylorSeerConfig(interval=2, order=1)),
    ],
    ids=["teacache", "fora", "taylorseer"],
)
def test_caching_continues_across_the_expert_switch(never, caching):
    case, high, low = _experts()
    ref = _run(case, high, low)[0]
    with fastcache.patched(high, never), fastcache.patched(low, never):
        assert torch.equal(_run(case, high, low)[0], ref)
    with fastcache.patched(high, caching), fastcache.patched(low, caching):
        out, at_switch = _run(case, high, low)
        hs = fastcache.stats(high)["contexts"]["default"]
        ls = fastcache.stats(low)["contexts"]["default"]
    assert torch.isfinite(out).all()
    # each expert saw only its own steps, and its first step computed (nothing carried over)
    assert hs["computed"] + hs["skipped"] == BOUNDARY and ls["computed"] + ls["skipped"] == STEPS - BOUNDARY, (hs, ls)
    assert hs["timeline"][0] and ls["timeline"][0], (hs["timeline"], ls["timeline"])
    assert hs["skipped"] + ls["skipped"] > 0, "the caching setting should skip"
    # the low-noise expert's part is what a fresh patch of it alone gives from the latents
    # entering the switch: nothing of the high-noise expert's run reaches it
    with fastcache.patched(low, caching):
        alone = _run(case, high, low, latents=at_switch, start=BOUNDARY)[0]
    assert torch.equal(out, alone)
    assert not torch.equal(out, ref)
