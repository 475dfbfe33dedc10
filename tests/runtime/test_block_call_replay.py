"""The stack replays each block call as the model makes it.

HunyuanVideo calls its dual- and single-stream blocks with 7 positional arguments while
their ``forward(..., *args, **kwargs)`` names 5, and the two lists name the 5th argument
differently (``freqs_cis`` / ``image_rotary_emb``). A toy model with the same calling
convention: patched, with every step computed, it must give the unpatched output bitwise
(before: the binder refused the extra positional arguments with a TypeError)."""

import torch
from torch import nn

import fastcache


class _First(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mod = nn.Linear(d, 2 * d)
        self.f = nn.Linear(d, d)

    def forward(self, x, c, emb, freqs, *args, **kwargs):
        shift, scale = self.mod(emb).chunk(2, 1)
        h = self.norm1(x) * (1 + scale[:, None]) + shift[:, None]
        return x + torch.tanh(self.f(h)) * freqs + args[0], c + 1


class _Second(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.f = nn.Linear(d, d)

    def forward(self, x, c, emb, table=None, *args, **kwargs):
        return x + torch.tanh(self.f(x)) * table * args[1], c * 0.5


class _Toy(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.Linear(1, d)
        self.first = nn.ModuleList([_First(d) for _ in range(2)])
        self.second = nn.ModuleList([_Second(d) for _ in range(2)])

    def forward(self, x, c, t):
        e = self.emb(t[:, None].float() / 1000)
        rope = torch.linspace(0.5, 1.5, x.shape[-1])
        for blk in self.first:
            x, c = blk(x, c, e, rope, 0.25, 3.0)
        for blk in self.second:
            x, c = blk(x, c, e, rope, 0.25, 3.0)
        return x


_SPEC = fastcache.ModelSpec(
    name="toy-positional-varargs",
    model_types=(_Toy,),
    segments=("first", "second"),
    streams=("x", "c"),
    returns=("x", "c"),
    modulation=lambda blk, call: (call["x"], *blk.mod(call["emb"]).chunk(2, 1), blk.norm1.eps),
    timestep_arg="t",
)


def test_positional_extra_block_arguments_are_replayed_positionally():
    spec = fastcache.register(_SPEC)
    try:
        torch.manual_seed(0)
        m = _Toy().eval()
        x, c = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
        ts = [torch.full((2,), v) for v in (900.0, 700.0, 500.0)]
        with torch.no_grad():
            want = [m(x, c, t) for t in ts]
            with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.0)):
                got = [m(x, c, t) for t in ts]
                st = fastcache.stats(m)["contexts"]["default"]
        assert st["computed"] == 3
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    finally:
        fastcache.specs._REGISTRY.remove(spec)
