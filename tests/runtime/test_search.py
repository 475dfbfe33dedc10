"""fastcache.search_threshold: the threshold that meets a target on the user's runs."""

from __future__ import annotations

import pytest
import torch

import fastcache
from fastcache.models import load_digits_dit, sample_digits
from fastcache.tuning.calibration import calibrate

STEPS = 10


@pytest.fixture(scope="module")
def digits():
    model = load_digits_dit()
    labels = torch.arange(2)
    runs = [
        (lambda k=k: sample_digits(model, labels + k, num_steps=STEPS, generator=torch.Generator().manual_seed(k)))
        for k in range(2)
    ]
    return model, runs


@pytest.mark.parametrize("method", ["teacache", "first_block"])
def test_search_meets_the_fraction_target_and_replays(digits, method):
    model, runs = digits
    res = fastcache.search_threshold(
        model, runs, method, target_fraction=0.6, progress=False, num_steps=STEPS, max_evals=6
    )
    with pytest.raises(ValueError, match="not patched"):
        fastcache.get_patch(model)  # every evaluation's patch was removed
    assert res.chosen.computed_fraction <= 0.6
    assert res.config.threshold == res.chosen.threshold
    assert len(res.trace) >= 2 and res.chosen in res.trace
    # every evaluated setting that meets the target has a PSNR no better than the chosen one
    assert all(e.psnr_db <= res.chosen.psnr_db for e in res.trace if e.computed_fraction <= 0.6)
    # a setting that missed the target was evaluated (the bracket), with a smaller threshold
    assert any(e.computed_fraction > 0.6 and e.threshold < res.chosen.threshold for e in res.trace)
    # replaying the chosen config gives the measured fraction (decisions are deterministic)
    with fastcache.patched(model, res.config) as h:
        fr = []
        for r in runs:
            h.reset()
            r()
            st = h.stats()["contexts"]["default"]
            fr.append(st.get("computed_fraction", st["computed"] / (st["computed"] + st["skipped"])))
    assert sum(fr) / len(fr) == pytest.approx(res.chosen.computed_fraction)
    assert "chosen" in str(res)


def test_search_uses_the_profile_polynomial(digits):
    model, runs = digits
    prof = fastcache.calibrate(model, lambda: [r() for r in runs], progress=False)
    res = fastcache.search_threshold(
        model, runs, "teacache", target_fraction=0.5, profile=prof, progress=False, num_steps=STEPS, max_evals=4
    )
    assert res.config.coefficients == prof.fit_teacache(4)
    assert res.chosen.computed_fraction <= 0.5


def test_search_reports_an_unreachable_target(digits):
    model, runs = digits
    with pytest.raises(ValueError, match="no first_block threshold tried meets"):
        # max_consecutive_skips=1 caps skipping at every other step: 0.3 is out of reach
        fastcache.search_threshold(
            model, runs[:1], "first_block", target_fraction=0.3, progress=False, max_evals=3, max_consecutive_skips=1
        )


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(method="nope", target_fraction=0.5), "unknown method"),
        (dict(target_fraction=0.5, target_speedup=2.0), "exactly one"),
        (dict(), "exactly one"),
        (dict(target_fraction=1.5), "must be in"),
        (dict(target_speedup=0.9), "must be > 1"),
        (dict(target_fraction=0.5, max_evals=1), "max_evals"),
        (dict(target_fraction=0.5, threshold_typo=1), "unexpected keyword"),
    ],
)
def test_search_refuses_bad_arguments(digits, kw, msg):
    model, runs = digits
    with pytest.raises((ValueError, TypeError), match=msg):
        fastcache.search_threshold(model, runs, progress=False, **kw)


def test_command_line_writes_profile_and_plot(tmp_path, capsys):
    import importlib

    cli = importlib.import_module("fastcache.tuning.cli")  # the `python -m fastcache.tuning` module
    out, png = tmp_path / "p.safetensors", tmp_path / "p.png"
    rc = cli.main(
        ["--steps", "6", "--runs", "1", "--batch", "2", "--method", "first_block", "--target-fraction", "0.8"]
        + ["--max-evals", "3", "--out", str(out), "--plot", str(png), "--no-progress"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "<- chosen" in text and "FirstBlockCacheConfig(threshold=" in text
    assert fastcache.Profile.load(out).num_steps == 6
    assert png.stat().st_size > 10_000
    # the command line is a module of its own: fastcache.calibrate is still the function
    assert fastcache.calibrate is calibrate
    model = load_digits_dit()
    prof = fastcache.calibrate(
        model,
        lambda: sample_digits(model, [1], num_steps=3, generator=torch.Generator().manual_seed(0)),
        progress=False,
    )
    assert prof.num_steps == 3
