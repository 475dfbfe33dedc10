"""SmoothCache (fastcache/policies/smoothcache.py): the schedule its config computes from the
calibration Gram is the schedule computed from the branch outputs themselves, recorded on
the same runs; a larger alpha reuses more. (Patching, never-skip bitwise, host reads and
compile are the contract suite's: tests/contracts/test_methods.py.)"""

import math

import pytest
import torch
from support.zoo import reference_dit_case

import fastcache
from fastcache.policies.smoothcache import smooth_plan

STEPS = 8


def _recorded_outputs(case, seed):
    """Per step, every branch output (attention, MLP of each block) of an uncached run, in
    the profile's slot order (block-major, attn before mlp)."""
    steps, cur = [], []
    hooks = []
    for blk in case.model.blocks:
        for mod in (blk.attn, blk.mlp):
            hooks.append(mod.register_forward_hook(lambda m, a, out: cur.append(out.detach().double())))
    try:
        case.sample(steps=STEPS, seed=seed, per_step=lambda i, out: (steps.append(list(cur)), cur.clear()))
    finally:
        for h in hooks:
            h.remove()
    return steps


def _plan_from_outputs(runs, alpha):
    """SC1/SC2 written on the outputs: relative L2 error of reusing step c at step s, with
    the squared norms summed over the runs as the profile's Gram sums them."""
    K = len(runs[0][0])

    def err(s, c):
        total = 0.0
        for k in range(K):
            d2 = sum(float((r[s][k] - r[c][k]).pow(2).sum()) for r in runs)
            n2 = sum(float(r[s][k].pow(2).sum()) for r in runs)
            total += math.sqrt(d2 / n2)
        return total / K

    plan, c = ["C"], 0
    for s in range(1, STEPS):
        if err(s, c) < alpha:
            plan.append("0")
        else:
            plan.append("C")
            c = s
    return "".join(plan)


def test_plan_is_the_one_the_recorded_branch_outputs_give():
    case = reference_dit_case()
    seeds = (1, 2)
    prof = fastcache.calibrate(case.model, lambda: [case.sample(steps=STEPS, seed=s) for s in seeds], progress=False)
    runs = [_recorded_outputs(case, s) for s in seeds]
    plans = []
    for alpha in (0.0, 0.05, 0.2, 0.5):
        cfg = fastcache.SmoothCacheConfig(alpha=alpha, profile=prof)
        assert cfg.plan == _plan_from_outputs(runs, alpha), alpha
        plans.append(cfg.plan)
    counts = [p.count("C") for p in plans]
    assert counts[0] == STEPS and counts == sorted(counts, reverse=True) and counts[-1] < STEPS, plans
    # it runs as that schedule
    cfg = fastcache.SmoothCacheConfig(alpha=0.2, profile=prof)
    with fastcache.patched(case.model, cfg):
        out = case.sample(steps=STEPS, seed=3)
        tl = fastcache.stats(case.model)["contexts"]["default"]["timeline"]
    with fastcache.patched(case.model, cfg.schedule()):
        ref = case.sample(steps=STEPS, seed=3)
    assert torch.equal(out, ref)
    assert [bool(c) for c in tl] == [c == "C" for c in cfg.plan], (tl, cfg.plan)


def test_plan_from_grams():
    g = [[[1.0, 0.99, 0.5], [0.99, 1.0, 0.6], [0.5, 0.6, 1.0]]]  # one slot, unit norms
    assert smooth_plan(g, 0.0) == "CCC"
    # e(1, 0) = sqrt(2 - 1.98) = 0.141; e(2, 0) = sqrt(2 - 1.0) = 1.0
    assert smooth_plan(g, 0.2) == "C0C"
    assert smooth_plan(g, 1.01) == "C00"
    with pytest.raises(ValueError, match="alpha"):
        fastcache.SmoothCacheConfig(alpha=-1.0, profile=None)
