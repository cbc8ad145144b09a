"""Argument checks and shared helpers of the Attributor interface."""

import pytest
import torch

from vitlens_patch.attribution import (
    Attributor,
    get_attributor,
    make_baseline,
    patches_to_grid,
    upsample_maps,
)
from vitlens_patch.patching.corruptions import corrupt_patches


@pytest.fixture
def rollout(tiny_model):
    return get_attributor("rollout", tiny_model, progress=False)


def test_base_class_needs_an_implementation(tiny_model, tiny_images):
    with pytest.raises(NotImplementedError, match="Attributor must implement _attribute"):
        Attributor(tiny_model).attribute(tiny_images)


def test_capabilities_default_to_a_target_specific_forward_only_method(tiny_model):
    method = Attributor(tiny_model)
    assert method.uses_target and not method.requires_gradients


@pytest.mark.parametrize("images, message", [
    (torch.randn(2, 3, 16, 16),
     r"images must be a float tensor \[batch, 3, 32, 32\] with batch >= 1 .* got torch.float32 tensor of shape \(2, 3, 16, 16\)"),
    (torch.randn(3, 32, 32), r"images must be a float tensor \[batch, 3, 32, 32\].*shape \(3, 32, 32\)"),
    (torch.randn(0, 3, 32, 32), r"with batch >= 1 .* shape \(0, 3, 32, 32\)"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
     r"images must be a float tensor .*normalised model inputs.* got torch.uint8"),
    ([[0.0]], "images must be a float tensor .* got list"),
])
@pytest.mark.usefixtures("without_type_checks")
def test_bad_images_are_rejected(images, message, rollout):
    with pytest.raises(ValueError, match=message):
        rollout.attribute(images)


@pytest.mark.parametrize("target, message", [
    (-1, r"target must hold class indices in \[0, 9\], got \[-1\]"),
    (torch.tensor([1, 12, 12]), r"target must hold class indices in \[0, 9\], got \[12\]"),
    (torch.tensor([1, 2]),
     r"target must be None, an int or an integer tensor of shape \[batch\] = \[3\], got .* shape \(2,\)"),
    (torch.tensor([1.0, 2.0, 3.0]), "target must be None, an int or an integer tensor"),
    (True, "target must be None, an int or an integer tensor"),
    ("cat", "target must be None, an int or an integer tensor"),
])
@pytest.mark.usefixtures("without_type_checks")
def test_bad_targets_are_rejected(target, message, tiny_model, tiny_images):
    with pytest.raises(ValueError, match=message):
        get_attributor("occlusion", tiny_model, progress=False).attribute(tiny_images, target)


@pytest.mark.parametrize("options, message", [
    ({"upsample": "nearest"}, r"upsample must be False or one of \('bilinear', 'bicubic'\), got 'nearest'"),
    ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ({"batch_size": 2.5}, "batch_size must be a positive int, got 2.5"),
    ({"score": "accuracy"}, "score must be 'prob', 'logit', 'logprob'.* got 'accuracy'"),
    ({"score": ("logit_diff", torch.tensor([1, 2, 3]))},
     r"score \('logit_diff', other_class\) needs an int other_class here, got a tensor of shape \(3,\)"),
])
@pytest.mark.usefixtures("without_type_checks")
def test_bad_options_are_rejected(options, message, tiny_model):
    with pytest.raises(ValueError, match=message):
        get_attributor("occlusion", tiny_model, **options)


@pytest.mark.usefixtures("without_type_checks")
def test_model_must_be_a_hooked_vit(tiny_model):
    timm_like = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="model must be a HookedViT, got Linear"):
        get_attributor("rollout", timm_like)


def test_patches_to_grid_is_row_major():
    grid_h, grid_w = 2, 3
    values = torch.arange(grid_h * grid_w, dtype=torch.float).expand(2, -1)
    grid = patches_to_grid(values, (grid_h, grid_w))
    for patch in range(grid_h * grid_w):
        row, col = divmod(patch, grid_w)
        assert (grid[:, row, col] == values[:, patch]).all()


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_upsample_keeps_constant_maps_constant(mode):
    maps = torch.full((2, 4, 4), 0.7)
    upsampled = upsample_maps(maps, (32, 32), mode)
    assert upsampled.shape == (2, 32, 32)
    torch.testing.assert_close(upsampled, torch.full((2, 32, 32), 0.7))


@pytest.mark.usefixtures("without_type_checks")
def test_upsample_rejects_unknown_modes():
    with pytest.raises(ValueError, match=r"mode must be one of \('bilinear', 'bicubic'\), got 'area'"):
        upsample_maps(torch.zeros(1, 2, 2), (4, 4), "area")


@pytest.mark.filterwarnings("ignore:fill 'mean' now means:DeprecationWarning")  # tested in tests/test_images.py
@pytest.mark.parametrize("fill", ["zeros", "mean", "blur"])
def test_baseline_is_every_patch_corrupted(fill, tiny_model, tiny_images):
    baseline = make_baseline(tiny_images, tiny_model, fill, sigma=1.5)
    one_patch = corrupt_patches(tiny_images, tiny_model.data_config, [5], patch_size=8, fill=fill, sigma=1.5)
    # patch 5 of the 4x4 grid: rows 8..16, cols 8..16
    torch.testing.assert_close(baseline[..., 8:16, 8:16], one_patch[..., 8:16, 8:16])


def test_zeros_baseline_is_black_in_pixel_space(tiny_model, tiny_images):
    pixels = tiny_model.data_config.denormalize(make_baseline(tiny_images, tiny_model, "zeros"))
    torch.testing.assert_close(pixels, torch.zeros_like(pixels))
