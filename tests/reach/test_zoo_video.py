"""The video share of the reach zoo: every tiny diffusers video transformer builds, samples
3 steps to finite latents of the right shape, deterministically, and depends on the timestep."""

import pytest
import torch
from support.reach_video import CASES_VIDEO


@pytest.fixture(scope="module", params=sorted(CASES_VIDEO))
def case(request):
    return CASES_VIDEO[request.param]()


def test_sample_is_finite_shaped_and_deterministic(case):
    x0 = case.latents(torch.Generator().manual_seed(1))
    a = case.sample(steps=3, seed=1)
    b = case.sample(steps=3, seed=1)
    assert a.shape == x0.shape, f"{case.name}: sampled {tuple(a.shape)}, latents {tuple(x0.shape)}"
    assert torch.isfinite(a).all(), f"{case.name}: non-finite latents after 3 steps"
    assert torch.equal(a, b), f"{case.name}: two runs with the same seed differ"
    assert not torch.equal(a, x0), f"{case.name}: sampling left the latents unchanged"


def test_output_depends_on_timestep(case):
    sch = case.scheduler()
    sch.set_timesteps(3)
    t_hi, t_lo = sch.timesteps[0], sch.timesteps[-1]
    x = case.latents(torch.Generator().manual_seed(2))
    with torch.no_grad():
        hi = case.output(case.model(**case.inputs(x, t_hi)))
        lo = case.output(case.model(**case.inputs(x, t_lo)))
    assert hi.shape == x.shape, f"{case.name}: output {tuple(hi.shape)} vs latents {tuple(x.shape)}"
    assert (hi - lo).abs().max() > 1e-3, f"{case.name}: output at t={float(t_hi)} equals that at t={float(t_lo)}"
