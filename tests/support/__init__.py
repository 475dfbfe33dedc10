"""What the tests share, imported normally (``from support.zoo import CASES``; ``tests/`` is
on ``sys.path`` through its conftest):

* :mod:`support.zoo` — a tiny instance of every supported model family (the real classes,
  small configs) and a real diffusers sampling loop for each (``CASES``: adding a family
  here gives it every test parametrized over the zoo);
* :mod:`support.hostreads` — ``HostReadMode``, the count of host reads (device value ->
  Python value) from what actually runs, compiled code included;
* :mod:`support.teacache_reference` — a host-side TeaCache written from docs/methods.md;
* :func:`direct_inputs` — latents and timesteps for calling a model directly.
"""

import torch


def direct_inputs(n, seed=3):
    """``n`` latents ``(2, 4, 8, 8)`` and falling timesteps ``(2,)`` for direct model calls."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(n)]
    ts = [torch.full((2,), 999.0 - 110 * s) for s in range(n)]
    return xs, ts
