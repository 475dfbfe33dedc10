"""Block Caching (docs/methods.md section 6; fastcache/policies/block_cache.py).

* the calibrated per-block change Delta_i(s) (B1) vs a hand computation from block hooks;
* the static mask vs a host reference of B2 written here; delta 0 refreshes everything;
* outputs vs a host reference of the reuse (every branch of a reused block takes its
  cached pre-gate output, gates recomputed) on the reference DiT; the blocks that run
  are exactly the mask's; delta 0 bitwise unpatched on every family;
* EOC's correction composes: EOCConfig(base=cfg.mask) with weight 0 is Block Caching
  bitwise, with a weight it corrects;
* host reads: none with a host step index, one per step without; torch.compile
  (fullgraph) on the reference DiT: 0 breaks, no recompiles; validation; stats.
"""

from __future__ import annotations

import pytest
import torch
from support.zoo import CASES, CORE, reference_dit_case
from torch._dynamo.testing import CompileCounterWithBackend

import fastcache
from fastcache.models.dit import modulate

STEPS = 10


def _profile(case, steps=STEPS, seeds=(1, 3)):
    return fastcache.calibrate(case.model, lambda: [case.sample(steps=steps, seed=s) for s in seeds], progress=False)


def reference_mask(change, delta):
    """B2 by hand: step 0 computes all; block i computes at s iff its change summed since
    its last refresh reaches delta."""
    S, L = len(change), len(change[0])
    mask = [[True] * L]
    last = [0] * L
    for s in range(1, S):
        row = []
        for i in range(L):
            acc = sum(change[t][i] for t in range(last[i] + 1, s + 1))
            row.append(acc >= delta)
            if row[-1]:
                last[i] = s
        mask.append(row)
    return mask


def _delta_for(prof, frac):
    """A delta that leaves roughly ``frac`` of the (step, block) pairs after step 0 reused."""
    vals = sorted(prof.block_change[1:].flatten().tolist())
    return vals[int(frac * (len(vals) - 1))] * 1.5


# ------------------------------------------------------------------ profile and schedule
def test_block_change_is_the_per_block_relative_l1_of_block_outputs():
    case = reference_dit_case()
    m = case.model
    outs = {}
    hooks = [
        blk.register_forward_hook(lambda mod, a, o, i=i: outs.setdefault(i, []).append(o.detach().clone()))
        for i, blk in enumerate(m.blocks)
    ]
    try:
        for seed in (1, 3):
            case.sample(steps=STEPS, seed=seed)
    finally:
        for h in hooks:
            h.remove()
    prof = _profile(case)
    L = len(m.blocks)
    want = torch.zeros(STEPS, L)
    for i in range(L):
        for run in range(2):
            seq = outs[i][run * STEPS : (run + 1) * STEPS]
            for s in range(1, STEPS):
                want[s, i] += ((seq[s] - seq[s - 1]).abs().sum() / seq[s].abs().sum()) / 2
    assert prof.block_change.shape == (STEPS, L)
    torch.testing.assert_close(prof.block_change, want, rtol=1e-5, atol=1e-7)
    assert (prof.block_change[0] == 0).all() and (prof.block_change[1:] > 0).all()


def test_mask_matches_host_reference_and_limits():
    case = reference_dit_case()
    prof = _profile(case)
    change = prof.block_change.tolist()
    for frac in (0.1, 0.4, 0.7, 0.95):
        d = _delta_for(prof, frac)
        cfg = fastcache.BlockCacheConfig(delta=d, profile=prof)
        assert [list(r) for r in cfg.mask] == reference_mask(change, d)
    assert all(all(r) for r in fastcache.BlockCacheConfig(delta=0.0, profile=prof).mask)
    huge = fastcache.BlockCacheConfig(delta=1e9, profile=prof).mask
    assert all(huge[0]) and not any(any(r) for r in huge[1:])
    mid = fastcache.BlockCacheConfig(delta=_delta_for(prof, 0.5), profile=prof)
    flat = [v for r in mid.mask[1:] for v in r]
    assert any(flat) and not all(flat)
    assert 0 < mid.to_dict()["computed_fraction"] < 1


def test_config_validation(tmp_path):
    case = reference_dit_case()
    prof = _profile(case)
    with pytest.raises(ValueError, match="delta"):
        fastcache.BlockCacheConfig(delta=-0.1, profile=prof)
    with pytest.raises(ValueError, match="recorded over 10-step runs"):
        fastcache.BlockCacheConfig(delta=0.1, profile=prof, num_steps=12)
    with pytest.raises(ValueError, match="must be a fastcache.Profile"):
        fastcache.BlockCacheConfig(delta=0.1)
    old = fastcache.Profile(prof.prior, prof.slots, prof.meta, prof.teacache_pairs)  # as a format-1 file loads
    with pytest.raises(ValueError, match="no block_change curve .* calibrate again"):
        fastcache.BlockCacheConfig(delta=0.1, profile=old)
    path = prof.save(tmp_path / "p.safetensors")
    cfg = fastcache.BlockCacheConfig(delta=0.05, profile=str(path))
    assert cfg.mask == fastcache.BlockCacheConfig(delta=0.05, profile=prof).mask
    pix = CASES["diffusers-pixart"]()
    with pytest.raises(ValueError, match="profile was made for DiT"):
        fastcache.patch(pix.model, cfg)
    m = case.model
    with fastcache.patched(m, cfg), torch.no_grad(), pytest.raises(ValueError, match="beyond the Block Caching"):
        with fastcache.context(m, "default", step_index=STEPS):
            m(torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), torch.tensor([1, 2]))


