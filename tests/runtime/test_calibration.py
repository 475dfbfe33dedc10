"""Calibration: recorded pairs are the indicator / stack-output relative L1 of uncached
runs, and the fit is numpy.polyfit over them."""

import numpy as np
import pytest
import torch
from support.teacache_reference import INDICATORS
from support.zoo import reference_dit_case

import fastcache
from fastcache.tuning import calibration


def test_recording_pairs_match_a_hand_computation_and_fit():
    case = reference_dit_case()
    m = case.model
    ins, outs = [], []
    blk0, last = m.blocks[0], m.blocks[-1]
    hooks = [
        blk0.register_forward_pre_hook(
            lambda mod, a: ins.append(INDICATORS["fastcache-dit"](mod, {"x": a[0], "c": a[1]}))
        ),
        last.register_forward_hook(lambda mod, a, o: outs.append(o.detach().clone())),
    ]
    ref = case.sample(steps=8)
    for h in hooks:
        h.remove()

    with calibration.recording(m) as rec:
        out = case.sample(steps=8)
        case.sample(steps=8, seed=2)  # a second run: pairs restart (no pair across runs)
    assert torch.equal(out, ref)  # calibration never skips
    pairs = rec.pairs
    assert pairs.shape == (14, 2)
    exp = [
        (
            ((ins[s] - ins[s - 1]).abs().mean() / ins[s - 1].abs().mean()).item(),
            ((outs[s] - outs[s - 1]).abs().sum() / outs[s - 1].abs().sum()).item(),
        )
        for s in range(1, 8)
    ]
    np.testing.assert_allclose(pairs[:7], np.array(exp), rtol=1e-4)
    coeffs = rec.fit(degree=2)
    np.testing.assert_allclose(coeffs, np.polyfit(pairs[:, 0], pairs[:, 1], 2), rtol=1e-9)
    cfg = fastcache.TeaCacheConfig(threshold=0.2, coefficients=coeffs)
    assert cfg.coefficients == coeffs
    assert "forward" not in m.__dict__  # recording removed its patch


def test_too_few_pairs_is_a_clear_error():
    case = reference_dit_case()
    with calibration.recording(case.model) as rec:
        case.sample(steps=2)
    with pytest.raises(ValueError, match="too few"):
        rec.fit(degree=4)


def test_calibrate_records_gamma_as_mean_token_norm_ratio_of_the_stack_residual():
    """MagCache's M1 by hand on the reference DiT: per run, gamma_s = mean over batch rows
    and tokens of ||R_s|| / (||R_{s-1}|| + 1e-8) (norm over channels), gamma_0 = 1; the
    profile holds the mean over runs."""
    case = reference_dit_case()
    m = case.model
    ins, outs = [], []
    hooks = [
        m.blocks[0].register_forward_pre_hook(lambda mod, a: ins.append(a[0].detach().clone())),
        m.blocks[-1].register_forward_hook(lambda mod, a, o: outs.append(o.detach().clone())),
    ]
    try:
        for seed in (1, 2):
            case.sample(steps=7, seed=seed)
    finally:
        for h in hooks:
            h.remove()
    res = [o - i for i, o in zip(ins, outs)]
    want = torch.zeros(7)
    for run in range(2):
        r = res[run * 7 : (run + 1) * 7]
        want[0] += 0.5
        for s in range(1, 7):
            want[s] += (r[s].norm(dim=-1) / (r[s - 1].norm(dim=-1) + 1e-8)).mean() / 2
    prof = fastcache.calibrate(m, lambda: [case.sample(steps=7, seed=s) for s in (1, 2)], progress=False)
    torch.testing.assert_close(prof.mag_ratios, want, rtol=1e-5, atol=1e-6)
