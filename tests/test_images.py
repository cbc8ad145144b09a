"""Image operations on plain tensors: Gaussian blur, patch-grid masks, the one fill vocabulary."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from vitlens_patch.attribution import IntegratedGradients, Occlusion
from vitlens_patch.attribution.caap import caap
from vitlens_patch.images import FILLS, check_fill, fill_images, gaussian_blur, patch_mask
from vitlens_patch.metrics import perturbation_curve
from vitlens_patch.patching.corruptions import corrupt_patches


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


# ------------------------------------------------------------------------------------ fills
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BAD_FILL = r"must be one of \('zeros', 'mean', 'blur'\) or a tensor of normalised model input, got "


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.mark.parametrize("fill", FILLS)
def test_each_fill_word_means_one_thing(pixels, fill):
    filled = fill_images(normalize(pixels), fill, normalization=(MEAN, STD), sigma=1.5)
    expected = {
        "zeros": torch.zeros_like(pixels),                                   # black pixels
        "mean": torch.tensor(MEAN).view(1, 3, 1, 1).expand_as(pixels),       # the normalisation mean
        "blur": gaussian_blur(pixels, sigma=1.5),                            # the image blurred
    }[fill]
    torch.testing.assert_close(filled, normalize(expected), atol=1e-5, rtol=1e-5)


def test_a_tensor_fill_broadcasts_to_the_images(pixels):
    images = normalize(pixels)
    grey = torch.full((3, 1, 1), -0.5)
    torch.testing.assert_close(fill_images(images, grey, normalization=None, sigma=1.0), grey.expand_as(images))
    with pytest.raises(ValueError, match=r"context tensor must broadcast to images \(2, 3, 32, 32\) .*got shape \(3, 3, 32, 32\)"):
        fill_images(images, torch.zeros(3, 3, 32, 32), normalization=None, sigma=1.0, argument="context")


def test_black_is_the_deprecated_spelling_of_zeros(pixels):
    images = normalize(pixels)
    with pytest.warns(DeprecationWarning, match=r"baseline='black' is deprecated .* use baseline='zeros'"):
        black = fill_images(images, "black", normalization=(MEAN, STD), sigma=1.0, argument="baseline")
    torch.testing.assert_close(black, fill_images(images, "zeros", normalization=(MEAN, STD), sigma=1.0))


def test_zeros_needs_the_normalisation(pixels):
    with pytest.raises(ValueError, match=r"fill='zeros' \(black pixels\) needs the images' normalisation"):
        fill_images(normalize(pixels), "zeros", normalization=None, sigma=1.0)


@pytest.mark.parametrize("fill", ["grey", "Mean", "image_mean"])
def test_an_unknown_fill_names_the_argument_and_the_words(fill):
    with pytest.raises(ValueError, match="context " + BAD_FILL + repr(fill)):
        check_fill(fill, "context")


# Every consumer of a fill, with the argument it calls it and its "blur" Gaussian.
MAPS = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(5))
CONSUMERS = {
    "corrupt_patches fill": (
        lambda model, images, fill: corrupt_patches(images, model.data_config, [0, 5], patch_size=8, fill=fill),
        dict(sigma=2.0)),
    "Occlusion fill": (
        lambda model, images, fill: Occlusion(model, fill=fill, progress=False).attribute(images, 1),
        dict(sigma=2.0)),
    "IntegratedGradients baseline": (
        lambda model, images, fill: IntegratedGradients(model, baseline=fill, n_steps=4, progress=False)
        .attribute(images, 1),
        dict(sigma=2.0)),
    "caap context": (
        lambda model, images, fill: caap(model, images, layers=(0, 1), context=fill, target=1, progress=False),
        dict(sigma=4.0)),  # max(32, 32) / 8
    "deletion baseline": (
        lambda model, images, fill: perturbation_curve(
            model, images, MAPS, 1, mode="deletion", baseline=fill, n_steps=4, progress=False).probs,
        dict(sigma=5.0, kernel_size=11)),
    "insertion baseline": (
        lambda model, images, fill: perturbation_curve(
            model, images, MAPS, 1, mode="insertion", baseline=fill, n_steps=4, progress=False).probs,
        dict(sigma=5.0, kernel_size=11)),
}
MEAN_CHANGED = ("corrupt_patches fill", "Occlusion fill", "IntegratedGradients baseline")


@pytest.mark.parametrize("word", FILLS)
@pytest.mark.parametrize("consumer", CONSUMERS)
def test_every_consumer_gives_each_word_the_meaning_of_fill_images(consumer, word, tiny_model, tiny_images):
    run, blur = CONSUMERS[consumer]
    config = tiny_model.data_config
    as_tensor = fill_images(tiny_images, word, normalization=(config.mean, config.std), **blur)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "mean"'s one-release notice, tested below
        by_word = run(tiny_model, tiny_images, word)
    torch.testing.assert_close(by_word, run(tiny_model, tiny_images, as_tensor), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.usefixtures("without_type_checks")
def test_every_consumer_refuses_an_unknown_fill_by_its_argument_name(consumer, tiny_model, tiny_images):
    run, _ = CONSUMERS[consumer]
    argument = consumer.split()[-1]
    with pytest.raises(ValueError, match=f"{argument} {BAD_FILL}'grey'"):
        run(tiny_model, tiny_images, "grey")


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_every_consumer_takes_black_as_deprecated_zeros(consumer, tiny_model, tiny_images):
    run, _ = CONSUMERS[consumer]
    argument = consumer.split()[-1]
    with pytest.warns(DeprecationWarning, match=f"{argument}='black' is deprecated"):
        black = run(tiny_model, tiny_images, "black")
    torch.testing.assert_close(black, run(tiny_model, tiny_images, "zeros"))


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_mean_warns_only_where_it_changed_meaning(consumer, tiny_model, tiny_images):
    run, _ = CONSUMERS[consumer]
    if consumer in MEAN_CHANGED:  # it was each image's own mean colour there
        with pytest.warns(DeprecationWarning, match="fill 'mean' now means the normalisation's mean colour"):
            run(tiny_model, tiny_images, "mean")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            run(tiny_model, tiny_images, "mean")
