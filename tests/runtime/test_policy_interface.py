"""The policy interface holds block-granularity caching without runtime changes.

A FORA-style static schedule written here as a test policy (compute every N-th call,
reuse each block's output delta otherwise) is registered for its own config type and
driven by the unchanged runtime; its output is checked against a hand-written loop.
"""

import dataclasses
from typing import ClassVar

import torch
from support.zoo import reference_dit_case

import fastcache
from fastcache.config import CacheConfig
from fastcache.policies import Policy, register_policy


@dataclasses.dataclass(frozen=True)
class EveryNConfig(CacheConfig):
    kind: ClassVar[str] = "test-every-n"
    interval: int = 2


class _State:
    def __init__(self):
        self.calls = 0
        self.deltas = {}


@register_policy(EveryNConfig)
class EveryNBlockPolicy(Policy):
    granularity = "block"

    def new_state(self):
        return _State()

    def reset_state(self, st):
        st.calls, st.deltas = 0, {}

    def state_stats(self, st):
        return {"calls": st.calls}

    def begin_step(self, st, timestep, step):
        st.calls += 1

    def block_forward(self, st, index, forward, call, timestep):
        x = call["x"]
        if (st.calls - 1) % self.config.interval == 0:
            out = forward(**call)
            st.deltas[index] = out - x
            return out
        return fastcache.ops.apply_residual(x, st.deltas[index])


def test_block_granularity_policy_runs_on_the_runtime():
    case = reference_dit_case()
    m = case.model
    x = case.latents(torch.Generator().manual_seed(0))
    ts = [torch.full((2,), float(v)) for v in (900, 800, 700)]
    y = torch.tensor([1, 2])
    with torch.no_grad():
        with fastcache.patched(m, EveryNConfig(interval=2)):
            outs = [m(x + i * 0.1, t, y) for i, t in enumerate(ts)]
            assert fastcache.stats(m)["contexts"]["default"]["calls"] == 3
        # by hand: step 0 and 2 computed, step 1 reuses each block's delta of step 0
        deltas = []
        h = m.patch_embed(x) + m.pos_embed
        c = m.t_embedder(ts[0]) + m.y_embedder(y)
        for blk in m.blocks:
            o = blk(h, c)
            deltas.append(o - h)
            h = o
        ref1_h = m.patch_embed(x + 0.1) + m.pos_embed
        for d in deltas:
            ref1_h = ref1_h + d
        c1 = m.t_embedder(ts[1]) + m.y_embedder(y)
        ref1 = m.unpatchify(m.final_layer(ref1_h, c1))
    torch.testing.assert_close(outs[1], ref1, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(outs[0], m(x, ts[0], y))
        torch.testing.assert_close(outs[2], m(x + 0.2, ts[2], y))
