"""Grad-CAM on token activations and Integrated Gradients summed to patches."""

import pytest
import torch

from vitlens_patch.attribution import GradCAM, IntegratedGradients, Occlusion, make_baseline
from vitlens_patch.model import HookedViT, ViTConfig


def patch_linear_model() -> HookedViT:
    """A ViT whose logits are a sum of per-patch linear terms: blocks add nothing, no final norm,
    average pooling over patches."""
    cfg = ViTConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=16, img_size=32, patch_size=8,
                    n_classes=5, class_token=False, pooling="avg", final_norm="none")
    model = HookedViT(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():
        for param in (model.blocks[0].attn.W_O, model.blocks[0].attn.b_O,
                      model.blocks[0].mlp.W_out, model.blocks[0].mlp.b_out):
            param.zero_()
        model.embed.W_E.mul_(50)  # logits of order one
    return model


def test_gradcam_weights_token_activations_by_mean_gradients(tiny_model, tiny_images):
    hook_name = "blocks.1.ln1.hook_normalized"
    stored = []

    def keep(activation, hook):
        activation.retain_grad()
        stored.append(activation)

    logits = tiny_model.run_with_hooks(tiny_images, fwd_hooks=[(hook_name, keep)])
    logits.gather(1, logits.argmax(dim=-1, keepdim=True)).sum().backward()
    activation, grad = stored[0][:, 1:], stored[0].grad[:, 1:]
    expected = torch.relu((activation * grad.mean(dim=1, keepdim=True)).sum(dim=-1))
    tiny_model.zero_grad(set_to_none=True)
    maps = GradCAM(tiny_model, progress=False).attribute(tiny_images)
    assert GradCAM(tiny_model).hook_name == hook_name
    torch.testing.assert_close(maps, expected.reshape_as(maps).detach())
    assert (maps > 0).any()


def test_gradcam_after_the_last_block_is_blind_with_class_token_pooling(tiny_model, tiny_images):
    # Why the default reads the last block's input: its output patch tokens never reach the logits.
    maps = GradCAM(tiny_model, hook_name="blocks.1.hook_resid_post", progress=False).attribute(tiny_images)
    torch.testing.assert_close(maps, torch.zeros_like(maps))


def test_gradcam_rejects_unknown_hook_names(tiny_model):
    message = r"unknown hook name 'blocks.1.hook_resid_pots'; did you mean \['blocks.1.hook_resid_post'"
    with pytest.raises(KeyError, match=message):
        GradCAM(tiny_model, hook_name="blocks.1.hook_resid_pots")


def test_gradcam_rejects_hooks_without_token_activations(tiny_model, tiny_images):
    method = GradCAM(tiny_model, hook_name="blocks.1.attn.hook_pattern", progress=False)
    message = (r"hook_name must name a \[batch, pos, d_model\] hook point with pos = 17, "
               r"got 'blocks.1.attn.hook_pattern' with shape \(3, 2, 17, 17\)")
    with pytest.raises(ValueError, match=message):
        method.attribute(tiny_images)


@pytest.mark.filterwarnings("ignore:fill 'mean' now means:DeprecationWarning")  # tested in tests/test_images.py
@pytest.mark.parametrize("baseline", ["zeros", "mean", "blur"])
def test_integrated_gradients_are_complete(baseline, tiny_model, tiny_images):
    target = torch.tensor([0, 4, 9])
    method = IntegratedGradients(tiny_model, baseline=baseline, n_steps=64, progress=False)
    maps = method.attribute(tiny_images, target)
    with torch.no_grad():
        start = tiny_model(make_baseline(tiny_images, tiny_model, baseline))
        end = tiny_model(tiny_images)
    difference = (end - start).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(maps.sum(dim=(1, 2)), difference, atol=1e-3, rtol=1e-2)


def test_integrated_gradients_match_occlusion_on_a_patch_linear_model(tiny_images):
    model = patch_linear_model()
    ig = IntegratedGradients(model, baseline="zeros", n_steps=4, progress=False).attribute(tiny_images)
    occlusion = Occlusion(model, fill="zeros", progress=False).attribute(tiny_images)
    assert occlusion.abs().max() > 0.1
    torch.testing.assert_close(ig, occlusion, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("options, message", [
    ({"baseline": "gray"}, r"baseline must be one of \('zeros', 'mean', 'blur'\) or a tensor of normalised model input, got 'gray'"),
    ({"n_steps": 0}, "n_steps must be a positive int, got 0"),
    ({"method": "simpson"}, r"method must be one of \('gausslegendre', .*\), got 'simpson'"),
])
@pytest.mark.usefixtures("without_type_checks")
def test_integrated_gradients_reject_bad_options(options, message, tiny_model):
    with pytest.raises(ValueError, match=message):
        IntegratedGradients(tiny_model, **options)
