"""Compare attribution methods on one data set: faithfulness and localization, mean and 95% CI.

    data = EvaluationSet.from_cifar10(model, "../shared/data/cifar10/test.tar.gz", n=500)
    result = evaluate(["caap", "rollout", "random"], model, data, out="runs/evaluation")
    result.table()                                   # mean, ci_low, ci_high, n per (method, metric)
    print(result.to_markdown())                      # the same, as a README table

    from vitlens_patch.plots import plot_attribution_grid, plot_method_comparison
    plot_method_comparison(result.table())           # bars with confidence intervals, per metric
    plot_attribution_grid(data.pixels(range(6)), result.select_maps(range(6)), labels=data.labels[:6])

Every method's map is computed once per image and image kind, then scored by every metric of that
kind. Two image kinds are used (see :mod:`vitlens_patch.data.cifar10`):

- *full frame* images, for the faithfulness metrics ("deletion", "insertion", "token_deletion");
- *canvas* images, the object pasted on a class-free background with a known box, for the
  localization metrics ("aupr", "pointing_game") against the object masks.

The work runs as a study (:func:`vitlens_patch.studies.run_study`): batch by batch, each batch's
maps and scores stored at once, so an evaluation given an ``out`` directory resumes where it
stopped (and can be sharded with torchrun). The figures live in :mod:`vitlens_patch.plots`, one
layer up: they take ``result.table()`` and tensors, so this module builds no figure.
"""

from vitlens_patch.evaluation.dataset import EvaluationSet
from vitlens_patch.evaluation.harness import TARGETS, evaluate
from vitlens_patch.evaluation.metrics import DEFAULT_METRICS, METRICS, ImageKind, MetricSpec
from vitlens_patch.evaluation.result import EvaluationResult

__all__ = [
    "DEFAULT_METRICS", "METRICS", "TARGETS", "EvaluationResult", "EvaluationSet", "ImageKind", "MetricSpec",
    "evaluate",
]
