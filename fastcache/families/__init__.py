"""The model families fastcache ships: one file per family, holding its
:class:`~fastcache.ModelSpec` (where the blocks are, the streams, the TeaCache indicator)
and the block program(s) of its blocks (:mod:`fastcache.interior`), the AdaLN modulation
written once and read by both.

Adding a family = one file here exporting ``SPEC`` and ``register_programs()``, listed in
``FAMILIES``, plus its tiny case in the tests' model zoo. Loaded on first use
(:func:`fastcache.specs.find_spec`, :func:`fastcache.interior.program_for`); classes are
named, never imported, so nothing here imports diffusers or the demo model.
"""

from __future__ import annotations

from . import dit, flux, pixart, reference_dit, sd3, wan

FAMILIES = (reference_dit, dit, pixart, flux, sd3, wan)


def builtin_specs():
    """Every family's spec (registering its block programs on the way)."""
    for fam in FAMILIES:
        fam.register_programs()
    return tuple(fam.SPEC for fam in FAMILIES)
