"""A host-side TeaCache written from docs/methods.md, independent of fastcache's runtime.

It runs the *unpatched* model and uses ordinary module hooks: a pre-hook on the first
block computes the indicator (with the block's own modules) and decides in Python; a
hook on the last block replaces its output on skipped steps with ``x_in + R`` and
stores ``R = out - x_in`` on computed steps. Every block still runs (the reference is
about semantics, not speed), so its outputs are what a correct cache must produce.
"""

from __future__ import annotations

import numpy as np
import torch


def _modulate(h, shift, scale):
    return h * (1 + scale) + shift


# (first block, its call as a kwargs dict) -> modulated input I_s
INDICATORS = {
    "diffusers-dit": lambda b, kw: b.norm1(
        kw["hidden_states"], kw["timestep"], kw["class_labels"], hidden_dtype=kw["hidden_states"].dtype
    )[0],
    "diffusers-pixart": lambda b, kw: _modulate(
        b.norm1(kw["hidden_states"]),
        *(b.scale_shift_table[None] + kw["timestep"].reshape(kw["hidden_states"].shape[0], 6, -1)).chunk(6, 1)[:2],
    ),
    "diffusers-flux": lambda b, kw: b.norm1(kw["hidden_states"], emb=kw["temb"])[0],
    "diffusers-sd3": lambda b, kw: b.norm1(kw["hidden_states"], emb=kw["temb"])[0],
    "fastcache-dit": lambda b, kw: _modulate(
        b.norm1(kw["x"]), *(t[:, None] for t in b.adaLN_modulation(kw["c"]).chunk(6, 1)[:2])
    ),
    "diffusers-wan": lambda b, kw: _modulate(
        b.norm1(kw["hidden_states"].float()), *(b.scale_shift_table + kw["temb"].float()).chunk(6, 1)[:2]
    ),
    "diffusers-qwenimage": lambda b, kw: _modulate(
        b.img_norm1(kw["hidden_states"]), *(c[:, None] for c in b.img_mod(kw["temb"]).chunk(6, -1)[:2])
    ),
    "diffusers-flux2": lambda b, kw: _modulate(b.norm(kw["hidden_states"]), *kw["temb_mod"][:, None].chunk(3, -1)[:2]),
    "diffusers-zimage": lambda b, kw: (
        torch.nn.functional.layer_norm(kw["x"], kw["x"].shape[-1:], eps=b.attention_norm1.eps)
        * (b.attention_norm1.weight * (1 + b.adaLN_modulation(kw["adaln_input"]).chunk(4, 1)[0]))[:, None]
    ),
}
INDICATORS["diffusers-hunyuanvideo"] = lambda b, kw: b.norm1(kw["hidden_states"], emb=kw["temb"])[0]
INDICATORS["diffusers-cogvideox"] = lambda b, kw: kw["temb"]  # TeaCache-CogVideoX: the time embedding
INDICATORS["diffusers-ltx"] = lambda b, kw: _modulate(
    b.norm1(kw["hidden_states"]),
    *(b.scale_shift_table[None, None] + kw["temb"].reshape(kw["temb"].shape[0], 1, 6, -1)).unbind(2)[:2],
)
INDICATORS["diffusers-mochi"] = lambda b, kw: b.norm1(kw["hidden_states"], kw["temb"])[0]
INDICATORS["diffusers-chronoedit"] = INDICATORS["diffusers-skyreelsv2"] = INDICATORS["diffusers-wan"]
INDICATORS["diffusers-sana"] = INDICATORS["diffusers-pixart"]
INDICATORS["diffusers-lumina2"] = lambda b, kw: b.norm1(kw["hidden_states"], kw["temb"])[0]
INDICATORS["diffusers-hunyuanvideo15"] = INDICATORS["diffusers-hunyuanvideo"]
INDICATORS["diffusers-hunyuanimage"] = INDICATORS["diffusers-hunyuanvideo"]
INDICATORS["diffusers-ltx2"] = lambda b, kw: _modulate(
    b.norm1(kw["hidden_states"]), *b.get_mod_params(b.scale_shift_table, kw["temb"], kw["temb"].shape[0])[:2]
)
STREAM = {"fastcache-dit": "x", "diffusers-zimage": "x"}
POSITIONAL = {
    "diffusers-dit": ["hidden_states"],
    "diffusers-pixart": ["hidden_states"],
    "fastcache-dit": ["x", "c"],
    "diffusers-wan": ["hidden_states", "encoder_hidden_states", "temb", "rotary_emb"],
    "diffusers-zimage": ["x", "attn_mask", "freqs_cis", "adaln_input", "noise_mask", "adaln_noisy", "adaln_clean"],
}
POSITIONAL["diffusers-hunyuanvideo"] = ["hidden_states", "encoder_hidden_states", "temb", "attention_mask"]
POSITIONAL["diffusers-sana"] = ["hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask"]
POSITIONAL["diffusers-sana"] += ["timestep", "height", "width"]
POSITIONAL["diffusers-lumina2"] = ["hidden_states", "attention_mask", "image_rotary_emb", "temb"]
POSITIONAL["diffusers-chronoedit"] = POSITIONAL["diffusers-wan"]
POSITIONAL["diffusers-skyreelsv2"] = [*POSITIONAL["diffusers-wan"], "attention_mask"]
POSITIONAL["diffusers-hunyuanvideo15"] = ["hidden_states", "encoder_hidden_states", "temb", "attention_mask"]
POSITIONAL["diffusers-hunyuanimage"] = ["hidden_states", "encoder_hidden_states", "temb"]
BLOCK_LISTS = {
    "diffusers-flux": ("transformer_blocks", "single_transformer_blocks"),
    "fastcache-dit": ("blocks",),
    "diffusers-wan": ("blocks",),
    "diffusers-flux2": ("single_transformer_blocks",),
    "diffusers-zimage": ("layers",),
}
BLOCK_LISTS["diffusers-hunyuanvideo"] = ("transformer_blocks", "single_transformer_blocks")
BLOCK_LISTS["diffusers-lumina2"] = ("layers",)
BLOCK_LISTS["diffusers-chronoedit"] = BLOCK_LISTS["diffusers-skyreelsv2"] = ("blocks",)
BLOCK_LISTS["diffusers-hunyuanimage"] = ("transformer_blocks", "single_transformer_blocks")
# the position of the cached stream in a block's tuple return (Flux, SD3: (text, image) -> 1)
HIDDEN_AT = {"diffusers-hunyuanvideo": 0, "diffusers-cogvideox": 0, "diffusers-mochi": 0}
HIDDEN_AT["diffusers-hunyuanvideo15"] = 0
HIDDEN_AT["diffusers-ltx2"] = 0
HIDDEN_AT["diffusers-hunyuanimage"] = 0


