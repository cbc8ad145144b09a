"""The patching engine: corruptions, restore sites, batched restoration and tracing results."""

from vitlens_patch.patching.engine import RestoreOutput, run_restore
from vitlens_patch.patching.results import TraceMean, TraceResult
from vitlens_patch.patching.sites import Site, layer_window, resolve_positions
from vitlens_patch.patching.tracing import trace_grid, trace_heads, trace_layers

__all__ = [
    "RestoreOutput", "Site", "TraceMean", "TraceResult", "layer_window", "resolve_positions",
    "run_restore", "trace_grid", "trace_heads", "trace_layers",
]
