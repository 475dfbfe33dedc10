"""bench/gpu_check.py, the one-shot GPU check, exercised on CPU.

* ``--cpu`` (the dry run) writes one strict JSON with every section: the CPU-runnable ones
  (the C++ kernels and the Triton interpreter against the reference on tiny shapes, the
  CUDA-graph capture stand-in, the static-schedule graphs through dynamo, the per-step
  timing harness on tiny models) pass with real checks; the GPU-only ones are
  ``skipped`` with a reason starting "no CUDA";
* its pytest child keeps an explicit ``TRITON_INTERPRET=0`` (tests/conftest.py only sets
  a default), so on a CUDA machine ``pytest -m gpu`` runs compiled kernels;
* the budget: a section that overruns its share is interrupted and reported as an error,
  the sections after the budget are skipped with the reason, a raising check is recorded
  and the section goes on.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gc = _load()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The --cpu run, started in the background so the other tests overlap with it."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--budget-s", "60", "--build", "never", "--threads", "1"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    t0 = time.monotonic()

    def result():
        log, _ = proc.communicate(timeout=170)
        return proc.returncode, log, out, time.monotonic() - t0

    yield result
    if proc.poll() is None:
        proc.kill()


def test_pytest_child_keeps_an_explicit_TRITON_INTERPRET(dry_run):
    """What the pytest_gpu section relies on: its child pytest (tests/conftest.py loaded)
    runs with TRITON_INTERPRET=0 as asked, Triton not interpreting, fastcache from here."""
    rep = gc.run_pytest(["tests/ops/test_expected_backends.py::test_loaded_cpp_runs"], {"TRITON_INTERPRET": "0"}, 120)
    assert rep["rc"] == 0, rep["output_tail"]
    assert rep["env"]["TRITON_INTERPRET"] == "0"
    assert rep["env"]["triton_interpret"] is False
    assert rep["env"]["fastcache"] == str(REPO / "fastcache")
    assert [(t["nodeid"], t["outcome"]) for t in rep["tests"]] == [
        ("tests/ops/test_expected_backends.py::test_loaded_cpp_runs", "passed")
    ]
    # and the section finds the GPU tests it would run
    files = gc.gpu_test_files()
    assert "tests/runtime/test_cudagraph.py" in files and "tests/runtime/test_modes.py" in files


def test_cpu_dry_run_writes_every_section(dry_run):
    rc, log, out, seconds = dry_run()
    assert rc == 0, log[-3000:]
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert data["schema"] == gc.SCHEMA and data["mode"] == "cpu" and data["finished"]
    assert list(data["sections"]) == list(gc.SECTIONS)
    for name, sec in data["sections"].items():
        if name in gc.GPU_ONLY:
            assert sec["status"] == "skipped" and sec["reason"].startswith("no CUDA"), (name, sec)
            continue
        bad = [c for c in sec["checks"] if c["status"] != "pass"]
        assert sec["status"] == "pass" and sec["checks"] and not bad, (name, sec["status"], bad[:3], sec.get("error"))
    assert data["summary"]["ok"] is True and data["summary"]["pass"] == len(gc.SECTIONS) - len(gc.GPU_ONLY)

    sections = data["sections"]
    # every op of the dispatcher, at every dtype, on both CPU-runnable backends
    from fastcache.ops import SCHEMAS

    for name in ("cpp_parity", "triton_parity"):
        names = " ".join(c["name"] for c in sections[name]["checks"])
        for op in SCHEMAS:
            assert f"{op}[" in names or f"{op} " in names, (name, op)
        for dt in ("float32", "bfloat16", "float16"):
            assert f",{dt}]" in names, (name, dt)
        assert "cache_decision[teacache] bit for bit" in names and "timestep_guard" in names
    assert sections["triton_parity"]["results"]["mode"] == "interpreter"
    assert isinstance(sections["triton_parity"]["results"]["launch_grids_over_cuda_limits"], list)
    assert sections["build"]["results"]["backend"]["cpu"] == "cpp"
    cg = sections["cuda_graph_step"]["results"]
    assert cg["stand-in step[compile_stack=False]"]["n"] == 10 and 0 < sum(cg["timeline"]) < 10
    static = sections["static_schedule_graphs"]["results"]
    assert len(static["graphs"]) == 3 and static["cudagraph_forecast"]
    costs = sections["step_costs"]["results"]
    assert set(costs) == {"dit-tiny", "flux-tiny"}
    for row in costs.values():
        assert row["rounds"] > 0 and row["timings"]["patched_skipped"]["median_ms"] > 0
        assert row["stats"]["skipped"]["skipped"] == row["stats"]["skipped"]["calls"] - 1


def _ctx(tmp_path, *argv):
    args = gc.parse_args(["--cpu", "--out", str(tmp_path / "r.json"), *argv])
    return gc.Context(args, "cpu", None)


def _report():
    sec = {"status": "pending", "reason": None, "seconds": 0.0, "checks": [], "results": {}, "warnings": []}
    return {"sections": {n: json.loads(json.dumps(sec)) for n in gc.SECTIONS}}


def test_overrun_is_interrupted_and_late_sections_are_skipped(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path, "--budget-s", "3")
    report = _report()
    monkeypatch.setattr(gc, "GRACE_S", 0.5)
    monkeypatch.setitem(gc.CAPS, "environment", 1.0)

    def slow(ctx, sec, check):
        check("before the sleep", True)
        time.sleep(30)

    def failing():
        raise AssertionError("no")

    def broken(ctx, sec, check):
        check.run("raises", lambda: 1 / 0)
        check.run("fails", failing)
        check("still runs", True)

    monkeypatch.setitem(gc.RUNNERS, "environment", slow)
    monkeypatch.setitem(gc.RUNNERS, "build", broken)
    t0 = time.monotonic()
    gc.run_section(ctx, report, "environment", tmp_path / "r.json")
    assert time.monotonic() - t0 < 5
    env = report["sections"]["environment"]
    assert env["status"] == "error" and "interrupted" in env["error"], env
    gc.run_section(ctx, report, "build", tmp_path / "r.json")
    build = report["sections"]["build"]
    assert [c["status"] for c in build["checks"]] == ["error", "fail", "pass"]
    assert build["status"] == "error" and "ZeroDivisionError" in build["checks"][0]["detail"]
    ctx.deadline = time.monotonic() - 1
    gc.run_section(ctx, report, "cpp_parity", tmp_path / "r.json")
    assert report["sections"]["cpp_parity"]["status"] == "skipped"
    assert "budget" in report["sections"]["cpp_parity"]["reason"]
    # the JSON is flushed as each section starts: a crash inside one leaves it "running"
    assert json.loads((tmp_path / "r.json").read_text())["sections"]["build"]["status"] == "running"


def test_cudagraph_tree_log_counts_and_restores():
    """The GPU-only static-schedule check reads inductor's CUDA-graph trees through this
    wrapper: it must see a skip reported by any of the modules that imported the logger,
    and leave torch as it was."""
    import torch._inductor.cudagraph_trees as trees
    import torch._inductor.cudagraph_utils as utils
    import torch._inductor.output_code as output_code
    from torch._dynamo.utils import counters

    before = (trees.CUDAGraphTreeManager.execute_node, utils.log_cudagraph_skip_and_bump_counter)
    skips = counters["inductor"]["cudagraph_skips"]
    with gc._cudagraph_tree_log() as log:
        assert trees.CUDAGraphTreeManager.execute_node is not before[0]
        output_code.log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
        trees.log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to something else")
    assert counters["inductor"]["cudagraph_skips"] == skips + 2  # torch's own counter still bumped
    counters["inductor"]["cudagraph_skips"] = skips
    assert log["skips"] == [
        "skipping cudagraphs due to mutated inputs (1 instances)",
        "skipping cudagraphs due to something else",
    ]
    assert (trees.CUDAGraphTreeManager.execute_node, utils.log_cudagraph_skip_and_bump_counter) == before
    assert output_code.log_cudagraph_skip_and_bump_counter is before[1]


def test_child_processes_are_killed_with_their_group_on_timeout():
    t0 = time.monotonic()
    rc, out = gc._run_group(["bash", "-c", "echo started; sleep 30 & wait"], timeout=1.0)
    assert rc == "timeout" and "started" in out and time.monotonic() - t0 < 10


@pytest.mark.parametrize("overlap", [True, False])
def test_pytest_gpu_runs_next_to_the_parity_sections_and_ends_before_the_timed_ones(tmp_path, monkeypatch, overlap):
    """The orchestration of a CUDA run (CUDA faked, every section a stub): pytest_gpu's
    child starts after build and is waited for before the first section that times things
    or uses the whole GPU; with --no-overlap it runs at its own slot."""
    import os

    import torch

    order = []

    def stub(name):
        def run(ctx, sec, check):
            order.append(name)
            check(name, True)

        return run

    class FakeRun:
        def __init__(self, selection, env_overrides, timeout, markexpr=None):
            order.append("pytest:start")
            self.env, self.markexpr = env_overrides, markexpr

        def wait(self):
            order.append("pytest:wait")
            env = {"TRITON_INTERPRET": self.env["TRITON_INTERPRET"], "triton_interpret": False, "collected": 1}
            return {"rc": 0, "env": env, "tests": [{"nodeid": "t::gpu", "when": "call", "outcome": "passed"}]}

    for name in gc.SECTIONS:
        if name != "pytest_gpu":
            monkeypatch.setitem(gc.RUNNERS, name, stub(name))
    monkeypatch.setattr(gc, "PytestRun", FakeRun)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # main() sets it: restored
    out = tmp_path / "r.json"
    rc = gc.main(["--out", str(out), *([] if overlap else ["--no-overlap"])])
    data = json.loads(out.read_text())
    assert rc == 0 and data["mode"] == "cuda" and data["summary"]["ok"], data["summary"]
    assert all(s["status"] == "pass" for s in data["sections"].values())
    rest = ["cuda_graph_step", "static_schedule_graphs", "step_costs", "graph_step_costs"]
    if overlap:
        expected = ["environment", "build", "pytest:start", "cpp_parity", "triton_parity", "pytest:wait", *rest]
    else:
        expected = ["environment", "build", "cpp_parity", "triton_parity", *rest, "pytest:start", "pytest:wait"]
    assert order == expected
    assert data["sections"]["pytest_gpu"]["results"]["outcomes"] == {"passed": 1}


def test_a_parity_section_runs_alone(tmp_path):
    """``--sections triton_parity`` (or cpp_parity) on its own: the section imports the tests'
    ``cases`` helper after the checkout's fastcache has put tests/ops on sys.path (it failed
    with "No module named 'cases'" when no earlier section had run)."""
    out = tmp_path / "one.json"
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--sections", "cpp_parity", "--build", "never", "--threads", "1"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=170)
    sec = json.loads(out.read_text())["sections"]["cpp_parity"]
    assert sec["status"] == "pass", (sec.get("error"), proc.stdout[-2000:])
    assert any(c["name"].startswith("history_combine") for c in sec["checks"])
