"""Loading time: HookedViT.from_timm against timm.create_model, and a cold ``cifar10_vit()``.

    python benchmarks/load_time.py [--repeats 3] [--cold-runs 3]

1. ViT-B/16 (``vit_base_patch16_224``, random weights, CPU): median time of
   ``timm.create_model`` (builds and randomly initialises the timm model), of
   ``HookedViT.from_timm(model)`` (converts the built model) and, for reference, of the same
   conversion into a randomly initialised HookedViT (build, ``init_weights``, then load), as
   ``from_timm`` did before it built on the meta device. Target: from_timm / create_model <= 1.5.
2. Cold ``vitlens_patch.cifar10_vit()``: a fresh Python process imports torch, timm and
   transformer_lens, then times the first ``cifar10_vit()`` call; median over ``--cold-runs``
   processes. Target: <= 3 s. The import time is printed beside it: it is the libraries', not
   the loader's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved_medians  # noqa: E402

import timm  # noqa: E402

from vitlens_patch.conversion.checks import load_state_dict_strictly  # noqa: E402
from vitlens_patch.conversion.timm import config_from_timm, convert_timm_state_dict  # noqa: E402
from vitlens_patch.model import HookedViT  # noqa: E402

COLD_SCRIPT = """
import json, time
start = time.perf_counter()
import torch, timm, transformer_lens
imported = time.perf_counter()
import vitlens_patch
vitlens_patch.cifar10_vit()
print(json.dumps({"import": imported - start, "call": time.perf_counter() - imported}))
"""


def cpu_description() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    model = names[0] if names else platform.processor() or platform.machine()
    return (f"{model}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"torch threads {torch.get_num_threads()}")


def from_timm_with_random_init(model: torch.nn.Module) -> HookedViT:
    """The conversion as it was: a randomly initialised HookedViT, then the weights copied in."""
    cfg = config_from_timm(model)
    hooked = HookedViT(cfg)
    load_state_dict_strictly(hooked, convert_timm_state_dict(model.state_dict(), cfg))
    return hooked.eval()


def cold_cifar10_vit(runs: int) -> dict[str, float]:
    """Median import and first-call seconds of ``cifar10_vit()`` over fresh processes."""
    results = [
        json.loads(subprocess.run([sys.executable, "-c", COLD_SCRIPT], check=True, capture_output=True,
                                  text=True).stdout)
        for _ in range(runs)
    ]
    return {key: statistics.median(result[key] for result in results) for key in ("import", "call")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold-runs", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cpu")
    timm_model = timm.create_model("vit_base_patch16_224").eval()
    medians = interleaved_medians(
        {
            "timm.create_model": lambda: timm.create_model("vit_base_patch16_224"),
            "HookedViT.from_timm": lambda: HookedViT.from_timm(timm_model),
            "random init + load": lambda: from_timm_with_random_init(timm_model),
        },
        args.repeats,
        device,
    )
    cold = cold_cifar10_vit(args.cold_runs)
    create = medians["timm.create_model"]
    print(f"CPU: {cpu_description()}")
    print(f"ViT-B/16, median of {args.repeats}:")
    for name, seconds in medians.items():
        print(f"  {name:<20} {seconds:7.2f} s   {seconds / create:5.2f}x timm.create_model")
    print(f"from_timm / create_model: {medians['HookedViT.from_timm'] / create:.2f}x (target <= 1.5x); "
          f"random init + load / from_timm: {medians['random init + load'] / medians['HookedViT.from_timm']:.1f}x")
    print(f"cold cifar10_vit(), median of {args.cold_runs} processes: {cold['call']:.2f} s (target <= 3 s), "
          f"after {cold['import']:.2f} s importing torch, timm and transformer_lens")


if __name__ == "__main__":
    main()
