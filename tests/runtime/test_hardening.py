"""Regression tests for the defects a new user hit (issue 6, section 2). Each test fails
on the runtime before the fix: wrong outputs, mixed CFG branches, split runs, leaks,
copies bound to the original, lost gradients, and the smaller API traps."""

import contextlib
import copy
import gc
import io
import pickle
import warnings
import weakref

import numpy as np
import pytest
import torch
from diffusers import HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler
from support.zoo import ToyDualStreamBlock, dit_case, flux_case, reference_dit_case
from torch import nn

import fastcache


# --------------------------------------------------------------------------- streams
class TwoStream(nn.Module):
    """Stream b is used after the stack but not cached: a computed step must return the
    computed b, a skipped step passes it through."""

    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.Linear(1, d)
        self.layers = nn.ModuleList([ToyDualStreamBlock(d) for _ in range(3)])

    def forward(self, a, b, t):
        e = self.emb(t[:, None].float() / 1000)
        for blk in self.layers:
            a, b = blk(a, b, e)
        return a + b.mean(1, keepdim=True)


TWO_STREAM_SPEC = fastcache.ModelSpec(
    name="test-two-stream",
    model_types=(TwoStream,),
    segments=("layers",),
    streams=("a", "b"),
    returns=("a", "b"),
    cached_streams=("a",),
    modulation=lambda blk, call: (call["a"], *blk.mod(call["emb"]).chunk(2, 1), blk.norm1.eps),
    timestep_arg="t",
)


@pytest.fixture
def two_stream():
    spec = fastcache.register(TWO_STREAM_SPEC)
    torch.manual_seed(0)
    yield TwoStream().eval()
    fastcache.specs._REGISTRY.remove(spec)


