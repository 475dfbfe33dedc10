"""First-Block Cache on the automatic path (fastcache/policies/auto_stack.py), over the 31
reach-zoo classes no family file describes.

Refused, with a ValueError at the first call naming the class and where the chain of block
calls breaks: HiDreamImageTransformer2DModel (the model rebuilds the text stream between
blocks: ``cat([initial, llama[i]])``), LatteTransformer3DModel (it reshapes the stream
between every spatial / temporal block).

diffusers' ``apply_first_block_cache`` runs on cogvideox, cogview4, hunyuanimage,
hunyuanvideo, hunyuanvideoframepack, ltx, mochi, qwenimage, wanvace (PARITY below, less
wanvace); it raises on the others (block class not in TransformerBlockRegistry: allegro,
auraflow, bria, chroma, chronoedit, cosmos, easyanimate, flux3, hunyuandit, hunyuanvideo15,
longcat_image, ltx2, lumina2, omnigen, sana, sanavideo, skyreelsv2; hidden_states not an
argument: kandinsky5, zimage; flux2's single block returns a tensor where the hook expects a
tuple; latte: shape error; hidream: no list it knows). On wanvace the hook's output differs
from ours by design: the model adds the VACE hints between blocks 0 and 1, and the hook's
residual over the whole list counts them twice on skipped steps; fastcache caches
blocks.1 -> blocks.2 only.
"""

import copy

import pytest
import torch
from support.hostreads import HostReadMode
from support.reach_image import CASES_IMAGE
from support.reach_video import CASES_VIDEO

import fastcache
from fastcache.families.auto import auto_spec, is_attention

CASES = {**CASES_IMAGE, **CASES_VIDEO}
REFUSED = {"hidream": "double_stream_blocks.0 and double_stream_blocks.1", "latte": "transformer_blocks.0 and temporal"}
WORKS = sorted(set(CASES) - set(REFUSED))
PARITY = ["cogvideox", "cogview4", "hunyuanimage", "hunyuanvideo", "hunyuanvideoframepack", "ltx", "mochi", "qwenimage"]
STEPS = 5


_BUILT: dict = {}


def built(name):
    """(case, unpatched 5-step sample), built once per module."""
    if name not in _BUILT:
        case = CASES[name]()
        _BUILT[name] = (case, case.sample(steps=STEPS))
    return _BUILT[name]


def attention_calls(model, run) -> int:
    n = [0]

    def hook(*_):
        n[0] += 1

    hs = [m.register_forward_hook(hook) for m in model.modules() if is_attention(m)]
    try:
        run()
    finally:
        for h in hs:
            h.remove()
    return n[0]


@pytest.mark.parametrize("name", WORKS)
def test_never_skip_is_bitwise_the_unpatched_model_and_remove_restores_it(name):
    case, ref = built(name)
    with fastcache.patched(case.model, fastcache.FirstBlockCacheConfig(threshold=0.0), spec=auto_spec(case.model)) as h:
        out = case.sample(steps=STEPS)
        st = h.stats()["contexts"]["default"]
    assert torch.equal(out, ref), f"{name}: threshold=0 differs from the unpatched model"
    assert st["skipped"] == 0 and "plan" in st, st
    for m in case.model.modules():
        assert "forward" not in m.__dict__, f"{name}: {type(m).__name__}.forward still patched after remove()"
    assert torch.equal(case.sample(steps=STEPS), ref), f"{name}: the model differs after remove()"


@pytest.mark.parametrize("name", WORKS)
def test_a_skipping_setting_runs_finite_and_calls_attention_less(name):
    case, ref = built(name)
    base = attention_calls(case.model, lambda: case.sample(steps=STEPS))
    with fastcache.patched(
        case.model, fastcache.FirstBlockCacheConfig(threshold=100.0), spec=auto_spec(case.model)
    ) as h:
        fewer = attention_calls(case.model, lambda: case.sample(steps=STEPS))
        out = case.sample(steps=STEPS)
        st = h.stats()["contexts"]["default"]
    assert torch.isfinite(out).all(), name
    assert st["cached_calls"] >= 1 and st["plan"], st
    assert st["skipped"] == STEPS - 1, st
    assert fewer < base, f"{name}: {fewer} attention calls with skips vs {base} unpatched"
    assert not torch.equal(out, ref)


