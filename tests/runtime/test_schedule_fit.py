"""The fitted filler of a searched schedule (docs/methods.md section 12, "Fitted filler").

* the solve: the closed form ``(W[c, c] + lam I)^-1 (W[c, s] + lam a_T)`` equals numpy's
  least squares on synthetic features (plain and ridge-augmented);
* the run time: ``F`` steps whose coefficients are TaylorSeer's give the Taylor plan bit
  for bit (announced and device schedules); a fitted plan's forecasts equal the host
  formula ``sum_j a_j F(c_j)`` on recorded features, through the real
  ``taylor_update`` / ``history_combine`` ops and the host's change of basis; the
  announced step equals the device step;
* the proxy of a fitted plan equals the measured teacher-forced error; the DP with the
  fitted filler is the proxy optimum (brute force);
* the profile stores fitted schedules (format 4) and loads them back.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from support.zoo import CASES, reference_dit_case

import fastcache
from fastcache import ScheduleConfig, ops
from fastcache.policies.schedule import fit_history_weights
from fastcache.tuning import schedule_proxy as proxy


def _taylor_fit(plan: str, order: int = 2) -> dict:
    """TaylorSeer's coefficients (valid-order rule) of every 'F' step, newest first."""
    out, comp = {}, []
    for s, c in enumerate(plan):
        if c == "C":
            comp.append(s)
        elif c == "F":
            last = ([-1, -1] + comp)[-3:]
            a = proxy._coefficients(*(np.float64(v) for v in last), float(s - last[2]), order)
            n = min(order + 1, len(comp))
            out[s] = tuple(float(v) for v in (a[2], a[1], a[0])[:n])
    return out


# ----------------------------------------------------------------------------- solve
@pytest.mark.parametrize("ridge", (0.0, 0.05, 1.0))
@pytest.mark.parametrize("points", (1, 2, 3))
def test_fit_coefficients_equal_numpy_lstsq(points, ridge):
    rng = np.random.default_rng(points)
    S, D = 9, 40
    F = np.cumsum(rng.standard_normal((S, D)), axis=0) + 3.0  # a drifting feature
    G = F @ F.T
    s, steps = 8, (2, 4, 6)
    W = G / G[s, s]
    a, err = proxy.fit_coefficients(W, s, steps, points, ridge)
    used = list(steps[3 - points :])
    X = F[used].T / math.sqrt(G[s, s])  # columns oldest first, as (a'', a', a)
    y = F[s] / math.sqrt(G[s, s])
    aT_full = proxy._coefficients(
        *(np.float64(v) for v in ([-1] * (3 - points) + used)), float(s - steps[2]), min(points - 1, 2)
    )
    aT = np.array([float(v) for v in aT_full])[3 - points :]
    lam = ridge * np.mean(np.diag(X.T @ X))
    A = np.vstack([X, math.sqrt(lam) * np.eye(points)])
    b = np.concatenate([y, math.sqrt(lam) * aT])
    want = np.linalg.lstsq(A, b, rcond=None)[0]
    got = np.array([float(v) for v in a])
    np.testing.assert_allclose(got[3 - points :], want, rtol=1e-7, atol=1e-9)
    assert np.all(got[: 3 - points] == 0)
    assert math.isclose(float(err), float(np.sum((X @ want - y) ** 2)), rel_tol=1e-7, abs_tol=1e-12)


# ----------------------------------------------------------------------------- run time
@pytest.mark.parametrize("name", ("reference_dit", "dit"))
def test_taylor_coefficients_reproduce_the_taylor_plan(name):
    case = CASES[name]() if name in CASES else reference_dit_case()
    m = case.model
    taylor = "CC22C2C222C2"
    fitted = taylor.replace("2", "F")
    cfg = ScheduleConfig(plan=fitted, fit=_taylor_fit(fitted))
    assert cfg.order == 2
    with fastcache.patched(m, ScheduleConfig(plan=taylor)):
        want = case.sample(steps=len(taylor))
    with fastcache.patched(m, cfg):
        dev = case.sample(steps=len(taylor))
    with fastcache.patched(m, cfg):
        host = case.sample(steps=len(taylor), context=lambda i: fastcache.context(m, "default", step_index=i))
        st = fastcache.stats(m)["contexts"]["default"]
    assert torch.equal(dev, want) and torch.equal(host, want)
    assert st["timeline"] == [c == "C" for c in fitted] and "forced_computes" not in st


