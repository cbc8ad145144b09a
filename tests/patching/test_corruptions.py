from contextlib import nullcontext

import pytest
import torch

from vitlens_patch.images import gaussian_blur
from vitlens_patch.model.preprocess import DataConfig
from vitlens_patch.patching.corruptions import (
    CORRUPTIONS,
    corrupt,
    corrupt_blur,
    corrupt_grayscale,
    corrupt_patches,
    corrupt_pixel_noise,
)

# ImageNet statistics: far enough from (0.5, 0.5) that forgetting to denormalise shows
DATA_CONFIG = DataConfig(input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def images(pixels) -> torch.Tensor:
    return DATA_CONFIG.normalize(pixels)


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


@pytest.mark.usefixtures("without_type_checks")
def test_images_must_match_data_config():
    with pytest.raises(ValueError, match=r"images must be a float tensor \[batch, 3, height, width\]"):
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


def _patch_pixels(x, patch, patch_size=8, grid_w=4):
    row, col = divmod(patch, grid_w)
    return x[..., row * patch_size : (row + 1) * patch_size, col * patch_size : (col + 1) * patch_size]


@pytest.mark.parametrize("fill", ["zeros", "mean", "blur", "tensor"])
def test_patches_fill_only_the_chosen_patches(pixels, images, fill):
    grey = torch.full((3, 1, 1), 0.25)
    if fill == "tensor":
        fill = DATA_CONFIG.normalize(grey.expand(1, 3, 32, 32))
    # "mean" changed meaning (the image's own mean colour -> the normalisation's): one release's notice
    notice = pytest.warns(DeprecationWarning, match="fill 'mean' now means the normalisation's mean colour")
    with notice if isinstance(fill, str) and fill == "mean" else nullcontext():
        masked = corrupt_patches(images, DATA_CONFIG, [1, 6], patch_size=8, fill=fill)
    masked = DATA_CONFIG.denormalize(masked)
    expected = {
        "zeros": torch.zeros_like(pixels),
        "mean": torch.tensor(DATA_CONFIG.mean).view(3, 1, 1).expand_as(pixels),
        "blur": gaussian_blur(pixels, sigma=2.0),
    }.get(fill if isinstance(fill, str) else "tensor", grey.expand_as(pixels))
    for patch in range(16):
        want = _patch_pixels(expected if patch in (1, 6) else pixels, patch)
        assert torch.allclose(_patch_pixels(masked, patch), want, atol=1e-5), patch


def test_patches_keep_the_old_mean_fill_as_a_tensor(pixels, images):
    own_mean = corrupt_patches(images, DATA_CONFIG, [1], patch_size=8, fill=images.mean(dim=(2, 3), keepdim=True))
    expected = pixels.mean(dim=(-2, -1), keepdim=True).expand_as(pixels)
    got = DATA_CONFIG.denormalize(own_mean)
    assert torch.allclose(_patch_pixels(got, 1), _patch_pixels(expected, 1), atol=1e-5)
    assert torch.equal(_patch_pixels(own_mean, 0), _patch_pixels(images, 0))  # unmasked pixels untouched


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
        ([0], {"patch_size": 8, "fill": "noise"},
         r"fill must be one of \('zeros', 'mean', 'blur'\) or a tensor of normalised model input, got 'noise'"),
        ([0], {"patch_size": 5}, r"patch_size must divide the image size \(32, 32\), got 5"),
        ([99], {"patch_size": 8}, r"patches must be patch indices in \[0, 15\], got \[99\]"),
        (torch.zeros(3, 4, 4, dtype=torch.bool), {"patch_size": 8}, "must hold 2 masks"),
    ],
)
@pytest.mark.usefixtures("without_type_checks")
def test_patches_reject_bad_arguments(images, patches, kwargs, message):
    with pytest.raises(ValueError, match=message):
        corrupt_patches(images, DATA_CONFIG, patches, **kwargs)


# ---------------------------------------------------------------------------- dispatcher
@pytest.mark.filterwarnings("ignore:fill 'mean' now means:DeprecationWarning")  # tested in tests/test_images.py
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
