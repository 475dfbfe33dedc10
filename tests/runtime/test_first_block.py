"""First-Block Cache / DBCache (docs/methods.md, section 7).

* the decision op's no-accumulation mode: reference, C++ and Triton bitwise equal, and
  equal to the host rule "compute iff d >= threshold or forced"; opcheck;
* parity with diffusers 0.42's own First-Block Cache hook (fn=1, bn=0) on the models its
  block registry supports (Flux, DiT, PixArt; its hook fails on SD3, whose last block
  returns no text stream);
* decision trace and output vs a host-side reference written from section 7, FB1-FB4,
  including DBCache settings (fn > 1 spanning Flux's two segments, bn > 0);
* threshold 0 is bitwise the unpatched model; torch.compile(fullgraph=True): 0 breaks;
* config validation, stats, invalidate.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch._dynamo
from support.zoo import CASES
from torch._dynamo.testing import CompileCounterWithBackend

import fastcache
from fastcache import ops
from fastcache.ops import reference as R

STEPS = 16
BLOCK_LISTS = {
    "diffusers-flux": ("transformer_blocks", "single_transformer_blocks"),
    "fastcache-dit": ("blocks",),
}
STREAM = {"fastcache-dit": "x"}
POSITIONAL = {"diffusers-dit": ["hidden_states"], "diffusers-pixart": ["hidden_states"], "fastcache-dit": ["x", "c"]}


# ------------------------------------------------------------------ host reference
class ReferenceFBC:
    """First-Block Cache / DBCache on the host, from docs/methods.md section 7, with module
    hooks on the unpatched model (every block still runs; outputs are replaced):

    after block fn-1: ``q = h - x`` on the main stream; ``d = mean|q - q_last| / mean|q_last|``;
    compute iff a step is forced (warm-up, no q_last yet, last step) or ``d >= threshold``;
    ``q_last <- q`` on computed steps only. After block L-bn-1: skipped step -> every
    stream ``h + R``; computed step -> ``R <- out - h``."""

    def __init__(self, name, model, threshold, fn=1, bn=0, warmup=1, num_steps=0):
        self.threshold, self.warmup, self.num_steps = threshold, warmup, num_steps
        blocks = [b for n in BLOCK_LISTS.get(name, ("transformer_blocks",)) for b in getattr(model, n)]
        self.stream = STREAM.get(name, "hidden_states")
        self.positional = POSITIONAL.get(name, [])
        self.step = 0
        self.q_last = None
        self.res = None
        self.h = None
        self.skip = False
        self.trace: list[bool] = []
        self.handles = [
            blocks[0].register_forward_pre_hook(self._pre, with_kwargs=True),
            blocks[fn - 1].register_forward_hook(self._after_first),
            blocks[len(blocks) - bn - 1].register_forward_hook(self._after_middle),
        ]

    def remove(self):
        for h in self.handles:
            h.remove()

    def _pre(self, module, args, kwargs):
        kw = dict(zip(self.positional, args))
        kw.update(kwargs)
        self.x = kw[self.stream]

    @staticmethod
    def _main(out):
        return out[1] if isinstance(out, tuple) else out  # (text, image) blocks return the image second

    def _after_first(self, module, args, out):
        self.h = out
        q = self._main(out) - self.x
        forced = (
            self.step < self.warmup
            or self.q_last is None
            or (self.num_steps and self.step == self.num_steps - 1)
            or self.threshold == 0
        )
        compute = forced or ((q - self.q_last).abs().mean() / self.q_last.abs().mean()).item() >= self.threshold
        if compute:
            self.q_last = q
        self.skip = not compute
        self.trace.append(compute)
        self.step += 1

    def _after_middle(self, module, args, out):
        h = self.h if isinstance(self.h, tuple) else (self.h,)
        o = out if isinstance(out, tuple) else (out,)
        if self.skip:
            o = tuple(a + r for a, r in zip(h, self.res))
        else:
            self.res = tuple(b - a for a, b in zip(h, o))
        return o if isinstance(out, tuple) else o[0]


# ------------------------------------------------------------------ the decision op
def _decision_backends():
    out = {"reference": R.cache_decision}
    try:
        import fastcache._C as C

        out["cpp"] = C.cache_decision
    except ImportError:
        pass
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        from fastcache.kernels import decision

        out["triton"] = decision.cache_decision
    return out


def test_no_accumulation_decision_all_backends_bitwise_and_host_rule():
    g = torch.Generator().manual_seed(0)
    seq = [torch.rand(2, 2, generator=g) * torch.tensor([0.6, 1.0]) for _ in range(12)]  # ratios ~0.6
    seq[5] = torch.tensor([[0.1, 0.0], [0.2, 0.0]])  # den = 0: forced compute
    thr, n = 0.7, len(seq)
    results = {}
    for name, fn in _decision_backends().items():
        st = ops.new_state(16)
        flags = []
        for i, s in enumerate(seq):
            flags.append(bool(fn(s, torch.tensor([1000.0 - i]), torch.zeros(0), st, thr, 2, 0, n, None, False)))
        results[name] = (flags, st.clone())
    assert len(results) >= 2, "compare at least two backends"
    ref_flags, ref_state = results["reference"]
    for name, (flags, st) in results.items():
        assert flags == ref_flags, name
        assert torch.equal(st.nan_to_num(-7.0), ref_state.nan_to_num(-7.0)), name
    # host rule: no accumulation, compute iff ratio >= thr or forced (warmup 2, last step, invalid ratio)
    expected = []
    for i, s in enumerate(seq):
        den = float(s[:, 1].sum())
        ratio = float(s[:, 0].sum()) / den if den > 0 else float("nan")
        expected.append(i < 2 or i == n - 1 or not ratio == ratio or ratio >= thr)
    assert ref_flags == expected
    assert not all(expected) and any(expected[2:-1])
    # the accumulating mode differs on this sequence (so the flag is really honoured)
    st = ops.new_state(16)
    acc_flags = [
        bool(R.cache_decision(s, torch.tensor([1000.0 - i]), torch.zeros(0), st, thr, 2, 0, n))
        for i, s in enumerate(seq)
    ]
    assert acc_flags != ref_flags


@pytest.mark.parametrize("hold", [None, True, False])
def test_no_accumulation_opcheck(hold):
    st = ops.new_state(8)
    st[R.PREV_T], st[R.STEP], st[R.N_RUNS], st[R.ACC] = 500.0, 3.0, 1.0, 5.0
    h = None if hold is None else torch.tensor(hold)
    args = (torch.rand(2, 2), torch.tensor([400.0]), torch.zeros(0), st, 0.2, 1, 0, 5, h, False)
    torch.library.opcheck(torch.ops.fastcache.cache_decision.default, args)


# ------------------------------------------------------------------ runtime
def test_config_validation():
    for kw in ({"fn": 0}, {"bn": -1}, {"threshold": -0.1}, {"warmup_steps": 4, "num_steps": 4}, {"history": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            fastcache.FirstBlockCacheConfig(**kw)
    cfg = fastcache.FirstBlockCacheConfig(threshold=0.08, fn=2, bn=1)
    assert fastcache.CacheConfig.from_dict(cfg.to_dict()) == cfg
    case = CASES["diffusers-flux"]()  # 4 blocks
    with pytest.raises(ValueError, match="fn \\+ bn"):
        fastcache.patch(case.model, fastcache.FirstBlockCacheConfig(fn=3, bn=1))


def _diffusers_fbc(case, threshold):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    dm = copy.deepcopy(case.model)
    apply_first_block_cache(dm, FirstBlockCacheConfig(threshold=threshold))

    @contextlib.contextmanager
    def ctx(i):
        _set_cache_context(dm, CacheContext("cond"))
        try:
            yield
        finally:
            _set_cache_context(dm, None)

    return case.sample(model=dm, steps=STEPS, context=ctx)


@pytest.mark.parametrize(
    "name, threshold", [("diffusers-flux", 0.5), ("diffusers-dit", 0.2), ("diffusers-pixart", 0.2)]
)
def test_matches_diffusers_first_block_cache(name, threshold):
    case = CASES[name]()
    expected = _diffusers_fbc(case, threshold)
    ref = ReferenceFBC(name, case.model, threshold)
    try:
        host = case.sample(steps=STEPS)
    finally:
        ref.remove()
    with fastcache.patched(case.model, fastcache.FirstBlockCacheConfig(threshold=threshold)):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert st["skipped"] >= 4, f"the test threshold should make {name} skip; skipped {st['skipped']}"
    assert st["timeline"] == ref.trace
    assert st["computed"] + st["skipped"] == STEPS and st["skipped"] == STEPS - sum(ref.trace)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, host, rtol=1e-5, atol=1e-5)
    assert st["cache_bytes"] > 0


@pytest.mark.parametrize(
    "name, threshold, fn, bn",
    [
        ("diffusers-flux", 0.3, 3, 0),  # the first blocks span the dual- and single-stream segments
        ("diffusers-flux", 0.3, 1, 1),
        ("diffusers-sd3", 0.3, 1, 1),  # the trailing block drops the text stream
        ("fastcache-dit", 0.3, 1, 1),
    ],
)
def test_dbcache_matches_host_reference(name, threshold, fn, bn):
    case = CASES[name]()
    ref = ReferenceFBC(name, case.model, threshold, fn=fn, bn=bn, num_steps=STEPS)
    try:
        expected = case.sample(steps=STEPS)
    finally:
        ref.remove()
    cfg = fastcache.FirstBlockCacheConfig(threshold=threshold, fn=fn, bn=bn, num_steps=STEPS)
    with fastcache.patched(case.model, cfg):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert st["timeline"] == ref.trace
    assert st["skipped"] >= 3, f"the test threshold should make {name} skip; skipped {st['skipped']}"
    assert ref.trace[0] and ref.trace[-1]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_invalidate_forces_the_next_step():
    case = CASES["diffusers-dit"]()
    m = case.model
    with fastcache.patched(m, fastcache.FirstBlockCacheConfig(threshold=10.0)) as handle:
        invalidated = []

        def per_step(i, out):
            if i == 5:
                p = fastcache.get_patch(m)
                p.policy.invalidate(p.contexts[p.current_context])
                invalidated.append(i)

        case.sample(steps=10, per_step=per_step)
        tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
    assert handle is not None and invalidated == [5]
    # threshold 10: only forced steps compute: step 0 (no q_last) and step 6 (after invalidate)
    assert tl == [True] + [False] * 5 + [True] + [False] * 3


@pytest.mark.compile
def test_fullgraph_compile_zero_breaks_matches_eager():
    case = CASES["diffusers-flux"]()
    m = case.model
    steps = 8
    with fastcache.patched(m, fastcache.FirstBlockCacheConfig(threshold=0.3, bn=1, num_steps=steps)):
        eager = case.sample(steps=steps)
        eager_tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
        assert not all(eager_tl), "the threshold should skip some steps"
        fastcache.reset(m)
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("inductor")
        first = []
        compiled = torch.compile(m, fullgraph=True, backend=cnt)  # fullgraph: a graph break raises
        out = case.sample(model=compiled, steps=steps, per_step=lambda i, o: first.append(cnt.graphs[:]))
        tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
    # the first call's capture (what torch._dynamo.explain traces from the reset state)
    assert len(first[0]) == 1
    cond_nodes = [n for g in first[0] for n in g.graph.nodes if n.op == "call_function" and "cond" in str(n.target)]
    assert len(cond_nodes) == 1, "the skip must be one torch.cond"
    assert tl == eager_tl
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name, bn", [("diffusers-flux", 0), ("fastcache-dit", 1)])
def test_one_flag_read_per_step_and_none_in_the_math(name, bn):
    from support.hostreads import HostReadMode, python_level_reads

    case = CASES[name]()
    steps = 12
    mode = HostReadMode()
    with python_level_reads() as py_reads:
        with fastcache.patched(case.model, fastcache.FirstBlockCacheConfig(threshold=0.3, bn=bn, num_steps=steps)):
            case.sample(steps=1)  # allocate the cache buffers outside the measured run
            fastcache.reset(case.model)
            before = len(py_reads)
            with mode:
                case.sample(steps=steps)
            reads = py_reads[before:]
            st = fastcache.stats(case.model)["contexts"]["default"]
    assert 0 < st["skipped"] < steps  # both branches ran
    ours = [r for r in mode.reads + reads if r is not None]
    assert len(ours) == steps, [r for r in ours if "flag.item" not in r]
    assert all(r.startswith("policies/first_block.py:run_stack:") and "flag.item()" in r for r in ours), ours


def test_repeated_timestep_computes_and_leaves_the_cache_untouched():
    """A second call at the same timestep (Heun-style, or CFG without contexts) computes in
    full and must not move q_last, the residuals or the decision state: a loop that repeats
    every call but steps the sampler with the first call's output gives the same latents
    and the same decisions as the plain loop."""
    case = CASES["diffusers-flux"]()
    m = case.model
    cfg = fastcache.FirstBlockCacheConfig(threshold=0.3, bn=1)
    with fastcache.patched(m, cfg):
        plain = case.sample(steps=10)
        st_plain = fastcache.stats(m)["contexts"]["default"]
        fastcache.reset(m)
        sch = case.scheduler()
        sch.set_timesteps(10)
        x = case.latents(torch.Generator().manual_seed(1))
        with torch.no_grad():
            for t in sch.timesteps:
                kw = case.inputs(x, t)
                out = case.output(m(**kw))
                case.output(m(**kw))  # the repeat
                x = sch.step(out, t, x).prev_sample
        with pytest.warns(RuntimeWarning, match="repeated the previous call's timestep"):
            st = fastcache.stats(m)["contexts"]["default"]
    assert 0 < st_plain["skipped"]
    assert st["timeline"] == st_plain["timeline"]
    assert st["repeated_timestep_calls"] == 10 and st["warnings"]
    assert torch.equal(x, plain)


@pytest.mark.parametrize("fn, bn", [(1, 0), (1, 1)])
def test_computed_fraction_counts_the_blocks_that_always_run(fn, bn):
    case = CASES["fastcache-dit"]()
    L = len(case.model.blocks)
    with fastcache.patched(case.model, fastcache.FirstBlockCacheConfig(threshold=0.3, fn=fn, bn=bn)):
        case.sample(steps=12)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert st["skipped"] > 0
    steps = st["computed"] + st["skipped"]
    # the first fn and last bn blocks run on every step; the middle only on computed steps
    expected = (fn + bn + (L - fn - bn) * st["computed"] / steps) / L
    assert st["computed_fraction"] == pytest.approx(expected)
    assert st["computed_fraction"] > st["computed"] / steps
