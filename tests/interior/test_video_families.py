"""What the video families' specs promise beyond the shared contract suite: their TeaCache
indicators are the TeaCache authors' (through the LayerNorm-form op), and what their
programs cannot replay exactly is refused with a message that says what to do."""

import pytest
import torch
from support.zoo import CASES

import fastcache
from fastcache.ops.reference import modulated_rel_l1_sums


def _first_call(case):
    """The first block's bound call at the schedule's first step, and the block."""
    spec = fastcache.specs.find_spec(case.model)
    head = spec.blocks(case.model)[0][0]
    seen = {}

    def hook(mod, args, kwargs):
        import inspect

        bound = inspect.signature(type(mod).forward).bind(mod, *args, **kwargs)
        bound.apply_defaults()
        seen.update(bound.arguments)

    h = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        case.sample(steps=1)
    finally:
        h.remove()
    seen.pop("self")
    return spec, head, seen


@pytest.mark.parametrize(
    "family,reference",
    [
        ("diffusers-ltx", None),
        ("diffusers-mochi", lambda b, kw: b.norm1(kw["hidden_states"], kw["temb"])[0]),
        ("diffusers-cogvideox", lambda b, kw: kw["temb"][:, None]),
    ],
)
def test_indicator_is_the_teacache_authors(family, reference):
    """The op's indicator (``prev`` after one call) is TeaCache's for the model: LTX's
    RMSNorm(x)(1+scale)+shift, Mochi's norm1 output, CogVideoX's time embedding."""
    case = CASES[family]()
    spec, head, call = _first_call(case)
    if reference is None:  # LTX: the block's own arithmetic, written out
        B = call["hidden_states"].shape[0]
        ada = head.scale_shift_table[None, None] + call["temb"].reshape(B, 1, 6, -1)
        b_msa, s_msa = ada.unbind(2)[:2]
        reference = lambda b, kw: b.norm1(kw["hidden_states"]) * (1 + s_msa) + b_msa  # noqa: E731
    with torch.no_grad():
        x, shift, scale, eps, *_ = spec.modulation(head, call)
        prev = torch.zeros_like(x)
        modulated_rel_l1_sums(x, shift, scale, eps, prev)
        want = reference(head, call)
    D = want.shape[-1]
    torch.testing.assert_close(prev[..., :D], want, rtol=1e-5, atol=1e-6)
    if prev.shape[-1] != D:  # the RMSNorm form: [m, -m]
        torch.testing.assert_close(prev[..., D:], -want, rtol=1e-5, atol=1e-6)


def test_mochi_programs_refuse_half_precision_clearly():
    """Mochi's block rounds its gated post-norm product to bf16 before the residual add:
    a program could not reproduce it, so the branch-level methods refuse at patch time."""
    case = CASES["diffusers-mochi"]()
    m = case.model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 .*TeaCacheConfig"):
        fastcache.patch(m, fastcache.FORAConfig(interval=2))
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.0)):  # stack level: unaffected
        pass


def test_hunyuan_token_replace_indicator_is_refused():
    """HunyuanVideo I2V (token_replace) modulates the first frame separately: one
    indicator per sample would be wrong, so TeaCache says so."""
    from diffusers import HunyuanVideoTransformer3DModel
    from support.reach_video import _HV_CFG

    torch.manual_seed(0)
    m = HunyuanVideoTransformer3DModel(**_HV_CFG, image_condition_type="token_replace").eval()
    spec = fastcache.specs.find_spec(m)
    with pytest.raises(ValueError, match="token_replace"):
        spec.modulation(m.transformer_blocks[0], {"hidden_states": torch.zeros(1, 4, 8), "temb": torch.zeros(1, 8)})
