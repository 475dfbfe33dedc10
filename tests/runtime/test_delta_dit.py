"""Δ-DiT block-range Δ-cache (docs/methods.md, section 3).

* never-cache settings (interval 1, num_cached 0) are bitwise the unpatched model, every family;
* decision trace, cached range per step and outputs vs a host reference written here from
  D1-D3 and the schedule D5 (module hooks on the unpatched model, one Δ per range), on the
  five families, with ranges that are disjoint, overlap, cover the stack, and cross Flux's
  dual/single-stream segments; the host schedule (step index given) and the device
  schedule agree bitwise;
* the stage boundary step computes (the front range has no Δ yet), unless the ranges are
  the same;
* host reads: none with a step index, one per step without; torch.compile(fullgraph=True):
  0 breaks, one cond per cached part, no recompilation across steps and runs;
* per-context (CFG branch) state, repeated timesteps, invalidate, config validation, stats.
"""

from __future__ import annotations

import pytest
import torch
from support.zoo import CASES, CORE
from torch._dynamo.testing import CompileCounterWithBackend

import fastcache
from fastcache.policies.delta_dit import split_parts

STEPS = 12
# interval 3 from step 0 computes 0, 3, 6, 9; the boundary 7 is off that grid, so it is
# visible in the trace: 0, 3, 6 | 7 (forced), 10
INTERVAL, BOUNDARY = 3, 7
EXPECTED = [s in (0, 3, 6, 7, 10) for s in range(STEPS)]

BLOCK_LISTS = {
    "diffusers-flux": ("transformer_blocks", "single_transformer_blocks"),
    "fastcache-dit": ("blocks",),
}
# hidden-state streams of a block call, in the block's return order, and those passed positionally
STREAMS = {
    "diffusers-dit": ("hidden_states",),
    "diffusers-pixart": ("hidden_states",),
    "fastcache-dit": ("x",),
    "diffusers-flux": ("encoder_hidden_states", "hidden_states"),
    "diffusers-sd3": ("encoder_hidden_states", "hidden_states"),
}
POSITIONAL = {"diffusers-dit": ["hidden_states"], "diffusers-pixart": ["hidden_states"], "fastcache-dit": ["x"]}


def _blocks(name, model):
    return [b for n in BLOCK_LISTS.get(name, ("transformer_blocks",)) for b in getattr(model, n)]


# ------------------------------------------------------------------ host reference
class ReferenceDeltaDiT:
    """Δ-DiT on the host from docs/methods.md section 3, with hooks on the unpatched model
    (every block still runs; the range's output is replaced on skipped steps).

    Step s (counted at block 0): the range is the last ``nc`` blocks if ``s < b`` else the
    first ``nc`` (D1). Forced refresh: ``s < warmup`` or (``s == b`` and the ranges differ);
    otherwise refresh iff ``interval`` steps have passed since the last refresh (D5). Refresh:
    ``Δ <- out - h`` with ``h`` the range's input (D2); skip: ``out = h + Δ`` (D3). One Δ
    for the whole range (the policy's per-part Δ must agree within fp32 rounding)."""

    def __init__(self, name, model, interval, nc, boundary, warmup=1):
        self.name, self.interval, self.nc, self.b, self.warmup = name, interval, nc, boundary, warmup
        blocks = _blocks(name, model)
        self.L = len(blocks)
        self.s = -1
        self.since = 0
        self.compute = True
        self.delta: dict | None = None
        self.h: dict | None = None
        self.trace: list[bool] = []
        self.ranges: list[str] = []
        self.handles = []
        for i, blk in enumerate(blocks):
            self.handles.append(
                blk.register_forward_pre_hook(lambda m, a, k, i=i: self._pre(i, a, k), with_kwargs=True)
            )
            self.handles.append(blk.register_forward_hook(lambda m, a, o, i=i: self._post(i, o)))

    def remove(self):
        for h in self.handles:
            h.remove()

    def _range(self):
        front = self.s >= self.b
        return ("front", 0, self.nc - 1) if front else ("rear", self.L - self.nc, self.L - 1)

    def _pre(self, i, args, kwargs):
        if i == 0:  # a new model call: decide the step
            self.s += 1
            forced = self.s < self.warmup or (self.s == self.b and self.nc < self.L)
            self.compute = forced or self.since >= self.interval
            self.since = 1 if self.compute else self.since + 1
            self.trace.append(self.compute)
            self.ranges.append(self._range()[0])
        _, start, _ = self._range()
        if i == start:
            kw = dict(zip(POSITIONAL.get(self.name, []), args))
            kw.update(kwargs)
            self.h = {n: kw[n] for n in STREAMS[self.name]}

    def _post(self, i, out):
        _, _, end = self._range()
        if i != end:
            return None
        names = STREAMS[self.name]
        outs = dict(zip(names, out if isinstance(out, tuple) else (out,)))
        if self.compute:
            self.delta = {n: outs[n] - self.h[n] for n in names if outs[n] is not None}
            return None
        new = {n: (self.h[n] + self.delta[n] if outs[n] is not None else None) for n in names}
        return tuple(new[n] for n in names) if isinstance(out, tuple) else new[names[0]]


