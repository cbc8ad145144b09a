"""Train the embedded CIFAR-10 ViT (a plain timm VisionTransformer) on CPU or GPU.

    python -m vitlens_patch.pretrained.train_cifar10 \
        --data ../shared/data/cifar10/train.tar.gz --out runs/cifar10_vit

Inputs are 64x64 with patch 8 (an 8x8 grid). Each batch mixes full-frame images (32x32 CIFAR-10
upsampled, random crop and flip) with canvas images (the 32x32 image pasted at a random place on a
smooth-noise background). No grayscale augmentation: the model is meant to depend on colour.
A checkpoint is written every ``--checkpoint-every`` steps; rerunning the same command resumes.
``--export`` writes the shipped safetensors + JSON from the latest checkpoint.

The shipped model was trained in two cosine cycles (a warm restart), each a rerunnable command:

    python -m vitlens_patch.pretrained.train_cifar10 --epochs 10 --out runs/cifar10_vit_stage1
    python -m vitlens_patch.pretrained.train_cifar10 --epochs 20 --lr 1e-3 --seed 1 \
        --init-from runs/cifar10_vit_stage1/checkpoint.pt --out runs/cifar10_vit
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitlens_patch.data.cifar10 import paste_on_canvas, resize_images
from vitlens_patch.data.folder import load_image_folder

ARCHITECTURE = dict(
    img_size=64, patch_size=8, num_classes=10, embed_dim=128, depth=12, num_heads=4, mlp_ratio=3.0
)
DATA_CONFIG = dict(
    input_size=(3, 64, 64),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    interpolation="bilinear",
    crop_pct=1.0,
)


def build_model() -> torch.nn.Module:
    return timm.models.vision_transformer.VisionTransformer(**ARCHITECTURE)


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    canvas_fraction: float,
    *,
    input_size: int = 64,
    canvas_size: int = 64,
    data_config: dict = DATA_CONFIG,
) -> torch.Tensor:
    """uint8 [batch, 3, 32, 32] -> normalised float [batch, 3, input_size, input_size].

    Each image is randomly cropped (4 px reflect padding) and flipped; a ``canvas_fraction`` of them is
    pasted on a ``canvas_size`` smooth-noise canvas. Full frames and canvases are then resized to
    ``input_size`` and normalised with ``data_config``'s mean and std.
    """
    batch = images.shape[0]
    padded = F.pad(images.float() / 255, (4, 4, 4, 4), mode="reflect")
    offsets = torch.randint(0, 9, (batch, 2), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    crops = torch.stack(
        [padded[i, :, y : y + 32, x : x + 32] for i, (y, x) in enumerate(offsets.tolist())]
    )
    crops = torch.where(flips.view(-1, 1, 1, 1), crops.flip(-1), crops)
    out = resize_images(crops, input_size)
    is_canvas = torch.rand(batch, generator=generator) < canvas_fraction
    if is_canvas.any():
        canvases, _ = paste_on_canvas(crops[is_canvas], canvas_size, generator)
        out[is_canvas] = resize_images(canvases, input_size)
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    return (out - mean) / std


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, data, batch_size: int = 500) -> float:
    model.eval()
    mean = torch.tensor(DATA_CONFIG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(DATA_CONFIG["std"]).view(1, 3, 1, 1)
    correct = 0
    for start in range(0, len(data), batch_size):
        images = (resize_images(data.images[start : start + batch_size], 64) - mean) / std
        correct += (model(images).argmax(-1) == data.labels[start : start + batch_size]).sum().item()
    model.train()
    return correct / len(data)


def export(model: torch.nn.Module, class_names, out_dir: Path) -> None:
    """Write weights (float16 safetensors) and a JSON with timm config, data config, classes."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "cifar10_vit.safetensors"))
    meta = dict(
        timm_class="VisionTransformer",
        architecture=ARCHITECTURE,
        data_config=DATA_CONFIG,
        class_names=list(class_names),
        canvas_size=64,
    )
    (out_dir / "cifar10_vit.json").write_text(json.dumps(meta, indent=2))


def add_run_arguments(parser: argparse.ArgumentParser, what_init_takes: str) -> None:
    """The options every training script shares: --seed, --threads, --init-from, --export."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help=f"start from the {what_init_takes} (new optimizer and schedule: a warm restart)")
    parser.add_argument("--export", action="store_true", help="only export the latest checkpoint")


def start_run(args: argparse.Namespace) -> tuple[Path, Path]:
    """Apply --threads and create --out: (out directory, its checkpoint path)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir, out_dir / "checkpoint.pt"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10/train.tar.gz")
    parser.add_argument("--test-data", default="../shared/data/cifar10/test.tar.gz")
    parser.add_argument("--out", default="runs/cifar10_vit")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--canvas-fraction", type=float, default=0.3)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bfloat16 autocast for the forward pass (faster on recent CPUs)")
    add_run_arguments(parser, "model weights of another run's checkpoint")
    args = parser.parse_args(argv)
    out_dir, checkpoint_path = start_run(args)
    torch.manual_seed(args.seed)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step = state["step"]
        print(f"resumed from step {step}", flush=True)
    elif args.init_from is not None:
        model.load_state_dict(torch.load(args.init_from, weights_only=False)["model"])
        print(f"initialised from {args.init_from}", flush=True)

    train = load_image_folder(args.data)
    if args.export:
        export(model, train.class_names, out_dir)
        return
    test = load_image_folder(args.test_data).subset(list(range(0, 10000, 5)))
    steps_per_epoch = len(train) // args.batch_size
    total = int(args.epochs * steps_per_epoch)
    warmup = steps_per_epoch // 2
    model.train()
    tick = time.time()
    while step < total:
        epoch_seed = torch.Generator().manual_seed(args.seed * 1000 + step // steps_per_epoch)
        order = torch.randperm(len(train), generator=epoch_seed)
        position = step % steps_per_epoch
        indices = order[position * args.batch_size : (position + 1) * args.batch_size]
        inputs = augment_batch(train.images[indices], generator, args.canvas_fraction)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, args.lr, warmup)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), train.labels[indices], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            rate = 50 * args.batch_size / (time.time() - tick)
            print(f"step {step}/{total} loss {loss.item():.3f} {rate:.0f} img/s", flush=True)
            tick = time.time()
        if step % args.checkpoint_every == 0 or step == total:
            torch.save(
                dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                     generator=generator.get_state(), step=step),
                checkpoint_path,
            )
            export(model, train.class_names, out_dir)
        if step % steps_per_epoch == 0 or step == total:
            print(f"step {step} test accuracy (2000 images) {evaluate(model, test):.4f}", flush=True)
            tick = time.time()


if __name__ == "__main__":
    main()
