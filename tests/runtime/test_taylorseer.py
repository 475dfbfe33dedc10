"""TaylorSeer on the block interior (docs/methods.md section 8, Eq. TS1-TS2).

* the ops: ``taylor_forecast`` / ``taylor_update`` on every backend (reference, C++,
  Triton interpreter) against a host computation of the formulas; opcheck;
* the schedule: warm-up, interval, last step, explicit ``compute_steps`` (host rule);
* interval 1 computes every step: bitwise the unpatched model, every family;
* ``order=0`` is FORA on the same schedule, bitwise, every family;
* host schedule (step index given) and device schedule give the same timeline and
  bitwise the same output, every family, periodic and explicit schedules;
* parity with a host reference written here from the paper's formulas (reference DiT:
  per block the pre-gate attention / MLP outputs, finite differences on computed steps,
  Taylor forecast on the others, gates recomputed), orders 1 and 2, fp32 tolerance;
* host reads: none with the step index, one flag per step without it;
* torch.compile(fullgraph=True): 0 graph breaks, no recompilation across steps, every family;
* repeated timestep: computed, history untouched; a new run resets the differences;
* ``cache_bytes`` = (order+1) x the branch outputs of one step (+ the small state).
"""

import math
import os

import pytest
import torch
from support import direct_inputs
from support.hostreads import HostReadMode
from support.zoo import CASES, CORE, MODEL_GRAPH_BREAKS, reference_dit_case, two_block_case
from torch._dynamo.testing import CompileCounterWithBackend

import fastcache
from fastcache import ops
from fastcache.models.dit import modulate
from fastcache.ops import reference as R

STEPS = 10


# ------------------------------------------------------------------------------ ops
def _host_forecast(h, dx):
    """Eq. TS2 in fp64 on the host: sum_k h[k] dx^k / k!."""
    return sum(h[k].double() * dx**k / math.factorial(k) for k in range(h.shape[0]))


def _host_update(h, f, dx, valid):
    """Eq. TS1 in fp64: D0 = f, D^{k+1} = (D^k_new - D^k_old)/dx for k < valid, else 0."""
    new = [f.double()]
    for k in range(h.shape[0] - 1):
        new.append((new[k] - h[k].double()) / dx if k < valid else torch.zeros_like(new[k]))
    return torch.stack(new)


def _backends():
    out = {"reference": (R.taylor_forecast, R.taylor_update)}
    if ops.BACKEND.cpu == "cpp":
        import fastcache._C as C

        out["cpp"] = (C.taylor_forecast, C.taylor_update)
    if os.environ.get("TRITON_INTERPRET") == "1":
        from fastcache.kernels import taylor

        out["triton"] = (taylor.taylor_forecast, taylor.taylor_update)
    return out


@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_ops_match_the_formulas_on_every_backend(order, dtype):
    g = torch.Generator().manual_seed(order)
    shape = (2, 7, 33)
    h0 = torch.randn(order + 1, *shape, generator=g).to(dtype)
    f = torch.randn(shape, generator=g).to(dtype)
    backends = _backends()
    assert len(backends) >= 2 or ops.BACKEND.cpu != "cpp", backends
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for name, (forecast, update) in backends.items():
        for dx in (1.0, 2.0, 3.5):
            got = forecast(h0, torch.tensor([dx]))
            assert got.dtype == dtype and got.shape == shape, name
            torch.testing.assert_close(got.double(), _host_forecast(h0, dx), **tol, msg=name)
        for valid in range(order + 2):
            h = h0.clone()
            update(h, f, torch.tensor([2.0]), torch.tensor([float(valid)]), torch.tensor(True))
            exp = _host_update(h0, f, 2.0, valid)
            torch.testing.assert_close(h.double(), exp, **tol, msg=f"{name} valid={valid}")
        h = h0.clone()
        update(h, f, torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor(False))
        assert torch.equal(h, h0), f"{name}: store=False must leave the history untouched"


@pytest.mark.parametrize("order", [0, 2])
@pytest.mark.parametrize("store", [True, False])
def test_ops_opcheck(order, store):
    h = torch.randn(order + 1, 2, 5, 33)
    torch.library.opcheck(torch.ops.fastcache.taylor_forecast.default, (h, torch.tensor([3.0])))
    args = (h.clone(), torch.randn(2, 5, 33), torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor(store))
    torch.library.opcheck(torch.ops.fastcache.taylor_update.default, args)


