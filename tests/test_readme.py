"""README.md's claims that a test can hold: the methods x models table, cell by cell (✓:
``fastcache.patch`` and a 4-step sampling loop run, and the method cached something; —:
``patch`` refuses with an error that says why), and the front page's size."""

import os
import re

import pytest
import torch
from support.methods import METHODS
from support.zoo import CASES

import fastcache

HERE = os.path.dirname(__file__)

README = os.path.join(HERE, "..", "README.md")
COLUMNS = {  # README column -> zoo case
    "DiT": "diffusers-dit",
    "PixArt-α/Σ": "diffusers-pixart",
    "Flux.1": "diffusers-flux",
    "SD3 / 3.5": "diffusers-sd3",
    "Wan 2.1 / 2.2": "diffusers-wan",
    "reference DiT": "fastcache-dit",
    "Qwen-Image": "diffusers-qwenimage",
    "Flux.2": "diffusers-flux2",
    "Z-Image": "diffusers-zimage",
    "HunyuanVideo": "diffusers-hunyuanvideo",
    "LTX-Video": "diffusers-ltx",
    "CogVideoX": "diffusers-cogvideox",
    "Mochi": "diffusers-mochi",
    "HunyuanVideo 1.5": "diffusers-hunyuanvideo15",
    "HunyuanImage 2.1": "diffusers-hunyuanimage",
    "ChronoEdit": "diffusers-chronoedit",
    "SkyReels-V2": "diffusers-skyreelsv2",
    "Sana": "diffusers-sana",
    "Lumina2": "diffusers-lumina2",
}
STEPS = 4


def _table() -> dict[tuple[str, str], bool]:
    lines = open(README, encoding="utf-8").read().split("## Methods x models", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:  # the first table of the section
        if not ln.startswith("|"):
            break
        rows.append(ln)
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        config = re.search(r"`(\w+Config)`", cells[0]).group(1)
        for col, cell in zip(header[1:], cells[1:]):
            assert cell in ("✓", "—"), f"README cell {config} x {col}: {cell!r}"
            out[(config, COLUMNS[col])] = cell == "✓"
    return out


TABLE = _table()


def _config(name: str, profile):
    return METHODS[name].caching(profile, STEPS)


_CASES: dict = {}


def _case(name):
    if name not in _CASES:
        case = CASES[name]()
        profile = fastcache.calibrate(case.model, lambda: [case.sample(steps=STEPS, seed=1)], progress=False)
        _CASES[name] = (case, profile)
    return _CASES[name]


def test_readme_is_a_front_page():
    assert len(open(README, encoding="utf-8").read()) < 10_000
    assert set(TABLE) == {(c, f) for c, _ in TABLE for f in COLUMNS.values()}  # every cell filled


def test_readme_table_is_the_method_registry():
    """The README's table says what tests/support/methods.py (the contract suite's source) says."""
    assert set(COLUMNS.values()) == set(CASES)
    assert TABLE == {(c, f): m.supports(f) for c, m in METHODS.items() for f in CASES}


@pytest.mark.parametrize("family", sorted(COLUMNS.values()))
def test_methods_by_models_table(family):
    case, profile = _case(family)
    m = case.model
    for (config, fam), works in sorted(TABLE.items()):
        if fam != family:
            continue
        cfg = _config(config, profile)
        if not works:
            with pytest.raises((ValueError, TypeError), match=r"\w+"):
                fastcache.patch(m, cfg)
            assert fastcache.runtime._find(m) is None, f"{config} on {family}: refused but left patched"
            continue
        with fastcache.patched(m, cfg):
            out = case.sample(steps=STEPS, seed=2)
            st = fastcache.stats(m)["contexts"]["default"]
        assert torch.isfinite(out).all(), f"{config} on {family}"
        reused = st.get("skipped", 0) + st.get("reused_blocks", 0)
        assert reused > 0 or st.get("computed_fraction", 1.0) < 1.0, f"{config} on {family} cached nothing: {st}"
