"""The small study shared by tests/studies/test_runner.py and its torchrun launches.

Run as ``torchrun --standalone --nproc_per_node=2 torchrun_study.py OUT [OUT ...]``: every rank
runs the study into each OUT in turn (rank 0 then writes OUT/results.parquet).
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import TensorDataset

from vitlens_patch.model import HookedViT, ViTConfig
from vitlens_patch.studies import run_study

N_IMAGES = 16
N_CLASSES = 4
BATCH_SIZE = 4


def make_model() -> HookedViT:
    """Tiny random ViT (2 layers, d_model 32, 32x32 images, patch 8), same weights every call."""
    cfg = ViTConfig(
        n_layers=2, d_model=32, n_heads=4, d_mlp=64, img_size=32, patch_size=8, n_classes=N_CLASSES
    )
    model = HookedViT(cfg)
    model.init_weights(seed=0)
    return model.eval()


def make_dataset(n_images: int = N_IMAGES, seed: int = 0) -> TensorDataset:
    """Raw uint8 images [n, 3, 32, 32] (the runner applies model.preprocess) with labels i % 4."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return TensorDataset(images, torch.arange(n_images) % N_CLASSES)


@torch.no_grad()
def measure(
    model: HookedViT, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per image: the true class's logit [batch], the class token's norm after each layer
    [batch, layer]."""
    logits, cache = model.run_with_cache(
        images, names_filter=lambda name: name.endswith("resid_post")
    )
    layers = range(model.cfg.n_layers)
    norms = torch.stack([cache["resid_post", layer][:, 0].norm(dim=-1) for layer in layers], dim=1)
    return {"logit": logits.gather(1, labels[:, None])[:, 0], "cls_norm": norms}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for out in sys.argv[1:]:
        run_study(make_model(), make_dataset(), measure, out, batch_size=BATCH_SIZE, progress=False)
