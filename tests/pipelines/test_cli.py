"""``python -m fastcache calibrate --pipeline PATH`` and ``python -m fastcache generate`` end
to end on tiny pipelines written by ``save_pretrained`` (a DiT, a PixArt, a Flux and a Wan
video pipeline): progress output, the timeline, the held-out check and the expected speedup
printed, the profile and PNGs written, exit codes; bad paths and arguments give one line,
no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import pipelines as P

from fastcache.tuning.cli import main as calibrate
from fastcache.tuning.generate import main as generate
from fastcache.tuning.profile import Profile

STEPS, BUDGET = 4, 2

# the per-pipeline arguments of both commands: tiny sizes, the tiny tokenizers' length
ARGS = {
    "dit": ["--labels", "1,3,5", "--batch", "1"],
    "pixart": [
        "--height",
        "8",
        "--width",
        "8",
        "--call",
        "use_resolution_binning=false",
        "--call",
        "max_sequence_length=32",
    ],
    "flux": ["--height", "8", "--width", "8", "--call", "max_sequence_length=32"],
    "wan": ["--height", "64", "--width", "64", "--num-frames", "5", "--call", "max_sequence_length=32"],
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, saved_pipelines):
    root = tmp_path_factory.mktemp("pipes")
    out = dict(saved_pipelines)
    wan = P.build("wan22")  # Wan 2.1's layout: one transformer (the CLI calibrates one denoiser)
    wan.register_modules(transformer_2=None)
    wan.register_to_config(boundary_ratio=None)
    wan.save_pretrained(root / "wan")
    out["wan"] = root / "wan"
    return out


def _cli(fn, argv, capsys) -> tuple[int, str, str]:
    try:
        rc = fn([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("name", ["dit", "pixart", "flux", "wan"])
def test_calibrate_then_generate_on_a_saved_pipeline(name, folders, tmp_path, capsys):
    prof_path, plot = tmp_path / "p.safetensors", tmp_path / "p.png"
    argv = ["--pipeline", folders[name], "--steps", STEPS, "--budget", BUDGET, "--runs", 1, "--held-out", 1]
    argv += ["--max-evals", 2, "--out", prof_path, "--plot", plot, *ARGS[name]]
    rc, out, err = _cli(calibrate, argv, capsys)
    assert rc == 0, err
    assert "fastcache.calibrate" in err  # the progress bar
    assert f"schedule search: {BUDGET} of {STEPS} steps computed" in out
    assert "held-out runs (1): searched" in out and "fixed interval" in out
    assert f"expected speedup: {STEPS / BUDGET:.2f}x" in out
    assert prof_path.is_file() and plot.is_file() and plot.stat().st_size > 1000
    prof = Profile.load(prof_path)
    assert prof.num_steps == STEPS and prof.schedule(BUDGET).plan.count("C") == BUDGET

    img = tmp_path / "img.png"
    gen = ["--pipeline", folders[name], "--profile", prof_path, "--budget", BUDGET, "--out", img, *ARGS[name]]
    if name == "dit":
        gen = [a for a in gen if a not in ("--batch", "1")]  # generate samples the labels given, as one batch
    else:
        gen += ["--prompt", "a red fox"]
    rc, out, err = _cli(generate, gen, capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("uncached: ") and f"({STEPS} steps)" in lines[0]
    assert lines[1].startswith("cached:") and "transformer calls computed" in lines[1]
    assert lines[2].startswith("PSNR of the cached output against the uncached one:")
    assert img.is_file() and (tmp_path / "img_uncached.png").is_file()


def _one_line(rc_out_err) -> tuple[int, str]:
    rc, _, err = rc_out_err
    assert "Traceback" not in err
    return rc, err.strip().splitlines()[-1]


def test_the_entry_point_gives_one_line_and_an_exit_code(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "fastcache", "calibrate", "--pipeline", str(tmp_path / "missing"), "--budget", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert (
        p.stderr.strip().splitlines()[-1].endswith("no such folder (and not a Hugging Face repository id owner/name)")
    )


def test_bad_paths_and_arguments_give_one_line(folders, tmp_path, capsys):
    from fastcache.__main__ import main

    def run(*argv):
        return _one_line(_cli(main, argv, capsys))

    cal = ("calibrate", "--steps", 4, "--budget", 2, "--pipeline")
    rc, msg = run(*cal, tmp_path)
    assert rc == 1 and "no model_index.json" in msg
    rc, msg = run(*cal[:-3], "--budget", 9, "--pipeline", folders["dit"])
    assert rc == 2 and "--budget 9: must be in [1, 4]" in msg
    rc, msg = run(*cal, folders["dit"], "--prompts", tmp_path / "no.txt")
    assert rc == 2 and "no such file" in msg
    rc, msg = run(*cal, folders["flux"], "--labels", "1,2")
    assert rc == 1 and "takes prompts, not --labels" in msg
    rc, msg = run(*cal, folders["dit"], "--prompt", "a cat")
    assert rc == 1 and "class-conditional: give --labels" in msg
    rc, msg = run(*cal, folders["wan22"])
    assert rc == 1 and "runs 2 denoisers (transformer, transformer_2)" in msg
    rc, msg = run(*cal, folders["flux"], "--call", "nope=1")
    assert rc == 1 and "takes no nope argument" in msg
    rc, msg = run(*cal, folders["flux"], "--call", "prompt=x")
    assert rc == 1 and "set by the command itself" in msg
    gen = ("generate", "--pipeline", folders["dit"], "--out")
    rc, msg = run(*gen, tmp_path / "x.png", "--profile", tmp_path / "none.safetensors", "--budget", 2)
    assert rc == 2 and "no such file" in msg
    rc, msg = run(*gen, tmp_path / "x.jpg", "--config", "teacache")
    assert rc == 2 and "must be a .png file" in msg
    rc, msg = run(*gen, tmp_path / "x.png", "--config", "tea_cache", "--labels", "1")
    assert rc == 1 and "neither a method name" in msg
    rc, msg = run("frobnicate")
    assert rc == 2 and "unknown command 'frobnicate'" in msg
