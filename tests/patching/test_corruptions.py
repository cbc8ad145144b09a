import pytest
import torch
import torch.nn.functional as F

from vitlens_patch.model.preprocess import DataConfig
from vitlens_patch.patching.corruptions import (
    CORRUPTIONS,
    EmbeddingNoise,
    corrupt,
    corrupt_blur,
    corrupt_grayscale,
    corrupt_patches,
    corrupt_pixel_noise,
    embedding_noise,
    gaussian_blur,
    measure_embedding_std,
    patch_mask,
)

# ImageNet statistics: far enough from (0.5, 0.5) that forgetting to denormalise shows
DATA_CONFIG = DataConfig(input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def images(pixels) -> torch.Tensor:
    return DATA_CONFIG.normalize(pixels)


def hook_embed_of(model, images, fwd_hooks=()):
    """hook_embed activations, with ``fwd_hooks`` applied to the run."""
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        _, cache = model.run_with_cache(images, names_filter="hook_embed")
    return cache["hook_embed"]


# ------------------------------------------------------------------------------ grayscale
def test_grayscale_channels_are_equal_in_pixel_space(images):
    gray = DATA_CONFIG.denormalize(corrupt_grayscale(images, DATA_CONFIG))
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5)
    assert torch.allclose(gray[:, 0], gray[:, 2], atol=1e-5)
    # in normalised space the channels differ, since each has its own mean and std
    normalised = corrupt_grayscale(images, DATA_CONFIG)
    assert not torch.allclose(normalised[:, 0], normalised[:, 1])


def test_grayscale_is_bt601_luma(pixels, images):
    red, green, blue = pixels.unbind(dim=1)
    gray = DATA_CONFIG.denormalize(corrupt_grayscale(images, DATA_CONFIG))
    assert torch.allclose(gray[:, 0], 0.299 * red + 0.587 * green + 0.114 * blue, atol=1e-5)


def test_grayscale_leaves_gray_images_unchanged(pixels):
    gray_images = DATA_CONFIG.normalize(pixels[:, :1].expand(-1, 3, -1, -1))
    assert torch.allclose(corrupt_grayscale(gray_images, DATA_CONFIG), gray_images, atol=1e-5)


def test_grayscale_needs_rgb():
    config = DataConfig(input_size=(1, 32, 32), mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="grayscale needs 3-channel"):
        corrupt_grayscale(torch.zeros(1, 1, 32, 32), config)


def test_images_must_match_data_config():
    with pytest.raises(ValueError, match=r"images must be normalised model input \[batch, 3"):
        corrupt_grayscale(torch.zeros(3, 32, 32), DATA_CONFIG)


# ---------------------------------------------------------------------------- pixel noise
def test_pixel_noise_is_reproducible(images):
    first = corrupt_pixel_noise(images, DATA_CONFIG, std=0.1, seed=3)
    assert torch.equal(first, corrupt_pixel_noise(images, DATA_CONFIG, std=0.1, seed=3))
    assert not torch.allclose(first, corrupt_pixel_noise(images, DATA_CONFIG, std=0.1, seed=4))


def test_pixel_noise_has_the_requested_std_in_pixel_space():
    mid_gray = DATA_CONFIG.normalize(torch.full((4, 3, 32, 32), 0.5))
    noisy = DATA_CONFIG.denormalize(corrupt_pixel_noise(mid_gray, DATA_CONFIG, std=0.05, seed=0))
    assert (noisy - 0.5).std().item() == pytest.approx(0.05, rel=0.05)
    assert (noisy - 0.5).mean().abs().item() < 0.005


def test_pixel_noise_keeps_pixels_in_range(images):
    noisy = DATA_CONFIG.denormalize(corrupt_pixel_noise(images, DATA_CONFIG, std=1.0))
    assert noisy.min() >= -1e-5 and noisy.max() <= 1 + 1e-5
    assert torch.allclose(corrupt_pixel_noise(images, DATA_CONFIG, std=0.0), images, atol=1e-5)


def test_pixel_noise_rejects_negative_std(images):
    with pytest.raises(ValueError, match="std must be >= 0, got -0.1"):
        corrupt_pixel_noise(images, DATA_CONFIG, std=-0.1)


# ----------------------------------------------------------------------------------- blur
def test_gaussian_blur_matches_a_direct_2d_convolution(pixels):
    sigma, size = 1.5, 7
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    kernel_1d = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel_2d = torch.outer(kernel_1d, kernel_1d) / kernel_1d.sum() ** 2
    direct = F.conv2d(pixels, kernel_2d.expand(3, 1, size, size), groups=3)  # no padding: interior
    blurred = gaussian_blur(pixels, sigma=sigma, kernel_size=size)
    assert torch.allclose(blurred[..., 3:-3, 3:-3], direct, atol=1e-5)


def test_gaussian_blur_keeps_constant_images_and_smooths(pixels):
    constant = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(constant, sigma=20.0), constant, atol=1e-6)
    assert gaussian_blur(pixels, sigma=2.0).std() < pixels.std() / 2


