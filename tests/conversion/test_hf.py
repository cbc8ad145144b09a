"""conversion.hf: Hugging Face ViTForImageClassification -> timm VisionTransformer -> HookedViT."""

import pytest
import timm.data
import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTImageProcessor,
    ViTModel,
)

from vitlens_patch.conversion.hf import (
    UNUSED_HF_KEYS,
    convert_hf_state_dict,
    from_hf,
    pretrained_cfg_from_hf,
    timm_kwargs_from_hf_config,
    timm_model_from_hf,
)
from vitlens_patch.model import DataConfig, HookedViT

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=32, patch_size=8, num_labels=10)
# Measured max abs differences are 0 (exact GELU) to ~1e-6 (tanh GELU written differently);
# 1e-5 is ten times tighter than the 1e-4 the conversion promises.
ATOL = 1e-5

# Every architecture option the conversion maps; a layer_norm_eps of 0.5 makes timm's default
# eps (1e-6) visibly wrong, so the parity test checks that the eps is carried over.
VARIANTS = {
    "default": {},
    "gelu_new": dict(hidden_act="gelu_new"),
    "gelu_pytorch_tanh": dict(hidden_act="gelu_pytorch_tanh"),
    "quick_gelu": dict(hidden_act="quick_gelu"),
    "relu": dict(hidden_act="relu"),
    "no_qkv_bias": dict(qkv_bias=False),
    "non_square": dict(image_size=(32, 48), patch_size=(8, 4)),
    "large_eps": dict(layer_norm_eps=0.5),
}


def tiny_hf_vit(seed: int = 0, **overrides) -> ViTForImageClassification:
    """Random tiny HF ViT in eval mode. Every weight is perturbed, so LayerNorm scales and biases
    are not 1 and 0 and a swapped or dropped weight changes the output."""
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def random_images(hf_model: ViTForImageClassification, batch: int = 3, seed: int = 1) -> Tensor:
    """Normalised-looking inputs [batch, channel, height, width] at the model's image size."""
    size = hf_model.config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, hf_model.config.num_channels, height, width, generator=generator)


def timm_hidden_states(hf_model, images: Tensor) -> tuple[Tensor, list[Tensor]]:
    """timm logits [batch, n_classes] and the residual stream [batch, pos, d_model] entering block 0
    and after each block, as HF's ``hidden_states``."""
    timm_model = timm_model_from_hf(hf_model)
    outputs = []
    handles = [timm_model.blocks[0].register_forward_pre_hook(lambda module, args: outputs.append(args[0]))]
    handles += [block.register_forward_hook(lambda module, args, output: outputs.append(output))
                for block in timm_model.blocks]
    try:
        logits = timm_model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


