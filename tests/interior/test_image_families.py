"""Paths of the image families (fastcache/families/) that the zoo's tiny cases do not take:
each program still equals its block bitwise there, and what the stack cannot honour is
refused with an error naming the cause."""

import dataclasses

import pytest
import torch
from support.zoo import CASES

import fastcache
from fastcache.interior import ComputeExecutor


def _qwen_edit_case():
    """Qwen-Image-Edit's layout: ``zero_cond_t`` (temb doubled, the condition image's tokens
    modulated at t=0, picked per token by ``modulate_index``); one condition image of the
    target's size is appended to every sample's tokens."""
    from diffusers import QwenImageTransformer2DModel
    from support.zoo import _randomize_zero_init

    base = CASES["diffusers-qwenimage"]()
    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(**{**base.model.config, "zero_cond_t": True}).eval()
    _randomize_zero_init(m)
    cond = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(7))

    def inputs(x, t):
        kw = base.inputs(x, t)
        kw["hidden_states"] = torch.cat([x, cond[: x.shape[0]]], dim=1)
        kw["img_shapes"] = [[(1, 4, 4), (1, 4, 4)]] * x.shape[0]
        return kw

    return dataclasses.replace(base, model=m, inputs=inputs, output=lambda o: o.sample[:, :16])


def test_qwenimage_edit_refuses_what_needs_one_modulation_per_sample():
    """An edit model's gates differ per token: the indicator and the re-gating of a cached
    branch cannot take them; FORA refuses at patch time, TeaCache at its first step."""
    case = _qwen_edit_case()
    m = case.model
    with pytest.raises(ValueError, match="zero_cond_t=True.*branch-level caching.*FirstBlockCacheConfig"):
        fastcache.patch(m, fastcache.FORAConfig(interval=2))
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.1)):
        with pytest.raises(ValueError, match="zero_cond_t=True.*TeaCache indicator"):
            case.sample(steps=2)


def test_qwenimage_edit_runs_under_a_stack_level_method():
    case = _qwen_edit_case()
    m = case.model
    ref = case.sample(steps=6)
    with fastcache.patched(m, fastcache.FirstBlockCacheConfig(threshold=0.0)):
        assert torch.equal(case.sample(steps=6), ref)
    with fastcache.patched(m, fastcache.FirstBlockCacheConfig(threshold=2.0)):
        case.sample(steps=6)
        assert fastcache.stats(m)["contexts"]["default"]["skipped"] > 0


def test_flux2_refuses_the_reference_kv_cache():
    """Flux.2's reference-image KV cache hands each block its own layer cache by mutating
    one kwargs dict between block calls: the stack, which calls every block with the first
    block's arguments, refuses it before running."""
    case = CASES["diffusers-flux2"]()
    m = case.model
    x = case.latents(torch.Generator().manual_seed(1))
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.1)):
        with pytest.raises(ValueError, match="kv_cache_mode=.*adds values between blocks"):
            m(**case.inputs(x, torch.tensor(999.0)), kv_cache_mode="extract", num_ref_tokens=0)


def test_a_model_whose_timestep_rises_during_a_run_is_one_run():
    """Z-Image's ``t`` is ``1 - sigma`` (it rises over the run; ModelSpec.timestep_rises):
    the 20 steps are one run, and TeaCache skips within it."""
    case = CASES["diffusers-zimage"]()
    with fastcache.patched(case.model, fastcache.TeaCacheConfig(threshold=0.5, num_steps=20)):
        case.sample(steps=20)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert st["runs"] == 1 and st["run_length_mismatches"] == 0, st
    assert st["skipped"] >= 4, st


def test_zimage_omni_per_token_modulation_is_refused():
    """Omni mode (``noise_mask``) modulates noisy and clean tokens apart: the indicator and
    the branch program say so instead of reading one modulation per sample."""
    from fastcache.families import zimage

    case = CASES["diffusers-zimage"]()
    block = case.model.layers[0]
    x = torch.randn(2, 64, 32)
    call = {"x": x, "attn_mask": None, "freqs_cis": None, "adaln_input": None, "noise_mask": torch.ones(2, 64)}
    with pytest.raises(ValueError, match="omni mode.*TeaCache indicator.*FirstBlockCacheConfig"):
        zimage.SPEC.modulation(block, call)
    with pytest.raises(ValueError, match="omni mode.*branch-level caching"):
        zimage.ZImageProgram().run(block, call, {"x": x}, ComputeExecutor())
