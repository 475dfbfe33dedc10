"""T-GATE on the block interior (docs/methods.md section 5; fastcache/policies/tgate.py).

* the schedule equals a host reference of the published scheduler, written here;
* a "never cache" setting (gate at the last step, self-attention every step) is bitwise
  the unpatched model;
* parity with a host reference written here from Eq. G1-G3 the way the authors implement
  it (each Attention module's forward replaced: reuse a cached output, or cache it, the
  gate step caching the mean of the CFG halves), in a batched-CFG DDIM loop;
* the paper's own pipeline (the CFG batch dropped after the gate, one pass with the
  unconditional text, no guidance) gives the same images as fastcache's batched run;
* eager: no host read with the caller's step index, one per step otherwise; the host and
  the device schedules agree bitwise;
* torch.compile(fullgraph=True): no graph break, no recompilation across steps;
* refusals: models without cross-attention (named), odd batches with cfg="batched", CFG as
  separate calls; repeated calls and runs entered after the gate compute (never silently wrong).
"""

import contextlib

import pytest
import torch
from diffusers import DDIMScheduler
from support.hostreads import HostReadMode
from support.zoo import CASES, pixart_case, two_block_case
from torch._dynamo.testing import CompileCounterWithBackend

import fastcache

STEPS = 10
GUIDANCE = 4.5


# --------------------------------------------------------------------------- references
def reference_schedule(s, G, W, P_sp, P_fi):
    """The published scheduler's flags at step s: (ca_cache, ca_reuse, sa_cache, sa_reuse, keep_shape)."""
    if s < G - 1:
        if s < W:
            sa = (False, False)
        elif s == W:
            sa = (True, False)
        else:
            sa = (True, False) if s % P_sp == 0 else (False, True)
        return (False, False, *sa, True)
    if s == G - 1:
        return (True, False, True, False, False)
    sa = (True, False) if s % P_fi == 0 else (False, True)
    return (False, True, *sa, True)


class ReferenceTGate:
    """T-GATE the way its authors implement it: every Attention module's forward is
    replaced; it returns its cached output when told to reuse one, else computes and,
    when told to cache, keeps the output (the mean of the CFG halves when keep_shape is
    False). ``dup``: keep the batch after the gate (store the mean for both halves); else
    the sampler drops the CFG batch after the gate and the mean is stored once."""

    def __init__(self, model, G, W, P_sp, P_fi, dup=True):
        self.G, self.W, self.P_sp, self.P_fi, self.dup = G, W, P_sp, P_fi, dup
        self.step = 0
        self.cache = {}
        self.mods = []
        for li, blk in enumerate(model.transformer_blocks):
            for kind, mod in (("sa", blk.attn1), ("ca", blk.attn2)):
                self.mods.append(mod)
                mod.forward = self._wrap(mod.forward, (li, kind), kind)

    def _wrap(self, orig, key, kind):
        def forward(*args, **kwargs):
            ca_c, ca_r, sa_c, sa_r, keep = reference_schedule(self.step, self.G, self.W, self.P_sp, self.P_fi)
            cache, reuse = (ca_c, ca_r) if kind == "ca" else (sa_c, sa_r)
            if reuse and key in self.cache:
                return self.cache[key]
            out = orig(*args, **kwargs)
            if cache:
                if keep:
                    self.cache[key] = out
                else:
                    u, c = out.chunk(2)
                    m = (u + c) / 2
                    self.cache[key] = torch.cat([m, m]) if self.dup else m
            return out

        return forward

    def remove(self):
        for m in self.mods:
            del m.forward


