"""Patching API: reversibility, refusals, contexts, invalidation, stats, config checks."""

import pytest
import torch
from support.zoo import ToyDualStreamBlock, dit_case, flux_case, reference_dit_case
from torch import nn

import fastcache
from fastcache.ops.reference import modulated_rel_l1_sums


@pytest.fixture(scope="module")
def dit():
    return dit_case()


def test_remove_restores_forward_state_dict_and_outputs(dit):
    m = dit.model
    before_sd = {k: v.clone() for k, v in m.state_dict().items()}
    ref = dit.sample(steps=6)
    forwards = [m.__dict__.get("forward")] + [b.__dict__.get("forward") for b in m.transformer_blocks]
    h = fastcache.patch(m, fastcache.TeaCacheConfig(threshold=0.5, num_steps=6))
    assert "forward" in m.__dict__ and all("forward" in b.__dict__ for b in m.transformer_blocks)
    assert list(m.state_dict()) == list(before_sd)  # patching adds no parameters or buffers
    dit.sample(steps=6)
    h.remove()
    assert [m.__dict__.get("forward")] + [b.__dict__.get("forward") for b in m.transformer_blocks] == forwards
    sd = m.state_dict()
    assert list(sd) == list(before_sd)
    assert all(torch.equal(sd[k], before_sd[k]) for k in sd)
    assert torch.equal(dit.sample(steps=6), ref)
    h.remove()  # idempotent


def test_remove_restores_a_foreign_instance_forward(dit):
    m = dit.model
    calls = []

    def hooked(*a, **k):
        calls.append(1)
        return type(m).forward(m, *a, **k)

    m.forward = hooked
    try:
        with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.0)):
            dit.sample(steps=2)
        assert m.__dict__["forward"] is hooked
        n = len(calls)
        dit.sample(steps=2)
        assert len(calls) == n + 2
    finally:
        del m.forward


def test_double_patch_is_refused_and_unpatch_works(dit):
    m = dit.model
    fastcache.patch(m, fastcache.TeaCacheConfig(threshold=0.1))
    with pytest.raises(RuntimeError, match="already patched.*unpatch"):
        fastcache.patch(m, fastcache.TeaCacheConfig(threshold=0.2))
    fastcache.unpatch(m)
    with pytest.raises(ValueError, match="not patched"):
        fastcache.unpatch(m)
    with pytest.raises(ValueError, match="not patched"):
        fastcache.stats(m)


def test_unsupported_model_error_names_supported_and_register():
    with pytest.raises(TypeError) as e:
        fastcache.patch(nn.Linear(2, 2), fastcache.TeaCacheConfig())
    msg = str(e.value)
    for cls in ("DiTTransformer2DModel", "FluxTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel"):
        assert cls in msg
    assert "fastcache.register" in msg


def test_bad_arguments():
    with pytest.raises(TypeError, match="TeaCacheConfig"):
        fastcache.patch(dit_case().model, {"threshold": 0.1})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(threshold=-1), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(coefficients=[1.0] * 9), "coefficients"),
        (dict(coefficients=["a"]), "coefficients"),
        (dict(warmup_steps=0), "warmup_steps"),
        (dict(max_consecutive_skips=-1), "max_consecutive_skips"),
        (dict(num_steps=0), "num_steps"),
        (dict(history=0), "history"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastcache.TeaCacheConfig(**kwargs)


def test_config_roundtrip():
    c = fastcache.TeaCacheConfig(threshold=0.25, coefficients=[1, 2, 3], num_steps=28)
    assert c.coefficients == (1.0, 2.0, 3.0)
    assert fastcache.CacheConfig.from_dict(c.to_dict()) == c


def test_flux_default_coefficients_and_refused_controlnet():
    case = flux_case()
    with fastcache.patched(case.model, fastcache.TeaCacheConfig(threshold=0.3)) as h:
        assert h.policy.coefficients == fastcache.families.flux.TEACACHE_COEFFICIENTS
        kw = case.inputs(case.latents(torch.Generator().manual_seed(0)), torch.tensor(900.0))
        kw["controlnet_block_samples"] = [torch.zeros(2, 16, 32)]
        with pytest.raises(ValueError, match="controlnet_block_samples"):
            case.model(**kw)


def test_batch_size_change_invalidates_cache():
    """A new shape mid-run must recompute (and never add a residual of another shape)."""
    case = dit_case(B=3)
    m = case.model
    sch = case.scheduler()
    sch.set_timesteps(8)
    x = case.latents(torch.Generator().manual_seed(0))
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=10.0, num_steps=8)):  # skips whenever allowed
        with torch.no_grad():
            m(**case.inputs(x, sch.timesteps[0]))
            m(**case.inputs(x, sch.timesteps[1]))  # skipped
            assert fastcache.stats(m)["contexts"]["default"]["skipped"] == 1
            out = m(**case.inputs(x[:2], sch.timesteps[2])).sample  # batch 3 -> 2
            st = fastcache.stats(m)["contexts"]["default"]
    with torch.no_grad():
        ref = m(**case.inputs(x[:2], sch.timesteps[2])).sample
    assert torch.equal(out, ref)
    assert st["timeline"] == [True]  # fresh state for the new shape: a computed step