@pytest.mark.compile
def test_cond_path_returns_computed_non_cached_streams(two_stream):
    """The cond's outputs as captured (aot_eager: the captured graph on eager kernels; inductor's
    lowering of a skip cond is checked in test_modes, test_compile_shapes, test_first_block)."""
    m = two_stream
    a, b = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    ts = [torch.full((2,), v) for v in (900.0, 700.0, 500.0)]
    with torch.no_grad():
        ref = [m(a, b, t) for t in ts]
        with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.0)):
            torch._dynamo.reset()
            compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
            outs = [compiled(a, b, t) for t in ts]
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- CFG
def _cfg_loop(case, model_for, steps, wrap):
    """Classifier-free guidance as two calls per step: ``model_for(name)`` is the model
    called for branch ``name`` inside ``wrap(name)``."""
    sch = case.scheduler()
    sch.set_timesteps(steps)
    x = case.latents(torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in sch.timesteps:
            kw = case.inputs(x, t)
            with wrap("cond"):
                ec = case.output(model_for("cond")(**kw))
            kw_u = dict(kw, encoder_hidden_states=torch.zeros_like(kw["encoder_hidden_states"]))
            with wrap("uncond"):
                eu = case.output(model_for("uncond")(**kw_u))
            x = sch.step(eu + 2.0 * (ec - eu), t, x).prev_sample
    return x


def _no_context(name):
    return contextlib.nullcontext()


def test_diffusers_cache_context_routes_cfg_branches():
    """Flux pipelines wrap each call in transformer.cache_context(...): one state per branch,
    equal to one patched copy per branch."""
    case = flux_case()
    m = case.model
    cfg = fastcache.TeaCacheConfig(threshold=0.2, num_steps=10)
    with fastcache.patched(m, cfg):
        out = _cfg_loop(case, lambda name: m, 10, m.cache_context)
        st = fastcache.stats(m)["contexts"]
    assert "cache_context" not in m.__dict__  # restored
    assert st["default"]["steps"] == 0 and st["cond"]["steps"] == 10 == st["uncond"]["steps"]
    assert st["cond"]["repeated_timestep_calls"] == 0 == st["uncond"]["repeated_timestep_calls"]
    assert not all(st["cond"]["timeline"])
    copies = {"cond": copy.deepcopy(m), "uncond": copy.deepcopy(m)}
    with fastcache.patched(copies["cond"], cfg), fastcache.patched(copies["uncond"], cfg):
        ref = _cfg_loop(case, copies.get, 10, _no_context)
        for name, c in copies.items():
            assert fastcache.stats(c)["contexts"]["default"]["timeline"] == st[name]["timeline"]
    assert torch.equal(out, ref)


def test_cfg_as_two_calls_without_context_never_mixes_branches():
    """Without any context the second call of each step repeats the timestep: it is
    computed and leaves the cache alone, so the cond branch caches exactly as if it ran
    alone and the uncond branch is exact."""
    case = flux_case()
    m = case.model
    cfg = fastcache.TeaCacheConfig(threshold=0.2, num_steps=10)
    with fastcache.patched(m, cfg) as h:
        out = _cfg_loop(case, lambda name: m, 10, _no_context)
        st = fastcache.stats(m)["contexts"]["default"]
    assert st["repeated_timestep_calls"] == 10
    assert st["steps"] == 10 and st["timeline"][-1]  # the last step is still the forced last one
    assert not all(st["timeline"])
    assert any("classifier-free guidance" in w for w in st["warnings"])
    assert h.stats()["contexts"]["default"]["repeated_timestep_calls"] == 10  # kept after remove()

    cond_only = copy.deepcopy(m)
    with fastcache.patched(cond_only, cfg):
        ref = _cfg_loop(case, lambda name: cond_only if name == "cond" else m, 10, _no_context)
        assert fastcache.stats(cond_only)["contexts"]["default"]["timeline"] == st["timeline"]
    assert torch.equal(out, ref)


# --------------------------------------------------------------------------- timesteps
def _step_params(sch):
    import inspect

    return inspect.signature(sch.step).parameters


def _loop_with(case, model, scheduler, steps):
    sch = scheduler
    sch.set_timesteps(steps)
    x = case.latents(torch.Generator().manual_seed(1)) * sch.init_noise_sigma
    with torch.no_grad():
        for t in sch.timesteps:
            xin = sch.scale_model_input(x, t)
            out = case.output(model(**case.inputs(xin, t)))
            extra = {"generator": torch.Generator().manual_seed(2)} if "generator" in _step_params(sch) else {}
            x = sch.step(out, t, x, **extra).prev_sample
    return x, len(sch.timesteps)


@pytest.mark.parametrize("sched", [KDPM2AncestralDiscreteScheduler, HeunDiscreteScheduler])
def test_repeated_timestep_samplers_stay_one_run(sched):
    case = dit_case()
    steps = 8
    with fastcache.patched(case.model, fastcache.TeaCacheConfig(threshold=0.3, num_steps=steps)):
        _, calls = _loop_with(case, case.model, sched(), steps)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert calls == 2 * steps - 1
    assert st["runs"] == 1
    assert st["steps"] == steps and st["repeated_timestep_calls"] == steps - 1
    assert st["timeline"][0] and st["timeline"][-1]  # forced first and last step of the one run
    assert st["run_length_mismatches"] == 0


def test_float_jitter_rise_does_not_start_a_new_run():
    """554.9999 -> 555.0 (KDPM2-ancestral's float32 timesteps) is the same step, not a
    new run; a real rise is."""
    case = reference_dit_case()
    m = case.model
    x = case.latents(torch.Generator().manual_seed(0))
    ts = [999.0, 777.0, 554.9999, 555.0, 333.0, 111.0]
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.5, num_steps=5)):
        with torch.no_grad():
            for i, t in enumerate(ts):
                m(**case.inputs(x + 0.01 * i, torch.tensor(t)))
            st = fastcache.stats(m)["contexts"]["default"]
            assert st["runs"] == 1 and st["steps"] == 5 and st["timestep_jitter_calls"] == 1
            assert st["timeline"][-1]
            m(**case.inputs(x, torch.tensor(999.0)))  # a real rise: new run
            st = fastcache.stats(m)["contexts"]["default"]
    assert st["runs"] == 2 and st["steps"] == 1 and st["last_run_steps"] == 5


def test_run_length_mismatch_is_reported_and_warned_once():
    case = reference_dit_case()
    with fastcache.patched(case.model, fastcache.TeaCacheConfig(threshold=0.3, num_steps=8)) as h:
        case.sample(steps=6)
        case.sample(steps=6)
        with pytest.warns(RuntimeWarning, match="num_steps=8 but a run had 6 steps"):
            st = h.stats()["contexts"]["default"]
        assert st["run_length_mismatches"] == 1 and st["last_run_steps"] == 6
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            h.stats()  # once only


