"""Explorer latency: time from a change of the widget's state to the redrawn view, on the embedded model.

    python benchmarks/widget_latency.py [--repeats 5] [--threads N]

Drives the widget's Python side the way the browser does (setting traits), on the embedded CIFAR-10
ViT (12 layers, 8 x 8 patches) and its sample images, and reports the median over ``repeats`` fresh
changes (never cached) of:

- ``drawn``: every view has numbers (layer curve exact; patch grid and CAAP map may still be the
  attribution-patching estimates) -- what the user waits for before seeing the update;
- ``exact``: every view exact (full ``trace_grid`` and CAAP), which keeps running in the background;

for three changes: another image, another window, another clicked patch (after the image's views
are exact, as when a user explores one image). Going back to a cached state is timed too.
Prints the machine (lscpu model name, torch CPU capability, threads) and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch

import vitlens_patch as vp


def cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def timed_change(widget, name: str, value) -> tuple[float, float]:
    """Seconds from setting ``name`` until every view is drawn, and until every view is exact."""
    start = time.perf_counter()
    setattr(widget, name, value)
    widget.wait(600, exact=False)
    drawn = time.perf_counter() - start
    widget.wait(600)
    return drawn, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"cpu: {cpu_model()}; torch {torch.__version__}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")

    model = vp.cifar10_vit()
    sample = vp.pretrained.sample_images(n_per_class=1)
    widget = vp.explore(model, sample, window=3)
    widget.wait(600)  # warm-up: the first image exact
    repeats = min(args.repeats, len(sample) - 1)
    times: dict[str, list[tuple[float, float]]] = {"image": [], "window": [], "patch": []}
    back = []
    windows = [1, 5, 2, 4, 6, 7, 8]
    for i in range(repeats):
        times["image"].append(timed_change(widget, "image", i + 1))
        times["window"].append(timed_change(widget, "window", windows[i % len(windows)]))
        times["patch"].append(timed_change(widget, "selected_patch", (9 * i + 19) % model.cfg.n_patches))
        widget.window = 3
        widget.wait(600)
        start = time.perf_counter()
        widget.window = windows[i % len(windows)]  # cached: drawn in the setter
        back.append(time.perf_counter() - start)
        widget.window = 3
    print(f"{'change':<8} {'drawn median s':>15} {'exact median s':>15}   (each of {repeats} changes: drawn / exact)")
    for name, values in times.items():
        drawn = statistics.median(v[0] for v in values)
        exact = statistics.median(v[1] for v in values)
        details = ", ".join(f"{d:.2f}/{e:.2f}" for d, e in values)
        print(f"{name:<8} {drawn:>15.3f} {exact:>15.3f}   ({details})")
    print(f"back to a cached state: median {statistics.median(back) * 1000:.1f} ms")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
