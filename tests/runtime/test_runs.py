"""What a sampling run is, and what invalidates a cache (docs/guarantees.md).

A cache may only be reused inside the run, the weights and the blocks that made it. A
run is started by the sampler's ``set_timesteps`` (announced pipelines), an announced
step 0, a timestep rise (unannounced loops), new weights (``load_state_dict``, any
in-place parameter change, a module or parameter added) and new blocks. An announcement
belongs to one scheduler's run and ends with it. One model call at a time: a second
thread is refused. Each test here failed on the runtime before the fix it names.
"""

import copy
import threading

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline
from support.hostreads import HostReadMode
from support.zoo import dit_case
from torch import nn

import fastcache
from fastcache import FORAConfig, ScheduleConfig, TaylorSeerConfig, TeaCacheConfig

PLAN = "CC1C20C1"
STATIC = [
    pytest.param(FORAConfig(interval=3), id="fora"),
    pytest.param(TaylorSeerConfig(interval=2, order=1), id="taylorseer"),
    pytest.param(ScheduleConfig(plan=PLAN), id="schedule"),
]


def _vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=4, layers_per_block=1
    ).eval()


def _pipe(model=None, scheduler=None):
    model = dit_case(num_embeds_ada_norm=1000).model if model is None else model
    return DiTPipeline(transformer=model, vae=_vae(), scheduler=scheduler or DDIMScheduler())


def _images(pipe, steps=8, seed=0):
    return pipe(
        class_labels=[1, 2],
        num_inference_steps=steps,
        guidance_scale=4.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(seed),
    ).images


def _user_loop(model, steps=8, seed=1, start=0, stop=None, context=None):
    """The user's own loop (no pipeline), CFG batched as DiTPipeline does it: latents of
    batch 2, labels 1 and 2; ``start``: the first index of the scheduler's timesteps
    (img2img-style runs start lower); ``stop``: interrupt after this many steps."""
    sch = DDIMScheduler()
    sch.set_timesteps(steps)
    ts = sch.timesteps[start:stop]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        for i, t in enumerate(ts):
            ctx = context(i) if context is not None else None
            if ctx is not None:
                ctx.__enter__()
            try:
                out = model(hidden_states=x, timestep=t.expand(2), class_labels=labels).sample[:, :4]
            finally:
                if ctx is not None:
                    ctx.__exit__(None, None, None)
            x = sch.step(out, t, x).prev_sample
    return x


# --------------------------------------------------------------------------- announcements
@pytest.mark.parametrize("cfg", [STATIC[0], STATIC[2]])
def test_an_announcement_expires_with_its_run(cfg):
    """After an announced pipeline run, calls the scheduler does not drive (the user's own
    loop, a second pipeline sharing the transformer, the pipeline with a swapped
    scheduler) are unannounced: bitwise what a never-announced patch gives them."""
    pipe = _pipe()
    m = pipe.transformer

    def after_a_pipeline_run(announce: bool):
        with fastcache.patched(m, cfg):
            ann = fastcache.announce_steps(pipe) if announce else None
            first = _images(pipe)
            ended = ann is None or ann.index is None  # the run is over
            mine = _user_loop(m)
            other = _images(_pipe(m, DDIMScheduler()), seed=3)  # a second pipeline, same transformer
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # swapped
            swapped = _images(pipe, seed=4)
            again = _images(pipe, seed=5)  # the swapped scheduler's next run is announced again
            tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
            if ann is not None:
                ann.remove()
        return first, mine, other, swapped, again, tl, ended

    ref = after_a_pipeline_run(False)
    got = after_a_pipeline_run(True)
    for a, b in zip(got[:5], ref[:5]):
        assert torch.equal(a, b)
    if isinstance(cfg, ScheduleConfig):  # the device plan placed every run: not all computed
        assert not all(got[5][-8:])
    assert got[6]


