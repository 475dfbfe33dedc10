"""The Wan copies fastcache/families/wan.py describes beyond the zoo's tiny cases:
SkyReels-V2's diffusion forcing (a per-frame timestep: ``temb`` laid out ``(B, 6, N, D)``,
a causal self-attention mask) replayed bitwise by its program and refused by the
per-sample indicator; and Wan VACE, which no spec may claim."""

import inspect

import pytest
import torch
from support.zoo import WAN_CONFIG, _randomize_zero_init

import fastcache
from fastcache.interior import ComputeExecutor, program_for


def _skyreels_df():
    """SkyReels-V2 in diffusion forcing: 4 latent frames, causal blocks of 2 frames, each
    frame at its own timestep (the pipeline's asynchronous schedule)."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    m = SkyReelsV2Transformer3DModel(**WAN_CONFIG, num_frame_per_block=2).eval()
    _randomize_zero_init(m)
    g = torch.Generator().manual_seed(1)
    kw = dict(
        hidden_states=torch.randn(2, 4, 4, 8, 8, generator=g),
        timestep=torch.tensor([[999.0, 999.0, 700.0, 700.0], [999.0, 999.0, 500.0, 500.0]]),
        encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
        enable_diffusion_forcing=True,
    )
    return m, kw


def test_skyreels_diffusion_forcing_program_equals_block_bitwise():
    m, kw = _skyreels_df()
    seen = []

    def hook(mod, args, kwargs, out):
        call = inspect.signature(type(mod).forward).bind(mod, *args, **kwargs).arguments
        call.pop("self")
        assert call["temb"].ndim == 4 and call["attention_mask"] is not None  # the path under test
        got = program_for(mod).run(mod, call, {"hidden_states": call["hidden_states"]}, ComputeExecutor())
        seen.append(torch.equal(got["hidden_states"], out))

    hs = [b.register_forward_hook(hook, with_kwargs=True) for b in m.blocks]
    try:
        with torch.no_grad():
            m(**kw)
    finally:
        for h in hs:
            h.remove()
    assert seen == [True] * len(m.blocks)


def test_skyreels_diffusion_forcing_runs_branch_level_and_refuses_the_indicator():
    m, kw = _skyreels_df()
    with torch.no_grad():
        ref = m(**kw).sample
        with fastcache.patched(m, fastcache.FORAConfig(interval=1)):
            assert torch.equal(m(**kw).sample, ref)
        with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.1)):
            with pytest.raises(ValueError, match="SkyReels-V2 diffusion forcing.*branch-level method"):
                m(**kw)


def test_wan_vace_is_not_taken_for_wan():
    """WanVACETransformer3DModel runs Wan's blocks but adds a control hint to the hidden
    states after some of them: the curated stack (one call for all blocks) would add the
    hints after the last block, so no curated spec may match it."""
    from support.reach_video import wan_vace_case

    m = wan_vace_case().model
    with pytest.raises(TypeError, match="WanVACETransformer3DModel"):
        fastcache.specs.find_spec(m)