def test_dtype_change_invalidates_cache():
    case = reference_dit_case()
    m = case.model
    x = case.latents(torch.Generator().manual_seed(0))
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=10.0)):
        with torch.no_grad():
            m(**case.inputs(x, torch.tensor(900.0)))
            m(**case.inputs(x, torch.tensor(850.0)))
            m.to(torch.float64)
            out = m(**case.inputs(x.double(), torch.tensor(800.0)))
            m.to(torch.float32)
        h = fastcache.get_patch(m).contexts["default"]
        assert h.prev.dtype == torch.float64
    with torch.no_grad():
        ref = m.to(torch.float64)(**case.inputs(x.double(), torch.tensor(800.0)))
        m.to(torch.float32)
    assert torch.equal(out, ref)


def test_cfg_contexts_keep_separate_state():
    """Separately-called cond/uncond branches: each context must behave exactly like its
    own patched model."""
    case = reference_dit_case()
    m = case.model
    sch = case.scheduler()
    sch.set_timesteps(10)
    x0 = case.latents(torch.Generator().manual_seed(0))
    null = torch.full((2,), 10)
    cfg = fastcache.TeaCacheConfig(threshold=0.3, num_steps=10)

    def loop(ctx_for):
        x = x0.clone()
        with torch.no_grad():
            for t in sch.timesteps:
                tt = t.expand(2)
                with ctx_for("cond"):
                    ec = m(x, tt, torch.tensor([1, 2]))
                with ctx_for("uncond"):
                    eu = m(x, tt, null)
                x = sch.step(eu + 3.0 * (ec - eu), t, x).prev_sample
        return x

    with fastcache.patched(m, cfg):
        out = loop(lambda name: fastcache.context(m, name))
        st = fastcache.stats(m)["contexts"]
    assert set(st) == {"default", "cond", "uncond"}
    assert st["default"]["steps"] == 0

    # the same run with one patched copy per branch
    import copy

    mc, mu = copy.deepcopy(m), copy.deepcopy(m)
    with fastcache.patched(mc, cfg), fastcache.patched(mu, cfg):
        x = x0.clone()
        with torch.no_grad():
            for t in sch.timesteps:
                tt = t.expand(2)
                ec, eu = mc(x, tt, torch.tensor([1, 2])), mu(x, tt, null)
                x = sch.step(eu + 3.0 * (ec - eu), t, x).prev_sample
        sc, su = fastcache.stats(mc)["contexts"]["default"], fastcache.stats(mu)["contexts"]["default"]
    assert torch.equal(out, x)
    assert st["cond"]["timeline"] == sc["timeline"] and st["uncond"]["timeline"] == su["timeline"]
    assert st["cond"]["timeline"] != st["uncond"]["timeline"] or st["cond"]["rel_l1"] != st["uncond"]["rel_l1"]


def test_stats_and_reset(dit):
    m = dit.model
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.3, num_steps=12)) as h:
        dit.sample(steps=12)
        s = fastcache.stats(m)
        d = s["contexts"]["default"]
        assert s["policy"] == "teacache" and s["model"] == "diffusers-dit"
        assert d["computed"] + d["skipped"] == d["steps"] == 12 == len(d["timeline"])
        assert d["computed"] == sum(d["timeline"])
        st = h.contexts["default"]
        bufs = (st.prev, st.residuals["hidden_states"], st.state, st.coeffs, st.aux, *st.out.values())
        expected = sum(b.nbytes for b in bufs)
        assert d["cache_bytes"] == expected > 0
        fastcache.reset(m)
        d = fastcache.stats(m)["contexts"]["default"]
        assert d["steps"] == 0 and d["runs"] == 0
        assert torch.count_nonzero(st.residuals["hidden_states"]) == 0


