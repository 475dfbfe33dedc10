"""FORA on the block interior (docs/methods.md "FORA").

* interval 1 computes every step: bitwise the unpatched model, every family;
* the host schedule (step index known) and the device schedule (cache_decision) give
  the same timeline and bitwise the same output;
* parity with a host reference written here from the paper (reference DiT: cache each
  block's attention and MLP outputs before gating, recompute the gates every step);
* eager reads nothing on the host when the caller gives the step index
  (``fastcache.context(..., step_index=i)`` / diffusers' ``cache_context``), one flag otherwise;
* torch.compile(fullgraph=True): no graph break, no recompilation across steps.
"""

import pytest
import torch
from support.hostreads import HostReadMode
from support.zoo import CASES, CORE, reference_dit_case
from torch._dynamo.testing import CompileCounterWithBackend

import fastcache
from fastcache.models.dit import modulate

STEPS = 10


@pytest.fixture(scope="module", params=sorted(CORE))
def case(request):
    return CASES[request.param]()


def test_host_and_device_schedules_agree_bitwise(case):
    with fastcache.patched(case.model, fastcache.FORAConfig(interval=3, num_steps=STEPS)):
        host = case.sample(steps=STEPS, context=lambda i: fastcache.context(case.model, "default", step_index=i))
        sh = fastcache.stats(case.model)["contexts"]["default"]
    with fastcache.patched(case.model, fastcache.FORAConfig(interval=3)):
        dev = case.sample(steps=STEPS)
        sd = fastcache.stats(case.model)["contexts"]["default"]
    expected = [s % 3 == 0 for s in range(STEPS)]
    assert sh["timeline"] == sd["timeline"] == expected
    assert sh["skipped"] == sd["skipped"] == STEPS - sum(expected)
    assert torch.equal(host, dev)
    assert not torch.equal(host, case.sample(steps=STEPS))  # reuse changed something


def _fora_reference(model, x, ts, y, interval, warmup):
    """FORA from the paper, by hand on the reference DiT: cache A_l, M_l (pre-gate) on
    computed steps; skipped steps x += gate_msa(c_s) A_l; x += gate_mlp(c_s) M_l."""
    cache = {}
    outs = []
    for s, t in enumerate(ts):
        compute = s < warmup or (s - warmup + 1) % interval == 0
        h = model.patch_embed(x[s]) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for li, blk in enumerate(model.blocks):
            sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
            if compute:
                cache[li, "a"] = blk.attn(modulate(blk.norm1(h), sh1, sc1))
            h = h + g1.unsqueeze(1) * cache[li, "a"]
            if compute:
                cache[li, "m"] = blk.mlp(modulate(blk.norm2(h), sh2, sc2))
            h = h + g2.unsqueeze(1) * cache[li, "m"]
        outs.append(model.unpatchify(model.final_layer(h, c)))
    return outs


@pytest.mark.parametrize("interval,warmup", [(2, 1), (3, 2)])
def test_matches_paper_reference(interval, warmup):
    case = reference_dit_case()
    m = case.model
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(7)]
    ts = [torch.full((2,), 999.0 - 140 * s) for s in range(7)]
    y = torch.tensor([1, 2])
    with torch.no_grad():
        ref = _fora_reference(m, xs, ts, y, interval, warmup)
        with fastcache.patched(m, fastcache.FORAConfig(interval=interval, warmup_steps=warmup)):
            got = [m(x, t, y) for x, t in zip(xs, ts)]
            st = fastcache.stats(m)["contexts"]["default"]
    assert st["skipped"] == sum(not (s < warmup or (s - warmup + 1) % interval == 0) for s in range(7)) > 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_host_schedule_reads_nothing_device_schedule_one_flag():
    case = reference_dit_case()
    m = case.model
    for host_index, expected in ((True, 0), (False, 8)):
        with fastcache.patched(m, fastcache.FORAConfig(interval=2, num_steps=8)):
            mode = HostReadMode()
            ctx = (lambda i: fastcache.context(m, "default", step_index=i)) if host_index else None
            with mode:
                case.sample(steps=8, context=ctx)
            st = fastcache.stats(m)["contexts"]["default"]
        ours = [r for r in mode.reads if r is not None]
        assert st["skipped"] == 4
        assert len(ours) == expected, ours
        assert all("policies/interior_engine.py:run_stack" in r and ".item()" in r for r in ours), ours


@pytest.mark.compile
@pytest.mark.parametrize("name", ["fastcache-dit", "diffusers-flux"])
def test_fullgraph_compile_no_breaks_no_recompiles(name):
    case = CASES[name]()
    m = case.model
    with fastcache.patched(m, fastcache.FORAConfig(interval=3)):
        eager = case.sample(steps=8)
        tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
        fastcache.reset(m)
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(m, fullgraph=True, backend=cnt)  # fullgraph: any graph break raises
        frames = []
        out = case.sample(model=compiled, steps=8, per_step=lambda i, o: frames.append(cnt.frame_count))
        case.sample(model=compiled, steps=8, per_step=lambda i, o: frames.append(cnt.frame_count))
        st = fastcache.stats(m)["contexts"]["default"]
    # the first call allocates the cache (a second trace, as with TeaCache); then no recompilation
    assert frames[1] <= 2 and len(set(frames[1:])) == 1, frames
    assert st["timeline"] == tl
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_spec_without_interior_is_refused():
    case = reference_dit_case()
    spec = fastcache.specs.find_spec(case.model)
    import dataclasses

    bare = dataclasses.replace(spec, name="no-interior", interior=None)
    with pytest.raises(TypeError, match="describes no block interior"):
        fastcache.patch(case.model, fastcache.FORAConfig(), spec=bare)
    assert "forward" not in case.model.__dict__


def test_config_validation():
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        fastcache.FORAConfig(interval=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        fastcache.FORAConfig(warmup_steps=0)
    assert [fastcache.FORAConfig(interval=3, warmup_steps=2).computes(s) for s in range(6)] == [
        True,
        True,
        False,
        False,
        True,
        False,
    ]
