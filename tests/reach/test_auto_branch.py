"""The branch methods on the automatic path (fastcache/policies/auto_branch.py): FORA,
TaylorSeer and ScheduleConfig through the attention / feed-forward modules of the blocks
of the 31 reach-zoo classes no family file describes.

* a never-skip setting is bitwise the unpatched model; ``remove()`` gives it back bitwise;
* a skipping setting runs finite, calls fewer attention Linears, and says so in stats;
* announced steps read nothing to the host; unannounced, one read per step, same output;
* TaylorSeer is bitwise diffusers' TaylorSeer hook configured with the same modules,
  schedule, order and fp32 factors wherever the hook runs (CogView4: the hook crashes);
* fullgraph torch.compile (aot_eager): 0 graph breaks, output equal to eager;
* what cannot run is refused with a message naming what to do.
"""

import contextlib
import re

import pytest
import torch
from support.hostreads import HostReadMode, python_level_reads
from support.reach_image import CASES_IMAGE
from support.reach_video import CASES_VIDEO

import fastcache
from fastcache.families.auto import auto_spec, is_attention
from fastcache.policies.auto_branch import branch_modules

CASES = {**CASES_IMAGE, **CASES_VIDEO}
STEPS = 5
#: classes where diffusers' TaylorSeer hook fails: CogView4 calls its ``ff`` twice per
#: step (image, then text tokens); the hook keeps one state per module, so the second call
#: differences text against image features (a shape error)
HOOK_CRASHES = {"cogview4"}

_built: dict = {}
_refs: dict = {}


def _case(name):
    if name not in _built:
        _built[name] = CASES[name]()
    return _built[name]


def _ref(name):
    if name not in _refs:
        _refs[name] = _case(name).sample(steps=STEPS)
    return _refs[name]


def _announced(m):
    return lambda i: fastcache.context(m, "default", step_index=i)


@pytest.fixture(params=sorted(CASES))
def name(request):
    return request.param


def test_never_skip_settings_are_bitwise_the_unpatched_model(name):
    case, ref = _case(name), _ref(name)
    m = case.model
    for cfg, ctx in (
        (fastcache.TaylorSeerConfig(interval=1, warmup_steps=1), None),
        (fastcache.ScheduleConfig(plan="C" * STEPS), _announced(m)),
    ):
        with fastcache.patched(m, cfg, spec=auto_spec(m)):
            out = case.sample(steps=STEPS, context=ctx)
            st = fastcache.stats(m)["contexts"]["default"]
        assert torch.equal(out, ref), f"{name}: {type(cfg).__name__} never skipping differs from unpatched"
        assert st["calls_reused"] == 0 and st["calls_computed"] > 0, (name, st)


