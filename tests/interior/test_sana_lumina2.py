"""What the Sana and Lumina-Image 2.0 specs promise beyond the shared contract suite: what
the stack cannot honour is refused before any block runs, and the TeaCache indicator is the
TeaCache authors' for the model."""

import pytest
import torch
from support.zoo import CASES

import fastcache


def test_sana_refuses_controlnet_residuals():
    """SanaControlNetPipeline adds one residual per block between the blocks: the cached
    stack (one call for all blocks) cannot place them, so the call is refused."""
    case = CASES["diffusers-sana"]()
    m = case.model
    x = case.latents(torch.Generator().manual_seed(1))
    kw = case.inputs(x, torch.tensor(999.0))
    with torch.no_grad():
        hidden = m.patch_embed(x)
    samples = tuple(torch.zeros_like(hidden) for _ in m.transformer_blocks)
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.1)):
        with pytest.raises(ValueError, match="controlnet_block_samples=.*adds values between blocks"):
            m(**kw, controlnet_block_samples=samples)


def test_lumina2_indicator_is_the_teacache_authors():
    """TeaCache4Lumina2's indicator, ``layers[0].norm1(x, temb)[0]`` (RMSNorm(x) * (1 +
    scale_msa)), is what the op keeps as the previous modulated input ([m, -m])."""
    import inspect

    from fastcache.ops.reference import modulated_rel_l1_sums

    case = CASES["diffusers-lumina2"]()
    spec = fastcache.specs.find_spec(case.model)
    head = spec.blocks(case.model)[0][0]
    seen = {}

    def hook(mod, args, kwargs):
        seen.update(inspect.signature(type(mod).forward).bind(mod, *args, **kwargs).arguments)

    h = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        case.sample(steps=1)
    finally:
        h.remove()
    with torch.no_grad():
        x, shift, scale, eps, *_ = spec.modulation(head, seen)
        prev = torch.zeros_like(x)
        modulated_rel_l1_sums(x, shift, scale, eps, prev)
        want = head.norm1(seen["hidden_states"], seen["temb"])[0]
    D = want.shape[-1]
    torch.testing.assert_close(prev[..., :D], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prev[..., D:], -want, rtol=1e-5, atol=1e-6)
