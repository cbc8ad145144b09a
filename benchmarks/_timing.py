"""Shared timing helpers for the benchmark scripts: warm up, synchronise, interleave, take medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import timm
import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median seconds per call of each function, run in turn so machine noise hits all alike.
    ``clock``: wall time (default), or e.g. ``time.thread_time`` for CPU time on one thread."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device, clock))
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_flops_per_second(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Achieved FLOP/s of one plain float32 ``torch.matmul`` of two size x size matrices."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    seconds = interleaved_medians({"matmul": lambda: torch.matmul(a, b)}, repeats, device)["matmul"]
    return 2 * size**3 / seconds


def vit_small(img_size: int = 224, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ViT-S/16 (timm ``vit_small_patch16_224``) in eval mode."""
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=img_size).eval()


def block_matmul_flops(n_tokens: int, d_model: int, d_mlp: int) -> int:
    """Matmul FLOPs of one transformer block on one sequence: qkv, attention, output, MLP."""
    linear = 2 * n_tokens * (4 * d_model * d_model + 2 * d_model * d_mlp)
    attention = 2 * 2 * n_tokens * n_tokens * d_model
    return linear + attention
