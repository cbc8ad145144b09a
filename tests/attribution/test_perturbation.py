"""Patch occlusion."""

import pytest
import torch

from vitlens_patch.attribution import Occlusion, make_baseline
from vitlens_patch.patching.corruptions import corrupt_patches


@pytest.mark.filterwarnings("ignore:fill 'mean' now means:DeprecationWarning")  # tested in tests/test_images.py
@pytest.mark.parametrize("fill", ["zeros", "mean", "blur"])
def test_occlusion_is_the_score_drop_of_each_corrupted_patch(fill, tiny_model, tiny_images):
    target = torch.tensor([2, 3, 4])
    maps = Occlusion(tiny_model, fill=fill, batch_size=5, progress=False).attribute(tiny_images, target)
    grid_w = tiny_model.cfg.grid_size[1]
    with torch.no_grad():
        clean = tiny_model(tiny_images).gather(1, target[:, None])[:, 0]
        for patch in (0, 6, 15):
            corrupted = corrupt_patches(tiny_images, tiny_model.data_config, [patch], patch_size=8, fill=fill)
            drop = clean - tiny_model(corrupted).gather(1, target[:, None])[:, 0]
            torch.testing.assert_close(maps[:, patch // grid_w, patch % grid_w], drop, atol=1e-5, rtol=1e-4)


def test_occlusion_peaks_at_the_only_patch_that_differs_from_the_fill(tiny_model, tiny_images):
    # Black images with one random patch: occluding any other patch with black changes nothing.
    images = make_baseline(tiny_images, tiny_model, "zeros")
    row, col = 2, 1
    images[..., row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = tiny_images[..., :8, :8]
    with torch.no_grad():
        gain = tiny_model(images) - tiny_model(make_baseline(images, tiny_model, "zeros"))
    target = gain.argmax(dim=-1)  # the class that patch supports most
    maps = Occlusion(tiny_model, fill="zeros", progress=False).attribute(images, target)
    for image_maps in maps:
        assert divmod(image_maps.flatten().argmax().item(), 4) == (row, col)
    others = torch.ones(4, 4, dtype=torch.bool)
    others[row, col] = False
    torch.testing.assert_close(maps[:, others], torch.zeros_like(maps[:, others]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("score", ["prob", "logprob"])
def test_occlusion_uses_the_chosen_score(score, tiny_model, tiny_images):
    maps = Occlusion(tiny_model, score=score, fill="zeros", progress=False).attribute(tiny_images, 1)
    with torch.no_grad():
        corrupted = corrupt_patches(tiny_images, tiny_model.data_config, [0], patch_size=8, fill="zeros")
        probs = [tiny_model(x).softmax(dim=-1)[:, 1] for x in (tiny_images, corrupted)]
    to_score = torch.log if score == "logprob" else (lambda p: p)
    torch.testing.assert_close(maps[:, 0, 0], to_score(probs[0]) - to_score(probs[1]), atol=1e-5, rtol=1e-4)


@pytest.mark.usefixtures("without_type_checks")
def test_occlusion_rejects_unknown_fills(tiny_model):
    with pytest.raises(ValueError, match=r"fill must be one of \('zeros', 'mean', 'blur'\) or a tensor of normalised model input, got 'noise'"):
        Occlusion(tiny_model, fill="noise")