def hooked_hidden_states(hf_model, images: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The same from HookedViT's cache: ``resid_pre`` of block 0, then each ``resid_post``."""
    hooked = from_hf(hf_model)
    logits, cache = hooked.run_with_cache(images, names_filter=lambda name: "hook_resid_" in name)
    return logits, [cache["resid_pre", 0]] + [cache["resid_post", layer] for layer in range(hooked.cfg.n_layers)]


@pytest.mark.parametrize("convert", [timm_hidden_states, hooked_hidden_states], ids=["timm", "hooked"])
@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
@torch.no_grad()
def test_hf_vit_parity(overrides, convert):
    hf_model = tiny_hf_vit(**overrides)
    images = random_images(hf_model)
    expected = hf_model(images, output_hidden_states=True)
    logits, hidden_states = convert(hf_model, images)
    torch.testing.assert_close(logits, expected.logits, atol=ATOL, rtol=0)
    assert len(hidden_states) == len(expected.hidden_states)
    for hidden, reference in zip(hidden_states, expected.hidden_states):
        torch.testing.assert_close(hidden, reference, atol=ATOL, rtol=0)


def test_hf_vit_timm_kwargs_carry_eps_and_activation():
    kwargs = timm_kwargs_from_hf_config(ViTConfig(**TINY, hidden_act="gelu_new", layer_norm_eps=1e-12))
    timm_model = timm.models.vision_transformer.VisionTransformer(**kwargs)
    norms = [timm_model.norm] + [block.norm1 for block in timm_model.blocks]
    assert {norm.eps for norm in norms} == {1e-12}
    assert kwargs["act_layer"] == "gelu_tanh"
    assert kwargs["mlp_ratio"] * kwargs["embed_dim"] == TINY["intermediate_size"]


def test_hf_vit_state_dict_legacy_names(tmp_path):
    # save_pretrained writes the transformers 4 names hub checkpoints use
    hf_model = tiny_hf_vit()
    hf_model.save_pretrained(tmp_path)
    legacy = load_file(tmp_path / "model.safetensors")
    assert any(key.startswith("vit.encoder.layer.0.attention.attention.") for key in legacy)
    expected = convert_hf_state_dict(hf_model.state_dict(), hf_model.config)
    converted = convert_hf_state_dict(legacy, hf_model.config)
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(converted[key], value, atol=0, rtol=0)


def test_hf_vit_state_dict_qkv_is_concatenated():
    hf_model = tiny_hf_vit()
    state_dict = hf_model.state_dict()
    converted = convert_hf_state_dict(state_dict, hf_model.config)
    d_model = TINY["hidden_size"]
    qkv = converted["blocks.1.attn.qkv.weight"]
    assert qkv.shape == (3 * d_model, d_model)
    for index, name in enumerate("qkv"):
        hf_weight = state_dict[f"vit.layers.1.attention.{name}_proj.weight"]
        torch.testing.assert_close(qkv[index * d_model:(index + 1) * d_model], hf_weight, atol=0, rtol=0)


def test_hf_vit_state_dict_drops_only_pooler():
    hf_model = tiny_hf_vit()
    state_dict = hf_model.state_dict()
    with_pooler = {**state_dict, **{key: torch.zeros(1) for key in UNUSED_HF_KEYS}}
    n_keys = len(with_pooler)
    converted = convert_hf_state_dict(with_pooler, hf_model.config)
    assert len(with_pooler) == n_keys  # the input is not modified
    assert converted.keys() == convert_hf_state_dict(state_dict, hf_model.config).keys()


def test_hf_vit_state_dict_unexpected_key():
    hf_model = tiny_hf_vit()
    state_dict = {**hf_model.state_dict(), "vit.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['vit.extra.weight'\]"):
        convert_hf_state_dict(state_dict, hf_model.config)


def test_hf_vit_state_dict_missing_key():
    hf_model = tiny_hf_vit()
    state_dict = dict(hf_model.state_dict())
    del state_dict["vit.layers.1.mlp.fc2.bias"]
    message = r"missing keys \['vit.layers.1.mlp.fc2.bias'\], unexpected keys \[\]"
    with pytest.raises(ValueError, match=message):
        convert_hf_state_dict(state_dict, hf_model.config)


def test_hf_vit_state_dict_more_layers_than_config():
    hf_model = tiny_hf_vit()
    config = ViTConfig(**{**TINY, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match=r"unexpected keys \['vit.layers.1.attention.k_proj.bias'"):
        convert_hf_state_dict(hf_model.state_dict(), config)


def test_hf_vit_state_dict_mixed_legacy_and_current_names():
    hf_model = tiny_hf_vit()
    state_dict = dict(hf_model.state_dict())
    state_dict["vit.encoder.layer.0.intermediate.dense.weight"] = state_dict["vit.layers.0.mlp.fc1.weight"]
    with pytest.raises(ValueError, match="mixed transformers 4 and 5 key names"):
        convert_hf_state_dict(state_dict, hf_model.config)


def test_hf_vit_mask_token_not_implemented():
    masked_model = ViTForMaskedImageModeling(ViTConfig(**TINY))
    with pytest.raises(NotImplementedError, match="use_mask_token"):
        convert_hf_state_dict(masked_model.state_dict(), masked_model.config)


@pytest.mark.parametrize(
    "config, message",
    [
        (ViTConfig(**TINY, hidden_act="silu"), r"hidden_act='silu' is not supported"),
        (ViTConfig(**TINY, head_dim=8), r"head_dim must equal hidden_size / num_attention_heads"),
        (ViTConfig(**{**TINY, "num_labels": 0}), r"num_labels=0 \(no classifier head\)"),
        (DeiTConfig(**TINY), r"model_type 'deit' is not supported"),
    ],
    ids=["hidden_act", "head_dim", "no_classifier", "deit"],
)
def test_hf_vit_config_not_implemented(config, message):
    with pytest.raises(NotImplementedError, match=message):
        timm_kwargs_from_hf_config(config)


@pytest.mark.parametrize(
    "build",
    [lambda: ViTModel(ViTConfig(**TINY)),
     lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY))],
    ids=["vit_model", "deit_distilled"],
)
@pytest.mark.usefixtures("without_type_checks")
def test_hf_vit_other_architectures_not_implemented(build):
    model = build()
    with pytest.raises(NotImplementedError, match=f"{type(model).__name__} is not supported"):
        timm_model_from_hf(model)


@pytest.mark.usefixtures("without_type_checks")
def test_hf_vit_model_or_name_type():
    with pytest.raises(ValueError, match="model_or_name must be a ViTForImageClassification, .* got int"):
        timm_model_from_hf(3)


