"""Every block program, run with the computing executor, equals its block bitwise.

Each block of each tiny real model (tests/support/zoo.py) is called by the model as
usual over a short sampling loop; a forward hook captures the call and the block's
output, and the program is run on the same call. No tolerance: the programs replay
the blocks' own arithmetic in the same order.
"""

import inspect

import pytest
import torch
from support.zoo import CASES

import fastcache
from fastcache.interior import ComputeExecutor, InteriorLayout, program_for


@pytest.mark.parametrize("name", sorted(CASES))
def test_program_equals_block_bitwise(name):
    case = CASES[name]()
    m = case.model
    spec = fastcache.specs.find_spec(m)
    layout = InteriorLayout(spec.blocks(m))
    seen = []

    def hook(mod, args, kwargs, out):
        sig = inspect.signature(type(mod).forward)
        call = sig.bind(mod, *args, **kwargs)
        call.apply_defaults()
        call = dict(call.arguments)
        call.pop("self")
        streams = {n: call[n] for n in spec.streams}
        ex = ComputeExecutor(record=True)
        got = program_for(mod).run(mod, call, streams, ex)
        want = spec.unpack(out)
        for n, v in want.items():
            if v is None:
                assert got[n] is None
            else:
                assert torch.equal(got[n], v), f"{type(mod).__name__} stream {n} differs"
        seen.append((type(mod).__name__, len(ex.outputs)))

    hs = [e.module.register_forward_hook(hook, with_kwargs=True) for e in layout.entries]
    try:
        case.sample(steps=3)
    finally:
        for h in hs:
            h.remove()
    assert len(seen) == 3 * layout.num_blocks
    # every computed branch output was handed to the executor, one per slot
    assert all(
        k == n
        for (_, k), n in zip(
            seen, [sum(1 for s in layout.slots if s.block == li) for li in range(layout.num_blocks)] * 3
        )
    )


def test_unknown_block_is_refused_clearly():
    with pytest.raises(TypeError, match="no block interior program for Linear"):
        program_for(torch.nn.Linear(2, 2))
