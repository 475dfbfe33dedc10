"""MagCache (docs/methods.md section 9; fastcache/policies/magcache.py).

* the host schedule vs a reference written here from M2-M4 (numpy fp32), and the
  calibrated gamma (M1) vs diffusers' own calibration mode;
* decision trace and outputs vs diffusers 0.42's MagCache hook with the same mag_ratios
  (DiT, PixArt, Flux: the models its block registry supports) and vs a host reference
  (stack residual reuse through block hooks) on the single-stream families;
* threshold 0 bitwise unpatched on every family; host reads: none with a host step index,
  one flag per step without; torch.compile(fullgraph=True): 0 breaks, one cond, no
  recompiles; repeated timesteps, invalidate, contexts, set_num_steps, validation.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from support.zoo import CASES, CORE, reference_dit_case
from torch._dynamo.testing import CompileCounterWithBackend

import fastcache

STEPS = 12


def _profile(case, steps=STEPS, seeds=(1, 3)):
    return fastcache.calibrate(case.model, lambda: [case.sample(steps=steps, seed=s) for s in seeds], progress=False)


def reference_schedule(gammas, threshold, K, retention, S):
    """M2-M4 by hand in numpy fp32: rho *= g; k += 1; eps += |1 - rho|; skip iff s > 0,
    eps <= threshold and k <= K; compute resets; the first `retention` steps compute."""
    one = np.float32(1.0)
    rho, eps, k, out = one, np.float32(0.0), 0, []
    for s in range(S):
        if s < retention or threshold == 0:
            out.append(True)
            continue
        rho = np.float32(rho * np.float32(gammas[s]))
        k += 1
        eps = np.float32(eps + np.abs(one - rho))
        skip = s > 0 and eps <= np.float32(threshold) and k <= K
        out.append(not skip)
        if not skip:
            rho, eps, k = one, np.float32(0.0), 0
    return out


# ------------------------------------------------------------------ schedule and config
def test_schedule_matches_host_reference():
    g = np.random.default_rng(0)
    for trial in range(40):
        S = int(g.integers(5, 40))
        gammas = [1.0] + list(1.0 + g.normal(0, 0.05, S - 1))
        gammas = [abs(x) for x in gammas]
        thr = float(g.choice([0.0, 0.02, 0.06, 0.12, 0.3]))
        K = int(g.integers(0, 5))
        r = float(g.choice([0.0, 0.1, 0.2, 0.5]))
        cfg = fastcache.MagCacheConfig(mag_ratios=gammas, threshold=thr, max_skips=K, retention_ratio=r)
        ret = int(r * S + 0.5)
        assert cfg.retention() == ret
        assert list(cfg.schedule()) == reference_schedule(gammas, thr, K, ret, S), trial
    # a curve that really skips, and the reset on compute
    cfg = fastcache.MagCacheConfig(mag_ratios=[1.0] + [0.99] * 9, threshold=0.1, max_skips=2, retention_ratio=0.0)
    assert cfg.schedule() == (True, False, False, True, False, False, True, False, False, True)


def test_config_validation_and_resampling(tmp_path):
    for kw, field in (
        ({"threshold": -1}, "threshold"),
        ({"max_skips": -1}, "max_skips"),
        ({"retention_ratio": 1.5}, "retention_ratio"),
        ({"retention_steps": -2}, "retention_steps"),
        ({"num_steps": 0}, "num_steps"),
        ({"history": 0}, "history"),
    ):
        with pytest.raises(ValueError, match=field):
            fastcache.MagCacheConfig(mag_ratios=[1.0, 1.1, 0.9], **kw)
    with pytest.raises(ValueError, match="exactly one of mag_ratios"):
        fastcache.MagCacheConfig()
    with pytest.raises(ValueError, match="mag_ratios must hold"):
        fastcache.MagCacheConfig(mag_ratios=[1.0, float("nan")])
    with pytest.raises(ValueError, match="must be a fastcache.Profile"):
        fastcache.MagCacheConfig(profile=3)
    # a curve of another length is resampled by nearest index, as diffusers does
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, nearest_interp

    cfg = fastcache.MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_steps=20)
    assert cfg.ratios() == tuple(nearest_interp(FLUX_MAG_RATIOS, 20).tolist())
    assert len(cfg.schedule()) == 20 and cfg.retention() == 4 and cfg.retention(50) == 10
    assert fastcache.MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, retention_steps=3).retention() == 3
    d = cfg.to_dict()
    assert d["kind"] == "magcache" and d["num_steps"] == 20 and d["profile"] is None


def test_calibrated_gamma_matches_diffusers_calibration():
    """M1: gamma_s from fastcache.calibrate equals diffusers' MagCache calibration mode
    (its printed ratios) on the same run."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    case = CASES["diffusers-dit"]()
    prof = _profile(case, seeds=(1,))
    dm = copy.deepcopy(case.model)
    apply_mag_cache(dm, MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        case.sample(model=dm, steps=STEPS)
    printed = ast.literal_eval(buf.getvalue().strip().splitlines()[-1])
    assert len(printed) == STEPS and printed[0] == 1.0
    np.testing.assert_allclose(prof.mag_ratios.numpy(), np.asarray(printed, dtype=np.float32), rtol=1e-5)
    assert prof.mag_ratios[0] == 1.0 and not torch.allclose(prof.mag_ratios, torch.ones(STEPS))


# ------------------------------------------------------------------ parity
def _diffusers_magcache(case, ratios, threshold, K, r):
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    dm = copy.deepcopy(case.model)
    apply_mag_cache(
        dm,
        MagCacheConfig(
            threshold=threshold, max_skip_steps=K, retention_ratio=r, num_inference_steps=STEPS, mag_ratios=ratios
        ),
    )
    blocks = dm.transformer_blocks
    trace = []
    h = blocks[0].norm1.register_forward_hook(lambda *a: trace.append(True))
    steps = []

    def per_step(i, out):
        steps.append(len(trace))

    try:
        out = case.sample(model=dm, steps=STEPS, per_step=per_step)
    finally:
        h.remove()
    computed = [b > a for a, b in zip([0] + steps[:-1], steps)]
    return out, computed


@pytest.mark.parametrize(
    "name, threshold", [("diffusers-dit", 0.1), ("diffusers-pixart", 0.1), ("diffusers-flux", 0.1)]
)
def test_matches_diffusers_magcache(name, threshold):
    case = CASES[name]()
    prof = _profile(case)
    ratios = prof.mag_ratios.tolist()
    K, r = 2, 0.1
    expected, diff_trace = _diffusers_magcache(case, ratios, threshold, K, r)
    cfg = fastcache.MagCacheConfig(mag_ratios=ratios, threshold=threshold, max_skips=K, retention_ratio=r)
    with fastcache.patched(case.model, cfg):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert 3 <= st["skipped"] < STEPS - 1, f"the test threshold should make {name} skip: {st['timeline']}"
    assert st["timeline"] == diff_trace == list(cfg.schedule())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert st["cache_bytes"] > 0


class ReferenceMagCache:
    """Stack-residual reuse by hand, for single-stream models: every block runs; after the
    last block a skipped step's output is replaced by ``x + R``, a computed step stores
    ``R = out - x`` (x: the first block's input)."""

    def __init__(self, blocks, schedule):
        self.schedule, self.step, self.res = schedule, 0, None
        self.handles = [
            blocks[0].register_forward_pre_hook(self._pre, with_kwargs=True),
            blocks[-1].register_forward_hook(self._post),
        ]

    def _pre(self, module, args, kwargs):
        self.x = args[0] if args else kwargs["hidden_states"]

    def _post(self, module, args, out):
        compute = self.schedule[self.step]
        self.step += 1
        if compute:
            self.res = out - self.x
            return out
        return self.x + self.res

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("name", ["fastcache-dit", "diffusers-dit", "diffusers-pixart"])
def test_matches_host_reference(name):
    case = CASES[name]()
    m = case.model
    prof = _profile(case)
    cfg = fastcache.MagCacheConfig(profile=prof, threshold=0.15, max_skips=3, retention_ratio=0.1)
    sched = cfg.schedule()
    assert 3 <= sched.count(False), sched
    blocks = m.blocks if name == "fastcache-dit" else m.transformer_blocks
    ref = ReferenceMagCache(blocks, sched)
    try:
        expected = case.sample(steps=STEPS)
    finally:
        ref.remove()
    with fastcache.patched(m, cfg):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(m)["contexts"]["default"]
    assert st["timeline"] == list(sched)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CORE))
