"""AdaCache (fastcache/policies/adacache.py; Kahatapitiya et al., arXiv 2411.02397):

* decision trace, distances and outputs equal a host-side reference written here from the
  published algorithm (plain Python over the unpatched model with module hooks), on the
  diffusers DiT and Wan, and with MoReg (the official code's motion score) on Wan with 3
  frames;
* a codebook of all-1 intervals is bitwise the unpatched model;
* eager: one host read per step (the decision flag), none in the distance, lookup or countdown;
* torch.compile(fullgraph=True): 0 graph breaks, the skip one cond, the compiled loop's
  decisions and outputs those of eager;
* the codebooks (published presets, scaling) and every refusal;
* MoReg: never-skip bitwise, eager and compiled host reads and graph breaks, motion making it
  compute more often, the published constants and window, the refusal on image families.

(The contract suite, tests/contracts/test_methods.py, adds the repeated-call, round-trip
and per-family checks.)"""

import dataclasses
import math

import pytest
import torch
import torch._dynamo
from support.hostreads import HostReadMode, python_level_reads
from support.teacache_reference import BLOCK_LISTS, HIDDEN_AT, POSITIONAL, STREAM
from support.zoo import CASES

import fastcache
from fastcache.policies.adacache import PRESETS, scale_codebook, scale_window

STEPS = 20
FAMILIES = ["diffusers-dit", "diffusers-wan"]

# the published codebooks, written out again (arXiv 2411.02397, Sec. 4 / the official code)
PUBLISHED = {
    "fast": {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1},
    "slow": {0.08: 3, 0.16: 2, 0.24: 1, 0.32: 1, 0.40: 1, 1.00: 1},
    "100": {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.00: 3},
}


