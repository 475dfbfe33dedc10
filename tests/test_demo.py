"""The README's main command, end to end at small settings: its table, decisions, images and files.

Settings: 6 DDIM steps, 4 digits, CFG 3.0, seed 0, threshold 0.2 (about 15 s on 2 CPU cores).

Quality bound, measured on the project's CPU machine (C++ backend; demo.run with these
settings, seeds 0-5): the cached run computes 3 of 6 steps (timeline C s s C s C on every
seed) at 25.6-29.6 dB PSNR against the uncached images (seed 0: 28.75 dB). Broken caches
measured at the same settings, seed 0: a skip that adds no residual 16.8 dB, a residual
stored once at step 0 and never refreshed 23.8 dB; plain 3-step DDIM (the same compute,
no cache) 24.5 dB. So ``PSNR_MIN_DB = 26`` passes the correct cache with a 2.7 dB margin
and fails each of those.
"""

import math

import pytest
import torch

from fastcache import demo
from fastcache.models import load_digits_dit, psnr, sample_digits

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

STEPS, BATCH, THRESHOLD, SEED, CFG = 6, 4, 0.2, 0, 3.0
PSNR_MIN_DB = 26.0  # see the module docstring for the measurement behind it


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = demo.run(steps=STEPS, batch=BATCH, thresholds=[THRESHOLD], out=out, seed=SEED, cfg_scale=CFG, repeats=1)
    return r, out


def _labels():
    return torch.arange(BATCH) % 10  # the demo's labels


def test_rows_and_table(result):
    r, out = result
    assert [row[0] for row in r.rows] == ["uncached", f"teacache {THRESHOLD:g}"]
    name, computed, total, wall, speedup, db = r.rows[1]
    assert total == STEPS and wall > 0 and speedup > 0
    assert r.rows[0][1:3] == (STEPS, STEPS)
    # the PSNR in the table is the PSNR of the returned images
    assert db == pytest.approx(float(psnr(r.images[name], r.images["uncached"], reduction="mean")), abs=1e-9)
    table = (out / "demo_table.txt").read_text().splitlines()
    assert len(table) == 2 + len(r.rows)
    assert table[2].split()[:2] == ["uncached", f"{STEPS}/{STEPS}"] and table[2].split()[-1] == "exact"
    assert table[3].split()[:3] == ["teacache", f"{THRESHOLD:g}", f"{computed}/{STEPS}"]
    assert float(table[3].split()[-1]) == pytest.approx(db, abs=0.005)


def test_timeline_matches_counts_and_threshold(result):
    r, _ = result
    st = r.stats[THRESHOLD]
    timeline = st["timeline"]
    computed = r.rows[1][1]
    assert len(timeline) == st["steps"] == STEPS
    assert sum(timeline) == st["computed"] == computed
    assert st["skipped"] == STEPS - computed
    assert st["runs"] == 1  # one sampling run per repeat
    assert timeline[0] and timeline[-1], f"first and last step must be computed: {timeline}"
    assert not all(timeline), f"threshold {THRESHOLD} skipped nothing in {STEPS} steps: {timeline}"
    assert math.isnan(st["rel_l1"][0])  # no previous indicator at step 0
    # Between the forced first and last step, a step is computed exactly when the
    # accumulated rescaled distance reached the threshold (docs/methods.md, TeaCache).
    for s in range(1, STEPS - 1):
        assert timeline[s] == (st["accumulated"][s] >= THRESHOLD), (s, st["accumulated"], timeline)


def test_cached_quality(result):
    r, _ = result
    base, cached = r.images["uncached"], r.images[f"teacache {THRESHOLD:g}"]
    assert cached.shape == base.shape == (BATCH, 1, 16, 16)
    db = float(psnr(cached, base, reduction="mean"))
    assert math.isfinite(db), "cached run equals the uncached one: nothing was skipped"
    assert db > PSNR_MIN_DB
    # Caching must beat spending the same compute on fewer DDIM steps.
    computed = r.rows[1][1]
    model = load_digits_dit()
    few = sample_digits(
        model, _labels(), num_steps=computed, cfg_scale=CFG, generator=torch.Generator().manual_seed(SEED)
    )
    assert db > float(psnr(few, base, reduction="mean"))


def test_uncached_row_is_exact(result):
    # "exact" in the table: the uncached images are what the plain model samples for
    # these seeds, bit for bit (sampling is deterministic on CPU).
    r, _ = result
    assert r.rows[0][5] == math.inf
    model = load_digits_dit()
    again = sample_digits(
        model, _labels(), num_steps=STEPS, cfg_scale=CFG, generator=torch.Generator().manual_seed(SEED)
    )
    assert torch.equal(again, r.images["uncached"])


def test_output_files_decode(result):
    _, out = result
    # figure sizes in demo.py: images (3.2 in per panel x 3.6 in), timeline (8 in x 1.9 in
    # per threshold + 0.6 in), both saved at 110 dpi.
    expected = {"demo_images.png": (round(3.2 * 2 * 110), round(3.6 * 110)), "demo_timeline.png": (880, 275)}
    for f, size in expected.items():
        with Image.open(out / f) as im:
            im.load()  # decodes the whole file
            assert im.format == "PNG" and im.size == size, (f, im.size)
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100, f"{f} looks blank (grey levels {lo}..{hi})"
