"""The timestep guard and the hold (repeated-call) path of the indicator and decision ops.

Every backend this machine has: the C++ kernels (``fastcache._C``, called directly), the
Triton launchers (under the interpreter) and the eager reference, each against traces
written by hand and against the reference bit for bit:

* ``timestep_guard`` on scripted timestep sequences (first call, falling steps, exact
  repeat, jitter rise 554.9999 -> 555.0, jitter fall, a real rise = a new run, with the
  run-length mismatch counter);
* ``hold=True`` leaves ``prev`` / the decision state bitwise unchanged and still returns
  the sums / True; ``hold=False`` is bitwise the behaviour without ``hold``;
* no host read in any of them; opcheck; torch.compile(fullgraph=True) with 0 breaks.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch._dynamo
from expected_backends import cpp_expectation
from support.hostreads import HostReadMode

import fastcache.ops as ops
from fastcache.ops import reference as R

RTOL, ATOL = R.TIMESTEP_RTOL, R.TIMESTEP_ATOL


# ----------------------------------------------------------------------------- backends
def _cpp_param():
    action, why = cpp_expectation(ops.BACKEND.as_dict(), os.environ)
    if action == "skip":
        return pytest.param("cpp", marks=pytest.mark.skip(reason=why), id="cpp")
    return pytest.param("cpp", id="cpp")  # a broken build fails in impls()


def _triton_param():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return pytest.param("triton", marks=pytest.mark.skip(reason=f"triton is not importable: {e}"), id="triton")
    return pytest.param("triton", id="triton")


BACKENDS = [_cpp_param(), _triton_param(), pytest.param("eager", id="eager")]


def impls(backend: str) -> dict:
    """The four ops of one backend, called with the dispatcher schema's arguments."""
    if backend == "cpp":
        action, why = cpp_expectation(ops.BACKEND.as_dict(), os.environ)
        if action == "fail":
            pytest.fail(why, pytrace=False)
        from fastcache import _C

        return {n: getattr(_C, n) for n in ("timestep_guard", "modulated_rel_l1_sums", "rel_l1_sums", "cache_decision")}
    if backend == "triton":
        from fastcache.kernels import LAUNCHERS

        return LAUNCHERS
    return {n: getattr(R, n) for n in ("timestep_guard", "modulated_rel_l1_sums", "rel_l1_sums", "cache_decision")}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def f32(v: float) -> float:
    return torch.tensor(v, dtype=torch.float32).item()


SUMS = torch.tensor([[0.1, 1.0], [0.05, 1.0]])  # pooled ratio 0.075: skips after warmup at threshold 0.2
COEFFS = torch.tensor([1.0, 0.0])


def _step(fns, t, state, aux, num_steps):
    t_op, hold = fns["timestep_guard"](torch.tensor([t]), state, aux, RTOL, ATOL, num_steps)
    flag = fns["cache_decision"](SUMS, t_op, COEFFS, state, 0.2, 1, 0, 0, hold)
    return t_op, hold, flag


