"""ROME-style embedding noise: its level, its patches, its draws."""

import pytest
import torch

from vitlens_patch.patching.embedding_noise import EmbeddingNoise, embedding_noise, measure_embedding_std


def hook_embed_of(model, images, fwd_hooks=()):
    """hook_embed activations, with ``fwd_hooks`` applied to the run."""
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        _, cache = model.run_with_cache(images, names_filter="hook_embed")
    return cache["hook_embed"]


def test_embedding_noise_s3_uses_the_measured_std(tiny_model, tiny_images):
    measured = hook_embed_of(tiny_model, tiny_images).std().item()
    assert measure_embedding_std(tiny_model, tiny_images) == pytest.approx(measured)
    noise = embedding_noise(tiny_model, level="s3", reference=tiny_images)
    assert noise.std == pytest.approx(3 * measured)
    half = embedding_noise(tiny_model, level="s0.5", reference=tiny_images)
    assert half.std == pytest.approx(0.5 * measured)
    # and the drawn noise has that standard deviation
    wide = embedding_noise(tiny_model, level="s3", reference=tiny_images, n_images=64)
    assert wide.noise.std().item() == pytest.approx(3 * measured, rel=0.05)


def test_embedding_noise_numeric_level_is_the_std(tiny_model):
    noise = embedding_noise(tiny_model, level=0.25)
    assert noise.std == 0.25
    assert noise.noise.shape == (1, 16, tiny_model.cfg.d_model)
    assert noise.noise.device == tiny_model.device and noise.noise.dtype == tiny_model.dtype


def test_embedding_noise_touches_only_the_chosen_patches(tiny_model, tiny_images):
    noise = embedding_noise(tiny_model, patches=[2, 7], level=1.0)
    assert noise.hook[0] == "hook_embed"
    clean = hook_embed_of(tiny_model, tiny_images)
    noisy = hook_embed_of(tiny_model, tiny_images, [noise.hook])
    changed = (noisy - clean).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [2, 7]
    # one draw shared by every image by default
    assert torch.allclose(noisy[0] - clean[0], noisy[2] - clean[2], atol=1e-6)


def test_embedding_noise_is_reproducible(tiny_model, tiny_images):
    first = embedding_noise(tiny_model, level="s3", reference=tiny_images, seed=5)
    again = embedding_noise(tiny_model, level="s3", reference=tiny_images, seed=5)
    other = embedding_noise(tiny_model, level="s3", reference=tiny_images, seed=6)
    assert torch.equal(first.noise, again.noise)
    assert not torch.allclose(first.noise, other.noise)
    logits = [tiny_model.run_with_hooks(tiny_images, fwd_hooks=[n.hook]) for n in (first, again)]
    assert torch.equal(logits[0], logits[1])
    assert not torch.allclose(logits[0], tiny_model(tiny_images))


def test_embedding_noise_per_image_and_stacked_copies(tiny_model, tiny_images):
    noise = embedding_noise(tiny_model, level=1.0, n_images=3)
    assert not torch.allclose(noise.noise[0], noise.noise[1])
    stacked = torch.cat([tiny_images] * 2)
    delta = hook_embed_of(tiny_model, stacked, [noise.hook]) - hook_embed_of(tiny_model, stacked)
    assert torch.allclose(delta[:3], noise.noise, atol=1e-5)
    assert torch.allclose(delta[3:], noise.noise, atol=1e-5)
    with pytest.raises(ValueError, match="batch must be a multiple of the noise batch 3, got 2"):
        noise.add_noise(torch.zeros(2, 16, tiny_model.cfg.d_model))


def test_embedding_noise_per_image_patch_masks(tiny_model):
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = mask[1, 0, 1] = True
    noise = embedding_noise(tiny_model, patches=mask, level=1.0)
    assert isinstance(noise, EmbeddingNoise)
    assert (noise.noise.abs().amax(dim=-1) > 0).tolist() == [
        [p == 0 for p in range(16)], [p == 1 for p in range(16)]
    ]
    with pytest.raises(ValueError, match="n_images must match the 2 per-image patches masks, got 3"):
        embedding_noise(tiny_model, patches=mask, level=1.0, n_images=3)


@pytest.mark.parametrize("level", ["x3", "s", "3", "s-1", "s3x", -0.5, float("nan")])
def test_embedding_noise_rejects_malformed_levels(tiny_model, tiny_images, level):
    with pytest.raises(ValueError, match="level must be a number >= 0 or \"sK\""):
        embedding_noise(tiny_model, level=level, reference=tiny_images)


def test_embedding_noise_rejects_other_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="reference images must be given .* level 's3'"):
        embedding_noise(tiny_model, level="s3")
    with pytest.raises(ValueError, match="n_images must be a positive int or None, got 0"):
        embedding_noise(tiny_model, level=1.0, n_images=0)
    with pytest.raises(ValueError, match=r"patches must be patch indices in \[0, 15\], got \[16\]"):
        embedding_noise(tiny_model, patches=[16], level=1.0)