def cfg_sample(model, steps=STEPS, seed=1, context=None, drop_after=None, per_step=None):
    """DDIM with batched classifier-free guidance as diffusers' PixArt pipeline runs it:
    the batch is [uncond; cond] with the same latents in both halves. ``drop_after``: from
    that step on, the T-GATE paper's pipeline (one pass, unconditional text, no guidance).
    ``context(i)``: a context manager around step i's call; ``per_step(i, eps_u, eps_c)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    neg, pos = torch.randn(1, 5, 24, generator=g), torch.randn(1, 5, 24, generator=g)
    sch = DDIMScheduler()
    sch.set_timesteps(steps)
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            drop = drop_after is not None and i >= drop_after
            inp, enc = (x, neg) if drop else (torch.cat([x, x]), torch.cat([neg, pos]))
            with context(i) if context is not None else contextlib.nullcontext():
                out = model(
                    hidden_states=inp,
                    encoder_hidden_states=enc,
                    timestep=t.expand(inp.shape[0]),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                ).sample
            eps = out.chunk(2, dim=1)[0]  # learned sigma: keep epsilon
            if not drop:
                u, c = eps.chunk(2)
                if per_step is not None:
                    per_step(i, u, c)
                eps = u + GUIDANCE * (c - u)
            x = sch.step(eps, t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def pixart():
    return pixart_case().model


def _host_index(m):
    return lambda i: fastcache.context(m, "default", step_index=i)


# --------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    "G,W,P_sp,P_fi", [(15, 2, 3, 1), (10, 2, 5, 1), (6, 0, 2, 3), (1, 0, 1, 2), (8, 7, 4, 1), (3, 5, 2, 2)]
)
def test_plan_is_the_published_schedule(G, W, P_sp, P_fi):
    cfg = fastcache.TGateConfig(gate_step=G, warm_up=W, sp_interval=P_sp, fi_interval=P_fi)
    for s in range(30):
        ca_c, ca_r, sa_c, sa_r, keep = reference_schedule(s, G, W, P_sp, P_fi)
        sa, cross = cfg.plan(s)
        # self-attention computed unless reused; the reference's uncached computes (s < W)
        # are computed here too (and cached: only the latest value is ever reused)
        assert sa == (not sa_r), s
        assert cross == ("reuse" if ca_r else "gate" if ca_c else "compute"), s
        assert (cross == "gate") == (not keep), s


def test_config_validation():
    for kw, field in (
        ({"gate_step": 0}, "gate_step"),
        ({"warm_up": -1}, "warm_up"),
        ({"sp_interval": 0}, "sp_interval"),
        ({"fi_interval": 1.5}, "fi_interval"),
        ({"cfg": "separate"}, "cfg"),
        ({"num_steps": 0}, "num_steps"),
        ({"history": 0}, "history"),
    ):
        with pytest.raises(ValueError, match=field):
            fastcache.TGateConfig(**kw)
    with pytest.raises(ValueError, match="gate_step=30 > num_steps=25"):
        fastcache.TGateConfig(gate_step=30, num_steps=25)
    cfg = fastcache.TGateConfig()
    assert (cfg.gate_step, cfg.warm_up, cfg.sp_interval, cfg.fi_interval, cfg.cfg) == (15, 2, 3, 1, "batched")
    assert fastcache.config.CacheConfig.from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("cfg_mode", ["batched", "none"])
def test_never_cache_setting_is_bitwise_unpatched(pixart, cfg_mode):
    ref = cfg_sample(pixart)
    cfg = fastcache.TGateConfig(gate_step=STEPS, warm_up=0, sp_interval=1, fi_interval=1, cfg=cfg_mode)
    for ctx in (None, _host_index(pixart)):
        with fastcache.patched(pixart, cfg):
            out = cfg_sample(pixart, context=ctx)
            st = fastcache.stats(pixart)["contexts"]["default"]
        assert torch.equal(out, ref)
        assert st["self_attn"]["reused"] == st["cross_attn"]["reused"] == 0 and st["computed_fraction"] == 1.0


@pytest.mark.parametrize("G,W,P_sp,P_fi", [(5, 1, 3, 1), (4, 0, 2, 3)])
def test_matches_reference_and_host_device_schedules_agree(pixart, G, W, P_sp, P_fi):
    ref_impl = ReferenceTGate(pixart, G, W, P_sp, P_fi)
    try:
        ref = cfg_sample(pixart, context=lambda i: _set_step(ref_impl, i))
    finally:
        ref_impl.remove()
    cfg = fastcache.TGateConfig(gate_step=G, warm_up=W, sp_interval=P_sp, fi_interval=P_fi, num_steps=STEPS)
    with fastcache.patched(pixart, cfg):
        host = cfg_sample(pixart, context=_host_index(pixart))
        sh = fastcache.stats(pixart)["contexts"]["default"]
    with fastcache.patched(pixart, cfg):
        dev = cfg_sample(pixart)
        sd = fastcache.stats(pixart)["contexts"]["default"]
    plan = [cfg.plan(s) for s in range(STEPS)]
    L = len(pixart.transformer_blocks)
    assert (
        sh["timeline"]
        == sd["timeline"]
        == [("S" if a else "s") + {"compute": "C", "gate": "G", "reuse": "c"}[b] for a, b in plan]
    )
    assert sh["cross_attn"] == sd["cross_attn"] == {"computed": G * L, "reused": (STEPS - G) * L}
    assert sh["self_attn"]["reused"] == sum(not a for a, _ in plan) * L > 0
    assert torch.equal(host, dev)
    torch.testing.assert_close(host, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(host, cfg_sample(pixart), rtol=1e-3, atol=1e-3)  # the cache changed the result


def _set_step(ref_impl, i):
    ref_impl.step = i
    return contextlib.nullcontext()


def test_equals_the_papers_pipeline_that_drops_the_cfg_batch(pixart):
    """After the gate both halves get the same cross-attention C (and self-attention cached
    as the halves' mean); with equal latents and timestep the halves are equal, so the
    guided output is the single unconditional pass the paper's pipeline runs."""
    G, W, P_sp, P_fi = 5, 1, 2, 2
    ref_impl = ReferenceTGate(pixart, G, W, P_sp, P_fi, dup=False)
    try:
        paper = cfg_sample(pixart, context=lambda i: _set_step(ref_impl, i), drop_after=G)
    finally:
        ref_impl.remove()
    gaps = {}
    cfg = fastcache.TGateConfig(gate_step=G, warm_up=W, sp_interval=P_sp, fi_interval=P_fi)
    with fastcache.patched(pixart, cfg):
        ours = cfg_sample(pixart, per_step=lambda i, u, c: gaps.__setitem__(i, (u - c).abs().max().item()))
    assert all(gaps[i] > 0 for i in range(G)) and all(gaps[i] < 1e-6 for i in range(G, STEPS)), gaps
    torch.testing.assert_close(ours, paper, rtol=1e-5, atol=1e-5)


def test_the_papers_pipeline_runs_patched(pixart):
    """The sampler drops the CFG duplicate from the gate on (one pass, unconditional text):
    the patched model serves the half batch from the cached values (eager, both step
    placements), equal to the reference implementation of that pipeline; dropping it
    before the gate is refused."""
    G, W, P_sp, P_fi = 5, 1, 2, 2
    ref_impl = ReferenceTGate(pixart, G, W, P_sp, P_fi, dup=False)
    try:
        paper = cfg_sample(pixart, context=lambda i: _set_step(ref_impl, i), drop_after=G)
    finally:
        ref_impl.remove()
    cfg = fastcache.TGateConfig(gate_step=G, warm_up=W, sp_interval=P_sp, fi_interval=P_fi)
    L = len(pixart.transformer_blocks)
    for ctx in (None, _host_index(pixart)):
        with fastcache.patched(pixart, cfg):
            ours = cfg_sample(pixart, drop_after=G, context=ctx)
            st = fastcache.stats(pixart)["contexts"]["default"]
        assert st["cross_attn"] == {"computed": G * L, "reused": (STEPS - G) * L} and st["fallbacks"] == 0
        torch.testing.assert_close(ours, paper, rtol=1e-5, atol=1e-6)
        with fastcache.patched(pixart, cfg):
            with pytest.raises(ValueError, match="half the CFG batch"):
                cfg_sample(pixart, drop_after=G - 1, context=ctx)


def test_repeated_call_computes_and_leaves_the_cache(pixart):
    cfg = fastcache.TGateConfig(gate_step=4, warm_up=0, sp_interval=2, fi_interval=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    enc = torch.randn(2, 5, 24, generator=g)
    ts = [torch.full((2,), 900.0 - 100 * s) for s in range(8)]
    kw = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    with torch.no_grad():
        for host_index in (False, True):

            def at(s, host_index=host_index):
                return fastcache.context(pixart, "default", step_index=s) if host_index else contextlib.nullcontext()

            outs = {}
            for repeat in (False, True):
                with fastcache.patched(pixart, cfg):
                    for s, t in enumerate(ts):
                        with at(s):
                            outs[repeat, s] = pixart(x + 0.01 * s, enc, timestep=t, **kw).sample
                        if repeat and s == 5:  # step 5 (after the gate) evaluated again: computed in full
                            with at(s):
                                extra = pixart(x * 0.5, enc, timestep=t, **kw).sample
                    st = fastcache.stats(pixart)["contexts"]["default"]
            full = pixart(x * 0.5, enc, timestep=ts[5], **kw).sample
            assert st["repeated_calls"] == 1
            assert torch.equal(extra, full)
            for s in range(len(ts)):
                assert torch.equal(outs[False, s], outs[True, s]), s


def test_run_entered_after_the_gate_computes_instead(pixart):
    """Host step indices that start after the gate (nothing of this run cached): the
    reused branches are computed (and then cached), counted and warned about."""
    cfg = fastcache.TGateConfig(gate_step=3, warm_up=0, sp_interval=1, fi_interval=1)
    g = torch.Generator().manual_seed(0)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g)
    t = torch.full((2,), 500.0)
    kw = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    with torch.no_grad():
        full = pixart(x, enc, timestep=t, **kw).sample
        with fastcache.patched(pixart, cfg):
            with fastcache.context(pixart, "default", step_index=6):
                got = pixart(x, enc, timestep=t, **kw).sample
            st = fastcache.stats(pixart)["contexts"]["default"]
    assert torch.equal(got, full)
    assert st["fallbacks"] == len(pixart.transformer_blocks)
    assert any("computed instead" in w for w in st["warnings"])


# --------------------------------------------------------------------------- host reads, compile
def test_host_reads_none_with_a_step_index_one_per_step_otherwise(pixart):
    cfg = fastcache.TGateConfig(gate_step=5, warm_up=1, sp_interval=2, fi_interval=2)
    for ctx, expected in ((_host_index(pixart), 0), (None, STEPS)):
        with fastcache.patched(pixart, cfg):
            mode = HostReadMode()
            with mode:
                cfg_sample(pixart, context=ctx)
            st = fastcache.stats(pixart)["contexts"]["default"]
        ours = [r for r in mode.reads if r is not None]
        assert st["cross_attn"]["reused"] > 0 and st["self_attn"]["reused"] > 0
        assert len(ours) == expected, ours
        assert all("policies/tgate.py:run_stack" in r and ".item()" in r for r in ours), ours


@pytest.mark.compile
@pytest.mark.parametrize("P_fi,conds_per_step", [(1, {1, 2}), (2, {2})])
def test_fullgraph_compile_no_breaks_no_recompiles(P_fi, conds_per_step):
    # PixArt with two blocks (the conds are per step, around every block's gated parts: a
    # third block of the same kind adds trace time and nothing else)
    pixart = two_block_case("diffusers-pixart").model
    cfg = fastcache.TGateConfig(gate_step=5, warm_up=1, sp_interval=2, fi_interval=P_fi)
    with fastcache.patched(pixart, cfg):
        eager = cfg_sample(pixart)
        se = fastcache.stats(pixart)["contexts"]["default"]
        fastcache.reset(pixart)
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(pixart, fullgraph=True, backend=cnt)  # fullgraph: any graph break raises
        frames, conds = [], []
        mode = HostReadMode()

        def per_step(i, u, c):
            frames.append(cnt.frame_count)
            conds.append(len(mode.conds))

        with mode:
            out = cfg_sample(compiled, per_step=per_step)
        sc = fastcache.stats(pixart)["contexts"]["default"]
    # the first call allocates the caches (a second trace); then no recompilation
    assert frames[1] <= 2 and len(set(frames[1:])) == 1, frames
    per = [b - a for a, b in zip(conds[1:], conds[2:])]
    assert set(per) <= conds_per_step and per, conds  # the phase cond, and the self-attention cond where needed
    assert sc["timeline"] == se["timeline"]
    assert sc["cross_attn"] == se["cross_attn"] and sc["self_attn"] == se["self_attn"]
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- refusals, stats
@pytest.mark.parametrize("name", ["diffusers-dit", "diffusers-flux", "diffusers-sd3", "fastcache-dit"])
def test_models_without_cross_attention_are_refused(name):
    m = CASES[name]().model
    with pytest.raises(ValueError, match=f"{type(m).__name__}.*has no cross-attention"):
        fastcache.patch(m, fastcache.TGateConfig())
    assert "forward" not in m.__dict__ and fastcache.runtime._find(m) is None


def test_odd_batch_and_separate_cfg_calls_are_refused(pixart):
    g = torch.Generator().manual_seed(0)
    kw = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    x, enc, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 24, generator=g), torch.full((3,), 900.0)
    with torch.no_grad():
        with fastcache.patched(pixart, fastcache.TGateConfig()):
            with pytest.raises(ValueError, match="batch 3.*cfg='none'"):
                pixart(x, enc, timestep=t, **kw)
        with fastcache.patched(pixart, fastcache.TGateConfig(cfg="none")):
            pixart(x, enc, timestep=t, **kw)  # accepted
        with fastcache.patched(pixart, fastcache.TGateConfig()):
            with fastcache.context(pixart, "cond"):
                pixart(x[:2], enc[:2], timestep=t[:2], **kw)
            with pytest.raises(ValueError, match="more than one cache context"):
                with fastcache.context(pixart, "uncond"):
                    pixart(x[:2], enc[:2], timestep=t[:2], **kw)


def test_stats_cache_bytes(pixart):
    cfg = fastcache.TGateConfig(gate_step=3, warm_up=0, sp_interval=2, fi_interval=1)
    with fastcache.patched(pixart, cfg) as h:
        cfg_sample(pixart, steps=5)
        st = fastcache.stats(pixart)["contexts"]["default"]
        state = h.contexts["default"]
        held = sum(c.numel() * c.element_size() for c in state.cache if c is not None)
    L = len(pixart.transformer_blocks)
    # one self-attention and one cross-attention output per block, (2B, N, D) fp32
    assert held == 2 * L * 2 * 16 * 32 * 4
    assert st["cache_bytes"] >= held and st["cache_bytes"] - held < 64 * 1024  # + the small decision state
    assert st["computed_fraction"] == pytest.approx(
        (st["self_attn"]["computed"] + st["cross_attn"]["computed"] + 5 * L) / (5 * 3 * L)
    )
