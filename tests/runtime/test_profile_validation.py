"""Profiles refused (or warned about) where they do not fit, and the inputs of the
calibration CLI / schedule search checked before any work (docs/profiles.md):

* load: a truncated, empty or plain-JSON file, missing or broken metadata fields, a
  non-finite value in any curve, a stored schedule whose plan does not fit the profile:
  a ValueError naming the file, the field, the cause and the fix;
* patch / first call: a prior of another width or (token granularity) another token
  count is refused before any work; an announced step count other than the profile's is
  refused; a run at other timesteps is warned about (stats + RuntimeWarning), never silent;
* the schedule search refuses a bad budget before calibrating, and runs of another step
  count than the profile's with a message saying so;
* the CLI rejects bad arguments and an unwritable --out before any work, and writes
  atomically;
* an announced ScheduleConfig survives a batch alternating between 2 and 1: fresh
  buffers and a computed step on every change, never stale values, never an error.
"""

import dataclasses
import json
import warnings

import pytest
import torch
from diffusers import DDIMScheduler
from support.zoo import reference_dit_case

import fastcache
from fastcache import ScheduleConfig


@pytest.fixture(scope="module")
def case_prof():
    case = reference_dit_case()
    prof = fastcache.calibrate(case.model, lambda: [case.sample(steps=6, seed=s) for s in (1, 2)], progress=False)
    return case, prof


def _clone(prof, **kw):
    args = dict(
        prior=prof.prior.clone(),
        slots=prof.slots,
        meta=dict(prof.meta),
        teacache_pairs=prof.teacache_pairs,
        mag_ratios=prof.mag_ratios,
        block_change=prof.block_change,
        step_gram=prof.step_gram,
        schedules=prof.schedules,
    )
    args.update(kw)
    return fastcache.Profile(**args)


def _write(path, prof, *, tensors=None, **meta_over):
    """A profile file as ``Profile.save`` writes it, with tensors / metadata fields replaced
    (a hand-edited or damaged file); a metadata value None drops the field."""
    from safetensors.torch import save_file

    good = prof.save(path.with_suffix(".good"))
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        md = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    ts.update(tensors or {})
    for k, v in meta_over.items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    save_file(ts, str(path), metadata=md)
    return path


# ----------------------------------------------------------------------------- load
def test_non_finite_values_are_refused_at_load_naming_the_file_and_field(case_prof, tmp_path):
    _, prof = case_prof
    prior = prof.prior.clone()
    prior[2, 1, 5] = float("nan")
    path = _write(tmp_path / "nan.safetensors", prof, tensors={"prior": prior})
    with pytest.raises(ValueError, match=r"nan\.safetensors: prior holds 1 non-finite .* step 2, slot '0\.mlp\.x'"):
        fastcache.Profile.load(path)
    with pytest.raises(ValueError, match="prior holds 1 non-finite"):
        fastcache.EOCConfig(base=fastcache.FORAConfig(interval=2), profile=path)
    gram = prof.step_gram.clone()
    gram[0, 1, 1] = float("inf")
    path = _write(tmp_path / "gram.safetensors", prof, tensors={"step_gram": gram})
    with pytest.raises(ValueError, match=r"gram\.safetensors: step_gram holds 1 non-finite .* steps \(1, 1\)"):
        fastcache.Profile.load(path)
    with pytest.raises(ValueError, match="mag_ratios holds 1 non-finite"):
        _clone(prof, mag_ratios=torch.tensor([1.0, float("nan"), 1, 1, 1, 1]))
    # a constant (but finite) prior is still what EOC's own check names
    with pytest.raises(ValueError, match="does not change between steps"):
        fastcache.patch(
            case_prof[0].model,
            fastcache.EOCConfig(base=fastcache.FORAConfig(), profile=_clone(prof, prior=torch.ones_like(prof.prior))),
        )


def test_a_stored_schedule_that_does_not_fit_the_profile_is_refused(case_prof, tmp_path):
    _, prof = case_prof
    bad = json.dumps({"3": {"plan": "CCC" + "0" * 9}})
    path = _write(tmp_path / "s.safetensors", prof, schedules=bad)
    with pytest.raises(ValueError, match=r"s\.safetensors: the stored schedule for budget 3 plans 12 steps .* 6-step"):
        fastcache.Profile.load(path)
    path = _write(tmp_path / "s2.safetensors", prof, schedules=json.dumps({"2": {"plan": "CC1C11"}}))
    with pytest.raises(ValueError, match="computes 3 steps, not 2"):
        fastcache.Profile.load(path)
    edited = _clone(prof, schedules={})
    edited.schedules[3] = {"plan": "CCC" + "0" * 9}  # edited in memory after the load
    with pytest.raises(ValueError, match="plans 12 steps"):
        edited.schedule(3)
    edited.schedules[3] = {"plan": "CC0C00"}
    assert edited.schedule(3) == ScheduleConfig(plan="CC0C00")