@pytest.mark.parametrize("name", ["ltx", "hunyuanvideo", "flux2", "hunyuandit"])
def test_one_host_read_per_step_after_the_first_call(name):
    case, _ = built(name)
    with fastcache.patched(case.model, fastcache.FirstBlockCacheConfig(threshold=0.3), spec=auto_spec(case.model)):
        case.sample(steps=2)  # the probe (learns the block calls) at this shape
        for announced in (False, True):
            mode = HostReadMode()
            ctx = (lambda i: fastcache.context(case.model, "default", step_index=i)) if announced else None
            with mode:
                case.sample(steps=STEPS, context=ctx)
            ours = [r for r in mode.reads if r is not None]  # None: the model's and scheduler's own
            assert 1 <= len(ours) <= STEPS, (announced, ours)
            assert all("auto_stack.py:_head" in r for r in ours), ours


@pytest.mark.parametrize("name", PARITY)
def test_equal_to_diffusers_first_block_cache_hook(name):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    case, _ = built(name)
    other = copy.deepcopy(case.model)
    apply_first_block_cache(other, FirstBlockCacheConfig(threshold=0.6))
    theirs = case.sample(model=other, steps=STEPS, context=lambda i: other.cache_context("default"))
    with fastcache.patched(case.model, fastcache.FirstBlockCacheConfig(threshold=0.6), spec=auto_spec(case.model)) as h:
        ours = case.sample(steps=STEPS)
        st = h.stats()["contexts"]["default"]
    assert st["skipped"] >= 1, st  # the comparison covers skipped steps
    assert torch.equal(ours, theirs), f"{name}: max diff {(ours - theirs).abs().max().item()}"


#: the PARITY classes a family file curates (the test checks the default spec is the family's)
CURATED = ["cogvideox", "hunyuanimage", "hunyuanvideo", "ltx", "mochi", "qwenimage"]


@pytest.mark.parametrize("name", CURATED)
def test_curated_first_block_equals_diffusers_hook_too(name):
    """Where a family file curates the class (its spec, the fused path: the default), its
    First-Block Cache takes the same decisions as diffusers' hook and the same output up to
    the order of the residual additions (the stack residual is applied once, where the hook
    adds the head's output and the tail residual)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    case, _ = built(name)
    other = copy.deepcopy(case.model)
    apply_first_block_cache(other, FirstBlockCacheConfig(threshold=0.6))
    theirs = case.sample(model=other, steps=STEPS, context=lambda i: other.cache_context("default"))
    with fastcache.patched(case.model, fastcache.FirstBlockCacheConfig(threshold=0.6)) as h:
        assert not h.spec.auto
        ours = case.sample(steps=STEPS)
        st = h.stats()["contexts"]["default"]
    assert st["skipped"] >= 1, st
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_class_whose_block_chain_breaks_is_refused_naming_class_and_place(name):
    case, _ = built(name)
    with fastcache.patched(case.model, fastcache.FirstBlockCacheConfig(threshold=0.3), spec=auto_spec(case.model)):
        with pytest.raises(ValueError) as e:
            case.sample(steps=2)
    msg = str(e.value)
    assert type(case.model).__name__ in msg and REFUSED[name] in msg and "fastcache.ModelSpec" in msg, msg


@pytest.mark.parametrize("name", ["ltx", "cogvideox"])
def test_fullgraph_compile_has_no_graph_break_and_matches_eager(name):
    from torch._dynamo.utils import counters

    case, _ = built(name)
    with fastcache.patched(case.model, fastcache.FirstBlockCacheConfig(threshold=0.6), spec=auto_spec(case.model)) as h:
        eager = case.sample(steps=4)
        timeline = h.stats()["contexts"]["default"]["timeline"]
        assert not all(timeline), timeline  # the compiled run covers a skip
        torch._dynamo.reset()
        counters.clear()
        fastcache.reset(case.model)
        compiled = torch.compile(case.model, fullgraph=True, backend="aot_eager")
        out = case.sample(model=compiled, steps=4)
        assert h.stats()["contexts"]["default"]["timeline"] == timeline
    torch._dynamo.reset()
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