def test_two_pipelines_sharing_a_scheduler_keep_their_announcements():
    """Removing one pipeline's patch (and its announcer) leaves the other's announcer on the
    shared scheduler: the other still places its steps on the host, with 0 reads."""
    sch = DDIMScheduler()
    a, b = _pipe(scheduler=sch), _pipe(dit_case(num_embeds_ada_norm=1000).model, scheduler=sch)
    with fastcache.patched(b.transformer, ScheduleConfig(plan=PLAN)):
        fastcache.announce_steps(b)
        ref = _images(b)
    with fastcache.patched(b.transformer, ScheduleConfig(plan=PLAN)):
        fastcache.announce_steps(b)
        ha = fastcache.patch(a.transformer, ScheduleConfig(plan=PLAN))
        fastcache.announce_steps(a)
        _images(a)
        ha.remove()
        assert fastcache.get_patch(b.transformer).announcer is not None
        mode = HostReadMode()

        def enter(*_):
            mode.__enter__()

        def leave(*_):
            mode.__exit__(None, None, None)

        pre, post = b.transformer.register_forward_pre_hook(enter), b.transformer.register_forward_hook(leave)
        out = _images(b)
        pre.remove(), post.remove()
    assert [r for r in mode.reads if r is not None] == []
    assert torch.equal(out, ref)
    assert "step" not in sch.__dict__ and "set_timesteps" not in sch.__dict__  # all gone with the last one


@pytest.mark.parametrize(
    "cfg",
    [pytest.param(TaylorSeerConfig(interval=3, order=1), id="taylorseer"), pytest.param(FORAConfig(3), id="fora")],
)
def test_announcing_steps_never_changes_the_output(cfg):
    """No num_steps in the config: the announced run length places steps, it does not
    force a last step the unannounced path would not compute."""
    pipe = _pipe()
    with fastcache.patched(pipe.transformer, cfg):
        plain = _images(pipe, steps=8)
        tl_plain = fastcache.stats(pipe.transformer)["contexts"]["default"]["timeline"][-8:]
    with fastcache.patched(pipe.transformer, cfg), fastcache.announce_steps(pipe):
        announced = _images(pipe, steps=8)
        tl = fastcache.stats(pipe.transformer)["contexts"]["default"]["timeline"][-8:]
    assert tl == tl_plain and not tl[-1]  # the last step is a forecast in both
    assert torch.equal(announced, plain)


# --------------------------------------------------------------------------- what starts a run
def _fresh(cfg, model, **kw):
    """The run on a freshly patched model (nothing cached before)."""
    with fastcache.patched(model, cfg):
        return _user_loop(model, **kw)


@pytest.mark.parametrize("cfg", STATIC[:2])
def test_new_weights_start_a_new_run(cfg):
    """An interrupted run, new weights (load_state_dict, or an in-place change), then a run
    that starts lower (img2img-style, from t=500): no timestep rise, but nothing of the
    interrupted run is reused."""
    m = dit_case(num_embeds_ada_norm=1000).model
    other = dit_case(num_embeds_ada_norm=1000).model
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    new_weights = copy.deepcopy(other.state_dict())
    old_weights = copy.deepcopy(m.state_dict())

    m.load_state_dict(new_weights)
    ref = _fresh(cfg, m, start=4)
    m.load_state_dict(old_weights)
    with fastcache.patched(m, cfg):
        _user_loop(m, stop=2)  # interrupted after 2 of 8 steps
        m.load_state_dict(new_weights)
        got = _user_loop(m, start=4)
        runs = fastcache.stats(m).get("new_runs")
    assert torch.equal(got, ref)
    assert runs == {"weights": 1}

    # an in-place change (no load_state_dict): the parameters' version counters
    ref2 = _fresh(cfg, m, start=4)  # m holds new_weights
    with fastcache.patched(m, cfg):
        _user_loop(m, stop=2)
        with torch.no_grad():
            m.load_state_dict(old_weights)
            for p, q in zip(m.parameters(), other.parameters()):
                p.copy_(q)
        got2 = _user_loop(m, start=4)
    assert torch.equal(got2, ref2)


