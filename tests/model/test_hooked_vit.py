"""HookedViT behaviour: hook points, cache shapes, fast paths, partial runs and input checks."""

import pytest
import torch

from tests.conftest import tiny_timm_vit
from vitlens_patch.model import DataConfig, HookedViT, ViTConfig


def every_hook_model() -> HookedViT:
    """A tiny model with every optional hook present (pre-norm, qk-norm, per-head results)."""
    model = HookedViT.from_timm(tiny_timm_vit(pre_norm=True, qk_norm=True, reg_tokens=1))
    model.set_use_attn_result(True)
    return model


def expected_shape(name: str, cfg: ViTConfig, batch: int) -> tuple[int, ...]:
    pos, d_model, heads = cfg.n_pos, cfg.d_model, cfg.n_heads
    leaf = name.rsplit(".", 1)[-1]
    if name == "hook_embed":
        return (batch, cfg.n_patches, d_model)
    if name in ("hook_pooled",):
        return (batch, d_model)
    if name == "hook_logits":
        return (batch, cfg.n_classes)
    if ".q_norm." in name or ".k_norm." in name:
        return (batch, pos, heads, 1 if leaf == "hook_scale" else cfg.d_head)
    if leaf in ("hook_q", "hook_k", "hook_v", "hook_z"):
        return (batch, pos, heads, cfg.d_head)
    if leaf in ("hook_attn_scores", "hook_pattern"):
        return (batch, heads, pos, pos)
    if leaf == "hook_result":
        return (batch, pos, heads, d_model)
    if leaf in ("hook_pre", "hook_post"):
        return (batch, pos, cfg.d_mlp)
    if leaf == "hook_scale":
        return (batch, pos, 1)
    return (batch, pos, d_model)


def test_cache_holds_every_hook_with_documented_shape(tiny_images):
    model = every_hook_model()
    _, cache = model.run_with_cache(tiny_images)
    assert set(cache.keys()) == set(model.hook_dict)
    for name in model.hook_dict:
        assert tuple(cache[name].shape) == expected_shape(name, model.cfg, 3), name
    assert cache["pattern", 1].shape == (3, 2, 18, 18)
    assert torch.allclose(cache["pattern", 0].sum(-1), torch.ones(3, 2, 18), atol=1e-6)


def test_every_hook_point_is_live(tiny_images):
    model = every_hook_model()
    with torch.no_grad():
        clean = model(tiny_images)
        for name in model.hook_dict:
            noise = lambda act, hook: act + torch.randn_like(act)  # noqa: E731
            patched = model.run_with_hooks(tiny_images, fwd_hooks=[(name, noise)])
            assert (patched - clean).abs().max() > 1e-4, f"{name} did not change the logits"
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


def test_fast_and_explicit_paths_agree(tiny_images):
    model = HookedViT.from_timm(tiny_timm_vit(qk_norm=True))
    with torch.no_grad():
        fast = model(tiny_images)
        explicit = model.run_with_hooks(
            tiny_images,
            fwd_hooks=[(lambda name: name.endswith(("hook_pattern", "hook_scale")), lambda act, hook: act)],
        )
    assert (fast - explicit).abs().max() <= 1e-5


def test_fused_switches_force_the_explicit_path_seen_by_plain_torch_hooks(tiny_images):
    model = HookedViT.from_timm(tiny_timm_vit(qk_norm=True))
    patterns = []
    model.blocks[0].attn.hook_pattern.register_forward_hook(lambda module, args, output: patterns.append(output))
    with torch.no_grad():
        fast = model(tiny_images)
        assert patterns == []  # a plain torch hook is not seen: the fused kernel runs
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
            if hasattr(module, "fused"):
                module.fused = False
        explicit = model(tiny_images)
    assert len(patterns) == 1 and patterns[0].shape == (3, 2, 17, 17)
    assert (fast - explicit).abs().max() <= 1e-5


def test_attn_result_sums_to_attn_out(tiny_images):
    model = every_hook_model()
    _, cache = model.run_with_cache(tiny_images)
    attn = model.blocks[0].attn
    summed = cache["result", 0].sum(2) + attn.b_O
    assert torch.allclose(summed, cache["attn_out", 0], atol=1e-6)


