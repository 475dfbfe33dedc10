"""Reach: every diffusers transformer class of the reach zoo x every method that should work
everywhere (tests/support/reach.py measures each cell; bench/reach_table.py writes the same
cells to docs/reach.md). A cell works (never-skip bitwise, a skipping setting finite with
fewer attention calls, remove restores) or is refused with a message that names the class
and says what to do; it never crashes or runs wrong. ``FLOOR``: how many classes each method
must work on (the issue's bar: First-Block, TaylorSeer, ScheduleConfig on 32 of 36)."""

import pytest
import torch
from support.reach import CLASSES, SETTINGS, built, run_cell

CELLS = [(c, m) for c in CLASSES for m in SETTINGS]
_RESULTS: dict = {}

#: classes each method must work on (raised as the automatic path and the families grow)
FLOOR = {
    "FirstBlockCacheConfig": 34,  # all but HiDream and Latte (streams rebuilt between blocks: refused)
    "TaylorSeerConfig": 36,
    "FORAConfig": 36,
    "ScheduleConfig": 36,
    "TeaCacheConfig": 19,  # the curated families (the indicator is a family's modulation)
}


def _result(name, method):
    if (name, method) not in _RESULTS:
        _RESULTS[(name, method)] = run_cell(name, method)
    return _RESULTS[(name, method)]


@pytest.mark.parametrize("name,method", CELLS)
def test_cell_works_or_is_refused_with_what_to_do(name, method):
    cell = _result(name, method)
    assert cell.status in ("works", "refused"), f"{name} x {method}: {cell.status}: {cell.detail}"
    if cell.status == "refused":
        cls = type(built(name)[0].model).__name__
        assert cls in cell.detail, f"the refusal must name {cls}: {cell.detail}"
        assert any(w in cell.detail for w in ("register", "Register", "use ", "Use ")), cell.detail


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_method_works_on_enough_classes(method):
    working = [c for c in CLASSES if _result(c, method).status == "works"]
    assert len(working) >= FLOOR[method], f"{method} works on {len(working)} classes: {working}"


def test_reach_table_is_written_without_cache_dit(tmp_path, monkeypatch):
    """bench/reach_table.py measures its rows (fastcache's cells and the peers' in the same
    loop) and, where cache-dit is not importable, says so in its column instead of failing."""
    import importlib.util
    import os
    import sys

    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import cache_dit -> ImportError
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "reach_table.py")
    spec = importlib.util.spec_from_file_location("reach_table", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "reach.md"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--classes", "diffusers-dit", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the bench measures on one thread
    text = out.read_text(encoding="utf-8")
    row = next(ln for ln in text.splitlines() if ln.startswith("| diffusers-dit "))
    cells = [c.strip() for c in row.strip("|").split("|")[1:]]
    assert cells[:5] == ["✓"] * 5, row  # fastcache's five methods
    # diffusers' FBC and MagCache run; its TaylorSeer default patterns (``.*attn``) match no
    # module of DiT (attn1 / attn2), explicit ones do; cache-dit is not importable
    assert cells[5:] == ["✓", "✓", "no effect", "✓", "not installed"], row
    assert "- cache-dit DBCache: **0/1** (1 not installed)" in text
