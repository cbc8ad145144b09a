"""Attribution methods by name: the registry, and a one-call comparison of several methods."""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor

from vitlens_patch.attribution.attention import AttentionRollout, CheferAttention
from vitlens_patch.attribution.base import Attributor, Target
from vitlens_patch.attribution.caap import CAAP
from vitlens_patch.attribution.gradients import GradCAM, IntegratedGradients
from vitlens_patch.attribution.perturbation import Occlusion
from vitlens_patch.attribution.sanity import RandomAttribution
from vitlens_patch.model import HookedViT

# name -> Attributor subclass, complete on import; extend with register_attributor.
ATTRIBUTORS: dict[str, type[Attributor]] = {
    "caap": CAAP,
    "rollout": AttentionRollout,
    "chefer": CheferAttention,
    "gradcam": GradCAM,
    "integrated_gradients": IntegratedGradients,
    "occlusion": Occlusion,
    "random": RandomAttribution,
}


def register_attributor(name: str, cls: type[Attributor], *, overwrite: bool = False) -> type[Attributor]:
    """Make ``cls`` available as ``get_attributor(name, ...)``; returns ``cls``.

    Registering another class under a taken name needs ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Attributor)):
        raise ValueError(f"cls must be an Attributor subclass, got {cls!r}")
    if ATTRIBUTORS.get(name, cls) is not cls and not overwrite:
        raise ValueError(
            f"name {name!r} is already registered to {ATTRIBUTORS[name].__name__}; "
            f"pass overwrite=True to replace it"
        )
    ATTRIBUTORS[name] = cls
    return cls


def get_attributor(name: str, model: HookedViT, **options) -> Attributor:
    """The attribution method ``name`` bound to ``model`` with its ``options`` (constructor kwargs)."""
    if name not in ATTRIBUTORS:
        raise ValueError(f"method must be one of {sorted(ATTRIBUTORS)}, got {name!r}")
    return ATTRIBUTORS[name](model, **options)


def attribute_all(
    model: HookedViT,
    images: Float[Tensor, "batch channel height width"],
    methods: Sequence[str] | None = None,
    target: Target = None,
    *,
    method_options: dict[str, dict] | None = None,
    **options,
) -> dict[str, Float[Tensor, "batch map_h map_w"]]:
    """Maps of several methods for the same images and target, for side-by-side comparison.

    Args:
        model: the ``HookedViT`` to explain.
        images: normalised model inputs [batch, channel, height, width].
        methods: registered names (default: all registered methods).
        target: None (predicted class), an int or a LongTensor [batch], as in ``attribute``.
        method_options: per-method constructor options, e.g. {"integrated_gradients": {"n_steps": 64}}.
        **options: ``Attributor`` options given to every method (upsample, batch_size, progress,
            score); ``method_options`` override them.

    Returns:
        method name -> maps [batch, grid_h, grid_w] ([batch, height, width] when upsampled).
    """
    methods = list(ATTRIBUTORS) if methods is None else list(methods)
    method_options = method_options or {}
    unknown = [name for name in [*methods, *method_options] if name not in ATTRIBUTORS]
    if unknown:
        raise ValueError(f"methods must be among {sorted(ATTRIBUTORS)}, got unknown {unknown}")
    unused = sorted(set(method_options) - set(methods))
    if unused:
        raise ValueError(f"method_options names methods not in methods {methods}: {unused}")
    maps = {}
    for name in methods:
        method = get_attributor(name, model, **{**options, **method_options.get(name, {})})
        maps[name] = method.attribute(images, target)
    return maps