def test_start_and_stop_at_layer_compose(tiny_model, tiny_images):
    with torch.no_grad():
        full, cache = tiny_model.run_with_cache(tiny_images, names_filter=lambda name: "resid_pre" in name)
        resid = tiny_model(tiny_images, stop_at_layer=1)
        assert torch.equal(resid, cache["resid_pre", 1])
        assert torch.allclose(tiny_model(resid, start_at_layer=1), full, atol=1e-6)
        assert torch.equal(tiny_model(tiny_images, stop_at_layer=0), cache["resid_pre", 0])


def test_full_embed_hook_may_drop_tokens(tiny_model, tiny_images):
    keep_four = lambda act, hook: act[:, :4]  # noqa: E731
    with tiny_model.hooks(fwd_hooks=[("hook_full_embed", keep_four)]):
        logits, cache = tiny_model.run_with_cache(tiny_images, names_filter="blocks.1.hook_resid_post")
    assert logits.shape == (3, 10)
    assert cache["resid_post", 1].shape == (3, 4, 32)


def test_bfloat16_follows_the_model(tiny_model, tiny_images):
    model = tiny_model.to(torch.bfloat16)
    assert model(tiny_images).dtype == torch.bfloat16
    _, cache = model.run_with_cache(tiny_images, names_filter="hook_pooled")
    assert cache["hook_pooled"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.randn(2, 1, 32, 32), r"images must be a float tensor \[batch, 3, 32, 32\]"),
        (torch.randn(2, 3, 64, 64), r"images must be a float tensor \[batch, 3, 32, 32\].* shape \(2, 3, 64, 64\)"),
        (torch.randn(3, 32, 32), "got torch.float32 tensor of shape \\(3, 32, 32\\)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "float tensor .* got torch.uint8"),
        ("not a tensor", "got 'not a tensor'"),
    ],
)
@pytest.mark.usefixtures("without_type_checks")
def test_bad_images_raise_value_error(tiny_model, images, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(images)


def test_wrong_device_raises_value_error(tiny_model):
    with pytest.raises(ValueError, match="model's device cpu, got meta"):
        tiny_model(torch.empty(1, 3, 32, 32, device="meta"))


def test_bad_layers_raise_value_error(tiny_model, tiny_images):
    with pytest.raises(ValueError, match="stop_at_layer must be an int in"):
        tiny_model(tiny_images, stop_at_layer=5)
    with pytest.raises(ValueError, match="residual stream"):
        tiny_model(tiny_images, start_at_layer=1)


def test_unknown_hook_name_suggests_near_matches(tiny_model):
    with pytest.raises(KeyError, match="blocks.0.hook_resid_pre"):
        tiny_model.hook_point("blocks.0.hook_resid_pr")


TYPO = r"unknown hook name 'blocks.1.attn.hook_patern'; did you mean \['blocks.1.attn.hook_pattern'"


def test_hook_name_typos_raise_key_error_with_near_matches_at_every_entry_point(tiny_model, tiny_images):
    def hook(tensor, hook):
        return tensor

    entry_points = {
        "run_with_hooks": lambda name: tiny_model.run_with_hooks(tiny_images, fwd_hooks=[(name, hook)]),
        "run_with_hooks bwd": lambda name: tiny_model.run_with_hooks(
            tiny_images, bwd_hooks=[(name, hook)], reset_hooks_end=False
        ),
        "hooks": lambda name: tiny_model.hooks(fwd_hooks=[(name, hook)]).__enter__(),
        "add_hook": lambda name: tiny_model.add_hook(name, hook),
        "run_with_cache list": lambda name: tiny_model.run_with_cache(tiny_images, names_filter=[name]),
        "run_with_cache str": lambda name: tiny_model.run_with_cache(tiny_images, names_filter=name),
    }
    for entry_point, call in entry_points.items():
        with pytest.raises(KeyError, match=TYPO):
            call("blocks.1.attn.hook_patern")
        assert not any(point.fwd_hooks or point.bwd_hooks for point in tiny_model.hook_dict.values()), entry_point


def test_correct_hook_names_and_filter_functions_still_work(tiny_model, tiny_images):
    seen = []
    tiny_model.run_with_hooks(tiny_images, fwd_hooks=[
        ("blocks.1.attn.hook_pattern", lambda tensor, hook: seen.append(hook.name)),
        (lambda name: name.endswith("hook_mlp_out"), lambda tensor, hook: seen.append(hook.name)),
    ])
    assert seen == ["blocks.0.hook_mlp_out", "blocks.1.attn.hook_pattern", "blocks.1.hook_mlp_out"]
    _, cache = tiny_model.run_with_cache(tiny_images, names_filter=["blocks.0.hook_resid_pre"])
    assert list(cache.keys()) == ["blocks.0.hook_resid_pre"]


def test_preprocess_accepts_pil_uint8_and_float():
    import numpy as np
    from PIL import Image

    model = HookedViT.from_timm(tiny_timm_vit())
    array = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    from_pil = model.preprocess(Image.fromarray(array))
    from_uint8 = model.preprocess(array)
    from_float = model.preprocess(torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    assert from_pil.shape == (1, 3, 32, 32)
    assert torch.allclose(from_pil, from_uint8) and torch.allclose(from_uint8, from_float, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.preprocess(torch.randn(1, 3, 32, 32) * 5)


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_resize_boxes_follows_the_resize_and_crop_of_to_pixels(crop_pct):
    """A white box on a black 24x20 image lands where resize_boxes puts it in the 32x32 input."""
    config = DataConfig(input_size=(3, 32, 32), interpolation="nearest", crop_pct=crop_pct)
    image = torch.zeros(1, 3, 24, 20)
    image[..., 6:18, 4:12] = 1  # x 4..12, y 6..18
    boxes = config.resize_boxes(torch.tensor([[4, 6, 12, 18]]), (24, 20))
    rows, cols = torch.nonzero(config.to_pixels(image)[0, 0], as_tuple=True)
    found = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).float()
    torch.testing.assert_close(boxes[0], found, atol=1, rtol=0)
    # images of the input size are not resized, nor are their boxes; boxes stay inside the input
    assert torch.equal(config.resize_boxes(torch.tensor([[1, 2, 3, 4]]), (32, 32)), torch.tensor([[1.0, 2, 3, 4]]))
    whole = config.resize_boxes(torch.tensor([[0, 0, 20, 24]]), (24, 20))
    assert whole.tolist() == [[0.0, 0.0, 32.0, 32.0]]


@pytest.mark.usefixtures("without_type_checks")
def test_config_rejects_inconsistent_architecture():
    with pytest.raises(ValueError, match="at least patch_size"):
        ViTConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=8, img_size=6, patch_size=8)
    # a size that is not a multiple of the patch floors the grid, as timm's strided convolution
    assert ViTConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=8, img_size=30, patch_size=8).grid_size == (3, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        ViTConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=8, activation="swish")


@pytest.mark.parametrize(("extra", "feature"), [
    (dict(rotary="half"), "rotary position embeddings"),
    (dict(stem_channels=4, stem_stride=(8, 8)), "a CNN stem"),
])
def test_dynamic_img_size_refuses_what_it_cannot_resample_naming_the_feature(extra, feature):
    with pytest.raises(NotImplementedError, match=f"dynamic_img_size=True with {feature}"):
        ViTConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=8, dynamic_img_size=True, **extra)

def test_fused_qkv_weight_kept_between_calls_follows_every_weight_change():
    model = HookedViT.from_timm(tiny_timm_vit())
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        before = model(images)
    attn = model.blocks[0].attn
    delta = torch.randn_like(attn.W_K)
    with torch.no_grad():
        attn.W_K.add_(delta)  # an in-place edit rebuilds the fused weight
        assert not torch.allclose(model(images), before)
        attn.W_K.sub_(delta)
        assert torch.allclose(model(images), before, atol=1e-6)
    model(images).sum().backward()  # with gradients the fused weight is built in the graph
    assert attn.W_Q.grad is not None and attn.W_Q.grad.abs().sum() > 0
