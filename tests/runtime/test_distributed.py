"""Multi-device decisions (fastcache.distributed): ``fastcache.patch(..., process_group=group)``.

Two gloo processes on CPU (torch.multiprocessing spawn, one job for the whole module):

* sequence sharding: each rank holds half of the tokens of a token-wise toy DiT (its blocks
  act on each token alone, so a rank's shard of every hidden state, and of the indicator,
  is exactly that shard of the single-process run); TeaCache and First-Block Cache over a
  20-step loop: timelines and relative-L1 traces bitwise identical on both ranks, the
  timeline equal to the single-process run on the whole sequence, the traces equal to it
  up to fp32 rounding, the outputs equal to its shards;
* whole different samples per rank (a stochastic sampler, rank 1 much noisier): without
  the group the ranks decide differently (the control), with it identically, and equal to
  one process deciding on both ranks' samples as one batch;
* diffusers' own context parallelism (``enable_parallelism(ContextParallelConfig(
  ulysses_degree=2))`` on a tiny Flux, native attention on CPU): the group is taken from
  the model; timelines equal on both ranks and to the single-process run;
* a group this rank is not in is refused with a clear error.

Single process: torch.compile(fullgraph=True) of the reduction path on a one-rank gloo
group (0 graph breaks, the collective and its wait in the graph, decisions equal to
eager); bad ``process_group`` arguments; copy / pickle; policies that do not declare
``decides_from_data`` refused on a group of several ranks.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import pickle
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastcache
from fastcache import distributed as fd
from fastcache.policies.base import Policy

STEPS = 20
WORLD = 2


# ------------------------------------------------------------------ a token-wise toy DiT
class _Block(nn.Module):
    """AdaLN-modulated MLP block: every token is transformed on its own (no attention)."""

    def __init__(self, d: int):
        super().__init__()
        self.ada = nn.Linear(d, 3 * d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, c):
        shift, scale, gate = self.ada(c).chunk(3, -1)
        h = nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return x + gate[:, None] * self.mlp(h)


class TokenDiT(nn.Module):
    def __init__(self, d: int = 16, depth: int = 3):
        super().__init__()
        self.d = d
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))
        self.out = nn.Linear(d, d)

    def forward(self, x, t):
        half = self.d // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
        a = t.float()[:, None] * freqs[None]
        c = self.t_mlp(torch.cat([a.cos(), a.sin()], -1))
        for blk in self.blocks:
            x = blk(x, c)
        return self.out(x)


def _modulation(block, call):
    shift, scale, _ = block.ada(call["c"]).chunk(3, -1)
    return call["x"], shift, scale, 1e-6


SPEC = fastcache.ModelSpec(
    name="test-tokenwise-dit",
    model_types=(TokenDiT,),
    segments=("blocks",),
    streams=("x",),
    returns=("x",),
    modulation=_modulation,
    timestep_arg="t",
)

CONFIGS = {
    "teacache": lambda: fastcache.TeaCacheConfig(threshold=0.3, num_steps=STEPS),
    "first_block": lambda: fastcache.FirstBlockCacheConfig(threshold=0.45, num_steps=STEPS),
}


def _toy() -> TokenDiT:
    torch.manual_seed(0)
    return TokenDiT().eval()


def _latents(seed: int, batch: int = 2, tokens: int = 64) -> torch.Tensor:
    return torch.randn(batch, tokens, 16, generator=torch.Generator().manual_seed(seed))


def _loop(model, x, noise=None):
    """A 20-step Euler-style loop; ``noise(i)``: an added perturbation per step (a stochastic sampler)."""
    with torch.no_grad():
        for i, t in enumerate(torch.linspace(999, 0, STEPS)):
            x = x - 0.05 * model(x, t.expand(x.shape[0]))
            if noise is not None:
                x = x + noise(i)
    return x


def _ctx(handle) -> dict:
    st = handle.stats()
    ctx = st["contexts"]["default"]
    return {"timeline": ctx["timeline"], "rel_l1": ctx["rel_l1"], "process_group": st.get("process_group")}


# ------------------------------------------------------------------ scenarios (run on every rank)
def _sharded(rank: int, world: int, kind: str) -> dict:
    model, x = _toy(), _latents(0)
    n = x.shape[1] // world
    shard = x[:, rank * n : (rank + 1) * n]
    with fastcache.patched(model, CONFIGS[kind](), spec=SPEC, process_group=dist.group.WORLD) as h:
        y = _loop(model, shard)
        out = {**_ctx(h), "y": y}
    if rank == 0:  # the single-process run on the whole sequence (no group)
        with fastcache.patched(model, CONFIGS[kind](), spec=SPEC) as h:
            y_full = _loop(model, x)
            out["full"] = {**_ctx(h), "y": y_full}
    return out


SIGMA = (0.0, 0.5)  # per-rank noise of the stochastic sampler: rank 1's samples move much more


def _noise(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    draws = [torch.randn(2, 64, 16, generator=g) * SIGMA[rank] for _ in range(STEPS)]
    return lambda i: draws[i]


def _different_samples(rank: int, world: int) -> dict:
    model, x = _toy(), _latents(10 + rank)
    out = {}
    with fastcache.patched(model, CONFIGS["teacache"](), spec=SPEC) as h:  # the control: no group
        _loop(model, x, _noise(rank))
        out["alone"] = _ctx(h)
    with fastcache.patched(model, CONFIGS["teacache"](), spec=SPEC, process_group=dist.group.WORLD) as h:
        _loop(model, x, _noise(rank))
        out["grouped"] = _ctx(h)
    if rank == 0:  # one process deciding on both ranks' samples as one batch
        xs = torch.cat([_latents(10 + r) for r in range(world)])
        noises = [_noise(r) for r in range(world)]
        with fastcache.patched(model, CONFIGS["teacache"](), spec=SPEC) as h:
            _loop(model, xs, lambda i: torch.cat([nz(i) for nz in noises]))
            out["one_batch"] = _ctx(h)
    return out


def _bad_group(rank: int, world: int) -> dict:
    only0 = dist.new_group([0])  # collective: every rank creates it
    if rank == 0:
        return {}
    try:
        fastcache.patch(_toy(), CONFIGS["teacache"](), spec=SPEC, process_group=only0)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def _flux_sample(case, model):
    sch = case.scheduler()
    sch.set_timesteps(STEPS)
    x = case.latents(torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in sch.timesteps:
            out = model(**case.inputs(x, t), return_dict=False)[0]  # diffusers' CP hook wants a tuple
            x = sch.step(out, t, x).prev_sample
    return x


def _diffusers_cp(rank: int, world: int) -> dict:
    from diffusers import ContextParallelConfig
    from support import zoo

    case = zoo.flux_case(B=1)
    model = case.model
    model.set_attention_backend("native")  # the CP-capable backend that runs on CPU (Ulysses only)
    cfgs = {
        "teacache": fastcache.TeaCacheConfig(threshold=0.3, num_steps=STEPS),
        "first_block": fastcache.FirstBlockCacheConfig(threshold=0.4, num_steps=STEPS),
    }
    out = {}
    if rank == 0:
        for k, cfg in cfgs.items():
            with fastcache.patched(model, cfg) as h:
                y = _flux_sample(case, model)
                out[f"{k}_single"] = {**_ctx(h), "y": y}
    # diffusers places rank r on device `rank % torch.accelerator.device_count()`, which is a
    # division by zero on a machine without an accelerator: one device for the CPU run.
    torch.accelerator.device_count = lambda: 1
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    for k, cfg in cfgs.items():
        with fastcache.patched(model, cfg) as h:  # no process_group: taken from the model
            y = _flux_sample(case, model)
            out[k] = {**_ctx(h), "y": y}
    return out


SCENARIOS = {
    "sharded_teacache": lambda r, w: _sharded(r, w, "teacache"),
    "sharded_first_block": lambda r, w: _sharded(r, w, "first_block"),
    "different_samples": _different_samples,
    "bad_group": _bad_group,
    "diffusers_cp": _diffusers_cp,
}


def _job(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a shared 2-core machine
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),  # a failing scenario must not hang the suite
    )
    results = {}
    try:
        for name, fn in SCENARIOS.items():
            try:
                results[name] = fn(rank, world)
            except Exception as e:  # recorded: the parent reports it as that scenario's failure
                results[name] = {"exception": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    """Both ranks' results of every scenario (one spawn for the module)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_job, args=(WORLD, os.path.join(d, "init"), d), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _bits(values: list[float]) -> list[int]:
    """fp32 values as their bit patterns (NaN == NaN: the first step has no ratio)."""
    return torch.tensor(values, dtype=torch.float32).view(torch.int32).tolist()


