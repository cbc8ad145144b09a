"""The embedded CIFAR-10 sample."""

import pytest
import torch

from vitlens_patch.data.cifar10 import CIFAR10_CLASSES
from vitlens_patch.data.sample import SAMPLE_DIR, load_sample


def test_sample_holds_ten_images_per_class_as_jpeg_folders():
    files = sorted(SAMPLE_DIR.glob("*/*"))
    assert {file.suffix for file in files} == {".jpg"}
    assert sorted({file.parent.name for file in files}) == list(CIFAR10_CLASSES)
    sample = load_sample()
    assert sample.class_names == CIFAR10_CLASSES
    assert sample.images.dtype == torch.uint8 and tuple(sample.images.shape) == (len(files), 3, 32, 32)
    assert torch.bincount(sample.labels).tolist() == [10] * 10


def test_n_per_class_keeps_the_first_images_of_each_class():
    full, few = load_sample(), load_sample(n_per_class=3)
    assert torch.bincount(few.labels).tolist() == [3] * 10
    for label in range(10):
        torch.testing.assert_close(few.images[few.labels == label], full.images[full.labels == label][:3])


@pytest.mark.parametrize("n_per_class", [0, 11, 2.5])
@pytest.mark.usefixtures("without_type_checks")
def test_bad_n_per_class_is_rejected(n_per_class):
    with pytest.raises(ValueError, match=r"n_per_class must be an int in \[1, 10\]"):
        load_sample(n_per_class)
