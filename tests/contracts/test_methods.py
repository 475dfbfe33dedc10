"""The contracts every method keeps on every family it supports, as one parametrized suite
over (method x family) from ``support.methods.METHODS`` and ``support.zoo.CASES``: a new
method or family gets all of them by adding one entry.

1. its config is frozen, round-trips through ``to_dict`` / ``from_dict`` and refuses a bad value;
2. at its never-skip setting the patched model is bitwise the unpatched one;
3. a repeated call (the same timestep again: Heun, CFG as two calls) computes in full and
   leaves the cache as it was (the run around it is unchanged);
4. eager host reads: at most one per step, none with the steps announced (static schedules);
5. ``torch.compile(fullgraph=True)`` traces it with 0 graph breaks and gives the eager result
   (a method whose own test file already compiles its loop on the same family, checking at
   least as much, names that test in ``Method.compiled_by``: it is not compiled twice).
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from support.hostreads import HostReadMode
from support.methods import METHODS
from support.zoo import CASES

import fastcache

STEPS = 6
PAIRS = [(m, f) for m in sorted(METHODS) for f in sorted(CASES) if METHODS[m].supports(f)]
_BUILT: dict = {}


def _case(family):
    """The family's tiny case, its uncached output and a profile of it (built once)."""
    if family not in _BUILT:
        case = CASES[family]()
        ref = case.sample(steps=STEPS, seed=2)
        profile = fastcache.calibrate(case.model, lambda: [case.sample(steps=STEPS, seed=1)], progress=False)
        _BUILT[family] = (case, ref, profile)
    return _BUILT[family]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_config_is_frozen_round_trips_and_refuses_bad_values(method):
    m = METHODS[method]
    profile = _case("fastcache-dit")[2] if m.needs_profile else None
    cfg = m.caching(profile, STEPS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kind_field = 1  # noqa: B010  (any attribute: the dataclass is frozen)
    if not m.needs_profile:  # a profile is a tensor file: its configs round-trip by path (test_profile)
        assert fastcache.CacheConfig.from_dict(cfg.to_dict()) == cfg
    ((field, bad),) = m.invalid.items()
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(cfg, **{field: bad})


@pytest.mark.parametrize("method,family", PAIRS)
def test_never_skip_setting_is_bitwise_the_model(method, family):
    case, ref, profile = _case(family)
    with fastcache.patched(case.model, METHODS[method].never_skip(profile, STEPS)):
        out = case.sample(steps=STEPS, seed=2)
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert torch.equal(out, ref)
    assert st.get("skipped", 0) == 0 and st.get("computed_fraction", 1.0) == 1.0, st


@pytest.mark.parametrize("method,family", [p for p in PAIRS if p[0] != "TGateConfig"])
def test_a_repeated_call_computes_and_leaves_the_cache_as_it_was(method, family):
    """Every step's call made twice, the second with other latents: the second call is
    the unpatched model's output, and the run is the run without the repeats. (T-GATE
    refuses CFG as two calls by design: tests/runtime/test_tgate.py.)"""
    case, _, profile = _case(family)
    m = case.model
    cfg = METHODS[method].caching(profile, STEPS)
    with fastcache.patched(m, cfg):
        plain = case.sample(steps=STEPS, seed=2)
    repeats = []

    def again(i, out, kw):
        with torch.no_grad():
            got = case.output(m(**{**kw, case.stream: kw[case.stream] * 0.5}))
        repeats.append((got, kw))

    with fastcache.patched(m, cfg):
        out = case.sample(steps=STEPS, seed=2, after_call=again)
    assert torch.equal(out, plain)
    with torch.no_grad():
        for got, kw in repeats:
            assert torch.equal(got, case.output(m(**{**kw, case.stream: kw[case.stream] * 0.5})))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_eager_host_reads_per_step(method):
    """At most one read per step (the decision flag); none when the step is announced and
    the schedule is static."""
    family = next(f for f in sorted(CASES) if METHODS[method].supports(f))
    case, _, profile = _case(family)
    m = case.model
    cfg = METHODS[method].caching(profile, STEPS)
    for announce in (False, True):
        with fastcache.patched(m, cfg):
            ctx = (lambda i: fastcache.context(m, "default", step_index=i)) if announce else None
            mode = HostReadMode()
            with mode:
                case.sample(steps=STEPS, seed=2, context=ctx)
        ours = [r for r in mode.reads if r is not None]
        limit = 0 if announce and METHODS[method].static else STEPS
        assert len(ours) <= limit, (announce, ours)


def _compile_family(method):
    return "fastcache-dit" if METHODS[method].supports("fastcache-dit") else "diffusers-pixart"


@pytest.mark.parametrize("method", sorted(m for m in METHODS if METHODS[m].compiled_by))
def test_a_compile_contract_checked_elsewhere_names_a_compile_test_of_the_method_on_its_family(method):
    """``compiled_by`` names a fullgraph compile test of the method, on the family this suite
    would compile it on (renaming or re-parametrizing that test must update the name)."""
    import ast
    from pathlib import Path

    path, _, test = METHODS[method].compiled_by.partition("::")
    func, _, ident = test.partition("[")
    src = (Path(__file__).parents[2] / path).read_text()
    fn = next((n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == func), None)
    assert fn is not None, f"{path} defines no {func}"
    body = ast.get_source_segment(src, fn)
    marked = "pytest.mark.compile" in [ast.unparse(d) for d in fn.decorator_list]
    assert marked or "\npytestmark = pytest.mark.compile\n" in src, f"{path}::{func} is not marked compile"
    assert "torch.compile(" in body and "fullgraph=True" in body, f"{path}::{func} compiles nothing fullgraph"
    assert method in src, f"{path} does not configure {method}"
    family = _compile_family(method)
    builder = {"fastcache-dit": "reference_dit_case", "diffusers-pixart": "pixart"}[family]
    assert family in ident or builder in body, f"{path}::{func}: not on {family}"


@pytest.mark.compile
@pytest.mark.parametrize("method", sorted(m for m in METHODS if not METHODS[m].compiled_by))
def test_fullgraph_compile_matches_eager(method):
    family = _compile_family(method)
    case, _, profile = _case(family)
    m = case.model
    cfg = METHODS[method].caching(profile, STEPS)
    with fastcache.patched(m, cfg):
        eager = case.sample(steps=STEPS, seed=2)
    torch._dynamo.reset()
    with fastcache.patched(m, cfg):
        case.sample(steps=1, seed=2)  # allocate the buffers eagerly (one trace less)
        fastcache.reset(m)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
        with contextlib.nullcontext():
            out = case.sample(model=compiled, steps=STEPS, seed=2)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
