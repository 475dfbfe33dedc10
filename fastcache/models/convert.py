"""The reference DiT (:class:`fastcache.models.DiT`) as diffusers' ``DiTTransformer2DModel``.

The same trained weights in diffusers' class let the peers' caches — diffusers' hooks
(First-Block Cache, TaylorSeer, MagCache) and cache-dit — run on the shipped digits DiT
next to fastcache's policies, on a model whose PSNR against the uncached run means
something (bench/bench_compare.py).

The two classes compute the same function once three differences are bridged:

* diffusers computes the timestep + label embedding inside every block's ``norm1.emb``
  (and the final layer reads block 0's); the reference computes it once. Every block gets
  a copy of the same embedding weights.
* diffusers' DiT timestep frequencies divide by ``half - 1`` (``downscale_freq_shift=1``);
  the reference divides by ``half``. The converted model's ``time_proj`` modules are set to
  shift 0.
* the fixed 2-D sin-cos position table: diffusers puts the column coordinate in the first
  half of the channels, the reference the row coordinate. The converted model's
  ``pos_embed.pos_embed`` buffer is replaced by the reference's table.

The outputs then agree to fp32 rounding (attention: fused vs separate q/k/v projections;
tests/models/test_convert.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .dit import DiT, DiTConfig

__all__ = ["DiffusersDiT", "dit_to_diffusers"]


def dit_to_diffusers(model: DiT):
    """A ``diffusers.DiTTransformer2DModel`` computing ``model``'s function (eval mode,
    same device and dtype). ``forward(hidden_states, timestep, class_labels)``."""
    from diffusers import DiTTransformer2DModel

    cfg: DiTConfig = model.config
    D, H = cfg.hidden_size, cfg.num_heads
    if round(D * cfg.mlp_ratio) != 4 * D:
        raise ValueError(
            f"dit_to_diffusers: DiTTransformer2DModel's MLP is 4x wide; this model's mlp_ratio is {cfg.mlp_ratio}"
        )
    p = next(model.parameters())
    out = DiTTransformer2DModel(
        num_attention_heads=H,
        attention_head_dim=D // H,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        num_layers=cfg.depth,
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        num_embeds_ada_norm=cfg.num_classes,
        norm_eps=1e-6,
    )
    if (p.device, p.dtype) != (torch.device("cpu"), torch.float32):
        out = out.to(device=p.device, dtype=p.dtype)
    sd = {
        "pos_embed.proj.weight": model.patch_embed.proj.weight,
        "pos_embed.proj.bias": model.patch_embed.proj.bias,
        "proj_out_1.weight": model.final_layer.adaLN_modulation[-1].weight,
        "proj_out_1.bias": model.final_layer.adaLN_modulation[-1].bias,
        "proj_out_2.weight": model.final_layer.linear.weight,
        "proj_out_2.bias": model.final_layer.linear.bias,
    }
    for i, blk in enumerate(model.blocks):
        pre = f"transformer_blocks.{i}."
        emb = pre + "norm1.emb."
        sd[emb + "timestep_embedder.linear_1.weight"] = model.t_embedder.mlp[0].weight
        sd[emb + "timestep_embedder.linear_1.bias"] = model.t_embedder.mlp[0].bias
        sd[emb + "timestep_embedder.linear_2.weight"] = model.t_embedder.mlp[2].weight
        sd[emb + "timestep_embedder.linear_2.bias"] = model.t_embedder.mlp[2].bias
        sd[emb + "class_embedder.embedding_table.weight"] = model.y_embedder.embedding_table.weight
        sd[pre + "norm1.linear.weight"] = blk.adaLN_modulation[-1].weight
        sd[pre + "norm1.linear.bias"] = blk.adaLN_modulation[-1].bias
        for name, w, b in zip(("to_q", "to_k", "to_v"), blk.attn.qkv.weight.chunk(3, 0), blk.attn.qkv.bias.chunk(3, 0)):
            sd[pre + f"attn1.{name}.weight"] = w
            sd[pre + f"attn1.{name}.bias"] = b
        sd[pre + "attn1.to_out.0.weight"] = blk.attn.proj.weight
        sd[pre + "attn1.to_out.0.bias"] = blk.attn.proj.bias
        sd[pre + "ff.net.0.proj.weight"] = blk.mlp.fc1.weight
        sd[pre + "ff.net.0.proj.bias"] = blk.mlp.fc1.bias
        sd[pre + "ff.net.2.weight"] = blk.mlp.fc2.weight
        sd[pre + "ff.net.2.bias"] = blk.mlp.fc2.bias
    missing, unexpected = out.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("pos_embed.pos_embed")]
    if missing or unexpected:
        raise RuntimeError(f"dit_to_diffusers: unmapped parameters, missing {missing}, unexpected {unexpected}")
    for m in out.modules():
        if type(m).__name__ == "Timesteps":
            m.downscale_freq_shift = 0  # the reference divides the frequencies by half, not half - 1
    out.pos_embed.pos_embed = model.pos_embed.detach().clone().to(out.pos_embed.pos_embed)
    return out.eval()


class DiffusersDiT(nn.Module):
    """A converted digits DiT with the reference's call signature ``(x, t, y) -> eps`` and
    ``config``, so :func:`fastcache.models.sample_digits` samples with it. Patch or hook
    ``self.transformer`` (the diffusers model). Each call runs in the cache context
    ``context``, as diffusers' pipelines set it: diffusers' stateful hooks key their state
    by it (``DiTTransformer2DModel`` has no ``cache_context`` method, so the hooks' context
    is set directly), and so does a fastcache patch (:func:`fastcache.context`)."""

    def __init__(self, model: DiT, context: str = "cfg"):
        super().__init__()
        self.transformer = dit_to_diffusers(model)
        self.config = model.config
        self.context = context

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        from ..runtime import context

        tr = self.transformer
        _set_cache_context(tr, CacheContext(self.context))
        try:
            with context(tr, self.context):
                return tr(hidden_states=x, timestep=t, class_labels=y, return_dict=False)[0]
        finally:
            _set_cache_context(tr, None)
