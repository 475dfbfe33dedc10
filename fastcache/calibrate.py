"""``python -m fastcache.calibrate``: profile a model, pick a threshold, plot what was measured.

    python -m fastcache.calibrate --model digits --steps 50 --method teacache --target-fraction 0.4 \\
        --out digits50.safetensors --plot digits50.png
    python -m fastcache.calibrate --factory mypkg.calib:make --method first_block --target-speedup 2

``--factory module:function`` names your code: ``function(steps)`` returns ``(model, runs)``,
the transformer and a list of callables, each one seeded sampling run returning its output
tensor (the final images or latents). ``--model digits`` is the shipped digits DiT
(DDIM, batched CFG). The command records a :class:`fastcache.Profile` over the runs
(:func:`fastcache.calibrate`), searches the threshold (:func:`fastcache.search_threshold`),
prints the trace and the chosen config, and writes the profile (safetensors + JSON) and a
PNG: the TeaCache input-vs-output relative-L1 scatter with the fitted polynomial and its
R², the per-block change heat map when the profile holds one, and the decision timeline of
the chosen setting.

(Importing this module keeps ``fastcache.calibrate`` callable: the module forwards calls to
:func:`fastcache.calibration.calibrate`.)
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

from .calibration import calibrate as _calibrate


class _CallableModule(types.ModuleType):
    """``import fastcache.calibrate`` replaces the package attribute ``fastcache.calibrate``
    (the function) by this module; calling the module still calibrates."""

    def __call__(self, *args, **kwargs):
        return _calibrate(*args, **kwargs)


def _digits(steps: int, n_runs: int, batch: int):
    import torch

    from .models import load_digits_dit, sample_digits

    model = load_digits_dit()
    labels = torch.arange(batch) % 10
    runs = [
        (
            lambda k=k: sample_digits(
                model, (labels + 3 * k + 1) % 10, num_steps=steps, generator=torch.Generator().manual_seed(1000 + k)
            )
        )
        for k in range(n_runs)
    ]
    return model, runs


def _factory(spec: str, steps: int):
    if ":" not in spec:
        raise SystemExit(f"--factory {spec!r}: expected module:function, e.g. mypkg.calib:make")
    mod, fn = spec.split(":", 1)
    try:
        made = getattr(importlib.import_module(mod), fn)(steps)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--factory {spec!r}: {e}") from None
    if not (isinstance(made, tuple) and len(made) == 2):
        raise SystemExit(f"--factory {spec!r} must return (model, runs), got {type(made).__name__}")
    return made


def r_squared(x, y, coeffs) -> float:
    """R² of the polynomial ``coeffs`` (highest power first) fitted to ``(x, y)``."""
    import numpy as np

    pred = np.polyval(coeffs, x)
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def plot(profile, result, timeline, path: Path) -> Path:
    """The PNG described in the module docstring."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    change = getattr(profile, "block_change", None)
    panels = 3 if change is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    p = np.asarray(profile.teacache_pairs)
    ax = axes[0]
    if len(p) > 4:
        coeffs = profile.fit_teacache(4)
        xs = np.linspace(p[:, 0].min(), p[:, 0].max(), 200)
        ax.scatter(p[:, 0], p[:, 1], s=8, alpha=0.6)
        ax.plot(
            xs,
            np.polyval(coeffs, xs),
            color="tab:red",
            label=f"degree-4 fit, R² = {r_squared(p[:, 0], p[:, 1], coeffs):.3f}",
        )
        ax.legend(fontsize=8)
    ax.set_xlabel("input rel-L1 (first block's modulated input)")
    ax.set_ylabel("output rel-L1 (stack residual)")
    ax.set_title("TeaCache indicator vs output change")
    k = 1
    if change is not None:
        ax = axes[k]
        c = np.asarray(change.detach().cpu() if hasattr(change, "detach") else change)  # host-read-ok: plotting
        im = ax.imshow(c.T, aspect="auto", origin="lower", cmap="magma")
        fig.colorbar(im, ax=ax)
        ax.set_xlabel("step")
        ax.set_ylabel("block")
        ax.set_title("per-block relative change")
        k += 1
    ax = axes[k]
    if timeline:
        t = np.asarray(timeline, dtype=float)
        ax.bar(np.arange(len(t)), t, width=1.0, color="tab:green")
    ax.set_ylim(0, 1.2)
    ax.set_yticks([0, 1], ["reused", "computed"])
    ax.set_xlabel("step")
    ax.set_title(
        f"{result.method} threshold {result.chosen.threshold:.3g}: {result.chosen.computed_fraction:.2f} computed"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    from .runtime import patched
    from .search import SEARCH_METHODS, search_threshold

    ap = argparse.ArgumentParser(
        prog="python -m fastcache.calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", choices=["digits"], default="digits", help="a shipped model (default digits)")
    src.add_argument("--factory", help="module:function returning (model, runs); see above")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", type=int, default=2, help="calibration runs (digits)")
    ap.add_argument("--batch", type=int, default=8, help="labels per run (digits)")
    ap.add_argument("--method", choices=sorted(SEARCH_METHODS), default="teacache")
    tgt = ap.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--target-fraction", type=float, help="computed fraction of the block work, e.g. 0.4")
    tgt.add_argument("--target-speedup", type=float, help="measured speedup (process CPU time), e.g. 2.0")
    ap.add_argument("--max-evals", type=int, default=10)
    ap.add_argument("--out", type=Path, help="write the profile here (.safetensors + .json)")
    ap.add_argument("--plot", type=Path, help="write the PNG here")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.steps < 2:
        ap.error("--steps must be >= 2")
    model, runs = _factory(a.factory, a.steps) if a.factory else _digits(a.steps, a.runs, a.batch)

    prof = _calibrate(model, lambda: [r() for r in runs], progress=not a.no_progress)
    print(prof)
    res = search_threshold(
        model,
        runs,
        a.method,
        target_fraction=a.target_fraction,
        target_speedup=a.target_speedup,
        profile=prof,
        max_evals=a.max_evals,
        progress=not a.no_progress,
        num_steps=a.steps,
    )
    print(res)
    print(f"config: {res.config}")
    if a.out:
        prof.save(a.out)
        print(f"wrote {a.out}")
    if a.plot:
        with patched(model, res.config) as h:
            runs[0]()
            timeline = next(iter(h.stats()["contexts"].values()), {}).get("timeline", [])
        print(f"wrote {plot(prof, res, timeline, a.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