def _record(case, steps):
    from fastcache.tuning.calibration import CalibrationConfig

    feats = []
    h = fastcache.patch(case.model, CalibrationConfig(priors=True))
    orig = h.policy._accumulate
    h.policy._accumulate = lambda st, outs: (feats.append([f.detach().double().clone() for f in outs]), orig(st, outs))
    try:
        case.sample(steps=steps)
    finally:
        h.remove()
    return feats


@pytest.mark.parametrize("per_slot", (False, True))
def test_fitted_forecast_equals_the_host_formula_and_the_proxy_its_error(per_slot):
    """Recorded features, forecast through taylor_update + history_combine with the
    host-solved weights: equal to ``sum_j a_j F(c_j)``; the proxy of the plan equals the
    teacher-forced error of those forecasts (exact Gram: slots below gram_dim)."""
    case = reference_dit_case()
    feats = _record(case, 9)
    prof = fastcache.calibrate(case.model, lambda: case.sample(steps=9), progress=False)
    gram = prof.step_gram.numpy()
    W = proxy.step_weights(gram, "relative")
    K = len(feats[0])
    for plan in ("CFCFFCF1F", "CCFFCFFFC", "C0FC2FCFF"):
        fit = proxy.fit_plan(plan, gram, proxy.FitSettings(per_slot=per_slot))
        cfg = ScheduleConfig(plan=plan, fit=fit)
        wts = fit_history_weights(cfg, K)
        hist = [torch.zeros((cfg.order + 1, *f.shape), dtype=torch.float64) for f in feats[0]]
        valid, last, comp, err = torch.zeros(1), 0, [], 0.0
        for s, c in enumerate(plan):
            dx = torch.tensor([float(s - last)])
            if c == "C":
                for hk, f in zip(hist, feats[s]):
                    ops.taylor_update(hk, f, dx, valid, torch.ones((), dtype=torch.bool))
                valid = (valid + 1).clamp(max=cfg.order + 1)
                last = s
                comp.append(s)
                continue
            for i, (hk, f) in enumerate(zip(hist, feats[s])):
                if c == "F":
                    fh = ops.history_combine(hk, torch.from_numpy(wts[s, i]))
                    co = fit[s][i] if per_slot else fit[s]
                    want = sum(a * feats[comp[-1 - j]][i] for j, a in enumerate(co))
                    torch.testing.assert_close(fh, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
                else:
                    fh = ops.taylor_forecast(hk[: int(c) + 1], dx)
                err += float((fh - f).pow(2).sum() / f.pow(2).sum()) / K
        cost = proxy.plan_cost(W, plan, fit, gram=gram)
        assert math.isclose(cost, err, rel_tol=1e-5), (plan, cost, err)


def test_announced_fitted_steps_equal_the_device_steps_and_differ_from_taylor():
    case = reference_dit_case()
    m = case.model
    prof = fastcache.calibrate(m, lambda: [case.sample(steps=8, seed=s) for s in (1, 2)], progress=False)
    plan = "CCFCFFCF"
    cfg = proxy.plan_config(plan, prof, proxy.FitSettings(per_slot=True))
    with fastcache.patched(m, cfg):
        dev = case.sample(steps=8, seed=3)
    with fastcache.patched(m, cfg):
        host = case.sample(steps=8, seed=3, context=lambda i: fastcache.context(m, "default", step_index=i))
    with fastcache.patched(m, ScheduleConfig(plan=plan.replace("F", "2"))):
        tay = case.sample(steps=8, seed=3)
    assert torch.equal(host, dev) and not torch.equal(dev, tay)


def test_dp_with_the_fitted_filler_is_the_proxy_optimum():
    case = reference_dit_case()
    prof = fastcache.calibrate(case.model, lambda: [case.sample(steps=7, seed=s) for s in (1, 2)], progress=False)
    W = proxy.step_weights(prof.step_gram.numpy(), "relative")
    fs = proxy.FitSettings()
    solve = proxy.proxy_dp(W, [0, 2], 4, fs)
    for K in (2, 3, 4):
        best = math.inf
        for comp in itertools.combinations(range(1, 7), K - 1):
            for codes in itertools.product("02F", repeat=7 - K):
                it = iter(codes)
                plan = "".join("C" if s == 0 or s in comp else next(it) for s in range(7))
                best = min(best, proxy.plan_cost(W, plan))
        plan, cost = solve(K)
        assert plan.count("C") == K
        assert math.isclose(cost, best, rel_tol=1e-9) and math.isclose(proxy.plan_cost(W, plan), cost, rel_tol=1e-9)
    assert "F" in solve(3)[0]  # the fit is never worse than Taylor at its own steps


def test_config_refuses_bad_fits():
    with pytest.raises(ValueError, match="fit is None"):
        ScheduleConfig(plan="CCF")
    with pytest.raises(ValueError, match="no coefficients for the plan's 'F' steps"):
        ScheduleConfig(plan="CCFF", fit={2: (1.0, 0.0)})
    with pytest.raises(ValueError, match="does not fit"):
        ScheduleConfig(plan="CC1F", fit={2: (1.0,), 3: (1.0,)})
    with pytest.raises(ValueError, match=r"fit\[2\] must hold 1..2 coefficients"):
        ScheduleConfig(plan="CCF", fit={2: (1.0, 0.0, 0.0)})
    with pytest.raises(ValueError, match="non-finite"):
        ScheduleConfig(plan="CCF", fit={2: (float("nan"),)})
    c = ScheduleConfig(plan="CCFC", fit={"2": [1.5, -0.5]})
    assert c.fit == ((2, (1.5, -0.5)),) and c.order == 1
    assert fastcache.CacheConfig.from_dict(c.to_dict()) == c


def test_profile_stores_a_fitted_schedule_and_loads_it_back(tmp_path):
    case = reference_dit_case()
    runs = [lambda s=s: case.sample(steps=7, seed=s) for s in (1, 2)]
    res = fastcache.search_schedule(case.model, runs, 3, methods=("taylor2", "fit"), max_evals=6, progress=False)
    prof = fastcache.calibrate(case.model, lambda: [r() for r in runs], progress=False)
    res.store(prof)
    back = fastcache.Profile.load(prof.save(tmp_path / "p.safetensors"))
    assert back.schedule(3) == res.config
    if "F" in res.plan:
        assert back.schedules[3]["fit"] and back.schedules[3]["fit_settings"]["points"] in (1, 2, 3)


@pytest.mark.compile
def test_compiled_fitted_plan_no_cond_no_recompiles_and_equals_eager():
    """Announced steps under torch.compile(fullgraph): a fitted step's weights come from
    the device table indexed by the announced step, so one forecast graph serves every
    Taylor and fitted step (3 graphs in all), no cond, no host read; the device step
    counter's path (not announced) equals the eager outputs too."""
    from support.hostreads import HostReadMode
    from torch._dynamo.testing import CompileCounterWithBackend

    case = reference_dit_case()
    m = case.model
    plan = "CC1CFFCF"
    cfg = ScheduleConfig(plan=plan, fit={4: (1.4, -0.5, 0.1), 5: (1.7, -0.9, 0.2), 7: (1.2, -0.2)})
    ctx = lambda i: fastcache.context(m, "default", step_index=i)  # noqa: E731
    with fastcache.patched(m, cfg):
        eager = case.sample(steps=8, context=ctx)
        fastcache.reset(m)
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(m, fullgraph=True, backend=cnt)
        frames = []
        mode = HostReadMode()
        count = lambda i, o: frames.append(cnt.frame_count)  # noqa: E731
        with mode:
            out = case.sample(model=compiled, steps=8, context=ctx, per_step=count)
            case.sample(model=compiled, steps=8, context=ctx, per_step=count)
        tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
    assert max(frames) == 3 and frames[2:] == [3] * 14, frames
    assert not mode.conds
    assert tl == [c == "C" for c in plan] * 2
    assert torch.equal(out, eager)
