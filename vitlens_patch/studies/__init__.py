"""Dataset-scale studies: resumable, shardable runs of a per-batch measurement over a data set."""

from vitlens_patch.studies.runner import model_fingerprint, read_study, run_study, stack_column

__all__ = ["model_fingerprint", "read_study", "run_study", "stack_column"]
