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
