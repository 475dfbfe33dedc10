"""Every method fastcache ships, as data for the contract suite (``tests/contracts``) and
the README's methods x models table (``tests/test_readme.py``): adding a method here gives
it every contract on every family it supports; adding a family to ``support.zoo.CASES``
gives it every contract of every method.

``caching(profile, steps)``: a setting that caches on the zoo's tiny models;
``never_skip(profile, steps)``: the setting that computes everything (bitwise the model);
``families``: where it applies (None = every family); ``static``: the schedule depends on
the step alone (placed on the host when the step is announced: 0 host reads)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import fastcache


@dataclasses.dataclass(frozen=True)
class Method:
    config: str  # the config class's name
    caching: Callable
    never_skip: Callable
    families: frozenset | None = None
    static: bool = False
    needs_profile: bool = False
    invalid: dict = dataclasses.field(default_factory=dict)  # a field value the config must refuse
    #: the test ("file::function[id]") that already compiles this method's loop on the family the
    #: contract suite would compile it on, and checks at least as much (0 graph breaks, the eager
    #: output at the same or a tighter tolerance; it also counts the graphs and compares the
    #: timelines): the contract suite does not compile it a second time
    compiled_by: str | None = None

    def supports(self, family: str) -> bool:
        return self.families is None or family in self.families


F = fastcache
METHODS = {
    m.config: m
    for m in (
        Method(
            "TeaCacheConfig",
            lambda p, s: F.TeaCacheConfig(threshold=2.0),
            lambda p, s: F.TeaCacheConfig(threshold=0.0),
            invalid={"threshold": -1.0},
            compiled_by=(
                "tests/runtime/test_modes.py::"
                "test_aot_eager_keeps_the_cond_operator_whose_kernel_reads_the_flag[fastcache-dit]"
            ),
        ),
        Method(
            "FirstBlockCacheConfig",
            lambda p, s: F.FirstBlockCacheConfig(threshold=2.0),
            lambda p, s: F.FirstBlockCacheConfig(threshold=0.0),
            invalid={"fn": 0},
        ),
        Method(
            "FORAConfig",
            lambda p, s: F.FORAConfig(interval=2),
            lambda p, s: F.FORAConfig(interval=1),
            static=True,
            invalid={"interval": 0},
            compiled_by="tests/runtime/test_fora.py::test_fullgraph_compile_no_breaks_no_recompiles[fastcache-dit]",
        ),
        Method(
            "EOCConfig",
            lambda p, s: F.EOCConfig(base=F.FORAConfig(interval=2), profile=p, weight=1.0),
            lambda p, s: F.EOCConfig(base=F.FORAConfig(interval=1), profile=p, weight=1.0),
            static=True,
            needs_profile=True,
            invalid={"weight": -1.0},
        ),
        Method(
            "DeltaDiTConfig",
            lambda p, s: F.DeltaDiTConfig(interval=2, num_cached=1, boundary=2),
            lambda p, s: F.DeltaDiTConfig(interval=1, num_cached=1, boundary=2),
            static=True,
            invalid={"interval": 0},
            compiled_by=(
                "tests/runtime/test_delta_dit.py::test_fullgraph_compile_zero_breaks_no_recompiles[fastcache-dit-1-2]"
            ),
        ),
        Method(
            "TaylorSeerConfig",
            lambda p, s: F.TaylorSeerConfig(interval=2, order=1),
            lambda p, s: F.TaylorSeerConfig(interval=1, order=1),
            static=True,
            invalid={"order": -1},
            compiled_by=(
                "tests/runtime/test_taylorseer.py::test_fullgraph_compile_no_breaks_no_recompiles[fastcache-dit]"
            ),
        ),
        Method(
            "TGateConfig",
            lambda p, s: F.TGateConfig(gate_step=2, warm_up=1, sp_interval=1, fi_interval=1),
            lambda p, s: F.TGateConfig(gate_step=s, warm_up=1, sp_interval=1, fi_interval=1),
            # self-attention, ungated cross-attention, MLP (PixArt, Wan and its copies, Sana, LTX-Video)
            families=frozenset(
                {"diffusers-pixart", "diffusers-wan", "diffusers-chronoedit", "diffusers-skyreelsv2", "diffusers-sana"}
                | {"diffusers-ltx"}
            ),
            static=True,
            invalid={"gate_step": -1},
            compiled_by=(
                "tests/runtime/test_tgate.py::test_fullgraph_compile_no_breaks_no_recompiles[1-conds_per_step0]"
            ),
        ),
        Method(
            "MagCacheConfig",
            lambda p, s: F.MagCacheConfig(threshold=1.0, max_skips=2, profile=p),
            lambda p, s: F.MagCacheConfig(threshold=0.0, max_skips=2, profile=p),
            static=True,
            needs_profile=True,
            invalid={"max_skips": -1},
            compiled_by=(
                "tests/runtime/test_magcache.py::test_fullgraph_compile_one_cond_no_recompiles[fastcache-dit]"
            ),
        ),
        Method(
            "BlockCacheConfig",
            lambda p, s: F.BlockCacheConfig(delta=10.0, profile=p),
            lambda p, s: F.BlockCacheConfig(delta=0.0, profile=p),
            static=True,
            needs_profile=True,
            invalid={"delta": -1.0},
            compiled_by="tests/runtime/test_block_cache.py::test_fullgraph_compile_no_breaks_no_recompiles",
        ),
        Method(
            "SmoothCacheConfig",
            lambda p, s: F.SmoothCacheConfig(alpha=10.0, profile=p),
            lambda p, s: F.SmoothCacheConfig(alpha=0.0, profile=p),
            static=True,
            needs_profile=True,
            invalid={"alpha": -1.0},
        ),
        Method(
            "AdaCacheConfig",
            lambda p, s: F.AdaCacheConfig(codebook={10.0: 2}),
            lambda p, s: F.AdaCacheConfig(codebook={1.0: 1}, num_steps=s),
            invalid={"metric_block": -1},
        ),
        Method(
            "ScheduleConfig",
            lambda p, s: F.ScheduleConfig(plan="CC1C" + "1" * (s - 4)),
            lambda p, s: F.ScheduleConfig(plan="C" * s),
            static=True,
            invalid={"plan": "1C"},
        ),
    )
}
