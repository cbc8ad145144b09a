"""Gradient-based maps: Grad-CAM on token activations and Integrated Gradients over pixels."""

from __future__ import annotations

import torch
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
from einops import einsum, reduce
from jaxtyping import Float, Int
from torch import Tensor

from vitlens_patch.checks import check_positive_int
from vitlens_patch.attribution.base import Attributor, make_baseline
from vitlens_patch.images import Fill, check_fill
from vitlens_patch.model import HookedViT

# Captum's path-integral approximations
INTEGRATION_METHODS = (
    "gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"
)


class GradCAM(Attributor):
    """Grad-CAM (Selvaraju et al. 2017) on the patch tokens of one hook point.

    With activations ``act`` [batch, pos, d_model] at ``hook_name`` and their gradients: channel
    weights ``w = mean over patch tokens of dscore/dact``, map ``relu(sum_d w_d act_d)`` per patch.

    Args:
        model, score, upsample, batch_size, progress: see ``Attributor``.
        hook_name: a [batch, pos, d_model] hook point; default
            ``blocks.{n_layers-1}.ln1.hook_normalized``, the last block's normalised input (the
            layer pytorch-grad-cam uses for ViTs). The last block's ``hook_resid_post`` would give
            all-zero maps for class-token pooling, where patch tokens no longer reach the logits.
    """

    def __init__(self, model: HookedViT, *, hook_name: str | None = None, **options):
        super().__init__(model, **options)
        self.hook_name = hook_name or f"blocks.{model.cfg.n_layers - 1}.ln1.hook_normalized"
        model.hook_point(self.hook_name)  # unknown names: KeyError with near matches

    requires_gradients = True

    def _attribute_patches(
        self, images: Float[Tensor, "batch channel height width"], target: Int[Tensor, " batch"] | None
    ) -> Float[Tensor, "batch n_patches"]:
        cfg = self.model.cfg
        (activation,), (grad,) = self._score_gradients(images, target, [self.hook_name])
        if activation.ndim != 3 or activation.shape[1] != cfg.n_pos:
            raise ValueError(
                f"hook_name must name a [batch, pos, d_model] hook point with pos = {cfg.n_pos}, "
                f"got {self.hook_name!r} with shape {tuple(activation.shape)}"
            )
        activation = activation[:, cfg.n_prefix_tokens :]
        weights = grad[:, cfg.n_prefix_tokens :].mean(dim=1)  # [batch, d_model]
        cam = einsum(activation, weights, "batch patch d_model, batch d_model -> batch patch")
        return cam.clamp(min=0)


class IntegratedGradients(Attributor):
    """Integrated Gradients (Sundararajan et al. 2017) via Captum, summed to patches.

    Pixel attributions ``(x - baseline) * mean_alpha dscore/dx`` are summed over channels and over
    each patch's pixels, so the map sums to about ``score(x) - score(baseline)`` (completeness).

    Args:
        model, score, upsample, batch_size, progress: see ``Attributor``; ``batch_size`` is both
            the images per chunk and Captum's ``internal_batch_size`` (rows per model call).
        baseline: the path's start, every patch filled as ``corrupt_patches`` fills it (see
            :func:`~vitlens_patch.images.fill_images`): "zeros" (black pixels), "mean" (the
            normalisation's mean colour; until this release each image's own mean colour),
            "blur" (the image Gaussian-blurred with ``sigma``) or a tensor of normalised model
            input broadcastable to the images.
        n_steps: interpolation steps of the path integral.
        method: Captum's approximation, one of ``INTEGRATION_METHODS``.
        sigma: blur standard deviation in pixels for ``baseline="blur"``.
    """

    def __init__(
        self,
        model: HookedViT,
        *,
        baseline: Fill = "zeros",
        n_steps: int = 32,
        method: str = "gausslegendre",
        sigma: float = 2.0,
        **options,
    ):
        super().__init__(model, **options)
        if method not in INTEGRATION_METHODS:
            raise ValueError(f"method must be one of {INTEGRATION_METHODS}, got {method!r}")
        check_positive_int(n_steps, "n_steps")
        self.baseline = check_fill(baseline, "baseline")
        self.n_steps = n_steps
        self.method = method
        self.sigma = sigma
        self._integrated_gradients = CaptumIntegratedGradients(self._forward_score)

    requires_gradients = True

    def _forward_score(
        self, images: Float[Tensor, "batch channel height width"], target: Int[Tensor, " batch"]
    ) -> Float[Tensor, " batch"]:
        return self._score(self.model(images), target)

    def _attribute(
        self, images: Float[Tensor, "batch channel height width"], target: Int[Tensor, " batch"] | None
    ) -> Float[Tensor, "batch grid_h grid_w"]:
        patch_h, patch_w = self.model.cfg.patch_size
        maps = []
        baselines = make_baseline(images, self.model, self.baseline, self.sigma)
        for batch in self._batches(len(images)):
            inputs = images[batch]
            batch_target = self._resolve_target(inputs, None if target is None else target[batch])
            with torch.enable_grad():
                attributions = self._integrated_gradients.attribute(
                    inputs,
                    baselines=baselines[batch],
                    # Captum repeats extra forward args along with the interpolated inputs.
                    additional_forward_args=(batch_target,),
                    n_steps=self.n_steps,
                    method=self.method,
                    internal_batch_size=max(self.batch_size, len(inputs)),
                )
            maps.append(reduce(
                attributions.detach(),
                "batch channel (grid_h patch_h) (grid_w patch_w) -> batch grid_h grid_w",
                "sum", patch_h=patch_h, patch_w=patch_w,
            ))
        return torch.cat(maps)
