"""Sampling runs of a diffusers pipeline, for the calibration and search CLI
(``python -m fastcache calibrate --pipeline PATH``) and ``python -m fastcache generate``.

* :func:`load_pipeline` — ``DiffusionPipeline.from_pretrained`` on a local folder, or a
  repository id already in the local Hugging Face cache (nothing is downloaded); one-line
  errors (:class:`PipelineError`) for everything that is not one;
* :func:`pipeline_runs` — seeded runs, one prompt (or class label set) each, returning the
  decoded images / frames as a tensor in [-1, 1] (``data_range`` 2, as the search expects);
* :func:`as_tensor` — a pipeline output's images or frames as that tensor.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .._shadow import prefer_installed_kernels

__all__ = [
    "DEFAULT_PROMPTS",
    "PipelineError",
    "as_tensor",
    "call_arguments",
    "denoiser",
    "load_pipeline",
    "pipeline_runs",
]

# Calibration prompts when none are given: varied subjects, styles and layouts (the searched
# schedule should not fit one kind of image). Held-out runs take the later ones.
DEFAULT_PROMPTS = (
    "a red fox sitting in fresh snow, morning light",
    "a city street at night in the rain, neon reflections",
    "a bowl of ramen on a wooden table, top view",
    "an astronaut riding a horse on the moon, digital art",
    "a watercolor painting of a lighthouse on a cliff",
    "a close-up portrait of an old fisherman, film photo",
    "a mountain lake surrounded by pine trees at sunset",
    "a cozy reading nook with plants and a large window",
)


class PipelineError(Exception):
    """A pipeline path, argument or output the CLI cannot use: printed as one line."""


def load_pipeline(path: str) -> object:
    """The pipeline at ``path``: a local folder written by ``save_pretrained`` (holding
    ``model_index.json``), or a repository id found in the local cache. Nothing is
    downloaded."""
    p = Path(path).expanduser()
    local = p.exists()
    if local and not p.is_dir():
        raise PipelineError(f"--pipeline {path}: is a file; give the pipeline's folder (the one with model_index.json)")
    if local and not (p / "model_index.json").is_file():
        raise PipelineError(
            f"--pipeline {path}: no model_index.json in this folder, so it is not a diffusers pipeline "
            "(write one with pipe.save_pretrained(folder))"
        )
    if not local and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise PipelineError(f"--pipeline {path}: no such folder (and not a Hugging Face repository id owner/name)")
    prefer_installed_kernels()  # transformers 5 imports the `kernels` package (see fastcache._shadow)
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # no advice about optional packages (accelerate) on every load
    try:
        pipe = DiffusionPipeline.from_pretrained(str(p) if local else path, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "folder" if local else "local Hugging Face cache (nothing is downloaded)"
        raise PipelineError(f"--pipeline {path}: could not load a pipeline from the {where}: {first}") from None
    finally:
        dlogging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser(pipe) -> torch.nn.Module:
    """The one transformer the CLI calibrates and searches on."""
    from ..pipeline import _cacheable

    try:
        models = _cacheable(pipe)
    except TypeError as e:
        raise PipelineError(str(e).replace("fastcache.enable: ", "")) from None
    if len(models) > 1:
        raise PipelineError(
            f"{type(pipe).__name__} runs {len(models)} denoisers ({', '.join(models)}), each on part of the steps; "
            "searching one schedule over several experts is not supported yet: use fastcache.enable(pipe, config) "
            "with a fixed config (e.g. taylorseer) on this pipeline"
        )
    return next(iter(models.values()))


def parse_call(items) -> dict:
    """``--call key=value`` arguments as a dict (values read as JSON where they parse:
    ``use_resolution_binning=false``, ``max_sequence_length=128``; else strings)."""
    import json

    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise PipelineError(f"--call {item!r}: expected key=value, e.g. --call max_sequence_length=128")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def call_arguments(pipe, a) -> dict:
    """The keyword arguments every pipeline call gets from the command line (``--height``,
    ``--width``, ``--num-frames``, ``--guidance-scale``, ``--call k=v``), each checked against
    the pipeline's ``__call__`` before any sampling."""
    extra = {
        k: v
        for k, v in (
            ("height", a.height),
            ("width", a.width),
            ("num_frames", a.num_frames),
            ("guidance_scale", a.guidance_scale),
        )
        if v is not None
    }
    extra.update(parse_call(a.call))
    params = inspect.signature(pipe.__call__).parameters
    reserved = {"prompt", "class_labels", "num_inference_steps", "generator", "output_type"} & set(extra)
    if reserved:
        raise PipelineError(f"--call {', '.join(sorted(reserved))}: set by the command itself; leave it out")
    unknown = [k for k in extra if k not in params]
    if unknown:
        raise PipelineError(f"{type(pipe).__name__} takes no {', '.join(unknown)} argument; leave it out")
    return extra


def class_conditional(pipe) -> bool:
    return "class_labels" in inspect.signature(pipe.__call__).parameters


def as_tensor(out) -> torch.Tensor:
    """The images (``(B, H, W, C)``) or video frames (``(B, F, H, W, C)``) of a pipeline
    output as a float tensor in [-1, 1]."""
    x = getattr(out, "images", None)
    if x is None:
        x = getattr(out, "frames", None)
    if x is None:
        raise PipelineError(f"the pipeline returned {type(out).__name__} with neither .images nor .frames")
    if isinstance(x, torch.Tensor):
        t = x.detach().float()
    else:
        t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    return t * 2 - 1


def pipeline_runs(
    pipe,
    steps: int,
    *,
    prompts: Sequence[str] | None = None,
    labels: Sequence[Sequence] | None = None,
    seeds: Sequence[int],
    call_kwargs: dict | None = None,
) -> list:
    """One run per seed: prompt ``k`` (or label set ``k``) with seed ``seeds[k]``, the
    decoded output as :func:`as_tensor`."""
    extra = dict(call_kwargs or {})
    runs = []
    for k, seed in enumerate(seeds):
        if labels is not None:
            cond = {"class_labels": list(labels[k % len(labels)])}
        else:
            cond = {"prompt": prompts[k % len(prompts)]}

        def run(cond=cond, seed=seed):
            g = torch.Generator().manual_seed(int(seed))
            with torch.no_grad():
                out = pipe(**cond, num_inference_steps=steps, generator=g, output_type="np", **extra)
            return as_tensor(out)

        runs.append(run)
    return runs