def _attention_linear_calls(case, model, run) -> int:
    """Calls of the nn.Linear layers inside the model's attention modules during ``run()``."""
    n = [0]
    hooks = [
        lin.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        for a in case.model.modules()
        if is_attention(a)
        for lin in a.modules()
        if isinstance(lin, torch.nn.Linear)
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return n[0]


def test_skipping_runs_finite_and_calls_fewer_attention_layers(name):
    case = _case(name)
    m = case.model
    full = _attention_linear_calls(case, m, lambda: case.sample(steps=STEPS))
    got = {}
    for cfg in (fastcache.TaylorSeerConfig(interval=2, warmup_steps=1), fastcache.FORAConfig(interval=2)):
        with fastcache.patched(m, cfg, spec=auto_spec(m)):
            calls = _attention_linear_calls(
                case, m, lambda cfg=cfg: got.__setitem__(type(cfg), case.sample(steps=STEPS, context=_announced(m)))
            )
            st = fastcache.stats(m)["contexts"]["default"]
        out = got[type(cfg)]
        assert torch.isfinite(out).all(), f"{name}: {type(cfg).__name__} output not finite"
        assert calls < full, f"{name}: {type(cfg).__name__} ran {calls} attention Linear calls, unpatched {full}"
        assert st["skipped"] == 2 and st["computed"] == 3 and st["calls_reused"] > 0, (name, st)
        assert st["timeline"] == [True, False, True, False, True], (name, st["timeline"])
    # FORA is TaylorSeer of order 0 on the same schedule
    with fastcache.patched(m, fastcache.TaylorSeerConfig(interval=2, warmup_steps=1, order=0), spec=auto_spec(m)):
        ts0 = case.sample(steps=STEPS, context=_announced(m))
    assert torch.equal(ts0, got[fastcache.FORAConfig]), name


def test_announced_steps_read_nothing_unannounced_one_read_per_step(name):
    case = _case(name)
    m = case.model
    cfg = fastcache.ScheduleConfig(plan="CC1C0")
    outs, reads, stats = [], [], []
    for ctx in (_announced(m), None):
        with fastcache.patched(m, cfg, spec=auto_spec(m)):
            mode = HostReadMode()
            with mode, python_level_reads() as py:
                outs.append(case.sample(steps=STEPS, context=ctx))
            stats.append(fastcache.stats(m)["contexts"]["default"])
        reads.append([r for r in mode.reads + py if _ours(r)])
    assert reads[0] == [], (name, reads[0])
    assert len(reads[1]) == STEPS, (name, reads[1])  # the one eager flag read per step
    assert stats[0]["timeline"] == [True, True, False, True, False], (name, stats[0])
    assert stats[1]["timeline"] == stats[0]["timeline"], (name, stats[1])
    assert torch.equal(outs[0], outs[1]), f"{name}: announced and device-decided schedules differ"


def _ours(read) -> bool:
    """A read made by fastcache itself: not the model's own code (HiDream's MoE routing
    reads), which runs under the frames that call the original forwards."""
    return read is not None and not re.search(r"(_model_fwd|forward)\(\*a", read)


def _hooks(mod) -> dict:
    reg = getattr(mod, "_diffusers_hook", None)
    return {} if reg is None else reg.hooks


@contextlib.contextmanager
def _diffusers_context(model):
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(model, CacheContext("default"))
    try:
        yield
    finally:
        _set_cache_context(model, None)


def test_taylorseer_equals_the_diffusers_hook(name):
    """Same modules (our branch modules, by name), same schedule (diffusers computes steps
    < disable_cache_before_step and every cache_interval-th from before + 1: given to
    fastcache as compute_steps), order 1, fp32 factors: bitwise equal (the finite
    differences and the forecast are the same fp32 operations in the same order)."""
    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheConfig, apply_taylorseer_cache

    case = _case(name)
    m = case.model
    steps, before, interval = 6, 2, 2
    cs = tuple(s for s in range(steps) if s < before or (s - before - 1) % interval == 0)
    with fastcache.patched(m, fastcache.TaylorSeerConfig(compute_steps=cs, order=1), spec=auto_spec(m)):
        ours = case.sample(steps=steps, context=_announced(m))
        st = fastcache.stats(m)["contexts"]["default"]
    assert st["skipped"] == steps - len(cs), (name, st)
    names = [n for n, _ in branch_modules(m, auto_spec(m).segments)]
    cfg = TaylorSeerCacheConfig(
        cache_interval=interval,
        disable_cache_before_step=before,
        max_order=1,
        taylor_factors_dtype=torch.float32,
        cache_identifiers=[re.escape(n) for n in names],
    )
    apply_taylorseer_cache(m, cfg)
    try:
        hooked = sum(1 for mod in m.modules() if "taylorseer_cache" in _hooks(mod))
        assert hooked == len(names), (name, hooked, len(names))
        if name in HOOK_CRASHES:
            with pytest.raises(RuntimeError):
                case.sample(steps=steps, context=lambda i: _diffusers_context(m))
            assert torch.isfinite(ours).all()
            return
        ref = case.sample(steps=steps, context=lambda i: _diffusers_context(m))
    finally:
        for mod in m.modules():
            if "taylorseer_cache" in _hooks(mod):
                mod._diffusers_hook.remove_hook("taylorseer_cache", recurse=False)
    assert torch.equal(ours, ref), f"{name}: differs from diffusers' hook by {(ours - ref).abs().max().item()}"


def test_remove_restores_every_patched_forward(name):
    case, ref = _case(name), _ref(name)
    m = case.model
    subs = [mod for _, mod in branch_modules(m, auto_spec(m).segments)] + [m]
    subs += [b for path in auto_spec(m).segments for b in m.get_submodule(path)]
    before = [mod.__dict__.get("forward") for mod in subs]
    h = fastcache.patch(m, fastcache.TaylorSeerConfig(interval=2, warmup_steps=1), spec=auto_spec(m))
    assert all(mod.__dict__.get("forward") is not b for mod, b in zip(subs, before)), name
    skipped = case.sample(steps=STEPS, context=_announced(m))
    h.remove()
    left = [i for i, (mod, b) in enumerate(zip(subs, before)) if mod.__dict__.get("forward") is not b]
    assert not left, f"{name}: {len(left)} patched forwards left behind"
    assert not torch.equal(skipped, ref)
    assert torch.equal(case.sample(steps=STEPS), ref), f"{name}: not the unpatched model after remove()"


@pytest.mark.compile
@pytest.mark.parametrize("cname", ["flux2", "ltx"])  # dual-stream (+ single-stream list), single-stream
def test_fullgraph_compile_no_graph_breaks_equal_to_eager(cname):
    case = _case(cname)
    m = case.model
    cfg = fastcache.TaylorSeerConfig(interval=2, warmup_steps=1)
    torch._dynamo.reset()
    with fastcache.patched(m, cfg, spec=auto_spec(m)):
        # an eager run first: the compiled run (a new run: its step 0 computes and restarts
        # every history) finds the slots made, so one graph serves every step
        eager = case.sample(steps=4)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")  # a graph break raises
        out = case.sample(model=compiled, steps=4)
        st = fastcache.stats(m)["contexts"]["default"]
    torch._dynamo.reset()
    assert st["timeline"] == [True, False, True, False], st  # the compiled run's, from the device state
    assert st["computed"] == 4 and st["skipped"] == 4, st  # both runs
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6), (out - eager).abs().max()