# --------------------------------------------------------------------------- lifetime and copies
def test_patched_model_is_freed_without_remove():
    case = reference_dit_case()
    m = case.model
    fastcache.patch(m, fastcache.TeaCacheConfig(threshold=0.3))
    case.sample(steps=3)
    ref = weakref.ref(m)
    buf = weakref.ref(fastcache.get_patch(m).contexts["default"].prev)
    del m, case
    gc.collect()
    assert ref() is None and buf() is None


def test_deepcopy_runs_its_own_weights_and_state():
    case = reference_dit_case()
    m = case.model
    cfg = fastcache.TeaCacheConfig(threshold=0.0)
    with fastcache.patched(m, cfg):
        base = case.sample(steps=3)
        c = copy.deepcopy(m)
        with torch.no_grad():
            for p in c.parameters():
                p.mul_(0.5)
        out_copy = case.sample(model=c, steps=3)
        assert fastcache.stats(c)["contexts"]["default"]["steps"] == 3  # its own state
        assert fastcache.stats(m)["contexts"]["default"]["steps"] == 3  # untouched by the copy
        assert torch.equal(case.sample(steps=3), base)
    assert fastcache.get_patch(c).active  # removing the original's patch leaves the copy's
    c_plain = copy.deepcopy(c)
    fastcache.unpatch(c_plain)
    assert torch.equal(case.sample(model=c_plain, steps=3), out_copy)
    assert not torch.equal(out_copy, base)


def test_pickle_and_torch_save_roundtrip():
    case = reference_dit_case()
    m = case.model
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.3, num_steps=6)):
        ref = case.sample(steps=6)
        tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
        buf = io.BytesIO()
        torch.save(m, buf)
        m2 = pickle.loads(pickle.dumps(m))
    buf.seek(0)
    m3 = torch.load(buf, weights_only=False)
    for loaded in (m2, m3):
        assert fastcache.get_patch(loaded).config.threshold == 0.3
        assert torch.equal(case.sample(model=loaded, steps=6), ref)
        assert fastcache.stats(loaded)["contexts"]["default"]["timeline"] == tl


def test_copy_with_unregistered_spec_is_refused_clearly():
    torch.manual_seed(0)
    m = TwoStream().eval()
    with fastcache.patched(m, fastcache.TeaCacheConfig(), spec=TWO_STREAM_SPEC):
        with pytest.raises(TypeError, match="unregistered spec 'test-two-stream'.*register"):
            copy.deepcopy(m)


# --------------------------------------------------------------------------- autograd
def test_grad_enabled_calls_bypass_the_cache_and_keep_gradients():
    case = reference_dit_case()
    m = case.model
    x0 = case.latents(torch.Generator().manual_seed(0))
    ts = [torch.tensor(v) for v in (900.0, 890.0, 880.0)]
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=10.0)):  # would skip every step
        grads = []
        for i, t in enumerate(ts):
            x = x0.clone().requires_grad_(True)
            m.zero_grad()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                m(**case.inputs(x, t)).square().sum().backward()
            assert len([w for w in caught if "autograd on" in str(w.message)]) == (1 if i == 0 else 0)
            grads.append((x.grad.clone(), m.blocks[1].mlp.fc1.weight.grad.clone()))
        s = fastcache.stats(m)
        assert s["grad_bypassed_calls"] == 3 and "drop gradients" in s["grad_bypass_reason"]
        assert s["contexts"]["default"]["steps"] == 0  # nothing cached under autograd
        with torch.no_grad():
            m(**case.inputs(x0, ts[0]))
            m(**case.inputs(x0, ts[1]))
        assert fastcache.stats(m)["contexts"]["default"]["timeline"] == [True, False]
    for (gx, gw), t in zip(grads, ts):
        x = x0.clone().requires_grad_(True)
        m.zero_grad()
        m(**case.inputs(x, t)).square().sum().backward()
        assert torch.equal(gx, x.grad) and torch.equal(gw, m.blocks[1].mlp.fc1.weight.grad)


