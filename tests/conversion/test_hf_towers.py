"""HF vision towers and backbones -> HookedViT: parity with the HF model, live hooks, strictness."""

import pytest
import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    DeiTConfig,
    SiglipVisionConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    ViTConfig,
)

from vitlens_patch.conversion.hf_towers import HF_CONVERTERS, convert_hf_tower_state_dict
from tests.conversion.checks import TOLERANCE, assert_every_hook_is_live, assert_tools_match_references, relative_error
from vitlens_patch.model import HookedViT

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
MLP = dict(intermediate_size=64)

# HF class -> (config, output of the HF model that HookedViT returns)
FAMILIES = {
    "CLIPVisionModel": (CLIPVisionConfig(**COMMON, **MLP), lambda out: out.pooler_output),
    "CLIPVisionModelWithProjection": (
        CLIPVisionConfig(**COMMON, **MLP, projection_dim=16), lambda out: out.image_embeds
    ),
    "Dinov2Model": (Dinov2Config(**COMMON, layerscale_value=0.5), lambda out: out.pooler_output),
    "Dinov2WithRegistersModel": (
        Dinov2WithRegistersConfig(**COMMON, num_register_tokens=4, layerscale_value=0.5),
        lambda out: out.pooler_output,
    ),
    "Dinov2ForImageClassification": (
        Dinov2Config(**COMMON, num_labels=5, qkv_bias=False), lambda out: out.logits
    ),
    "DeiTForImageClassification": (DeiTConfig(**COMMON, **MLP, num_labels=5), lambda out: out.logits),
    "DeiTForImageClassificationWithTeacher": (
        DeiTConfig(**COMMON, **MLP, num_labels=5, hidden_act="gelu_new"), lambda out: out.logits
    ),
    "ViTModel": (ViTConfig(**COMMON, **MLP, layer_norm_eps=0.5), lambda out: out.last_hidden_state[:, 0]),
    "SiglipVisionModel": (SiglipVisionConfig(**COMMON, **MLP), lambda out: out.pooler_output),
}


def tiny_hf(name: str, seed: int = 0):
    """Random tiny HF model in eval mode with every parameter perturbed (LayerNorm weights not 1,
    biases not 0, layer scales not constant), so a dropped or swapped weight shows."""
    torch.manual_seed(seed)
    model = getattr(transformers, name)(FAMILIES[name][0]).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def hf_run(hf_model, x: torch.Tensor):
    with torch.no_grad():
        return hf_model(pixel_values=x, output_hidden_states=True)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_output_and_every_residual_stream_match_hf(name):
    hf_model = tiny_hf(name)
    model = HookedViT.from_hf(hf_model)
    x = images()
    out = hf_run(hf_model, x)
    with torch.no_grad():
        output, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert relative_error(output, FAMILIES[name][1](out)) <= TOLERANCE
    hidden = out.hidden_states
    assert len(hidden) == model.cfg.n_layers + 1
    for layer in range(model.cfg.n_layers):
        assert relative_error(cache["resid_post", layer], hidden[layer + 1]) <= TOLERANCE, layer


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_hook_is_live(name):
    assert_every_hook_is_live(HookedViT.from_hf(tiny_hf(name)), images(2))


def test_data_config_and_class_names():
    model = HookedViT.from_hf(tiny_hf("DeiTForImageClassification"))
    assert model.class_names == tuple(f"LABEL_{i}" for i in range(5))
    assert model.data_config.input_size == (3, 32, 32)
    assert HookedViT.from_hf(tiny_hf("CLIPVisionModelWithProjection")).class_names is None


def test_from_local_dir_loads_the_architecture(tmp_path):
    hf_model = tiny_hf("Dinov2WithRegistersModel")
    hf_model.save_pretrained(tmp_path)
    model = HookedViT.from_hf(tmp_path)
    x = images(2)
    with torch.no_grad():
        assert relative_error(model(x), hf_run(hf_model, x).pooler_output) <= TOLERANCE


def test_state_dict_conversion_is_strict():
    hf_model = tiny_hf("CLIPVisionModel")
    state = hf_model.state_dict()
    with pytest.raises(ValueError, match="unexpected keys .*extra.weight"):
        convert_hf_tower_state_dict(state | {"extra.weight": torch.zeros(1)}, hf_model.config, "CLIPVisionModel")
    missing = {k: v for k, v in state.items() if k != "encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layers.1.mlp.fc2.bias'\]"):
        convert_hf_tower_state_dict(missing, hf_model.config, "CLIPVisionModel")


def test_unsupported_features_raise_naming_them():
    with pytest.raises(NotImplementedError, match="use_swiglu_ffn"):
        HookedViT.from_hf(transformers.Dinov2Model(Dinov2Config(**COMMON, use_swiglu_ffn=True)))
    with pytest.raises(NotImplementedError, match="hidden_act='silu'"):
        HookedViT.from_hf(transformers.CLIPVisionModel(CLIPVisionConfig(**COMMON, **MLP, hidden_act="silu")))
    swin = transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1], num_heads=[1]))
    with pytest.raises(NotImplementedError, match="HF class SwinModel is not supported"):
        HookedViT.from_hf(swin)


def test_every_converter_has_a_parity_row():
    assert set(HF_CONVERTERS) - set(FAMILIES) <= {"Dinov2WithRegistersForImageClassification"}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trace_layers_trace_grid_and_caap_match_per_cell_references(name):
    assert_tools_match_references(HookedViT.from_hf(tiny_hf(name)), images(2))


def test_siglip_without_head_returns_the_normed_tokens():
    torch.manual_seed(0)
    hf_model = transformers.SiglipVisionModel(SiglipVisionConfig(**COMMON, **MLP, vision_use_head=False)).eval()
    model = HookedViT.from_hf(hf_model)
    assert model.cfg.pooling == "none" and model.attn_pool is None
    x = images(2)
    assert relative_error(model(x), hf_run(hf_model, x).last_hidden_state) <= TOLERANCE