def test_op_argument_errors():
    h = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="dx must be a one-element fp32"):
        ops.taylor_forecast(h, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="f has shape"):
        ops.taylor_update(h, torch.zeros(4, 9), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor(True))
    with pytest.raises(ValueError, match="store must be a 0-dim bool"):
        ops.taylor_update(h, torch.zeros(4, 8), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor(1.0))
    with pytest.raises(ValueError, match="contiguous"):
        ops.taylor_forecast(torch.zeros(4, 8, 2).transpose(0, 2), torch.tensor([1.0]))


# ------------------------------------------------------------------------- config
def test_config_validation_and_schedule():
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        fastcache.TaylorSeerConfig(interval=0)
    with pytest.raises(ValueError, match="order must be an integer >= 0"):
        fastcache.TaylorSeerConfig(order=-1)
    with pytest.raises(ValueError, match="order must be <= 4"):
        fastcache.TaylorSeerConfig(order=5)
    with pytest.raises(ValueError, match="warmup_steps"):
        fastcache.TaylorSeerConfig(warmup_steps=0)
    with pytest.raises(ValueError, match="start at 0"):
        fastcache.TaylorSeerConfig(compute_steps=(1, 3))
    with pytest.raises(ValueError, match="strictly increasing"):
        fastcache.TaylorSeerConfig(compute_steps=(0, 3, 3))
    with pytest.raises(ValueError, match="replaces interval"):
        fastcache.TaylorSeerConfig(compute_steps=(0, 2), interval=3)
    with pytest.raises(ValueError, match="num_steps=4"):
        fastcache.TaylorSeerConfig(compute_steps=(0, 5), num_steps=4)
    # warm-up 3 (diffusers' default), then every 5th step after the last warm-up step
    cfg = fastcache.TaylorSeerConfig()
    assert [s for s in range(20) if cfg.computes(s)] == [0, 1, 2, 7, 12, 17]
    # num_steps known: the last step is computed too
    cfg = fastcache.TaylorSeerConfig(interval=3, warmup_steps=1, num_steps=8)
    assert [s for s in range(8) if cfg.computes(s)] == [0, 3, 6, 7]
    cfg = fastcache.TaylorSeerConfig(compute_steps=[0, 2, 5, 9])
    assert cfg.compute_steps == (0, 2, 5, 9)
    assert [s for s in range(12) if cfg.computes(s)] == [0, 2, 5, 9]
    assert [s for s in range(12) if cfg.computes(s, num_steps=12)] == [0, 2, 5, 9, 11]
    assert fastcache.CacheConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------- all families
@pytest.fixture(scope="module", params=sorted(CORE))
def case(request):
    return CASES[request.param]()


def _ctx(case):
    return lambda i: fastcache.context(case.model, "default", step_index=i)


def test_order_zero_is_fora_bitwise(case):
    with fastcache.patched(case.model, fastcache.FORAConfig(interval=3, warmup_steps=2)):
        fora = case.sample(steps=STEPS, context=_ctx(case))
        sf = fastcache.stats(case.model)["contexts"]["default"]
    with fastcache.patched(case.model, fastcache.TaylorSeerConfig(interval=3, warmup_steps=2, order=0)):
        ts = case.sample(steps=STEPS, context=_ctx(case))
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert st["timeline"] == sf["timeline"] and st["skipped"] == sf["skipped"] > 0
    assert torch.equal(ts, fora)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(interval=3, warmup_steps=2, order=1, num_steps=STEPS),
        dict(compute_steps=(0, 2, 5), order=2, num_steps=STEPS),
    ],
    ids=["periodic", "explicit"],
)
def test_host_and_device_schedules_agree_bitwise(case, cfg):
    config = fastcache.TaylorSeerConfig(**cfg)
    with fastcache.patched(case.model, config):
        host = case.sample(steps=STEPS, context=_ctx(case))
        sh = fastcache.stats(case.model)["contexts"]["default"]
    with fastcache.patched(case.model, config):
        dev = case.sample(steps=STEPS)
        sd = fastcache.stats(case.model)["contexts"]["default"]
    expected = [config.computes(s) for s in range(STEPS)]
    assert sh["timeline"] == sd["timeline"] == expected
    assert sh["skipped"] == sd["skipped"] == STEPS - sum(expected) > 0
    assert torch.equal(host, dev)
    with fastcache.patched(case.model, fastcache.FORAConfig(interval=3, warmup_steps=2)):
        fora = case.sample(steps=STEPS, context=_ctx(case))
    assert not torch.equal(host, fora)  # the forecast is not a plain reuse