@torch.no_grad()
def test_hf_vit_from_local_dir_with_image_processor(tmp_path):
    hf_model = tiny_hf_vit()
    processor = ViTImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3],
                                  size={"height": 32, "width": 32}, resample=3)
    hf_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    timm_model = timm_model_from_hf(tmp_path)
    images = random_images(hf_model)
    torch.testing.assert_close(timm_model(images), hf_model(images).logits, atol=ATOL, rtol=0)
    data_config = timm.data.resolve_model_data_config(timm_model)
    assert data_config["input_size"] == (3, 32, 32)
    assert data_config["interpolation"] == "bicubic"
    assert data_config["crop_pct"] == 1.0
    torch.testing.assert_close(torch.tensor(data_config["mean"]), torch.tensor([0.4, 0.5, 0.6]))
    torch.testing.assert_close(torch.tensor(data_config["std"]), torch.tensor([0.2, 0.25, 0.3]))


def test_hf_vit_from_local_dir_without_image_processor(tmp_path):
    tiny_hf_vit().save_pretrained(tmp_path)
    pretrained_cfg = timm_model_from_hf(str(tmp_path)).pretrained_cfg
    assert pretrained_cfg["mean"] == pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    assert pretrained_cfg["interpolation"] == "bilinear"


def test_hf_vit_checkpoint_without_classifier(tmp_path):
    ViTModel(ViTConfig(**TINY)).save_pretrained(tmp_path)
    message = r"not a complete ViTForImageClassification checkpoint: missing keys \[.*classifier"
    with pytest.raises(ValueError, match=message):
        timm_model_from_hf(tmp_path)


def test_hf_vit_data_config_matches_image_processor():
    # unusual rescale_factor, mean and std: the [0, 1]-pixel normalisation must still agree with
    # what the HF processor feeds the model
    config = ViTConfig(**TINY)
    processor = ViTImageProcessor(do_resize=False, rescale_factor=1 / 127.5,
                                  image_mean=[0.9, 1.0, 1.1], image_std=[0.5, 0.6, 0.7])
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    expected = processor(images=list(pixels.numpy()), return_tensors="pt").pixel_values
    data_config = DataConfig.from_dict(pretrained_cfg_from_hf(config, processor))
    torch.testing.assert_close(data_config.preprocess(pixels.numpy()), expected, atol=1e-5, rtol=0)


def test_hf_vit_data_config_crop_and_no_normalize():
    config = ViTConfig(**TINY)
    settings = {"do_center_crop": True, "size": {"shortest_edge": 40},
                "crop_size": {"height": 32, "width": 32}, "do_normalize": False, "resample": 0}
    pretrained_cfg = pretrained_cfg_from_hf(config, settings)
    assert pretrained_cfg["crop_pct"] == 0.8
    assert pretrained_cfg["mean"] == (0.0, 0.0, 0.0)
    assert pretrained_cfg["std"] == (1.0, 1.0, 1.0)
    assert pretrained_cfg["interpolation"] == "nearest"


def test_hf_vit_label_names():
    config = ViTConfig(**{**TINY, "num_labels": 2})
    config.id2label = {0: "cat", 1: "dog"}
    assert pretrained_cfg_from_hf(config)["label_names"] == ("cat", "dog")


@torch.no_grad()
def test_hf_vit_from_hf_local_dir_data_config_and_class_names(tmp_path):
    hf_model = tiny_hf_vit(num_labels=3)
    hf_model.config.id2label = {0: "cat", 1: "dog", 2: "bird"}
    hf_model.save_pretrained(tmp_path)
    ViTImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3],
                      size={"height": 32, "width": 32}, resample=3).save_pretrained(tmp_path)
    hooked = HookedViT.from_hf(tmp_path)
    assert hooked.class_names == ("cat", "dog", "bird")
    assert hooked.data_config.input_size == (3, 32, 32)
    assert hooked.data_config.interpolation == "bicubic"
    torch.testing.assert_close(torch.tensor(hooked.data_config.mean), torch.tensor([0.4, 0.5, 0.6]))
    torch.testing.assert_close(torch.tensor(hooked.data_config.std), torch.tensor([0.2, 0.25, 0.3]))
    images = random_images(hf_model)
    torch.testing.assert_close(hooked(images), hf_model(images).logits, atol=ATOL, rtol=0)


def test_hf_vit_config_and_weights_disagree():
    hf_model = tiny_hf_vit()
    hf_model.config.image_size = 64  # position embeddings still cover a 32x32 image
    message = r"shape mismatches=\['pos_embed: expected \(1, 65, 64\), got \(1, 17, 64\)'\]"
    with pytest.raises(ValueError, match=message):
        timm_model_from_hf(hf_model)
