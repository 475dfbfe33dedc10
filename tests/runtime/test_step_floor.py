"""Every step at its floor: what a forecast / reused step and a computed step cost in
dispatched ops (a TorchDispatchMode counter: deterministic, the kernel launches of an
eager GPU call), and that the fused whole-stack path gives the per-block path's bits.

The floor of a forecast or reused step is the model's own work that no cache can skip:
the layers outside the blocks and every block's AdaLN modulation (this step's gates).
:func:`_floor_model` measures it: each block reduced to its interior program run with an
executor that drops every branch and residual. A forecast step may add a constant (the
step's bookkeeping and one fused op per stream), never a per-block cost; a computed step
may add 2% plus a constant (the history update of every slot is one op).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from support.hostreads import HostReadMode
from support.zoo import dit_case, pixart_case
from torch.utils._python_dispatch import TorchDispatchMode

import fastcache
from fastcache.interior import base as interior_base

FAR = 10**6  # an interval no run reaches: every step after step 0 is forecast / reused
#: ops a forecast / reused step may add to its floor, whatever the depth (the host step's
#: bookkeeping: the step offset and stats counters, and one fused op per stream)
FORECAST_CONSTANT = 12
COMPUTED_CONSTANT = 24


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops(fn) -> int:
    with _Count() as c, torch.no_grad():
        fn()
    return c.n


class _DropAll:
    def begin_block(self, block):
        self.block = block

    def residual(self, name, fn, xs, gates):
        return xs


def _floor_model(model):
    """``model`` with every block reduced to its modulation (DiT / PixArt blocks return the
    hidden states)."""
    from fastcache.interior import program_for

    m = copy.deepcopy(model)
    for blk in m.transformer_blocks:
        prog, sig = program_for(blk), inspect.signature(type(blk).forward)

        def fwd(*args, _blk=blk, _prog=prog, _sig=sig, **kw):
            b = _sig.bind(_blk, *args, **kw)
            b.apply_defaults()
            call = dict(b.arguments)
            return _prog.run(_blk, call, {"hidden_states": call["hidden_states"]}, _DropAll())["hidden_states"]

        blk.forward = fwd
    return m


def _cases(depths=(6, 12)):
    out = []
    for L in depths:
        out.append(("dit", L, dit_case(num_layers=L)))
        out.append(("pixart", L, _pixart(L)))
    return out


def _pixart(L):
    case = pixart_case()
    if L != len(case.model.transformer_blocks):
        blocks = case.model.transformer_blocks
        case.model.transformer_blocks = torch.nn.ModuleList([copy.deepcopy(blocks[i % len(blocks)]) for i in range(L)])
    return case


CONFIGS = {
    "taylorseer": lambda: fastcache.TaylorSeerConfig(interval=FAR, warmup_steps=1, order=2),
    "schedule": lambda: fastcache.ScheduleConfig.from_steps((0,), 8, order=1),
    "fora": lambda: fastcache.FORAConfig(interval=FAR, warmup_steps=1),
}


def _step(case, model, i, num_steps=None):
    x = case.latents(torch.Generator().manual_seed(1))
    kw = case.inputs(x, torch.tensor(900.0 - 10 * i))
    with fastcache.context(model, "default", step_index=i, num_steps=num_steps):
        return case.output(model(**kw))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_forecast_step_costs_its_floor_plus_a_constant_not_per_block(method):
    excess = {}
    for fam, L, case in _cases():
        floor = _floor_model(case.model)
        x = case.latents(torch.Generator().manual_seed(1))
        n_floor = _ops(lambda f=floor, c=case, x=x: f(**c.inputs(x, torch.tensor(900.0))))
        m = copy.deepcopy(case.model)
        n = 8 if method == "schedule" else None
        with fastcache.patched(m, CONFIGS[method]()), torch.no_grad():
            _step(case, m, 0, n)
            _step(case, m, 1, n)  # the first forecast (one-time views, buffers)
            n_fc = _ops(lambda c=case, m=m, n=n: _step(c, m, 2, n))
            assert fastcache.stats(m)["contexts"]["default"]["computed"] == 1
        excess[(fam, L)] = n_fc - n_floor
        assert n_fc <= n_floor + FORECAST_CONSTANT, (fam, L, method, n_fc, n_floor)
    for fam in ("dit", "pixart"):  # the excess does not grow with the depth
        assert excess[(fam, 12)] == excess[(fam, 6)], (fam, excess)


@pytest.mark.parametrize("method", ["taylorseer", "schedule"])
def test_computed_step_costs_at_most_the_unpatched_call_plus_2pct(method):
    for fam, L, case in _cases(depths=(12,)):
        x = case.latents(torch.Generator().manual_seed(1))
        n_full = _ops(lambda c=case, x=x: c.model(**c.inputs(x, torch.tensor(900.0))))
        m = copy.deepcopy(case.model)
        cfg = (
            fastcache.TaylorSeerConfig(interval=1, warmup_steps=1, order=2)
            if method == "taylorseer"
            else fastcache.ScheduleConfig(plan="CCCC")
        )
        n = 4 if method == "schedule" else None
        with fastcache.patched(m, cfg), torch.no_grad():
            _step(case, m, 0, n)
            _step(case, m, 1, n)
            n_c = _ops(lambda c=case, m=m, n=n: _step(c, m, 2, n))
            assert fastcache.stats(m)["contexts"]["default"]["skipped"] == 0
        assert n_c <= 1.02 * n_full + COMPUTED_CONSTANT, (fam, L, method, n_c, n_full)


def _run(case, model, cfg, steps, num_steps=None):
    outs = []
    with fastcache.patched(model, cfg):
        case.sample(
            model=model,
            steps=steps,
            context=lambda i: fastcache.context(model, "default", step_index=i, num_steps=num_steps),
            per_step=lambda i, o: outs.append(o.clone()),
        )
    return outs


@pytest.mark.parametrize("fam", ["dit", "pixart"])
@pytest.mark.parametrize(
    "method, cfg, num_steps",
    [
        ("taylorseer", lambda: fastcache.TaylorSeerConfig(interval=3, warmup_steps=2, order=2), None),
        ("taylorseer-order0", lambda: fastcache.TaylorSeerConfig(interval=3, warmup_steps=1, order=0), None),
        ("fora", lambda: fastcache.FORAConfig(interval=3), None),
        ("schedule", lambda: fastcache.ScheduleConfig(plan="CC21C10C"), 8),
    ],
)
def test_fused_stack_equals_the_per_block_path_bitwise(fam, method, cfg, num_steps, monkeypatch):
    case = dit_case() if fam == "dit" else pixart_case()
    steps = num_steps or 8
    fused = _run(case, copy.deepcopy(case.model), cfg(), steps, num_steps)
    monkeypatch.setattr(interior_base, "ADDITIVE_FAMILIES", frozenset())  # every block through its program
    per_block = _run(case, copy.deepcopy(case.model), cfg(), steps, num_steps)
    assert len(fused) == len(per_block) == steps
    for i, (a, b) in enumerate(zip(fused, per_block)):
        assert torch.equal(a, b), (fam, method, i, (a - b).abs().max().item())


def test_fused_path_is_taken_and_reads_nothing_to_the_host(monkeypatch):
    case = dit_case()
    m = copy.deepcopy(case.model)
    calls = []
    orig = fastcache.ops.forecast_residual
    monkeypatch.setattr(fastcache.ops, "forecast_residual", lambda *a: calls.append(len(a[1])) or orig(*a))
    with fastcache.patched(m, fastcache.TaylorSeerConfig(interval=FAR, warmup_steps=1)), torch.no_grad():
        _step(case, m, 0)
        mode = HostReadMode()
        with mode:
            _step(case, m, 1)
            _step(case, m, 2)
    assert mode.reads == []
    K = 2 * len(case.model.transformer_blocks)  # attn + mlp per block, one stream
    assert calls == [K, K], calls
