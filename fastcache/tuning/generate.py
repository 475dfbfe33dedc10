"""``python -m fastcache generate``: one prompt (or class label set), sampled uncached and
cached on the same seed; prints the wall time of each, the computed steps and the PSNR of
the cached output against the uncached one, and writes both images.

    python -m fastcache generate --pipeline ./my-pipeline --profile profile.safetensors \\
        --budget 12 --prompt "a red fox in the snow" --out fox.png

``--profile P --budget K`` runs the schedule of K computed steps searched into the profile
(``python -m fastcache calibrate --pipeline ... --budget K --out P``); ``--config C`` runs any
other config instead: a method name (``teacache``), a JSON file in ``CacheConfig.to_dict``
form, or a profile path with ``--budget``. ``--steps`` defaults to the profile's step count.
``--out img.png`` receives the cached output (a row of the batch's images, or of the first
video's frames) and ``img_uncached.png`` the uncached one.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..pipeline import disable, enable
from .cli import _writable_file
from .pipelines import PipelineError, as_tensor, call_arguments, class_conditional, denoiser, load_pipeline
from .profile import Profile, atomic_path

__all__ = ["main"]


def _row(t: torch.Tensor) -> np.ndarray:
    """The images ``(B, H, W, C)`` side by side, or the first video's frames
    ``(B, F, H, W, C)``, as one uint8 ``(H, W', C)`` array."""
    x = t[0] if t.dim() == 5 else t
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()  # host-read-ok: the PNG, after sampling
    return np.concatenate(list(x), axis=1)


def _save_png(arr: np.ndarray, path: Path) -> Path:
    from PIL import Image

    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fastcache generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pipeline", required=True, help="a diffusers pipeline folder (save_pretrained) or cached id")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--profile", type=Path, help="a profile with searched schedules (with --budget)")
    how.add_argument("--config", help="a method name, a JSON config file, or a profile path (with --budget)")
    ap.add_argument("--budget", type=int, help="with --profile: the schedule of this many computed steps")
    ap.add_argument("--prompt", help="the prompt (text-conditional pipelines)")
    ap.add_argument("--labels", help="class ids or names, comma separated (class-conditional pipelines)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the profile's; else 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--num-frames", type=int)
    ap.add_argument("--guidance-scale", type=float)
    ap.add_argument("--call", action="append", metavar="KEY=VALUE", help="another argument of the pipeline call")
    ap.add_argument("--out", type=Path, required=True, help="the cached output's PNG (and <name>_uncached.png)")
    return ap


def _check(ap, a) -> Profile | None:
    """Every argument, before the pipeline is loaded."""
    prof = None
    if a.profile is not None:
        if not a.profile.is_file():
            ap.error(f"--profile {a.profile}: no such file (make one with python -m fastcache calibrate --out ...)")
        try:
            prof = Profile.load(a.profile)
        except (OSError, ValueError) as e:
            ap.error(f"--profile {a.profile}: {str(e).splitlines()[0]}")
        if a.budget is None:
            have = sorted(prof.schedules)
            ap.error(f"--profile needs --budget K: the computed steps of one of its schedules {have or '(none)'}")
        if a.budget not in prof.schedules:
            have = sorted(prof.schedules)
            ap.error(
                f"--budget {a.budget}: the profile holds schedules for {have or 'no budget'}; search one with "
                f"python -m fastcache calibrate --pipeline {a.pipeline} --steps {prof.num_steps} --budget {a.budget} "
                f"--out {a.profile}"
            )
        if a.steps is not None and a.steps != prof.num_steps:
            ap.error(
                f"--steps {a.steps}: the profile's schedules plan {prof.num_steps} steps; sample with --steps "
                f"{prof.num_steps} or calibrate with --steps {a.steps}"
            )
        a.steps = prof.num_steps
    if a.steps is None:
        a.steps = 30
    if a.steps < 1:
        ap.error(f"--steps {a.steps}: must be >= 1")
    if a.prompt is not None and a.labels is not None:
        ap.error("--prompt and --labels: give the one the pipeline takes")
    for flag, v in (("--height", a.height), ("--width", a.width), ("--num-frames", a.num_frames)):
        if v is not None and v < 1:
            ap.error(f"{flag} {v}: must be >= 1")
    if a.out.suffix.lower() != ".png":
        ap.error(f"--out {a.out}: must be a .png file")
    _writable_file(ap, "--out", a.out)
    return prof


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    prof = _check(ap, a)
    try:
        pipe = load_pipeline(a.pipeline)
        model = denoiser(pipe) if prof is not None else None
        cond: dict = {}
        if class_conditional(pipe):
            if a.prompt is not None:
                raise PipelineError(f"{type(pipe).__name__} is class-conditional: pass --labels, not --prompt")
            items = [x.strip() for x in (a.labels or "0").split(",") if x.strip()]
            ids = [int(x) for x in items] if all(x.isdigit() for x in items) else list(pipe.get_label_ids(items))
            cond["class_labels"] = ids
        else:
            if a.labels is not None:
                raise PipelineError(f"{type(pipe).__name__} takes --prompt, not --labels")
            cond["prompt"] = a.prompt or "a photo of a cat"
        extra = call_arguments(pipe, a)
        if prof is not None:
            prof.check_fits(model, method="--profile")
        config = prof if prof is not None else a.config
    except (PipelineError, ValueError, KeyError) as e:
        ap.exit(1, f"{ap.prog}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")

    def sample(steps: int) -> tuple[torch.Tensor, float]:
        g = torch.Generator().manual_seed(a.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe(**cond, **extra, num_inference_steps=steps, generator=g, output_type="np")
        return as_tensor(out), time.perf_counter() - t0

    try:
        enable(pipe, config, budget=a.budget)  # every check of the config before any sampling
        disable(pipe)
    except (ValueError, TypeError, FileNotFoundError, KeyError, RuntimeError) as e:
        ap.exit(1, f"{ap.prog}: error: {str(e).splitlines()[0]}\n")
    sample(min(2, a.steps))  # warm-up: one-time costs stay out of both timings
    ref, t_ref = sample(a.steps)
    record = enable(pipe, config, budget=a.budget)
    try:
        out, t_out = sample(a.steps)
        computed = steps = 0
        for p in record.patches.values():
            for st in p.stats()["contexts"].values():
                computed += int(st.get("computed", 0))
                steps += int(st.get("steps", 0))
    finally:
        disable(pipe)
    db = _psnr(out, ref)
    uncached_path = a.out.with_name(a.out.stem + "_uncached.png")
    _save_png(_row(out), a.out)
    _save_png(_row(ref), uncached_path)
    print(f"uncached: {t_ref:.2f} s ({a.steps} steps)")
    print(f"cached:   {t_out:.2f} s ({computed} of {steps} transformer calls computed), {t_ref / t_out:.2f}x")
    print(f"PSNR of the cached output against the uncached one: {db:.2f} dB")
    print(f"wrote {a.out} and {uncached_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
