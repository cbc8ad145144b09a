"""The embedded CIFAR-10 ViT: offline loading, attached preprocessing, parity with timm."""

import json
import shutil
import socket

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from vitlens_patch.data.cifar10 import CIFAR10_CLASSES
from vitlens_patch.model import HookedViT
from vitlens_patch.pretrained import (
    CIFAR10_VIT_WEIGHTS,
    WEIGHTS_DIR,
    cifar10_vit,
    load_metadata,
    sample_images,
)


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return cifar10_vit()


@pytest.fixture(scope="module")
def inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    sample = sample_images(n_per_class=1)
    return model.preprocess(sample.images), sample.labels


def test_shipped_files_are_small_and_described():
    assert CIFAR10_VIT_WEIGHTS.stat().st_size <= 10 * 2**20
    metadata = load_metadata()
    assert metadata["timm_class"] == "VisionTransformer"
    assert {"architecture", "data_config", "class_names", "canvas_size"} <= set(metadata)
    assert all(tensor.dtype == torch.float16 for tensor in load_file(str(CIFAR10_VIT_WEIGHTS)).values())


def test_loads_offline_in_eval_mode_with_preprocessing_and_class_names(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access during loading")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = cifar10_vit()
    assert isinstance(model, HookedViT)
    assert not any(module.training for module in model.modules())
    assert model.class_names == CIFAR10_CLASSES
    assert model.data_config.input_size == (3, 64, 64) and model.cfg.img_size == (64, 64)
    sample = sample_images(n_per_class=1)
    inputs = model.preprocess(sample.images)  # 32x32 CIFAR-10 images are upsampled
    assert tuple(inputs.shape) == (10, 3, 64, 64)
    assert tuple(model(inputs).shape) == (10, 10)


def test_logits_match_the_timm_model_built_from_the_same_files(model, inputs):
    metadata = json.loads(CIFAR10_VIT_WEIGHTS.with_suffix(".json").read_text())
    reference = timm.models.vision_transformer.VisionTransformer(**metadata["architecture"]).eval()
    reference.load_state_dict({k: v.float() for k, v in load_file(str(CIFAR10_VIT_WEIGHTS)).items()}, strict=True)
    images, _ = inputs
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-4, rtol=1e-4)


def test_device_and_dtype_are_honoured(inputs):
    model = cifar10_vit(WEIGHTS_DIR, device="cpu", dtype=torch.float64)
    assert model.dtype == torch.float64 and model.device == torch.device("cpu")
    assert model.preprocess(sample_images(n_per_class=1).images).dtype == torch.float64


def test_missing_weights_or_json_are_reported(tmp_path):
    with pytest.raises(ValueError, match="weights must be a .safetensors file"):
        cifar10_vit(tmp_path / "nothing.safetensors")
    shutil.copy(CIFAR10_VIT_WEIGHTS, tmp_path / "model.safetensors")  # no JSON beside it
    with pytest.raises(ValueError, match="with its .json beside it"):
        cifar10_vit(tmp_path / "model.safetensors")


def test_weights_load_strictly(tmp_path):
    state = load_file(str(CIFAR10_VIT_WEIGHTS))
    del state["head.bias"]
    save_file(state, str(tmp_path / "cifar10_vit.safetensors"))
    shutil.copy(CIFAR10_VIT_WEIGHTS.with_suffix(".json"), tmp_path / "cifar10_vit.json")
    with pytest.raises(ValueError, match=r"missing=\['head.bias'\]"):
        cifar10_vit(tmp_path)


def test_sample_images_are_the_embedded_sample():
    sample = sample_images()
    assert len(sample) == 100 and sample.class_names == CIFAR10_CLASSES
    assert len(sample_images(n_per_class=2)) == 20
