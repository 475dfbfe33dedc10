"""``fastcache::history_combine``: the fitted filler's forecast (docs/methods.md section 12).

``out = sum_k weights[k] * history[k]``, accumulated k = 0..m, fp32 math (fp64 for fp64),
output in history's dtype. Every backend against the eager reference: the C++ CPU
kernel bit for bit (same operation order, no FMA), Triton under the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1) within the parity bounds of
tests/ops/test_triton.py; weights equal to TaylorSeer's coefficients give
``taylor_forecast`` bit for bit; opcheck; the contract's errors.
"""

from __future__ import annotations

import cases
import numpy as np
import pytest
import torch
from expected_backends import cpp_expectation

from fastcache import ops
from fastcache.ops import reference as ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHAPES = ((1, 1, 1), (2, 17, 97), (2, 33, 1153))


def _did(dt):
    return str(dt).removeprefix("torch.")


def _inputs(order, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randn(order + 1, *shape, generator=g).to(dtype)
    w = torch.randn(order + 1, generator=g)
    return hist, w


def _cpp():
    action, why = cpp_expectation(ops.BACKEND.as_dict(), __import__("os").environ)
    if action == "skip":
        pytest.skip(why)
    if action == "fail":
        pytest.fail(why, pytrace=False)
    from fastcache import _C

    return _C.history_combine


def taylor_weights(dx: float, order: int) -> torch.Tensor:
    """TaylorSeer's coefficients built as the ops build them (fp32, c_k = c_{k-1} * dx / k)."""
    c = [np.float32(1.0)]
    for k in range(1, order + 1):
        c.append(np.float32(c[-1] * np.float32(dx) / np.float32(k)))
    return torch.tensor(np.array(c, dtype=np.float32))


def test_reference_is_the_weighted_sum_in_fp64_oracle():
    hist, w = _inputs(2, (3, 5, 7), torch.float32)
    exact = sum(w[k].double() * hist[k].double() for k in range(3))
    torch.testing.assert_close(ref.history_combine(hist, w).double(), exact, rtol=cases.FP32_RTOL, atol=cases.FP32_ATOL)
    # fp64 history: fp64 math with the fp32 weights
    h64 = hist.double()
    want = h64[0] * w[0].double() + h64[1] * w[1].double() + h64[2] * w[2].double()
    assert torch.equal(ref.history_combine(h64, w), want)


@pytest.mark.parametrize("order", (0, 1, 2, 3))
@pytest.mark.parametrize("dtype", DTYPES, ids=_did)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpp_kernel_equals_reference_bitwise(order, dtype, shape):
    fn = _cpp()
    hist, w = _inputs(order, shape, dtype, seed=order)
    got = fn(hist, w)
    want = ref.history_combine(hist, w)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got.view(-1), want.view(-1)) or (got.isnan() == want.isnan()).all()
    assert torch.equal(torch.ops.fastcache.history_combine(hist, w), want)  # the dispatcher's CPU kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=_did)
@pytest.mark.parametrize("order", (0, 1, 2))
def test_taylor_weights_reproduce_taylor_forecast_bitwise(order, dtype):
    hist, _ = _inputs(order, (2, 17, 97), dtype, seed=7)
    for dx in (1.0, 2.0, 3.0, 7.0):
        w = taylor_weights(dx, order)
        want = ops.taylor_forecast(hist, torch.tensor([dx]))
        assert torch.equal(ops.history_combine(hist, w), want), (dx, order, dtype)
        assert torch.equal(ref.history_combine(hist, w), ref.taylor_forecast(hist, torch.tensor([dx])))


@pytest.mark.parametrize("order", (0, 2, 3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=_did)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_kernel_matches_reference(order, dtype, shape):
    pytest.importorskip("triton", reason="the Triton kernels need the triton package")
    from fastcache.kernels import LAUNCHERS

    hist, w = _inputs(order, shape, dtype, seed=11 + order)
    got = LAUNCHERS["history_combine"](hist, w)
    exact = ref.history_combine(hist.double(), w)
    assert got.dtype == dtype and got.shape == shape
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=cases.FP32_RTOL, atol=cases.FP32_ATOL)
    else:
        lowp = ref.history_combine(hist, w)
        if dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 (tests/ops/test_triton.py)
            bits = ref.history_combine(hist.float(), w).contiguous().view(torch.int32) & -65536
            lowp = bits.view(torch.float32).to(torch.bfloat16)
        cases.assert_within_lowp_bound(got, lowp, exact, dtype, f"history_combine[{dtype}]")


def test_triton_kernel_fp64_and_taylor_weights():
    pytest.importorskip("triton", reason="the Triton kernels need the triton package")
    from fastcache.kernels import LAUNCHERS

    hist, w = _inputs(2, (2, 5, 33), torch.float64, seed=3)
    torch.testing.assert_close(LAUNCHERS["history_combine"](hist, w), ref.history_combine(hist, w), rtol=1e-12, atol=0)
    h32 = hist.float()
    want = LAUNCHERS["taylor_forecast"](h32, torch.tensor([3.0]))
    torch.testing.assert_close(LAUNCHERS["history_combine"](h32, taylor_weights(3.0, 2)), want, rtol=0, atol=0)
    empty = LAUNCHERS["history_combine"](torch.empty(3, 0, 4), torch.ones(3))
    assert empty.shape == (0, 4)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=_did)
def test_opcheck(dtype):
    hist, w = _inputs(2, (2, 5, 33), dtype)
    torch.library.opcheck(torch.ops.fastcache.history_combine.default, (hist, w))


def test_opcheck_eager_reference_and_fake():
    hist, w = _inputs(1, (2, 5, 33), torch.float32)
    out = torch.ops.fastcache.history_combine(hist.to("meta"), w.to("meta"))
    assert out.shape == (2, 5, 33) and out.dtype == torch.float32 and out.device.type == "meta"
    compiled = torch.compile(ops.history_combine, backend="eager", fullgraph=True)
    assert torch.equal(compiled(hist, w), ops.history_combine(hist, w))


@pytest.mark.parametrize(
    "hist, w, words",
    [
        (torch.randn(5), torch.ones(5), ["(5,)", "at least 2-D"]),
        (torch.randn(3, 8, 4).transpose(1, 2), torch.ones(3), ["contiguous"]),
        (torch.ones(3, 4, dtype=torch.int64), torch.ones(3), ["torch.int64"]),
        (torch.randn(3, 4), torch.ones(2), ["3 values", "(2,)"]),
        (torch.randn(3, 4), torch.ones(3, dtype=torch.float64), ["torch.float64"]),
        (torch.randn(3, 4), torch.ones(1, 3), ["(1, 3)"]),
        (torch.randn(3, 4), torch.ones(3, device="meta"), ["meta"]),
    ],
    ids=["history_1d", "history_strided", "history_dtype", "weights_len", "weights_dtype", "weights_2d", "device"],
)
def test_contract_names_the_argument(hist, w, words):
    for fn in (ops.history_combine, ref.history_combine, ops.contracts.check_history_combine):
        with pytest.raises((ValueError, TypeError)) as info:
            fn(hist, w)
        msg = str(info.value)
        assert "history_combine" in msg and all(wd in msg for wd in words), msg


def test_cpp_kernel_refuses_bad_weights_by_name():
    fn = _cpp()
    with pytest.raises(RuntimeError, match=r"weights must be a 1-D torch.float32 tensor of 3 values"):
        fn(torch.randn(3, 4), torch.ones(2))
