"""The CIFAR-10 sample shipped inside the package: the first 10 test images of each class.

Offline default data for the demo, the tutorials and quick experiments::

    sample = load_sample()                  # LabelledImages, uint8 [100, 3, 32, 32]
    few = load_sample(n_per_class=2)        # the first 2 images of each class
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitlens_patch.data.folder import LabelledImages, load_image_folder

SAMPLE_DIR = Path(__file__).with_name("sample")


def load_sample(n_per_class: int | None = None) -> LabelledImages:
    """Load the embedded CIFAR-10 test images (``<class>/<name>.jpg`` under :data:`SAMPLE_DIR`).

    Args:
        n_per_class: keep the first ``n_per_class`` images of each class (in file-name order);
            default all (10 per class).

    Returns:
        LabelledImages: uint8 images [image, 3, 32, 32], labels [image] sorted by class, and the
        ten CIFAR-10 class names in alphabetical (= CIFAR-10 label) order.
    """
    sample = load_image_folder(SAMPLE_DIR)
    if n_per_class is None:
        return sample
    per_class = torch.bincount(sample.labels).min().item()
    if not isinstance(n_per_class, int) or not 1 <= n_per_class <= per_class:
        raise ValueError(f"n_per_class must be an int in [1, {per_class}] or None, got {n_per_class!r}")
    # images are sorted by class, then file name: rank of each image within its class
    first_of_class = torch.searchsorted(sample.labels, sample.labels)
    rank = torch.arange(len(sample)) - first_of_class
    return sample.subset(torch.nonzero(rank < n_per_class).flatten())
