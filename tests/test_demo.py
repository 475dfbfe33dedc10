"""The README's main command runs end to end (small settings) and writes its outputs."""

import pytest

from fastcache import demo

pytest.importorskip("matplotlib")


def test_demo_small_run(tmp_path):
    rows = demo.run(steps=6, batch=4, thresholds=[0.2], out=tmp_path, seed=0, cfg_scale=3.0, repeats=1)
    assert [r[0] for r in rows] == ["uncached", "teacache 0.2"]
    name, computed, total, wall, speedup, db = rows[1]
    assert total == 6 and 2 <= computed <= 6  # first and last step always computed
    assert wall > 0 and speedup > 0
    assert db > 10  # cached samples stay close to the uncached ones
    for f in ("demo_images.png", "demo_timeline.png", "demo_table.txt"):
        assert (tmp_path / f).stat().st_size > 0
    assert "teacache 0.2" in (tmp_path / "demo_table.txt").read_text()
