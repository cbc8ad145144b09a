"""HookedViT (no hooks) vs the timm original with the same weights: forward time ratio.

    python benchmarks/forward_overhead.py [--batch 8] [--repeats 20]

ViT-S/16 at 224x224, random weights, CPU by default. Prints the median time of each and the ratio
HookedViT / timm (target: <= 1.10).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved_medians, vit_small  # noqa: E402

from vitlens_patch.model import HookedViT  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    timm_model = vit_small().to(device)
    hooked = HookedViT.from_timm(timm_model)
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    with torch.no_grad():
        difference = (hooked(images) - timm_model(images)).abs().max().item()
        medians = interleaved_medians(
            {"timm": lambda: timm_model(images), "HookedViT": lambda: hooked(images)}, args.repeats, device
        )
    print(f"ViT-S/16, batch {args.batch}, {device}, torch threads {torch.get_num_threads()}, "
          f"max |logit diff| {difference:.2e}")
    print(f"timm      {medians['timm'] * 1e3:8.1f} ms")
    print(f"HookedViT {medians['HookedViT'] * 1e3:8.1f} ms")
    print(f"ratio HookedViT / timm: {medians['HookedViT'] / medians['timm']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
