"""fastcache.calibrate / fastcache.Profile: the prior is the per-step mean of every
branch output over the runs (Eq. 4), the model's output is untouched, the profile
round-trips through safetensors and is refused for another model or step count."""

import numpy as np
import pytest
import torch
from support.zoo import CASES, reference_dit_case

import fastcache
from fastcache.tuning import calibration


def _hooked_branch_means(model, run, steps, runs):
    """Hand computation: forward hooks on each block's attn and mlp modules."""
    outs = {}
    hooks = []
    for li, blk in enumerate(model.blocks):
        for b, mod in (("attn", blk.attn), ("mlp", blk.mlp)):
            hooks.append(mod.register_forward_hook(lambda m_, a, o, key=(li, b): outs.setdefault(key, []).append(o)))
    try:
        result = run()
    finally:
        for h in hooks:
            h.remove()
    K = 2 * len(model.blocks)
    prior = torch.zeros(steps, K, outs[0, "attn"][0].shape[-1])
    for (li, b), seq in outs.items():
        k = 2 * li + (b == "mlp")
        for i, o in enumerate(seq):
            prior[i % steps, k] += o.float().mean(dim=(0, 1)) / runs
    return prior, result


def test_prior_is_the_per_step_branch_mean_and_output_is_untouched():
    case = reference_dit_case()
    m = case.model

    def run():
        return case.sample(steps=6), case.sample(steps=6, seed=4)

    want, ref = _hooked_branch_means(m, run, 6, 2)
    seen = []
    prof = fastcache.calibrate(m, lambda: seen.extend(run()), progress=False)
    # calibrate leaves the model as it was, and the outputs under it equal the unpatched ones
    assert torch.equal(seen[0], ref[0]) and torch.equal(seen[1], ref[1])
    assert "forward" not in m.__dict__
    assert prof.prior.shape == (6, 6, 32) and prof.slots[:2] == ["0.attn.x", "0.mlp.x"]
    torch.testing.assert_close(prof.prior, want, rtol=1e-5, atol=1e-6)
    assert prof.meta["runs"] == 2
    assert len(prof.meta["timesteps"]) == 6 and prof.meta["timesteps"][0] > prof.meta["timesteps"][-1]


def test_round_trip_and_teacache_pairs(tmp_path):
    case = reference_dit_case()
    m = case.model
    with calibration.recording(m) as rec:
        case.sample(steps=6)
    prof = fastcache.calibrate(m, lambda: case.sample(steps=6), scheduler="DDIMScheduler", progress=False)
    np.testing.assert_allclose(prof.teacache_pairs, rec.pairs, rtol=1e-6)
    assert prof.fit_teacache(degree=2) == pytest.approx(rec.fit(degree=2))
    path = prof.save(tmp_path / "p.safetensors")
    back = fastcache.Profile.load(path)
    assert torch.equal(back.prior, prof.prior)
    assert back.slots == prof.slots and back.meta == prof.meta and back.meta["scheduler"] == "DDIMScheduler"
    np.testing.assert_array_equal(back.teacache_pairs, prof.teacache_pairs)
    # a path works as EOCConfig.profile
    cfg = fastcache.EOCConfig(base=fastcache.FORAConfig(interval=2), profile=str(path))
    assert cfg.profile.num_steps == 6 and cfg.to_dict()["profile"]["slots"] == len(prof.slots)


def test_refused_for_another_model_or_step_count(tmp_path):
    case = reference_dit_case()
    prof = fastcache.calibrate(case.model, lambda: case.sample(steps=6), progress=False)
    path = prof.save(tmp_path / "p.safetensors")
    dit = CASES["diffusers-dit"]()
    with pytest.raises(ValueError, match="made for DiT .* not for this DiTTransformer2DModel"):
        fastcache.patch(dit.model, fastcache.EOCConfig(base=fastcache.FORAConfig(), profile=path))
    from fastcache.models import DiT

    wider = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="config hash"):
        fastcache.patch(wider, fastcache.EOCConfig(base=fastcache.FORAConfig(), profile=path))
    with pytest.raises(ValueError, match="recorded over 6-step runs"):
        fastcache.EOCConfig(base=fastcache.FORAConfig(), profile=path, num_steps=20)
    with pytest.raises(FileNotFoundError, match="no profile at"):
        fastcache.Profile.load(tmp_path / "missing.safetensors")


def test_token_granularity_and_run_length_checks():
    case = reference_dit_case()
    prof = fastcache.calibrate(case.model, lambda: case.sample(steps=5), granularity="token", progress=False)
    assert prof.prior.shape == (5, 6, 16, 32)  # (S, K, N, D)
    with fastcache.patched(
        case.model, fastcache.EOCConfig(base=fastcache.FORAConfig(interval=2), profile=prof, weight=0.5, threshold=0.0)
    ):
        case.sample(steps=5)
        assert fastcache.stats(case.model)["contexts"]["default"]["corrected"] > 0
    with pytest.raises(ValueError, match="different numbers of steps"):
        fastcache.calibrate(case.model, lambda: (case.sample(steps=5), case.sample(steps=4)), progress=False)
    with pytest.raises(ValueError, match="granularity"):
        fastcache.calibrate(case.model, lambda: None, granularity="pixel", progress=False)


def test_curves_round_trip_and_format_1_files_still_load(tmp_path):
    """Format 2 stores MagCache's gamma (S,) and Block Caching's Delta (S, L); a format-1
    file (no curves) loads with both None and the configs needing them refuse it."""
    import json

    from safetensors.torch import save_file

    from fastcache.tuning import profile as profile_mod

    case = reference_dit_case()
    prof = fastcache.calibrate(case.model, lambda: case.sample(steps=6), progress=False)
    assert prof.mag_ratios.shape == (6,) and prof.block_change.shape == (6, 3)
    K = len(prof.slots)
    assert prof.step_gram.shape == (K, 6, 6)
    assert prof.nbytes() == (prof.prior.numel() + 6 + 18) * 4 + K * 36 * 8
    back = fastcache.Profile.load(prof.save(tmp_path / "p.safetensors"))
    assert torch.equal(back.mag_ratios, prof.mag_ratios) and torch.equal(back.block_change, prof.block_change)
    assert fastcache.MagCacheConfig(profile=back).schedule() == fastcache.MagCacheConfig(profile=prof).schedule()
    # a format-1 file, as the previous version wrote it
    meta = {"format": "1", "meta": json.dumps(prof.meta, sort_keys=True), "slots": json.dumps(prof.slots)}
    tensors = {"prior": prof.prior, "teacache_pairs": torch.from_numpy(prof.teacache_pairs.copy())}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=meta)
    v1 = fastcache.Profile.load(tmp_path / "v1.safetensors")
    assert v1.mag_ratios is None and v1.block_change is None and torch.equal(v1.prior, prof.prior)
    fastcache.EOCConfig(base=fastcache.FORAConfig(), profile=v1)  # EOC needs only the prior
    with pytest.raises(ValueError, match="no mag_ratios curve"):
        fastcache.MagCacheConfig(profile=v1)
    with pytest.raises(ValueError, match="no block_change curve"):
        fastcache.BlockCacheConfig(profile=v1)
    # an unknown format is refused clearly
    meta["format"] = str(profile_mod.FORMAT_VERSION + 1)
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="not a fastcache profile this version reads"):
        fastcache.Profile.load(tmp_path / "v9.safetensors")
    with pytest.raises(ValueError, match="mag_ratios has shape"):
        fastcache.Profile(prof.prior, prof.slots, prof.meta, mag_ratios=torch.ones(5))
