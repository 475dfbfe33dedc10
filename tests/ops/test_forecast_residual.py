"""The multi-slot ops: ``forecast_residual`` (a whole stack's reused / forecast residuals of
one stream in one op) and ``taylor_update_slots`` (every slot's history update in one op).

Both promise the bits of the per-slot ops they replace (``taylor_forecast`` then
``gated_residual`` / ``apply_residual``; ``taylor_update`` per slot), on every backend:
the eager reference, the C++ kernel (CPU) and the Triton kernel (the interpreter here;
test_ptx.py compiles it for sm_90/sm_80). Plus opcheck (schema, fake, aliasing) and the
contract's rejections.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from fastcache import ops
from fastcache.ops import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
B, N, D = 2, 7, 97


def _did(dt):
    return str(dt).removeprefix("torch.")


def _slots(dtype, orders=(1, -1, 2, 0, 4, 3, 1), gen_seed=0):
    """Gates of every accepted shape (strided chunks included, None = ungated) and
    histories of every order (-1 = a plain cached feature of x's shape)."""
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(B, N, D, generator=g).to(dtype)
    mod = torch.randn(B, 6 * D, generator=g).to(dtype)  # a block's modulation, chunked
    gate_shapes = [
        mod.chunk(6, dim=1)[2].unsqueeze(1),  # (B, 1, D) strided view
        None,
        torch.randn(B, D, generator=g).to(dtype),
        torch.randn(1, D, generator=g).to(dtype),
        torch.randn(D, generator=g).to(dtype),
        mod.chunk(6, dim=1)[5],  # (B, D) strided view
        torch.randn(1, 1, D, generator=g).to(dtype),
    ]
    hs = []
    for m in orders:
        shape = (B, N, D) if m < 0 else (m + 1, B, N, D)
        hs.append((0.3 * torch.randn(shape, generator=g)).to(dtype))
    gates = [gate_shapes[i % len(gate_shapes)] for i in range(len(orders))]
    return x, gates, hs


def _per_slot(x, gates, hs, dx):
    """The per-block path: one forecast and one residual op per slot."""
    for gt, h in zip(gates, hs):
        f = h if h.dim() == x.dim() else ops.taylor_forecast(h, dx)
        x = ops.apply_residual(x, f) if gt is None else ops.gated_residual(x, gt, f)
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=_did)
@pytest.mark.parametrize("dx_value", [1.0, 3.0])
def test_fused_equals_per_slot_bitwise(dtype, dx_value):
    x, gates, hs = _slots(dtype)
    dx = torch.tensor([dx_value])
    want = _per_slot(x, gates, hs, dx)
    got_ref = ref.forecast_residual(x, gates, hs, dx)
    got = ops.forecast_residual(x, gates, hs, dx)  # the C++ kernel on CPU (the reference without it)
    assert torch.equal(got_ref, want)
    assert torch.equal(got, want)
    assert got.is_contiguous() and got.dtype == dtype


def test_strided_x_no_slots_and_fora_weights():
    x, gates, hs = _slots(torch.float32, orders=(0, -1))
    xt = torch.randn(B, D, N).transpose(1, 2)  # a transposed patch-embedding view
    dx = torch.tensor([2.0])
    assert torch.equal(ops.forecast_residual(xt, gates, hs, dx), _per_slot(xt, gates, hs, dx))
    out = ops.forecast_residual(xt, [], [], dx)
    assert torch.equal(out, xt) and out.data_ptr() != xt.data_ptr()
    # order 0 (FORA on a Taylor history): the cached feature itself, whatever dx
    plain = ops.forecast_residual(x, [gates[0]], [hs[0][0]], dx)
    assert torch.equal(ops.forecast_residual(x, [gates[0]], [hs[0]], torch.tensor([7.0])), plain)


@pytest.mark.parametrize("dtype", DTYPES, ids=_did)
def test_update_slots_equals_per_slot(dtype):
    g = torch.Generator().manual_seed(3)
    shapes = [(B, N, D), (B, 3, D), (1, 2, 5)]
    hist = [torch.randn((3, *s), generator=g).to(dtype) for s in shapes]
    fs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    dx, valid = torch.tensor([2.0]), torch.tensor([1.0])
    for store in (True, False):
        a, b = [h.clone() for h in hist], [h.clone() for h in hist]
        for h, f in zip(a, fs):
            ops.taylor_update(h, f, dx, valid, torch.tensor(store))
        ops.taylor_update_slots(b, fs, dx, valid, torch.tensor(store))
        assert all(torch.equal(p, q) for p, q in zip(a, b))
        c = [h.clone() for h in hist]
        ref.taylor_update_slots(c, fs, dx, valid, torch.tensor(store))
        assert all(torch.equal(p, q) for p, q in zip(a, c))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=_did)
def test_opcheck(dtype):
    x, gates, hs = _slots(dtype, orders=(1, -1, 2))
    torch.library.opcheck(torch.ops.fastcache.forecast_residual.default, (x, gates, hs, torch.tensor([2.0])))
    hist = [torch.randn(2, B, N, D).to(dtype), torch.randn(3, 1, 5).to(dtype)]
    fs = [torch.randn(B, N, D).to(dtype), torch.randn(1, 5).to(dtype)]
    torch.library.opcheck(
        torch.ops.fastcache.taylor_update_slots.default,
        (hist, fs, torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor(True)),
    )


