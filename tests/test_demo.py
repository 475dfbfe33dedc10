"""The README's main command (``./dev demo``), end to end on its default path at a small batch.

Settings: the default 50 DDIM steps and budget K = 17 (so the schedule comes from the
shipped profile), 2 digits, seed 0, one timed round.

Quality bounds, measured on the project's CPU machine (one intra-op thread, as the tests
run; the demo's own functions at these settings, seeds 0-5):

* searched schedule 31.4-38.5 dB (seed 0: 38.54), TaylorSeer's fixed placement 28.9-34.7
  dB (seed 0: 33.63): the schedule ahead on every seed, by 2.5-5.0 dB (seed 0: 4.9);
* TeaCache at 17 computed steps 17.0-24.7 dB (seed 0: 19.29), plain 17-step DDIM (same
  compute, no cache) 16.8-24.1 dB (seed 0: 18.53): TeaCache ahead on every seed, by
  0.1-0.8 dB (seed 0: 0.76);
* broken schedules (the searched plan, seed 0, worst seed in brackets): forecasts
  replaced by reuse of the last computed step 20.51 dB (25.75); a forecast that adds
  nothing (``ops.taylor_forecast`` returning zeros) 7.50 dB (7.72); a history stored at
  step 0 and never refreshed 13.60 dB (15.40).

So ``PSNR_MIN_DB = 28`` passes the correct schedule and TaylorSeer at seed 0 by 10.5 and
5.6 dB (by 3.4 and 0.9 dB on their worst seeds) and fails every broken variant on every
seed (the best of them 25.75 dB); the orderings asserted below held on all six seeds.
"""

import math
import time
from pathlib import Path

import pytest
import torch

import fastcache
import fastcache.models
from fastcache import demo
from fastcache.models import load_digits_dit, psnr
from fastcache.tuning.cli import digits_runs

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

