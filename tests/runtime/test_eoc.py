"""EOC on the block interior (docs/methods.md "EOC"; fastcache/policies/eoc.py).

* weight 0 equals the base bitwise (FORA, interior TeaCache, static mask; every family
  for FORA);
* parity with a host reference written here from the paper's Eq. 5-7 and the
  documented Eq. 6 rule (reference DiT, FORA base, a threshold that corrects some
  blocks and not others);
* the determination rule: lambda large -> nothing corrected after step 0; tau 0 and
  lambda 0 -> every reused block corrected; only reused positions count;
* static masks: a mask equal to a FORA schedule gives FORA's result; refused clearly
  where it cannot run (no step index, torch.compile);
* torch.compile(fullgraph=True) with the trend on a dynamic (TeaCache) base.
"""

import math

import pytest
import torch
from support.zoo import CASES, CORE, reference_dit_case, two_block_case
from torch._dynamo.testing import CompileCounterWithBackend

import fastcache
from fastcache.models.dit import modulate

STEPS = 8


def _num_blocks(m):
    from fastcache.specs import find_spec

    return sum(len(seg) for seg in find_spec(m).blocks(m))


def _profile(case, steps=STEPS):
    return fastcache.calibrate(
        case.model, lambda: (case.sample(steps=steps), case.sample(steps=steps, seed=3)), progress=False
    )


@pytest.fixture(scope="module", params=sorted(CORE))
def case_and_profile(request):
    case = CASES[request.param]()
    return case, _profile(case)


def test_weight_zero_is_fora_bitwise_and_weight_changes_output(case_and_profile):
    case, prof = case_and_profile
    m = case.model
    base = fastcache.FORAConfig(interval=2)
    with fastcache.patched(m, base):
        fora = case.sample(steps=STEPS)
    with fastcache.patched(m, fastcache.EOCConfig(base=base, profile=prof, weight=0.0)):
        e0 = case.sample(steps=STEPS)
    with fastcache.patched(m, fastcache.EOCConfig(base=base, profile=prof, weight=0.5, threshold=0.0)):
        e1 = case.sample(steps=STEPS)
        st = fastcache.stats(m)["contexts"]["default"]
    assert torch.equal(e0, fora)
    assert st["corrected"] > 0 and not torch.equal(e1, fora)


def test_weight_zero_on_teacache_and_mask_bases():
    case = reference_dit_case()
    prof = _profile(case)
    m = case.model
    tc = fastcache.TeaCacheConfig(threshold=0.3)
    with fastcache.patched(m, fastcache.EOCConfig(base=tc, profile=prof, weight=0.0)):
        a = case.sample(steps=STEPS)
        sa = fastcache.stats(m)["contexts"]["default"]
    with fastcache.patched(m, fastcache.EOCConfig(base=tc, profile=prof, weight=0.01, threshold=0.0)):
        b = case.sample(steps=STEPS)
        sb = fastcache.stats(m)["contexts"]["default"]
    assert sa["timeline"] == sb["timeline"] and 0 < sa["skipped"] < STEPS
    assert sb["corrected"] == sb["skipped"] * len(m.blocks)  # tau 0: every reused block
    assert not torch.equal(a, b)
    # a static mask equal to FORA's every-2 schedule is FORA (host placement from num_steps)
    mask = [[s % 2 == 0] * len(m.blocks) for s in range(STEPS)]
    fora = fastcache.FORAConfig(interval=2)
    for w in (0.0, 0.3):
        with fastcache.patched(m, fastcache.EOCConfig(base=fora, profile=prof, weight=w, threshold=0.0)):
            f = case.sample(steps=STEPS)
        with fastcache.patched(m, fastcache.EOCConfig(base=mask, profile=prof, weight=w, threshold=0.0)):
            g = case.sample(steps=STEPS)
            sg = fastcache.stats(m)["contexts"]["default"]
        assert torch.equal(f, g)
        assert sg["computed_fraction"] == 0.5


