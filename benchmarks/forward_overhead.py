"""HookedViT (no hooks) vs the timm original with the same weights: forward time ratio per family.

    python benchmarks/forward_overhead.py [--batch 8] [--repeats 15] [--models vit_b16 siglip_b16] [--clock cpu]
        [--autocast-bf16]

Random weights, float32, CPU by default, batch 8 at 224x224: ViT-B/16, DINOv2-S with 4 registers,
EVA-02-S (rotary embeddings, SwiGLU, sub-LN) and SigLIP-B/16 (attention pooling). Each pair runs
side by side, interleaved (timm, HookedViT, timm, ...) so machine noise hits both alike; prints
the CPU model, torch's CPU capability, the median time of each and the ratio HookedViT / timm
(target: <= 1.10 each). ``--autocast-bf16`` runs both under ``torch.autocast(bfloat16)``: HookedViT's
bf16 forward against timm's, on a CPU with native bf16 (AVX512-BF16 / AMX) or a GPU.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved_medians  # noqa: E402

from vitlens_patch.model import HookedViT  # noqa: E402

# label -> (timm model name, description)
MODELS = {
    "vit_b16": ("vit_base_patch16_224", "ViT-B/16"),
    "dinov2_s_reg": ("vit_small_patch14_reg4_dinov2", "DINOv2-S/14 + 4 registers"),
    "eva02_s": ("eva02_small_patch14_224", "EVA-02-S/14"),
    "siglip_b16": ("vit_base_patch16_siglip_224", "SigLIP-B/16 (map pooling)"),
}


def cpu_model() -> str:
    """The CPU model name as lscpu prints it (platform.processor() when lscpu is missing)."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or CPU time of one thread (torch runs single-threaded): the ratio "
                             "that holds on a machine shared with other jobs")
    parser.add_argument("--autocast-bf16", action="store_true", help="both models under bfloat16 autocast")
    args = parser.parse_args()
    device = torch.device(args.device)
    clock = time.perf_counter
    if args.clock == "cpu":
        if device.type != "cpu":
            parser.error("--clock cpu needs --device cpu")
        torch.set_num_threads(1)
        clock = time.thread_time
    print(f"CPU {cpu_model()}, torch {torch.__version__}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, device {device}, "
          f"batch {args.batch}, {args.img_size}x{args.img_size}, {args.repeats} interleaved repeats (median), "
          f"{args.clock} clock, {'bf16 autocast' if args.autocast_bf16 else 'float32'}")
    ratios = {}
    for label in args.models:
        name, description = MODELS[label]
        torch.manual_seed(0)
        timm_model = timm.create_model(name, pretrained=False, img_size=args.img_size).eval().to(device)
        hooked = HookedViT.from_timm(timm_model)
        images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.autocast_bf16)
        with torch.inference_mode(), autocast:
            expected = timm_model(images)
            error = ((hooked(images) - expected).abs().max() / expected.abs().max()).item()
            medians = interleaved_medians(
                {"timm": lambda: timm_model(images), "HookedViT": lambda: hooked(images)}, args.repeats, device, clock
            )
        ratios[label] = medians["HookedViT"] / medians["timm"]
        print(f"{description:28s} timm {medians['timm'] * 1e3:8.1f} ms  HookedViT {medians['HookedViT'] * 1e3:8.1f} ms  "
              f"ratio {ratios[label]:.3f}  (output error {error:.1e} relative)")
    worst = max(ratios, key=ratios.get)
    print(f"worst ratio HookedViT / timm: {ratios[worst]:.3f} ({MODELS[worst][1]}; target <= 1.10 each)")


if __name__ == "__main__":
    main()