def _get(ranks, name):
    out = [r[name] for r in ranks]
    for r, res in enumerate(out):
        assert "exception" not in res, f"rank {r}: {res['exception']}"
    return out


# ------------------------------------------------------------------ two-process tests
@pytest.mark.parametrize("kind", ["teacache", "first_block"])
def test_sequence_shards_decide_identically_and_as_one_process(ranks, kind):
    r0, r1 = _get(ranks, f"sharded_{kind}")
    full = r0["full"]
    tl = r0["timeline"]
    assert len(tl) == STEPS
    assert 3 <= sum(tl) <= STEPS - 3, f"the loop must both compute and skip to test anything: {tl}"
    # identical on both ranks, bitwise (the same gathered values, summed in the same order)
    assert r1["timeline"] == tl
    assert _bits(r1["rel_l1"]) == _bits(r0["rel_l1"])
    # equal to the single-process decisions on the whole sequence; the sums up to fp32 rounding
    assert tl == full["timeline"]
    a, b = torch.tensor(r0["rel_l1"]), torch.tensor(full["rel_l1"])
    assert torch.isfinite(b[1:]).all()
    torch.testing.assert_close(a[1:], b[1:], rtol=1e-5, atol=0)
    # the token-wise model: the ranks' outputs are the shards of the single-process output
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]], dim=1), full["y"], rtol=1e-5, atol=1e-5)
    assert r0["process_group"] == {"world_size": 2, "rank": 0, "backend": "gloo", "decisions_reduced": True}
    assert r1["process_group"]["rank"] == 1


