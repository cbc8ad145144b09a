"""LabelledImages: class counts and short reprs."""

import torch

from vitlens_patch.data.folder import LabelledImages


def make_images(n_classes: int, per_class: int = 2) -> LabelledImages:
    n = n_classes * per_class
    return LabelledImages(
        torch.zeros(n, 3, 8, 8, dtype=torch.uint8), torch.arange(n) % n_classes,
        tuple(f"class{i}" for i in range(n_classes)),
    )


def test_repr_gives_shape_and_class_counts_not_pixels():
    images = make_images(3)
    assert images.class_counts() == {"class0": 2, "class1": 2, "class2": 2}
    assert repr(images) == "LabelledImages(6 images 3x8x8 uint8, 3 classes: class0 2, class1 2, class2 2)"
    many = make_images(25, per_class=1)
    assert repr(many).endswith("class9 1, ... (15 more))") and len(repr(many)) < 250


def test_html_repr_is_a_table_of_classes():
    page = make_images(3)._repr_html_()
    assert page.startswith("<b>LabelledImages</b>: 6 images, 3x8x8 uint8<table>")
    assert page.count("<tr>") == 4 and "<td>class2</td><td>2</td>" in page
