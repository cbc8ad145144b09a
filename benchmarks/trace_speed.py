"""Full layer x position causal trace: the batched engine vs TransformerLens vs a plain hook loop.

    python benchmarks/trace_speed.py [--reference-fraction 0.25] [--full]

ViT-S/16 (random weights), one 224x224 image, CPU: every (layer, token) cell of the 12 x 197 grid,
restoring ``hook_resid_pre`` with window 1. Compared, in one run:

- engine: ``trace_grid`` (cached clean/corrupted runs, rows start at their layer, batched);
- (a) TransformerLens's ``patching.generic_activation_patch`` with an explicit ``index_df``;
- (b) a loop of one ``run_with_hooks`` per cell.

Every reference cell is a full forward pass of the same cost, so by default the references run on
an evenly spaced ``--reference-fraction`` of the cells and their time is scaled to the full grid
(``--full`` runs them on every cell). Also prints the engine's achieved matmul FLOP/s (the shared
clean and corrupted runs once, plus each row's suffix from its start layer) as a fraction of a plain
``torch.matmul``'s, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch
from transformer_lens import patching

sys.path.insert(0, str(Path(__file__).parent))
from _timing import block_matmul_flops, matmul_flops_per_second, vit_small  # noqa: E402

from vitlens_patch.model import HookedViT  # noqa: E402
from vitlens_patch.patching import trace_grid  # noqa: E402


class TransformerLensView:
    """What TransformerLens's patching functions read off a model: run_with_hooks, cfg.device, eval mode."""

    def __init__(self, model: HookedViT):
        self.model = model
        self.training = False
        self.cfg = SimpleNamespace(device=model.device, n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads)

    def run_with_hooks(self, *args, **kwargs):
        return self.model.run_with_hooks(*args, **kwargs)

    def eval(self):
        return self


def engine_matmul_flops(model: HookedViT) -> int:
    """Matmul FLOPs the engine's grid needs: two full runs, then each row from its start layer."""
    cfg = model.cfg
    block = block_matmul_flops(cfg.n_pos, cfg.d_model, cfg.d_mlp)
    embed = 2 * cfg.n_patches * cfg.in_chans * cfg.patch_size[0] * cfg.patch_size[1] * cfg.d_model
    head = 2 * cfg.d_model * cfg.n_classes
    full_run = embed + cfg.n_layers * block + head
    rows = sum(cfg.n_pos * ((cfg.n_layers - layer) * block + head) for layer in range(cfg.n_layers))
    return 2 * full_run + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-fraction", type=float, default=0.25)
    parser.add_argument("--full", action="store_true", help="run the references on every cell")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = HookedViT.from_timm(vit_small())
    cfg = model.cfg
    clean = torch.randn(1, 3, 224, 224)
    corrupted = clean + 0.5 * torch.randn_like(clean)
    with torch.no_grad():
        target = model(clean).argmax(-1)

    def prob(logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1)[0, target[0]]

    all_cells = [(layer, pos) for layer in range(cfg.n_layers) for pos in range(cfg.n_pos)]
    step = 1 if args.full else max(1, round(1 / args.reference_fraction))
    sample = all_cells[::step]
    scale = len(all_cells) / len(sample)

    matmul = matmul_flops_per_second(model.device)

    trace_grid(model, clean, corrupted, kind="resid_pre", window=1, positions=[0, 1], progress=False)  # warm-up
    start = time.perf_counter()
    result = trace_grid(model, clean, corrupted, kind="resid_pre", window=1, progress=False)
    engine_seconds = time.perf_counter() - start

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_resid_pre"))
        view = TransformerLensView(model)
        index_df = pd.DataFrame(sample, columns=["layer", "pos"])
        start = time.perf_counter()
        tl_values = patching.generic_activation_patch(
            view, corrupted, clean_cache, prob, patching.layer_pos_patch_setter, "resid_pre", index_df=index_df
        )
        tl_seconds = (time.perf_counter() - start) * scale

        start = time.perf_counter()
        loop_values = []
        for layer, pos in sample:
            def restore(act, hook, pos=pos, name=f"blocks.{layer}.hook_resid_pre"):
                act = act.clone()
                act[:, pos] = clean_cache[name][:, pos]
                return act
            logits = model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", restore)])
            loop_values.append(prob(logits))
        loop_seconds = (time.perf_counter() - start) * scale

    engine_values = (result.effects[0] + result.corrupted_score[0]).flatten()[::step]
    agreement = max((engine_values - tl_values.cpu()).abs().max().item(),
                    (engine_values - torch.stack(loop_values)).abs().max().item())
    achieved = engine_matmul_flops(model) / engine_seconds
    measured = "every cell" if step == 1 else f"{len(sample)} of {len(all_cells)} cells, scaled to all"
    print(f"ViT-S/16, 1 image 224x224, {cfg.n_layers} x {cfg.n_pos} cells (hook_resid_pre, window 1), "
          f"torch threads {torch.get_num_threads()}; references measured on {measured}")
    print(f"max |difference| engine vs references: {agreement:.2e}")
    print(f"engine                              {engine_seconds:8.1f} s")
    print(f"(a) TransformerLens generic patch   {tl_seconds:8.1f} s   engine speedup {tl_seconds / engine_seconds:5.2f}x (target >= 2)")
    print(f"(b) run_with_hooks loop             {loop_seconds:8.1f} s   engine speedup {loop_seconds / engine_seconds:5.2f}x")
    print(f"engine matmul FLOP/s {achieved / 1e9:.1f} G = {achieved / matmul:.0%} of torch.matmul's "
          f"{matmul / 1e9:.1f} G (target >= 50%)")


if __name__ == "__main__":
    main()