def test_whole_different_samples_decide_identically(ranks):
    r0, r1 = _get(ranks, "different_samples")
    # the control: deciding alone, the ranks disagree (so a deadlock or divergence in a real run)
    assert r0["alone"]["timeline"] != r1["alone"]["timeline"]
    assert r0["grouped"]["timeline"] == r1["grouped"]["timeline"]
    assert _bits(r0["grouped"]["rel_l1"]) == _bits(r1["grouped"]["rel_l1"])
    # the same decisions as one process holding every rank's samples in one batch
    assert r0["grouped"]["timeline"] == r0["one_batch"]["timeline"]
    torch.testing.assert_close(
        torch.tensor(r0["grouped"]["rel_l1"][1:]), torch.tensor(r0["one_batch"]["rel_l1"][1:]), rtol=1e-5, atol=0
    )


def test_group_without_this_rank_is_refused(ranks):
    _, r1 = _get(ranks, "bad_group")
    assert r1["error"] is not None and "not a member of the process_group" in r1["error"]


@pytest.mark.parametrize("kind", ["teacache", "first_block"])
def test_diffusers_context_parallel_group_is_taken_from_the_model(ranks, kind):
    r0, r1 = _get(ranks, "diffusers_cp")
    single = r0[f"{kind}_single"]
    tl = r0[kind]["timeline"]
    assert 3 <= sum(tl) <= STEPS - 3, tl
    assert r1[kind]["timeline"] == tl
    assert _bits(r1[kind]["rel_l1"]) == _bits(r0[kind]["rel_l1"])
    assert tl == single["timeline"]
    assert r0[kind]["process_group"]["world_size"] == 2
    # diffusers gathers the output on every rank: both equal the single-process sample
    torch.testing.assert_close(r0[kind]["y"], single["y"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r1[kind]["y"], r0[kind]["y"], rtol=0, atol=0)


# ------------------------------------------------------------------ single process
@pytest.fixture
def world1(tmp_path):
    """A one-rank gloo group in this process (destroyed afterwards)."""
    if dist.is_initialized():
        pytest.skip("torch.distributed is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_process_group_before_init_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("torch.distributed is already initialized in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        fastcache.patch(_toy(), CONFIGS["teacache"](), spec=SPEC, process_group=object())


@pytest.mark.parametrize("bad", ["world", 0, [0, 1]])
def test_process_group_of_wrong_type_is_a_clear_error(world1, bad):
    model = _toy()
    with pytest.raises(TypeError, match="must be a torch.distributed.ProcessGroup"):
        fastcache.patch(model, CONFIGS["teacache"](), spec=SPEC, process_group=bad)
    assert "_fastcache_patch" not in model.__dict__  # nothing was patched


class _Undeclared(Policy):
    pass


class _Group2:
    world_size = 2


def test_undeclared_policy_is_refused_on_several_ranks():
    with pytest.raises(TypeError, match="decides_from_data"):
        fd.check_policy(_Undeclared(None, SPEC, _toy()), _Group2())
    fd.check_policy(_Undeclared(None, SPEC, _toy()), None)  # single process: accepted
    from fastcache.policies import EOCPolicy, FirstBlockCachePolicy, FORAPolicy, TeaCachePolicy

    assert TeaCachePolicy.decides_from_data and FirstBlockCachePolicy.decides_from_data
    assert EOCPolicy.decides_from_data  # its TeaCache base reduces; FORA / mask bases are static
    assert FORAPolicy.decides_from_data is False


def test_copy_shares_the_group_and_pickle_is_refused(world1):
    fastcache.register(SPEC)  # copies find their spec by name
    model = _toy()
    h = fastcache.patch(model, CONFIGS["teacache"](), process_group=world1)
    twin = copy.deepcopy(model)
    assert fastcache.get_patch(twin).group is h.group
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(model)
    h.remove()
    pickle.dumps(model)  # unpatched: an ordinary module again


@pytest.mark.compile
@pytest.mark.parametrize("kind,backend", [("teacache", "inductor"), ("first_block", "aot_eager")])
def test_compiled_reduction_fullgraph_no_breaks(world1, kind, backend):
    """The reduction traced by dynamo: one graph, 0 breaks, the gather and its wait outside the
    one cond; then the loop compiled with fullgraph=True takes the eager decisions (inductor for
    TeaCache, aot_eager for First-Block Cache: the same dynamo graph, a quicker backend)."""
    import torch._dynamo

    torch._dynamo.reset()
    model, x = _toy(), _latents(0)
    with fastcache.patched(model, CONFIGS[kind](), spec=SPEC, process_group=world1) as h:
        eager = _loop(model, x)
        eager_tl = h.stats()["contexts"]["default"]["timeline"]
        assert 0 < sum(eager_tl) < STEPS
        fastcache.reset(model)
        with torch.no_grad():
            explain = torch._dynamo.explain(model)(x, torch.tensor([999.0, 999.0]))
        assert explain.graph_break_count == 0, explain.break_reasons
        assert explain.graph_count == 1
        nodes = [n for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"]
        targets = [str(n.target) for n in nodes]
        assert sum("all_gather_into_tensor" in s for s in targets) == 1, targets
        assert any("wait_tensor" in s for s in targets)
        conds = [n for n in nodes if "cond" in str(n.target)]
        assert len(conds) == 1
        # the collective runs before the skip: not inside either branch's subgraph
        for g in explain.graphs:
            for name, sub in g.named_children():
                if isinstance(sub, torch.fx.GraphModule):
                    assert not any("all_gather" in str(n.target) for n in sub.graph.nodes), name
        fastcache.reset(model)
        torch._dynamo.reset()
        y = _loop(torch.compile(model, fullgraph=True, backend=backend), x)
        assert h.stats()["contexts"]["default"]["timeline"] == eager_tl
        torch.testing.assert_close(y, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["teacache", "first_block"])
def test_eager_reduction_reads_nothing_to_the_host(world1, kind):
    """With the group, an eager step still reads exactly one value: the decision flag (the
    gather and the fixed-order sum stay on the device)."""
    from support.hostreads import HostReadMode, python_level_reads

    model, x = _toy(), _latents(0)
    mode = HostReadMode()
    with python_level_reads() as py_reads:
        with fastcache.patched(model, CONFIGS[kind](), spec=SPEC, process_group=world1) as h:
            _loop(model, x)  # allocate the cache buffers outside the measured run
            fastcache.reset(model)
            before = len(py_reads)
            with mode:
                _loop(model, x)
            reads = py_reads[before:]
            st = h.stats()["contexts"]["default"]
    assert 0 < st["skipped"] < STEPS  # both branches ran
    ours = [r for r in mode.reads + reads if r is not None]
    assert len(ours) == STEPS, ours
    assert all("flag.item()" in r for r in ours), ours


def test_eoc_reduces_on_a_teacache_base_only(world1, monkeypatch):
    """EOC's interior TeaCache base passes its sums through the group's reduction once per
    step and decides as without the group (one rank); its FORA base reduces nothing."""
    from support.zoo import reference_dit_case

    case = reference_dit_case()
    m = case.model
    y = torch.tensor([1, 2])
    g = torch.Generator().manual_seed(2)
    noise = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(6)]
    xs = [noise[0] + 0.02 * n for n in noise]  # a slowly moving input: the TeaCache base skips some steps
    ts = [torch.full((2,), 999.0 - 130 * s) for s in range(6)]
    prof = fastcache.calibrate(m, lambda: [m(x, t, y) for x, t in zip(noise, ts)], progress=False)
    calls = []
    reduce = fd.DecisionGroup.reduce
    monkeypatch.setattr(fd.DecisionGroup, "reduce", lambda self, s: calls.append(1) or reduce(self, s))
    for base, reduced in ((fastcache.TeaCacheConfig(threshold=0.3), True), (fastcache.FORAConfig(interval=2), False)):
        cfg = fastcache.EOCConfig(base=base, profile=prof, weight=0.5, threshold=0.0)
        out = {}
        for group in (None, world1):
            calls.clear()
            with torch.no_grad(), fastcache.patched(m, cfg, process_group=group) as h:
                ys = [m(x, t, y) for x, t in zip(xs, ts)]
                st = h.stats()
            out[group is None] = (ys, st["contexts"]["default"]["timeline"], len(calls), st.get("process_group"))
        (ys0, tl0, n0, _), (ys1, tl1, n1, pg) = out[True], out[False]
        assert n0 == 0 and n1 == (len(xs) if reduced else 0)
        assert pg["decisions_reduced"] is reduced
        assert tl1 == tl0
        if reduced:
            assert 0 < tl0.count(False), tl0
        for a, b in zip(ys1, ys0):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
