"""The image share of the reach zoo (tests/support/reach_image.py): every tiny diffusers
image transformer builds, samples with its scheduler, and is a usable test subject:

* ``case.sample(steps=3)`` is finite, has the latents' shape, and is bitwise the same on
  a second run with the same seed;
* the model's output depends on the timestep (a model that ignores it would make every
  timestep-keyed cache test trivial);
* every block list has at least two blocks (a cache that reuses a block list's residual
  needs a first block and at least one more).
"""

import pytest
import torch
from support.reach_image import CASES_IMAGE


@pytest.fixture(scope="module", params=sorted(CASES_IMAGE))
def case(request):
    return CASES_IMAGE[request.param]()


def test_sampling_is_finite_shaped_and_reproducible(case):
    x = case.latents(torch.Generator().manual_seed(1))
    first = case.sample(steps=3)
    second = case.sample(steps=3)
    assert first.shape == x.shape, f"{case.name}: sample {tuple(first.shape)} vs latents {tuple(x.shape)}"
    assert torch.isfinite(first).all(), f"{case.name}: non-finite sample"
    assert not torch.equal(first, x), f"{case.name}: sampling left the latents unchanged"
    assert torch.equal(first, second), f"{case.name}: two runs with seed 1 differ"


def test_output_depends_on_the_timestep(case):
    sch = case.scheduler()
    sch.set_timesteps(3)
    early, late = sch.timesteps[0], sch.timesteps[-1]
    x = case.latents(torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_early = case.output(case.model(**case.inputs(x, early)))
        out_late = case.output(case.model(**case.inputs(x, late)))
    assert out_early.shape == x.shape, f"{case.name}: output {tuple(out_early.shape)} vs latents {tuple(x.shape)}"
    diff = (out_early - out_late).abs().max().item()
    assert diff > 1e-3, f"{case.name}: outputs at t={early.item()} and t={late.item()} differ by only {diff}"


def test_every_block_list_has_two_blocks_or_more(case):
    lists = {
        name: mod
        for name, mod in case.model.named_modules()
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and all("Block" in type(b).__name__ for b in mod)
    }
    assert lists, f"{case.name}: no block list found"
    short = {name: len(mod) for name, mod in lists.items() if len(mod) < 2}
    assert not short, f"{case.name}: block lists with fewer than 2 blocks: {short}"