class ReferenceAdaCache:
    """AdaCache written from the paper on the unpatched model: a pre-hook on the first block
    decides in Python; hooks on the metric block record its residual ``r``; a hook on the
    last block replaces its output on skipped steps with ``x_in + R`` and stores
    ``R = out - x_in`` on computed ones. Every block runs (semantics, not speed)."""

    def __init__(self, name, model, codebook, num_steps, metric_block=None, moreg=None):
        self.book = sorted(codebook.items())
        self.moreg = moreg  # MoReg: the config and the tokens per frame S, or None
        self.m_prev = 1.0
        self.factors = []
        self.num_steps = num_steps
        self.stream = STREAM.get(name, "hidden_states")
        self.positional = POSITIONAL.get(name, [])
        self.at = HIDDEN_AT.get(name, 1)
        blocks = [b for n in BLOCK_LISTS.get(name, ("transformer_blocks",)) for b in getattr(model, n)]
        mid = blocks[len(blocks) // 2 if metric_block is None else metric_block]
        self.step = 0
        self.next = 0  # the step index of the next computed step
        self.last = None  # (step index, metric residual) of the last computed step
        self.skip = False
        self.trace, self.distances = [], []
        self.handles = [
            blocks[0].register_forward_pre_hook(self._decide, with_kwargs=True),
            mid.register_forward_pre_hook(self._mid_in, with_kwargs=True),
            mid.register_forward_hook(self._mid_out),
            blocks[-1].register_forward_hook(self._last_out),
        ]

    def remove(self):
        for h in self.handles:
            h.remove()

    def _hidden_in(self, args, kwargs):
        kw = dict(zip(self.positional, args))
        kw.update(kwargs)
        return kw[self.stream]

    def _hidden_out(self, out):
        return out[self.at] if isinstance(out, tuple) else out

    def _decide(self, module, args, kwargs):
        s, n = self.step, self.num_steps
        compute = s == 0 or s >= n - 2 or s >= self.next
        self.skip = not compute
        self.trace.append(compute)
        self.x_in = self._hidden_in(args, kwargs)

    def _mid_in(self, module, args, kwargs):
        self.mid_in = self._hidden_in(args, kwargs)

    def _mid_out(self, module, args, out):
        if self.skip:
            return
        r = self._hidden_out(out) - self.mid_in
        s, c = self.step, None
        if self.last is not None:
            p, r_p = self.last
            c = (r - r_p).abs().double().sum().item() / r_p.abs().double().sum().item() / (s - p)
            if self.moreg is not None:
                c *= self._moreg(r, s, s - p)
        else:
            self.m_prev = 1.0  # a run starts: no motion score yet
        interval = 1 if c is None else next((v for thr, v in self.book if c < thr), 1)
        self.next = s + interval
        self.last = (s, r)
        self.distances.append(c)

    def _moreg(self, r, s, k):
        """The official Open-Sora code's MoReg (compute_next_step): the score of the current
        metric residual over frame-major tokens, S per frame, the whole batch; steps counted
        from 1; the motion gradient against the last measured score."""
        cfg, per_frame = self.moreg
        lo, hi = cfg.moreg_window(self.num_steps)
        if lo <= s + 1 <= hi:
            m = 0.0
            for i in cfg.moreg_strides:
                later, earlier = r[:, i * per_frame :].double(), r[:, : -i * per_frame].double()
                m += ((later - earlier).abs().sum() / (later.abs().sum() + earlier.abs().sum())).item()
            m /= len(cfg.moreg_strides)
            m = ((m / cfg.moreg_norm) ** cfg.moreg_exponent) / cfg.moreg_divisor
        else:
            m = 1.0
        grad = cfg.mograd_mul * (m - self.m_prev) / k
        self.m_prev = m
        self.factors.append(m + abs(grad))
        return m + abs(grad)

    def _last_out(self, module, args, out):
        hidden = self._hidden_out(out)
        if self.skip:
            hidden = self.x_in + self.residual
            self.distances.append(None)
        else:
            self.residual = hidden - self.x_in
        self.step += 1
        if not isinstance(out, tuple):
            return hidden
        return out[: self.at] + (hidden,) + out[self.at + 1 :]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    return CASES[request.param]()


def test_matches_host_reference(case):
    cfg = fastcache.AdaCacheConfig(preset="fast", num_steps=STEPS)
    book = dict(cfg.codebook_for(STEPS))
    ref = ReferenceAdaCache(case.name, case.model, book, STEPS)
    try:
        expected = case.sample(steps=STEPS)
    finally:
        ref.remove()
    with fastcache.patched(case.model, cfg):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert st["timeline"] == ref.trace
    skipped = STEPS - sum(ref.trace)
    assert skipped >= 5, f"the fast preset should skip steps on {case.name}; skipped {skipped}"
    assert st["skipped"] == skipped and st["computed"] == STEPS - skipped
    assert ref.trace[0] and ref.trace[-2] and ref.trace[-1]
    assert len(set(i for i in st["interval"] if i is not None)) >= 2, "the codebook should give several intervals"
    for got, want in zip(st["distance"], ref.distances):
        assert (got is None) == (want is None)
        if want is not None:
            assert math.isclose(got, want, rel_tol=1e-4), (st["distance"], ref.distances)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_metric_block_and_slow_codebook_match_host_reference():
    case = CASES["diffusers-dit"]()
    cfg = fastcache.AdaCacheConfig(preset="slow", num_steps=STEPS, metric_block=0)
    ref = ReferenceAdaCache(case.name, case.model, dict(cfg.codebook_for(STEPS)), STEPS, metric_block=0)
    try:
        expected = case.sample(steps=STEPS)
    finally:
        ref.remove()
    with fastcache.patched(case.model, cfg):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert st["timeline"] == ref.trace and not all(ref.trace)
    assert st["metric_block"] == 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_never_skip_codebook_is_bitwise_unpatched(case):
    ref = case.sample(steps=STEPS)
    with fastcache.patched(case.model, fastcache.AdaCacheConfig(codebook={0.5: 1, 1.0: 1}, num_steps=STEPS)):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert torch.equal(out, ref)
    assert st["timeline"] == [True] * STEPS
    assert st["interval"] == [1] * STEPS


def test_second_run_and_invalidate_start_afresh(case):
    with fastcache.patched(case.model, fastcache.AdaCacheConfig(num_steps=STEPS)) as handle:
        a = case.sample(steps=STEPS)
        tl = fastcache.stats(case.model)["contexts"]["default"]["timeline"]
        b = case.sample(steps=STEPS)  # no reset: the rising timestep starts a new run
        assert torch.equal(a, b)
        assert fastcache.stats(case.model)["contexts"]["default"]["timeline"] == tl
        assert fastcache.stats(case.model)["contexts"]["default"]["runs"] == 2
        policy, state = handle.policy, handle.contexts["default"]
        policy.invalidate(state)
        assert float(state.ada[0]) == 0.0 and float(state.ada[2]) == 0.0  # the next step is due, unmeasured


def test_eager_reads_one_flag_per_step_and_nothing_in_the_math():
    case = CASES["fastcache-dit"]()
    steps = 12
    mode = HostReadMode()
    with python_level_reads() as py_reads:
        with fastcache.patched(case.model, fastcache.AdaCacheConfig(num_steps=steps)):
            case.sample(steps=1)  # allocate the buffers outside the measured run
            fastcache.reset(case.model)
            before = len(py_reads)
            with mode:
                case.sample(steps=steps)
            reads = py_reads[before:]
            st = fastcache.stats(case.model)["contexts"]["default"]
    assert 0 < st["skipped"] < steps  # both branches ran, and the distance was measured
    ours = [r for r in mode.reads + reads if r is not None]
    assert len(ours) == steps, ours
    assert all(r.startswith("policies/adacache.py:run_stack:if flag.item()") for r in ours), ours


def compiled_loop(case, steps):
    """``steps`` steps of ``torch.compile(case.model, fullgraph=True, backend="aot_eager")``,
    each call under a fresh :class:`HostReadMode`. Returns the final latents, per step the
    host reads and the cond operators dispatched, and dynamo's counters (graph breaks,
    graphs) of the loop's own compilation."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(case.model, fullgraph=True, backend="aot_eager")
    sch = case.scheduler()
    sch.set_timesteps(steps)
    x = case.latents(torch.Generator().manual_seed(1))
    reads, conds = [], []
    with torch.no_grad():
        for t in sch.timesteps:
            mode = HostReadMode()
            with python_level_reads() as py, mode:
                out = case.output(compiled(**case.inputs(x, t)))
            reads.append(mode.reads + py)
            conds.append(mode.conds)
            x = sch.step(out, t, x).prev_sample
    return x, reads, conds, {k: dict(v) for k, v in counters.items()}


def assert_one_cond_read_per_step(reads, conds, counts):
    """0 graph breaks, one graph; per step one cond operator (graph-module branches), whose
    kernel reads its flag once, and no other host read."""
    assert not counts.get("graph_break"), counts.get("graph_break")
    assert counts["stats"]["unique_graphs"] == 1, counts["stats"]
    assert all(len(c) == 1 and issubclass(c[0][0], torch.fx.GraphModule) for c in conds), conds
    assert all(len(r) == 1 and (r[0] or "").startswith("cond-kernel") for r in reads), reads


@pytest.mark.compile
def test_fullgraph_compile_one_cond_and_matches_eager():
    case = CASES["fastcache-dit"]()
    m, steps = case.model, 10
    with fastcache.patched(m, fastcache.AdaCacheConfig(num_steps=steps)):
        eager = case.sample(steps=steps)
        eager_st = fastcache.stats(m)["contexts"]["default"]
        assert not all(eager_st["timeline"])
        fastcache.reset(m)
        out, reads, conds, counts = compiled_loop(case, steps)
        st = fastcache.stats(m)["contexts"]["default"]
    assert_one_cond_read_per_step(reads, conds, counts)
    assert st["timeline"] == eager_st["timeline"]
    assert st["interval"] == eager_st["interval"]
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- codebooks
def test_presets_are_the_published_codebooks():
    assert {k: dict(v[1]) for k, v in PRESETS.items()} == PUBLISHED
    assert {k: v[0] for k, v in PRESETS.items()} == {"fast": 30, "slow": 30, "100": 100}
    assert fastcache.AdaCacheConfig().codebook_for(30) == tuple(PUBLISHED["fast"].items())
    assert fastcache.AdaCacheConfig(preset="100").codebook_for(100) == tuple(PUBLISHED["100"].items())
    assert fastcache.AdaCacheConfig(preset="slow").codebook_for(None) == tuple(PUBLISHED["slow"].items())


def test_codebook_scaling_to_other_step_counts():
    # 20 steps from the 30-step "fast": intervals x 2/3 rounded half up, thresholds x 3/2
    got = scale_codebook(PRESETS["fast"][1], 30, 20)
    assert [iv for _, iv in got] == [4, 3, 3, 2, 1, 1]
    assert [round(t, 6) for t, _ in got] == [0.12, 0.24, 0.36, 0.48, 0.6, 1.5]
    # 50 steps from the 100-step codebook: halved intervals, doubled thresholds
    got = scale_codebook(PRESETS["100"][1], 100, 50)
    assert got == ((0.06, 6), (0.1, 5), (0.14, 4), (0.18, 3), (0.22, 2), (2.0, 2))
    # never below one step
    assert all(iv >= 1 for _, iv in scale_codebook(PRESETS["slow"][1], 30, 4))
    # an explicit codebook is used as given at every step count
    cfg = fastcache.AdaCacheConfig(codebook={0.2: 3, 0.1: 5}, num_steps=50)
    assert cfg.codebook_for(10) == ((0.1, 5), (0.2, 3))


def test_config_round_trips():
    for cfg in (
        fastcache.AdaCacheConfig(preset="slow", num_steps=30, metric_block=2),
        fastcache.AdaCacheConfig(codebook=[(0.1, 4), (1.0, 1)]),
    ):
        assert fastcache.CacheConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"moreg": 1}, "moreg must be True or False"),
        ({"moreg_steps": (4, 26)}, "moreg_steps=.* has no effect with moreg=False"),
        ({"moreg_norm": 0.5}, "moreg_norm=.* has no effect with moreg=False"),
        ({"moreg": True, "moreg_steps": (0, 5)}, r"moreg_steps\[0\] must be an integer >= 1"),
        ({"moreg": True, "moreg_steps": (5, 2)}, r"moreg_steps\[1\] must be an integer >= 5"),
        ({"moreg": True, "moreg_steps": 5}, "moreg_steps must be"),
        ({"moreg": True, "moreg_strides": ()}, "moreg_strides must be a non-empty"),
        ({"moreg": True, "moreg_strides": (0,)}, r"moreg_strides\[i\] must be an integer >= 1"),
        ({"moreg": True, "moreg_norm": 0.0}, "moreg_norm must be a finite number > 0"),
        ({"moreg": True, "moreg_exponent": math.inf}, "moreg_exponent must be a finite number > 0"),
        ({"moreg": True, "mograd_mul": -1.0}, "mograd_mul must be a finite number >= 0"),
        ({"preset": "medium"}, "preset must be one of"),
        ({"preset": "fast", "codebook": {1.0: 1}}, "either preset"),
        ({"codebook": {0.2: 2, 0.1: 0}}, "intervals integers >= 1"),
        ({"codebook": [(0.2, 2), (0.2, 1)]}, "strictly increasing"),
        ({"codebook": {-0.1: 2}}, "thresholds finite and > 0"),
        ({"codebook": {}}, "codebook must map"),
        ({"codebook": "fast"}, "codebook must map"),
        ({"num_steps": 0}, "num_steps must be an integer >= 1"),
        ({"metric_block": -1}, "metric_block must be an integer >= 0"),
    ],
)
def test_refuses_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastcache.AdaCacheConfig(**kwargs)


def test_refuses_a_metric_block_outside_the_stack():
    case = CASES["fastcache-dit"]()
    with pytest.raises(ValueError, match=r"metric_block=99 is outside .* stack of \d+ blocks"):
        fastcache.patch(case.model, fastcache.AdaCacheConfig(metric_block=99))
    assert fastcache.runtime._find(case.model) is None


def test_unknown_num_steps_is_said_in_stats():
    case = CASES["fastcache-dit"]()
    with fastcache.patched(case.model, fastcache.AdaCacheConfig()):
        case.sample(steps=6)
        with pytest.warns(RuntimeWarning, match="num_steps is unknown"):
            st = fastcache.stats(case.model)["contexts"]["default"]
    assert any("num_steps is unknown" in w for w in st["warnings"])


def test_a_distance_above_every_threshold_computes_the_next_step():
    """A change the codebook does not cover is never skipped over (interval 1), whatever
    the last bucket's interval."""
    case = CASES["fastcache-dit"]()
    with fastcache.patched(case.model, fastcache.AdaCacheConfig(codebook={1e-6: 4}, num_steps=10)):
        case.sample(steps=10)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert st["timeline"] == [True] * 10
    assert all(d > 1e-6 for d in st["distance"][1:]), st["distance"]


# --------------------------------------------------------------------------- MoReg
FRAMES = 3
PER_FRAME = 16  # the tiny Wan: 8x8 latents, (1, 2, 2) patches
#: the tiny random Wan's residual motion scores are ~0.2-0.3 (the published 0.385 is scaled for
#: Open-Sora's residuals); with this norm strong motion scores above 1
TINY_NORM = 0.15


def wan_frames(pattern: str = "noise"):
    """The tiny Wan on FRAMES-frame latents: "noise" independent frames, "flip" one frame
    with alternating sign (strong motion), "still" one frame repeated (none)."""

    def latents(g):
        if pattern == "noise":
            return torch.randn(2, 4, FRAMES, 8, 8, generator=g)
        x = torch.randn(2, 4, 1, 8, 8, generator=g)
        if pattern == "still":
            return x.expand(2, 4, FRAMES, 8, 8).contiguous()
        return x * torch.tensor([(-1.0) ** f for f in range(FRAMES)]).view(1, 1, FRAMES, 1, 1)

    return dataclasses.replace(CASES["diffusers-wan"](), latents=latents)


@pytest.mark.parametrize("pattern, extra", [("noise", {}), ("flip", {"moreg_norm": TINY_NORM})])
def test_moreg_matches_host_reference(pattern, extra):
    """Decisions, distances (times the MoReg factor), factors and outputs equal the host
    reference of the official code's MoReg: with the published constants ("noise": the
    factors change the distances) and with motion that changes the schedule ("flip")."""
    case = wan_frames(pattern)
    cfg = fastcache.AdaCacheConfig(preset="fast", num_steps=STEPS, moreg=True, **extra)
    ref = ReferenceAdaCache(case.name, case.model, dict(cfg.codebook_for(STEPS)), STEPS, moreg=(cfg, PER_FRAME))
    try:
        expected = case.sample(steps=STEPS)
    finally:
        ref.remove()
    with fastcache.patched(case.model, cfg):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert st["frame_layout"] == [FRAMES, PER_FRAME]
    assert st["moreg_steps"] == [3, 17]  # (4, 26) of 30, scaled to 20 steps
    assert st["timeline"] == ref.trace
    assert 0 < st["skipped"] < STEPS
    got = [f for f in st["moreg"] if f is not None]
    assert len(got) == len(ref.factors) and any(abs(f - 1) > 0.1 for f in ref.factors), ref.factors
    for g, w in zip(got, ref.factors):
        assert math.isclose(g, w, rel_tol=1e-4), (got, ref.factors)
    for g, w in zip(st["distance"], ref.distances):
        assert (g is None) == (w is None)
        if w is not None:
            assert math.isclose(g, w, rel_tol=1e-4), (st["distance"], ref.distances)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_motion_makes_moreg_compute_more_often():
    """Strong motion between frames scores above 1 and shortens the skips; still frames
    never compute more than without MoReg."""
    computed = {}
    for pattern in ("flip", "still"):
        case = wan_frames(pattern)
        for moreg in (False, True):
            extra = {"moreg_norm": TINY_NORM} if moreg else {}
            with fastcache.patched(case.model, fastcache.AdaCacheConfig(num_steps=STEPS, moreg=moreg, **extra)):
                case.sample(steps=STEPS)
                computed[pattern, moreg] = fastcache.stats(case.model)["contexts"]["default"]["computed"]
    assert computed["flip", True] >= computed["flip", False] + 5, computed
    assert computed["still", True] <= computed["still", False], computed


def test_moreg_never_skip_codebook_is_bitwise_unpatched():
    case = wan_frames()
    ref = case.sample(steps=STEPS)
    cfg = fastcache.AdaCacheConfig(codebook={0.5: 1, 1.0: 1}, num_steps=STEPS, moreg=True)
    with fastcache.patched(case.model, cfg):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert torch.equal(out, ref)
    assert st["timeline"] == [True] * STEPS
    assert all(f is not None for f in st["moreg"][1:]), st["moreg"]  # measured, and still computed


def test_moreg_eager_reads_one_flag_per_step():
    case, steps = wan_frames(), 12
    mode = HostReadMode()
    cfg = fastcache.AdaCacheConfig(num_steps=steps, moreg=True)
    with python_level_reads() as py_reads:
        with fastcache.patched(case.model, cfg):
            case.sample(steps=1)  # allocate the buffers outside the measured run
            fastcache.reset(case.model)
            before = len(py_reads)
            with mode:
                case.sample(steps=steps)
            reads = py_reads[before:]
            st = fastcache.stats(case.model)["contexts"]["default"]
    assert 0 < st["skipped"] < steps
    assert sum(f is not None for f in st["moreg"]) >= 3  # the motion score was measured
    ours = [r for r in mode.reads + reads if r is not None]
    assert len(ours) == steps, ours
    assert all(r.startswith("policies/adacache.py:run_stack:if flag.item()") for r in ours), ours


@pytest.mark.compile
def test_moreg_fullgraph_compile_no_breaks_one_cond_one_read_per_step():
    """torch.compile(fullgraph=True, backend="aot_eager") with MoReg: 0 graph breaks, per step
    one cond whose kernel reads its flag once and nothing else reads; eager's decisions,
    factors and outputs. On the reference DiT under a user ModelSpec whose frame_layout reads
    its token rows as frames (fastcache.ModelSpec.frame_layout: the extension path; the
    tiny DiT compiles in half the time of the tiny Wan, whose MoReg runs eager above)."""
    from fastcache.families import reference_dit

    case, steps = CASES["fastcache-dit"](), 12
    m = case.model
    p = m.x_embedder.proj.stride[0]
    spec = dataclasses.replace(
        reference_dit.SPEC,
        name="test-dit-rows-as-frames",
        frame_layout=lambda model, call: (call["x"].shape[2] // p, call["x"].shape[3] // p),
    )
    with fastcache.patched(m, fastcache.AdaCacheConfig(num_steps=steps, moreg=True), spec=spec):
        eager = case.sample(steps=steps)
        eager_st = fastcache.stats(m)["contexts"]["default"]
        assert 0 < eager_st["skipped"] < steps and sum(f is not None for f in eager_st["moreg"]) >= 3
        fastcache.reset(m)
        out, reads, conds, counts = compiled_loop(case, steps)
        st = fastcache.stats(m)["contexts"]["default"]
    assert_one_cond_read_per_step(reads, conds, counts)
    assert st["frame_layout"] == [4, 4]
    assert st["timeline"] == eager_st["timeline"]
    assert st["interval"] == eager_st["interval"]
    for a, b in zip(st["moreg"], eager_st["moreg"]):
        assert (a is None) == (b is None) and (a is None or math.isclose(a, b, rel_tol=1e-4))
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)


def test_moreg_refused_on_an_image_family():
    case = CASES["diffusers-pixart"]()
    with pytest.raises(
        ValueError, match=r"PixArtTransformer2DModel.*needs frame-major video tokens.*AdaCacheConfig\(moreg=False\)"
    ):
        fastcache.patch(case.model, fastcache.AdaCacheConfig(moreg=True))
    assert fastcache.runtime._find(case.model) is None


@pytest.mark.parametrize(
    "frames, extra, match",
    [(1, {}, r"has 1 frame\(s\).*at least 2"), (2, {"moreg_strides": (2,)}, r"has 2 frame\(s\).*at least 3")],
)
def test_moreg_refuses_too_few_frames_at_the_first_call(frames, extra, match):
    case = CASES["diffusers-wan"]()
    case = dataclasses.replace(case, latents=lambda g: torch.randn(2, 4, frames, 8, 8, generator=g))
    with fastcache.patched(case.model, fastcache.AdaCacheConfig(num_steps=4, moreg=True, **extra)):
        with pytest.raises(ValueError, match=match):
            case.sample(steps=4)


#: (frames, tokens per frame) of the tiny video cases (tests/support/reach_video.py)
VIDEO_LAYOUTS = {
    "diffusers-hunyuanvideo": (2, 16),
    "diffusers-hunyuanvideo15": (2, 64),
    "diffusers-cogvideox": (2, 16),
    "diffusers-ltx": (2, 16),
    "diffusers-mochi": (2, 16),
    "diffusers-chronoedit": (2, 16),
    "diffusers-skyreelsv2": (2, 16),
}


@pytest.mark.parametrize("family", sorted(VIDEO_LAYOUTS))
def test_video_families_report_their_frame_layout(family):
    """Each video family's ModelSpec.frame_layout matches its stream's token count (the
    policy refuses a mismatch) and MoReg runs on it."""
    case = CASES[family]()
    with fastcache.patched(case.model, fastcache.AdaCacheConfig(num_steps=4, moreg=True)):
        case.sample(steps=4)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert st["frame_layout"] == list(VIDEO_LAYOUTS[family])
    assert st["moreg"][1] is not None  # measured at step 1


def test_moreg_defaults_are_published():
    cfg = fastcache.AdaCacheConfig(moreg=True)
    assert (cfg.moreg_norm, cfg.moreg_exponent, cfg.moreg_divisor, cfg.mograd_mul) == (0.385, 8.0, 1.0, 10.0)
    assert cfg.moreg_strides == (1,)
    assert cfg.moreg_window(30) == (4, 26) and cfg.moreg_window(None) == (4, 26)
    assert fastcache.AdaCacheConfig(preset="100", moreg=True).moreg_window(100) == (10, 90)
    assert cfg.moreg_window(20) == (3, 17) and cfg.moreg_window(100) == (13, 87)
    assert fastcache.AdaCacheConfig(codebook={0.1: 2}, moreg=True).moreg_window(50) == (5, 45)
    assert scale_window((10, 90), 100, 4) == (1, 4)
    given = fastcache.AdaCacheConfig(moreg=True, moreg_steps=[2, 8], num_steps=50)
    assert given.moreg_steps == (2, 8) and given.moreg_window(10) == (2, 8)
    for c in (given, fastcache.AdaCacheConfig(moreg=True, moreg_strides=[1, 2], moreg_norm=0.2)):
        assert fastcache.CacheConfig.from_dict(c.to_dict()) == c
