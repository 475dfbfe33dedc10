"""TeaCache parity on every supported model, over 20-step loops with real schedulers.

* threshold > 0: decision trace and output equal the host-side reference
  (tests/support/teacache_reference.py) written from docs/methods.md;
* a second run resets automatically.

(Threshold 0 — every step computed, bitwise the unpatched model — is TeaCacheConfig's
never-skip contract on every family: tests/contracts/test_methods.py::
test_never_skip_setting_is_bitwise_the_model[TeaCacheConfig-*].)
"""

import pytest
import torch
from support.teacache_reference import ReferenceTeaCache
from support.zoo import CASES, TEACACHE_THRESHOLDS

import fastcache

STEPS = 20
# thresholds chosen so that every model skips a good share of steps with its coefficients
THRESHOLDS = TEACACHE_THRESHOLDS


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return CASES[request.param]()


def test_matches_host_reference(case):
    thr = THRESHOLDS[case.name]
    spec = fastcache.specs.find_spec(case.model)
    coeffs = spec.teacache_coefficients

    ref = ReferenceTeaCache(case.name, case.model, thr, STEPS, coeffs)
    try:
        expected = case.sample(steps=STEPS)
    finally:
        ref.remove()

    with fastcache.patched(case.model, fastcache.TeaCacheConfig(threshold=thr, num_steps=STEPS)):
        out = case.sample(steps=STEPS)
        st = fastcache.stats(case.model)["contexts"]["default"]

    assert st["timeline"] == ref.trace
    skipped = STEPS - sum(ref.trace)
    assert skipped >= 4, f"the test threshold should make {case.name} skip steps; skipped {skipped}"
    assert st["skipped"] == skipped
    assert ref.trace[0] and ref.trace[-1]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_second_run_resets_automatically(case):
    thr = THRESHOLDS[case.name]
    with fastcache.patched(case.model, fastcache.TeaCacheConfig(threshold=thr, num_steps=STEPS)):
        a = case.sample(steps=STEPS)
        s1 = fastcache.stats(case.model)["contexts"]["default"]
        b = case.sample(steps=STEPS)
        s2 = fastcache.stats(case.model)["contexts"]["default"]
    assert torch.equal(a, b)
    assert s1["timeline"] == s2["timeline"]
    assert (s1["runs"], s2["runs"]) == (1, 2)
