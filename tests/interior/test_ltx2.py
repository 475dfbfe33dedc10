"""LTX-2 (``diffusers-ltx2``): two streams of different widths (video, audio), both read
after the stack. Not in the zoo's CASES: the profile-based methods (EOC, MagCache, Block
Caching, SmoothCache) need ``fastcache.calibrate``, whose prior holds one width. Here: the
program reproduces the block bitwise (LTX-2.0, LTX-2.3 options, modality isolation), every
method that needs no profile is bitwise the model when it never skips and caches both
streams when it does, and what cannot be honoured is refused."""

import dataclasses
import inspect

import pytest
import torch
from support.methods import METHODS
from support.reach_video import ltx2_case
from support.teacache_reference import ReferenceTeaCache

import fastcache
from fastcache.interior import ComputeExecutor, InteriorLayout, program_for

STEPS = 6
# LTX-2.3: gated attention, prompt AdaLN on the text cross-attention, STG-capable processors
V23 = dict(gated_attn=True, cross_attn_mod=True, audio_gated_attn=True, audio_cross_attn_mod=True, perturbed_attn=True)


def _case(**extra):
    case = ltx2_case()
    if not extra:
        return case
    from diffusers import LTX2VideoTransformer3DModel
    from support.reach_video import _finish

    torch.manual_seed(0)
    m = _finish(LTX2VideoTransformer3DModel(**{**dict(case.model.config), **extra}))
    return dataclasses.replace(case, model=m)


def _both(case, model=None, steps=STEPS, **kw):
    """Final video latents and the audio prediction of every step."""
    audio = []
    case = dataclasses.replace(case, output=lambda o: (audio.append(o.audio_sample), o.sample)[1])
    return case.sample(model=model, steps=steps, **kw), audio


@pytest.mark.parametrize("extra", [{}, V23, dict(V23, isolate=True)], ids=["ltx2.0", "ltx2.3", "ltx2.3-isolated"])
def test_program_equals_block_bitwise(extra):
    extra = dict(extra)
    isolate = extra.pop("isolate", False)
    case = _case(**extra)
    m = case.model
    spec = fastcache.specs.find_spec(m)
    assert spec.name == "diffusers-ltx2"
    layout = InteriorLayout(spec.blocks(m))
    seen = []

    def hook(mod, args, kwargs, out):
        call = inspect.signature(type(mod).forward).bind(mod, *args, **kwargs)
        call.apply_defaults()
        call = dict(call.arguments)
        call.pop("self")
        got = program_for(mod).run(mod, call, {n: call[n] for n in spec.streams}, ComputeExecutor())
        for n, v in spec.unpack(out).items():
            assert torch.equal(got[n], v), f"stream {n} differs"
        seen.append(call["use_a2v_cross_attention"])

    hs = [e.module.register_forward_hook(hook, with_kwargs=True) for e in layout.entries]
    base = case.inputs
    case = dataclasses.replace(case, inputs=lambda x, t: {**base(x, t), "isolate_modalities": isolate})
    try:
        case.sample(steps=2)
    finally:
        for h in hs:
            h.remove()
    assert seen == [not isolate] * (2 * layout.num_blocks)


NO_PROFILE = sorted(n for n, m in METHODS.items() if not m.needs_profile and m.supports("diffusers-ltx2"))


@pytest.mark.parametrize("method", NO_PROFILE)
def test_never_skip_is_bitwise_and_caching_keeps_both_streams(method):
    case = _case()
    m = case.model
    ref, ref_audio = _both(case)
    cfg = METHODS[method]
    with fastcache.patched(m, cfg.never_skip(None, STEPS)):
        out, audio = _both(case)
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(audio, ref_audio))
    with fastcache.patched(m, cfg.caching(None, STEPS)):
        out, audio = _both(case)
        st = fastcache.stats(m)["contexts"]["default"]
    assert st.get("skipped", 0) + st.get("reused_blocks", 0) > 0 or st.get("computed_fraction", 1.0) < 1.0, st
    assert torch.isfinite(out).all() and all(torch.isfinite(a).all() for a in audio)


def test_teacache_matches_reference_and_reuses_the_audio_residual():
    """TeaCache on the video indicator: the decisions and the video output are the host
    reference's; on a skipped step the audio stream leaves the stack as its input plus the
    last computed audio residual (not passed through unchanged)."""
    case = _case()
    m = case.model
    thr, steps = 0.2, 20
    ref = ReferenceTeaCache("diffusers-ltx2", m, thr, steps)
    try:
        expected = case.sample(steps=steps)
    finally:
        ref.remove()
    ins, outs = [], []
    h1 = m.audio_proj_in.register_forward_hook(lambda mod, a, o: ins.append(o))
    h2 = m.audio_norm_out.register_forward_pre_hook(lambda mod, a: outs.append(a[0]))
    try:
        with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=thr, num_steps=steps)):
            got = case.sample(steps=steps)
            tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
    finally:
        h1.remove()
        h2.remove()
    assert tl == ref.trace and 4 <= tl.count(False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    residual = None
    for computed, a_in, a_out in zip(tl, ins, outs):
        if computed:
            residual = a_out - a_in
        else:
            torch.testing.assert_close(a_out - a_in, residual, rtol=1e-4, atol=1e-5)
            assert residual.abs().max() > 1e-3


def test_spatio_temporal_guidance_is_refused():
    """STG perturbs some blocks only: the stack replays one call, so the call is refused."""
    case = _case(perturbed_attn=True)
    m = case.model
    sch = case.scheduler()
    sch.set_timesteps(STEPS)
    kw = case.inputs(case.latents(torch.Generator()), sch.timesteps[0])
    with fastcache.patched(m, fastcache.FORAConfig(interval=2)), torch.no_grad():
        m(**kw)  # without STG: runs
        with pytest.raises(ValueError, match="spatio_temporal_guidance_blocks"):
            m(**kw, spatio_temporal_guidance_blocks=[1])


def test_per_token_timestep_indicator_is_refused():
    case = _case()
    m = case.model
    spec = fastcache.specs.find_spec(m)
    blk = m.transformer_blocks[0]
    D = blk.scale_shift_table.shape[1]
    with pytest.raises(ValueError, match="per-token timestep"):
        spec.modulation(blk, {"hidden_states": torch.zeros(2, 4, D), "temb": torch.zeros(2, 4, 6 * D)})


def test_calibrate_refuses_two_widths_naming_the_methods_that_work():
    case = _case()
    with pytest.raises(ValueError, match=r"different widths .*LTX2VideoTransformer3DModel|LTX2.*different widths"):
        fastcache.calibrate(case.model, lambda: [case.sample(steps=3)], progress=False)