# ------------------------------------------------------------ host reference (paper)
def _ts_feature(D, key, f, s, last, order):
    """One slot at step s: ``f`` computed (TS1: update the differences; an order is
    differenced only once the previous update held the order below it, as in diffusers'
    hook) or None (TS2: the forecast from the last computed step ``last``)."""
    if f is None:
        return _host_forecast(torch.stack(D[key]), s - last).float()
    old = D.get(key) if s > 0 else None
    new = [f]
    for k in range(order):
        if old is None or k >= len(old):
            break
        new.append((new[k] - old[k]) / (s - last))
    D[key] = new
    return f


def _taylor_reference(model, x, ts, y, computes, order):
    """TaylorSeer from the formulas, by hand on the reference DiT: the pre-gate A_l, M_l
    of every block are the features; gates come from this step's conditioning."""
    D = {}  # (l, branch) -> [D^0, D^1, ...] at the last computed step
    last = None
    outs = []
    for s, t in enumerate(ts):
        compute = computes(s)
        h = model.patch_embed(x[s]) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for li, blk in enumerate(model.blocks):
            sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
            a = blk.attn(modulate(blk.norm1(h), sh1, sc1)) if compute else None
            h = h + g1.unsqueeze(1) * _ts_feature(D, (li, "a"), a, s, last, order)
            m = blk.mlp(modulate(blk.norm2(h), sh2, sc2)) if compute else None
            h = h + g2.unsqueeze(1) * _ts_feature(D, (li, "m"), m, s, last, order)
        if compute:
            last = s
        outs.append(model.unpatchify(model.final_layer(h, c)))
    return outs


@pytest.mark.parametrize("order,interval,warmup", [(1, 3, 1), (2, 3, 2), (2, 4, 3)])
def test_matches_paper_reference(order, interval, warmup):
    case = reference_dit_case()
    m = case.model
    g = torch.Generator().manual_seed(5)
    n = 11
    xs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(n)]
    ts = [torch.full((2,), 999.0 - 90 * s) for s in range(n)]
    y = torch.tensor([1, 2])
    cfg = fastcache.TaylorSeerConfig(interval=interval, warmup_steps=warmup, order=order)
    with torch.no_grad():
        ref = _taylor_reference(m, xs, ts, y, cfg.computes, order)
        with fastcache.patched(m, cfg):
            got = [m(x, t, y) for x, t in zip(xs, ts)]
            st = fastcache.stats(m)["contexts"]["default"]
        with fastcache.patched(m, fastcache.TaylorSeerConfig(interval=interval, warmup_steps=warmup, order=0)):
            reuse = [m(x, t, y) for x, t in zip(xs, ts)]
    assert st["timeline"] == [cfg.computes(s) for s in range(n)]
    assert st["skipped"] == n - sum(st["timeline"]) > 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(got, reuse))  # the forecast is not a reuse


# ------------------------------------------------------------- host reads, compile
def test_host_schedule_reads_nothing_device_schedule_one_flag():
    case = reference_dit_case()
    m = case.model
    for host_index, expected in ((True, 0), (False, 8)):
        with fastcache.patched(m, fastcache.TaylorSeerConfig(interval=2, warmup_steps=1, order=2, num_steps=8)):
            mode = HostReadMode()
            ctx = (lambda i: fastcache.context(m, "default", step_index=i)) if host_index else None
            with mode:
                case.sample(steps=8, context=ctx)
            st = fastcache.stats(m)["contexts"]["default"]
        ours = [r for r in mode.reads if r is not None]
        assert st["skipped"] == 3  # 0, 2, 4, 6 and the last step 7 computed
        assert len(ours) == expected, ours
        assert all("policies/taylorseer.py:run_stack" in r and ".item()" in r for r in ours), ours