# ------------------------------------------------------------------ runtime
def _block_cache_reference(model, mask, xs, ts, y):
    """The reuse by hand on the reference DiT: a reused block adds its cached attention
    and MLP outputs (pre-gate) with the current step's gates."""
    cache, outs = {}, []
    for s, t in enumerate(ts):
        h = model.patch_embed(xs[s]) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for li, blk in enumerate(model.blocks):
            sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
            if mask[s][li]:
                cache[li, "a"] = blk.attn(modulate(blk.norm1(h), sh1, sc1))
            h = h + g1.unsqueeze(1) * cache[li, "a"]
            if mask[s][li]:
                cache[li, "m"] = blk.mlp(modulate(blk.norm2(h), sh2, sc2))
            h = h + g2.unsqueeze(1) * cache[li, "m"]
        outs.append(model.unpatchify(model.final_layer(h, c)))
    return outs


def test_matches_host_reference_and_runs_only_the_masked_blocks():
    case = reference_dit_case()
    m = case.model
    y = torch.tensor([1, 2])
    g = torch.Generator().manual_seed(0)
    n = STEPS
    ts = [torch.full((2,), 999.0 - 100 * s) for s in range(n)]
    cal = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(n)]
    prof = fastcache.calibrate(m, lambda: [m(x, t, y) for x, t in zip(cal, ts)], progress=False)
    cfg = fastcache.BlockCacheConfig(delta=_delta_for(prof, 0.5), profile=prof)
    mask = cfg.mask
    assert not all(v for r in mask for v in r)
    xs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(n)]
    calls = []
    hooks = [blk.attn.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, blk in enumerate(m.blocks)]
    try:
        with torch.no_grad():
            ref = _block_cache_reference(m, mask, xs, ts, y)
            calls.clear()
            with fastcache.patched(m, cfg):
                got = [m(x, t, y) for x, t in zip(xs, ts)]
                st = fastcache.stats(m)["contexts"]["default"]
    finally:
        for h in hooks:
            h.remove()
    assert calls == [li for r in mask for li, c in enumerate(r) if c]
    L = len(m.blocks)
    assert st["computed_fraction"] == pytest.approx(sum(map(sum, mask)) / (n * L))
    assert st["skipped"] == sum(not all(r) for r in mask) and st["cache_bytes"] > 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CORE))
def test_delta_zero_is_bitwise_unpatched_and_the_mask_is_followed(name):
    case = CASES[name]()
    prof = _profile(case, seeds=(2,))
    ref = case.sample(steps=STEPS)
    with fastcache.patched(case.model, fastcache.BlockCacheConfig(delta=0.0, profile=prof)):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert torch.equal(out, ref)
    assert st["computed"] == STEPS and st["computed_fraction"] == 1.0
    cfg = fastcache.BlockCacheConfig(delta=_delta_for(prof, 0.5), profile=prof)
    with fastcache.patched(case.model, cfg):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]
    L = len(cfg.mask[0])
    assert st["computed_fraction"] == pytest.approx(sum(map(sum, cfg.mask)) / (STEPS * L))
    assert st["computed_fraction"] < 1
    assert not torch.equal(out, ref)


def test_eoc_composes_with_the_mask():
    case = reference_dit_case()
    m = case.model
    prof = _profile(case)
    cfg = fastcache.BlockCacheConfig(delta=_delta_for(prof, 0.5), profile=prof)
    with fastcache.patched(m, cfg):
        bc = case.sample(steps=STEPS)
    with fastcache.patched(m, fastcache.EOCConfig(base=cfg.mask, profile=prof, weight=0.0)):
        e0 = case.sample(steps=STEPS)
    with fastcache.patched(m, fastcache.EOCConfig(base=cfg.mask, profile=prof, weight=0.5, threshold=0.0)):
        e1 = case.sample(steps=STEPS)
        st = fastcache.stats(m)["contexts"]["default"]
    assert torch.equal(e0, bc)
    assert st["corrected"] == sum(not v for r in cfg.mask for v in r) > 0
    assert not torch.equal(e1, bc)


def test_host_reads_none_with_a_host_index_one_per_step_without():
    from support.hostreads import HostReadMode, python_level_reads

    case = reference_dit_case()
    m = case.model
    prof = _profile(case)
    cfg = fastcache.BlockCacheConfig(delta=_delta_for(prof, 0.5), profile=prof)
    outs, reads = [], []
    for host_index in (True, False):
        with fastcache.patched(m, cfg):
            mode = HostReadMode()
            ctx = (lambda i: fastcache.context(m, "default", step_index=i)) if host_index else None
            with mode, python_level_reads() as py:
                outs.append(case.sample(steps=STEPS, context=ctx))
            st = fastcache.stats(m)["contexts"]["default"]
        reads.append([r for r in mode.reads + py if r is not None])
        assert st["computed_fraction"] < 1
    assert torch.equal(outs[0], outs[1])
    assert reads[0] == [] and len(reads[1]) == STEPS, reads


@pytest.mark.compile
def test_fullgraph_compile_no_breaks_no_recompiles():
    case = reference_dit_case()
    m = case.model
    prof = _profile(case)
    cfg = fastcache.BlockCacheConfig(delta=_delta_for(prof, 0.5), profile=prof)
    with fastcache.patched(m, cfg):
        eager = case.sample(steps=STEPS)
        se = fastcache.stats(m)["contexts"]["default"]
        fastcache.reset(m)
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(m, fullgraph=True, backend=cnt)  # fullgraph: a graph break raises
        frames = []
        out = case.sample(model=compiled, steps=STEPS, per_step=lambda i, o: frames.append(cnt.frame_count))
        sc = fastcache.stats(m)["contexts"]["default"]
    assert sc["computed_fraction"] == se["computed_fraction"] < 1
    assert frames[1] <= 2 and len(set(frames[1:])) == 1, frames
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