def test_threshold_zero_is_bitwise_unpatched_and_a_threshold_skips(name):
    case = CASES[name]()
    prof = _profile(case, seeds=(2,))
    ref = case.sample(steps=STEPS)
    with fastcache.patched(case.model, fastcache.MagCacheConfig(profile=prof, threshold=0.0)):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert torch.equal(out, ref)
    assert st["computed"] == STEPS and st["skipped"] == 0
    cfg = fastcache.MagCacheConfig(profile=prof, threshold=0.5, max_skips=2, retention_ratio=0.1)
    with fastcache.patched(case.model, cfg):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert st["timeline"] == list(cfg.schedule()) and st["skipped"] > 0
    assert not torch.equal(out, ref)


# ------------------------------------------------------------------ host reads and compile
def test_host_reads_none_with_a_host_index_one_flag_without():
    from support.hostreads import HostReadMode, python_level_reads

    case = reference_dit_case()
    m = case.model
    prof = _profile(case)
    cfg = fastcache.MagCacheConfig(profile=prof, threshold=0.15, retention_ratio=0.1)
    outs, reads, tls = [], [], []
    for host_index in (True, False):
        with fastcache.patched(m, cfg):
            case.sample(steps=1)  # allocate outside the measured run
            fastcache.reset(m)
            mode = HostReadMode()
            ctx = (lambda i: fastcache.context(m, "default", step_index=i)) if host_index else None
            with mode, python_level_reads() as py:
                outs.append(case.sample(steps=STEPS, context=ctx))
            tls.append(fastcache.stats(m)["contexts"]["default"]["timeline"])
        reads.append([r for r in mode.reads + py if r is not None])
    assert torch.equal(outs[0], outs[1]) and tls[0] == tls[1] == list(cfg.schedule())
    assert False in tls[0]
    assert reads[0] == [], reads[0]
    assert len(reads[1]) == STEPS and all("magcache.py:run_stack" in r and "flag.item()" in r for r in reads[1])