@pytest.mark.compile
@pytest.mark.parametrize(
    "name,explicit",
    # the explicit-schedule mask is the same device code on every family: one model for it
    [(n, False) for n in sorted(CORE)] + [("fastcache-dit", True)],
    ids=[*sorted(CORE), "fastcache-dit-explicit"],
)
def test_fullgraph_compile_no_breaks_no_recompiles(name, explicit):
    if name in MODEL_GRAPH_BREAKS:
        pytest.skip(f"{name}: the unpatched model breaks the graph ({MODEL_GRAPH_BREAKS[name]})")
    case = two_block_case(name)  # every kind of block of the family, two per block list
    m = case.model
    cfg = (
        fastcache.TaylorSeerConfig(compute_steps=(0, 1, 3, 6), order=2)
        if explicit
        else fastcache.TaylorSeerConfig(interval=3, warmup_steps=2, order=2)
    )
    with fastcache.patched(m, cfg):
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
    # the first call allocates the history (a second trace, as with FORA); then no recompilation
    assert frames[1] <= 2 and len(set(frames[1:])) == 1, frames
    assert st["timeline"] == tl and not all(tl)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------- hardening, memory
def test_repeated_timestep_computes_and_leaves_the_history_untouched():
    case = reference_dit_case()
    m = case.model
    y = torch.tensor([1, 2])
    xs, ts = direct_inputs(8)
    cfg = fastcache.TaylorSeerConfig(interval=3, warmup_steps=1, order=2)
    with torch.no_grad():
        full = {i: m(xs[i] * 0.5, ts[i], y) for i in (2, 3)}  # unpatched
        with fastcache.patched(m, cfg):
            plain = [m(x, t, y) for x, t in zip(xs, ts)]
            s_plain = fastcache.stats(m)["contexts"]["default"]
        with fastcache.patched(m, cfg):
            got = []
            for i, (x, t) in enumerate(zip(xs, ts)):
                got.append(m(x, t, y))
                if i in full:  # a forecast step (2) and a computed step (3), evaluated again
                    assert torch.equal(m(x * 0.5, t, y), full[i])  # computed in full
            s_rep = fastcache.stats(m)["contexts"]["default"]
    assert s_plain["timeline"][2:4] == [False, True]
    assert s_plain["skipped"] > 0 and s_rep["repeated_timestep_calls"] == 2
    assert s_rep["timeline"] == s_plain["timeline"]
    for a, b in zip(got, plain):
        assert torch.equal(a, b)


def test_second_run_resets_the_differences():
    """A new run (timestep rises) restarts the differences: run 2 equals run 1 exactly,
    on the device schedule (no step index) and on the host schedule."""
    case = reference_dit_case()
    for ctx in (None, _ctx(case)):
        with fastcache.patched(case.model, fastcache.TaylorSeerConfig(interval=3, warmup_steps=1, order=2)):
            a = case.sample(steps=STEPS, context=ctx)
            b = case.sample(steps=STEPS, context=ctx, seed=1)
            st = fastcache.stats(case.model)["contexts"]["default"]
        assert torch.equal(a, b)
        assert st["skipped"] == 2 * (STEPS - 4)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_cache_bytes_scale_with_order(order):
    case = reference_dit_case()
    m = case.model
    with fastcache.patched(m, fastcache.TaylorSeerConfig(interval=3, order=order)):
        case.sample(steps=4)
        st = fastcache.stats(m)["contexts"]["default"]
        pol = fastcache.get_patch(m).policy
    # reference DiT: depth 3, 2 branches each, one (B, N, D) = (2, 16, 32) fp32 feature per slot
    feature = 2 * 16 * 32 * 4
    assert pol.K == 6
    hist = (order + 1) * pol.K * feature
    assert hist <= st["cache_bytes"] < hist + 20_000, st["cache_bytes"]
    assert st["order"] == order


# ----------------------------------------------------------------- diffusers' hook
_DIFFUSERS_IDS = {
    "diffusers-dit": [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"],
    "diffusers-pixart": [
        r"transformer_blocks\.\d+\.attn1",
        r"transformer_blocks\.\d+\.attn2",
        r"transformer_blocks\.\d+\.ff",
    ],
}


@pytest.mark.parametrize("name", sorted(_DIFFUSERS_IDS))
@pytest.mark.parametrize("order,interval,before", [(1, 3, 3), (2, 4, 2)])
def test_matches_diffusers_taylorseer_hook(name, order, interval, before):
    """diffusers 0.42's TaylorSeer hook on the modules whose outputs are our slots
    (attention, cross-attention, feed-forward: the pre-gate branch outputs of
    BasicTransformerBlock), factors in fp32, on diffusers' schedule given as
    ``compute_steps``. Its defaults hook attention modules only (``^transformer_blocks.*attn``),
    so the identifiers are explicit here."""
    import contextlib
    import copy

    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    steps = 12
    case = CASES[name]()
    dm = copy.deepcopy(case.model)
    apply_taylorseer_cache(
        dm,
        TaylorSeerCacheConfig(
            cache_interval=interval,
            disable_cache_before_step=before,
            max_order=order,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=_DIFFUSERS_IDS[name],
        ),
    )

    @contextlib.contextmanager
    def ctx(i):
        _set_cache_context(dm, CacheContext("cond"))
        try:
            yield
        finally:
            _set_cache_context(dm, None)

    expected = case.sample(model=dm, steps=steps, context=ctx)
    # diffusers: compute s < before or (s - before - 1) % interval == 0
    cs = tuple(s for s in range(steps) if s < before or (s - before - 1) % interval == 0)
    with fastcache.patched(case.model, fastcache.TaylorSeerConfig(compute_steps=cs, order=order)):
        out = case.sample(steps=steps)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert st["skipped"] == steps - len(cs) > 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, case.sample(steps=steps), rtol=1e-3, atol=1e-3)  # the hook forecast something