def test_an_announced_step_zero_starts_a_new_run():
    """Same weights, the loop announces its steps (fastcache.context(step_index=i)): step 0
    starts a run, so an img2img run below an interrupted one reuses nothing of it."""
    m = dit_case(num_embeds_ada_norm=1000).model
    cfg = FORAConfig(interval=3)

    def ctx(i):
        return fastcache.context(m, "default", step_index=i)

    with fastcache.patched(m, cfg):
        ref = _user_loop(m, start=4, context=ctx)
    with fastcache.patched(m, cfg):
        _user_loop(m, stop=2, context=ctx)
        got = _user_loop(m, start=4, context=ctx)
        runs = fastcache.stats(m).get("new_runs")
    assert torch.equal(got, ref)
    assert runs == {"step 0": 2}


def test_a_replaced_block_is_followed():
    """``model.transformer_blocks[1] = other`` after patching (a quantised or LoRA-merged
    copy): the new block runs, once, in its place; the old block gets its forward back."""
    m = dit_case(num_embeds_ada_norm=1000).model
    new_block = copy.deepcopy(m.transformer_blocks[1])
    with torch.no_grad():
        for p in new_block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    old_block = m.transformer_blocks[1]
    unpatched = copy.deepcopy(m)
    unpatched.transformer_blocks[1] = copy.deepcopy(new_block)
    ref_off = _user_loop(unpatched)
    with fastcache.patched(unpatched, FORAConfig(interval=3)):
        ref_on = _user_loop(unpatched)

    with fastcache.patched(m, FORAConfig(interval=1)):  # caching off: bitwise the unpatched model
        _user_loop(m, stop=2)
        m.transformer_blocks[1] = new_block
        off = _user_loop(m)
        runs = fastcache.stats(m).get("new_runs")
        old_forward = old_block.__dict__.get("forward")  # given back when the patch followed
    assert torch.equal(off, ref_off)
    assert runs == {"blocks": 1} and old_forward is None
    with fastcache.patched(m, FORAConfig(interval=3)):
        m.transformer_blocks[1] = old_block
        _user_loop(m, stop=2)
        m.transformer_blocks[1] = new_block
        on = _user_loop(m)
    assert torch.equal(on, ref_on)
    assert "forward" not in new_block.__dict__ and "forward" not in old_block.__dict__


class _Lora(nn.Module):
    def __init__(self, base: nn.Linear, r=2):
        super().__init__()
        self.base = base
        self.down = nn.Parameter(0.1 * torch.randn(r, base.in_features))
        self.up = nn.Parameter(0.1 * torch.randn(base.out_features, r))

    def forward(self, x):
        return self.base(x) + x @ self.down.T @ self.up.T


def test_a_trainable_parameter_added_after_patching_gets_its_gradient():
    """Frozen model, patched, then a trainable adapter added inside a block: a call with
    autograd on runs uncached (the bypass sees the new parameter), so every call's output
    carries a gradient to it."""
    m = dit_case(num_embeds_ada_norm=1000).model.requires_grad_(False)
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 2])
    with fastcache.patched(m, FORAConfig(interval=4)):
        lora = _Lora(m.transformer_blocks[1].ff.net[2])
        m.transformer_blocks[1].ff.net[2] = lora
        grads = []
        for t in (900, 800, 700):
            lora.zero_grad()
            out = m(hidden_states=x, timestep=torch.tensor([t, t]), class_labels=labels).sample
            out.square().mean().backward()
            grads.append(None if lora.up.grad is None else float(lora.up.grad.abs().sum()))
        assert fastcache.stats(m)["grad_bypassed_calls"] == 3
    assert all(g is not None and g > 0 for g in grads), grads