def test_unreadable_profile_files_name_the_path_the_field_and_the_fix(case_prof, tmp_path):
    _, prof = case_prof
    good = prof.save(tmp_path / "good.safetensors")
    data = good.read_bytes()
    cases = {
        "empty.safetensors": b"",
        "truncated.safetensors": data[: len(data) // 2],
        "plain.json": json.dumps({"prior": [1, 2, 3]}).encode(),
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=rf"profile .*{name} cannot be read as safetensors .* make it again"):
            fastcache.Profile.load(tmp_path / name)
    for field, value, msg in (
        ("slots", None, "metadata has no 'slots' field"),
        ("meta", None, "metadata has no 'meta' field"),
        ("meta", "{not json", "field 'meta' is not valid JSON"),
        ("schedules", "[1, 2", "field 'schedules' is not valid JSON"),
        ("slots", json.dumps({"a": 1}), "field 'slots' must be a JSON list"),
        ("meta", json.dumps({"granularity": "channel"}), "'meta' has no 'model_class'"),
    ):
        path = _write(tmp_path / f"{field}.safetensors", prof, **{field: value})
        with pytest.raises(ValueError, match=rf"{field}\.safetensors: .*{msg}.*calibrate"):
            fastcache.Profile.load(path)


def test_save_is_atomic_a_failed_write_leaves_the_earlier_file_whole(case_prof, tmp_path, monkeypatch):
    import safetensors.torch

    _, prof = case_prof
    path = prof.save(tmp_path / "p.safetensors")
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        prof.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left


# ----------------------------------------------------------------------------- fit at patch / first call
def test_a_prior_of_another_width_is_refused_at_patch(case_prof):
    case, prof = case_prof
    narrow = _clone(prof, prior=prof.prior[..., :16].clone())
    with pytest.raises(ValueError, match=r"EOCConfig: .*prior of width 16 .* hidden width is 32"):
        fastcache.patch(case.model, fastcache.EOCConfig(base=fastcache.FORAConfig(interval=2), profile=narrow))
    with pytest.raises(ValueError, match=r"ScheduleConfig .*prior of width 16 .* hidden width is 32"):
        fastcache.patch(case.model, ScheduleConfig(plan="CECECE", profile=narrow))
    assert "forward" not in case.model.__dict__  # nothing left patched
    # Block Caching uses the block_change curve only: the prior's width does not matter
    with fastcache.patched(case.model, fastcache.BlockCacheConfig(delta=0.05, profile=narrow)):
        case.sample(steps=6)


def test_a_token_profile_of_another_resolution_is_refused_at_the_first_call_before_the_blocks(case_prof):
    case, _ = case_prof
    m = case.model
    tok = fastcache.calibrate(m, lambda: case.sample(steps=6), granularity="token", progress=False)
    assert tok.prior.shape[2] == 16
    other = _clone(tok, prior=tok.prior[:, :, :4].clone(), step_gram=None)  # as if made at a 4-token resolution
    ran = []
    hook = m.blocks[0].attn.register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        for cfg in (
            fastcache.EOCConfig(base=fastcache.FORAConfig(interval=2), profile=other),
            ScheduleConfig(plan="CECECE", profile=other),
        ):
            want = r"tokens x width \(N, D\) \(4, 32\) .*stream 'x' has \(16, 32\) .*calibrate at this resolution"
            with fastcache.patched(m, cfg), pytest.raises(ValueError, match=want):
                case.sample(steps=6)
        assert ran == []  # refused before any block ran
        with fastcache.patched(m, fastcache.EOCConfig(base=fastcache.FORAConfig(interval=2), profile=tok)):
            case.sample(steps=6)  # the profile's own resolution runs (and the hook sees the blocks)
        assert ran
    finally:
        hook.remove()


def test_an_announced_step_count_other_than_the_profiles_is_refused(case_prof):
    case, prof = case_prof
    m = case.model
    cfg = fastcache.EOCConfig(base=fastcache.FORAConfig(interval=2), profile=prof)
    with fastcache.patched(m, cfg):
        ctx = lambda i: fastcache.context(m, "default", step_index=i, num_steps=4)  # noqa: E731
        with pytest.raises(ValueError, match="the run has 4 steps but the profile was recorded over 6-step runs"):
            case.sample(steps=4, context=ctx)
        # the profile's own step count runs
        case.sample(steps=6, context=lambda i: fastcache.context(m, "default", step_index=i, num_steps=6))


def _stats_warnings(m):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        st = fastcache.stats(m)["contexts"]["default"]
    return st, [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]


def test_a_run_at_other_timesteps_is_reported_and_warned_naming_both(case_prof):
    case, prof = case_prof
    m = case.model
    trailing = dataclasses.replace(case, scheduler=lambda: DDIMScheduler(timestep_spacing="trailing"))
    for cfg in (
        fastcache.EOCConfig(base=fastcache.FORAConfig(interval=2), profile=prof, threshold=0.0),
        ScheduleConfig(plan="CECECE", profile=prof),
    ):
        with fastcache.patched(m, cfg):
            case.sample(steps=6)  # the profile's own timesteps: nothing to say
            st, msgs = _stats_warnings(m)
            assert "profile_timestep_mismatches" not in st and not msgs
            trailing.sample(steps=6)
            st, msgs = _stats_warnings(m)
        assert st["profile_timestep_mismatches"] >= 1
        ts = prof.meta["timesteps"]
        text = "\n".join(msgs)
        assert "not the profile's" in text and f"{ts[0]:g}" in text and "run's timestep was" in text, text
    # a shorter run without announcing its length: its timesteps are not the profile's either
    with fastcache.patched(m, fastcache.EOCConfig(base=fastcache.FORAConfig(interval=2), profile=prof)):
        case.sample(steps=4)
        st, msgs = _stats_warnings(m)
    assert st["profile_timestep_mismatches"] >= 1 and msgs


# ----------------------------------------------------------------------------- batch changes
def _inputs(n, batches, seed=3):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, 4, 8, 8, generator=g) for b in batches]
    ts = [torch.full((b,), 999.0 - 110 * s) for s, b in zip(range(n), batches)]
    ys = [torch.tensor([1, 2][:b]) for b in batches]
    return xs, ts, ys