def _reference(case, nc, interval=INTERVAL, boundary=BOUNDARY, steps=STEPS):
    ref = ReferenceDeltaDiT(case.name, case.model, interval, nc, boundary)
    try:
        out = case.sample(steps=steps)
    finally:
        ref.remove()
    return out, ref


def _indexed(model, name="default"):
    return lambda i: fastcache.context(model, name, step_index=i)


# ------------------------------------------------------------------ config and schedule
def test_config_validation_and_host_schedule():
    for field in ("interval", "num_cached", "boundary"):
        kw = {"interval": 2, "num_cached": 1, "boundary": 3}
        del kw[field]
        with pytest.raises(ValueError, match=f"DeltaDiTConfig.{field} is required"):
            fastcache.DeltaDiTConfig(**kw)
    for bad in ({"interval": 0}, {"num_cached": -1}, {"boundary": -1}, {"warmup_steps": 0}, {"history": 0}):
        kw = {"interval": 2, "num_cached": 1, "boundary": 3, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            fastcache.DeltaDiTConfig(**kw)
    cfg = fastcache.DeltaDiTConfig(interval=INTERVAL, num_cached=2, boundary=BOUNDARY, num_steps=STEPS)
    assert fastcache.CacheConfig.from_dict(cfg.to_dict()) == cfg
    assert [cfg.computes(s, 6) for s in range(STEPS)] == EXPECTED
    assert [cfg.stage_of(s) for s in range(STEPS)] == ["rear"] * BOUNDARY + ["front"] * (STEPS - BOUNDARY)
    # num_cached = depth: both ranges are the whole stack, the boundary is not forced
    assert [cfg.computes(s, 2) for s in range(STEPS)] == [s % 3 == 0 for s in range(STEPS)]
    # warm-up anchors the grid on its last step: 0, 1 then 3 (every 2nd); boundary 4 is on it
    w = fastcache.DeltaDiTConfig(interval=2, num_cached=1, boundary=4, warmup_steps=2)
    assert [w.computes(s, 3) for s in range(8)] == [True, True, False, True, True, False, True, False]
    case = CASES["diffusers-flux"]()  # 4 blocks
    with pytest.raises(ValueError, match="num_cached=5 exceeds the 4 blocks"):
        fastcache.patch(case.model, fastcache.DeltaDiTConfig(interval=2, num_cached=5, boundary=3))
    assert "forward" not in case.model.__dict__


def test_split_parts():
    P = split_parts
    assert [(p.start, p.stop, p.front, p.rear) for p in P(6, 2)] == [
        (0, 2, True, False),
        (2, 4, False, False),
        (4, 6, False, True),
    ]
    assert [(p.start, p.stop, p.front, p.rear) for p in P(4, 3)] == [
        (0, 1, True, False),
        (1, 3, True, True),
        (3, 4, False, True),
    ]
    assert [(p.start, p.stop, p.front, p.rear) for p in P(6, 3)] == [(0, 3, True, False), (3, 6, False, True)]
    assert [(p.start, p.stop, p.front, p.rear) for p in P(3, 3)] == [(0, 3, True, True)]
    assert [(p.start, p.stop, p.front, p.rear) for p in P(3, 0)] == [(0, 3, False, False)]


# ------------------------------------------------------------------ outputs
@pytest.mark.parametrize("name", sorted(CORE))
def test_never_cache_is_bitwise_unpatched(name):
    case = CASES[name]()
    ref = case.sample(steps=STEPS)
    for kw in ({"interval": 1, "num_cached": 2}, {"interval": 3, "num_cached": 0}):
        with fastcache.patched(case.model, fastcache.DeltaDiTConfig(boundary=BOUNDARY, **kw)):
            out = case.sample(steps=STEPS)
            st = fastcache.stats(case.model)["contexts"]["default"]
        assert torch.equal(out, ref), kw
        assert st["computed"] == STEPS and st["skipped"] == 0 and st["computed_fraction"] == 1.0


@pytest.mark.parametrize(
    "name, nc",
    [
        ("diffusers-dit", 1),  # disjoint ranges
        ("diffusers-pixart", 2),  # overlapping ranges
        ("diffusers-flux", 1),
        ("diffusers-flux", 3),  # both ranges cross the dual/single-stream segments and overlap
        ("diffusers-sd3", 2),  # the rear range ends in the block that drops the text stream
        ("fastcache-dit", 3),  # the whole stack: no forced boundary
    ],
)
def test_matches_host_reference_host_and_device_schedules(name, nc):
    case = CASES[name]()
    m = case.model
    expected, ref = _reference(case, nc)
    L = len(_blocks(name, m))
    want = EXPECTED if nc < L else [s % INTERVAL == 0 for s in range(STEPS)]
    assert ref.trace == want
    cfg = fastcache.DeltaDiTConfig(interval=INTERVAL, num_cached=nc, boundary=BOUNDARY, num_steps=STEPS)
    with fastcache.patched(m, cfg):
        dev = case.sample(steps=STEPS)
        sd = fastcache.stats(m)["contexts"]["default"]
    with fastcache.patched(m, cfg):
        host = case.sample(steps=STEPS, context=_indexed(m))
        sh = fastcache.stats(m)["contexts"]["default"]
    for st in (sd, sh):
        assert st["timeline"] == ref.trace
        assert st["ranges"] == ref.ranges == ["rear"] * BOUNDARY + ["front"] * (STEPS - BOUNDARY)
        assert st["skipped"] == STEPS - sum(want) and st["computed"] == sum(want)
        assert st["computed_fraction"] == pytest.approx((sum(want) * L + st["skipped"] * (L - nc)) / (STEPS * L))
        assert st["cache_bytes"] > 0
    assert torch.equal(host, dev)
    torch.testing.assert_close(dev, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(dev, case.sample(steps=STEPS))  # the reuse changed something


def test_boundary_step_computes_off_the_grid():
    """interval 4: the grid alone computes 0, 4, 8; the boundary 6 refreshes (the front
    range has no Δ) and re-anchors the grid: 0, 4, 6, 10."""
    case = CASES["fastcache-dit"]()  # 3 blocks
    m = case.model
    with fastcache.patched(m, fastcache.DeltaDiTConfig(interval=4, num_cached=1, boundary=6)):
        case.sample(steps=STEPS)
        tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
    assert tl == [s in (0, 4, 6, 10) for s in range(STEPS)]
    with fastcache.patched(m, fastcache.DeltaDiTConfig(interval=4, num_cached=3, boundary=6)):
        case.sample(steps=STEPS)
        tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
    assert tl == [s in (0, 4, 8) for s in range(STEPS)]  # one range (the whole stack): nothing to switch


def test_cache_bytes_count_the_deltas():
    case = CASES["fastcache-dit"]()  # 3 blocks, nc=1: a front and a rear part, one Δ each
    m = case.model
    with fastcache.patched(m, fastcache.DeltaDiTConfig(interval=2, num_cached=1, boundary=4)):
        case.sample(steps=6)
        st = fastcache.stats(m)["contexts"]["default"]
        p = fastcache.get_patch(m)
        state = p.contexts["default"]
        assert sorted(state.residuals) == ["0:x", "2:x"]
        delta_bytes = sum(r.numel() * r.element_size() for r in state.residuals.values())
    x = m.patch_embed(case.latents(torch.Generator().manual_seed(1)))
    assert delta_bytes == 2 * x.numel() * 4
    assert delta_bytes <= st["cache_bytes"] <= delta_bytes + 32 * 1024  # + decision state, skip buffers


# ------------------------------------------------------------------ runtime behaviour
def test_context_per_cfg_branch():
    """Two branches in their own contexts, interleaved step by step, give what each gives
    alone: no state is shared."""
    case = CASES["fastcache-dit"]()
    m = case.model
    cfg = fastcache.DeltaDiTConfig(interval=INTERVAL, num_cached=1, boundary=BOUNDARY)
    sch = case.scheduler()
    sch.set_timesteps(STEPS)
    x0 = case.latents(torch.Generator().manual_seed(1))
    ya, yb = torch.tensor([1, 2]), torch.tensor([7, 8])

    def loop(branches, use_ctx):
        xs = {k: x0.clone() for k in branches}
        with torch.no_grad():
            for t in sch.timesteps:
                for k, y in branches.items():
                    tt = t.expand(2)
                    if use_ctx:
                        with fastcache.context(m, k):
                            out = m(xs[k], tt, y)
                    else:
                        out = m(xs[k], tt, y)
                    xs[k] = sch.step(out, t, xs[k]).prev_sample
        return xs

    with fastcache.patched(m, cfg):
        both = loop({"cond": ya, "uncond": yb}, True)
        stats = fastcache.stats(m)["contexts"]
    alone = {}
    for k, y in (("cond", ya), ("uncond", yb)):
        with fastcache.patched(m, cfg):
            alone[k] = loop({k: y}, False)[k]
    assert stats["cond"]["timeline"] == stats["uncond"]["timeline"] == EXPECTED
    assert torch.equal(both["cond"], alone["cond"]) and torch.equal(both["uncond"], alone["uncond"])


def test_repeated_timestep_computes_and_leaves_the_cache_untouched():
    case = CASES["diffusers-flux"]()
    m = case.model
    cfg = fastcache.DeltaDiTConfig(interval=INTERVAL, num_cached=3, boundary=BOUNDARY)
    with fastcache.patched(m, cfg):
        plain = case.sample(steps=STEPS)
        st_plain = fastcache.stats(m)["contexts"]["default"]
        fastcache.reset(m)
        sch = case.scheduler()
        sch.set_timesteps(STEPS)
        x = case.latents(torch.Generator().manual_seed(1))
        with torch.no_grad():
            for t in sch.timesteps:
                kw = case.inputs(x, t)
                out = case.output(m(**kw))
                case.output(m(**kw))  # the repeat
                x = sch.step(out, t, x).prev_sample
        with pytest.warns(RuntimeWarning, match="repeated the previous call's timestep"):
            st = fastcache.stats(m)["contexts"]["default"]
    assert st_plain["timeline"] == st["timeline"] == EXPECTED
    assert st["repeated_timestep_calls"] == STEPS
    assert torch.equal(x, plain)


@pytest.mark.parametrize("indexed", [False, True])
def test_invalidate_forces_the_next_step_and_keeps_the_stage(indexed):
    case = CASES["diffusers-dit"]()
    m = case.model
    with fastcache.patched(m, fastcache.DeltaDiTConfig(interval=100, num_cached=1, boundary=BOUNDARY)):

        def per_step(i, out):
            if i == 3:
                p = fastcache.get_patch(m)
                p.policy.invalidate(p.contexts[p.current_context])

        case.sample(steps=STEPS, per_step=per_step, context=_indexed(m) if indexed else None)
        st = fastcache.stats(m)["contexts"]["default"]
    # interval 100: only forced steps compute: 0, 4 (after invalidate) and the boundary 7
    assert st["timeline"] == [s in (0, 4, 7) for s in range(STEPS)]
    assert st["ranges"] == ["rear"] * BOUNDARY + ["front"] * (STEPS - BOUNDARY)


@pytest.mark.parametrize("indexed, expected", [(True, 0), (False, STEPS)])
def test_host_reads_none_with_step_index_one_flag_without(indexed, expected):
    from support.hostreads import HostReadMode, python_level_reads

    case = CASES["diffusers-flux"]()
    m = case.model
    mode = HostReadMode()
    with python_level_reads() as py_reads:
        with fastcache.patched(m, fastcache.DeltaDiTConfig(interval=INTERVAL, num_cached=3, boundary=BOUNDARY)):
            case.sample(steps=1)  # allocate the buffers outside the measured run
            fastcache.reset(m)
            before = len(py_reads)
            with mode:
                case.sample(steps=STEPS, context=_indexed(m) if indexed else None)
            reads = py_reads[before:]
            st = fastcache.stats(m)["contexts"]["default"]
    assert st["timeline"] == EXPECTED
    ours = [r for r in mode.reads + reads if r is not None]
    assert len(ours) == expected, ours
    assert all(r.startswith("policies/delta_dit.py:run_stack:") and ".item()" in r for r in ours), ours


@pytest.mark.compile
@pytest.mark.parametrize("name, nc, n_conds", [("diffusers-flux", 3, 3), ("fastcache-dit", 1, 2)])
def test_fullgraph_compile_zero_breaks_no_recompiles(name, nc, n_conds):
    case = CASES[name]()
    m = case.model
    with fastcache.patched(m, fastcache.DeltaDiTConfig(interval=INTERVAL, num_cached=nc, boundary=BOUNDARY)):
        eager = case.sample(steps=STEPS)
        eager_tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
        assert eager_tl == EXPECTED
        fastcache.reset(m)
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(m, fullgraph=True, backend=cnt)  # fullgraph: any graph break raises
        frames, first = [], []
        count = lambda i, o: (frames.append(cnt.frame_count), first.append(cnt.graphs[:]))  # noqa: E731
        out = case.sample(model=compiled, steps=STEPS, per_step=count)
        tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
        case.sample(model=compiled, steps=STEPS, per_step=lambda i, o: frames.append(cnt.frame_count))
    # the first call's capture (what torch._dynamo.explain traces from the reset state)
    conds = [n for g in first[0] for n in g.graph.nodes if n.op == "call_function" and "cond" in str(n.target)]
    assert len(conds) == n_conds, "one cond per cached part"
    # the first call allocates the cache (a second trace, as with FORA); then no recompilation
    assert frames[1] <= 2 and len(set(frames[1:])) == 1, frames
    assert tl == eager_tl
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, nc, n_conds", [("diffusers-flux", 3, 3), ("diffusers-sd3", 1, 2)])
def test_cond_path_matches_eager_bitwise(name, nc, n_conds):
    """The cond-operator path (what torch.compile and CUDA-graph capture run; forced in
    eager by force_cond) gives the eager path's decisions and outputs exactly."""
    from support.hostreads import HostReadMode

    from fastcache.policies.base import force_cond

    case = CASES[name]()
    m = case.model
    cfg = fastcache.DeltaDiTConfig(interval=INTERVAL, num_cached=nc, boundary=BOUNDARY)
    with fastcache.patched(m, cfg):
        eager = case.sample(steps=STEPS)
        fastcache.reset(m)
        mode = HostReadMode()
        with force_cond(), mode:
            conds = case.sample(steps=STEPS)
        st = fastcache.stats(m)["contexts"]["default"]
    assert st["timeline"] == EXPECTED
    assert len(mode.conds) == STEPS * n_conds  # one cond operator per cached part per step
    assert torch.equal(conds, eager)