# (timestep, expected t_op, expected hold) with num_steps = 4; comments: STEP / N_RUNS after the decision
SCRIPT = [
    (999.0, 999.0, False),  # first call: nothing seen, a new run (1 / 1)
    (999.0, 999.0, True),  # exact repeat (Heun's second evaluation): held
    (700.0, 700.0, False),  # falling (2 / 1)
    (700.0001, 700.0, True),  # jitter rise: the previous timestep, held
    (699.9999, 700.0, True),  # jitter fall: same
    (400.0, 400.0, False),  # (3 / 1)
    (554.9999, f32(554.9999), False),  # real rise: run 1 ended after 3 steps != 4 (1 / 2)
    (555.0, f32(554.9999), True),  # jitter rise: NOT a new run
    (300.0, 300.0, False),
    (200.0, 200.0, False),
    (100.0, 100.0, False),  # (4 / 2)
    (999.0, 999.0, False),  # real rise: run 2 ended after 4 steps (1 / 3)
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_script_by_hand_and_bitwise_vs_reference(backend):
    fns, ref = impls(backend), impls("eager")
    st, aux = ops.new_state(16), ops.new_aux()
    st_r, aux_r = ops.new_state(16), ops.new_aux()
    for i, (t, want_t, want_hold) in enumerate(SCRIPT):
        t_op, hold, flag = _step(fns, t, st, aux, 4)
        t_r, hold_r, flag_r = _step(ref, t, st_r, aux_r, 4)
        assert t_op.shape == (1,) and t_op.dtype == torch.float32, (i, t_op)
        assert hold.shape == () and hold.dtype == torch.bool, (i, hold)
        assert t_op.item() == want_t and bool(hold) == want_hold, (i, t, t_op.item(), bool(hold))
        if want_hold:
            assert bool(flag), f"call {i}: a held call must compute"
        assert torch.equal(bits(t_op), bits(t_r)) and bool(hold) == bool(hold_r) and bool(flag) == bool(flag_r), i
        assert torch.equal(bits(st), bits(st_r)), f"call {i}: state differs from the reference"
        assert torch.equal(bits(aux), bits(aux_r)), f"call {i}: aux {aux.tolist()} vs {aux_r.tolist()}"
    assert aux[R.AUX_REPEATS] == 4 and aux[R.AUX_JITTER] == 3
    assert aux[R.AUX_LAST_RUN_STEPS] == 4 and aux[R.AUX_RUN_LENGTH_MISMATCHES] == 1
    assert st[R.N_RUNS] == 3 and st[R.STEP] == 1 and st[R.PREV_T] == 999.0
    # run 2 (554.9999 .. 100): 4 decisions, not split by the 555.0 jitter
    assert aux_r[R.AUX_LAST_RUN_STEPS] == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_counts_mismatch_only_with_num_steps_and_reads_any_timestep_dtype(backend):
    fns = impls(backend)
    st, aux = ops.new_state(8), ops.new_aux()
    for t in (torch.tensor(900), torch.tensor([[800.0]], dtype=torch.float64), torch.tensor([900.0, 1.0])):
        t_op, hold = fns["timestep_guard"](t, st, aux, RTOL, ATOL, 0)
        fns["cache_decision"](SUMS, t_op, COEFFS, st, 0.2, 1, 0, 0, hold)
    assert aux.tolist() == [0.0, 2.0, 0.0, 0.0]  # run of 2 ended; num_steps = 0 counts no mismatch
    t_op, hold = fns["timestep_guard"](torch.tensor([900.0]), st, aux, RTOL, ATOL, 0)
    assert t_op.item() == 900.0 and bool(hold) and aux[R.AUX_REPEATS] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_repeat_before_any_step_is_not_held(backend):
    """``same`` with STEP == 0 (the state was reset but kept PREV_T) is not a repeat."""
    fns = impls(backend)
    st, aux = ops.new_state(8), ops.new_aux()
    st[R.PREV_T] = 500.0
    t_op, hold = fns["timestep_guard"](torch.tensor([500.0]), st, aux, RTOL, ATOL, 0)
    assert t_op.item() == 500.0 and not bool(hold) and aux.tolist() == [0.0, 0.0, 0.0, 0.0]


# -------------------------------------------------------------------------- hold paths
def _mod_inputs(dtype, prev_dtype, transposed=False):
    g = torch.Generator().manual_seed(3)
    B, N, D = 2, 17, 97
    x = torch.randn(B, D, N, generator=g).transpose(1, 2) if transposed else torch.randn(B, N, D, generator=g)
    return (
        x.to(dtype),
        (0.1 * torch.randn(B, D, generator=g)).to(dtype),
        (0.1 * torch.randn(B, D, generator=g)).to(dtype),
        torch.randn(B, N, D, generator=g).to(prev_dtype),
    )


def _cpp_variants(backend):
    """Each CPU kernel variant this machine runs (C++), else one pass."""
    if backend != "cpp":
        yield None
        return
    from fastcache import _C

    previous = _C.cpu_capability()
    try:
        for name in _C.supported_cpu_capabilities():
            _C.set_cpu_capability(name)
            yield name
    finally:
        _C.set_cpu_capability(previous)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, prev_dtype, transposed",
    [
        (torch.float32, torch.float32, False),
        (torch.bfloat16, torch.bfloat16, True),
        (torch.float32, torch.float16, False),
    ],
    ids=["fp32", "bf16-strided", "fp32-prev-fp16"],
)
def test_modulated_hold(backend, dtype, prev_dtype, transposed):
    fn = impls(backend)["modulated_rel_l1_sums"]
    x, shift, scale, prev0 = _mod_inputs(dtype, prev_dtype, transposed)
    for _ in _cpp_variants(backend):
        p_none, p_false, p_true = prev0.clone(), prev0.clone(), prev0.clone()
        s_none = fn(x, shift, scale, 1e-6, p_none)
        s_false = fn(x, shift, scale, 1e-6, p_false, torch.tensor(False))
        s_true = fn(x, shift, scale, 1e-6, p_true, torch.tensor(True))
        assert not torch.equal(bits(p_none), bits(prev0)), "control: without hold prev is written"
        assert torch.equal(bits(s_false), bits(s_none)) and torch.equal(bits(p_false), bits(p_none))
        assert torch.equal(bits(s_true), bits(s_none)), "held: the sums are still computed"
        assert torch.equal(bits(p_true), bits(prev0)), "held: prev must not change"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("write_prev", [True, False])