def test_an_announced_schedule_survives_a_batch_alternating_between_2_and_1():
    """Every call changes the batch: fresh buffers each time, so every call computes and
    equals the uncached model's output; the planned forecasts computed instead are
    counted in stats. Never an error."""
    case = reference_dit_case()
    m = case.model
    plan = "CC1C20C1"
    batches = [2, 1] * 4
    xs, ts, ys = _inputs(8, batches)
    with torch.no_grad():
        fresh = [m(x, t, y) for x, t, y in zip(xs, ts, ys)]
        with fastcache.patched(m, ScheduleConfig(plan=plan)):
            for _ in range(2):  # twice: the second run starts from a batch-1 history
                for i in range(8):
                    with fastcache.context(m, "default", step_index=i, num_steps=8):
                        out = m(xs[i], ts[i], ys[i])
                    assert torch.equal(out, fresh[i]), i
            st = fastcache.stats(m)["contexts"]["default"]
    # every planned forecast computed instead: order 0 steps on fresh buffers, the others
    # already at planning, the history holding one computed step where they need two or three
    forced = st["forced_computes"]
    assert forced == {"fresh_buffers": 2 * plan.count("0"), "short_history": 2 * (plan.count("1") + plan.count("2"))}
    assert st["timeline"][-8:] == [True] * 8 and st["computed"] == 16


def test_an_announced_schedule_continues_its_plan_after_a_batch_change():
    """Batch 2 for steps 0-2, then 1: step 3 (planned C) computes on fresh buffers, step 4
    (planned order 2, which needs three computed steps) computes instead: the history holds
    one; step 5 (order 0) is forecast from step 4 as planned; steps 6-7 follow the plan.
    Each forced step equals a fresh computation."""
    case = reference_dit_case()
    m = case.model
    plan = "CC1C20C1"
    batches = [2, 2, 2, 1, 1, 1, 1, 1]
    xs, ts, ys = _inputs(8, batches)
    with torch.no_grad():
        fresh = [m(x, t, y) for x, t, y in zip(xs, ts, ys)]
        outs = []
        with fastcache.patched(m, ScheduleConfig(plan=plan)):
            for i in range(8):
                with fastcache.context(m, "default", step_index=i, num_steps=8):
                    outs.append(m(xs[i], ts[i], ys[i]))
            st = fastcache.stats(m)["contexts"]["default"]
        # steps 3.. on batch 1 alone, with the plan's step 4 as a computed step: the same history
        with fastcache.patched(m, ScheduleConfig(plan="CC1CC0C1")):
            want = []
            for i in range(8):
                with fastcache.context(m, "default", step_index=i, num_steps=8):
                    want.append(m(xs[i], ts[i], ys[i]))
    assert st["timeline"] == [True, True, False, True, True, False, True, False]
    assert st["forced_computes"] == {"fresh_buffers": 0, "short_history": 1}
    for i in (3, 4, 6):
        assert torch.equal(outs[i], fresh[i]), i
    for i in (5, 7):
        assert torch.equal(outs[i], want[i]) and not torch.equal(outs[i], fresh[i]), i


