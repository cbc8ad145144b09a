"""CAAP through the batched engine vs a plain per-patch reference (one full forward per patch).

    python benchmarks/caap_speed.py [--images 1]

ViT-S/16 (random weights), 224x224, CPU, the default layer range (the middle half, blocks 3-8).
The reference runs the context image once per patch with hooks that insert the source activations
at that patch's token into every block of the range. Prints both times, their ratio (target:
CAAP >= 1.5x faster) and CAAP's achieved matmul FLOP/s (source and context runs once, then each
row from block ``start``) as a fraction of a plain ``torch.matmul``'s (target >= 50%).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository root, for tests.references
from _timing import block_matmul_flops, matmul_flops_per_second, vit_small  # noqa: E402

from tests.references import caap_per_patch_reference  # noqa: E402
from vitlens_patch.attribution.caap import caap, default_layers  # noqa: E402
from vitlens_patch.model import HookedViT  # noqa: E402


def caap_matmul_flops(model: HookedViT, n_images: int) -> int:
    cfg = model.cfg
    start, _ = default_layers(cfg.n_layers)
    block = block_matmul_flops(cfg.n_pos, cfg.d_model, cfg.d_mlp)
    embed = 2 * cfg.n_patches * cfg.in_chans * cfg.patch_size[0] * cfg.patch_size[1] * cfg.d_model
    head = 2 * cfg.d_model * cfg.n_classes
    full_run = embed + cfg.n_layers * block + head
    rows = cfg.n_patches * ((cfg.n_layers - start) * block + head)
    return n_images * (2 * full_run + rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1)
    args = parser.parse_args()
    model = HookedViT.from_timm(vit_small())
    images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    matmul = matmul_flops_per_second(model.device)

    caap(model, images[:1], layers=(10, 12), progress=False)  # warm-up
    start = time.perf_counter()
    maps = caap(model, images, progress=False)
    caap_seconds = time.perf_counter() - start
    start = time.perf_counter()
    expected = caap_per_patch_reference(model, images)
    reference_seconds = time.perf_counter() - start

    achieved = caap_matmul_flops(model, args.images) / caap_seconds
    print(f"ViT-S/16, {args.images} image(s) 224x224, layers {default_layers(model.cfg.n_layers)}, "
          f"{model.cfg.n_patches} patches, torch threads {torch.get_num_threads()}")
    print(f"max |CAAP - reference| {(maps - expected).abs().max().item():.2e}")
    print(f"caap (engine)        {caap_seconds:8.1f} s")
    print(f"per-patch reference  {reference_seconds:8.1f} s   speedup {reference_seconds / caap_seconds:5.2f}x (target >= 1.5)")
    print(f"caap matmul FLOP/s {achieved / 1e9:.1f} G = {achieved / matmul:.0%} of torch.matmul's "
          f"{matmul / 1e9:.1f} G (target >= 50%)")


if __name__ == "__main__":
    main()
