"""``python -m fastcache.tuning``: profile a model, pick a threshold, plot what was measured.

    python -m fastcache.tuning --model digits --steps 50 --method teacache --target-fraction 0.4 \\
        --out digits50.safetensors --plot digits50.png
    python -m fastcache.tuning --factory mypkg.calib:make --method first_block --target-speedup 2

    python -m fastcache.tuning --model digits --steps 50 --budget 17 --out digits50.safetensors \\
        --plot schedule17.png

    python -m fastcache calibrate --pipeline ./my-pipeline --steps 30 --budget 12 \\
        --out profile.safetensors --plot schedule.png

``--pipeline PATH`` loads ``DiffusionPipeline.from_pretrained(PATH)`` from a local folder (or a
repository id already in the local Hugging Face cache; nothing is downloaded) and calibrates
its transformer on seeded pipeline runs: one prompt each (``--prompt`` repeated, ``--prompts
FILE`` one per line, or built-in prompts), or ``--batch`` class labels each for class-conditional
pipelines such as DiT (``--labels 207,360,...`` as ids or names; default: labels spread over
the model's classes). Calibration runs use seeds 1000+k, held-out runs the next prompts (or
labels) with seeds 2000+k. ``--height``, ``--width``, ``--num-frames`` and
``--guidance-scale`` (and ``--call KEY=VALUE``, any other argument of the pipeline's
``__call__``, the value read as JSON where it parses) go to every pipeline call. The PSNR is over the decoded outputs.

``--factory module:function`` names your code: ``function(steps)`` returns ``(model, runs)``
or ``(model, runs, held_out_runs)``, the transformer and lists of callables, each one
seeded sampling run returning its output tensor (the final images or latents).

``--budget K`` searches a static schedule of K computed steps
(:func:`fastcache.search_schedule`), prints it as a timeline with the search's trace and
cost, checks it on held-out runs (other seeds and labels) next to TaylorSeer's
fixed-interval placement at the same K, stores it in the profile
(``Profile.load(path).schedule(K)``) and plots both timelines and the search trace.

``--model digits`` is the shipped digits DiT (DDIM, batched CFG). The command records a
:class:`fastcache.Profile` over the runs (:func:`fastcache.calibrate`), then either searches
the threshold (:func:`fastcache.search_threshold`),
prints the trace and the chosen config, and writes the profile (safetensors + JSON) and a
PNG: the TeaCache input-vs-output relative-L1 scatter with the fitted polynomial and its
R², the per-block change heat map when the profile holds one, and the decision timeline of
the chosen setting (:mod:`fastcache.tuning.plots`).
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import torch

from ..models import load_digits_dit, sample_digits
from ..policies.schedule import ScheduleConfig
from ..runtime import patched
from .calibration import calibrate
from .evaluation import run_all
from .pipelines import (
    DEFAULT_PROMPTS,
    PipelineError,
    call_arguments,
    class_conditional,
    denoiser,
    load_pipeline,
    pipeline_runs,
)
from .plots import plot, plot_schedule
from .schedule_proxy import METHODS, fillers, fixed_interval_plan
from .schedule_search import evaluate_schedule, search_schedule
from .thresholds import SEARCH_METHODS, search_threshold


def digits_runs(model, steps: int, n_runs: int, batch: int, held_out: bool = False):
    """Seeded digits sampling runs (DDIM, batched CFG): calibration runs use seeds 1000+k
    and labels shifted by 3k+1; held-out runs use seeds 2000+k and labels shifted by 3k+5."""
    labels = torch.arange(batch) % 10
    seed0, shift = (2000, 5) if held_out else (1000, 1)
    return [
        (
            lambda k=k: sample_digits(
                model,
                (labels + 3 * k + shift) % 10,
                num_steps=steps,
                generator=torch.Generator().manual_seed(seed0 + k),
            )
        )
        for k in range(n_runs)
    ]


def _digits(steps: int, n_runs: int, batch: int):
    model = load_digits_dit()
    return model, digits_runs(model, steps, n_runs, batch), digits_runs(model, steps, n_runs, batch, held_out=True)


def _factory(spec: str, steps: int):
    if ":" not in spec:
        raise SystemExit(f"--factory {spec!r}: expected module:function, e.g. mypkg.calib:make")
    mod, fn = spec.split(":", 1)
    try:
        made = getattr(importlib.import_module(mod), fn)(steps)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--factory {spec!r}: {e}") from None
    if not (isinstance(made, tuple) and len(made) in (2, 3)):
        raise SystemExit(f"--factory {spec!r} must return (model, runs) or (model, runs, held_out_runs)")
    return made if len(made) == 3 else (*made, None)


def _prompts(a) -> list[str] | None:
    """The prompts asked for (``--prompt``, ``--prompts FILE``), or None for the defaults."""
    if a.prompts is not None:
        return [line.strip() for line in a.prompts.read_text().splitlines() if line.strip()]
    return list(a.prompt) if a.prompt else None


def _labels(a, pipe) -> list:
    """``--labels`` as class ids (names through the pipeline's ``get_label_ids``), or labels
    spread over the model's classes."""
    if a.labels is None:
        n = len(getattr(pipe, "labels", None) or {}) or int(getattr(pipe.transformer.config, "num_embeds_ada_norm", 0))
        if n <= 0:
            raise PipelineError("--labels: the pipeline states no classes; pass --labels 0,1,2")
        k = 4 * max(a.batch, 1) * (a.runs + max(a.held_out, 1))
        return [(i * n) // k for i in range(k)]
    items = [x.strip() for x in a.labels.split(",") if x.strip()]
    if all(x.isdigit() for x in items):
        return [int(x) for x in items]
    try:
        return list(pipe.get_label_ids(items))
    except (AttributeError, KeyError, ValueError) as e:
        raise PipelineError(
            f"--labels {a.labels!r}: not class ids, and the pipeline does not know these names ({e})"
        ) from None


def _pipeline(a):
    """``(model, runs, held_out_runs)`` of seeded runs of the pipeline at ``--pipeline``."""
    pipe = load_pipeline(a.pipeline)
    model = denoiser(pipe)
    extra = call_arguments(pipe, a)
    n_cal, n_held = a.runs, a.held_out
    if class_conditional(pipe):
        if a.prompt or a.prompts:
            raise PipelineError(f"{type(pipe).__name__} is class-conditional: give --labels, not prompts")
        ids = _labels(a, pipe)
        sets = [[ids[(k * a.batch + j) % len(ids)] for j in range(a.batch)] for k in range(n_cal + n_held)]
        cal_seeds = [1000 + k for k in range(n_cal)]
        cal = pipeline_runs(pipe, a.steps, labels=sets[:n_cal], seeds=cal_seeds, call_kwargs=extra)
        held = pipeline_runs(
            pipe, a.steps, labels=sets[n_cal:] or sets, seeds=[2000 + k for k in range(n_held)], call_kwargs=extra
        )
    else:
        if a.labels is not None:
            raise PipelineError(f"{type(pipe).__name__} takes prompts, not --labels")
        prompts = _prompts(a) or list(DEFAULT_PROMPTS)
        cal_p = [prompts[k % len(prompts)] for k in range(n_cal)]
        held_p = [prompts[(n_cal + k) % len(prompts)] for k in range(n_held)]
        cal = pipeline_runs(pipe, a.steps, prompts=cal_p, seeds=[1000 + k for k in range(n_cal)], call_kwargs=extra)
        held = pipeline_runs(pipe, a.steps, prompts=held_p, seeds=[2000 + k for k in range(n_held)], call_kwargs=extra)
    return model, cal, held


def _writable_file(ap, flag: str, path: Path | None) -> None:
    """``path`` can be written: not a directory, and its folder (or the nearest existing
    folder above it, where the rest is created) is a writable directory."""
    if path is None:
        return
    if path.is_dir():
        example = path / ("profile.safetensors" if flag == "--out" else "plot.png")
        ap.error(f"{flag} {path}: is a directory; give a file path, e.g. {example}")
    up = path.parent
    while not up.exists() and up != up.parent:
        up = up.parent
    if not up.is_dir():
        ap.error(f"{flag} {path}: {up} is a file, not a directory, so nothing can be written under it; choose another")
    if not os.access(up, os.W_OK | os.X_OK):
        ap.error(f"{flag} {path}: the directory {up} is not writable; choose another path")


def _check_args(ap, a) -> None:
    """Every argument checked before any work (loading the model, calibrating, searching):
    a mistake costs a message, not the minutes of a calibration pass."""
    if a.steps < 2:
        ap.error("--steps must be >= 2 (a one-step run has nothing to cache)")
    if a.runs < 1:
        ap.error(f"--runs {a.runs}: must be >= 1 (calibration runs)")
    if a.batch < 1:
        ap.error(f"--batch {a.batch}: must be >= 1 (labels per run)")
    if a.held_out < 0:
        ap.error(f"--held-out {a.held_out}: must be >= 0 (held-out runs to check the schedule on; 0 = no check)")
    if a.budget is not None:
        if not 1 <= a.budget <= a.steps:
            ap.error(f"--budget {a.budget}: must be in [1, {a.steps}] (computed steps of the --steps {a.steps} run)")
        if a.max_evals is not None and a.max_evals < 1:
            ap.error(f"--max-evals {a.max_evals}: must be >= 1 (end-to-end evaluations of the schedule search)")
    elif a.max_evals is not None and a.max_evals < 2:
        ap.error(f"--max-evals {a.max_evals}: must be >= 2 (evaluations of the threshold search)")
    try:
        fillers(_methods(a))
    except ValueError as e:
        ap.error(f"--methods {a.methods!r}: {str(e).replace('search_schedule: ', '')}")
    if a.target_fraction is not None and not 0.0 < a.target_fraction <= 1.0:
        ap.error(f"--target-fraction {a.target_fraction}: must be in (0, 1] (the computed fraction of the block work)")
    if a.target_speedup is not None and not a.target_speedup > 1.0:
        ap.error(f"--target-speedup {a.target_speedup}: must be > 1")
    if a.pipeline is None:
        for flag, v in (("--prompt", a.prompt), ("--prompts", a.prompts), ("--labels", a.labels), ("--call", a.call)):
            if v:
                ap.error(f"{flag}: only with --pipeline (the digits model and --factory runs bring their own)")
    if a.prompt and a.prompts is not None:
        ap.error("--prompt and --prompts: give one of them")
    if a.prompts is not None:
        if not a.prompts.is_file():
            ap.error(f"--prompts {a.prompts}: no such file (one prompt per line)")
        if not any(line.strip() for line in a.prompts.read_text(errors="replace").splitlines()):
            ap.error(f"--prompts {a.prompts}: the file holds no prompt (one per line)")
    for flag, v in (("--height", a.height), ("--width", a.width), ("--num-frames", a.num_frames)):
        if v is not None and v < 1:
            ap.error(f"{flag} {v}: must be >= 1")
    _writable_file(ap, "--out", a.out)
    _writable_file(ap, "--plot", a.plot)


def _methods(a) -> tuple[str, ...]:
    """``--methods``, a comma list, as names."""
    return tuple(m.strip() for m in a.methods.split(",") if m.strip())


def _budget(a, model, runs, held, prof) -> int:
    methods = _methods(a)
    res = search_schedule(
        model,
        runs,
        a.budget,
        methods=methods,
        profile=prof,
        max_evals=40 if a.max_evals is None else a.max_evals,
        progress=not a.no_progress,
    )
    print(res)
    print(
        f"expected speedup: {res.num_steps / res.budget:.2f}x of the transformer's block work "
        f"({res.budget} of {res.num_steps} steps computed; the wall speedup is lower by the work outside the blocks)"
    )

    top = max((METHODS[m] for m in methods if m in METHODS), default=0)
    fixed = fixed_interval_plan(res.budget, res.num_steps, top if top > 0 else 0)
    scores = None
    if held:
        refs = run_all(held, "--held-out runs").outputs
        scores = {
            "searched": evaluate_schedule(model, res.config, held, refs)[0],
            "fixed interval": evaluate_schedule(model, ScheduleConfig(plan=fixed), held, refs)[0],
        }
        print(
            f"held-out runs ({len(held)}): searched {scores['searched']:.2f} dB (calibration "
            f"{res.calibration_psnr:.2f} dB); fixed interval {fixed} {scores['fixed interval']:.2f} dB"
        )
    res.store(prof)
    if scores:
        prof.schedules[res.budget]["held_out_psnr_db"] = round(scores["searched"], 4)
    print(f"config: {res.config}")
    if a.out:
        prof.save(a.out)
        print(f"wrote {a.out} (schedule stored: Profile.load(path).schedule({res.budget}))")
    if a.plot:
        print(f"wrote {plot_schedule(res, a.plot, fixed, scores)}")
    return 0


def main(argv=None, prog: str = "python -m fastcache.tuning") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", choices=["digits"], default="digits", help="a shipped model (default digits)")
    src.add_argument("--factory", help="module:function returning (model, runs); see above")
    src.add_argument("--pipeline", help="a diffusers pipeline folder (save_pretrained) or a cached repository id")
    ap.add_argument("--prompt", action="append", help="with --pipeline: a calibration prompt (repeat for more)")
    ap.add_argument("--prompts", type=Path, help="with --pipeline: a file of prompts, one per line")
    ap.add_argument("--labels", help="with --pipeline (class-conditional): class ids or names, comma separated")
    ap.add_argument("--height", type=int, help="with --pipeline: image height (default: the pipeline's)")
    ap.add_argument("--width", type=int, help="with --pipeline: image width (default: the pipeline's)")
    ap.add_argument("--num-frames", type=int, help="with --pipeline (video): frames (default: the pipeline's)")
    ap.add_argument("--guidance-scale", type=float, help="with --pipeline: CFG scale (default: the pipeline's)")
    ap.add_argument(
        "--call", action="append", metavar="KEY=VALUE", help="with --pipeline: another argument of every pipeline call"
    )
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", type=int, default=2, help="calibration runs (digits, --pipeline)")
    ap.add_argument("--batch", type=int, default=8, help="labels per run (digits, class-conditional --pipeline)")
    ap.add_argument("--method", choices=sorted(SEARCH_METHODS), default="teacache")
    tgt = ap.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--target-fraction", type=float, help="computed fraction of the block work, e.g. 0.4")
    tgt.add_argument("--target-speedup", type=float, help="measured speedup (process CPU time), e.g. 2.0")
    tgt.add_argument("--budget", type=int, help="search a static schedule with this many computed steps")
    ap.add_argument(
        "--methods",
        default="reuse,taylor1,taylor2",
        help="with --budget: what may fill a cached step (comma list of reuse, taylor1, taylor2, eoc)",
    )
    ap.add_argument(
        "--held-out", type=int, default=2, help="with --budget: held-out runs to check on (digits, --pipeline)"
    )
    ap.add_argument("--max-evals", type=int, default=None, help="evaluations (default 10; 40 with --budget)")
    ap.add_argument("--out", type=Path, help="write the profile here (.safetensors + .json)")
    ap.add_argument("--plot", type=Path, help="write the PNG here")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    _check_args(ap, a)
    if a.pipeline is not None:
        try:
            model, runs, held = _pipeline(a)
        except PipelineError as e:
            ap.exit(1, f"{ap.prog}: error: {e}\n")
    elif a.factory:
        model, runs, held = _factory(a.factory, a.steps)
    else:
        model, runs, held = _digits(a.steps, a.runs, a.batch)
    if a.budget is not None and not a.factory:
        held = held[: a.held_out]

    prof = calibrate(model, lambda: [r() for r in runs], progress=not a.no_progress)
    print(prof)
    if a.budget is not None:
        return _budget(a, model, runs, held, prof)
    res = search_threshold(
        model,
        runs,
        a.method,
        target_fraction=a.target_fraction,
        target_speedup=a.target_speedup,
        profile=prof,
        max_evals=10 if a.max_evals is None else a.max_evals,
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
            stats = run_all(runs[:1], "--plot", handle=h).stats[0]
        timeline = next(iter(stats["contexts"].values()), {}).get("timeline", [])
        print(f"wrote {plot(prof, res, timeline, a.plot)}")
    return 0