# ----------------------------------------------------------------------------- search and CLI: checked before any work
def test_search_refuses_a_bad_budget_before_calibrating_and_runs_of_another_step_count(case_prof):
    case, prof = case_prof
    m = case.model
    calls = []
    hook = m.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for bad in (0, -3, 2.5):
            with pytest.raises(ValueError, match=rf"budget={bad!r} must be an integer >= 1"):
                fastcache.search_schedule(m, lambda: case.sample(steps=6), bad, progress=False)
        with pytest.raises(ValueError, match="speedup=0.5 must be a number >= 1"):
            fastcache.search_schedule(m, lambda: case.sample(steps=6), speedup=0.5, progress=False)
    finally:
        hook.remove()
    assert calls == []  # refused before the calibration pass
    runs = [lambda: case.sample(steps=4, seed=2)]
    with pytest.raises(ValueError, match=r"the runs have \[4\] steps but the profile was recorded over 6-step runs"):
        fastcache.search_schedule(m, runs, 3, profile=prof, max_evals=2, progress=False)


@pytest.fixture
def cli(monkeypatch):
    import importlib

    mod = importlib.import_module("fastcache.tuning.cli")

    def no_work(*a, **k):
        raise AssertionError("the command did work before checking its arguments")

    monkeypatch.setattr(mod, "_digits", no_work)
    monkeypatch.setattr(mod, "calibrate", no_work)
    return mod


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--budget", "4", "--max-evals", "0"], "--max-evals 0: must be >= 1"),
        (["--target-fraction", "0.4", "--max-evals", "1"], "--max-evals 1: must be >= 2"),
        (["--budget", "4", "--held-out", "-1"], "--held-out -1: must be >= 0"),
        (["--budget", "0"], r"--budget 0: must be in \[1, 8\]"),
        (["--budget", "9"], r"--budget 9: must be in \[1, 8\]"),
        (["--budget", "4", "--methods", "reuse,taylor7"], "--methods 'reuse,taylor7': unknown method 'taylor7'"),
        (["--budget", "4", "--methods", ","], "--methods ',': methods is empty"),
        (["--budget", "4", "--runs", "0"], "--runs 0: must be >= 1"),
        (["--budget", "4", "--batch", "0"], "--batch 0: must be >= 1"),
        (["--target-fraction", "1.5"], r"--target-fraction 1.5: must be in \(0, 1\]"),
        (["--target-fraction", "nan"], r"--target-fraction nan: must be in \(0, 1\]"),
        (["--target-speedup", "1"], "--target-speedup 1.0: must be > 1"),
    ],
)
def test_command_line_rejects_bad_arguments_before_any_work(cli, capsys, args, msg):
    import re

    with pytest.raises(SystemExit) as e:
        cli.main(["--steps", "8", "--no-progress", *args])
    assert e.value.code == 2
    assert re.search(msg, capsys.readouterr().err)


def test_command_line_rejects_an_unwritable_out_before_any_work(cli, capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for flag, path, msg in (
        ("--out", tmp_path, "is a directory"),
        ("--out", a_file / "p.safetensors", "is a file, not a directory"),
        ("--out", a_file / "sub" / "p.safetensors", "is a file, not a directory"),
        ("--plot", tmp_path, "is a directory"),
        ("--plot", a_file / "s.png", "is a file, not a directory"),
    ):
        with pytest.raises(SystemExit):
            cli.main(["--steps", "8", "--budget", "4", "--no-progress", flag, str(path)])
        err = capsys.readouterr().err
        assert f"{flag} {path}: " in err and msg in err, err


def test_search_warns_when_the_runs_timesteps_are_not_the_profiles(case_prof):
    case, prof = case_prof
    trailing = dataclasses.replace(case, scheduler=lambda: DDIMScheduler(timestep_spacing="trailing"))
    with pytest.warns(RuntimeWarning, match=r"search_schedule: the run's timesteps \[999, .* not those the profile"):
        fastcache.search_schedule(
            case.model, [lambda: trailing.sample(steps=6)], 3, profile=prof, max_evals=1, progress=False
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # its own timesteps: no warning
        fastcache.search_schedule(
            case.model, [lambda: case.sample(steps=6)], 3, profile=prof, max_evals=1, progress=False
        )