def test_grad_bypass_invalidates_the_cache():
    """A cached call after an uncached (autograd) call must recompute."""
    case = reference_dit_case()
    m = case.model
    x0 = case.latents(torch.Generator().manual_seed(0))
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=10.0)):
        with torch.no_grad():
            m(**case.inputs(x0, torch.tensor(900.0)))
        m(**case.inputs(x0.clone().requires_grad_(True), torch.tensor(890.0)))
        with torch.no_grad():
            m(**case.inputs(x0, torch.tensor(880.0)))
        assert fastcache.stats(m)["contexts"]["default"]["timeline"] == [True, True]


# --------------------------------------------------------------------------- smaller traps
def test_context_on_unpatched_model_is_a_no_op():
    case = reference_dit_case()
    with fastcache.context(case.model, "uncond"):
        case.sample(steps=2)
    with fastcache.patched(case.model, fastcache.TeaCacheConfig()):
        pass
    with fastcache.context(case.model, "uncond"):  # after remove()
        case.sample(steps=2)


def test_stats_survive_remove_on_the_handle():
    case = reference_dit_case()
    h = fastcache.patch(case.model, fastcache.TeaCacheConfig(threshold=0.3, num_steps=5))
    case.sample(steps=5)
    live = h.stats()
    h.remove()
    assert repr(h.stats()) == repr(live) and h.stats()["contexts"]["default"]["steps"] == 5
    with pytest.raises(ValueError, match="not patched"):
        fastcache.stats(case.model)


@pytest.mark.parametrize(
    "kwargs, expect",
    [
        (dict(threshold=np.float32(0.25)), ("threshold", 0.25)),
        (dict(threshold=np.float64(0.5)), ("threshold", 0.5)),
        (dict(num_steps=np.int64(28)), ("num_steps", 28)),
        (dict(warmup_steps=np.int32(2)), ("warmup_steps", 2)),
        (dict(coefficients=np.array([1.0, 2.0], dtype=np.float32)), ("coefficients", (1.0, 2.0))),
    ],
)
def test_numpy_scalars_are_accepted_as_python_numbers(kwargs, expect):
    c = fastcache.TeaCacheConfig(**kwargs)
    v = getattr(c, expect[0])
    assert v == expect[1] and type(v) in (int, float, tuple)
    assert fastcache.CacheConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(coefficients="12"), "coefficients"),
        (dict(coefficients=[True, 1.0]), "coefficients"),
        (dict(threshold="0.1"), "threshold"),
        (dict(num_steps=28.0), "num_steps"),
        (dict(warmup_steps=5, num_steps=5), "warmup_steps=5 >= num_steps=5"),
        (dict(warmup_steps=6, num_steps=5), "warmup_steps"),
    ],
)
def test_config_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastcache.TeaCacheConfig(**kwargs)


def test_set_num_steps_checks_warmup():
    case = reference_dit_case()
    with fastcache.patched(case.model, fastcache.TeaCacheConfig(warmup_steps=3)) as h:
        with pytest.raises(ValueError, match="warmup_steps=3"):
            h.set_num_steps(3)
        h.set_num_steps(np.int64(10))
        assert h.policy.num_steps == 10


def test_block_forward_hooks_are_refused():
    case = reference_dit_case()
    hook = case.model.blocks[1].register_forward_hook(lambda mod, args, out: None)
    try:
        with fastcache.patched(case.model, fastcache.TeaCacheConfig()):
            with pytest.raises(RuntimeError, match="forward hook is registered on a block"):
                case.sample(steps=1)
    finally:
        hook.remove()


def test_wrapper_set_after_patching_survives_remove():
    case = reference_dit_case()
    m = case.model
    calls = []
    h = fastcache.patch(m, fastcache.TeaCacheConfig(threshold=0.3))
    inner = m.forward

    def wrapper(*a, **k):
        calls.append(1)
        return inner(*a, **k)

    m.forward = wrapper
    ref = case.sample(steps=3)
    h.remove()
    assert m.__dict__["forward"] is wrapper  # not dropped
    out = case.sample(steps=3)
    assert len(calls) == 6
    del m.forward
    assert torch.equal(out, case.sample(steps=3))  # the wrapped object forwarded to the original
    assert ref.shape == out.shape