@pytest.mark.parametrize(
    "mutate, tokens",
    [
        (lambda a: a.update(x=torch.randn(N, D)), ["x must be (B, N, D)", "(7, 97)"]),
        (lambda a: a.update(gates=a["gates"][:1]), ["gates has 1", "histories has 2"]),
        (lambda a: a.update(gates=[torch.randn(B, 5), None]), ["gates[0]", "(2, 5)"]),
        (lambda a: a.update(histories=[torch.randn(B, N, 3), a["histories"][1]]), ["histories[0]", "(2, 7, 3)"]),
        (lambda a: a.update(histories=[torch.randn(7, B, N, D), a["histories"][1]]), ["histories[0]", "m+1 <= 5"]),
        (lambda a: a.update(histories=[a["histories"][0].double(), a["histories"][1]]), ["histories[0]", "float64"]),
        (lambda a: a.update(dx=torch.ones(2)), ["dx", "(2,)"]),
    ],
)
def test_contract_rejections_name_the_argument(mutate, tokens):
    a = dict(x=torch.randn(B, N, D), gates=[torch.randn(B, 1, D), None], histories=None, dx=torch.tensor([1.0]))
    a["histories"] = [torch.randn(2, B, N, D), torch.randn(B, N, D)]
    mutate(a)
    for fn in (ref.forecast_residual, torch.ops.fastcache.forecast_residual.default):
        with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
            fn(a["x"], a["gates"], a["histories"], a["dx"])
        for t in tokens:
            assert t in str(info.value), (t, str(info.value))


# The checkout's kernels/ as fastcache.kernels (an editable install may map that name to
# another checkout's folder): what a build of this tree ships.
_LOAD_KERNELS = """
import importlib.util, sys
import fastcache
_spec = importlib.util.spec_from_file_location(
    "fastcache.kernels", {root!r} + "/kernels/__init__.py", submodule_search_locations=[{root!r} + "/kernels"]
)
_mod = importlib.util.module_from_spec(_spec)
sys.modules["fastcache.kernels"] = _mod
_spec.loader.exec_module(_mod)
sys.path.insert(0, {root!r} + "/tests")
"""

_TRITON_SCRIPT = _LOAD_KERNELS + textwrap.dedent(
    """
    import torch
    from fastcache.kernels import LAUNCHERS
    from fastcache.ops import reference as ref
    from ops.test_forecast_residual import _slots
    bad = []
    for dtype in (torch.float32, torch.float16, torch.float64):
        for orders in ((1, -1, 2, 0, 4, 3, 1), (2,), (-1, -1, -1, -1, -1)):
            x, gates, hs = _slots(dtype, orders)
            dx = torch.tensor([3.0])
            got = LAUNCHERS["forecast_residual"](x, gates, hs, dx)
            want = ref.forecast_residual(x, gates, hs, dx)
            if not torch.equal(got, want):
                bad.append((str(dtype), orders, (got.double() - want.double()).abs().max().item()))
    hist = [torch.randn(3, 2, 7, 97), torch.randn(2, 1, 5)]
    fs = [torch.randn(2, 7, 97), torch.randn(1, 5)]
    a, b = [h.clone() for h in hist], [h.clone() for h in hist]
    LAUNCHERS["taylor_update_slots"](a, fs, torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor(True))
    ref.taylor_update_slots(b, fs, torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor(True))
    if not all(torch.equal(p, q) for p, q in zip(a, b)):
        bad.append("taylor_update_slots")
    print("BAD", bad)
    """
)


def test_triton_interpreter_parity():
    """The Triton kernels under TRITON_INTERPRET=1 give the reference's bits (fp32, fp16,
    fp64; bf16 casts truncate in the interpreter, see test_triton.py), slot groups of 4
    chained (7 slots = 2 launches)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT.format(root=ROOT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "BAD []" in r.stdout, r.stdout[-3000:]


_PTX_SCRIPT = _LOAD_KERNELS + textwrap.dedent(
    """
    import dataclasses, json
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastcache.kernels import slots, taylor
    from ops.test_ptx import _specialise
    from ops.test_forecast_residual import _slots

    variants = []
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x, gates, hs = _slots(dt, (1, -1, 2, 0, 4, 3, 1))  # 2 launches: 4 slots + 3 slots
        out = torch.empty_like(x)
        for i, launch in enumerate(slots.plan_forecast_residual(x, gates, hs, torch.tensor([2.0]), out)):
            variants.append((f"forecast_residual[{{dt}},{{i}}]", launch))
    res = []
    for cap in (90, 80):
        for label, launch in variants:
            target = GPUTarget("cuda", cap, 32)
            sig, cx, attrs, opts = _specialise(launch, target)
            opts = dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else dict(opts.__dict__)
            k = triton.compile(ASTSource(fn=launch.kernel, signature=sig, constexprs=cx, attrs=attrs),
                               target=target, options=opts)
            res.append({{"label": label, "cap": cap, "ptx": k.asm["ptx"], "cubin": bool(k.asm.get("cubin"))}})
    print(json.dumps(res))
    """
)


def test_triton_kernel_compiles_to_ptx_for_sm90_and_sm80(tmp_path):
    """The forecast_residual kernel (every dtype, both slot groups of a 7-slot stack)
    compiles through the whole NVIDIA pipeline without a GPU, as tests/ops/test_ptx.py
    does for the other kernels (outside the interpreter, a fresh Triton cache)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), FASTCACHE_BACKEND="eager", FASTCACHE_SKIP_EXT="1")
    r = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT.format(root=ROOT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res) == 2 * 4 * 2
    for v in res:
        assert re.search(rf"^\.target sm_{v['cap']}", v["ptx"], re.MULTILINE), v["label"]
        assert ".entry _forecast_residual_kernel" in v["ptx"] and v["cubin"], v["label"]
