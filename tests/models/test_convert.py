"""The reference DiT as diffusers' DiTTransformer2DModel (fastcache.models.convert), and SSIM."""

from __future__ import annotations

import pytest
import torch

from fastcache.models import DiT, load_digits_dit, sample_digits
from fastcache.models.convert import DiffusersDiT, dit_to_diffusers
from fastcache.models.metrics import ssim

pytest.importorskip("diffusers")


def _random_dit(seed=0):
    torch.manual_seed(seed)
    m = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=64, depth=3, num_heads=4).eval()
    for p in m.parameters():  # adaLN-Zero starts at zero: give every weight a value
        torch.nn.init.normal_(p, std=0.05)
    return m


@pytest.mark.parametrize("which", ["digits", "random"])
def test_converted_model_is_the_same_function(which):
    m = load_digits_dit() if which == "digits" else _random_dit()
    cfg = m.config
    d = dit_to_diffusers(m)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.tensor([999, 500, 10, 0])
    y = torch.tensor([0, 3, 7, cfg.num_classes])
    with torch.no_grad():
        a = m(x, t, y)
        b = d(hidden_states=x, timestep=t, class_labels=y, return_dict=False)[0]
    assert a.abs().max() > 0.1
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_converted_sampling_matches_and_caches_run_on_it():
    import fastcache

    m = load_digits_dit()
    w = DiffusersDiT(m)
    labels = torch.arange(4)
    ref = sample_digits(m, labels, num_steps=6, generator=torch.Generator().manual_seed(0))
    out = sample_digits(w, labels, num_steps=6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with fastcache.patched(w.transformer, fastcache.FORAConfig(interval=2)):
        cached = sample_digits(w, labels, num_steps=6, generator=torch.Generator().manual_seed(0))
        st = fastcache.stats(w.transformer)["contexts"]["cfg"]  # the wrapper's context name
    assert st["timeline"] == [True, False, True, False, True, False]  # FORA 2: steps 0, 2, 4
    assert not torch.equal(cached, ref)


def test_conversion_refuses_an_mlp_it_cannot_express():
    m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=1, num_heads=4, mlp_ratio=2.0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        dit_to_diffusers(m)


def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    small = ssim(x, x + 0.05 * torch.randn(x.shape, generator=g))
    large = ssim(x, x + 0.5 * torch.randn(x.shape, generator=g))
    assert (small > large).all() and (small < 1).all()
    assert torch.allclose(ssim(x, -x), ssim(-x, x))  # symmetric
    with pytest.raises(ValueError, match="smaller than"):
        ssim(x[..., :8, :8], x[..., :8, :8])


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ours = ssim(x, y)
    for i in range(2):
        ref = metrics.structural_similarity(
            x[i, 0].double().numpy(),
            y[i, 0].double().numpy(),
            data_range=2.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert abs(float(ours[i]) - ref) < 1e-9