def test_rel_l1_hold(backend, write_prev):
    fn = impls(backend)["rel_l1_sums"]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 40, 7, generator=g)
    prev0 = torch.randn(2, 3, 40, 7, generator=g)
    for _ in _cpp_variants(backend):
        p_none, p_false, p_true = prev0.clone(), prev0.clone(), prev0.clone()
        s_none = fn(x, p_none, write_prev)
        s_false = fn(x, p_false, write_prev, torch.tensor(False))
        s_true = fn(x, p_true, write_prev, torch.tensor(True))
        assert torch.equal(bits(p_none), bits(x if write_prev else prev0))  # control
        assert torch.equal(bits(s_false), bits(s_none)) and torch.equal(bits(p_false), bits(p_none))
        assert torch.equal(bits(s_true), bits(s_none)) and torch.equal(bits(p_true), bits(prev0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decision_hold_keeps_state_and_computes(backend):
    fn = impls(backend)["cache_decision"]
    st = ops.new_state(8)
    for t in (999.0, 900.0):  # mid-run: the next decision would skip
        fn(SUMS, torch.tensor([t]), COEFFS, st, 0.2, 1, 0, 0)
    s_none, s_false, s_true = st.clone(), st.clone(), st.clone()
    t = torch.tensor([800.0])
    f_none = fn(SUMS, t, COEFFS, s_none, 0.2, 1, 0, 0)
    f_false = fn(SUMS, t, COEFFS, s_false, 0.2, 1, 0, 0, torch.tensor(False))
    f_true = fn(SUMS, t, COEFFS, s_true, 0.2, 1, 0, 0, torch.tensor(True))
    assert not bool(f_none), "control: this step skips without hold"
    assert not torch.equal(bits(s_none), bits(st)), "control: a decision writes the state"
    assert bool(f_false) == bool(f_none) and torch.equal(bits(s_false), bits(s_none))
    assert bool(f_true) and f_true.shape == () and f_true.dtype == torch.bool
    assert torch.equal(bits(s_true), bits(st)), "held: the state must be left exactly as it was"


@pytest.mark.parametrize("backend", BACKENDS)
def test_hold_must_be_one_bool(backend):
    fns = impls(backend)
    x = torch.zeros(1, 2, 4)
    with pytest.raises((ValueError, RuntimeError), match="hold must be a 0-dim bool"):
        fns["rel_l1_sums"](x, x.clone(), True, torch.tensor([1.0]))
    with pytest.raises((ValueError, RuntimeError), match="hold must be a 0-dim bool"):
        fns["cache_decision"](
            SUMS, torch.tensor([1.0]), COEFFS, ops.new_state(4), 0.2, 1, 0, 0, torch.ones(2, dtype=torch.bool)
        )


def test_public_wrappers_check_their_arguments():
    st = ops.new_state(4)
    with pytest.raises(ValueError, match="aux must be"):
        ops.timestep_guard(torch.tensor([1.0]), st, torch.zeros(3))
    with pytest.raises(ValueError, match="new_state"):
        ops.timestep_guard(torch.tensor([1.0]), torch.zeros(4), ops.new_aux())
    with pytest.raises(ValueError, match="hold must be"):
        ops.cache_decision(SUMS, torch.tensor([1.0]), COEFFS, st, 0.2, hold=torch.tensor(1.0))
    with pytest.raises(ValueError, match="rtol and atol"):
        ops.timestep_guard(torch.tensor([1.0]), st, ops.new_aux(), rtol=-1.0)


# -------------------------------------------------------------------------- host reads
def _guarded_steps(fns, n=6):
    x, shift, scale, prev = _mod_inputs(torch.float32, torch.float32)
    st, aux = ops.new_state(16), ops.new_aux()
    for t in (999.0, 999.0, 800.0, 800.00001, 600.0, 999.0)[:n]:
        t_op, hold = fns["timestep_guard"](torch.tensor([t]), st, aux, RTOL, ATOL, 3)
        sums = fns["modulated_rel_l1_sums"](x + t / 1000, shift, scale, 1e-6, prev, hold)
        fns["rel_l1_sums"](x, prev.clone(), True, hold)
        fns["cache_decision"](sums, t_op, COEFFS, st, 0.2, 1, 0, 0, hold)
    return st, aux


@pytest.mark.parametrize("path", ["dispatcher", "eager"])
def test_no_host_read_in_guard_and_hold_paths(path):
    """Through the dispatcher (C++ on CPU when built) and the reference: no read at all."""
    if path == "dispatcher":
        f = torch.ops.fastcache
        fns = {n: getattr(f, n) for n in ("timestep_guard", "modulated_rel_l1_sums", "rel_l1_sums", "cache_decision")}
    else:
        fns = impls("eager")
    mode = HostReadMode()
    with mode:
        _guarded_steps(fns)
    assert mode.reads == []
    # control: the detector does see a read
    with mode:
        bool(torch.tensor(True))
    assert len(mode.reads) == 1


def test_no_host_read_in_the_triton_launchers(monkeypatch):
    """The launchers (kernels/) never turn a tensor into a Python value: the interpreter
    itself moves data around, so only calls made from kernels/ count."""
    pytest.importorskip("triton")
    from fastcache.kernels import LAUNCHERS, decision

    kdir = os.path.dirname(os.path.abspath(decision.__file__))
    seen = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            if sys._getframe(1).f_code.co_filename.startswith(kdir):
                seen.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    _guarded_steps(LAUNCHERS)
    monkeypatch.undo()
    assert seen == []


# --------------------------------------------------------------------- opcheck, compile
def test_guard_cpu_kernel_is_the_extensions():
    action, why = cpp_expectation(ops.BACKEND.as_dict(), os.environ)
    if action == "skip":
        pytest.skip(why)
    dump = torch._C._dispatch_dump("fastcache::timestep_guard")
    cpu_line = next(line for line in dump.splitlines() if line.startswith("CPU"))
    assert "bindings.cpp" in cpu_line, f"the CPU kernel of fastcache::timestep_guard is not the extension's: {cpu_line}"


def _opcheck_samples():
    x, shift, scale, prev = _mod_inputs(torch.float32, torch.float32)
    st = ops.new_state(8)
    st[R.PREV_T], st[R.STEP], st[R.N_RUNS] = 500.0, 3.0, 1.0
    out = []
    for h in (torch.tensor(True), torch.tensor(False)):
        out += [
            ("modulated_rel_l1_sums", (x, shift, scale, 1e-6, prev.clone(), h)),
            ("rel_l1_sums", (x, prev.clone(), True, h)),
            ("cache_decision", (SUMS, torch.tensor([400.0]), COEFFS, st.clone(), 0.2, 1, 0, 5, h)),
        ]
    for t in (500.0, 500.001, 400.0, 900.0):
        out.append(("timestep_guard", (torch.tensor([t]), st.clone(), ops.new_aux(), RTOL, ATOL, 4)))
    return out


@pytest.mark.parametrize("name, args", _opcheck_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.fastcache, name).default, args)


def _guarded_decision(x, shift, scale, prev, t, coeffs, state, aux):
    t_op, hold = ops.timestep_guard(t, state, aux, num_steps=5)
    sums = ops.modulated_rel_l1_sums(x, shift, scale, prev, hold=hold)
    flag = ops.cache_decision(sums, t_op, coeffs, state, 0.2, num_steps=5, hold=hold)
    return flag, hold, flag & ~hold, sums


@pytest.mark.compile
def test_guard_indicator_decision_compile_fullgraph():
    def inputs():
        x, shift, scale, prev = _mod_inputs(torch.float32, torch.float32)
        return dict(
            shift=shift, scale=scale, prev=prev, coeffs=COEFFS.clone(), state=ops.new_state(16), aux=ops.new_aux()
        )

    eager_kw, comp_kw = inputs(), inputs()
    x = _mod_inputs(torch.float32, torch.float32)[0]
    explain = torch._dynamo.explain(_guarded_decision)(x, t=torch.tensor([999.0]), **inputs())
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(_guarded_decision, fullgraph=True)
    holds = []
    for i, t in enumerate((999.0, 999.0, 800.0, 800.0001, 600.0, 400.0, 999.0)):
        xi = x + 0.01 * i
        e = _guarded_decision(xi, t=torch.tensor([t]), **eager_kw)
        c = compiled(xi, t=torch.tensor([t]), **comp_kw)
        assert [bool(v) for v in e[:3]] == [bool(v) for v in c[:3]], i
        torch.testing.assert_close(c[3], e[3], rtol=1e-5, atol=1e-5)
        holds.append(bool(c[1]))
    assert holds == [False, True, False, True, False, False, False]
    for k in ("prev", "state", "aux"):
        torch.testing.assert_close(comp_kw[k], eager_kw[k], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert eager_kw["aux"].tolist() == [2.0, 4.0, 1.0, 1.0]