@pytest.mark.compile
@pytest.mark.parametrize("name", ["fastcache-dit", "diffusers-flux"])
def test_fullgraph_compile_one_cond_no_recompiles(name):
    case = CASES[name]()
    m = case.model
    prof = _profile(case)
    cfg = fastcache.MagCacheConfig(profile=prof, threshold=0.15, retention_ratio=0.1)
    with fastcache.patched(m, cfg):
        eager = case.sample(steps=STEPS)
        eager_tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
        assert False in eager_tl
        fastcache.reset(m)
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(m, fullgraph=True, backend=cnt)  # fullgraph: a graph break raises
        frames, first = [], []
        count = lambda i, o: (frames.append(cnt.frame_count), first.append(cnt.graphs[:]))  # noqa: E731
        out = case.sample(model=compiled, steps=STEPS, per_step=count)
        st = fastcache.stats(m)["contexts"]["default"]
    # the first call's capture (what torch._dynamo.explain traces from the reset state)
    conds = [n for g in first[0] for n in g.graph.nodes if n.op == "call_function" and "cond" in str(n.target)]
    assert len(conds) == 1, "the skip must be one torch.cond"
    assert frames[1] <= 2 and len(set(frames[1:])) == 1, frames  # no recompilation across steps
    assert st["timeline"] == eager_tl
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ hardening
def test_repeated_timestep_computes_and_leaves_the_cache_untouched():
    case = reference_dit_case()
    m = case.model
    prof = _profile(case)
    cfg = fastcache.MagCacheConfig(profile=prof, threshold=0.15, retention_ratio=0.1)
    with fastcache.patched(m, cfg):
        plain = case.sample(steps=STEPS)
        st_plain = fastcache.stats(m)["contexts"]["default"]
        fastcache.reset(m)
        sch = case.scheduler()
        sch.set_timesteps(STEPS)
        x = case.latents(torch.Generator().manual_seed(1))
        extras = []
        with torch.no_grad():
            for t in sch.timesteps:
                kw = case.inputs(x, t)
                out = case.output(m(**kw))
                kw2 = case.inputs(x * 0.5, t)
                extras.append((case.output(m(**kw2)), kw2))  # the repeat, on another input
                x = sch.step(out, t, x).prev_sample
        with pytest.warns(RuntimeWarning, match="repeated the previous call's timestep"):
            st = fastcache.stats(m)["contexts"]["default"]
    assert 0 < st_plain["skipped"]
    assert st["timeline"] == st_plain["timeline"] and st["repeated_timestep_calls"] == STEPS
    assert torch.equal(x, plain)
    with torch.no_grad():
        full = case.output(m(**extras[3][1]))
    assert torch.equal(extras[3][0], full)  # computed in full


def test_contexts_invalidate_and_set_num_steps():
    case = reference_dit_case()
    m = case.model
    prof = _profile(case)
    cfg = fastcache.MagCacheConfig(profile=prof, threshold=0.5, max_skips=4, retention_ratio=0.0)
    sched = list(cfg.schedule())
    assert sched.count(False) >= 4
    with fastcache.patched(m, cfg) as handle:
        # two contexts (CFG as two calls): each its own state and the same schedule
        case.sample(steps=STEPS, context=lambda i: fastcache.context(m, "cond"))
        case.sample(steps=STEPS, context=lambda i: fastcache.context(m, "uncond"))
        ctx = fastcache.stats(m)["contexts"]
        assert ctx["cond"]["timeline"] == ctx["uncond"]["timeline"] == sched
        fastcache.reset(m)
        j = next(i for i in range(2, STEPS) if not sched[i])  # invalidate before a skipped step

        def per_step(i, out):
            if i == j - 1:
                p = fastcache.get_patch(m)
                p.policy.invalidate(p.contexts[p.current_context])

        case.sample(steps=STEPS, per_step=per_step)
        tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
        assert tl[j] and tl[:j] == sched[:j] and tl[j + 1 :] == sched[j + 1 :]
        # another step count: gamma resampled by nearest index, as diffusers would
        handle.set_num_steps(8)
        fastcache.reset(m)
        case.sample(steps=8)
        st = fastcache.stats(m)["contexts"]["default"]
    assert st["timeline"] == list(cfg.schedule(8)) and st["num_steps"] == 8


def test_profile_check_and_old_profile_refused():
    case = reference_dit_case()
    prof = _profile(case)
    pix = CASES["diffusers-pixart"]()
    with pytest.raises(ValueError, match="profile was made for DiT"):
        fastcache.patch(pix.model, fastcache.MagCacheConfig(profile=prof))
    old = fastcache.Profile(prof.prior, prof.slots, prof.meta, prof.teacache_pairs)  # as a format-1 file loads
    with pytest.raises(ValueError, match="no mag_ratios curve .* calibrate again"):
        fastcache.MagCacheConfig(profile=old)
