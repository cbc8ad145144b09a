"""Images held in memory with their labels: ImageFolder-layout loading and per-class sampling."""

from __future__ import annotations

import html
import io
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int
from PIL import Image
from torch import Tensor

from vitlens_patch.checks import check_positive_int

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class LabelledImages:
    """A set of images held in memory.

    Attributes:
        images: uint8 tensor [batch, channel, height, width].
        labels: int64 tensor [batch].
        class_names: class index -> name (alphabetical folder order, as ImageFolder).
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> dict[str, int]:
        """Images per class, in class order (classes without images included, with 0)."""
        counts = torch.bincount(self.labels.cpu(), minlength=len(self.class_names)).tolist()
        return dict(zip(self.class_names, counts))

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.images.shape[1:]))
        counts = self.class_counts()
        shown = ", ".join(f"{name} {count}" for name, count in list(counts.items())[:10])
        more = f", ... ({len(counts) - 10} more)" if len(counts) > 10 else ""
        return (
            f"LabelledImages({len(self)} images {shape} {str(self.images.dtype).removeprefix('torch.')}, "
            f"{len(self.class_names)} classes: {shown}{more})"
        )

    def _repr_html_(self) -> str:
        shape = "x".join(map(str, self.images.shape[1:]))
        rows = "".join(
            f"<tr><td>{i}</td><td>{html.escape(name)}</td><td>{count}</td></tr>"
            for i, (name, count) in enumerate(self.class_counts().items())
        )
        return (
            f"<b>LabelledImages</b>: {len(self)} images, {shape} "
            f"{str(self.images.dtype).removeprefix('torch.')}<table><thead><tr><th>label</th><th>class</th>"
            f"<th>images</th></tr></thead><tbody>{rows}</tbody></table>"
        )

    def subset(self, indices: Tensor | list[int]) -> "LabelledImages":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return LabelledImages(self.images[indices], self.labels[indices], self.class_names)


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _stack(items: list[tuple[str, str, np.ndarray]]) -> LabelledImages:
    items.sort(key=lambda item: (item[0], item[1]))
    class_names = tuple(sorted({cls for cls, _, _ in items}))
    index = {name: i for i, name in enumerate(class_names)}
    images = torch.from_numpy(np.stack([array for _, _, array in items])).permute(0, 3, 1, 2)
    labels = torch.tensor([index[cls] for cls, _, _ in items], dtype=torch.long)
    return LabelledImages(images.contiguous(), labels, class_names)


def load_image_folder(path: str | Path, split: str | None = None) -> LabelledImages:
    """Load an ImageFolder-layout directory, or a ``.tar.gz`` archive of one, into memory.

    Args:
        path: a folder ``<class>/<image>`` or an archive such as ``../shared/data/cifar10/test.tar.gz``
            (read without unpacking; files are grouped by their parent folder name).
        split: for archives holding several splits, keep only members whose path contains
            ``/{split}/``.

    Returns:
        LabelledImages with classes in alphabetical order. All images must share one size.
    """
    path = Path(path)
    items: list[tuple[str, str, np.ndarray]] = []
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(path) as archive:
            for member in archive:
                name = member.name
                if not member.isfile() or not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if split is not None and f"/{split}/" not in f"/{name}":
                    continue
                parts = name.split("/")
                items.append((parts[-2], parts[-1], _decode(archive.extractfile(member).read())))
    elif path.is_dir():
        for file in path.glob("*/*"):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                items.append((file.parent.name, file.name, _decode(file.read_bytes())))
    else:
        raise ValueError(f"path must be an image folder or a .tar.gz archive, got {str(path)!r}")
    if not items:
        raise ValueError(f"path holds no images in <class>/<image> layout: {str(path)!r}")
    return _stack(items)


def select_per_class(
    labels: Int[Tensor, " batch"] | Sequence[int], n: int, *, seed: int | None = 0
) -> list[int]:
    """Pick ``n`` images of every class, deterministically: the ``indices`` of a balanced study.

    Args:
        labels: class label of every image [image], e.g. ``LabelledImages.labels`` or
            ``torchvision.datasets.ImageFolder(root).targets``.
        n: images per class.
        seed: seeds a random choice within each class; ``None`` takes each class's first ``n``.

    Returns:
        Sorted data set indices, ``n`` per class.
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [image], got shape {tuple(labels.shape)}")
    check_positive_int(n, "n")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        if len(members) < n:
            raise ValueError(f"n must be <= {len(members)}, the size of class {label}, got {n}")
        if generator is not None:
            members = members[torch.randperm(len(members), generator=generator)]
        chosen.extend(members[:n].tolist())
    return sorted(chosen)