def test_max_consecutive_skips_and_warmup(dit):
    cfg = fastcache.TeaCacheConfig(threshold=100.0, num_steps=12, warmup_steps=3, max_consecutive_skips=2)
    with fastcache.patched(dit.model, cfg):
        dit.sample(steps=12)
        tl = fastcache.stats(dit.model)["contexts"]["default"]["timeline"]
    assert tl == [True, True, True, False, False, True, False, False, True, False, False, True]


def test_blocks_called_outside_model_forward_error(dit):
    with fastcache.patched(dit.model, fastcache.TeaCacheConfig()):
        with pytest.raises(RuntimeError, match="outside its model's forward"):
            dit.model.transformer_blocks[0](
                torch.randn(2, 16, 32), timestep=torch.tensor([1, 1]), class_labels=torch.tensor([0, 1])
            )


def test_register_custom_dual_stream_model():
    """A user model registered by spec, with two cached streams (both used after the stack)."""

    class Toy(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.emb = nn.Linear(1, d)
            self.layers = nn.ModuleList([ToyDualStreamBlock(d) for _ in range(3)])

        def forward(self, a, b, t):
            e = self.emb(t[:, None].float() / 1000)
            for blk in self.layers:
                a, b = blk(a, b, e)
            return a + b.mean(1, keepdim=True)

    spec = fastcache.register(
        fastcache.ModelSpec(
            name="toy-dual",
            model_types=(Toy,),
            segments=("layers",),
            streams=("a", "b"),
            returns=("a", "b"),
            cached_streams=("a", "b"),
            modulation=lambda blk, call: (call["a"], *blk.mod(call["emb"]).chunk(2, 1), blk.norm1.eps),
            timestep_arg="t",
        )
    )
    assert fastcache.specs.find_spec(Toy()) is spec
    torch.manual_seed(0)
    m = Toy().eval()
    a, b = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    ts = [torch.full((2,), v) for v in (900.0, 899.0, 898.0)]
    with torch.no_grad():
        with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=1.0)) as h:
            o0 = m(a, b, ts[0])
            o1 = m(a, b, ts[1])  # same inputs, tiny timestep change: skipped
            tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
            ra, rb = h.contexts["default"].residuals["a"].clone(), h.contexts["default"].residuals["b"].clone()
        ref0 = m(a, b, ts[0])
        e = m.emb(ts[1][:, None] / 1000)
        a_ref, b_ref = a, b
        for blk in m.layers:
            a_ref, b_ref = blk(a_ref, b_ref, e)
    assert tl == [True, False]
    assert torch.equal(o0, ref0)
    # both streams cached from the computed step and reused on the skipped one
    torch.testing.assert_close(o1, (a + ra) + (b + rb).mean(1, keepdim=True))
    assert not torch.equal(ra, torch.zeros_like(ra)) and not torch.equal(rb, torch.zeros_like(rb))
    fastcache.specs._REGISTRY.remove(spec)


def test_indicator_matches_reference_formula():
    """The spec's modulation feeds the same indicator TeaCache defines (checked on DiT)."""
    case = dit_case()
    blk = case.model.transformer_blocks[0]
    x = torch.randn(2, 16, 32)
    call = {"hidden_states": x, "timestep": torch.tensor([500, 500]), "class_labels": torch.tensor([1, 2])}
    spec = fastcache.specs.find_spec(case.model)
    xx, shift, scale, eps, *_ = spec.modulation(blk, call)
    prev = torch.zeros_like(x)
    with torch.no_grad():
        modulated_rel_l1_sums(xx, shift, scale, eps, prev)
        expected = blk.norm1(x, call["timestep"], call["class_labels"], hidden_dtype=x.dtype)[0]
    torch.testing.assert_close(prev, expected, rtol=1e-5, atol=1e-5)


def test_patch_and_stats_accept_a_compiled_wrapper():
    case = reference_dit_case()
    compiled = torch.compile(case.model)  # not run: only the wrapper is needed
    with fastcache.patched(compiled, fastcache.TeaCacheConfig(threshold=0.0)):
        assert fastcache.get_patch(case.model) is fastcache.get_patch(compiled)
        case.sample(steps=2)
        assert fastcache.stats(compiled)["contexts"]["default"]["computed"] == 2
