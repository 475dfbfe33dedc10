"""The model families fastcache ships: one file per family, holding its
:class:`~fastcache.ModelSpec` (where the blocks are, the streams, the TeaCache indicator)
and the block program(s) of its blocks (:mod:`fastcache.interior`), the AdaLN modulation
written once and read by both.

Adding a family = one file here exporting ``SPEC`` and ``register_programs()``, listed in
``FAMILIES``, plus its tiny case in the tests' model zoo. Registered when fastcache is imported; classes
are named, never imported, so nothing here imports diffusers or the demo model.
"""

from __future__ import annotations

from ..specs import register
from . import (
    cogvideox,
    dit,
    flux,
    flux2,
    hunyuan_video,
    hunyuan_video15,
    hunyuanimage,
    ltx,
    ltx2,
    lumina2,
    mochi,
    pixart,
    qwenimage,
    reference_dit,
    sana,
    sd3,
    wan,
    zimage,
)

FAMILIES = (reference_dit, dit, pixart, flux, sd3, wan)
FAMILIES += (qwenimage, flux2, zimage, sana, lumina2, hunyuanimage)  # image
FAMILIES += (hunyuan_video, hunyuan_video15, ltx, ltx2, cogvideox, mochi)  # video


def _register() -> None:
    for fam in FAMILIES:
        fam.register_programs()
        register(fam.SPEC, builtin=True)


_register()