# --------------------------------------------------------------------------- threads
def test_a_second_thread_is_refused_while_a_call_runs():
    """Two overlapping calls would share the call and cache state: the second thread gets
    an error that says so and what to do; one after another both work."""
    m = dit_case(num_embeds_ada_norm=1000).model
    inside, release = threading.Event(), threading.Event()

    def hold(*_):  # on a non-block module: keeps thread A inside its model call
        if threading.current_thread().name == "A":
            inside.set()
            release.wait(10)

    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([900, 900]), torch.tensor([1, 2])
    call = dict(hidden_states=x, timestep=t, class_labels=labels)
    results = {}
    with fastcache.patched(m, TeaCacheConfig(threshold=0.1)), torch.no_grad():
        h = m.pos_embed.register_forward_hook(hold)
        a = threading.Thread(target=lambda: results.setdefault("A", m(**call).sample), name="A")
        a.start()
        assert inside.wait(10)
        with pytest.raises(RuntimeError, match="not thread-safe.*own copy"):
            m(**call)
        release.set()
        a.join(10)
        h.remove()
        b = threading.Thread(target=lambda: results.setdefault("B", m(**call).sample), name="B")
        b.start()
        b.join(10)
    assert set(results) == {"A", "B"}


# --------------------------------------------------------------------------- compile with autograd on
@pytest.mark.compile
def test_fullgraph_compile_with_autograd_on_runs_uncached():
    """``torch.compile(patched, fullgraph=True)`` called with grad enabled: the one-time
    warning is not traced (it is given at the next eager call or stats()), the call runs
    uncached and gives the uncompiled model's output and gradient."""
    m = dit_case(num_embeds_ada_norm=1000).model
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    ref = m(hidden_states=x, timestep=torch.tensor([900, 900]), class_labels=labels).sample
    torch._dynamo.reset()
    with fastcache.patched(m, TeaCacheConfig(threshold=0.1)):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        out = compiled(hidden_states=x, timestep=torch.tensor([900, 900]), class_labels=labels).sample
        assert out.requires_grad
        with pytest.warns(RuntimeWarning, match="autograd on"):
            st = fastcache.stats(m)
        assert st["grad_bypassed_calls"] >= 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_an_img2img_run_is_announced_from_its_begin_index():
    """img2img pipelines call ``set_begin_index(t_start)`` after ``set_timesteps``: the run has
    that many steps fewer, starts at step 0, and ends after its last step."""
    from diffusers import EulerDiscreteScheduler

    m = dit_case(num_embeds_ada_norm=1000).model
    sch = EulerDiscreteScheduler()
    x = torch.zeros(1)
    with fastcache.patched(m, FORAConfig(interval=2)), fastcache.announce_steps(sch, m) as ann:
        sch.set_timesteps(8)
        sch.set_begin_index(5)
        seen = [ann.current()]
        for t in sch.timesteps[5:]:
            sch.step(x, t, x)
            seen.append(ann.current())
    assert seen == [(0, 3), (1, 3), (2, 3), None]
    assert not {"set_timesteps", "step", "set_begin_index"} & set(sch.__dict__)


def test_an_announced_run_ends_with_its_pipeline_call():
    """A pipeline call that stops early (interrupted, or an img2img loop shorter than the
    scheduler's timesteps) ends its run when the call returns: diffusers pipelines call
    ``maybe_free_model_hooks()`` last."""

    class Pipe:
        def __init__(self, transformer):
            self.transformer, self.scheduler = transformer, DDIMScheduler()

        def maybe_free_model_hooks(self):
            pass

        def __call__(self, stop):
            self.scheduler.set_timesteps(8)
            x = torch.zeros(1)
            for t in self.scheduler.timesteps[:stop]:
                self.scheduler.step(x, t, x)
            self.maybe_free_model_hooks()

    pipe = Pipe(dit_case(num_embeds_ada_norm=1000).model)
    with fastcache.patched(pipe.transformer, FORAConfig(interval=2)), fastcache.announce_steps(pipe) as ann:
        pipe.scheduler.set_timesteps(8)
        pipe.scheduler.step(torch.zeros(1), pipe.scheduler.timesteps[0], torch.zeros(1))
        mid = ann.current()
        pipe(stop=3)
        after = ann.current()
    assert mid == (1, 8) and after is None
    assert "maybe_free_model_hooks" not in pipe.__dict__