class ReferenceTeaCache:
    def __init__(self, name, model, threshold, num_steps, coefficients=None):
        self.name = name
        self.threshold = threshold
        self.num_steps = num_steps
        self.poly = np.poly1d(coefficients) if coefficients else (lambda v: v)
        self.cnt = 0
        self.acc = 0.0
        self.prev = None
        self.residual = None
        self.x_in = None
        self.skip = False
        self.trace: list[bool] = []
        lists = [getattr(model, n) for n in BLOCK_LISTS.get(name, ("transformer_blocks",))]
        self.first, self.last = lists[0][0], lists[-1][-1]
        self.stream = STREAM.get(name, "hidden_states")
        self.handles = [
            self.first.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.last.register_forward_hook(self._post),
        ]

    def remove(self):
        for h in self.handles:
            h.remove()

    def _pre(self, module, args, kwargs):
        kw = dict(zip(POSITIONAL.get(self.name, []), args))
        kw.update(kwargs)
        m = INDICATORS[self.name](module, kw).float()
        self.x_in = kw[self.stream]
        if self.cnt == 0 or self.cnt == self.num_steps - 1 or self.threshold == 0:
            compute, self.acc = True, 0.0
        else:
            rel = ((m - self.prev).abs().mean() / self.prev.abs().mean()).item()
            self.acc += float(self.poly(rel))
            compute = self.acc >= self.threshold
            if compute:
                self.acc = 0.0
        self.prev = m
        self.cnt += 1
        self.skip = not compute
        self.trace.append(compute)

    def _post(self, module, args, out):
        if not isinstance(out, tuple):
            out, at = (out,), 0
        else:
            at = HIDDEN_AT.get(self.name, 1)
        hidden = out[at]
        if self.skip:
            hidden = self.x_in + self.residual
        else:
            self.residual = hidden - self.x_in
        out = out[:at] + (hidden,) + out[at + 1 :]
        return out if len(out) > 1 else out[0]