STEPS, BUDGET, BATCH, SEED = 50, 17, 2, 0
PSNR_MIN_DB = 28.0  # see the module docstring for the measurement behind it
METHODS = ["uncached", "teacache", "taylorseer", "schedule", f"ddim {BUDGET}"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = demo.run(steps=STEPS, budget=BUDGET, batch=BATCH, out=out, seed=SEED, repeats=1)
    return r, out


def test_shipped_profile_fits_the_shipped_model():
    # The profile the demo reads is made for the shipped weights: fingerprint (class,
    # config, parameter shapes), and the weights themselves: the prior's step-0 means
    # recorded again on the calibration runs' first step (seeds 1000+k, 2 x 8 digits; a
    # 2-step run starts at the same t = 999 from the same noise) are the stored ones.
    # (Measured: equal to the bit; one block's MLP weight scaled by 1.01 moves them by 0.027.)
    model = load_digits_dit()
    prof = fastcache.Profile.load(demo.SHIPPED_PROFILE)
    prof.check(model)
    assert prof.num_steps == 50 and prof.meta["runs"] == 2
    assert prof.schedule(BUDGET).plan.count("C") == BUDGET
    assert prof.schedules[BUDGET]["methods"] == ["reuse", "taylor1", "taylor2"]
    step0 = [fastcache.calibrate(model, r, progress=False).prior[0] for r in digits_runs(model, 2, 2, 8)]
    torch.testing.assert_close((step0[0] + step0[1]) / 2, prof.prior[0], rtol=1e-4, atol=1e-4)
    # ...and setup.py ships it with the package
    setup = (Path(__file__).parent.parent / "setup.py").read_text()
    assert '"weights/*.safetensors"' in setup and demo.SHIPPED_PROFILE.suffix == ".safetensors"
    assert demo.SHIPPED_PROFILE.parent == Path(fastcache.models.WEIGHTS_DIR)


def test_rows_and_table(result):
    r, out = result
    assert [row.name for row in r.rows] == METHODS
    assert r.schedule_source == f"profile {demo.SHIPPED_PROFILE}"
    for row in r.rows:
        assert row.total == STEPS and row.wall_s > 0 and row.speedup > 0
        # the PSNR in the table is the PSNR of the returned images
        if row.name != "uncached":
            assert row.psnr_db == pytest.approx(
                float(psnr(r.images[row.name], r.images["uncached"], reduction="mean")), abs=1e-9
            )
    computed = {row.name: row.computed for row in r.rows}
    assert computed == {"uncached": STEPS, "teacache": BUDGET, "taylorseer": BUDGET, "schedule": BUDGET, "ddim 17": 17}
    table = (out / "demo_table.txt").read_text()
    assert table == r.table + "\n"
    lines = table.splitlines()
    assert len(lines) == 2 + len(r.rows)
    for line, row in zip(lines[2:], r.rows):
        cells = line.split()
        assert f"{row.computed}/{STEPS}" in cells
        want = "exact" if row.psnr_db == math.inf else f"{row.psnr_db:.2f}"
        assert cells[-1] == want and cells[-2] == f"{row.speedup:.2f}x"
    assert f"threshold {r.threshold:.3g}" in lines[3]


def test_timelines_are_what_ran(result):
    r, _ = result
    tl = r.timelines
    assert set(tl) == {"uncached", "teacache", "taylorseer", "schedule"}
    assert tl["uncached"] == "C" * STEPS
    assert tl["schedule"] == r.plan == fastcache.Profile.load(demo.SHIPPED_PROFILE).schedules[BUDGET]["plan"]
    assert tl["taylorseer"] == r.fixed_plan
    assert r.fixed_plan.startswith("CCC") and r.fixed_plan.endswith("C")  # 3 warm-up steps, the last step
    assert set(r.fixed_plan) == {"C", "2"}
    gaps = [len(g) for g in r.fixed_plan[3:].split("C")[:-1]]
    assert max(gaps) - min(gaps) <= 1, r.fixed_plan  # evenly spaced after the warm-up
    t = tl["teacache"]
    assert set(t) <= {"C", "R"} and t[0] == t[-1] == "C"  # step 0 and (num_steps) the last step compute
    assert t.count("C") == BUDGET
    # the threshold is the one of the trace that reached K; its count is the run's
    assert (r.threshold, BUDGET) in r.teacache_trace
    assert all(c.count("C") == BUDGET for name, c in tl.items() if name != "uncached")


def test_quality(result):
    r, _ = result
    db = {row.name: row.psnr_db for row in r.rows}
    base = r.images["uncached"]
    assert all(im.shape == base.shape == (BATCH, 1, 16, 16) for im in r.images.values())
    assert all(math.isfinite(v) for n, v in db.items() if n != "uncached"), db
    assert db["schedule"] > PSNR_MIN_DB and db["taylorseer"] > PSNR_MIN_DB, db
    assert db["schedule"] > db["taylorseer"], db  # the search's point, at the same K
    assert db["teacache"] > db[f"ddim {BUDGET}"], db  # caching beats fewer steps at the same compute


def test_uncached_row_is_exact(result):
    # "exact": the uncached images are what the plain model samples for this seed, bit for bit.
    r, _ = result
    again = demo._sample(load_digits_dit(), torch.arange(BATCH) % 10, STEPS, SEED, announce=False)
    assert torch.equal(again, r.images["uncached"])


def test_output_files_decode(result):
    r, out = result
    # figure sizes in demo.py at 110 dpi: images (0.5 in per digit + 2.4 in) x (0.8 in per
    # method + 0.4 in); timeline max(6 in, 0.16 in per step + 2 in) x (0.5 in per method + 1 in)
    expected = {
        "demo_images.png": (round((0.5 * BATCH + 2.4) * 110), round((0.8 * 5 + 0.4) * 110)),
        "demo_timeline.png": (round((0.16 * STEPS + 2.0) * 110), round((0.5 * 4 + 1.0) * 110)),
    }
    for f, size in expected.items():
        with Image.open(out / f) as im:
            im.load()  # decodes the whole file
            assert im.format == "PNG" and im.size == size, (f, im.size)
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100, f"{f} looks blank (grey levels {lo}..{hi})"
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"


def test_searches_when_the_profile_has_no_schedule(tmp_path):
    # 6 steps: the shipped profile (50 steps) holds none, so the demo calibrates and
    # searches on the tuning command's calibration runs, then compares at K = 3.
    r = demo.run(steps=6, budget=3, batch=1, out=tmp_path, seed=0, repeats=1, max_evals=2)
    assert r.schedule_source.startswith("searched here (2 evaluations")
    assert r.plan.count("C") == 3 and len(r.plan) == 6 and r.timelines["schedule"] == r.plan
    assert {row.name: row.computed for row in r.rows}["taylorseer"] == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "2"], "--steps 2: must be >= 3"),
        (["--budget", "50"], "--budget 50: must be in [2, 49]"),
        (["--steps", "20", "--budget", "1"], "--budget 1: must be in [2, 19]"),
        (["--batch", "0"], "--batch 0: must be >= 1"),
        (["--seed", "-1"], "--seed -1: must be >= 0"),
        (["--repeats", "0"], "--repeats 0: must be >= 1"),
        (["--max-evals", "0"], "--max-evals 0: must be >= 1"),
        (["--threads", "0"], "--threads 0: must be >= 1"),
        (["--profile", "/nonexistent/p.safetensors"], "--profile /nonexistent/p.safetensors: no such file"),
        (["--out", __file__], f"--out {__file__}: is a file"),
    ],
)
def test_bad_arguments_refused_before_work(argv, message, monkeypatch, capsys):
    def no_model():
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(demo, "load_digits_dit", no_model)
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2 and time.perf_counter() - t0 < 5
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err


def test_profile_for_another_model_refused(tmp_path, monkeypatch):
    # A profile whose fingerprint is not the model's is refused before any sampling.
    prof = fastcache.Profile.load(demo.SHIPPED_PROFILE)
    prof.meta["config_hash"] = "0" * 16
    path = prof.save(tmp_path / "other.safetensors")
    monkeypatch.setattr(demo, "sample_digits", lambda *a, **k: pytest.fail("sampled with a mismatched profile"))
    with pytest.raises(ValueError, match="this profile was made for DiT"):
        demo.run(out=tmp_path / "out", profile=path)
