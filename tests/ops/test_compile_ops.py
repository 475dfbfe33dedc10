"""A function calling every fused op compiles with torch.compile(fullgraph=True) on CPU:
0 graph breaks, and the same results and state as eager."""

import pytest
import torch
import torch._dynamo

from fastcache import ops

pytestmark = pytest.mark.compile


def step(x, shift, scale, prev, t, coeffs, state, r, gate, trend):
    sums = ops.modulated_rel_l1_sums(x, shift, scale, prev)
    flag = ops.cache_decision(sums, t, coeffs, state, 0.2, 1, 0, 6)
    skipped = ops.apply_residual(x, r)
    computed = ops.gated_residual(x, gate, x * 0.5, trend, 0.01)
    out = torch.where(flag, computed, skipped)
    ops.store_residual(out, x, flag, r)
    extra = ops.rel_l1_sums(out, prev.clone(), False)
    return out, flag, extra


def _inputs():
    g = torch.Generator().manual_seed(0)
    B, N, D = 2, 33, 97
    x = torch.randn(B, N, D, generator=g)
    return dict(
        shift=torch.randn(B, D, generator=g) * 0.1,
        scale=torch.randn(B, D, generator=g) * 0.1,
        prev=torch.zeros(B, N, D),
        coeffs=torch.tensor([1.0, 0.0], dtype=torch.float32),
        state=ops.new_state(16),
        r=torch.zeros(B, N, D),
        gate=torch.randn(B, D, generator=g),
        trend=torch.randn(N, D, generator=g),
    ), x


def test_ops_fullgraph_compile_matches_eager():
    eager_kw, x = _inputs()
    comp_kw, _ = _inputs()
    explain = torch._dynamo.explain(step)(x, t=torch.tensor([999.0]), **_inputs()[0])
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(step, fullgraph=True)
    for i in range(6):
        xi = x + 0.05 * i * torch.sin(x)
        t = torch.tensor([999.0 - 100 * i])
        e = step(xi, t=t, **eager_kw)
        c = compiled(xi, t=t, **comp_kw)
        assert bool(e[1]) == bool(c[1])
        torch.testing.assert_close(c[0], e[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c[2], e[2], rtol=1e-5, atol=1e-4)
    for k in ("prev", "state", "r"):
        torch.testing.assert_close(comp_kw[k], eager_kw[k], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert eager_kw["state"][7] + eager_kw["state"][8] == 6  # six decisions recorded


def test_out_forms_compile_fullgraph():
    """The out= ops (mutable out) trace with fullgraph=True and write the buffer like eager."""

    def fn(x, r, gate, buf, buf2):
        ops.apply_residual(x, r, out=buf)
        ops.gated_residual(buf, gate, r, out=buf2)
        return buf2 * 2

    g = torch.Generator().manual_seed(1)
    B, N, D = 2, 9, 40
    x = torch.randn(B, D, N, generator=g).transpose(1, 2)  # a strided input too
    r, gate = torch.randn(B, N, D, generator=g), torch.randn(B, D, generator=g)
    want_buf, want_buf2 = torch.empty(B, N, D), torch.empty(B, N, D)
    want = fn(x, r, gate, want_buf, want_buf2)
    explain = torch._dynamo.explain(fn)(x, r, gate, torch.empty(B, N, D), torch.empty(B, N, D))
    assert explain.graph_break_count == 0
    buf, buf2 = torch.empty(B, N, D), torch.empty(B, N, D)
    got = torch.compile(fn, fullgraph=True)(x, r, gate, buf, buf2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(buf, want_buf, rtol=0, atol=0)
    torch.testing.assert_close(buf2, want_buf2, rtol=0, atol=0)
