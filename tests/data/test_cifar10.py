"""CIFAR-10 loading helpers and the canvas images with their object boxes."""

import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vitlens_patch.data.cifar10 import paste_on_canvas, resize_images
from vitlens_patch.data.folder import load_image_folder
from vitlens_patch.metrics import boxes_to_masks


def test_pasted_image_sits_exactly_in_its_box():
    images = torch.randint(0, 256, (5, 3, 8, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    canvases, boxes = paste_on_canvas(images, 20, torch.Generator().manual_seed(1))
    masks = boxes_to_masks(boxes, (20, 20))
    assert canvases.shape == (5, 3, 20, 20) and masks.shape == (5, 20, 20)
    for canvas, mask, image in zip(canvases, masks, images):
        inside = canvas[:, mask].reshape(3, 8, 6)
        assert torch.allclose(inside, image.float() / 255)
    assert (masks.sum((1, 2)) == 48).all()


def test_canvas_is_reproducible_and_rejects_large_images():
    images = torch.rand(2, 3, 8, 8)
    first = paste_on_canvas(images, 16, torch.Generator().manual_seed(3))
    second = paste_on_canvas(images, 16, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="canvas_size must be >= image size 8x8, got 4"):
        paste_on_canvas(images, 4, torch.Generator())


def test_load_image_folder_reads_folders_and_archives(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("dog", "cat"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(tmp_path / "data" / name / "0.png")
    with tarfile.open(tmp_path / "data.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "data", arcname="data")
    from_folder = load_image_folder(tmp_path / "data")
    from_archive = load_image_folder(tmp_path / "data.tar.gz")
    assert from_folder.class_names == ("cat", "dog") and from_folder.labels.tolist() == [0, 1]
    assert torch.equal(from_folder.images, from_archive.images)
    with pytest.raises(ValueError, match="path must be an image folder or a .tar.gz archive"):
        load_image_folder(tmp_path / "missing")


def test_resize_images_returns_unit_range_floats():
    resized = resize_images(torch.full((1, 3, 4, 4), 255, dtype=torch.uint8), 8)
    assert resized.shape == (1, 3, 8, 8) and torch.allclose(resized, torch.ones_like(resized))