def test_cond_path_equals_python_branch_path():
    """The capture / compile path (one torch.cond, forecast before it, update after it
    gated by the device store flag) run eagerly under force_cond equals the eager path."""
    from fastcache.policies.base import force_cond

    case = reference_dit_case()
    cfg = fastcache.TaylorSeerConfig(interval=3, warmup_steps=2, order=2, num_steps=STEPS)
    with fastcache.patched(case.model, cfg):
        eager = case.sample(steps=STEPS)
        tl = fastcache.stats(case.model)["contexts"]["default"]["timeline"]
        with force_cond():
            via_cond = case.sample(steps=STEPS)
            via_cond_2 = case.sample(steps=STEPS)  # a second run: the differences restart
        tl_cond = fastcache.stats(case.model)["contexts"]["default"]["timeline"]
    assert not all(tl) and tl_cond == tl
    torch.testing.assert_close(via_cond, eager, rtol=1e-6, atol=1e-6)
    assert torch.equal(via_cond, via_cond_2)


def test_cfg_branches_keep_their_own_history():
    """Sequential CFG with one context per branch: each branch's differences are its own
    (the same as running that branch alone)."""
    case = reference_dit_case()
    m = case.model
    y_c, y_u = torch.tensor([1, 2]), torch.tensor([10, 10])
    xs, ts = direct_inputs(8)
    cfg = fastcache.TaylorSeerConfig(interval=3, warmup_steps=1, order=1)
    with torch.no_grad():
        with fastcache.patched(m, cfg):
            both = []
            for x, t in zip(xs, ts):
                with fastcache.context(m, "cond"):
                    c = m(x, t, y_c)
                with fastcache.context(m, "uncond"):
                    u = m(x, t, y_u)
                both.append((c, u))
            st = fastcache.stats(m)["contexts"]
        alone = {}
        for name, y in (("cond", y_c), ("uncond", y_u)):
            with fastcache.patched(m, cfg):
                alone[name] = [m(x, t, y) for x, t in zip(xs, ts)]
    assert st["cond"]["skipped"] == st["uncond"]["skipped"] > 0
    assert st["cond"]["repeated_timestep_calls"] == 0
    for (c, u), a, b in zip(both, alone["cond"], alone["uncond"]):
        assert torch.equal(c, a) and torch.equal(u, b)


def test_set_num_steps_moves_the_forced_last_step_of_an_explicit_schedule():
    case = reference_dit_case()
    cfg = fastcache.TaylorSeerConfig(compute_steps=(0, 2, 5), order=1, num_steps=STEPS)
    with fastcache.patched(case.model, cfg) as handle:
        case.sample(steps=STEPS)
        assert fastcache.stats(case.model)["contexts"]["default"]["timeline"][-1] is True
        handle.set_num_steps(STEPS - 2)
        fastcache.reset(case.model)
        case.sample(steps=STEPS - 2)
        tl = fastcache.stats(case.model)["contexts"]["default"]["timeline"]
        moved = case.sample(steps=STEPS - 2)
    assert tl == [s in (0, 2, 5, STEPS - 3) for s in range(STEPS - 2)]
    short = fastcache.TaylorSeerConfig(compute_steps=(0, 2, 5), order=1, num_steps=STEPS - 2)
    with fastcache.patched(case.model, short):
        fresh = case.sample(steps=STEPS - 2)
    assert torch.equal(moved, fresh)