def test_blur_acts_in_pixel_space(pixels, images):
    blurred = DATA_CONFIG.denormalize(corrupt_blur(images, DATA_CONFIG, sigma=1.0))
    assert torch.allclose(blurred, gaussian_blur(pixels, sigma=1.0), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sigma": 0.0}, "sigma must be > 0, got 0.0"),
        ({"sigma": -1.0}, "sigma must be > 0, got -1.0"),
        ({"sigma": 1.0, "kernel_size": 4}, "kernel_size must be a positive odd integer, got 4"),
    ],
)
def test_blur_rejects_bad_arguments(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        corrupt_blur(images, DATA_CONFIG, **kwargs)


# ------------------------------------------------------------------------ patch masking
def test_patch_mask_from_indices_and_bools():
    mask = patch_mask([0, 5], (2, 3))
    assert mask.shape == (1, 2, 3)
    assert mask.flatten().nonzero().flatten().tolist() == [0, 5]
    per_image = torch.zeros(4, 2, 3, dtype=torch.bool)
    assert patch_mask(per_image, (2, 3)).shape == (4, 2, 3)
    assert not patch_mask([], (2, 3)).any()


@pytest.mark.parametrize(
    "patches, message",
    [
        ([0, 16], r"patches must be patch indices in \[0, 15\], got \[16\]"),
        ([-1], r"patches must be patch indices in \[0, 15\], got \[-1\]"),
        (torch.zeros(3, 4, dtype=torch.bool), r"a bool patches mask must have shape \[4, 4\]"),
        (torch.tensor([1.5]), "patches must be integer patch indices or a bool mask"),
    ],
)
def test_patch_mask_rejects_bad_patches(patches, message):
    with pytest.raises(ValueError, match=message):
        patch_mask(patches, (4, 4))


def _patch_pixels(x, patch, patch_size=8, grid_w=4):
    row, col = divmod(patch, grid_w)
    return x[..., row * patch_size : (row + 1) * patch_size, col * patch_size : (col + 1) * patch_size]


@pytest.mark.parametrize("fill", ["zeros", "mean", "blur"])
def test_patches_fill_only_the_chosen_patches(pixels, images, fill):
    masked = corrupt_patches(images, DATA_CONFIG, [1, 6], patch_size=8, fill=fill)
    masked = DATA_CONFIG.denormalize(masked)
    expected = {
        "zeros": torch.zeros_like(pixels),
        "mean": pixels.mean(dim=(-2, -1), keepdim=True).expand_as(pixels),
        "blur": gaussian_blur(pixels, sigma=2.0),
    }[fill]
    for patch in range(16):
        want = _patch_pixels(expected if patch in (1, 6) else pixels, patch)
        assert torch.allclose(_patch_pixels(masked, patch), want, atol=1e-5), patch


def test_patches_accept_a_mask_per_image(pixels, images):
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = mask[1, 3, 3] = True
    masked = DATA_CONFIG.denormalize(corrupt_patches(images, DATA_CONFIG, mask, patch_size=(8, 8)))
    assert _patch_pixels(masked[0], 0).abs().max() < 1e-5
    assert torch.allclose(_patch_pixels(masked[0], 15), _patch_pixels(pixels[0], 15), atol=1e-5)
    assert _patch_pixels(masked[1], 15).abs().max() < 1e-5
    assert torch.allclose(_patch_pixels(masked[1], 0), _patch_pixels(pixels[1], 0), atol=1e-5)


@pytest.mark.parametrize(
    "patches, kwargs, message",
    [
        ([0], {"patch_size": 8, "fill": "noise"}, r"fill must be one of \('zeros', .*got 'noise'"),
        ([0], {"patch_size": 5}, r"patch_size must divide the image size \(32, 32\), got 5"),
        ([99], {"patch_size": 8}, r"patches must be patch indices in \[0, 15\], got \[99\]"),
        (torch.zeros(3, 4, 4, dtype=torch.bool), {"patch_size": 8}, "must hold 2 masks"),
    ],
)
def test_patches_reject_bad_arguments(images, patches, kwargs, message):
    with pytest.raises(ValueError, match=message):
        corrupt_patches(images, DATA_CONFIG, patches, **kwargs)


# ---------------------------------------------------------------------------- dispatcher
@pytest.mark.parametrize(
    "name, kwargs",
    [("grayscale", {}), ("pixel_noise", {"std": 0.2, "seed": 1}), ("blur", {"sigma": 1.0}),
     ("patches", {"patches": [3], "fill": "mean"})],
)
def test_corrupt_by_name_calls_the_corruption(tiny_model, tiny_images, name, kwargs):
    direct_kwargs = {**kwargs, "patch_size": 8} if name == "patches" else kwargs
    expected = CORRUPTIONS[name](tiny_images, tiny_model.data_config, **direct_kwargs)
    assert torch.equal(corrupt(tiny_model, tiny_images, name, **kwargs), expected)


def test_corrupt_accepts_a_callable(tiny_model, tiny_images):
    corrupted = corrupt(tiny_model, tiny_images, lambda x, scale: x * scale, scale=-1.0)
    assert torch.equal(corrupted, -tiny_images)


def test_corrupt_rejects_unknown_names_and_bad_callables(tiny_model, tiny_images):
    with pytest.raises(ValueError, match="corruption must be one of .*'grayscale'.*got 'sepia'"):
        corrupt(tiny_model, tiny_images, "sepia")
    with pytest.raises(ValueError, match=r"shaped like images \(3, 3, 32, 32\), got \(3, 3\)"):
        corrupt(tiny_model, tiny_images, lambda x: x[:, :, 0, 0])


# ------------------------------------------------------------------------ embedding noise
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
    with pytest.raises(ValueError, match="n_images must be >= 1 or None, got 0"):
        embedding_noise(tiny_model, level=1.0, n_images=0)
    with pytest.raises(ValueError, match=r"patches must be patch indices in \[0, 15\], got \[16\]"):
        embedding_noise(tiny_model, patches=[16], level=1.0)
