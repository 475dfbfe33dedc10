"""README.md's claims that a test can hold: the methods x models table, and the front
page's size. The table is written by ``python bench/reach_table.py --readme`` from the
cells ``support.reach.readme_cell`` measures (✓: ``fastcache.patch`` and a 4-step sampling
loop run finite and the method cached something; —: ``patch`` refuses with an error that
says why and leaves the model unpatched); here each family's column is measured again and
must be the README's, and the README's block must be exactly what the generator writes
for its cells, so the block is the generator's output on what the suite measures."""

import os
import re

import pytest
from support.methods import METHODS
from support.reach import README_COLUMNS, README_ROWS, readme_block, readme_column, readme_table
from support.zoo import CASES

HERE = os.path.dirname(__file__)
README = os.path.join(HERE, "..", "README.md")


def _text() -> str:
    return open(README, encoding="utf-8").read()


def _table() -> dict[tuple[str, str], str]:
    """(config, family) -> the README's cell, parsed from the block (by label: the block's
    order and form are test_readme_block_is_what_the_generator_writes's)."""
    rows = readme_block(_text()).splitlines()[1:-1]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        config = re.search(r"`(\w+Config)`", cells[0]).group(1)
        for col, cell in zip(header[1:], cells[1:]):
            out[(config, README_COLUMNS.get(col, col))] = cell
    return out


TABLE = _table()


def test_readme_is_a_front_page():
    assert len(_text()) < 10_000
    assert set(TABLE) == {(c, f) for c in README_ROWS.values() for f in README_COLUMNS.values()}  # every cell


def test_readme_block_is_what_the_generator_writes():
    """The block between the markers is readme_table() of its own cells, byte for byte: the
    row and column order, labels and cell symbols are the generator's (with the per-family
    test below, which measures each column, the block is the generator's output on what the
    suite measures)."""
    assert readme_block(_text()) == readme_table(TABLE)


def test_readme_table_is_the_method_registry():
    """The README's table says what tests/support/methods.py (the contract suite's source) says."""
    assert set(README_COLUMNS.values()) == set(CASES)
    assert set(README_ROWS.values()) == set(METHODS)
    assert TABLE == {(c, f): "✓" if m.supports(f) else "—" for c, m in METHODS.items() for f in CASES}


@pytest.mark.parametrize("family", sorted(README_COLUMNS.values()))
def test_methods_by_models_table(family):
    """The family's column, measured, is the README's column."""
    measured = readme_column(family)
    written = {config: TABLE[(config, family)] for config in README_ROWS.values()}
    assert measured == written, f"{family}: measured {measured}, README {written}"