def test_mixed_mask_computes_the_masked_blocks_only():
    case = reference_dit_case()
    prof = _profile(case)
    m = case.model
    L = len(m.blocks)
    mask = [[True] * L] + [[li % 2 == 0 for li in range(L)] for _ in range(STEPS - 1)]
    calls = []
    hooks = [blk.attn.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, blk in enumerate(m.blocks)]
    try:
        with fastcache.patched(m, fastcache.EOCConfig(base=mask, profile=prof, weight=0.0)):
            case.sample(steps=STEPS)
            st = fastcache.stats(m)["contexts"]["default"]
    finally:
        for h in hooks:
            h.remove()
    assert calls == list(range(L)) + [li for _ in range(STEPS - 1) for li in range(L) if li % 2 == 0]
    assert st["computed_fraction"] == pytest.approx(
        (L + (STEPS - 1) * sum(li % 2 == 0 for li in range(L))) / (STEPS * L)
    )


def _eoc_reference(model, prior, xs, ts, y, interval, w, lam, tau):
    """EOC by hand (Eq. 5-7 + the documented Eq. 6 rule) on a FORA schedule."""
    S, L = prior.shape[0], len(model.blocks)
    slot = {(li, b): 2 * li + i for li in range(L) for i, b in enumerate(("a", "m"))}

    def e_block(s, sp, li):
        return sum((prior[s, slot[li, b]] - prior[sp, slot[li, b]]).abs().mean() for b in "am") / 2

    e_bar = sum(e_block(s, s - 1, li) for s in range(1, S) for li in range(L)) / ((S - 1) * L)
    cache, outs, corrected, last, priorities = {}, [], 0, 0, []
    for s, t in enumerate(ts):
        compute = s % interval == 0
        h = model.patch_embed(xs[s]) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for li, blk in enumerate(model.blocks):
            sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
            if not compute:
                priorities.append(float(e_block(s, last, li) / e_bar * math.exp(-lam * s / (S - 1))))
            corr = not compute and priorities[-1] > tau
            corrected += corr

            def fhat(b, li=li, s=s, last=last, corr=corr):
                if not corr:
                    return cache[li, b]
                return cache[li, b] * (1 + w * (prior[s, slot[li, b]] - prior[last, slot[li, b]]))

            if compute:
                cache[li, "a"] = blk.attn(modulate(blk.norm1(h), sh1, sc1))
            h = h + g1.unsqueeze(1) * fhat("a")
            if compute:
                cache[li, "m"] = blk.mlp(modulate(blk.norm2(h), sh2, sc2))
            h = h + g2.unsqueeze(1) * fhat("m")
        if compute:
            last = s
        outs.append(model.unpatchify(model.final_layer(h, c)))
    return outs, corrected, priorities


def _direct_inputs(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 8, 8, generator=g) for _ in range(n)], [
        torch.full((2,), 999.0 - 130 * s) for s in range(n)
    ]


