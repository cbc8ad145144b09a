"""HF vision towers and backbones -> HookedViT: parity with the HF model, live hooks, strictness."""

import pytest
import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    DeiTConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    ViTConfig,
)

from vitlens_patch.conversion.hf_towers import HF_CONVERTERS, convert_hf_tower_state_dict
from vitlens_patch.model import HookedViT

# 2 layers, d_model 32; 1e-5 relative to the activation scale (the tolerance).
TOLERANCE = 1e-5
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


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


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
    model = HookedViT.from_hf(tiny_hf(name))
    model.set_use_attn_result(True)
    x = images(2)
    with torch.no_grad():
        clean = model(x)
        for hook_name in model.hook_dict:
            def perturb(act, hook):
                return act + 0.1 * torch.randn(act.shape, generator=torch.Generator().manual_seed(0))
            perturbed = model.run_with_hooks(x, fwd_hooks=[(hook_name, perturb)])
            assert not torch.allclose(perturbed, clean), hook_name


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
    from tests.patching.test_tracing import reference_scores, window_cells
    from vitlens_patch.patching.tracing import trace_grid, trace_layers
    from tests.references import caap_per_patch_reference
    from vitlens_patch.attribution.caap import caap

    model = HookedViT.from_hf(tiny_hf(name))
    if not model.cfg.n_classes:  # backbones get a linear probe (the same for every run)
        torch.manual_seed(0)
        model = model.with_head(torch.nn.Linear(model.cfg.d_pooled, 5))
    clean = images(2)
    corrupted = clean + 1.5 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))
    positions = (0, model.cfg.n_prefix_tokens + 3)
    layers = trace_layers(model, clean, corrupted, kind="attn", window=1, positions=list(positions), progress=False)
    expected = reference_scores(model, clean, corrupted, window_cells(model, "hook_attn_out", 1, positions))
    assert (layers.effects + layers.corrupted_score[:, None] - expected).abs().max() <= TOLERANCE
    grid = trace_grid(model, clean, corrupted, kind="resid_pre", window=1, positions=list(positions), progress=False)
    expected = reference_scores(model, clean, corrupted, window_cells(model, "hook_resid_pre", 1, positions, per_token=True))
    assert (grid.effects + grid.corrupted_score[:, None, None] - expected.reshape(grid.effects.shape)).abs().max() <= TOLERANCE
    maps = caap(model, clean[:1], layers=(0, 2), progress=False)
    assert (maps - caap_per_patch_reference(model, clean[:1], layers=(0, 2))).abs().max() <= TOLERANCE
