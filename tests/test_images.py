"""Image operations on plain tensors: Gaussian blur, patch-grid masks."""

import pytest
import torch
import torch.nn.functional as F

from vitlens_patch.images import gaussian_blur, patch_mask


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


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
