"""The tiny diffusers pipelines (tests/support/pipelines.py) are what the pipeline-level tests
take them for: saved and reloaded they compute what the in-memory build does, the prompt (or
class label) reaches the output, Wan 2.2's two experts each run their side of the boundary,
and the hand-patched path (``fastcache.patch`` + ``announce_steps``) runs through a whole
pipeline call, bitwise the uncached call at the never-skip setting."""

import importlib.util

import pytest
import torch
from support import pipelines as P

import fastcache

STEPS = 4


def _run(name, pipe, steps=STEPS, **kw):
    return P.output(name, pipe(**P.call_kwargs(name, steps, **kw)))


@pytest.mark.parametrize("name", P.ALL)
def test_reloaded_pipeline_gives_the_in_memory_output_bitwise(name, saved_pipelines):
    folder = saved_pipelines[name]
    if P.needs_accelerate(folder) and importlib.util.find_spec("accelerate") is None:
        pytest.skip(
            f"{name}: diffusers 0.42.1 loads its {folder / 'model_index.json'} models (_keep_in_fp32_modules) "
            "only with accelerate installed: pip install accelerate"
        )
    ref_pipe = P.build(name)
    ref = _run(name, ref_pipe)
    loaded = P.load(folder)
    assert type(loaded) is type(ref_pipe)
    assert set(loaded.components) == set(ref_pipe.components)
    for attr, module in ref_pipe.components.items():
        assert type(getattr(loaded, attr)) is type(module), attr
    # as loaded (weights at the safetensors buffer's unaligned offsets): equal up to GEMM rounding
    torch.testing.assert_close(_run(name, loaded), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(_run(name, P.realign(loaded)), ref)
    if name == "dit":  # the class names came back with the folder (model_index.json's id2label)
        assert loaded.get_label_ids(["umbrella", "tench", "Tinca tinca"]) == [3, 0, 0]
        assert P.call_kwargs(name, STEPS, prompt="umbrella")["class_labels"] == [3]


@pytest.mark.parametrize("name", P.ALL)
def test_the_prompt_reaches_the_output(name):
    pipe = P.build(name)
    if name == "dit":
        a, b = _run(name, pipe, prompt="umbrella"), _run(name, pipe, prompt="goldfish")
    else:
        a, b = _run(name, pipe, prompt="a photo of a cat"), _run(name, pipe, prompt="a photo of a dog")
        # the tokenizers tell the prompts apart, and pad / truncate as the pipelines ask
        toks = [getattr(pipe, k) for k in pipe.components if k.startswith("tokenizer")]
        for tok in toks:
            ids = tok(["a cat", "a dog", "x" * 99], padding="max_length", max_length=P.MAX_TOKENS, truncation=True)
            ids = torch.tensor(ids.input_ids)
            assert ids.shape == (3, P.MAX_TOKENS) and not torch.equal(ids[0], ids[1])
            assert ids[0, -1] == tok.pad_token_id and ids[2, -1] == tok.eos_token_id
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(_run(name, pipe, prompt="a photo of a cat" if name != "dit" else "umbrella"), a)  # seeded


def _timesteps_into(log: list):
    def hook(module, args, kwargs):
        log.append(float(kwargs["timestep"][0]))

    return hook


def test_wan22_runs_each_expert_on_its_side_of_the_boundary():
    pipe = P.build("wan22")
    for steps in (4, 6):
        calls = {"transformer": [], "transformer_2": []}
        hooks = [getattr(pipe, k).register_forward_pre_hook(_timesteps_into(calls[k]), with_kwargs=True) for k in calls]
        try:
            _run("wan22", pipe, steps=steps)
        finally:
            for h in hooks:
                h.remove()
        boundary = P.WAN22_BOUNDARY * pipe.scheduler.config.num_train_timesteps
        high = sum(float(t) >= boundary for t in pipe.scheduler.timesteps)
        assert 0 < high < steps
        assert len(calls["transformer"]) == 2 * high  # cond + uncond per step
        assert len(calls["transformer_2"]) == 2 * (steps - high)
        assert min(calls["transformer"]) >= boundary > max(calls["transformer_2"])


@pytest.mark.parametrize("name", P.ALL)
def test_hand_patched_never_skip_first_block_cache_is_the_uncached_call_bitwise(name):
    pipe = P.build(name)
    ref = _run(name, pipe)
    models = [getattr(pipe, k) for k in P.denoisers(name)]
    calls = [[] for _ in models]
    hooks = [m.register_forward_pre_hook(_timesteps_into(log), with_kwargs=True) for m, log in zip(models, calls)]
    handles = []
    for m in models:
        handles.append(fastcache.patch(m, fastcache.FirstBlockCacheConfig(threshold=0.0)))
        handles.append(fastcache.announce_steps(pipe, model=m))
    try:
        out = _run(name, pipe)
        stats = [fastcache.stats(m) for m in models]
    finally:
        for h in reversed(handles):
            h.remove()
        for h in hooks:
            h.remove()
    assert torch.equal(out, ref)
    assert sum(map(len, calls)) == STEPS * P.cfg_calls(name)
    for log, st in zip(calls, stats):
        ran = {c: d for c, d in st["contexts"].items() if d["steps"]}
        # every call went through the patch, in the pipeline's CFG contexts, and computed
        assert sum(d["computed"] for d in ran.values()) == len(log) > 0
        assert sum(d["skipped"] for d in ran.values()) == 0
        assert set(ran) == ({"cond", "uncond"} if P.cfg_calls(name) == 2 else {"default"})


@pytest.mark.parametrize("name", P.ALL)
def test_the_tiny_vae_decodes(name):
    pipe = P.build(name)
    out = _run(name, pipe, steps=2, output_type="pt")
    shape = (1, 5, 3, 64, 64) if name == "wan22" else (1, 3, 8, 8)
    assert out.shape == shape and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0