def test_matches_host_reference():
    case = reference_dit_case()
    m = case.model
    y = torch.tensor([1, 2])
    n = 7
    cal_x, ts = _direct_inputs(11, n)
    prof = fastcache.calibrate(m, lambda: [m(x, t, y) for x, t in zip(cal_x, ts)], progress=False)
    xs, _ = _direct_inputs(5, n)
    w, lam = 0.5, 2.0
    with torch.no_grad():
        # tau = the median priority: some blocks corrected, some not
        _, n_all, prios = _eoc_reference(m, prof.prior, xs, ts, y, 3, w, lam, -1.0)
        tau = sorted(prios)[len(prios) // 2]
        ref, n_corr, _ = _eoc_reference(m, prof.prior, xs, ts, y, 3, w, lam, tau)
        cfg = fastcache.EOCConfig(
            base=fastcache.FORAConfig(interval=3), profile=prof, weight=w, regulation=lam, threshold=tau, num_steps=n
        )
        with fastcache.patched(m, cfg):
            got = [m(x, t, y) for x, t in zip(xs, ts)]
            st = fastcache.stats(m)["contexts"]["default"]
    assert st["corrected"] == n_corr and 0 < n_corr < n_all
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_determination_rule_limits():
    case = reference_dit_case()
    prof = _profile(case)
    m = case.model
    base = fastcache.FORAConfig(interval=2)
    with fastcache.patched(m, fastcache.EOCConfig(base=base, profile=prof, weight=0.5, regulation=1e4)):
        case.sample(steps=STEPS)
        assert fastcache.stats(m)["contexts"]["default"]["corrected"] == 0
    with fastcache.patched(m, fastcache.EOCConfig(base=base, profile=prof, weight=0.5, regulation=0, threshold=0)):
        case.sample(steps=STEPS)
        st = fastcache.stats(m)["contexts"]["default"]
    assert st["corrected"] == st["skipped"] * len(m.blocks) > 0


def test_refusals():
    case = reference_dit_case()
    prof = _profile(case)
    m = case.model
    with pytest.raises(ValueError, match="recorded over 8-step runs"):
        fastcache.EOCConfig(base=fastcache.FORAConfig(), profile=prof, num_steps=10)
    with pytest.raises(ValueError, match="FORAConfig, a TeaCacheConfig or a"):
        fastcache.EOCConfig(base="fora", profile=prof)
    with pytest.raises(ValueError, match="must be a fastcache.Profile"):
        fastcache.EOCConfig(base=fastcache.FORAConfig(), profile=None)
    with pytest.raises(ValueError, match="row 0"):
        fastcache.EOCConfig(base=[[False, True, True]] + [[True] * 3] * 7, profile=prof)
    other = reference_dit_case()
    with torch.no_grad():
        other.model.blocks[0].attn.qkv.weight.mul_(1.0)  # same config: accepted
    fastcache.patch(other.model, fastcache.EOCConfig(base=fastcache.FORAConfig(), profile=prof)).remove()
    pix = CASES["diffusers-pixart"]()
    with pytest.raises(ValueError, match="profile was made for DiT"):
        fastcache.patch(pix.model, fastcache.EOCConfig(base=fastcache.FORAConfig(), profile=prof))
    # a step index beyond the profile's steps is refused (host index given by the caller)
    mask = [[True] * 3] + [[False] * 3] * 7
    with fastcache.patched(m, fastcache.EOCConfig(base=mask, profile=prof)):
        x, ts = _direct_inputs(1, 2)
        with pytest.raises(ValueError, match="beyond the EOC profile"), torch.no_grad():
            with fastcache.context(m, "default", step_index=prof.num_steps):
                m(x[0], ts[0], torch.tensor([1, 2]))
    assert fastcache.EOCConfig(base=mask, profile=prof).weight == 0.005
    assert fastcache.EOCConfig(base=fastcache.FORAConfig(), profile=prof).weight == 0.01


@pytest.mark.compile
def test_fullgraph_compile_teacache_base_with_trend():
    case = CASES["diffusers-pixart"]()
    m = case.model
    prof = _profile(case)
    cfg = fastcache.EOCConfig(base=fastcache.TeaCacheConfig(threshold=0.3), profile=prof, weight=0.5, threshold=0.0)
    with fastcache.patched(m, cfg):
        eager = case.sample(steps=STEPS)
        se = fastcache.stats(m)["contexts"]["default"]
        fastcache.reset(m)
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(m, fullgraph=True, backend=cnt)
        frames = []
        out = case.sample(model=compiled, steps=STEPS, per_step=lambda i, o: frames.append(cnt.frame_count))
        sc = fastcache.stats(m)["contexts"]["default"]
    assert 0 < se["skipped"] and se["corrected"] > 0
    assert frames[1] <= 2 and len(set(frames[1:])) == 1, frames
    assert sc["timeline"] == se["timeline"] and sc["corrected"] == se["corrected"]
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_repeated_timestep_call_leaves_the_interior_cache_untouched():
    case = reference_dit_case()
    m = case.model
    y = torch.tensor([1, 2])
    noise, ts = _direct_inputs(2, 6)
    xs = [noise[0] + 0.02 * n for n in noise]  # a slowly moving input: TeaCache skips some steps
    prof = fastcache.calibrate(m, lambda: [m(x, t, y) for x, t in zip(*_direct_inputs(9, 6))], progress=False)
    cfg = fastcache.EOCConfig(base=fastcache.TeaCacheConfig(threshold=0.3), profile=prof, weight=0.5, threshold=0.0)
    with torch.no_grad():
        with fastcache.patched(m, cfg):
            plain = [m(x, t, y) for x, t in zip(xs, ts)]
            s_plain = fastcache.stats(m)["contexts"]["default"]
        with fastcache.patched(m, cfg):
            got = []
            for i, (x, t) in enumerate(zip(xs, ts)):
                got.append(m(x, t, y))
                if i == 2:
                    extra = m(x * 0.5, t, y)  # the same step evaluated again (e.g. Heun)
            s_rep = fastcache.stats(m)["contexts"]["default"]
        full = m(xs[2] * 0.5, ts[2], y)
    assert 0 < s_plain["skipped"] and s_rep["repeated_timestep_calls"] == 1
    assert torch.equal(extra, full)  # computed in full
    for a, b in zip(got, plain):
        assert torch.equal(a, b)


def test_host_reads_none_with_a_host_schedule_one_flag_on_a_dynamic_base():
    from support.hostreads import HostReadMode

    case = reference_dit_case()
    prof = _profile(case)
    m = case.model
    fora, tea = fastcache.FORAConfig(interval=2), fastcache.TeaCacheConfig(threshold=0.3)
    for base, host_index, expected in ((fora, True, 0), (fora, False, STEPS), (tea, False, STEPS)):
        cfg = fastcache.EOCConfig(base=base, profile=prof, weight=0.5, threshold=0.0)
        with fastcache.patched(m, cfg):
            mode = HostReadMode()
            ctx = (lambda i: fastcache.context(m, "default", step_index=i)) if host_index else None
            with mode:
                case.sample(steps=STEPS, context=ctx)
            st = fastcache.stats(m)["contexts"]["default"]
        ours = [r for r in mode.reads if r is not None]
        assert st["corrected"] > 0
        assert len(ours) == expected, ours
        assert all("policies/interior_engine.py:run_stack" in r and ".item()" in r for r in ours), ours


@pytest.mark.compile
@pytest.mark.parametrize("family", ["fastcache-dit", "diffusers-dit", "diffusers-pixart"])
def test_fullgraph_compile_static_mask_one_cond_per_block(family):
    # diffusers' Attention calls inspect.signature on its processor; with one cond per
    # block this compiles only because the signatures are built outside the conds
    # (policies.base.warm_signatures): the diffusers families are the regression check
    case = two_block_case(family)  # one cond per block: two blocks chain one into the next
    m = case.model
    prof = _profile(case)
    L = _num_blocks(m)
    mask = [[True] * L] + [[(s + li) % 2 == 0 for li in range(L)] for s in range(1, STEPS)]
    cfg = fastcache.EOCConfig(base=mask, profile=prof, weight=0.5, threshold=0.0)
    with fastcache.patched(m, cfg):
        eager = case.sample(steps=STEPS)  # host-placed mask
        se = fastcache.stats(m)["contexts"]["default"]
        fastcache.reset(m)
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(m, fullgraph=True, backend=cnt)
        frames = []
        out = case.sample(model=compiled, steps=STEPS, per_step=lambda i, o: frames.append(cnt.frame_count))
        sc = fastcache.stats(m)["contexts"]["default"]
    assert se["corrected"] > 0 and sc["corrected"] == se["corrected"]
    assert sc["computed_fraction"] == se["computed_fraction"] < 1
    assert frames[1] <= 2 and len(set(frames[1:])) == 1, frames
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_mask_base_without_host_index_reads_its_row_once_per_step():
    """Eager with no step index from the caller: the mask row of the device's step is read
    in one host read per step, and the run equals the host-placed one bitwise."""
    from support.hostreads import HostReadMode, python_level_reads

    case = reference_dit_case()
    prof = _profile(case)
    m = case.model
    L = len(m.blocks)
    mask = [[True] * L] + [[s % 2 == 0 or b == 0 for b in range(L)] for s in range(1, STEPS)]
    cfg = fastcache.EOCConfig(base=mask, profile=prof, weight=0.5, threshold=0.0)
    outs, reads = [], []
    for host_index in (True, False):
        with fastcache.patched(m, cfg):
            mode = HostReadMode()
            ctx = (lambda i: fastcache.context(m, "default", step_index=i)) if host_index else None
            with mode, python_level_reads() as py:
                outs.append(case.sample(steps=STEPS, context=ctx))
            st = fastcache.stats(m)["contexts"]["default"]
        reads.append([r for r in mode.reads + py if r is not None])
        assert st["corrected"] > 0
    assert torch.equal(outs[0], outs[1])
    assert reads[0] == [] and len(reads[1]) == STEPS