def test_a_plan_needing_a_profile_is_refused_at_patch():
    from fastcache.tuning.profile import Profile

    m = _case("ltx").model
    attn = m.transformer_blocks[0].attn1
    before = attn.__dict__.get("forward")
    prof = Profile(prior=torch.zeros(3, 1, 4), slots=["0.attn.x"], meta={"granularity": "channel"})
    with pytest.raises(ValueError, match=r"holds 'E'.*LTXVideoTransformer3DModel.*'C' and digits"):
        fastcache.patch(m, fastcache.ScheduleConfig(plan="CEE", profile=prof), spec=auto_spec(m))
    assert attn.__dict__.get("forward") is before  # nothing patched


def test_a_run_of_another_length_than_the_plan_is_refused():
    case = _case("ltx")
    m = case.model
    with fastcache.patched(m, fastcache.ScheduleConfig(plan="CC1"), spec=auto_spec(m)):
        with pytest.raises(ValueError, match="plans 3 steps but the run has 5"):
            case.sample(steps=5, context=lambda i: fastcache.context(m, "default", step_index=i, num_steps=5))


class _Blocks(torch.nn.Module):
    """Blocks that ARE attention layers: no attention or feed-forward module inside them."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(2))

    def forward(self, hidden_states, timestep):
        for b in self.blocks:
            hidden_states = hidden_states + b(hidden_states, hidden_states, hidden_states)[0]
        return hidden_states


def test_blocks_without_branch_modules_are_refused_naming_the_class():
    with pytest.raises(TypeError, match=r"_Blocks.*hold none fastcache recognises.*ModelSpec"):
        fastcache.patch(_Blocks(), fastcache.TaylorSeerConfig())