@pytest.mark.compile
def test_compiled_loop_does_not_recompile_across_steps():
    """The host step clock stays out of the compiled region: one graph for every step (dynamo's
    guards: aot_eager; inductor on the same model and method: test_modes)."""
    case = reference_dit_case()
    m = case.model
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.3, num_steps=8)):
        case.sample(steps=1)  # allocate the cache buffers eagerly (see docs/usage.md)
        fastcache.reset(m)
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        case.sample(model=compiled, steps=1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            case.sample(model=compiled, steps=8)
            case.sample(model=compiled, steps=8)
        st = fastcache.stats(m)["contexts"]["default"]
    assert st["runs"] == 3 and not all(st["timeline"])


# --------------------------------------------------------------------------- step cost
@pytest.mark.parametrize(
    "make, modules",
    [
        (dit_case, lambda m: [m.transformer_blocks[0].norm1.emb, m.transformer_blocks[0].norm1.linear]),
        (flux_case, lambda m: [m.transformer_blocks[0].norm1.linear]),
        (reference_dit_case, lambda m: [m.blocks[0].adaLN_modulation]),
    ],
)
def test_first_block_modulation_runs_once_per_computed_step(make, modules, monkeypatch):
    """The indicator's embedding MLP / AdaLN linear output is handed to the first block on
    a computed step instead of being computed twice; outputs stay bitwise equal."""
    case = make()
    m = case.model
    targets = modules(m)
    counts = []
    for cls in {type(t) for t in targets}:
        orig = cls.forward

        def counting(self, *a, _orig=orig, **k):
            if any(self is t for t in targets):
                counts.append(1)
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, "forward", counting)
    ref = case.sample(steps=4)
    unpatched = len(counts)
    counts.clear()
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.0)):  # every step computed
        out = case.sample(steps=4)
    assert unpatched >= 4 * len(targets)
    assert len(counts) == unpatched  # the indicator's computation is not repeated by the block
    assert torch.equal(out, ref)


def test_cache_context_num_inference_steps_gives_the_forced_last_step():
    """diffusers' CacheContext may carry num_inference_steps: no num_steps in the config
    is needed for the last step to be computed."""
    case = flux_case()
    m = case.model
    sch = case.scheduler()
    sch.set_timesteps(8)
    x = case.latents(torch.Generator().manual_seed(1))
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=100.0)):  # skips whenever allowed
        with torch.no_grad():
            for i, t in enumerate(sch.timesteps):
                with m.cache_context("cond", step_index=i, num_inference_steps=8):
                    out = m(**case.inputs(x, t)).sample
                x = sch.step(out, t, x).prev_sample
        tl = fastcache.stats(m)["contexts"]["cond"]["timeline"]
    assert tl == [True] + [False] * 6 + [True]


def test_skipped_steps_reuse_an_owned_output_buffer_unless_someone_holds_it():
    """Eager skipped steps write x + R into a buffer the policy keeps; a kept output (or a
    view of it) is never overwritten by a later step."""
    case = reference_dit_case()
    m = case.model
    x = case.latents(torch.Generator().manual_seed(0))
    seen = []
    hook = m.final_layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=100.0)) as h, torch.no_grad():
            m(**case.inputs(x, torch.tensor(900.0)))  # computed
            for i, t in enumerate((890.0, 880.0, 870.0)):  # skipped
                m(**case.inputs(x + 0.01 * i, torch.tensor(t)))
            buf = h.contexts["default"].out["x"]
            kept = [s.clone() for s in seen]
    finally:
        hook.remove()
    # the hook held every stack output: no buffer could be reused, nothing was overwritten
    assert all(torch.equal(a, b) for a, b in zip(seen, kept))
    assert len({s.data_ptr() for s in seen[1:]}) == 3
    assert buf is seen[-1]

    seen.clear()
    ptrs = []
    hook = m.final_layer.register_forward_pre_hook(lambda mod, args: ptrs.append(args[0].data_ptr()))
    try:
        with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=100.0)), torch.no_grad():
            m(**case.inputs(x, torch.tensor(900.0)))
            for i, t in enumerate((890.0, 880.0, 870.0)):
                m(**case.inputs(x + 0.01 * i, torch.tensor(t)))
    finally:
        hook.remove()
    assert len(set(ptrs[1:])) == 1  # nobody kept them: one buffer for every skipped step
