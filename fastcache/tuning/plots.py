"""The figures of ``python -m fastcache.tuning`` (:mod:`fastcache.tuning.cli`), written atomically.

* :func:`plot` — a threshold search: the TeaCache input-vs-output relative-L1 scatter with
  the fitted polynomial and its R², the per-block change heat map when the profile holds
  one, and the decision timeline of the chosen setting;
* :func:`plot_schedule` — a schedule search: the chosen plan's timeline against
  TaylorSeer's fixed-interval placement, and the PSNR of every evaluated plan.

matplotlib is imported when a figure is drawn (it is not a dependency of the core).
"""

from __future__ import annotations

from pathlib import Path

from .profile import atomic_path

__all__ = ["plot", "plot_schedule", "r_squared", "save_figure"]


def save_figure(fig, path) -> Path:
    """``fig`` laid out, written to ``path`` atomically (a temporary file, then
    ``os.replace``) and closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return path


def r_squared(x, y, coeffs) -> float:
    """R² of the polynomial ``coeffs`` (highest power first) fitted to ``(x, y)``."""
    import numpy as np

    pred = np.polyval(coeffs, x)
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def plot(profile, result, timeline, path: Path) -> Path:
    """The PNG of a threshold search (see the module docstring)."""
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
    return save_figure(fig, path)


def plot_schedule(result, path: Path, fixed: str | None = None, held_out: dict | None = None) -> Path:
    """PNG of a schedule search: the chosen plan's timeline (bar height = forecast
    order, full bars = computed steps) against TaylorSeer's fixed-interval placement, and
    the PSNR of every evaluated plan in search order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    ax = axes[0]
    rows = [("searched", result.plan)] + ([("fixed interval", fixed)] if fixed else [])
    colors = {"C": "tab:green", "0": "tab:gray", "1": "tab:blue", "2": "tab:purple", "3": "tab:orange"}
    for r, (name, plan) in enumerate(rows):
        y0 = len(rows) - 1 - r
        for s, c in enumerate(plan):
            ax.add_patch(plt.Rectangle((s, y0 + 0.1), 0.9, 0.8, color=colors.get(c, "tab:red")))
            if c != "C":
                ax.text(s + 0.45, y0 + 0.5, c, ha="center", va="center", fontsize=6, color="white")
        label = name
        if held_out and name in held_out:
            label += f"\nheld-out {held_out[name]:.1f} dB"
        ax.text(-0.5, y0 + 0.5, label, ha="right", va="center", fontsize=8)
    ax.set_xlim(-0.2, len(result.plan))
    ax.set_ylim(0, len(rows))
    ax.set_yticks([])
    ax.set_xlabel("step (green: computed; digit: Taylor order of the forecast, 0 = reuse)")
    ax.set_title(f"{result.budget} of {result.num_steps} steps computed")
    ax = axes[1]
    ps = np.asarray([e.psnr_db for e in result.trace])
    ax.plot(np.arange(len(ps)), ps, "o-", ms=3)
    ax.plot(np.arange(len(ps)), np.maximum.accumulate(ps), color="tab:red", label="best so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("PSNR vs uncached, calibration runs (dB)")
    ax.legend(fontsize=8)
    ax.set_title(f"search: {result.model_calls} model calls, {result.seconds:.0f} s")
    return save_figure(fig, path)
